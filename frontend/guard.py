"""The studio's guard: a pure ASGI middleware in front of every path under its prefix (``/ui``).

It does three things before Gradio sees a request:

- **Who.** Nothing (pages, Gradio's API, queue, uploads, files, even static assets) answers without a live
  credential: ``Authorization: Bearer <key or session>`` (scripts, gradio_client) or the ``vopd_session`` cookie that
  ``/signin`` sets (browsers). Every request asks ``account_of`` afresh, so a revoked key or an ended session stops
  working at once. A browser asking for a page without one is sent to the sign-in page; anything else gets 401.
- **From where.** A request that can change state (any method but GET, HEAD and OPTIONS, and websockets) from a
  foreign or ``null`` origin is refused with 403, whoever it claims to be: the cookie is ``SameSite=Lax``, which a
  page on another port of the same host (same *site*) still gets sent along.
- **Whose files.** Gradio keeps every account's uploads and outputs in one cache folder, one sub-folder per content
  hash, and serves any of them to anyone at ``gradio_api/file=<path>``. The guard notes which account each cache
  folder was shown to (the upload's answer, and the paths in any answer Gradio sends that account) and refuses
  ``file=`` reads, and callback requests that name a cached path, for folders the account was never shown. The notes
  live in memory: after a restart, files cached before it are refused until uploaded again.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE_NAME = "vopd_session"
LEGACY_COOKIE_NAME = "vopd_key"  # older versions kept the raw key here: it is only ever deleted now
SIGNIN_PATH = "/signin"
STATE_ACCOUNT = "vopd_account"  # the signed-in account's name, left in the request's state by the guard
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_SCANNED_BODY = 8 * 1024 * 1024  # a callback's JSON body; files travel through the upload route instead


@dataclass(frozen=True)
class Account:
    """Who a credential acts as: the key's id (the account) and its name (shown, not unique)."""

    key_id: int
    name: str


AccountOf = Callable[[str], Account | None]  # credential -> its account, or None when unknown, revoked or ended


