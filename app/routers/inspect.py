"""/api/inspect: per-token student (full image) vs teacher (crop) distributions for one image and question; without a
box the teacher's crop is the one the model's own search chooses."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import time
from collections.abc import Callable
from pathlib import Path

import torch
from fastapi import APIRouter, HTTPException, Request, status
from PIL import Image
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.deps import ApiKeyDep, SessionDep, SettingsDep
from app.inference import InferenceBusy, InferenceTask
from app.paths import public_text
from app.registry import UnknownName, resolve_model, visible_dataset
from app.responses import errors
from app.schemas import InspectRequest
from app.settings import Settings
from vopd.config import InspectConfig
from vopd.data import decode_image, load_dataset
from vopd.token_inspection import InspectCancelled, InspectResult, inspect_sample

router = APIRouter(prefix="/api", tags=["inspect"])

_SOURCE_FIELDS = {"image_base64", "dataset", "sample"}
MB = 1 << 20
MAX_SEED = 2**63 - 1
MAX_CROP_SIDE = 2048  # the teacher's upscaled crop; its image tokens grow with the square of its side


def _unprocessable(field: str | list, message: str, code: int = status.HTTP_422_UNPROCESSABLE_CONTENT) -> HTTPException:
    loc = ["body", *field] if isinstance(field, list) else ["body", field]
    return HTTPException(code, [{"loc": loc, "msg": message, "type": "value_error"}])


def _over(field: str | list, what: str, value: float, limit: float, setting: str, code: int = 422) -> HTTPException:
    return _unprocessable(field, f"{what} is {value:g}, over the limit of {limit:g} ({setting})", code)


def _check_text(question: str | None, options: list[str] | None, settings: Settings) -> None:
    if question is not None and len(question) > settings.max_question_chars:
        raise _over(
            "question", "question length", len(question), settings.max_question_chars, "VOPD_MAX_QUESTION_CHARS"
        )
    if options is not None:
        if len(options) > settings.max_options:
            raise _over("options", "number of options", len(options), settings.max_options, "VOPD_MAX_OPTIONS")
        longest = max((len(option) for option in options), default=0)
        if longest > settings.max_option_chars:
            raise _over("options", "longest option", longest, settings.max_option_chars, "VOPD_MAX_OPTION_CHARS")


def _check_limits(body: InspectRequest, settings: Settings) -> None:
    """Refuse, before any work, what would make one inspect cost the API minutes or gigabytes."""
    _check_text(body.question, body.options, settings)
    if len(body.views.hint) > settings.max_question_chars:
        raise _over(
            ["views", "hint"],
            "hint length",
            len(body.views.hint),
            settings.max_question_chars,
            "VOPD_MAX_QUESTION_CHARS",
        )
    if body.max_new_tokens > settings.max_inspect_new_tokens:
        raise _over(
            "max_new_tokens",
            "max_new_tokens",
            body.max_new_tokens,
            settings.max_inspect_new_tokens,
            "VOPD_MAX_INSPECT_NEW_TOKENS",
        )
    if body.seed > MAX_SEED:
        raise _over("seed", "seed", body.seed, MAX_SEED, "2^63 - 1")
    if body.views.max_crop_side > MAX_CROP_SIDE:
        raise _over(["views", "max_crop_side"], "max_crop_side", body.views.max_crop_side, MAX_CROP_SIDE, "fixed")
    if body.runtime.chat_template is not None:
        raise _unprocessable(["runtime", "chat_template"], "a chat template file cannot be chosen through the API")
    device = body.runtime.device
    missing = {"cuda": not torch.cuda.is_available(), "mps": not torch.backends.mps.is_available()}
    if missing.get(device, False):
        raise _unprocessable(["runtime", "device"], f"this server has no {device} device; use auto or cpu")


def decode_checked_image(data: bytes, field: str | list, settings: Settings) -> Image.Image:
    """The image in ``data``, refused (422, or 413 over the pixel limit) when unreadable or too large; ``field`` names
    where it came from in the request body."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise _unprocessable(field, f"not a readable image ({type(error).__name__})") from error
    if width * height > settings.max_inspect_image_pixels:
        raise _over(
            field,
            f"image size ({width}x{height}) in pixels",
            width * height,
            settings.max_inspect_image_pixels,
            "VOPD_MAX_INSPECT_IMAGE_PIXELS",
            413,
        )
    try:
        return decode_image(data, max_pixels=settings.max_inspect_image_pixels)
    except ValueError as error:
        raise _unprocessable(field, str(error)) from error


def _image_and_defaults(
    body: InspectRequest, session: Session, settings: Settings, owner_id: int
) -> tuple[Image.Image, dict]:
    """The image to inspect and the sample's question/options/bbox to fall back on."""
    if (body.image_base64 is None) == (body.dataset is None):
        raise _unprocessable("image_base64", "give either image_base64 or dataset + sample")
    if body.image_base64 is not None:
        encoded = body.image_base64.split(",", 1)[1] if body.image_base64.startswith("data:") else body.image_base64
        max_bytes = int(settings.max_inspect_image_mb * MB)
        if len(encoded) > max_bytes * 4 // 3 + 4:
            raise _over(
                "image_base64",
                "image size in MB",
                len(encoded) * 3 / 4 / MB,
                settings.max_inspect_image_mb,
                "VOPD_MAX_INSPECT_IMAGE_MB",
                413,
            )
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as error:
            raise _unprocessable("image_base64", f"not valid base64: {error}") from error
        return decode_checked_image(data, "image_base64", settings), {}
    dataset = visible_dataset(session, owner_id, body.dataset or "")
    if dataset is None:
        raise _unprocessable("dataset", f"unknown dataset {body.dataset!r}; GET /api/datasets lists ids")
    index = body.sample if body.sample is not None else 0
    if index >= dataset.n_samples:
        raise _unprocessable("sample", f"dataset {dataset.id} has {dataset.n_samples} samples; got index {index}")
    sample = load_dataset(dataset.path, check_images=False, limit=index + 1)[index]
    defaults = {"question": sample.question, "options": sample.options, "bbox": sample.bbox}
    try:
        return sample.load_image(max_pixels=settings.max_inspect_image_pixels), defaults
    except ValueError as error:
        raise _unprocessable("sample", f"sample {index} of {dataset.id}: {error}", 413) from error


