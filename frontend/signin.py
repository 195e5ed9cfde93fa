"""Signing in to the studio: the sign-in pages, a server-side session in an HttpOnly cookie, and the guard.

A browser never holds an API key. ``/signin`` exchanges either a pasted key or a one-time sign-in code (the link
``vopd serve`` prints, ``/signin?code=vopdc_...``) for a **session** the API keeps (``POST /api/sessions``), and the
``vopd_session`` cookie holds only that session's token. The callbacks forward it to the API as their Bearer
credential (``request_credential``), so the studio acts with the signed-in user's account over HTTP and never with a
key of its own; the API resolves the session to its key on every request, so signing out (which ends the session on
the server), an expired session or a revoked key stops the studio at once.

Signing in or out changes state only by POST from a page of this server: a GET (a link someone else may have sent)
shows a page with a button, and a POST whose origin is foreign or ``null`` is refused. ``frontend.guard`` holds the
guard over every path under the studio's prefix.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from frontend import strings
from frontend.guard import (
    COOKIE_NAME,
    LEGACY_COOKIE_NAME,
    SIGNIN_PATH,
    STATE_ACCOUNT,
    Account,
    StudioGuard,
    UploadOwners,
    credential_from,
    foreign_origin,
)

SIGNOUT_PATH = "/signout"
__all__ = ["COOKIE_NAME", "SIGNIN_PATH", "SIGNOUT_PATH", "Account", "OpenedSession", "SigninBackend"]


@dataclass(frozen=True)
class OpenedSession:
    """A session the server opened: the cookie's value and when it ends."""

    token: str
    expires_at: datetime
    name: str


class SigninBackend(Protocol):
    """What sign-in needs from the API: the mounted studio asks the database, the standalone one the REST API."""

    def account_of(self, credential: str) -> Account | None:
        """The account a key or session acts as; None when unknown, revoked, expired or ended."""
        ...

    def open_session(self, *, key: str | None = None, code: str | None = None) -> OpenedSession | None:
        """A new session for a key, or for a one-time sign-in code (spent); None when refused."""
        ...

    def end_session(self, token: str) -> None:
        """Sign-out: the session stops working everywhere."""
        ...


def request_credential(request: Any) -> str | None:
    """The credential of a Gradio callback's ``gr.Request`` (its session, or a script's Bearer key), or None."""
    if request is None:
        return None
    raw = getattr(request, "request", None)
    if raw is not None:
        return credential_from(raw.headers, raw.cookies)
    kwargs = getattr(request, "kwargs", {}) or {}
    headers = {k.lower(): v for k, v in (kwargs.get("headers") or {}).items()}
    return credential_from(headers, kwargs.get("cookies") or {})


def _safe_next(target: str | None, home: str) -> str:
    """Only a path on this server: an open redirect would make a sign-in link a phishing tool."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return home
    parts = urlsplit(target)
    return home if parts.scheme or parts.netloc else target


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
<body><main id="{page_id}">
<h1>{title}</h1>
<p>{intro}</p>
{message}
<form method="post" action="{action}">
{fields}
 <input type="hidden" name="next" value="{next}">
 <button id="{button_id}" type="submit">{button}</button>
</form>
<p class="help">{help}</p>
</main></body></html>
"""

_KEY_FIELD = """ <label for="signin-key">{label}</label>
 <input id="signin-key" name="key" type="password" autocomplete="current-password" autofocus required
        placeholder="vopd_...">"""


