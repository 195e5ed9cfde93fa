"""Signing in to the studio: a page to paste an API key, an HttpOnly cookie, and a guard over every path of the UI.

Nothing under the studio's prefix (pages, Gradio's API, queue, uploads, files, even its static assets) answers
without a valid key. A request carries its key as ``Authorization: Bearer <key>`` (scripts, gradio_client) or
as the ``vopd_key`` cookie that ``/signin`` sets (browsers). A browser asking for a page without one is sent to
the sign-in page; anything else gets 401. Every request asks ``account_of(key)`` afresh, so a revoked key stops
working at once. The same callbacks read the key back from ``gr.Request`` (``request_key``) and call the API with
it: the studio never acts with a key of its own.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from frontend import strings

COOKIE_NAME = "vopd_key"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
SIGNIN_PATH = "/signin"
SIGNOUT_PATH = "/signout"
STATE_ACCOUNT = "vopd_account"  # the signed-in account's name, left in the request's state by the guard

AccountOf = Callable[[str], str | None]  # key -> the account's name, or None when unknown or revoked


def key_from(headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>`` first, else the sign-in cookie."""
    scheme, _, credentials = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return (cookies.get(COOKIE_NAME) or "").strip() or None


def request_key(request: Any) -> str | None:
    """The signed-in key of a Gradio callback's ``gr.Request`` (None when there is none)."""
    if request is None:
        return None
    raw = getattr(request, "request", None)
    if raw is not None:
        return key_from(raw.headers, raw.cookies)
    kwargs = getattr(request, "kwargs", {}) or {}
    return key_from({k.lower(): v for k, v in (kwargs.get("headers") or {}).items()}, kwargs.get("cookies") or {})


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _safe_next(target: str | None, home: str) -> str:
    """Only a path on this server: an open redirect would make the sign-in link a phishing tool."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return home
    parts = urlsplit(target)
    return home if parts.scheme or parts.netloc else target


def _same_origin(request: Request) -> bool:
    """A browser's cross-site form post names its origin: refuse it (no signing a victim in with another key)."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser, or a same-origin navigation of an older one
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