def _short_errors(error: ValidationError) -> list[dict]:
    """Pydantic's errors without the inputs (which carry server paths once model names are resolved)."""
    return [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in error.errors()[:20]]


def _prepare(
    body: InspectRequest, session: Session, settings: Settings, owner_id: int
) -> tuple[InspectConfig, Image.Image, Path]:
    """Everything but inference, on a request thread: limits, the image, the model's folder, the final config."""
    _check_limits(body, settings)
    image, defaults = _image_and_defaults(body, session, settings, owner_id)
    try:
        path = resolve_model(session, settings, owner_id, body.model)
    except UnknownName as error:
        raise _unprocessable("model", public_text(str(error), settings.home)) from error
    session.close()  # inference may take a while: give the connection back first
    values = body.model_dump(exclude=_SOURCE_FIELDS)
    for field in ("question", "options", "bbox"):  # the sample's own, unless the request overrides them
        if values[field] is None:
            values[field] = defaults.get(field)
    values = {field: value for field, value in values.items() if value is not None} | {"model": str(path)}
    try:
        config = InspectConfig.model_validate(values)
    except ValidationError as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, _short_errors(error)) from error
    _check_text(config.question, config.options, settings)  # a dataset sample's own text too
    return config, image, path


async def _wait(task: InferenceTask, request: Request, timeout_s: float) -> InspectResult:
    """Wait for the inference thread without holding a request thread; a client that leaves or a budget that runs
    out cancels the task, which stops the work at its next forward pass."""
    future = asyncio.wrap_future(task.future)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            if done:
                return future.result()
            if time.monotonic() >= deadline:
                raise HTTPException(
                    status.HTTP_504_GATEWAY_TIMEOUT,
                    f"inspect took longer than its time budget of {timeout_s:g} s (VOPD_INSPECT_TIMEOUT_S) and was "
                    "stopped; ask for fewer max_new_tokens, a shorter question or a smaller image",
                )
            if await request.is_disconnected():
                raise HTTPException(499, "the client closed the connection")  # nobody reads it; logs say why
    finally:
        task.cancel()  # no-op once done; otherwise the work stops at its next check


@router.post(
    "/inspect",
    response_model=InspectResult,
    responses=errors(
        413,
        503,
        504,
        d413="The body is over VOPD_MAX_BODY_MB, or the image over VOPD_MAX_INSPECT_IMAGE_MB or _PIXELS.",
        d503="VOPD_INSPECT_QUEUE_SIZE inspects already wait; retry after Retry-After seconds.",
        d504="The inspect ran past VOPD_INSPECT_TIMEOUT_S and was stopped.",
    ),
)
async def inspect(body: InspectRequest, request: Request, session: SessionDep, settings: SettingsDep, key: ApiKeyDep):
    """Send the image as ``image_base64`` (the file's bytes, base64) or pick ``dataset`` + ``sample``; question,
    options and bbox default to the sample's. ``model`` is a name from GET /api/models.

    Without a box (none given, none on the sample) the model searches for its own crop (vopd.evidence): the
    student sees the plain image, the teacher the chosen crop, and ``evidence`` in the answer gives the box,
    ``source`` ("given" or "search") and the search's confidence (null for a given box).

    Inference runs on one dedicated thread behind a bounded queue, within a time budget
    (VOPD_INSPECT_TIMEOUT_S, queueing included) after which the work stops and the answer is 504."""
    pool = request.app.state.inference_pool
    if pool.full():  # refused before decoding anything: a flood costs the API next to nothing
        error = pool.busy_error(settings.inspect_timeout_s)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, str(error), headers={"Retry-After": str(error.retry_after_s)}
        )
    config, image, path = await run_in_threadpool(_prepare, body, session, settings, key.id)
    cache = request.app.state.model_cache

    def work(should_stop: Callable[[], bool]) -> InspectResult:
        try:
            loaded = cache.get(path, config.runtime)
        except (OSError, RuntimeError, ValueError) as error:
            message = f"model {body.model!r} could not be loaded ({type(error).__name__})"
            raise _unprocessable("model", message) from error
        return inspect_sample(config, image, loaded=loaded, should_stop=should_stop)

    try:
        task = pool.submit(work, settings.inspect_timeout_s)
    except InferenceBusy as error:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, str(error), headers={"Retry-After": str(error.retry_after_s)}
        ) from error
    try:
        result = await _wait(task, request, settings.inspect_timeout_s)
    except (InspectCancelled, TimeoutError) as error:
        raise HTTPException(
            status.HTTP_504_GATEWAY_TIMEOUT,
            f"inspect took longer than its time budget of {settings.inspect_timeout_s:g} s (VOPD_INSPECT_TIMEOUT_S) "
            "and was stopped",
        ) from error
    except ValueError as error:  # e.g. a box outside the image
        raise _unprocessable([], str(error)) from error
    return result.model_copy(update={"model": body.model})
