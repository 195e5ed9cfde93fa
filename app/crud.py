"""Job reads and state changes used by the routers and the orphan reaper (routers never touch rows directly)."""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, case, func, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from app.paths import public_text, public_value
from app.queueing import (
    BrokerUnavailable,
    JobQueue,
    job_queue_problem,
    queue_not_allowed,
    queue_shape,
    routed_queue,
)
from app.registry import UnknownName, parse_job_model_name, resolve_dataset, resolve_model
from app.schemas import EvalJobCreate, JobOut, TrainJobCreate
from app.settings import Settings
from app.tables import TERMINAL_STATUSES, ApiKey, Dataset, Job, JobLog, JobMetric, Worker, utcnow

log = logging.getLogger(__name__)


class JobStateError(ValueError):
    """A request that the job's current status does not allow (409)."""


class QueueNotAllowed(ValueError):
    """A job that names a queue outside the server's allow-list (422); the message lists the allowed ones."""


MB = 1 << 20


class QuotaExceeded(Exception):
    """A key's datasets and jobs hold more than VOPD_USER_QUOTA_MB: no new job starts (429), a running one fails."""

    def __init__(self, used: int, limit: int, what: str) -> None:
        super().__init__(
            f"over your storage quota: {used / MB:.1f} MB used of {limit / MB:g} MB (VOPD_USER_QUOTA_MB); {what}. "
            "Delete datasets or ask for a larger quota"
        )
        self.used = used
        self.limit = limit


def quota_bytes(settings: Settings) -> int:
    return int(settings.user_quota_mb * MB)


def _usage_parts() -> list:
    """Per-key byte counts of the three kinds of storage, as (owner id, bytes) selects."""
    datasets = select(Dataset.owner_id, func.coalesce(func.sum(Dataset.size_bytes), 0)).where(
        Dataset.owner_id.is_not(None)
    )
    jobs = select(Job.owner_id, func.coalesce(func.sum(Job.disk_bytes), 0))
    # Log lines live in the database, written by the key's jobs (a rank's traceback, a long warning): they count too.
    logs = select(Job.owner_id, func.coalesce(func.sum(func.length(JobLog.message)), 0)).join(
        JobLog, JobLog.job_id == Job.id
    )
    parts = [datasets.group_by(Dataset.owner_id), jobs.group_by(Job.owner_id), logs.group_by(Job.owner_id)]
    return parts


def storage_used(session: Session, owner_id: int) -> int:
    """Bytes a key holds on the server: its datasets (as unpacked), everything its jobs wrote on disk (checkpoints,
    final folders, records, metrics, tracker and rank logs, download archives: ``jobs.disk_bytes``) and its jobs'
    log lines in the database."""
    datasets = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.owner_id == owner_id)
    )
    jobs = session.scalar(select(func.coalesce(func.sum(Job.disk_bytes), 0)).where(Job.owner_id == owner_id))
    logs = session.scalar(
        select(func.coalesce(func.sum(func.length(JobLog.message)), 0))
        .join(Job, JobLog.job_id == Job.id)
        .where(Job.owner_id == owner_id)
    )
    return int(datasets or 0) + int(jobs or 0) + int(logs or 0)


def storage_used_by_key(session: Session) -> dict[int, int]:
    """``storage_used`` of every key at once (the admin's key listing): three grouped statements."""
    used: dict[int, int] = {}
    for part in _usage_parts():
        for owner_id, size in session.execute(part):
            used[owner_id] = used.get(owner_id, 0) + int(size or 0)
    return used


def job_folders(settings: Settings, job_id: int) -> list[Path]:
    """Every folder the server writes for a job: its own, and the scratch folder for its download archives."""
    return [settings.job_dir(job_id), settings.artifacts_dir / "archives" / f"job-{job_id}"]


def measure_job_disk(session: Session, settings: Settings, job_id: int) -> int:
    """Walk the job's folders, store the figure in ``jobs.disk_bytes`` (the caller commits) and return it."""
    from app.artifacts import folder_size

    size = sum(folder_size(folder) for folder in job_folders(settings, job_id) if folder.exists())
    session.execute(update(Job).where(Job.id == job_id).values(disk_bytes=size))
    return size


def check_quota(session: Session, settings: Settings, owner_id: int, what: str) -> int:
    """The key's usage; raises QuotaExceeded when it is over the quota (``what`` says what is refused)."""
    used, limit = storage_used(session, owner_id), quota_bytes(settings)
    if used >= limit:
        raise QuotaExceeded(used, limit, what)
    return used


