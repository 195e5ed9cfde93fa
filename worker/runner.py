"""Running one job id: claim the row, run the library, record the outcome. Celery-free, so it is testable and
the task bodies stay one line.

Idempotent by construction: a terminal job is skipped; a queued job is claimed with a conditional UPDATE (two
deliveries cannot both win); a running job is taken over only when its worker is gone (stale heartbeat, or a
dead process on this host), and then training resumes from the newest checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import socket
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.crud import QuotaExceeded, job_folders, starts_since_queued
from app.db import session_scope
from app.settings import Settings
from app.tables import TERMINAL_STATUSES, Artifact, Job, JobLog, utcnow
from worker.reporter import DatabaseReporter, QuotaGuard, json_safe

log = logging.getLogger(__name__)


def worker_name() -> str:
    """Host and pid of the process running the job: enough to tell whether it is still alive."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_gone(name: str | None) -> bool:
    if not name or ":" not in name:
        return True
    host, _, pid = name.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine: only its heartbeat can tell
    if int(pid) == os.getpid():
        return True  # this very process was running it, so that attempt is over
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Claim:
    job_id: int
    kind: str
    config: dict[str, Any]
    output_dir: Path
    takeover: bool
    gpus: int = 1
    nodes: int = 1


def _log(session: Session, job_id: int, message: str, level: str = "info") -> None:
    session.add(JobLog(job_id=job_id, level=level, message=message))


def claim(factory: sessionmaker[Session], job_id: int, me: str, settings: Settings) -> Claim | None:
    with session_scope(factory) as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return None
        if job.status in TERMINAL_STATUSES:
            log.info("job %s is already %s; skipped", job_id, job.status)
            return None
        now = utcnow()
        # Read before the UPDATEs below, which refresh ``job`` in the session.
        previous_worker, attempt, kind, output_dir = job.worker, job.attempts + 1, job.kind, Path(job.output_dir)
        gpus, nodes = job.gpus, job.nodes
        config = dict(job.resolved_config)
        if job.status == "queued" and job.cancel_requested:
            session.execute(
                update(Job).where(Job.id == job_id, Job.status == "queued").values(status="cancelled", finished_at=now)
            )
            return None
        claimed = update(Job).values(
            status="running", worker=me, attempts=Job.attempts + 1, started_at=now, heartbeat_at=now
        )
        takeover = job.status == "running"
        if takeover:
            stale = job.heartbeat_at is None or job.heartbeat_at < now - timedelta(seconds=settings.stale_after_s)
            if not (stale or _process_gone(previous_worker)):
                log.info("job %s runs on live worker %s; duplicate delivery skipped", job_id, previous_worker)
                return None
        starts = starts_since_queued(session, job_id)
        if starts >= settings.max_attempts:  # every start so far ended with its process dying: stop redelivering
            last = f" (the last on {previous_worker})" if previous_worker else ""
            reason = (
                f"gave up after {starts} attempts: the job's process died each time{last}, e.g. killed for using too "
                f"much memory; lower batch_size or max_new_tokens, then resume it (VOPD_MAX_ATTEMPTS="
                f"{settings.max_attempts})"
            )
            gave_up = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == job.status, Job.worker == previous_worker)
                .values(status="failed", error=reason, finished_at=now)
            ).rowcount
            if gave_up:
                _log(session, job_id, reason, "error")
            return None
        if takeover:
            won = session.execute(
                claimed.where(Job.id == job_id, Job.status == "running", Job.worker == previous_worker)
            ).rowcount
        else:
            won = session.execute(claimed.where(Job.id == job_id, Job.status == "queued")).rowcount
        if not won:
            return None
        previous = f" (taking over from {previous_worker})" if takeover else ""
        _log(session, job_id, f"started on {me}, attempt {attempt}{previous}")
        return Claim(job_id, kind, config, output_dir, takeover, gpus, nodes)


