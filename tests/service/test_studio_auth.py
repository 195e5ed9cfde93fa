"""The studio behind the same keys as the API, on a real HTTP server (uvicorn) over SQLite and PostgreSQL + Redis.

Every path under /ui (pages, Gradio's API, queue, uploads, files, static assets) refuses a request without a valid
key or session; /signin turns a pasted key or a one-time code into a server-side session in an HttpOnly cookie (never
the key); Gradio callbacks call the API with the signed-in user's session (never the server's key); keys can be
listed and revoked (CLI and admin route), and a revoked key (or an ended session) is refused everywhere at once; no
foreign origin gets CORS headers or changes state; each account reads only its own files of Gradio's upload cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.serve import vopd_command
from tests.conftest import free_port
from tests.service.conftest import SESSION_TAG

pytestmark = pytest.mark.services

FOREIGN_ORIGIN = "https://evil.example"


@dataclass
class Studio:
    backend: str
    url: str
    env: dict[str, str]
    admin: str  # the local key `vopd serve` would print
    alice: str
    bob: str
    app: object

    def bearer(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def new_key(self, name: str) -> tuple[int, str]:
        created = httpx.post(f"{self.url}/api/keys", json={"name": name}, headers=self.bearer(self.admin))
        assert created.status_code == 201, created.text
        return created.json()["id"], created.json()["key"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def studio(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Studio]:
    import uvicorn

    backend = request.param
    home = tmp_path_factory.mktemp(f"vopd-studio-{backend}")
    env = {"VOPD_HOME": str(home), "VOPD_QUEUE": f"vopd-studio-{backend}-{SESSION_TAG}", "OMP_NUM_THREADS": "1"}
    if backend == "postgresql":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")  # what ensure_default_assets would build
    with pytest.MonkeyPatch.context() as patch:
        for name in ("DATABASE_URL", "REDIS_URL"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        from app.auth import create_api_key
        from app.bootstrap import ensure_default_assets, ensure_local_key
        from app.db import session_scope
        from app.main import create_app, mount_ui
        from app.settings import get_settings

        settings = get_settings()
        app = create_app(settings)
        ensure_default_assets(settings, app.state.session_factory)
        admin = ensure_local_key(settings, app.state.session_factory)
        with session_scope(app.state.session_factory) as session:
            _, alice = create_api_key(session, "alice")
            _, bob = create_api_key(session, "bob")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        assert mount_ui(app, url)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name="studio-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield Studio(backend, url, {**os.environ}, admin, alice, bob, app)
        finally:
            server.should_exit = True
            thread.join(30)


def _gradio_routes(app: object) -> list[tuple[str, str]]:
    """(method, path) of every route the mounted Gradio app serves, path parameters filled with a dummy."""
    mount = next(route for route in app.routes if getattr(route, "path", None) == "/ui")  # type: ignore[attr-defined]
    found: list[tuple[str, str]] = []

    def walk(routes: list, prefix: str) -> None:
        for route in routes:
            if hasattr(route, "original_router"):  # FastAPI's lazily included router (APIRouter(prefix=...))
                walk(route.original_router.routes, prefix + route.include_context.prefix)
                continue
            path = prefix + re.sub(r"\{[^}]+\}", "x", route.path)
            methods = sorted((getattr(route, "methods", None) or {"GET"}) - {"HEAD", "OPTIONS"})
            found.extend((method, path) for method in methods)

    walk(mount.app.routes, "/ui")
    return sorted(set(found))


def _status(client: httpx.Client, method: str, path: str, **kwargs: object) -> httpx.Response:
    """Only the status and headers: some Gradio routes stream forever (heartbeat, queue data)."""
    with client.stream(method, path, **kwargs) as response:  # type: ignore[arg-type]
        return response


def test_every_gradio_route_refuses_a_request_without_a_valid_key(studio: Studio) -> None:
    routes = _gradio_routes(studio.app)
    paths = {path for _, path in routes}
    for expected in (
        "/ui/",
        "/ui/config",
        "/ui/gradio_api/info",
        "/ui/gradio_api/queue/join",
        "/ui/gradio_api/queue/data",
        "/ui/gradio_api/upload",
        "/ui/gradio_api/file=x",
        "/ui/gradio_api/heartbeat/x",
        "/ui/assets/x",
        "/ui/static/x",
        "/ui/gradio_api/vibe-code",
    ):
        assert expected in paths, f"{expected} not among Gradio's routes: {sorted(paths)}"
    revoked_id, revoked = studio.new_key("revoked-walker")
    with httpx.Client(base_url=studio.url, timeout=10) as client:
        assert client.post(f"/api/keys/{revoked_id}/revoke", headers=studio.bearer(revoked)).status_code == 200
        refused = []
        for method, path in routes:
            for headers in (
                {},
                studio.bearer("vopd_wrong"),
                studio.bearer(revoked),
                studio.bearer("vopds_wrong"),
                {"Cookie": "vopd_session=vopds_no"},
                {"Cookie": f"vopd_key={studio.alice}"},  # an older version's cookie held the key: never read now
            ):
                response = _status(client, method, path, headers=headers)
                if response.status_code != 401:
                    refused.append((method, path, headers, response.status_code))
            page = _status(client, method, path, headers={"Accept": "text/html"})
            if method == "GET":  # a browser is sent to the sign-in page, the path it wanted kept
                assert page.status_code == 303 and page.headers["location"].startswith("/signin?next=%2Fui"), path
        assert refused == [], f"answered without a valid key: {refused}"
        # With a key every route gets past the guard and Gradio's login check (404/405/422 on dummy values, and
        # Gradio's own 401/403 of features it keeps off, such as monitoring or Hugging Face run history, are fine).
        stopped = []
        for method, path in routes:
            with client.stream(method, path, headers=studio.bearer(studio.alice)) as response:
                if response.status_code == 401:
                    text = response.read().decode(errors="replace")
                    if "/signin" in text or "Not authenticated" in text:  # the guard or Gradio login_check
                        stopped.append((method, path, text))
        assert stopped == []
    websocket_like = httpx.get(f"{studio.url}/ui/gradio_api/queue/data", params={"session_hash": "x"})
    assert websocket_like.status_code == 401


def test_with_a_key_pages_config_upload_files_and_queued_calls_work(studio: Studio, tmp_path: Path) -> None:
    from gradio_client import Client

    with httpx.Client(base_url=studio.url, headers=studio.bearer(studio.alice), timeout=30) as client:
        assert client.get("/ui/").status_code == 200
        assert client.get("/ui/config").json()["username"] == "alice"
        assert "named_endpoints" in client.get("/ui/gradio_api/info").json()
        upload = client.post("/ui/gradio_api/upload", files={"files": ("note.txt", b"hello", "text/plain")})
        assert upload.status_code == 200, upload.text
        served = upload.json()[0]
        assert client.get(f"/ui/gradio_api/file={served}").content == b"hello"
        assert httpx.get(f"{studio.url}/ui/gradio_api/file={served}").status_code == 401
    # A queued call (queue/join + queue/data) through gradio_client, as a script would drive the studio.
    ui = Client(f"{studio.url}/ui/", headers=studio.bearer(studio.alice), verbose=False)
    assert ui.predict(api_name="/signed_in_as").startswith("Signed in as **alice**")


def test_callbacks_act_with_the_signed_in_users_key_not_the_servers(studio: Studio) -> None:
    """Alice's job is listed by the studio to Alice, not to Bob, and to nobody without a key (no local fallback)."""
    from gradio_client import Client

    from frontend import strings

    body = {"kind": "eval", "config": {"model": "tiny", "dataset": "synth-64", "limit": 2}}
    created = httpx.post(f"{studio.url}/api/jobs", json=body, headers=studio.bearer(studio.alice))
    assert created.status_code == 201, created.text  # queued: no worker runs here
    ui_as = {
        name: Client(f"{studio.url}/ui/", headers=studio.bearer(key), verbose=False)
        for name, key in (("alice", studio.alice), ("bob", studio.bob))
    }
    ids = {
        name: [int(row[0]) for row in client.predict(strings.ANY, strings.ANY, api_name="/refresh_table")["data"]]
        for name, client in ui_as.items()
    }
    assert created.json()["id"] in ids["alice"] and created.json()["id"] not in ids["bob"], ids
    with pytest.raises(Exception):  # noqa: B017 - gradio_client's own error on a 401
        Client(f"{studio.url}/ui/", verbose=False)