def create_job(
    session: Session,
    settings: Settings,
    queue: JobQueue,
    owner_id: int,
    body: TrainJobCreate | EvalJobCreate,
    warnings: list[str] | None = None,
) -> Job:
    """Resolve names to paths, write the row (status queued), commit, then publish the id.

    The row is committed before publishing so the worker always finds it. A broker that is down does not lose the
    job: it stays queued, a warning says so (appended to ``warnings``), and the reaper publishes it once the broker
    is back (``reconcile_queued``).
    """
    if body.queue is not None and body.queue not in settings.allowed_queues:
        raise QueueNotAllowed(queue_not_allowed(settings, body.queue))
    check_quota(session, settings, owner_id, "no new job is started")
    config = body.config
    paths = {"model": str(resolve_model(session, settings, owner_id, config.model))}
    if config.dataset is not None:
        paths["dataset"] = str(resolve_dataset(session, owner_id, config.dataset))
    if getattr(config, "benchmark", None) is not None:
        paths["data"] = str(resolve_benchmark_data(settings, config.benchmark, config.data))
    if getattr(config, "judge", None) is not None:
        check_judge_url(settings, config.judge.url)
    gpus = body.resources.gpus if isinstance(body, TrainJobCreate) else 1
    nodes = body.resources.nodes if isinstance(body, TrainJobCreate) else 1
    if gpus * nodes > 1 and config.runtime.strategy == "single":  # several processes need a strategy that joins them
        config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"strategy": "ddp"})})
    resolved = config.model_copy(update=paths)
    job = Job(
        owner_id=owner_id,
        kind=body.kind,
        status="queued",
        queue=routed_queue(body.queue or settings.queue, gpus, nodes),
        gpus=gpus,
        nodes=nodes,
        config=config.model_dump(mode="json"),
        resolved_config={},
        output_dir="",
    )
    session.add(job)
    session.flush()  # assigns the id, which names the output folder
    output_dir = settings.job_dir(job.id)
    output = str(output_dir) if body.kind == "train" else str(output_dir / "records.jsonl")
    job.output_dir = str(output_dir)
    job.resolved_config = resolved.model_copy(update={"output": output}).model_dump(mode="json")
    session.commit()
    _publish(session, queue, job, warnings)
    return job


def benchmarks_dir(settings: Settings) -> Path:
    """Where an administrator places the published suites (copies or symlinks) that eval jobs may read."""
    return settings.home / "benchmarks"


def found_benchmarks(settings: Settings) -> list[tuple[str, str]]:
    """(suite, entry) for each entry of the benchmarks folder named after a suite or one of its aliases (``vstar``,
    ``hr_bench_4k``, ``MME-RealWorld-Lite.json``...): what the studio offers to evaluate. Nothing is read inside."""
    from vopd.benchmarks import BenchmarkError, get_benchmark

    root = benchmarks_dir(settings)
    found = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        name = entry.stem if entry.is_file() else entry.name
        try:
            found.append((get_benchmark(name).name, entry.name))
        except BenchmarkError:
            continue
    return found


def resolve_benchmark_data(settings: Settings, benchmark: str, data: str | None) -> Path:
    """The folder of a benchmark job: a name (or absolute path) *inside* VOPD_HOME/benchmarks, never elsewhere.

    A job runs on the server with the server's file access, so an arbitrary path would let any key holder make the
    worker read any folder; the check is lexical (no '..', no absolute path outside the root) so an administrator's
    symlink inside the root to a large data disk still works, while users (who cannot create files there) cannot
    reach beyond it."""
    from vopd.benchmarks import BenchmarkError, get_benchmark

    root = benchmarks_dir(settings)
    try:
        get_benchmark(benchmark)
    except BenchmarkError as error:
        raise UnknownName("benchmark", str(error)) from error
    hint = f"config.data names a folder inside {root} (the server's benchmarks folder)"
    if not data:
        raise UnknownName("data", f"benchmark {benchmark!r} needs config.data; {hint}")
    candidate = Path(data)
    if ".." in candidate.parts:
        raise UnknownName("data", f"{data!r} must not contain '..'; {hint}")
    if not candidate.is_absolute():
        candidate = root / candidate
    if not Path(os.path.normpath(candidate)).is_relative_to(root):
        raise UnknownName("data", f"{data!r} lies outside {root}; {hint}")
    if not candidate.exists():
        raise UnknownName("data", f"no benchmark folder {candidate}; {hint}")
    return candidate


