"""The ETA comes from measured step times, and only once a few steps are measured (start-up is not a step)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from app.auth import create_api_key
from app.crud import ETA_MIN_STEPS, eta_seconds, job_out
from app.db import make_engine, make_session_factory, run_migrations, session_scope
from app.settings import Settings
from app.tables import Job, JobMetric, utcnow


def test_eta_waits_for_measured_steps_and_ignores_start_up(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db")
    engine = make_engine(settings)
    run_migrations(engine, settings)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        key, _ = create_api_key(session, "alice")
        started = utcnow() - timedelta(seconds=100)
        job = Job(
            owner_id=key.id,
            kind="train",
            status="running",
            queue="q",
            config={"model": "tiny", "dataset": "d"},
            resolved_config={},
            output_dir=str(tmp_path),
            step=1,
            total_steps=300,
            started_at=started,
        )
        session.add(job)
        session.flush()

        # 96 s of start-up (model load), then one step every second.
        def record(step: int) -> None:
            session.add(JobMetric(job_id=job.id, step=step, data={}, created_at=started + timedelta(seconds=95 + step)))
            job.step = step
            session.flush()

        record(1)
        assert eta_seconds(job, session) is None  # the old rate read 100 s/step here: 8 h for a 5-minute job
        for step in range(2, ETA_MIN_STEPS + 1):
            record(step)
        assert eta_seconds(job, session) is None
        record(ETA_MIN_STEPS + 1)
        assert abs(eta_seconds(job, session) - (300 - ETA_MIN_STEPS - 1)) < 1e-6  # 1 s per step left
        assert job_out(session, job, settings=settings).eta_seconds is not None