def _session_cookie(response: httpx.Response) -> str:
    return next(value for name, value in response.cookies.items() if name == "vopd_session")


def test_signin_page_sets_a_session_cookie_and_signout_ends_the_session(studio: Studio) -> None:
    with httpx.Client(base_url=studio.url, timeout=10) as browser:
        page = browser.get("/ui/", headers={"Accept": "text/html"}, follow_redirects=True)
        assert page.status_code == 200 and 'id="signin-key"' in page.text and page.url.path == "/signin"
        wrong = browser.post("/signin", data={"key": "vopd_nope", "next": "/ui/"})
        assert wrong.status_code == 401 and "unknown or revoked" in wrong.text and "set-cookie" not in wrong.headers
        signed = browser.post("/signin", data={"key": studio.bob, "next": "/ui/"})
        assert signed.status_code == 303 and signed.headers["location"] == "/ui/"
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
        token = _session_cookie(signed)
        assert token.startswith("vopds_") and studio.bob not in signed.headers["set-cookie"], "a session, not the key"
        assert browser.get("/ui/").status_code == 200
        assert browser.get("/ui/config").json()["username"] == "bob"
        assert browser.get("/api/me").status_code == 401, "the REST API takes Bearer credentials only (no cookie)"
        assert httpx.get(f"{studio.url}/api/me", headers=studio.bearer(token)).json()["name"] == "bob"
        # GET /signout only asks; the POST from the page signs out and ends the session on the server.
        confirm = browser.get("/signout")
        assert confirm.status_code == 200 and 'id="signout-submit"' in confirm.text
        assert browser.get("/ui/config").status_code == 200
        assert browser.post("/signout").status_code == 200
        assert browser.get("/ui/config").status_code == 401
        assert httpx.get(f"{studio.url}/api/me", headers=studio.bearer(token)).status_code == 401, "ended server-side"
        assert httpx.get(f"{studio.url}/ui/config", headers={"Cookie": f"vopd_session={token}"}).status_code == 401
    # A foreign `next` never leaves the server; a cross-site or `null`-origin form post is refused.
    signed = httpx.post(f"{studio.url}/signin", data={"key": studio.admin, "next": "//evil.example/x"})
    assert signed.status_code == 303 and signed.headers["location"] == "/ui/"
    assert httpx.post(f"{studio.url}/signin", data={"key": studio.admin, "next": "/ui/?x=1"}).headers["location"] == (
        "/ui/?x=1"
    )
    for headers in ({"Origin": FOREIGN_ORIGIN}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        foreign = httpx.post(f"{studio.url}/signin", data={"key": studio.alice}, headers=headers)
        assert foreign.status_code == 403 and "set-cookie" not in foreign.headers


def test_the_printed_link_carries_a_one_time_code_not_the_key(studio: Studio) -> None:
    """Finding: `GET /signin?key=...` put the key in the access log and browser history, set the raw key as the
    cookie, and signed a victim in as the attacker from any site (login CSRF)."""
    # A link with the key in it signs nobody in any more.
    keyed = httpx.get(f"{studio.url}/signin", params={"key": studio.admin})
    assert keyed.status_code == 400 and "set-cookie" not in keyed.headers and "not accepted" in keyed.text
    from app.serve import signin_link

    link = signin_link(studio.app.state.settings, studio.app.state.session_factory, studio.url, studio.admin)  # type: ignore[attr-defined]
    assert link.startswith(f"{studio.url}/signin?code=vopdc_") and studio.admin not in link
    code = link.split("code=", 1)[1]
    # Opening the link (a GET another site can trigger) only shows a button; the code is not spent.
    for _ in range(2):
        page = httpx.get(link)
        assert page.status_code == 200 and "set-cookie" not in page.headers and 'id="signin-code-submit"' in page.text
    cross_site = httpx.post(f"{studio.url}/signin", data={"code": code}, headers={"Origin": FOREIGN_ORIGIN})
    assert cross_site.status_code == 403 and "set-cookie" not in cross_site.headers
    # The button's POST (same origin) spends it for a session; a second use is refused.
    origin = {"Origin": studio.url}
    signed = httpx.post(f"{studio.url}/signin", data={"code": code, "next": "/ui/"}, headers=origin)
    assert signed.status_code == 303 and signed.headers["location"] == "/ui/"
    token = _session_cookie(signed)
    assert token.startswith("vopds_") and studio.admin not in signed.headers["set-cookie"]
    assert httpx.get(f"{studio.url}/ui/config", headers={"Cookie": f"vopd_session={token}"}).json()["username"] == (
        "local"
    )
    again = httpx.post(f"{studio.url}/signin", data={"code": code}, headers=origin)
    assert again.status_code == 401 and "set-cookie" not in again.headers and "already used" in again.text
    # Stored as hashes only, and an expired code is refused.
    from sqlalchemy import select, update

    from app.auth import hash_key
    from app.db import session_scope
    from app.tables import BrowserSession, SigninCode

    fresh = signin_link(studio.app.state.settings, studio.app.state.session_factory, studio.url, studio.admin)  # type: ignore[attr-defined]
    with session_scope(studio.app.state.session_factory) as session:  # type: ignore[attr-defined]
        stored = [row.code_hash for row in session.scalars(select(SigninCode))]
        assert code not in stored and hash_key(code) in stored
        assert token not in [row.token_hash for row in session.scalars(select(BrowserSession))]
        fresh_code = fresh.split("code=", 1)[1]
        session.execute(
            update(SigninCode)
            .where(SigninCode.code_hash == hash_key(fresh_code))
            .values(expires_at=SigninCode.created_at)
        )
    expired = httpx.post(f"{studio.url}/signin", data={"code": fresh_code}, headers=origin)
    assert expired.status_code == 401 and "set-cookie" not in expired.headers


def test_the_access_log_shows_no_key_and_no_code(studio: Studio) -> None:
    """Finding: uvicorn's access log wrote `"GET /signin?key=vopd_... HTTP/1.1" 303` on every use of the link."""
    import logging

    logger = logging.getLogger("uvicorn.access")
    lines: list[str] = []

    from uvicorn.logging import AccessFormatter

    class Collect(logging.Handler):
        """Formats as uvicorn's own access handler does (which unpacks the record's arguments)."""

        def emit(self, record: logging.LogRecord) -> None:
            lines.append(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(record))

    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        httpx.get(f"{studio.url}/signin", params={"key": studio.alice, "next": "/ui/"})
        httpx.get(f"{studio.url}/signin", params={"code": "vopdc_secretcode123"})
        httpx.get(f"{studio.url}/api/health", params={"key": studio.alice})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(lines) == 3, lines
    assert not [line for line in lines if studio.alice in line or "secretcode123" in line], lines
    assert all("[redacted]" in line for line in lines), lines


def test_the_api_takes_a_session_as_its_key_and_sessions_end(studio: Studio) -> None:
    key_id, key = studio.new_key("session-user")
    opened = httpx.post(f"{studio.url}/api/sessions", headers=studio.bearer(key))
    assert opened.status_code == 201, opened.text
    token = opened.json()["session"]
    assert opened.json()["name"] == "session-user" and opened.json()["key_id"] == key_id
    session_headers = studio.bearer(token)
    body = {"kind": "eval", "config": {"model": "tiny", "dataset": "synth-64", "limit": 2}}
    job = httpx.post(f"{studio.url}/api/jobs", json=body, headers=session_headers).json()["id"]
    assert httpx.get(f"{studio.url}/api/jobs/{job}", headers=session_headers).json()["status"] == "queued"
    assert httpx.get(f"{studio.url}/api/jobs/{job}", headers=studio.bearer(key)).status_code == 200
    assert httpx.get(f"{studio.url}/api/jobs/{job}", headers=studio.bearer(studio.bob)).status_code == 404
    # A session cannot mint sessions or codes (it would outlive its own end); a key can.
    assert httpx.post(f"{studio.url}/api/sessions", headers=session_headers).status_code == 403
    assert httpx.post(f"{studio.url}/api/sessions/codes", headers=session_headers).status_code == 403
    code = httpx.post(f"{studio.url}/api/sessions/codes", headers=studio.bearer(key))
    assert code.status_code == 201 and code.json()["code"].startswith("vopdc_")
    by_code = httpx.post(f"{studio.url}/api/sessions", json={"code": code.json()["code"]})
    assert by_code.status_code == 201 and by_code.json()["key_id"] == key_id
    assert httpx.post(f"{studio.url}/api/sessions", json={"code": code.json()["code"]}).status_code == 401
    # Sign-out ends one session; revoking the key ends them all.
    assert httpx.delete(f"{studio.url}/api/sessions/current", headers=session_headers).status_code == 204
    assert httpx.get(f"{studio.url}/api/jobs/{job}", headers=session_headers).status_code == 401
    other = studio.bearer(by_code.json()["session"])
    assert httpx.get(f"{studio.url}/api/me", headers=other).status_code == 200
    assert httpx.post(f"{studio.url}/api/keys/{key_id}/revoke", headers=studio.bearer(studio.admin)).status_code == 200
    assert httpx.get(f"{studio.url}/api/me", headers=other).status_code == 401
    assert httpx.post(f"{studio.url}/api/sessions", headers=studio.bearer(key)).status_code == 401


def test_the_cookie_is_secure_over_https(studio: Studio) -> None:
    """Finding: the cookie had no `Secure` flag over plain HTTP on a non-local host; behind a TLS proxy uvicorn
    trusts (loopback here), X-Forwarded-Proto makes it Secure, and VOPD_SECURE_COOKIES always does."""
    plain = httpx.post(f"{studio.url}/signin", data={"key": studio.alice})
    assert plain.status_code == 303 and "secure" not in plain.headers["set-cookie"].lower()
    proxied = httpx.post(f"{studio.url}/signin", data={"key": studio.alice}, headers={"X-Forwarded-Proto": "https"})
    assert proxied.status_code == 303 and "; secure" in proxied.headers["set-cookie"].lower()
    settings = studio.app.state.settings  # type: ignore[attr-defined]
    settings.secure_cookies = True
    try:
        # The setting is read when the studio is mounted: a second mount on a scratch app shows it.
        from fastapi import FastAPI
        from fastapi.testclient import TestClient

        from app.main import DatabaseSignin
        from frontend.signin import install_signin

        scratch = FastAPI()
        scratch.state.settings = settings
        scratch.state.session_factory = studio.app.state.session_factory  # type: ignore[attr-defined]
        install_signin(scratch, DatabaseSignin(scratch), secure_cookies=settings.secure_cookies)
        with TestClient(scratch, base_url="http://studio.example.org") as client:
            forced = client.post("/signin", data={"key": studio.alice}, follow_redirects=False)
        assert forced.status_code == 303 and "; secure" in forced.headers["set-cookie"].lower()
    finally:
        settings.secure_cookies = False


def test_state_changing_studio_routes_refuse_a_foreign_or_null_origin(studio: Studio) -> None:
    """Finding: `POST /ui/gradio_api/upload` and `queue/join` accepted a foreign `Origin` (a page on another port of
    the same host is same-site, so the Lax cookie goes along)."""
    alice = studio.bearer(studio.alice)  # the check does not depend on how the request is signed in
    join = {"data": [], "fn_index": 0, "session_hash": "originprobe", "event_data": None, "trigger_id": None}
    for origin in (FOREIGN_ORIGIN, "null", "http://127.0.0.1:1"):
        headers = {**alice, "Origin": origin}
        upload = httpx.post(
            f"{studio.url}/ui/gradio_api/upload", files={"files": ("x.txt", b"x", "text/plain")}, headers=headers
        )
        queued = httpx.post(f"{studio.url}/ui/gradio_api/queue/join", json=join, headers=headers)
        signout = httpx.post(f"{studio.url}/signout", headers=headers)
        assert [upload.status_code, queued.status_code, signout.status_code] == [403, 403, 403], origin
    same = {**alice, "Origin": studio.url}
    upload = httpx.post(
        f"{studio.url}/ui/gradio_api/upload", files={"files": ("x.txt", b"x", "text/plain")}, headers=same
    )
    assert upload.status_code == 200, upload.text
    assert httpx.post(f"{studio.url}/ui/gradio_api/queue/join", json=join, headers=same).status_code == 200
    # A foreign page's sign-out leaves the session alone.
    signed = httpx.post(f"{studio.url}/signin", data={"key": studio.alice})
    cookie = {"Cookie": f"vopd_session={_session_cookie(signed)}"}
    assert httpx.post(f"{studio.url}/signout", headers={**cookie, "Origin": FOREIGN_ORIGIN}).status_code == 403
    assert httpx.get(f"{studio.url}/ui/config", headers=cookie).status_code == 200


def test_each_account_reads_only_its_own_uploads(studio: Studio) -> None:
    """Finding: Gradio's upload cache is shared: Bob read Alice's upload back with `GET /ui/gradio_api/file=...`."""
    secret = b"alice's private image bytes " + os.urandom(8)
    alice, bob = studio.bearer(studio.alice), studio.bearer(studio.bob)
    upload = httpx.post(
        f"{studio.url}/ui/gradio_api/upload", files={"files": ("private.png", secret, "image/png")}, headers=alice
    )
    assert upload.status_code == 200, upload.text
    path = upload.json()[0]
    assert httpx.get(f"{studio.url}/ui/gradio_api/file={path}", headers=alice).content == secret
    for variant in (
        path,
        path.replace("/", "//"),
        f"{os.path.dirname(path)}/../{os.path.basename(os.path.dirname(path))}/private.png",
    ):
        stolen = httpx.get(f"{studio.url}/ui/gradio_api/file={variant}", headers=bob)
        assert stolen.status_code == 403 and "another account" in stolen.text, variant
    assert httpx.get(f"{studio.url}/ui/gradio_api/file/{path}", headers=bob).status_code == 403
    # Nor through a callback: a queued call naming Alice's file as its input is refused for Bob.
    join = {
        "data": [{"path": path, "meta": {"_type": "gradio.FileData"}}],
        "fn_index": 0,
        "session_hash": "bobprobe",
        "event_data": None,
        "trigger_id": None,
    }
    refused = httpx.post(f"{studio.url}/ui/gradio_api/queue/join", json=join, headers=bob)
    assert refused.status_code == 403 and "another account" in refused.text
    assert httpx.post(f"{studio.url}/ui/gradio_api/queue/join", json=join, headers=alice).status_code == 200
    # What Bob uploads himself he reads; the same bytes uploaded by both are both's.
    mine = httpx.post(
        f"{studio.url}/ui/gradio_api/upload", files={"files": ("b.txt", b"bob", "text/plain")}, headers=bob
    )
    assert httpx.get(f"{studio.url}/ui/gradio_api/file={mine.json()[0]}", headers=bob).content == b"bob"
    assert httpx.get(f"{studio.url}/ui/gradio_api/file={mine.json()[0]}", headers=alice).status_code == 403
    same = httpx.post(
        f"{studio.url}/ui/gradio_api/upload", files={"files": ("private.png", secret, "image/png")}, headers=bob
    )
    assert httpx.get(f"{studio.url}/ui/gradio_api/file={same.json()[0]}", headers=bob).content == secret


def test_a_revoked_key_is_refused_everywhere_at_once(studio: Studio) -> None:
    key_id, key = studio.new_key("soon-revoked")
    # The status poll checks the key inside the statement that reads the job: the owner reads it, another key gets
    # a 404 (not someone else's data), and once revoked the owner itself gets a 401 for its own job.
    body = {"kind": "eval", "config": {"model": "tiny", "dataset": "synth-64", "limit": 2}}
    job = httpx.post(f"{studio.url}/api/jobs", json=body, headers=studio.bearer(key)).json()["id"]
    poll = f"{studio.url}/api/jobs/{job}"
    assert httpx.get(poll, headers=studio.bearer(key)).json()["status"] == "queued"
    assert httpx.get(poll, headers=studio.bearer(studio.bob)).status_code == 404
    assert httpx.get(poll, headers=studio.bearer("vopd_wrong")).status_code == 401
    with httpx.Client(base_url=studio.url, timeout=10) as browser:
        assert browser.post("/signin", data={"key": key}).status_code == 303
        session = browser.cookies["vopd_session"]
        checks = {
            "/ui/config": browser.get,
            "/api/me": lambda path: httpx.get(studio.url + path, headers=studio.bearer(key)),
        }
        assert [checks[path](path).status_code for path in checks] == [200, 200]
        revoked = httpx.post(f"{studio.url}/api/keys/{key_id}/revoke", headers=studio.bearer(studio.admin))
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        assert [checks[path](path).status_code for path in checks] == [401, 401]
        assert httpx.get(f"{studio.url}/api/me", headers=studio.bearer(session)).status_code == 401
        refused = httpx.get(poll, headers=studio.bearer(key))
        assert refused.status_code == 401 and refused.json()["detail"] == "unknown or revoked API key"
        assert browser.get("/ui/", headers={"Accept": "text/html"}).headers["location"].startswith("/signin")
        assert httpx.get(f"{studio.url}/ui/gradio_api/info", headers=studio.bearer(key)).status_code == 401


def test_keys_route_lists_for_an_admin_only_and_revokes(studio: Studio) -> None:
    listed = httpx.get(f"{studio.url}/api/keys", headers=studio.bearer(studio.admin))
    assert listed.status_code == 200
    rows = {row["name"]: row for row in listed.json()["items"]}
    assert rows["local"]["admin"] is True and rows["alice"]["admin"] is False
    assert all("key" not in row and "key_hash" not in row for row in rows.values())
    assert rows["alice"]["prefix"] == studio.alice[: len(rows["alice"]["prefix"])]
    for key in (studio.alice, studio.bob):
        assert httpx.get(f"{studio.url}/api/keys", headers=studio.bearer(key)).status_code == 403
        assert httpx.post(f"{studio.url}/api/keys", json={"name": "x"}, headers=studio.bearer(key)).status_code == 403
    other = httpx.post(f"{studio.url}/api/keys/{rows['bob']['id']}/revoke", headers=studio.bearer(studio.alice))
    assert other.status_code == 403
    assert httpx.get(f"{studio.url}/api/me", headers=studio.bearer(studio.bob)).status_code == 200
    for missing in (10**6, 2**63):
        response = httpx.post(f"{studio.url}/api/keys/{missing}/revoke", headers=studio.bearer(studio.admin))
        assert response.status_code in (404, 422), response.text
    me_id, me_key = studio.new_key("self-revoker")
    assert httpx.get(f"{studio.url}/api/keys/me", headers=studio.bearer(me_key)).json()["id"] == me_id
    assert httpx.post(f"{studio.url}/api/keys/{me_id}/revoke", headers=studio.bearer(me_key)).status_code == 200
    assert httpx.get(f"{studio.url}/api/keys/me", headers=studio.bearer(me_key)).status_code == 401


def test_cli_lists_and_revokes_keys(studio: Studio) -> None:
    def vopd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            vopd_command("apikey", *args), env=studio.env, capture_output=True, text=True, timeout=120, check=check
        )

    key = vopd("create", "--name", "carol").stdout.strip().splitlines()[-1]
    assert httpx.get(f"{studio.url}/api/me", headers=studio.bearer(key)).json()["name"] == "carol"
    listing = vopd("list").stdout
    # The list shows each key's prefix, never the key (the database may hold an earlier "carol" too).
    carols = [line.split()[1] for line in listing.splitlines() if line.endswith(" carol")]
    prefix = next(prefix for prefix in carols if key.startswith(prefix))
    assert len(prefix) < len(key) and key not in listing
    assert re.search(r"\blocal$", listing, re.MULTILINE) and "yes" in next(
        line for line in listing.splitlines() if line.endswith(" local")
    )
    unknown = vopd("revoke", "vopd_zzzzzzzz", check=False)
    assert unknown.returncode == 2 and "no API key" in unknown.stderr
    assert "revoked key" in vopd("revoke", prefix).stdout
    assert httpx.get(f"{studio.url}/api/me", headers=studio.bearer(key)).status_code == 401
    assert httpx.get(f"{studio.url}/ui/config", headers=studio.bearer(key)).status_code == 401
    revoked_line = next(line for line in vopd("list").stdout.splitlines() if line.split()[1] == prefix)
    assert "yes" in revoked_line
    admin_key = vopd("create", "--name", "dora", "--admin").stdout.strip().splitlines()[-1]
    assert httpx.get(f"{studio.url}/api/keys", headers=studio.bearer(admin_key)).status_code == 200