class Heartbeat:
    """Says "alive" every few seconds from a thread, also while one long step holds the training loop."""

    def __init__(self, factory: sessionmaker[Session], job_id: int, me: str, interval_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(factory, job_id, me, interval_s), name=f"heartbeat-{job_id}", daemon=True
        )

    def _run(self, factory: sessionmaker[Session], job_id: int, me: str, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                with session_scope(factory) as session:
                    session.execute(update(Job).where(Job.id == job_id, Job.worker == me).values(heartbeat_at=utcnow()))
            except Exception:  # a missed beat is not worth killing the job for
                log.exception("heartbeat of job %s failed", job_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def describe_error(error: BaseException) -> str:
    """One line for the job row; out-of-memory errors say so plainly, whatever the device."""
    import torch

    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return f"out of memory: {error}".strip().rstrip(":")
    if isinstance(error, QuotaExceeded):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _release_memory() -> None:
    """The pool process outlives the job: give its model, optimizer and cached GPU blocks back before the next."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finish(factory: sessionmaker[Session], job_id: int, me: str, **values: Any) -> None:
    with session_scope(factory) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == me, Job.status == "running")
            .values(finished_at=utcnow(), heartbeat_at=utcnow(), **values)
        )


def _add_artifact(factory: sessionmaker[Session], job_id: int, name: str, kind: str, path: Path) -> None:
    from app.artifacts import folder_size

    with session_scope(factory) as session:
        session.query(Artifact).filter(Artifact.job_id == job_id, Artifact.name == name).delete()
        session.add(Artifact(job_id=job_id, name=name, kind=kind, path=str(path), size_bytes=folder_size(path)))


def _run_train(factory: sessionmaker[Session], job: Claim, me: str, reporter: DatabaseReporter) -> None:
    from vopd.config import TrainConfig
    from vopd.trainer import METRICS_FILE, latest_checkpoint, train

    if job.gpus * job.nodes > 1:
        outcome = _train_on_ranks(job, me, reporter)
    else:
        config = TrainConfig.model_validate(job.config)
        resume = latest_checkpoint(job.output_dir) is not None  # first attempt or a rerun after a crash/cancel
        result = train(config, callbacks=[reporter], resume=resume)
        outcome = {
            "stopped": result.stopped,
            "step": result.step,
            "total_steps": result.total_steps,
            "final_dir": str(result.final_dir) if result.final_dir else None,
            "last_metrics": result.last_metrics,
        }
    if reporter.quota is not None and not outcome["stopped"]:
        reporter.quota.check(force=True)  # the final folder is the last big write
    if (job.output_dir / METRICS_FILE).is_file():
        _add_artifact(factory, job.job_id, METRICS_FILE, "metrics", job.output_dir / METRICS_FILE)
    summary = {"step": outcome["step"], "total_steps": outcome["total_steps"], "last_metrics": outcome["last_metrics"]}
    if outcome["stopped"]:
        _finish(factory, job.job_id, me, status="cancelled", step=outcome["step"], result=json_safe(summary))
        return
    assert outcome["final_dir"] is not None
    _add_artifact(factory, job.job_id, "final", "model", Path(outcome["final_dir"]))
    summary["model"] = f"job-{job.job_id}/final"
    _finish(
        factory,
        job.job_id,
        me,
        status="succeeded",
        step=outcome["step"],
        progress=1.0,
        latest_metrics=json_safe(outcome["last_metrics"]) or None,
        result=json_safe(summary),
    )


RANKS_LOG = "ranks.log"


def torchrun_command(
    job_id: int, leader: str, gpus: int, nodes: int, node_rank: int, settings: Settings, timeout_s: float = 600.0
) -> list[str]:
    """The torchrun command that starts one machine's ``gpus`` processes of a job (``worker.ranks``).

    On one machine, a standalone rendezvous on a free port; over a node group, the static rendezvous at the group's
    machine 0 (``master_addr``:``master_port`` from the workers' settings), where machine K's processes take global
    ranks K x gpus .. (K+1) x gpus - 1, so rank 0, which reports, is always on machine 0; a machine missing past
    ``timeout_s`` (the job's runtime.dist_timeout_s) fails the rendezvous instead of leaving the others waiting."""
    import sys

    if nodes == 1:
        where = ["--standalone"]
    else:
        where = [
            f"--nnodes={nodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={settings.master_addr}",
            f"--master-port={settings.master_port}",
            f"--rdzv-conf=timeout={max(1, round(timeout_s))}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        f"--nproc-per-node={gpus}",
        "-m",
        "worker.ranks",
        str(job_id),
        leader,
    ]


def _ranks_log(output_dir: Path, node_rank: int) -> Path:
    """Every process's output of one machine: ranks.log on machine 0, ranks-nodeK.log on machine K."""
    return output_dir / (RANKS_LOG if node_rank == 0 else f"ranks-node{node_rank}.log")


def _train_on_ranks(job: Claim, me: str, reporter: DatabaseReporter) -> dict[str, Any]:
    """Run the job's training processes with torchrun (``worker.ranks``) and return rank 0's outcome.

    This process keeps the claim and the heartbeat; rank 0 reports progress under this worker's name and polls the
    cancel flag (the trainer broadcasts its answer, so every rank stops at the same step and a checkpoint is saved).
    A job over several machines first asks the group's other machines to start their share (``join_ranks``); they
    meet at the group's rendezvous, and a machine that never comes makes the rendezvous fail after
    ``runtime.dist_timeout_s``. Every machine's output goes to the job folder (ranks.log, ranks-nodeK.log: the
    group shares the artifacts folder, as it shares models and datasets); when the job fails, their tails (each
    rank's traceback, and torchrun's summary of which rank failed how) go to the job's log.
    """
    import subprocess

    from app.settings import get_settings
    from worker.ranks import RESULT_FILE

    settings = get_settings()
    job.output_dir.mkdir(parents=True, exist_ok=True)
    result_path = job.output_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    processes = job.gpus * job.nodes
    if job.nodes > 1:
        _ask_group_to_join(settings, job, me)
        reporter.on_log(
            f"training on {processes} processes: {job.gpus} on each of {job.nodes} machines (torchrun, rendezvous at "
            f"{settings.master_addr}:{settings.master_port}; each machine's output in ranks.log / ranks-nodeK.log)"
        )
    else:
        reporter.on_log(f"training on {processes} processes (torchrun; every rank's output in {RANKS_LOG})")
    timeout_s = job.config.get("runtime", {}).get("dist_timeout_s", 600.0)
    command = torchrun_command(job.job_id, me, job.gpus, job.nodes, 0, settings, timeout_s)
    log_path = _ranks_log(job.output_dir, 0)
    with log_path.open("ab") as output:
        returncode = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=False).returncode
    if returncode == 0 and result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    logs = [_ranks_log(job.output_dir, rank) for rank in range(job.nodes)]
    tail = "\n".join(
        (f"--- {path.name}\n" if job.nodes > 1 else "") + path.read_text(encoding="utf-8", errors="replace")[-6000:]
        for path in logs
        if path.is_file()
    )
    reporter.on_log(
        f"the {processes} training processes failed (exit {returncode}); their last output:\n{tail}", level="error"
    )
    cause = _rank_error(tail)
    raise RuntimeError(
        f"the job's {processes} training processes failed (exit {returncode})"
        + (f": {cause}" if cause else "; see the job's log")
    )


def _ask_group_to_join(settings: Settings, job: Claim, me: str) -> None:
    """Publish one request per other machine of the node group to start its share of the job's processes."""
    from app.celery_app import TASK_NAMES, make_celery
    from app.queueing import join_queue

    if settings.nodes != job.nodes:
        raise RuntimeError(
            f"the job needs {job.nodes} machines but this worker's node group has {settings.nodes} (VOPD_NODES)"
        )
    celery = make_celery(settings)
    for node_rank in range(1, job.nodes):
        queue = join_queue(settings.queue, job.nodes, node_rank)
        celery.send_task(TASK_NAMES["join"], args=[job.job_id, me], queue=queue)


def join_job(factory: sessionmaker[Session], settings: Settings, job_id: int, leader: str) -> str:
    """On machine K > 0 of a node group: start this machine's share of job ``job_id``'s processes, which machine 0
    (``leader``) runs and reports; returns how they ended. A request for a job no longer running on that leader (it
    failed or was cancelled before this machine came) is skipped."""
    import subprocess

    with factory() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "running" or job.worker != leader:
            log.info("join request for job %s skipped: it no longer runs on %s", job_id, leader)
            return "skipped"
        gpus, nodes, output_dir = job.gpus, job.nodes, Path(job.output_dir)
        timeout_s = job.resolved_config.get("runtime", {}).get("dist_timeout_s", 600.0)
    if nodes != settings.nodes:
        log.error("join request for job %s over %s machines, but this group has %s", job_id, nodes, settings.nodes)
        return "skipped"
    command = torchrun_command(job_id, leader, gpus, nodes, settings.node_rank, settings, timeout_s)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _ranks_log(output_dir, settings.node_rank).open("ab") as output:
        returncode = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=False).returncode
    return "finished" if returncode == 0 else f"failed (exit {returncode})"


# A rank's own exception line, as torchrun prefixes it: "[rank1]: ValueError: ..."
_RANK_ERROR = re.compile(r"^\[rank\d+\]:\s*([A-Za-z_.]*(?:Error|Exception)\b.*)$")
# Else an exception of torchrun itself, e.g. "torch.distributed.DistStoreError: Timed out ... 1/2 clients joined."
_LAUNCH_ERROR = re.compile(r"^[A-Za-z_.]*(?:Error|Exception): .+$")


def _rank_error(output: str) -> str | None:
    """The first exception a rank raised: the cause, not torchrun's summary that the others were stopped; without
    one, the launcher's own last exception (a rendezvous that timed out, say)."""
    lines = [line.strip() for line in output.splitlines()]
    for line in lines:
        match = _RANK_ERROR.match(line)
        if match:
            return match.group(0)
    launch = [line for line in lines if _LAUNCH_ERROR.match(line) and "ChildFailedError" not in line]
    return launch[-1] if launch else None


def _run_eval(factory: sessionmaker[Session], job: Claim, me: str, reporter: DatabaseReporter) -> None:
    from vopd.config import EvalConfig
    from vopd.evaluate import evaluate

    config = EvalConfig.model_validate(job.config)
    try:
        result = evaluate(config, callbacks=[reporter])
    except InterruptedError:
        _finish(factory, job.job_id, me, status="cancelled")
        return
    if result.records_path is not None and result.records_path.is_file():
        _add_artifact(factory, job.job_id, result.records_path.name, "records", result.records_path)
    _finish(factory, job.job_id, me, status="succeeded", progress=1.0, result=json_safe(result.summary))


QUOTA_MARK = "over your storage quota"


def prune_after_quota(settings: Settings, job_id: int) -> list[str]:
    """What a job stopped by the quota leaves behind: its newest complete checkpoint (to resume from once there is
    room) and its small bookkeeping (config.json, metrics.jsonl, rank logs); gone are the final folder, half-written
    folders (``*.partial``), older checkpoints, partial eval records and download archives. Returns what was removed,
    relative to the job's folder."""
    import shutil

    from vopd.trainer import CHECKPOINTS_DIR, FINAL_DIR, latest_checkpoint

    output_dir, scratch = job_folders(settings, job_id)
    keep = latest_checkpoint(output_dir)
    doomed = [output_dir / FINAL_DIR, output_dir / "archives", output_dir / "records.jsonl", scratch]
    doomed += list(output_dir.glob("*.partial"))
    checkpoints = output_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir():
        doomed += [path for path in checkpoints.iterdir() if path != keep]
    removed = []
    for path in doomed:
        if not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(str(path.relative_to(output_dir)) if path.is_relative_to(output_dir) else "its archives")
    return removed


def run_job(factory: sessionmaker[Session], settings: Settings, job_id: int) -> str:
    """Run (or skip) job ``job_id``; returns the status it ended in, or "skipped"."""
    me = worker_name()
    job = claim(factory, job_id, me, settings)
    if job is None:
        return "skipped"
    quota = QuotaGuard.for_job(factory, settings, job_id)
    reporter = DatabaseReporter(factory, job_id, me, settings.progress_interval_s, quota)
    try:
        with Heartbeat(factory, job_id, me, settings.heartbeat_interval_s):
            (_run_train if job.kind == "train" else _run_eval)(factory, job, me, reporter)
    except Exception as error:
        over_quota = isinstance(error, QuotaExceeded) or QUOTA_MARK in str(error)  # a rank's raises in its process
        if over_quota:
            removed = prune_after_quota(settings, job_id)
            reporter.on_log(f"{describe_error(error)}; removed {', '.join(removed) or 'nothing'}", level="error")
        else:
            reporter.on_log(traceback.format_exc(), level="error")
        _finish(factory, job_id, me, status="failed", error=describe_error(error))
    finally:
        if quota is not None:
            try:
                quota.measure()  # what the job leaves behind is what its owner's quota counts from now on
            except Exception:  # a database hiccup must not hide the job's own outcome
                log.exception("could not measure the folders of job %s", job_id)
        _release_memory()
    with factory() as session:
        final = session.get(Job, job_id)
        return final.status if final is not None else "skipped"
