"""OpenAI-compatible chat: ``GET /v1/models`` and ``POST /v1/chat/completions`` for every model a key may use.

The official evaluation scripts and any OpenAI client call a model this way (an image as a data URI, ``temperature``
0, ``max_tokens``, ``chat_template_kwargs`` for Qwen3-style templates). Requests carry the same API key (Bearer),
meet the same input limits as /api/inspect and wait in the same bounded inference queue, on the same thread, within
the same time budget. Images come inline (``data:`` URIs) or as this server's own sample images
(``/api/datasets/{id}/samples/{index}/image``, read from disk with the key's ownership checked); no other URL is ever
fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.deps import ApiKeyDep, SessionDep, SettingsDep
from app.inference import InferenceBusy, InferenceTask
from app.registry import UnknownName, list_models, resolve_model, visible_dataset
from app.responses import errors
from app.routers.inspect import decode_checked_image
from app.settings import Settings
from vopd.chat import ChatCancelled, ChatCompletion, ChatMessage, complete_chat
from vopd.config import RuntimeConfig
from vopd.data import load_dataset


def _where(item: dict[str, Any]) -> str:
    """``messages.0.content`` from a validation error's ``loc`` (its leading "body" dropped)."""
    return ".".join(str(part) for part in item.get("loc", [])[1:])