def check_judge_url(settings: Settings, url: str) -> None:
    """Refuse a judge other than the server's own: the worker sends its judge key to that address, so a job naming
    any URL could collect the key (and make the worker call any host)."""
    allowed = settings.judge_url
    if allowed is None:
        raise UnknownName("judge", "this server has no judge: its administrator sets VOPD_JUDGE_URL to allow one")
    if url.rstrip("/") != allowed.rstrip("/"):
        raise UnknownName("judge", f"config.judge.url must be this server's judge, {allowed}")


def _publish(session: Session, queue: JobQueue, job: Job, warnings: list[str] | None = None) -> None:
    try:
        queue.enqueue(job.id, job.kind, job.queue)
    except BrokerUnavailable as error:  # the row is the truth: the reaper publishes it when the broker is back
        log.warning("job %s stays queued, not published: %s", job.id, error)
        add_log(session, job.id, "the broker is unreachable: the job waits and is published once it is back", "warning")
        session.commit()
        if warnings is not None:
            warnings.append(f"{error}; the job stays queued and is published once the broker is back")


def queue_warnings(session: Session, settings: Settings, queue: str) -> list[str]:
    """Why a job on (broker) ``queue`` may wait forever: no live worker (one that said alive lately) serves that
    queue with as many devices as the job needs."""
    base, gpus, nodes = queue_shape(queue)
    cutoff = utcnow() - timedelta(seconds=3 * settings.heartbeat_interval_s)
    # A job over M machines is taken by machine 0 of a group of exactly M; others are the group's machine 0 alone
    # when they share its queue (its other machines only start the processes they are asked to).
    fits = [Worker.queue == base, Worker.gpus >= gpus, Worker.node_rank == 0, Worker.last_seen_at >= cutoff]
    if nodes > 1:
        fits.append(Worker.nodes == nodes)
    live = session.scalar(select(func.count()).where(*fits))
    if live:
        return []
    devices = f" with {gpus} devices" if gpus > 1 else ""
    command = f"vopd worker --queue {base}" + (f" --gpus {gpus}" if gpus > 1 else "")
    if nodes > 1:
        devices += f" on each of a group of {nodes} machines"
        command += f" --nodes {nodes} --node-rank 0 --master-addr HOST (and --node-rank 1..{nodes - 1} on the others)"
    return [
        f"no live worker serves queue {base!r}{devices} (none reported in the last "
        f"{3 * settings.heartbeat_interval_s:g} s): the job waits until one starts (`{command}`)"
    ]


def owned_job(session: Session, owner_id: int, job_id: int) -> Job | None:
    job = session.get(Job, job_id)
    return job if job is not None and job.owner_id == owner_id else None


def _queue_position_column() -> ColumnElement[int | None]:
    """A queued job's place in its queue (1 = next), computed in the same statement as the job row: a status poll is
    the API's most frequent request, and on PostgreSQL each extra statement is another round trip."""
    other = aliased(Job, name="ahead")
    ahead = (
        select(func.count())
        .where(other.queue == Job.queue, other.status == "queued", other.id < Job.id)
        .correlate(Job)
        .scalar_subquery()
    )
    return case((Job.status == "queued", ahead + 1), else_=None)


# Built once: a fresh alias per request would give each statement a new cache key, and SQLAlchemy would compile the
# SQL again on every poll.
_QUEUE_POSITION = _queue_position_column()


def job_with_position_for_key(session: Session, key_hash: str, job_id: int) -> tuple[Job, int | None] | None:
    """The job and its queue position, if the live (unrevoked) key with ``key_hash`` owns it: the key check, the row
    and the position in one statement, for the status poll (None: no such job, someone else's, or no such key)."""
    query = (
        select(Job, _QUEUE_POSITION)
        .join(ApiKey, ApiKey.id == Job.owner_id)
        .where(Job.id == job_id, ApiKey.key_hash == key_hash, ApiKey.revoked.is_(False))
    )
    row = session.execute(query).one_or_none()
    return None if row is None else (row[0], row[1])


def list_jobs(
    session: Session, owner_id: int, status: str | None, kind: str | None, limit: int, offset: int
) -> tuple[list[tuple[Job, int | None]], int]:
    """A page of the caller's jobs, newest first, each with its queue position, and the total count."""
    query = select(Job).where(Job.owner_id == owner_id)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(query.add_columns(_QUEUE_POSITION).order_by(Job.id.desc()).limit(limit).offset(offset))
    return [(job, position) for job, position in rows], total


