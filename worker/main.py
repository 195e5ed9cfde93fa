"""``vopd worker``: a Celery worker on the configured broker, one job at a time."""

from __future__ import annotations

import os

from worker.lifeline import SUPERVISOR_ENV, die_with_parent


def run_worker(queue: str | None = None, loglevel: str = "INFO") -> int:
    if queue:
        os.environ["VOPD_QUEUE"] = queue  # read by worker.tasks' settings at import
    supervisor = os.environ.get(SUPERVISOR_ENV, "")
    if supervisor.isdigit():  # under `vopd serve`: never outlive it (it restarts us when we die)
        die_with_parent(int(supervisor), whole_group=True)
    from app.db import make_engine, run_migrations
    from app.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    engine = make_engine(settings)
    run_migrations(engine, settings)
    engine.dispose()

    from worker.tasks import celery_app

    celery_app.worker_main(
        [
            "worker",
            f"--loglevel={loglevel}",
            "--concurrency=1",
            "--pool=prefork",
            f"--queues={settings.queue}",
            f"--hostname=vopd-{os.getpid()}@%h",
            # Liveness is kept in the database; these need a broadcast exchange the SQLite broker lacks.
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return 0