@pytest.mark.parametrize("path", ["/api/health", "/ui/gradio_api/info", "/ui/config", "/ui/gradio_api/queue/join"])
def test_no_foreign_origin_gets_cors_headers(studio: Studio, path: str) -> None:
    """Not on loopback either: Gradio's own middleware echoes any Origin (with credentials) for other hosts."""
    for host in ("127.0.0.1", "studio.example.org"):
        headers = {**studio.bearer(studio.alice), "Origin": FOREIGN_ORIGIN, "Host": host}
        simple = httpx.get(studio.url + path, headers=headers)
        preflight = httpx.options(
            studio.url + path,
            headers={
                **headers,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        for response in (simple, preflight):
            assert "access-control-allow-origin" not in response.headers, (host, response.headers)
            assert "access-control-allow-credentials" not in response.headers, (host, response.headers)


def test_the_standalone_studio_signs_in_and_out_through_the_api(studio: Studio) -> None:
    """`python -m frontend.app --api URL`: sessions are opened, checked and ended over HTTP only."""
    from fastapi.testclient import TestClient

    from frontend.app import standalone_app

    with TestClient(standalone_app(studio.url), base_url="http://studio.test") as browser:
        signed = browser.post("/signin", data={"key": studio.alice}, follow_redirects=False)
        assert signed.status_code == 303, signed.text
        token = _session_cookie(signed)
        assert token.startswith("vopds_") and studio.alice not in signed.headers["set-cookie"]
        assert browser.get("/ui/config").json()["username"] == "alice"
        assert httpx.get(f"{studio.url}/api/me", headers=studio.bearer(token)).json()["name"] == "alice"
        assert browser.post("/signout").status_code == 200
        assert browser.get("/ui/config").status_code == 401
        assert httpx.get(f"{studio.url}/api/me", headers=studio.bearer(token)).status_code == 401
        code = httpx.post(f"{studio.url}/api/sessions/codes", headers=studio.bearer(studio.bob)).json()["code"]
        assert browser.get("/signin", params={"code": code}).status_code == 200
        assert browser.post("/signin", data={"code": code}, follow_redirects=False).status_code == 303
        assert browser.get("/ui/config").json()["username"] == "bob"
