"""A cap on every request body, enforced from Content-Length and again while the bytes arrive.

Starlette spools a multipart file to disk before the endpoint runs, so a check in the endpoint alone would let a
client without Content-Length (chunked encoding) fill the disk first; a JSON body is parsed whole before validation
(and a 422 would echo it back), so a 50 MB one must be refused unread. Uploads (dataset zips) get their own limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """``max_upload_mb()`` for POSTs under ``upload_prefixes`` (multipart uploads), ``max_body_mb()`` for every other
    request body. 413 with a short message naming the limit; the body is never echoed."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_upload_mb: Callable[[], float],
        max_body_mb: Callable[[], float],
        upload_prefixes: tuple[str, ...] = ("/api/datasets", "/ui"),
    ) -> None:
        self.app = app
        self.max_upload_mb = max_upload_mb
        self.max_body_mb = max_body_mb
        self.upload_prefixes = upload_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(self.upload_prefixes):
            max_mb, what, setting = self.max_upload_mb(), "upload", "VOPD_MAX_UPLOAD_MB"
            limit = int((max_mb + 1) * (1 << 20))  # + multipart framing
        else:
            max_mb, what, setting = self.max_body_mb(), "request body", "VOPD_MAX_BODY_MB"
            limit = int(max_mb * (1 << 20))
        received, overflowed = 0, False
        body = json.dumps({"detail": f"{what} larger than the limit of {max_mb:g} MB ({setting})"}).encode()
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > limit:  # refused unread
            start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 413, "headers": [*start, (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return

        async def counting_receive() -> Message:
            nonlocal received, overflowed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflowed = True
                    raise _TooLarge  # FastAPI turns errors while parsing into a 400: rewritten to 413 below
            return message

        async def rewriting_send(message: Message) -> None:
            if not overflowed:
                await send(message)
            elif message["type"] == "http.response.start":
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 413, "headers": headers})
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await send({"type": "http.response.body", "body": body})

        try:
            await self.app(scope, counting_receive, rewriting_send)
        except _TooLarge:
            await rewriting_send({"type": "http.response.start", "status": 413, "headers": []})
            await rewriting_send({"type": "http.response.body", "body": b""})


MAX_ERRORS = 20
MAX_MESSAGE_CHARS = 300
MAX_INPUT_CHARS = 80


def _short_input(value: Any) -> tuple[bool, Any]:
    """Whether to echo a rejected input, and what: numbers and short strings that name no server path only."""
    if isinstance(value, float) and not math.isfinite(value):
        return True, str(value)  # JSON has no NaN or infinity
    if value is None or isinstance(value, bool | int | float):
        return True, value
    if isinstance(value, str) and len(value) <= MAX_INPUT_CHARS and not value.startswith(("/", "~", "\\")):
        return ":\\" not in value, value
    return False, None


def short_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Validation errors as short, human records: where, what, which kind; an input only when it is small and safe
    (never image bytes, a whole body or an absolute server path); at most MAX_ERRORS of them."""
    out: list[dict[str, Any]] = []
    for error in list(errors)[:MAX_ERRORS]:
        message = str(error.get("msg", "invalid value"))
        record: dict[str, Any] = {
            "loc": [part if isinstance(part, int | str) else str(part) for part in error.get("loc", ())],
            "msg": message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "...",
            "type": str(error.get("type", "value_error")),
        }
        keep, value = _short_input(error.get("input"))
        if keep:
            record["input"] = value
        out.append(record)
    if len(errors) > MAX_ERRORS:
        out.append({"loc": [], "msg": f"... and {len(errors) - MAX_ERRORS} more errors", "type": "too_many_errors"})
    return out


async def validation_error_handler(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's RequestValidationError, with short errors instead of pydantic's dump (which echoes the input)."""
    errors = error.errors() if isinstance(error, RequestValidationError) else []
    return JSONResponse({"detail": short_errors(errors)}, status_code=422)
