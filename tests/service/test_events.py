"""The job event stream sends the whole job once, then only what changed (each status event used to repeat the whole
job, config included, about 3 KB, for a step counter that moved). Embedded SQLite, no worker: the test moves the job
row itself while the stream is open, as a worker would."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from app.auth import create_api_key
from app.db import session_scope
from app.main import create_app
from app.routers.jobs import job_change
from app.settings import Settings
from app.tables import Job, JobMetric, utcnow
from frontend.client import Job as ClientJob
from frontend.client import VopdClient, apply_change, parse_sse

BIG_CONFIG = {"model": "tiny", "dataset": "synth-64", "steps": 3, "note": "x" * 3000}


def test_job_change_names_only_changed_fields_and_waits_for_real_news() -> None:
    sent = {"status": "running", "step": 1, "config": BIG_CONFIG, "eta_seconds": 30.0, "heartbeat_at": "t1"}
    assert job_change(sent, {**sent, "eta_seconds": 20.0, "heartbeat_at": "t2"}) == {}  # no news: nothing sent
    assert job_change(sent, {**sent, "step": 2, "eta_seconds": 20.0}) == {"step": 2, "eta_seconds": 20.0}
    assert job_change(sent, {**sent, "status": "succeeded", "eta_seconds": None}) == {
        "status": "succeeded",
        "eta_seconds": None,
    }


def test_the_stream_sends_the_job_once_then_changes_that_fold_into_the_job(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db", events_poll_s=0.1)
    app = create_app(settings)
    factory = app.state.session_factory
    with session_scope(factory) as session:
        row, key = create_api_key(session, "alice")
        job = Job(
            owner_id=row.id,
            kind="train",
            status="queued",
            queue=settings.queue,
            config=BIG_CONFIG,
            resolved_config={"model": "tiny"},
            output_dir=str(tmp_path / "job"),
        )
        session.add(job)
        session.flush()
        job_id = job.id

    def worker() -> None:
        """queued -> running, three steps with metrics, succeeded: what a worker writes."""
        time.sleep(0.5)
        with session_scope(factory) as session:
            row = session.get(Job, job_id)
            row.status, row.started_at, row.total_steps, row.worker = "running", utcnow(), 3, "w1"
        for step in (1, 2, 3):
            time.sleep(0.4)
            with session_scope(factory) as session:
                row = session.get(Job, job_id)
                session.add(JobMetric(job_id=job_id, step=step, data={"loss": 1.0 / step}))
                row.step, row.progress, row.latest_metrics = step, step / 3, {"loss": 1.0 / step}
                row.heartbeat_at = utcnow()
        time.sleep(0.4)
        with session_scope(factory) as session:
            row = session.get(Job, job_id)
            row.status, row.finished_at = "succeeded", row.started_at + timedelta(seconds=5)
            row.result = {"model": f"job-{job_id}/final"}

    mover = threading.Thread(target=worker, daemon=True)
    mover.start()
    client = TestClient(app)
    headers = {"Authorization": f"Bearer {key}"}
    body = client.get(f"/api/jobs/{job_id}/events", headers=headers).text
    mover.join(10)
    events = list(parse_sse(body.splitlines()))
    names = [name for name, _ in events]
    assert names[0] == "status" and names.count("status") == 1, names
    assert names[-1] == "end" and events[-1][1] == {"status": "succeeded"}
    first = ClientJob.model_validate(events[0][1])
    assert first.status == "queued" and first.config == BIG_CONFIG
    changes = [data for name, data in events if name == "change"]
    assert len(changes) >= 3, names  # running, steps, succeeded
    assert all("config" not in change and "resolved_config" not in change for change in changes), changes
    assert all(len(json.dumps(change)) < 1000 for change in changes), changes
    assert all(change.keys() - {"eta_seconds", "heartbeat_at"} for change in changes)
    assert [change["status"] for change in changes if "status" in change] == ["running", "succeeded"]

    # Folding the changes into the first job gives the job as GET answers it at the end.
    folded = first
    for change in changes:
        folded = apply_change(folded, change)
    final = ClientJob.model_validate(client.get(f"/api/jobs/{job_id}", headers=headers).json())
    assert folded == final
    assert (folded.step, folded.progress, folded.latest_metrics) == (3, 1.0, {"loss": 1 / 3})

    # The client's consumer reads the same stream into whole jobs.
    stream_type = {"content-type": "text/event-stream"}
    replay = httpx.MockTransport(lambda _: httpx.Response(200, text=body, headers=stream_type))
    with VopdClient("http://testserver", key, transport=replay) as api:
        jobs = [value for name, value in api.job_events(job_id) if name in ("status", "change")]
    assert jobs[-1] == final