def _openai_error(status_code: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``, which OpenAI clients read
    their exception's message from), beside the ``detail`` the rest of this API returns."""
    items = [item for item in detail if isinstance(item, dict)] if isinstance(detail, list) else []
    message = "; ".join(f"{_where(item)}: {item.get('msg')}" for item in items) if items else str(detail)
    kinds = {401: "authentication_error", 404: "not_found_error", 503: "server_busy", 504: "timeout"}
    error = {
        "message": message,
        "type": kinds.get(status_code, "invalid_request_error"),
        "param": _where(items[0]) if items else None,
        "code": status_code,
    }
    return JSONResponse({"error": error, "detail": detail}, status_code=status_code, headers=headers)


class OpenAIErrorRoute(APIRoute):
    """Routes whose errors (the key check, validation, limits) answer in OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as error:
                return _openai_error(error.status_code, error.detail, error.headers)
            except RequestValidationError as error:
                detail = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in error.errors()[:20]]
                return _openai_error(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)

        return route_handler


router = APIRouter(prefix="/v1", tags=["openai-compatible"], route_class=OpenAIErrorRoute)

MAX_MESSAGES = 32
MAX_IMAGES = 4
MB = 1 << 20
_OWN_IMAGE = re.compile(r"^/api/datasets/(?P<dataset>[^/]+)/samples/(?P<index>\d+)/image$")


# --------------------------------------------------------------------------- schemas (OpenAI's names)
class ImageUrl(BaseModel):
    url: str = Field(description="A data: URI (data:image/png;base64,...) or this server's sample image URL.")
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl | str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields (n=1, user, ...) that change nothing here

    model: str = Field(min_length=1, description="A name from GET /v1/models (the same names as /api/models).")
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, description="Default and ceiling: VOPD_MAX_INSPECT_NEW_TOKENS.")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 decodes greedily (the official evaluation).")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='Chat template variables, e.g. {"enable_thinking": false} for Qwen3 / Qwen3.5.'
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "vopd"


class ModelCardList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


# --------------------------------------------------------------------------- request -> library call
def _invalid(field: list[Any], message: str, code: int = status.HTTP_422_UNPROCESSABLE_CONTENT) -> HTTPException:
    return HTTPException(code, [{"loc": ["body", *field], "msg": message, "type": "value_error"}])


def _data_uri_image(url: str, where: list[Any], settings: Settings) -> Image.Image:
    header, _, encoded = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise _invalid(where, "a data: URI must be data:image/<type>;base64,<data>")
    max_bytes = int(settings.max_inspect_image_mb * MB)
    if len(encoded) > max_bytes * 4 // 3 + 4:
        size = len(encoded) * 3 / 4 / MB
        message = f"image size in MB is {size:g}, over the limit of {settings.max_inspect_image_mb:g} "
        raise _invalid(where, message + "(VOPD_MAX_INSPECT_IMAGE_MB)", status.HTTP_413_CONTENT_TOO_LARGE)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise _invalid(where, f"not valid base64: {error}") from error
    return decode_checked_image(data, where, settings)


def _own_image(url: str, where: list[Any], request: Request, session: Session, owner_id: int) -> Image.Image:
    """A sample image of a dataset the key may read, named by this server's own URL; read from disk, never fetched."""
    parts = urlsplit(url)
    same_server = not parts.netloc or parts.netloc == request.headers.get("host", "")
    match = _OWN_IMAGE.match(parts.path) if same_server and parts.scheme in ("", "http", "https") else None
    if match is None:
        raise _invalid(
            where,
            "images must be data: URIs or this server's /api/datasets/{id}/samples/{index}/image URLs; "
            "no other URL is fetched",
        )
    dataset = visible_dataset(session, owner_id, match["dataset"])
    index = int(match["index"])
    if dataset is None or index >= dataset.n_samples:
        raise _invalid(where, f"no sample {index} in a dataset {match['dataset']!r} you can read")
    sample = load_dataset(dataset.path, check_images=False, limit=index + 1)[index]
    settings: Settings = request.app.state.settings
    try:
        return sample.load_image(max_pixels=settings.max_inspect_image_pixels)
    except ValueError as error:
        raise _invalid(where, f"sample {index} of {dataset.id}: {error}", status.HTTP_413_CONTENT_TOO_LARGE) from error


def _messages(body: ChatRequest, request: Request, session: Session, settings: Settings, owner_id: int) -> list:
    """The request's turns as the library's messages, each text and image held to the inspect limits."""
    turns: list[ChatMessage] = []
    images = 0
    for m, message in enumerate(body.messages):
        raw = [message.content] if isinstance(message.content, str) else message.content
        parts: list[str | Image.Image] = []
        for p, part in enumerate(raw):
            where: list[Any] = ["messages", m, "content"] if isinstance(message.content, str) else ["messages", m, p]
            if isinstance(part, str | TextPart):
                text = part if isinstance(part, str) else part.text
                if len(text) > settings.max_question_chars:
                    limit = settings.max_question_chars
                    raise _invalid(
                        where, f"text length is {len(text)}, over the limit of {limit} (VOPD_MAX_QUESTION_CHARS)"
                    )
                parts.append(text)
                continue
            images += 1
            if images > MAX_IMAGES:
                raise _invalid(where, f"at most {MAX_IMAGES} images per request")
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            if url.startswith("data:"):
                parts.append(_data_uri_image(url, where, settings))
            else:
                parts.append(_own_image(url, where, request, session, owner_id))
        turns.append(ChatMessage(message.role, parts))
    return turns


def _token_budget(body: ChatRequest, settings: Settings) -> int:
    asked = body.max_completion_tokens or body.max_tokens
    limit = settings.max_inspect_new_tokens
    if asked is not None and asked > limit:
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise _invalid([field], f"{field} is {asked}, over the limit of {limit} (VOPD_MAX_INSPECT_NEW_TOKENS)")
    return asked or limit


def _prepare(
    body: ChatRequest, request: Request, session: Session, settings: Settings, owner_id: int
) -> tuple[Path, list[ChatMessage], int]:
    """Everything but inference, on a request thread: limits, images, the model's folder."""
    budget = _token_budget(body, settings)
    if body.chat_template_kwargs is not None and len(json.dumps(body.chat_template_kwargs)) > 1000:
        raise _invalid(["chat_template_kwargs"], "chat_template_kwargs is over 1000 characters of JSON")
    try:
        path = resolve_model(session, settings, owner_id, body.model)
    except UnknownName as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{error} (GET /v1/models lists them)") from error
    messages = _messages(body, request, session, settings, owner_id)
    session.close()  # inference may take a while: give the connection back first
    return path, messages, budget


def _busy(error: InferenceBusy) -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, str(error), headers={"Retry-After": str(error.retry_after_s)}
    )


def _timeout(settings: Settings) -> HTTPException:
    return HTTPException(
        status.HTTP_504_GATEWAY_TIMEOUT,
        f"the completion took longer than its time budget of {settings.inspect_timeout_s:g} s "
        "(VOPD_INSPECT_TIMEOUT_S) and was stopped; ask for fewer max_tokens or a smaller image",
    )


# --------------------------------------------------------------------------- routes
@router.get("/models", response_model=ModelCardList)
def get_models(session: SessionDep, settings: SettingsDep, key: ApiKeyDep) -> ModelCardList:
    """The models this key may use (the names of /api/models), in OpenAI's list format."""
    return ModelCardList(data=[ModelCard(id=model.name) for model in list_models(session, settings, key.id)])


