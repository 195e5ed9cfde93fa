"""/api/jobs: submit, follow (polling or server-sent events), cancel, resume, download what a job made."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Path, Query, Request, status
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app import artifacts, crud
from app.auth import find_api_key, hash_key, is_session_token
from app.db import session_scope
from app.deps import ApiKeyDep, PresentedKeyDep, SessionDep, SettingsDep, unknown_key_error
from app.paths import public_text
from app.registry import UnknownName, resolve_model
from app.responses import errors
from app.schemas import (
    ArtifactList,
    JobCreate,
    JobKind,
    JobOut,
    JobPage,
    JobPlanOut,
    JobPlanRequest,
    JobStatus,
    LogOut,
    LogPage,
    MetricOut,
    MetricPage,
)
from app.settings import Settings
from app.tables import TERMINAL_STATUSES, Job

router = APIRouter(prefix="/api/jobs", tags=["jobs"])

# Ids are int4 on PostgreSQL (and at most int8 on SQLite): a larger one is no id at all, refused with 422 before it
# reaches the database (where it overflowed into a 500).
MAX_ID = 2**31 - 1
JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="A job id from POST /api/jobs or GET /api/jobs.")]
SinceId = Annotated[int, Query(ge=0, le=MAX_ID, description="Last id seen (exclusive).")]
EVENT_ID_PATTERN = r"^[0-9]{1,9}-[0-9]{1,9}$"  # "METRIC-LOG": both below MAX_ID


def _job_or_404(session: Session, owner_id: int, job_id: int) -> Job:
    job = crud.owned_job(session, owner_id, job_id)
    if job is None:  # someone else's job is indistinguishable from a missing one
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut, responses=errors(429))
def submit_job(
    request: Request, body: Annotated[JobCreate, Body()], session: SessionDep, settings: SettingsDep, key: ApiKeyDep
) -> JobOut:
    """Queue a train or eval job. ``config`` is the CLI's TrainConfig / EvalConfig, with ``model`` a name from
    GET /api/models and ``dataset`` an id from GET /api/datasets; ``output`` is chosen by the server. An eval job
    may name a published ``benchmark`` instead, with ``data`` a folder inside VOPD_HOME/benchmarks (other server
    paths are refused with 422). ``warnings`` says why the job may wait: no live worker serves its queue, or the
    broker is down (the job stays queued and is published once the broker is back)."""
    warnings: list[str] = []
    try:
        job = crud.create_job(session, settings, request.app.state.queue, key.id, body, warnings)
    except UnknownName as error:
        message = public_text(str(error), settings.home)
        detail = [{"loc": ["body", "config", error.field], "msg": message, "type": "value_error"}]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from error
    except crud.QueueNotAllowed as error:
        detail = [{"loc": ["body", "queue"], "msg": str(error), "type": "value_error"}]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from error
    warnings += crud.queue_warnings(session, settings, job.queue)
    return crud.job_out(session, job, settings=settings).model_copy(update={"warnings": warnings})


@router.post("/plan", response_model=JobPlanOut)
def plan_job(
    body: Annotated[JobPlanRequest, Body()], session: SessionDep, settings: SettingsDep, key: ApiKeyDep
) -> JobPlanOut:
    """The memory plan of a train job before it is submitted (what `vopd train --dry-run` prints): per-device bytes
    of masters, gradients, optimizer, teacher, compute copies, rollout engine and activations, whether they fit in
    ``device_memory``, and the smallest changes that make them fit. Read from the model's config.json: no weight is
    loaded and nothing is queued. The world size is resources.gpus x nodes."""
    from vopd.memory_plan import format_table, parse_size, plan_memory, read_model_shape, visible_device_memory

    config = body.config
    try:
        folder = resolve_model(session, settings, key.id, config.model)
    except UnknownName as error:
        detail = [{"loc": ["body", "config", error.field], "msg": str(error), "type": "value_error"}]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from error
    world_size = body.resources.gpus * body.resources.nodes
    if world_size > 1 and config.runtime.strategy == "single":  # as a submitted job runs
        config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"strategy": "ddp"})})
    visible_type, device_memory, _ = visible_device_memory()
    if body.device_memory is not None:
        try:
            device_memory = parse_size(body.device_memory)
        except ValueError as error:
            detail = [{"loc": ["body", "device_memory"], "msg": str(error), "type": "value_error"}]
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from error
    device_type = body.device_type or (
        config.runtime.device if config.runtime.device in ("cpu", "cuda") else visible_type
    )
    try:
        shape = read_model_shape(folder)
    except (OSError, ValueError, KeyError) as error:
        detail = [{"loc": ["body", "config", "model"], "msg": str(error), "type": "value_error"}]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from error
    plan = plan_memory(
        shape,
        config,
        world_size=world_size,
        device_type=device_type,
        device_memory=device_memory,
        prompt_tokens=body.prompt_tokens,
    )
    return JobPlanOut(**plan.to_dict(), model=shape.to_dict(), table=format_table(plan, shape))


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    key: ApiKeyDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    kind: JobKind | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> JobPage:
    """Your jobs, newest first."""
    items, total = crud.list_jobs(session, key.id, status_filter, kind, limit, offset)
    return JobPage(
        items=[crud.job_out(session, job, position, settings=settings) for job, position in items],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{job_id}", response_model=JobOut, responses=errors(404))
def get_job(job_id: JobId, request: Request, presented: PresentedKeyDep) -> JobOut:
    """One of your jobs, with its queue position and ETA (404 for a job that is not yours)."""
    # The status poll is the API's most frequent request: it does its work in one trip to the thread pool and, when
    # the job is found, one statement that checks the key too (a session dependency and the key dependency would take
    # three more trips and one more statement). Only a miss looks the key up alone, to tell 401 from 404.
    with session_scope(request.app.state.session_factory) as session:
        if is_session_token(presented):  # a studio session: find its key first (one more statement)
            key = find_api_key(session, presented)
            if key is None:
                raise unknown_key_error()
            return crud.job_out(session, _job_or_404(session, key.id, job_id), settings=request.app.state.settings)
        found = crud.job_with_position_for_key(session, hash_key(presented), job_id)
        if found is None:
            if find_api_key(session, presented) is None:
                raise unknown_key_error()
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
        return crud.job_out(session, *found, settings=request.app.state.settings)


@router.get("/{job_id}/metrics", response_model=MetricPage, responses=errors(404))
def get_metrics(
    job_id: JobId,
    session: SessionDep,
    key: ApiKeyDep,
    since: SinceId = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> MetricPage:
    """One row per training step, oldest first."""
    _job_or_404(session, key.id, job_id)
    rows = crud.metrics_since(session, job_id, since, limit)
    return MetricPage(items=[MetricOut.model_validate(r) for r in rows], next_since=rows[-1].id if rows else since)


@router.get("/{job_id}/logs", response_model=LogPage, responses=errors(404))
def get_logs(
    job_id: JobId,
    session: SessionDep,
    key: ApiKeyDep,
    since: SinceId = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> LogPage:
    _job_or_404(session, key.id, job_id)
    rows = crud.logs_since(session, job_id, since, limit)
    return LogPage(items=[LogOut.model_validate(r) for r in rows], next_since=rows[-1].id if rows else since)


class _Revoked:
    """What a poll returns once the stream's key is revoked or its session ended."""


