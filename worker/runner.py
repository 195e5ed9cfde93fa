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

from app.crud import starts_since_queued
from app.db import session_scope
from app.settings import Settings
from app.tables import TERMINAL_STATUSES, Artifact, Job, JobLog, utcnow
from worker.reporter import DatabaseReporter, json_safe

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
        gpus = job.gpus
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
        return Claim(job_id, kind, config, output_dir, takeover, gpus)


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

    if job.gpus > 1:
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


def _train_on_ranks(job: Claim, me: str, reporter: DatabaseReporter) -> dict[str, Any]:
    """Run the job's ``gpus`` training processes with torchrun (``worker.ranks``) and return rank 0's outcome.

    This process keeps the claim and the heartbeat; rank 0 reports progress under this worker's name and polls the
    cancel flag (the trainer broadcasts its answer, so every rank stops at the same step and a checkpoint is saved).
    Every rank's output goes to the job folder's ranks.log; when the job fails, its tail (each rank's traceback, and
    torchrun's summary of which rank failed how) goes to the job's log.
    """
    import subprocess
    import sys

    from worker.ranks import RESULT_FILE

    job.output_dir.mkdir(parents=True, exist_ok=True)
    result_path = job.output_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    log_path = job.output_dir / RANKS_LOG
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={job.gpus}",
        "-m",
        "worker.ranks",
        str(job.job_id),
        me,
    ]
    reporter.on_log(f"training on {job.gpus} processes (torchrun; every rank's output in {RANKS_LOG})")
    with log_path.open("ab") as output:
        returncode = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=False).returncode
    if returncode == 0 and result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-6000:]
    reporter.on_log(
        f"the {job.gpus} training processes failed (exit {returncode}); their last output:\n{tail}", level="error"
    )
    cause = _rank_error(tail)
    raise RuntimeError(
        f"the job's {job.gpus} training processes failed (exit {returncode})"
        + (f": {cause}" if cause else "; see the job's log")
    )


# A rank's own exception line, as torchrun prefixes it: "[rank1]: ValueError: ..."
_RANK_ERROR = re.compile(r"^\[rank\d+\]:\s*([A-Za-z_.]*(?:Error|Exception)\b.*)$")


def _rank_error(output: str) -> str | None:
    """The first exception a rank raised: the cause, not torchrun's summary that the others were stopped."""
    for line in output.splitlines():
        match = _RANK_ERROR.match(line.strip())
        if match:
            return match.group(0)
    return None


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


def run_job(factory: sessionmaker[Session], settings: Settings, job_id: int) -> str:
    """Run (or skip) job ``job_id``; returns the status it ended in, or "skipped"."""
    me = worker_name()
    job = claim(factory, job_id, me, settings)
    if job is None:
        return "skipped"
    reporter = DatabaseReporter(factory, job_id, me, settings.progress_interval_s)
    try:
        with Heartbeat(factory, job_id, me, settings.heartbeat_interval_s):
            (_run_train if job.kind == "train" else _run_eval)(factory, job, me, reporter)
    except Exception as error:
        reporter.on_log(traceback.format_exc(), level="error")
        _finish(factory, job_id, me, status="failed", error=describe_error(error))
    finally:
        _release_memory()
    with factory() as session:
        final = session.get(Job, job_id)
        return final.status if final is not None else "skipped"
