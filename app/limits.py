"""A cap on request bodies of uploads, enforced while the bytes arrive.

Starlette spools a multipart file to disk before the endpoint runs, so a check in the endpoint alone would let a
client without Content-Length (chunked encoding) fill the disk first.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _TooLarge(Exception):
    pass


class UploadSizeLimit:
    def __init__(self, app: ASGIApp, *, max_mb: Callable[[], float], path_prefix: str = "/api/datasets") -> None:
        self.app = app
        self.max_mb = max_mb
        self.path_prefix = path_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(self.path_prefix):
            await self.app(scope, receive, send)
            return
        max_mb = self.max_mb()
        limit, received, overflowed = int((max_mb + 1) * (1 << 20)), 0, False  # + multipart framing
        body = json.dumps({"detail": f"upload larger than the limit of {max_mb:g} MB"}).encode()

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