class StudioGuard:
    """Pure ASGI middleware: every HTTP request and websocket under ``prefix`` needs a valid key."""

    def __init__(self, app: ASGIApp, account_of: AccountOf, prefix: str = "/ui") -> None:
        self.app = app
        self.account_of = account_of
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not _under(scope["path"], self.prefix):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        key = key_from(connection.headers, connection.cookies)
        account = await run_in_threadpool(self.account_of, key) if key else None
        if account is not None:
            scope.setdefault("state", {})[STATE_ACCOUNT] = account
            await self.app(scope, receive, send)
            return
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
            if key:
                detail = "unknown or revoked API key: sign in again at " + SIGNIN_PATH
            response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
 body {{ font-family: system-ui, sans-serif; background: #f6f7f9; color: #1f2328; margin: 0; }}
 main {{ max-width: 460px; margin: 12vh auto 0; background: #fff; border: 1px solid #d0d7de; border-radius: 10px;
        padding: 28px 28px 20px; box-sizing: border-box; }}
 h1 {{ font-size: 1.35rem; margin: 0 0 8px; }} p {{ line-height: 1.45; }}
 label {{ display: block; font-weight: 600; margin: 18px 0 6px; }}
 input[type=password] {{ width: 100%; box-sizing: border-box; padding: 9px 10px; font: inherit; border: 1px solid
        #8c959f; border-radius: 6px; }}
 button {{ margin-top: 14px; padding: 9px 18px; font: inherit; font-weight: 600; color: #fff; background: #ea580c;
        border: 0; border-radius: 6px; cursor: pointer; }}
 .error {{ color: #b42318; background: #fef3f2; border: 1px solid #fecdca; padding: 8px 10px; border-radius: 6px; }}
 .note {{ color: #1a7f37; }} .help {{ color: #57606a; font-size: 0.9rem; }}
 code {{ background: #eff1f3; padding: 1px 4px; border-radius: 4px; }}
</style></head>
<body><main id="signin">
<h1>{title}</h1>
<p>{intro}</p>
{message}
<form method="post" action="{action}">
 <label for="signin-key">{key_label}</label>
 <input id="signin-key" name="key" type="password" autocomplete="current-password" autofocus required
        placeholder="vopd_...">
 <input type="hidden" name="next" value="{next}">
 <button id="signin-submit" type="submit">{button}</button>
</form>
<p class="help">{help}</p>
</main></body></html>
"""


def signin_page(
    next_path: str,
    *,
    error: str | None = None,
    note: str | None = None,
    status_code: int = 200,
    action: str = SIGNIN_PATH,
) -> HTMLResponse:
    message = ""
    if error:
        message = f'<p class="error" id="signin-error" role="alert">{html.escape(error)}</p>'
    elif note:
        message = f'<p class="note" id="signin-note">{html.escape(note)}</p>'
    body = _PAGE.format(
        title=html.escape(strings.SIGNIN_TITLE),
        intro=html.escape(strings.SIGNIN_INTRO),
        message=message,
        action=html.escape(action),
        key_label=html.escape(strings.SIGNIN_KEY_LABEL),
        next=html.escape(next_path),
        button=html.escape(strings.SIGNIN_BUTTON),
        help=strings.SIGNIN_HELP,
    )
    # The page must not be framed (clickjacking) nor cached with a key in its URL; same-origin referrers only (a
    # no-referrer page makes Chromium send "Origin: null" with the form, which the cross-site check refuses).
    headers = {"X-Frame-Options": "DENY", "Cache-Control": "no-store", "Referrer-Policy": "same-origin"}
    return HTMLResponse(body, status_code=status_code, headers=headers)


def install_signin(app: FastAPI, account_of: AccountOf, *, prefix: str = "/ui") -> Callable[[Request], Any]:
    """Add /signin, /signout and the guard over ``prefix`` to ``app``; returns Gradio's ``auth_dependency``."""
    home = prefix.rstrip("/") + "/"

    async def signed_in(request: Request, key: str, next_path: str) -> Response:
        account = await run_in_threadpool(account_of, key) if key else None
        if account is None:
            error = strings.SIGNIN_BAD_KEY if key else strings.SIGNIN_NO_KEY
            return signin_page(next_path, error=error, status_code=401)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            key,
            max_age=COOKIE_MAX_AGE_S,
            path="/",
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    @app.get(SIGNIN_PATH, include_in_schema=False)
    async def signin_form(request: Request, key: str | None = None, next: str | None = None) -> Response:
        """The sign-in page; ``?key=`` (the link ``vopd serve`` prints) signs in at once."""
        next_path = _safe_next(next, home)
        if key is not None:
            return await signed_in(request, key.strip(), next_path)
        return signin_page(next_path)

    @app.post(SIGNIN_PATH, include_in_schema=False)
    async def signin_submit(request: Request) -> Response:
        if not _same_origin(request):
            return JSONResponse({"detail": "cross-site sign-in refused"}, status_code=403)
        form = await request.form()
        return await signed_in(
            request, str(form.get("key") or "").strip(), _safe_next(str(form.get("next") or ""), home)
        )

    @app.api_route(SIGNOUT_PATH, methods=["GET", "POST"], include_in_schema=False)
    async def signout(request: Request) -> Response:
        response = signin_page(home, note=strings.SIGNED_OUT)
        response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="lax")
        return response

    app.add_middleware(StudioGuard, account_of=account_of, prefix=prefix)

    async def auth_dependency(request: Request) -> str | None:
        """Gradio's own check, behind the guard: the account the guard found, else a fresh look-up."""
        account = getattr(request.state, STATE_ACCOUNT, None)
        if account is not None:
            return account
        key = key_from(request.headers, request.cookies)
        return await run_in_threadpool(account_of, key) if key else None

    return auth_dependency