REVOKED = _Revoked()


def _poll_events(
    factory: sessionmaker[Session], presented: str, settings: Settings, job_id: int, since_metric: int, since_log: int
):
    with factory() as session:
        if find_api_key(session, presented) is None:  # every poll: revocation reaches an open stream
            return REVOKED, [], []
        job = session.get(Job, job_id)
        if job is None:
            return None, [], []
        metrics = [MetricOut.model_validate(r) for r in crud.metrics_since(session, job_id, since_metric, 500)]
        logs = [LogOut.model_validate(r) for r in crud.logs_since(session, job_id, since_log, 500)]
        return crud.job_out(session, job, settings=settings), metrics, logs


# Fields that change on (nearly) every poll without news: sent only along with a real change.
RIDE_ALONG_FIELDS = frozenset({"eta_seconds", "heartbeat_at"})


def job_change(sent: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``now`` (a JobOut as JSON) whose values differ from ``sent``, the job as the client last got it;
    empty when only ``RIDE_ALONG_FIELDS`` moved. Each status event used to repeat the whole job, its config included
    (about 3 KB), for a step counter that moved."""
    changed = {name: value for name, value in now.items() if sent.get(name, object()) != value}
    return changed if changed.keys() - RIDE_ALONG_FIELDS else {}


def _existing_job(job_id: JobId, session: SessionDep, key: ApiKeyDep) -> None:
    """A dependency, so a missing job is a 404 before the stream starts (a generator's body runs only once the 200
    is on its way)."""
    _job_or_404(session, key.id, job_id)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    dependencies=[Depends(_existing_job)],
    responses=errors(404),
)
async def job_events(
    job_id: JobId,
    request: Request,
    presented: PresentedKeyDep,
    since_metric: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    since_log: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            pattern=EVENT_ID_PATTERN,
            description="The id of the last event received (a browser's EventSource sends it when it reconnects).",
        ),
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events: ``status`` (the whole JobOut, once, first), then ``change`` (only the JobOut fields whose
    values changed since the previous status or change event, on every change), ``metric`` (MetricOut), ``log``
    (LogOut), and a final ``end`` once the job is terminal. A client keeps the job by merging each change's fields
    into the job it holds; a change of ``eta_seconds`` or ``heartbeat_at`` alone is not sent (they ride along with
    the next real change). A stream whose key is revoked (or whose session ended) gets an ``end``
    with ``{"status": "unauthorized"}`` and closes within one poll interval (VOPD_EVENTS_POLL_S). Every event's id
    is the cursor ``METRIC-LOG`` (the last metric and log ids sent so far): a reconnect with ``Last-Event-ID`` (or
    since_metric / since_log) skips what was received.

    Async, with the database polls in the thread pool: a waiting stream holds no thread and no connection."""
    # The job and the key were checked by ``_existing_job`` before the stream began; this generator keeps no request
    # session (the session dependency ends when a generator route returns its generator, not when the stream ends).
    factory = request.app.state.session_factory
    poll_s = request.app.state.settings.events_poll_s
    if last_event_id is not None:  # the header wins: the browser reconnects to the same URL with it
        since_metric, since_log = (int(part) for part in last_event_id.split("-"))
    last_status: dict | None = None
    while True:
        current, metrics, logs = await run_in_threadpool(
            _poll_events, factory, presented, request.app.state.settings, job_id, since_metric, since_log
        )
        if current is None:
            return
        if current is REVOKED:
            yield ServerSentEvent(event="end", id=f"{since_metric}-{since_log}", data={"status": "unauthorized"})
            return
        for metric in metrics:
            since_metric = metric.id
            yield ServerSentEvent(event="metric", id=f"{since_metric}-{since_log}", data=metric)
        for line in logs:
            since_log = line.id
            yield ServerSentEvent(event="log", id=f"{since_metric}-{since_log}", data=line)
        status_now = current.model_dump(mode="json")
        if last_status is None:  # the whole job once; a reconnect is a new stream and gets it again
            last_status = status_now
            yield ServerSentEvent(event="status", id=f"{since_metric}-{since_log}", data=current)
        elif change := job_change(last_status, status_now):
            last_status = status_now
            yield ServerSentEvent(event="change", id=f"{since_metric}-{since_log}", data=change)
        if current.status in TERMINAL_STATUSES and not metrics and not logs:
            yield ServerSentEvent(event="end", id=f"{since_metric}-{since_log}", data={"status": current.status})
            return
        await asyncio.sleep(poll_s)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=errors(404, 409))