@router.post(
    "/chat/completions",
    response_model=ChatCompletionOut,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "With stream=true, chat.completion.chunk events."},
        **errors(
            404,
            413,
            503,
            504,
            d404="No model of that name for this key (GET /v1/models).",
            d413="An image over VOPD_MAX_INSPECT_IMAGE_MB or VOPD_MAX_INSPECT_IMAGE_PIXELS, or a body over its limit.",
            d503="VOPD_INSPECT_QUEUE_SIZE requests already wait; retry after Retry-After seconds.",
            d504="The completion ran past VOPD_INSPECT_TIMEOUT_S and was stopped.",
        ),
    },
)
async def chat_completions(
    body: ChatRequest, request: Request, session: SessionDep, settings: SettingsDep, key: ApiKeyDep
) -> Any:
    """One assistant reply from a registered model: greedy at ``temperature`` 0, sampled (from ``seed``) above it.
    ``stream`` true sends server-sent ``chat.completion.chunk`` events and ends with ``data: [DONE]``."""
    pool = request.app.state.inference_pool
    if pool.full():  # refused before decoding anything
        raise _busy(pool.busy_error(settings.inspect_timeout_s))
    path, messages, budget = await run_in_threadpool(_prepare, body, request, session, settings, key.id)
    cache = request.app.state.model_cache
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()

    def work(should_stop: Callable[[], bool]) -> ChatCompletion:
        try:
            loaded = cache.get(path, RuntimeConfig())
        except (OSError, RuntimeError, ValueError) as error:
            raise _invalid(["model"], f"model {body.model!r} could not be loaded ({type(error).__name__})") from error
        on_text = (lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)) if body.stream else None
        return complete_chat(
            loaded,
            messages,
            max_new_tokens=budget,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            chat_template_kwargs=body.chat_template_kwargs,
            on_text=on_text,
            should_stop=should_stop,
        )

    try:
        task = pool.submit(work, settings.inspect_timeout_s)
    except InferenceBusy as error:
        raise _busy(error) from error
    if body.stream:
        return StreamingResponse(
            _stream(task, pieces, request, settings, completion_id, created, body.model),
            media_type="text/event-stream",
        )
    result = await _wait(task, request, settings)
    return ChatCompletionOut(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[Choice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
    )


async def _wait(task: InferenceTask, request: Request, settings: Settings) -> ChatCompletion:
    future = asyncio.wrap_future(task.future)
    deadline = time.monotonic() + settings.inspect_timeout_s
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            if done:
                try:
                    return future.result()
                except (ChatCancelled, TimeoutError) as error:
                    raise _timeout(settings) from error
            if time.monotonic() >= deadline:
                raise _timeout(settings)
            if await request.is_disconnected():
                raise HTTPException(499, "the client closed the connection")
    finally:
        task.cancel()


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, str], finish: str | None) -> str:
    event = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(event)}\n\n"


async def _stream(
    task: InferenceTask,
    pieces: asyncio.Queue[str],
    request: Request,
    settings: Settings,
    completion_id: str,
    created: int,
    model: str,
) -> AsyncIterator[str]:
    """The reply as it is decoded: a role chunk, one chunk per piece of text, a closing chunk, ``[DONE]``. An error
    after the stream began (budget spent, model unloadable) arrives as an ``error`` event, as OpenAI streams do."""
    future = asyncio.wrap_future(task.future)
    deadline = time.monotonic() + settings.inspect_timeout_s
    yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""}, None)
    try:
        while not (future.done() and pieces.empty()):
            try:
                text = await asyncio.wait_for(pieces.get(), timeout=0.25)
            except TimeoutError:
                if time.monotonic() >= deadline or await request.is_disconnected():
                    task.cancel()
                    break
                continue
            yield _chunk(completion_id, created, model, {"content": text}, None)
        try:
            result = await asyncio.wait_for(future, timeout=max(0.1, deadline - time.monotonic()))
        except (ChatCancelled, TimeoutError):
            detail = _timeout(settings).detail
            yield f"data: {json.dumps({'error': {'message': detail, 'type': 'timeout', 'code': 504}})}\n\n"
            return
        except HTTPException as error:
            yield f"data: {json.dumps({'error': {'message': str(error.detail), 'code': error.status_code}})}\n\n"
            return
        yield _chunk(completion_id, created, model, {}, result.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        task.cancel()