def _page(
    *,
    page_id: str,
    title: str,
    intro: str,
    action: str,
    fields: str,
    next_path: str,
    button_id: str,
    button: str,
    error: str | None = None,
    note: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    message = ""
    if error:
        message = f'<p class="error" id="signin-error" role="alert">{html.escape(error)}</p>'
    elif note:
        message = f'<p class="note" id="signin-note">{html.escape(note)}</p>'
    body = _PAGE.format(
        page_id=page_id,
        title=html.escape(title),
        intro=html.escape(intro),
        message=message,
        action=html.escape(action),
        fields=fields,
        next=html.escape(next_path),
        button_id=button_id,
        button=html.escape(button),
        help=strings.SIGNIN_HELP,
    )
    # Not framed (clickjacking a sign-in button), not cached, same-origin referrers only (a no-referrer page makes
    # Chromium send "Origin: null" with the form, which the cross-site check refuses).
    headers = {"X-Frame-Options": "DENY", "Cache-Control": "no-store", "Referrer-Policy": "same-origin"}
    return HTMLResponse(body, status_code=status_code, headers=headers)


def signin_page(
    next_path: str, *, error: str | None = None, note: str | None = None, status_code: int = 200
) -> HTMLResponse:
    """The form that takes a pasted key."""
    return _page(
        page_id="signin",
        title=strings.SIGNIN_TITLE,
        intro=strings.SIGNIN_INTRO,
        action=SIGNIN_PATH,
        fields=_KEY_FIELD.format(label=html.escape(strings.SIGNIN_KEY_LABEL)),
        next_path=next_path,
        button_id="signin-submit",
        button=strings.SIGNIN_BUTTON,
        error=error,
        note=note,
        status_code=status_code,
    )


def code_page(code: str, next_path: str) -> HTMLResponse:
    """What a one-time link opens: a button that signs in (a GET alone never does)."""
    field = f' <input type="hidden" name="code" value="{html.escape(code)}">'
    return _page(
        page_id="signin-code",
        title=strings.SIGNIN_CODE_TITLE,
        intro=strings.SIGNIN_CODE_INTRO,
        action=SIGNIN_PATH,
        fields=field,
        next_path=next_path,
        button_id="signin-code-submit",
        button=strings.SIGNIN_CODE_BUTTON,
    )


def signout_page(home: str) -> HTMLResponse:
    return _page(
        page_id="signout",
        title=strings.SIGNOUT_TITLE,
        intro=strings.SIGNOUT_INTRO,
        action=SIGNOUT_PATH,
        fields="",
        next_path=home,
        button_id="signout-submit",
        button=strings.SIGNOUT_BUTTON,
    )


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def install_signin(
    app: FastAPI,
    backend: SigninBackend,
    *,
    prefix: str = "/ui",
    secure_cookies: bool = False,
    upload_dir: str | None = None,
) -> Callable[[Request], Any]:
    """Add /signin, /signout and the guard over ``prefix`` to ``app``; returns Gradio's ``auth_dependency``.

    ``secure_cookies``: the deployment is HTTPS, so the cookie is ``Secure`` even on a request that arrived as plain
    HTTP (a proxy uvicorn does not trust). ``upload_dir``: Gradio's upload cache, whose folders each account may
    read only when they were shown to it (None: the guard leaves files to Gradio)."""
    home = prefix.rstrip("/") + "/"

    def secure(request: Request) -> bool:
        return secure_cookies or request.url.scheme == "https"  # uvicorn applies X-Forwarded-Proto it trusts

    def with_session(request: Request, opened: OpenedSession, next_path: str) -> Response:
        response = RedirectResponse(next_path, status_code=303)
        max_age = max(0, int((opened.expires_at - datetime.now(opened.expires_at.tzinfo)).total_seconds()))
        response.set_cookie(
            COOKIE_NAME,
            opened.token,
            max_age=max_age,
            path="/",
            httponly=True,
            samesite="lax",
            secure=secure(request),
        )
        response.delete_cookie(LEGACY_COOKIE_NAME, path="/", httponly=True, samesite="lax")
        return _no_store(response)

    def cross_site() -> Response:
        return JSONResponse({"detail": "cross-site sign-in or sign-out refused"}, status_code=403)

    @app.get(SIGNIN_PATH, include_in_schema=False)
    async def signin_form(
        request: Request, code: str | None = None, key: str | None = None, next: str | None = None
    ) -> Response:
        """The sign-in page; ``?code=`` (the one-time link) asks for a click. A key in a URL is never taken."""
        next_path = _safe_next(next, home)
        if key is not None:
            return signin_page(next_path, error=strings.SIGNIN_KEY_IN_LINK, status_code=400)
        if code is not None:
            return code_page(code.strip(), next_path)
        return signin_page(next_path)

    @app.post(SIGNIN_PATH, include_in_schema=False)
    async def signin_submit(request: Request) -> Response:
        if foreign_origin(request.headers):
            return cross_site()
        form = await request.form()
        next_path = _safe_next(str(form.get("next") or ""), home)
        code = str(form.get("code") or "").strip()
        key = str(form.get("key") or "").strip()
        if code:
            opened = await run_in_threadpool(lambda: backend.open_session(code=code))
            if opened is None:
                return signin_page(next_path, error=strings.SIGNIN_BAD_CODE, status_code=401)
        else:
            opened = await run_in_threadpool(lambda: backend.open_session(key=key)) if key else None
            if opened is None:
                error = strings.SIGNIN_BAD_KEY if key else strings.SIGNIN_NO_KEY
                return signin_page(next_path, error=error, status_code=401)
        return with_session(request, opened, next_path)

    @app.get(SIGNOUT_PATH, include_in_schema=False)
    async def signout_form() -> Response:
        return signout_page(home)

    @app.post(SIGNOUT_PATH, include_in_schema=False)
    async def signout(request: Request) -> Response:
        if foreign_origin(request.headers):
            return cross_site()
        token = (request.cookies.get(COOKIE_NAME) or "").strip()
        if token:
            await run_in_threadpool(backend.end_session, token)
        response = signin_page(home, note=strings.SIGNED_OUT)
        for name in (COOKIE_NAME, LEGACY_COOKIE_NAME):
            response.delete_cookie(name, path="/", httponly=True, samesite="lax", secure=secure(request))
        return response

    uploads = UploadOwners(upload_dir) if upload_dir else None
    app.add_middleware(StudioGuard, account_of=backend.account_of, prefix=prefix, uploads=uploads)

    async def auth_dependency(request: Request) -> str | None:
        """Gradio's own check, behind the guard: the account the guard found, else a fresh look-up."""
        name = getattr(request.state, STATE_ACCOUNT, None)
        if name is not None:
            return name
        credential = credential_from(request.headers, request.cookies)
        account = await run_in_threadpool(backend.account_of, credential) if credential else None
        return account.name if account is not None else None

    return auth_dependency
