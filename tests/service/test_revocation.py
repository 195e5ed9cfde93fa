"""Revocation reaches an open event stream: a revoked key's (or an ended session's) `/events` stream closes within
one poll interval, on SQLite and on PostgreSQL + Redis (finding: a revoked key kept receiving a job's metrics and logs
for 77-83 s, until the job ended)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest

from app import crud
from app.auth import create_api_key
from app.db import session_scope
from app.tables import Job
from tests.service.conftest import Service, tiny_train_config

pytestmark = pytest.mark.services

# The fixture polls every 0.1 s; the setting's ceiling is 5 s. Generous for two busy shared cores.
CLOSES_WITHIN_S = 5.0


def _events(body: str) -> list[tuple[str, dict]]:
    found = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            found.append((fields["event"], json.loads(fields["data"])))
    return found


def _stream_until_closed(service: Service, job_id: int, headers: dict[str, str], end: Callable[[], None]) -> tuple:
    """Open the job's stream, call ``end`` once it runs, and return (seconds from ``end`` to close, events)."""
    done: dict = {}

    def read() -> None:
        response = service.client.get(f"/api/jobs/{job_id}/events", headers=headers)
        done["at"], done["response"] = time.monotonic(), response

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(1.5)  # the stream is open and polling
    assert reader.is_alive(), "the stream ended before the credential did"
    ended_at = time.monotonic()
    end()
    reader.join(CLOSES_WITHIN_S + 1)
    return (done["at"] - ended_at if "at" in done else None), done


def _queued_job_no_worker_serves(service: Service, headers: dict[str, str]) -> int:
    """A job that stays queued (two devices: no worker of the fixture takes it), so only revocation ends its stream."""
    body = {"kind": "train", "resources": {"gpus": 2}, "config": tiny_train_config()}
    created = service.client.post("/api/jobs", json=body, headers=headers)
    assert created.status_code == 201, created.text
    return created.json()["id"]


def _cancel(service: Service, job_id: int) -> None:
    with session_scope(service.client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        job = session.get(Job, job_id)
        if job is not None and job.status == "queued":
            crud.request_cancel(session, job)


def test_an_open_event_stream_closes_when_its_key_is_revoked(service: Service) -> None:
    with session_scope(service.client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        row, key = create_api_key(session, "streamer")
        key_id = row.id
    headers = {"Authorization": f"Bearer {key}"}
    job_id = _queued_job_no_worker_serves(service, headers)
    try:

        def revoke() -> None:
            assert service.client.post(f"/api/keys/{key_id}/revoke", headers=headers).status_code == 200

        closed_after, done = _stream_until_closed(service, job_id, headers, revoke)
        assert closed_after is not None and closed_after < CLOSES_WITHIN_S, f"still streaming after {CLOSES_WITHIN_S}s"
        events = _events(done["response"].text)
        assert events[0][0] == "status" and events[-1] == ("end", {"status": "unauthorized"}), events
    finally:
        _cancel(service, job_id)


def test_an_open_event_stream_closes_when_its_session_ends(service: Service) -> None:
    opened = service.client.post("/api/sessions", headers=service.alice)
    assert opened.status_code == 201, opened.text
    headers = {"Authorization": f"Bearer {opened.json()['session']}"}
    job_id = _queued_job_no_worker_serves(service, headers)
    try:

        def sign_out() -> None:
            assert service.client.delete("/api/sessions/current", headers=headers).status_code == 204

        closed_after, done = _stream_until_closed(service, job_id, headers, sign_out)
        assert closed_after is not None and closed_after < CLOSES_WITHIN_S, f"still streaming after {CLOSES_WITHIN_S}s"
        assert _events(done["response"].text)[-1] == ("end", {"status": "unauthorized"})
        # The owner's key still reads the job: only the session ended.
        assert service.client.get(f"/api/jobs/{job_id}", headers=service.alice).status_code == 200
    finally:
        _cancel(service, job_id)