def queue_position(session: Session, job: Job) -> int | None:
    if job.status != "queued":
        return None
    ahead = session.scalar(select(func.count()).where(Job.queue == job.queue, Job.status == "queued", Job.id < job.id))
    return int(ahead or 0) + 1


# Steps measured before an ETA is shown: the first step's time includes loading the model and data (a 4-minute job
# read 17m46s at step 1 when the ETA was the elapsed time over the steps done).
ETA_MIN_STEPS = 3
# The newest step records the pace is read from: recent enough to follow a pace that changes, enough to average.
ETA_WINDOW_ROWS = 500


def _periodic_schedule(job: Job) -> tuple[int | None, int | None]:
    """(collapse-guard probe interval, checkpoint interval) of a training job's resolved config; None where there is
    none (or the config does not say: an older job row)."""
    config = job.resolved_config or {}
    guard = config.get("guard") if isinstance(config.get("guard"), dict) else {}
    every = guard.get("every") if guard.get("enabled", True) else None
    save_every = config.get("save_every")
    return (
        every if isinstance(every, int) and every > 0 else None,
        save_every if isinstance(save_every, int) and save_every > 0 else None,
    )


def _multiples(every: int | None, after: int, upto: int) -> int:
    """How many multiples of ``every`` lie in (after, upto]."""
    return 0 if not every or upto <= after else upto // every - after // every


def eta_seconds(job: Job, session: Session | None = None) -> float | None:
    """Time left at the measured pace of this attempt's steps, once ETA_MIN_STEPS steps are measured (None before;
    start-up is not a step).

    A training run also stops for periodic work between its steps: a collapse-guard probe before every
    ``guard.every``-th step's record, a checkpoint after every ``save_every``-th (and the last), and the export of the
    final model at the end. The first measured steps hold none of it, so their pace alone ran short of the truth. The
    pace is read from the intervals between step records that hold no periodic work; each kind of work costs what
    its intervals measured beyond that pace, and one step's time until one has been measured."""
    if job.status != "running" or job.started_at is None or not job.total_steps or session is None:
        return None
    rows = session.execute(
        select(JobMetric.step, JobMetric.created_at)
        .where(JobMetric.job_id == job.id, JobMetric.step > job.start_step, JobMetric.created_at >= job.started_at)
        .order_by(JobMetric.step.desc())
        .limit(ETA_WINDOW_ROWS)
    ).all()
    if not rows:  # a job that records no step metrics (an evaluation): its own progress counter
        done_now = job.step - job.start_step
        if done_now < ETA_MIN_STEPS:
            return None
        return max(0.0, (utcnow() - job.started_at).total_seconds() / done_now * (job.total_steps - job.step))
    rows.reverse()
    first_step, last_step = rows[0][0], rows[-1][0]
    if last_step - first_step < ETA_MIN_STEPS:
        return None
    probe_every, save_every = _periodic_schedule(job)
    plain_s = plain_steps = 0.0
    probe_extra: list[float] = []
    save_extra: list[float] = []
    mixed: list[tuple[float, int, int, int]] = []
    for (step_before, at_before), (step_after, at_after) in zip(rows, rows[1:], strict=False):
        seconds, steps = (at_after - at_before).total_seconds(), step_after - step_before
        probes = _multiples(probe_every, step_before, step_after)  # a probe runs before its step's record
        saves = _multiples(save_every, step_before - 1, step_after - 1)  # a checkpoint after its step's record
        if probes or saves:
            mixed.append((seconds, steps, probes, saves))
        else:
            plain_s, plain_steps = plain_s + seconds, plain_steps + steps
    if not plain_steps:  # every interval held periodic work: the overall pace is all there is
        plain_s = sum(seconds for seconds, *_ in mixed)
        plain_steps = sum(steps for _, steps, *_ in mixed)
        mixed = []
    per_step = plain_s / plain_steps
    for seconds, steps, probes, saves in mixed:
        extra = max(0.0, seconds - steps * per_step)
        if probes and not saves:
            probe_extra.append(extra / probes)
        elif saves and not probes:
            save_extra.append(extra / saves)
    per_probe = sum(probe_extra) / len(probe_extra) if probe_extra else per_step
    per_save = sum(save_extra) / len(save_extra) if save_extra else per_step
    done = max(job.step, last_step)
    left = job.total_steps - done
    if left <= 0:
        return 0.0
    probes_left = _multiples(probe_every, done, job.total_steps)
    # Checkpoints at multiples of save_every, one at the last step whatever it is, and the final export.
    saves_left = _multiples(save_every, done, job.total_steps - 1) + 2 if save_every else 0
    return max(0.0, left * per_step + probes_left * per_probe + saves_left * per_save)