def credential_from(headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
    """The credential a request carries: ``Authorization: Bearer <key or session>`` first, else the session cookie."""
    scheme, _, credentials = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return (cookies.get(COOKIE_NAME) or "").strip() or None


def foreign_origin(headers: Mapping[str, str]) -> bool:
    """True for a request a page of another origin made: its ``Origin`` is ``null`` or names another host, or the
    browser says the request crossed sites. Requests without either header (scripts, curl) are not a browser's
    cross-site requests and pass."""
    if headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False
    # This server's names: the Host header, and the host a proxy says the browser asked for (a cross-site form or
    # fetch cannot set X-Forwarded-Host without a CORS preflight, which no foreign origin passes).
    ours = {headers.get("host", "").lower(), headers.get("x-forwarded-host", "").split(",")[0].strip().lower()}
    return origin.strip().lower() == "null" or urlsplit(origin.strip()).netloc.lower() not in ours - {""}


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


class UploadOwners:
    """Which accounts may read each folder of Gradio's upload cache (``<cache>/<sha256>/<name>``).

    A folder is named by its content's hash, so an account that was shown a folder's path was shown that content:
    two accounts uploading the same bytes both own the folder."""

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir
        self.real_root = os.path.realpath(cache_dir)
        self._mention = re.compile(re.escape(cache_dir.rstrip("/")) + r"/([0-9a-f]{64})")
        self.tail_chars = len(cache_dir) + 70  # a mention split between two chunks of an answer is still found
        self._owners: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def record(self, text: str, account: Account) -> None:
        """Every cache folder ``text`` mentions is now readable by ``account``."""
        folders = set(self._mention.findall(text))
        if folders:
            with self._lock:
                for folder in folders:
                    self._owners.setdefault(folder, set()).add(account.key_id)

    def folder_of(self, path: str) -> str | None:
        """The cache folder a local path lies in (after resolving ``..`` and links), or None outside the cache."""
        if not path or "\x00" in path:
            return None
        real = os.path.realpath(path)
        if real != self.real_root and not real.startswith(self.real_root.rstrip("/") + "/"):
            return None
        return os.path.relpath(real, self.real_root).split(os.sep)[0]

    def may_read(self, path: str, account: Account) -> bool:
        folder = self.folder_of(path)
        if folder is None:
            return True  # not in the cache: Gradio's own rules decide (static assets, allowed paths)
        with self._lock:
            return account.key_id in self._owners.get(folder, ())


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _local_paths(text: str) -> Iterator[str]:
    """What in a callback's JSON body Gradio could open as a local file: path-like strings, and the path of a
    ``.../file=<path>`` URL."""
    try:
        body = json.loads(text)
    except ValueError:
        return
    for value in _strings(body):
        if "/" not in value or len(value) > 4096:
            continue
        if "file=" in value:
            yield unquote(value.split("file=", 1)[1])
        if "://" not in value:
            yield value


def _file_path(path: str, prefix: str) -> str | None:
    """The local path a ``gradio_api/file=<path>`` (or the older ``file/<path>``) request asks for."""
    api = prefix.rstrip("/") + "/gradio_api/"
    for route in ("file=", "file/"):
        if path.startswith(api + route):
            return path[len(api + route) :]
    return None


class StudioGuard:
    """Pure ASGI middleware: every HTTP request and websocket under ``prefix`` needs a live credential, a
    state-changing one an origin of this server, and a cached file an account that was shown it."""

    def __init__(
        self, app: ASGIApp, account_of: AccountOf, prefix: str = "/ui", uploads: UploadOwners | None = None
    ) -> None:
        self.app = app
        self.account_of = account_of
        self.prefix = prefix
        self.uploads = uploads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not under(scope["path"], self.prefix):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        method = scope.get("method", "GET")
        if (scope["type"] == "websocket" or method not in SAFE_METHODS) and foreign_origin(connection.headers):
            await self._refuse(scope, receive, send, 403, "cross-site request refused: open the studio itself")
            return
        credential = credential_from(connection.headers, connection.cookies)
        account = await run_in_threadpool(self.account_of, credential) if credential else None
        if account is None:
            await self._unauthenticated(scope, receive, send, connection, credential)
            return
        scope.setdefault("state", {})[STATE_ACCOUNT] = account.name
        if self.uploads is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wanted = _file_path(scope["path"], self.prefix)
        if wanted is not None and not self.uploads.may_read(wanted, account):
            await self._refuse(scope, receive, send, 403, "this file belongs to another account's session")
            return
        if method not in SAFE_METHODS and not scope["path"].endswith("/upload"):
            body = await _read_body(receive)
            if body is None:
                await self._refuse(scope, receive, send, 413, "request body too large for a studio call")
                return
            text = body.decode("utf-8", errors="replace")
            if any(not self.uploads.may_read(path, account) for path in _local_paths(text)):
                await self._refuse(scope, receive, send, 403, "this file belongs to another account's session")
                return
            receive = _replay(body, receive)
        if any(part in scope["path"] for part in ("/assets/", "/static/")):  # Gradio's own bundles: nothing cached
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, self._recording(send, account))

    def _recording(self, send: Send, account: Account) -> Send:
        """``send``, noting the cache folders each text answer shows the account (uploads, outputs, events)."""
        uploads = self.uploads
        assert uploads is not None
        state = {"text": False, "tail": ""}

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
                kind = headers.get("content-type", "")
                state["text"] = any(part in kind for part in ("json", "text/", "event-stream"))
            elif message["type"] == "http.response.body" and state["text"]:
                chunk = state["tail"] + message.get("body", b"").decode("latin-1")
                uploads.record(chunk, account)
                state["tail"] = chunk[-uploads.tail_chars :]
            await send(message)

        return recording_send

    async def _unauthenticated(
        self, scope: Scope, receive: Receive, send: Send, connection: HTTPConnection, credential: str | None
    ) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response: Response
        wants_page = scope["method"] in ("GET", "HEAD") and "text/html" in connection.headers.get("accept", "")
        if wants_page:
            target = scope["path"] + (f"?{scope['query_string'].decode('latin-1')}" if scope["query_string"] else "")
            response = RedirectResponse(f"{SIGNIN_PATH}?next={quote(target, safe='')}", status_code=303)
        else:
            detail = "sign in first: send 'Authorization: Bearer <key>' or sign in at " + SIGNIN_PATH
            if credential:
                detail = "unknown or revoked API key (or an ended session): sign in again at " + SIGNIN_PATH
            response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status_code: int, detail: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await JSONResponse({"detail": detail}, status_code=status_code)(scope, receive, send)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None past ``MAX_SCANNED_BODY``."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_SCANNED_BODY:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _replay(body: bytes, original: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the real one's messages (a disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive
