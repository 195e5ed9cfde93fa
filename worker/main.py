"""``vopd worker``: a Celery worker on the configured broker, one job at a time."""

from __future__ import annotations

import os

from app.serve import SUPERVISOR_ENV
from worker.lifeline import die_with_parent

GPUS_ENV = "VOPD_WORKER_GPUS"


def detected_gpus() -> int:
    """The CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies), at least 1."""
    import torch

    return max(1, torch.cuda.device_count())


def consumed_queues(queue: str, gpus: int, nodes: int, node_rank: int) -> list[str]:
    """The broker queues a worker takes messages from.

    Its own queue and one per job size it can hold (a job needing N devices is published to QUEUE.gpusN); machine 0
    of a node group of M also takes the jobs over M machines (QUEUE.nodesM.gpusN); the group's other machines take
    only the requests to start their share of such a job (they are never busy with another when one comes)."""
    from app.queueing import join_queue, routed_queue

    if node_rank > 0:
        return [join_queue(queue, nodes, node_rank)]
    queues = [routed_queue(queue, count) for count in range(1, gpus + 1)]
    if nodes > 1:
        queues += [routed_queue(queue, count, nodes) for count in range(1, gpus + 1)]
    return queues


def run_worker(queue: str | None = None, loglevel: str = "INFO", *, gpus: int | None = None) -> int:
    if queue:
        os.environ["VOPD_QUEUE"] = queue  # read by worker.tasks' settings at import
    os.environ[GPUS_ENV] = str(gpus or detected_gpus())  # read by worker.tasks (its presence row) at import
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

    queues = consumed_queues(settings.queue, int(os.environ[GPUS_ENV]), settings.nodes, settings.node_rank)
    celery_app.worker_main(
        [
            "worker",
            f"--loglevel={loglevel}",
            "--concurrency=1",
            "--pool=prefork",
            f"--queues={','.join(queues)}",
            f"--hostname=vopd-{os.getpid()}@%h",
            # Liveness is kept in the database; these need a broadcast exchange the SQLite broker lacks.
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return 0