_POSITION_UNKNOWN = -1


def job_out(session: Session, job: Job, position: int | None = _POSITION_UNKNOWN, *, settings: Settings) -> JobOut:
    """The job as the API shows it; ``position`` when the caller already read it with the row. The resolved config's
    paths are shown relative to $VOPD_HOME (``app.paths``)."""
    out = JobOut.model_validate(job)
    source = parse_job_model_name(str((job.config or {}).get("model", "")))
    return out.model_copy(
        update={
            "queue_position": queue_position(session, job) if position == _POSITION_UNKNOWN else position,
            "eta_seconds": eta_seconds(job, session),
            "model_job_id": source[0] if source else None,
            "model_step": source[1] if source else None,
            "resolved_config": public_value(job.resolved_config or {}, settings.home),
            "error": public_text(job.error, settings.home) if job.error else job.error,
            "engine": resolved_engine(job.kind, job.latest_metrics, job.result),
        }
    )


def resolved_engine(kind: str, latest_metrics: dict[str, Any] | None, result: dict[str, Any] | None) -> str | None:
    """hf or vllm: what the worker's run resolved the job's engine setting to (the trainer writes it into every
    step's metrics, an evaluation into its result); None while unknown. The config only says what was asked
    (auto, most often)."""
    source = latest_metrics if kind == "train" else result
    engine = (source or {}).get("rollout/engine" if kind == "train" else "engine")
    return engine if engine in ("hf", "vllm") else None


def metrics_since(session: Session, job_id: int, since: int, limit: int) -> list[JobMetric]:
    query = select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.id > since)
    return list(session.scalars(query.order_by(JobMetric.id).limit(limit)))


def logs_since(session: Session, job_id: int, since: int, limit: int) -> list[JobLog]:
    query = select(JobLog).where(JobLog.job_id == job_id, JobLog.id > since)
    return list(session.scalars(query.order_by(JobLog.id).limit(limit)))


def add_log(session: Session, job_id: int, message: str, level: str = "info") -> None:
    session.add(JobLog(job_id=job_id, level=level, message=message))


def request_cancel(session: Session, job: Job) -> Job:
    """A queued job is cancelled at once; a running one gets the flag its worker polls between steps."""
    if job.status in TERMINAL_STATUSES:
        raise JobStateError(f"job {job.id} is already {job.status}")
    cancelled_now = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
    ).rowcount
    if not cancelled_now:
        session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
    add_log(session, job.id, "cancellation requested")
    session.commit()
    session.refresh(job)
    return job


def resume_job(session: Session, queue: JobQueue, job: Job, warnings: list[str] | None = None) -> Job:
    """Queue a failed or cancelled job again; the worker continues from its newest checkpoint."""
    if job.status not in ("failed", "cancelled"):
        raise JobStateError(f"only failed or cancelled jobs can be resumed; job {job.id} is {job.status}")
    problem = job_queue_problem(queue.settings, job.queue)
    if problem:
        raise JobStateError(f"job {job.id} cannot be resumed: {problem}")
    check_quota(session, queue.settings, job.owner_id, "the job is not resumed")
    job.status, job.cancel_requested, job.error, job.finished_at = "queued", False, None, None
    add_log(session, job.id, f"{RESUME_LOG}: continuing from the newest checkpoint")
    session.commit()
    _publish(session, queue, job, warnings)
    return job


# A start is logged by the worker's claim as "started on WORKER, attempt N"; a resume opens a new budget of starts.
START_LOG = "started on "
RESUME_LOG = "resume requested"


def starts_since_queued(session: Session, job_id: int) -> int:
    """How often the job was started since it was submitted or last resumed by its owner (not by the reaper):
    what ``Settings.max_attempts`` bounds, so a job that kills its process is not delivered again forever."""
    since = session.scalar(
        select(func.max(JobLog.id)).where(JobLog.job_id == job_id, JobLog.message.startswith(RESUME_LOG))
    )
    starts = select(func.count()).where(JobLog.job_id == job_id, JobLog.message.startswith(START_LOG))
    if since is not None:
        starts = starts.where(JobLog.id > since)
    return int(session.scalar(starts) or 0)


