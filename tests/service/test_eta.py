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


def _timeline(total: int, step_s: float, probe_s: float, save_s: float, export_s: float, every: int, save_every: int):
    """When each step's record is written, and when the run ends, for a run that probes before every ``every``-th
    step's record and checkpoints after every ``save_every``-th (and the last) and exports the final model."""
    at, records = 0.0, {}
    for step in range(1, total + 1):
        at += step_s + (probe_s if step % every == 0 else 0.0)
        records[step] = at
        if step % save_every == 0 or step == total:
            at += save_s
    return records, at + export_s


def test_eta_counts_the_probes_checkpoints_and_export_still_ahead(tmp_path: Path) -> None:
    """Finding: early ETAs ran short. The first measured steps hold no collapse-guard probe, no checkpoint and no
    export, so their pace left all of that out; the steps that did hold one inflated the pace a little instead."""
    settings = Settings(home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db")
    engine = make_engine(settings)
    run_migrations(engine, settings)
    factory = make_session_factory(engine)
    total, every, save_every = 300, 25, 50  # the studio's first run: tiny-world with the default guard and saves
    records, end = _timeline(
        total, step_s=1.0, probe_s=2.0, save_s=1.5, export_s=1.5, every=every, save_every=save_every
    )
    with session_scope(factory) as session:
        key, _ = create_api_key(session, "alice")
        started = utcnow() - timedelta(hours=1)
        job = Job(
            owner_id=key.id,
            kind="train",
            status="running",
            queue="q",
            config={"model": "tiny", "dataset": "d"},
            resolved_config={"save_every": save_every, "guard": {"enabled": True, "every": every}},
            output_dir=str(tmp_path),
            step=0,
            total_steps=total,
            started_at=started,
        )
        session.add(job)
        session.flush()
        errors = {}
        for step in range(1, 131):
            recorded = started + timedelta(seconds=30 + records[step])  # 30 s of start-up first
            session.add(JobMetric(job_id=job.id, step=step, data={}, created_at=recorded))
            job.step = step
            session.flush()
            if step in (4, 24, 60, 130):
                truth = end - records[step]
                errors[step] = eta_seconds(job, session) / truth - 1
    # Before any probe or checkpoint is measured each counts as one step's time: still short here, where they cost
    # more, but by half as much (the old pace: 10.4% and 11.1% short at steps 4 and 24, 2.5% at step 60).
    assert -0.06 < errors[4] < 0 and -0.06 < errors[24] < 0, errors
    # Once one of each has been measured, the ETA is the time left.
    assert abs(errors[60]) < 0.005 and abs(errors[130]) < 0.005, errors
