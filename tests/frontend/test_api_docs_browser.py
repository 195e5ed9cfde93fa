"""The API's own page in a real browser with every request off this machine refused: Swagger UI must draw from the
installed assets (a CDN-loaded page is blank offline: "SwaggerUIBundle is not defined")."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("VOPD_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API alone (no studio, no worker) served by uvicorn in a thread on loopback."""
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    home = tmp_path_factory.mktemp("vopd-home-docs")
    settings = Settings(home=home, database_url_env=f"sqlite:///{home}/vopd.db")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def offline_page(api_url: str) -> Iterator:
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        _unavailable(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--no-first-run"], headless=True
        )
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        refused: list[str] = []

        def only_this_server(route) -> None:
            if urlsplit(route.request.url).netloc == urlsplit(api_url).netloc:
                route.continue_()
            else:
                refused.append(route.request.url)
                route.abort("internetdisconnected")

        context.route("**/*", only_this_server)
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.refused = refused  # type: ignore[attr-defined]
        page.errors = errors  # type: ignore[attr-defined]
        yield page
        context.close()
        browser.close()


def test_swagger_ui_lists_the_operations_with_the_network_blocked(offline_page, api_url: str) -> None:
    offline_page.goto(f"{api_url}/docs", wait_until="load")
    offline_page.wait_for_selector(".opblock")  # Swagger UI drew the operations from /openapi.json
    paths = offline_page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/api/jobs" in path for path in paths), paths
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    offline_page.screenshot(path=ARTIFACTS / "api-docs-offline-1280.png")
    assert offline_page.errors == []  # type: ignore[attr-defined]
    assert offline_page.refused == []  # type: ignore[attr-defined]  # nothing asked of another host


def test_the_assets_are_served_by_the_api(api_url: str) -> None:
    page = httpx.get(f"{api_url}/docs").text
    assert "/api-docs-assets/swagger-ui-bundle.js" in page and "cdn." not in page
    script = httpx.get(f"{api_url}/api-docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and "SwaggerUIBundle" in script.text
    assert httpx.get(f"{api_url}/redoc").status_code == 404  # not offered: its page loads a logo from a CDN
