"""The library's progress hooks, written to the database: what clients read while a job runs.

Every metric row is kept (curves are drawn from them); the job row itself is updated at most every
``progress_interval_s`` (and at the last step), and the cancel flag is polled at most as often, so a fast loop
on a GPU does not turn into a database benchmark.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.crud import check_quota, measure_job_disk
from app.db import session_scope
from app.settings import Settings
from app.tables import Checkpoint, Job, JobLog, JobMetric, utcnow
from vopd.callbacks import ProgressCallback


def json_safe(value: Any) -> Any:
    """NaN and infinities become None: PostgreSQL's JSON (and strict JSON clients) refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, str | int | bool) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return json_safe(value.item())
    return str(value)


class QuotaGuard:
    """Holds a running job to its owner's storage quota: measures the job's folders (``jobs.disk_bytes``) and raises
    ``app.crud.QuotaExceeded`` once the owner's datasets and jobs hold the quota or more. At every checkpoint and at
    most every ``interval_s`` between them (the folder walk is cheap, but a fast loop need not repeat it per step)."""

    def __init__(
        self, factory: sessionmaker[Session], settings: Settings, job_id: int, owner_id: int, interval_s: float
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.job_id = job_id
        self.owner_id = owner_id
        self.interval_s = interval_s
        self._last = time.monotonic()

    def measure(self) -> int:
        with session_scope(self.factory) as session:
            return measure_job_disk(session, self.settings, self.job_id)

    def check(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        self.measure()
        with self.factory() as session:
            check_quota(session, self.settings, self.owner_id, f"job {self.job_id} was stopped")

    @classmethod
    def for_job(cls, factory: sessionmaker[Session], settings: Settings, job_id: int) -> QuotaGuard | None:
        with factory() as session:
            owner_id = session.scalar(select(Job.owner_id).where(Job.id == job_id))
        if owner_id is None:
            return None
        return cls(factory, settings, job_id, owner_id, max(settings.heartbeat_interval_s, 1.0))


class DatabaseReporter(ProgressCallback):
    def __init__(
        self,
        factory: sessionmaker[Session],
        job_id: int,
        worker_name: str,
        interval_s: float,
        quota: QuotaGuard | None = None,
    ) -> None:
        self.factory = factory
        self.job_id = job_id
        self.worker_name = worker_name
        self.interval_s = interval_s
        self.quota = quota
        self._last_write = 0.0
        self._last_poll = 0.0
        self._stop = False

    def _mine(self):
        return update(Job).where(Job.id == self.job_id, Job.worker == self.worker_name)

    def on_start(self, *, total: int, start: int, unit: str) -> None:
        with session_scope(self.factory) as session:
            session.execute(
                self._mine().values(
                    total_steps=total,
                    start_step=start,
                    step=start,
                    unit=unit,
                    progress=start / total if total else 0.0,
                    heartbeat_at=utcnow(),
                )
            )
            # Rows past the starting point (the checkpoint resumed from, or none at all) belong to an attempt that
            # died or was cancelled after them: they will be recomputed, so drop them and keep one row per step.
            session.execute(delete(JobMetric).where(JobMetric.job_id == self.job_id, JobMetric.step > start))
        self._last_write = time.monotonic()

    def on_progress(self, *, done: int, total: int, metrics: dict[str, Any] | None = None) -> None:
        now = time.monotonic()
        due = now - self._last_write >= self.interval_s or done >= total
        if not metrics and not due:
            return
        with session_scope(self.factory) as session:
            safe = json_safe(metrics) if metrics else None
            if safe is not None:
                session.add(JobMetric(job_id=self.job_id, step=done, data=safe))
            if due:
                values: dict[str, Any] = {
                    "step": done,
                    "total_steps": total,
                    "progress": done / total if total else 0.0,
                    "heartbeat_at": utcnow(),
                }
                if safe is not None:
                    values["latest_metrics"] = safe
                session.execute(self._mine().values(**values))
                self._last_write = now
        if self.quota is not None:
            self.quota.check()

    def on_log(self, message: str, *, level: str = "info") -> None:
        with session_scope(self.factory) as session:
            session.add(JobLog(job_id=self.job_id, level=level, message=message))

    def on_checkpoint(self, *, step: int, path: Path) -> None:
        with session_scope(self.factory) as session:
            session.execute(delete(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step == step))
            session.add(Checkpoint(job_id=self.job_id, step=step, path=str(path)))
            session.add(JobLog(job_id=self.job_id, level="info", message=f"checkpoint saved at step {step}"))
        if self.quota is not None:  # a checkpoint is the big write: the line is crossed here if anywhere
            self.quota.check(force=True)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if self._stop or now - self._last_poll < min(self.interval_s, 0.25):
            return self._stop
        self._last_poll = now
        with self.factory() as session:
            self._stop = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        return self._stop
