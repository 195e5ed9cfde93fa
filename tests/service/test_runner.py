"""The worker's job claiming (idempotency), progress writing and error naming, on a SQLite file (no servers)."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from app.auth import create_api_key
from app.crud import requeue_orphans
from app.db import make_engine, make_session_factory, run_migrations, session_scope
from app.settings import DEFAULT_QUEUE, Settings
from app.tables import Job, JobLog, JobMetric, utcnow
from worker.reporter import DatabaseReporter, json_safe
from worker.runner import _rank_error, claim, describe_error, worker_name


@pytest.fixture
def db(tmp_path: Path):
    settings = Settings(
        home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/t.db", stale_after_s=60, queue=DEFAULT_QUEUE, queues=[]
    )
    engine = make_engine(settings)
    run_migrations(engine, settings)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        owner, _ = create_api_key(session, "t")
        owner_id = owner.id
    yield settings, factory, owner_id
    engine.dispose()


def _job(factory, owner_id: int, **fields) -> int:
    with session_scope(factory) as session:
        job = Job(
            owner_id=owner_id, kind="train", queue=DEFAULT_QUEUE, config={}, resolved_config={"x": 1}, output_dir="/o"
        )
        for name, value in fields.items():
            setattr(job, name, value)
        session.add(job)
        session.flush()
        return job.id


def _get(factory, job_id: int) -> Job:
    with factory() as session:
        return session.get(Job, job_id)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_queued_job_is_claimed_once(db) -> None:
    settings, factory, owner = db
    job_id = _job(factory, owner)
    first = claim(factory, job_id, worker_name(), settings)
    assert first is not None and first.config == {"x": 1} and not first.takeover
    other_live_worker = f"{socket.gethostname()}:{1}"  # pid 1 is alive
    with session_scope(factory) as session:
        session.get(Job, job_id).worker = other_live_worker
    assert claim(factory, job_id, "elsewhere:2", settings) is None  # duplicate delivery while it runs
    job = _get(factory, job_id)
    assert (job.status, job.attempts, job.worker) == ("running", 1, other_live_worker)


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_terminal_jobs_are_skipped(db, status: str) -> None:
    settings, factory, owner = db
    job_id = _job(factory, owner, status=status)
    assert claim(factory, job_id, "w:1", settings) is None
    assert _get(factory, job_id).status == status


def test_cancelled_while_queued_is_closed_without_running(db) -> None:
    settings, factory, owner = db
    job_id = _job(factory, owner, cancel_requested=True)
    assert claim(factory, job_id, "w:1", settings) is None
    job = _get(factory, job_id)
    assert job.status == "cancelled" and job.attempts == 0 and job.finished_at is not None


def test_running_job_of_a_dead_process_is_taken_over(db) -> None:
    settings, factory, owner = db
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    job_id = _job(factory, owner, status="running", worker=dead, attempts=1, heartbeat_at=utcnow())
    taken = claim(factory, job_id, "me:1", settings)
    assert taken is not None and taken.takeover
    job = _get(factory, job_id)
    assert (job.worker, job.attempts) == ("me:1", 2)
    with factory() as session:
        messages = session.scalars(select(JobLog.message).where(JobLog.job_id == job_id)).all()
    assert messages == [f"started on me:1, attempt 2 (taking over from {dead})"]


def test_remote_worker_is_trusted_until_its_heartbeat_is_stale(db) -> None:
    settings, factory, owner = db
    job_id = _job(factory, owner, status="running", worker="other-host:7", heartbeat_at=utcnow())
    assert claim(factory, job_id, "me:1", settings) is None
    with session_scope(factory) as session:
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=settings.stale_after_s + 1)
    assert claim(factory, job_id, "me:1", settings) is not None


def test_orphan_reaper_requeues_only_stale_running_jobs(db) -> None:
    settings, factory, owner = db
    stale = _job(factory, owner, status="running", worker="h:1", heartbeat_at=utcnow() - timedelta(seconds=600))
    fresh = _job(factory, owner, status="running", worker="h:2", heartbeat_at=utcnow())

    class RecordingQueue:
        sent: list[tuple[int, str, str]] = []

        def enqueue(self, job_id: int, kind: str, queue: str) -> None:
            self.sent.append((job_id, kind, queue))

    queue = RecordingQueue()
    assert requeue_orphans(factory, settings, queue) == [stale]
    assert queue.sent == [(stale, "train", DEFAULT_QUEUE)]
    assert _get(factory, stale).status == "queued" and _get(factory, fresh).status == "running"


def test_reporter_keeps_every_metric_but_throttles_the_job_row(db) -> None:
    settings, factory, owner = db
    job_id = _job(factory, owner, status="running", worker="me:1")
    reporter = DatabaseReporter(factory, job_id, "me:1", interval_s=3600)
    reporter.on_start(total=3, start=0, unit="step")
    reporter.on_progress(done=1, total=3, metrics={"loss": 1.0})
    reporter.on_progress(done=2, total=3, metrics={"loss": float("nan")})
    assert _get(factory, job_id).step == 0  # throttled
    reporter.on_progress(done=3, total=3, metrics={"loss": 0.5})
    job = _get(factory, job_id)
    assert (job.step, job.progress, job.latest_metrics) == (3, 1.0, {"loss": 0.5})
    with factory() as session:
        rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.id)).all()
    assert [(row.step, row.data["loss"]) for row in rows] == [(1, 1.0), (2, None), (3, 0.5)]
    assert reporter.should_stop() is False
    with session_scope(factory) as session:
        session.get(Job, job_id).cancel_requested = True
    reporter._last_poll = 0.0
    assert reporter.should_stop() is True


def test_errors_are_named_and_json_is_strict() -> None:
    assert describe_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")).startswith(
        "out of memory: CUDA"
    )
    assert describe_error(ValueError("bad")) == "ValueError: bad"
    assert json_safe({"a": math.inf, "b": [1.5, math.nan], "c": torch.tensor(2.0)}) == {
        "a": None,
        "b": [1.5, None],
        "c": 2.0,
    }


def test_jobs_over_several_machines_route_to_node_groups_and_start_at_the_groups_rendezvous(db) -> None:
    from app.queueing import join_queue, queue_shape, routed_queue
    from worker.main import consumed_queues
    from worker.runner import join_job, torchrun_command

    assert [routed_queue("q", 1), routed_queue("q", 4), routed_queue("q", 2, 3)] == ["q", "q.gpus4", "q.nodes3.gpus2"]
    assert [queue_shape(name) for name in ("q", "q.gpus4", "a.b.nodes3.gpus2")] == [
        ("q", 1, 1),
        ("q", 4, 1),
        ("a.b", 2, 3),
    ]
    # Machine 0 of a group of 2 takes one-machine jobs and the group's jobs; machine 1 only its join requests.
    assert consumed_queues("q", 2, 2, 0) == ["q", "q.gpus2", "q.nodes2.gpus1", "q.nodes2.gpus2"]
    assert consumed_queues("q", 2, 2, 1) == [join_queue("q", 2, 1)] == ["q.nodes2.rank1"]
    assert consumed_queues("q", 1, 1, 0) == ["q"]

    settings = Settings(home=db[0].home, master_addr="10.0.0.5", master_port=29511, nodes=2, node_rank=1)
    command = torchrun_command(7, "host:1", 4, 2, 1, settings, timeout_s=30)
    assert command[command.index("torch.distributed.run") + 1 :] == [
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.5",
        "--master-port=29511",
        "--rdzv-conf=timeout=30",
        "--nproc-per-node=4",
        "-m",
        "worker.ranks",
        "7",
        "host:1",
    ]
    assert "--standalone" in torchrun_command(7, "host:1", 2, 1, 0, settings)
    # A machine that never came: the job's error is the launcher's own, not torchrun's generic summary.
    reason = "torch.distributed.DistStoreError: Timed out after 11 seconds waiting for clients. 1/2 clients joined."
    assert _rank_error(f"Traceback ...\n{reason}\n") == reason
    rank_failed = "[rank1]: ValueError: bad\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: x"
    assert _rank_error(rank_failed) == "[rank1]: ValueError: bad"

    # A join request for a job that no longer runs on the machine that asked is skipped (it failed meanwhile).
    _, factory, owner_id = db
    job_id = _job(factory, owner_id, status="failed", worker="host:1", nodes=2)
    assert join_job(factory, settings, job_id, "host:1") == "skipped"
    # A request for a job over another number of machines than this group has is refused, never half-run.
    other = _job(factory, owner_id, status="running", worker="host:1", nodes=3)
    assert join_job(factory, settings, other, "host:1") == "skipped"
    with pytest.raises(ValueError, match="node_rank 2 must be below nodes 2"):
        Settings(home=db[0].home, nodes=2, node_rank=2)