def worker_process_gone(name: str | None) -> bool:
    """A worker named ``host:pid`` on this very host whose process no longer exists (killed, crashed). A worker on
    another host is judged by its heartbeat alone."""
    host, _, pid = (name or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def requeue_orphans(factory: sessionmaker[Session], settings: Settings, queue: JobQueue) -> list[int]:
    """Running jobs whose worker is gone go back to the queue: their heartbeat stopped (the worker died with its
    machine), or the process that ran them on this host no longer exists (killed, crashed: no need to wait).

    Safe against a worker that is in fact alive: the task re-reads the row and skips a job whose heartbeat is
    fresh, and a resumed train job continues from its newest checkpoint. If the broker is down the job stays
    queued and ``reconcile_queued`` publishes it later.
    """
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    requeued: list[int] = []
    with factory() as session:
        running = session.execute(
            select(Job.id, Job.kind, Job.queue, Job.worker, Job.heartbeat_at).where(Job.status == "running")
        ).all()
        for job_id, kind, queue_name, worker, heartbeat_at in running:
            if heartbeat_at is not None and heartbeat_at < cutoff:
                why = f"worker {worker} stopped sending heartbeats"
            elif worker_process_gone(worker):
                why = f"worker {worker} is gone (its process exited)"
            else:
                continue
            problem = job_queue_problem(settings, queue_name)
            if problem:
                fail_bad_queue(session, job_id, "running", problem)
                continue
            changed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "running", Job.worker == worker)
                .values(status="queued")  # ``worker`` still names where it last ran, for the claim's log
            ).rowcount
            if not changed:  # it moved on meanwhile
                continue
            add_log(session, job_id, f"{why}; job requeued", "warning")
            session.commit()
            log.warning("job %s: %s; requeued", job_id, why)
            try:
                queue.enqueue(job_id, kind, queue_name)
            except BrokerUnavailable as error:  # stays queued: reconcile_queued publishes it once the broker is back
                log.warning("could not publish requeued job %s: %s", job_id, error)
            requeued.append(job_id)
    return requeued


BAD_QUEUE_ERROR = "its queue is not allowed, so it is never published"


def fail_bad_queue(session: Session, job_id: int, status: str, problem: str) -> bool:
    """Fail a job whose stored queue the server no longer publishes to (the reason in its error and log)."""
    error = f"{BAD_QUEUE_ERROR}: {problem}"
    failed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == status)
        .values(status="failed", error=error, finished_at=utcnow())
    ).rowcount
    if failed:
        add_log(session, job_id, error, "error")
        log.error("job %s failed: %s", job_id, error)
    session.commit()
    return bool(failed)


def reconcile_queued(factory: sessionmaker[Session], settings: Settings, queue: JobQueue) -> list[int]:
    """Publish again every job queued for ``republish_after_s`` whose message the broker no longer holds: after a
    Redis FLUSHDB or restart without persistence, a deleted embedded broker file, a publish that failed while the
    broker was down, a message delivered to a worker that died before claiming it. Duplicates are harmless (the
    worker's claim is a conditional UPDATE and skips a job that is no longer queued); each republished job's
    ``updated_at`` is touched so it is looked at again only after another ``republish_after_s``."""
    cutoff = utcnow() - timedelta(seconds=settings.republish_after_s)
    republished: list[int] = []
    with factory() as session:
        waiting = session.execute(
            select(Job.id, Job.kind, Job.queue).where(Job.status == "queued", Job.updated_at <= cutoff).order_by(Job.id)
        ).all()
        pending: dict[str, set[int]] = {}
        for job_id, kind, queue_name in waiting:
            problem = job_queue_problem(settings, queue_name)
            if problem:  # stored before the allow-list (or the list changed): publishing it could poison the broker
                fail_bad_queue(session, job_id, "queued", problem)
                continue
            if queue_name not in pending:
                pending[queue_name] = queue.pending_job_ids(queue_name)  # BrokerUnavailable: try on the next pass
            if job_id in pending[queue_name]:
                continue
            queue.enqueue(job_id, kind, queue_name)
            touched = session.execute(
                update(Job).where(Job.id == job_id, Job.status == "queued").values(updated_at=utcnow())
            ).rowcount
            if touched:
                add_log(session, job_id, "its message was gone from the broker: published again", "warning")
            session.commit()
            republished.append(job_id)
    return republished