def cancel_job(job_id: JobId, session: SessionDep, settings: SettingsDep, key: ApiKeyDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next step (after a checkpoint)."""
    job = _job_or_404(session, key.id, job_id)
    try:
        job = crud.request_cancel(session, job)
    except crud.JobStateError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from error
    return crud.job_out(session, job, settings=settings)


@router.post("/{job_id}/resume", response_model=JobOut, responses=errors(404, 409, 429))
def resume_job(job_id: JobId, request: Request, session: SessionDep, key: ApiKeyDep) -> JobOut:
    """Queue a failed or cancelled job again: training continues from its newest checkpoint."""
    job = _job_or_404(session, key.id, job_id)
    warnings: list[str] = []
    try:
        job = crud.resume_job(session, request.app.state.queue, job, warnings)
    except crud.JobStateError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from error
    warnings += crud.queue_warnings(session, request.app.state.settings, job.queue)
    return crud.job_out(session, job, settings=request.app.state.settings).model_copy(update={"warnings": warnings})


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=errors(404))
def list_artifacts(job_id: JobId, session: SessionDep, key: ApiKeyDep) -> ArtifactList:
    job = _job_or_404(session, key.id, job_id)
    return ArtifactList(items=[entry.out for entry in artifacts.job_artifacts(session, job)])


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/zip": {}, "application/octet-stream": {}}},
        **errors(404, 409, d409="A folder that cannot be packed as a zip right now; the detail says why."),
    },
)
def download_artifact(
    job_id: JobId, name: str, session: SessionDep, settings: SettingsDep, key: ApiKeyDep
) -> FileResponse:
    """A file as is; a folder (final model, checkpoint) as a zip archive that from_pretrained loads once
    extracted."""
    job = _job_or_404(session, key.id, job_id)
    entry = next((e for e in artifacts.job_artifacts(session, job) if e.out.name == name), None)
    if entry is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no artifact {name!r}")
    if not entry.out.is_folder:
        if not os.access(entry.path, os.R_OK):
            raise HTTPException(status.HTTP_409_CONFLICT, f"artifact {name!r} cannot be read: permission denied")
        return FileResponse(entry.path, filename=entry.path.name, media_type="application/octet-stream")
    cache_dirs = [settings.job_dir(job.id) / "archives", settings.artifacts_dir / "archives" / f"job-{job.id}"]
    try:
        archive = artifacts.pack_folder(entry.path, cache_dirs, name)
    except artifacts.ArtifactUnavailable as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from error
    crud.measure_job_disk(session, settings, job.id)  # the archive is the owner's storage too
    session.commit()
    return FileResponse(archive, filename=f"job-{job.id}-{name.replace('/', '-')}.zip", media_type="application/zip")
