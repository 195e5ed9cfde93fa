"""Celery tasks ``run_train(job_id)`` / ``run_eval(job_id)`` and the worker's presence in the database.

Start a worker with ``vopd worker`` (it runs ``celery worker`` on this app with concurrency 1). The pool process
runs the job, so a job killed by the kernel (out of memory) is noticed by the parent and, with acks_late and
task_reject_on_worker_lost, delivered again; the rerun resumes from the newest checkpoint.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading

from celery import signals
from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker

from app.celery_app import TASK_NAMES, make_celery
from app.db import make_engine, make_session_factory, session_scope
from app.settings import get_settings
from app.tables import Worker, utcnow
from worker.lifeline import die_with_parent
from worker.runner import join_job, run_job

log = logging.getLogger(__name__)
settings = get_settings()
celery_app = make_celery(settings)
WORKER_GPUS = int(os.environ.get("VOPD_WORKER_GPUS", "1"))  # set by `vopd worker --gpus N` (worker.main)
_factory: sessionmaker[Session] | None = None


def session_factory() -> sessionmaker[Session]:
    """Created lazily in the process that uses it: engines (and their sockets) must not cross a fork."""
    global _factory
    if _factory is None:
        _factory = make_session_factory(make_engine(settings))
    return _factory


@signals.worker_process_init.connect
def _fresh_engine_after_fork(**_: object) -> None:
    global _factory
    # A pool process dies with its worker (killed, or killed with the API that supervised it): an orphan would
    # go on training beside the worker that takes the job over. The job resumes from its newest checkpoint.
    die_with_parent(os.getppid())
    if _factory is not None:  # leave the parent's pooled connections alone (closing them would break its sockets)
        _factory.kw["bind"].dispose(close=False)
    _factory = None


@celery_app.task(name=TASK_NAMES["train"], acks_late=True, reject_on_worker_lost=True)
def run_train(job_id: int) -> str:
    return run_job(session_factory(), settings, job_id)


@celery_app.task(name=TASK_NAMES["eval"], acks_late=True, reject_on_worker_lost=True)
def run_eval(job_id: int) -> str:
    return run_job(session_factory(), settings, job_id)


@celery_app.task(name=TASK_NAMES["join"], acks_late=False)
def join_ranks(job_id: int, leader: str) -> str:
    """Machine K of a node group starts its share of a job that machine 0 runs (not redelivered: if this machine
    dies, the job's rendezvous or collectives fail on machine 0, which fails or resumes the job as a whole)."""
    return join_job(session_factory(), settings, job_id, leader)


# --------------------------------------------------------------------------- presence
class _Presence:
    """A row in ``workers`` refreshed every heartbeat: how /api/health counts live workers on any broker."""

    def __init__(self) -> None:
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.shape = {
            "queue": settings.queue,
            "gpus": WORKER_GPUS,
            "nodes": settings.nodes,
            "node_rank": settings.node_rank,
        }
        self.stop = threading.Event()

    def beat(self) -> None:
        with session_scope(session_factory()) as session:
            seen = session.execute(
                update(Worker).where(Worker.name == self.name).values(last_seen_at=utcnow(), **self.shape)
            ).rowcount
            if not seen:
                session.add(Worker(name=self.name, **self.shape))

    def run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:  # keep beating through database hiccups
                log.exception("worker heartbeat failed")
            if self.stop.wait(settings.heartbeat_interval_s):
                return

    def leave(self) -> None:
        self.stop.set()
        with session_scope(session_factory()) as session:
            session.execute(delete(Worker).where(Worker.name == self.name))


_presence = _Presence()


@signals.worker_init.connect
def _preload_library(**_: object) -> None:
    """Import torch and the loops once in the parent, so each forked pool process starts warm."""
    import vopd.evaluate
    import vopd.trainer  # noqa: F401

    # Keep the garbage collector off these long-lived objects: forked children share their pages instead of
    # copying them on the next collection, and shutdown does not crawl through torch and transformers.
    gc.freeze()


@signals.worker_ready.connect
def _announce(**_: object) -> None:
    threading.Thread(target=_presence.run, name="vopd-presence", daemon=True).start()


@signals.worker_shutdown.connect
def _leave(**_: object) -> None:
    try:
        _presence.leave()
    except Exception:  # shutting down anyway
        log.exception("could not remove the worker row")
