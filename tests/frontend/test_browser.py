"""The studio in a real browser: Playwright drives Debian's Chromium against a live ``vopd serve`` on loopback.

Screenshots land in test-artifacts/browser/ (gitignored) at 1280x800 and at a narrow 420 px. Under CI=true these
tests must run; elsewhere they skip when Chromium or Playwright is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = Path(os.environ.get("VOPD_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_TIMEOUT_S = 180
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 420, "height": 800}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)")
    pytest.skip(reason)


@dataclass
class LiveServer:
    url: str
    home: Path
    log: Path

    @property
    def local_api_key(self) -> str:
        return (self.home / "local_api_key").read_text().strip()

    @property
    def signin_link(self) -> str:
        """The one-time sign-in link `vopd serve` prints (as Jupyter prints its token link, but good once)."""
        match = re.search(r"(http://\S+/signin\?code=\S+)", self.log.read_text())
        assert match, f"no sign-in link in the banner:\n{self.log.read_text()[-3000:]}"
        return match.group(1)

    def fresh_signin_link(self) -> str:
        """Another one-time link, as `vopd apikey signin-link` prints (made over the API: no process to start)."""
        made = httpx.post(
            f"{self.url}/api/sessions/codes", headers={"Authorization": f"Bearer {self.local_api_key}"}, timeout=10
        )
        assert made.status_code == 201, made.text
        return f"{self.url}/signin?code={made.json()['code']}"


def _sign_in_by_link(page, link: str) -> None:
    """Open a one-time link: it asks first (a GET never signs in), the button signs in and lands on the studio."""
    page.goto(link, wait_until="load")
    page.locator("#signin-code-submit").click()
    page.wait_for_selector("#inspect-run")


def _wait_until_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vopd serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            health = httpx.get(f"{url}/api/health", timeout=2).json()
            if health.get("workers") and httpx.get(f"{url}/signin", timeout=5).status_code == 200:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"vopd serve was not ready within {SERVER_START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def serving(home: Path, extra_env: dict[str, str] | None = None) -> Iterator[LiveServer]:
    """``vopd serve`` on a free loopback port with ``home`` as VOPD_HOME (``extra_env`` on top), stopped with every
    process it started."""
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        _unavailable(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    from app.serve import vopd_command

    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    env |= {
        "VOPD_HOME": str(home),
        "VOPD_QUEUE": f"vopd-browser-{port}",
        "VOPD_HEARTBEAT_INTERVAL_S": "1",
        "VOPD_PROGRESS_INTERVAL_S": "0.2",
        "VOPD_EMBEDDED_POLL_S": "0.1",
        "OMP_NUM_THREADS": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        **(extra_env or {}),
    }
    log = home / "serve.log"
    with log.open("wb") as handle:
        # Its own process group, so the worker it starts is stopped with it even if serve dies abruptly.
        server = subprocess.Popen(
            vopd_command("serve", "--port", str(port)),
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_ready(url, server, log)
        yield LiveServer(url=url, home=home, log=log)
    finally:
        if server.poll() is None:
            server.terminate()  # serve stops its worker itself, as on Ctrl-C
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        # A Celery worker in warm shutdown can outlive its parent: nothing of this group may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serving(tmp_path_factory.mktemp("vopd-home-browser")) as server:
        yield server


@pytest.fixture(scope="module")
def browser(live_server: LiveServer) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, live_server: LiveServer, request: pytest.FixtureRequest) -> Iterator:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    page.set_default_timeout(60_000)
    _sign_in_by_link(page, live_server.fresh_signin_link())  # a session in an HttpOnly cookie
    # the model and dataset choices arrive from the API just after the page loads
    page.wait_for_function("(document.querySelector('#inspect-model input')?.value ?? '') !== ''")
    yield page
    page.screenshot(path=ARTIFACTS / f"last-{request.node.name}.png", full_page=True)  # what the test saw last
    context.close()


def _screenshots(page, name: str) -> None:
    """Wide and narrow screenshots; the narrow page must not scroll sideways (tables scroll inside themselves)."""
    page.set_viewport_size(WIDE)
    page.screenshot(path=ARTIFACTS / f"{name}-1280.png", full_page=True)
    page.set_viewport_size(NARROW)
    page.wait_for_timeout(500)
    page.screenshot(path=ARTIFACTS / f"{name}-420.png", full_page=True)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 2, f"the page scrolls sideways by {overflow}px at 420 px"
    page.set_viewport_size(WIDE)


def _first_sample(live_server: LiveServer) -> tuple[Path, dict]:
    dataset = live_server.home / "datasets" / "synth-64"
    sample = json.loads((dataset / "data.jsonl").read_text().splitlines()[0])
    return dataset / sample["image"], sample


def _upload(page, image: Path) -> None:
    """Upload into the drawing and wait for its default box (the centre quarter) to reach the number fields."""
    from PIL import Image

    with Image.open(image) as opened:
        width, height = opened.size
    page.locator("#inspect-drawing-area input[type=file]").first.set_input_files(image)
    expected = {"x0": width // 4, "y0": height // 4, "x1": width - width // 4, "y1": height - height // 4}
    for name, value in expected.items():
        page.wait_for_function(f"document.querySelector('#inspect-box-{name} input')?.value === '{value}'")
    page.locator("#inspect-annotator .vopd-surface img").wait_for()


def _box_fields(page) -> list[int]:
    return [int(page.locator(f"#inspect-box-{name} input").input_value()) for name in ("x0", "y0", "x1", "y1")]


def _wait_for_box(page, box: list[int], tolerance: int = 1) -> None:
    """Wait until the four fields hold ``box`` (to a pixel: the screen point of an enlarged pixel rounds either way)."""
    deadline = time.monotonic() + 10
    while True:
        values = [page.locator(f"#inspect-box-{name} input").input_value() for name in ("x0", "y0", "x1", "y1")]
        if all(v.lstrip("-").isdigit() for v in values) and all(
            abs(int(v) - b) <= tolerance for v, b in zip(values, box, strict=True)
        ):
            return
        assert time.monotonic() < deadline, f"the fields show {values}, not {box}"
        page.wait_for_timeout(100)


def _drag(page, start: tuple[float, float], end: tuple[float, float], steps: int = 12) -> None:
    """A hand-like drag with real mouse input: press, move in steps, release."""
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=steps)
    page.mouse.up()


def _set_box(page, box: list[float]) -> None:
    for name, value in zip(("x0", "y0", "x1", "y1"), box, strict=True):
        field = page.locator(f"#inspect-box-{name} input")
        field.fill(str(int(value)))
        field.press("Enter")


def open_tab(page, name: str) -> None:
    """Open a tab as a person does: from the tab bar, or, where the bar is too narrow for all six (a phone), from
    Gradio's "More tabs" menu."""
    tab = page.get_by_role("tab", name=name)
    if tab.count() and tab.is_visible():
        tab.click()
        return
    page.get_by_role("button", name="More tabs").click()
    page.locator(".overflow-dropdown button", has_text=name).click()
    page.get_by_role("tab", name=name, selected=True).wait_for()


def _toasts(page) -> list[str]:
    return [text for text in page.locator(".toast-body").all_inner_texts() if text.strip()]


def test_every_tab_opens_without_an_error_on_a_fresh_install(page, live_server: LiveServer) -> None:
    """First in this module, so before any job exists: every tab opens, each says what to do, and no notice shows
    (the Jobs tab used to raise "Value 0 is less than minimum value 1." and outline its job-id field in red)."""
    for tab in ("Inspect", "Train", "Jobs", "Evaluate", "Datasets", "Demo", "Jobs"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(1500)
        name = tab.lower()
        page.screenshot(path=ARTIFACTS / f"fresh-{name}-1280.png", full_page=True)
        if tab == "Jobs":
            page.locator("#jobs-header").get_by_text("No job selected").wait_for()
        if tab == "Evaluate":
            page.locator("#eval-note").get_by_text("No evaluation to show yet").wait_for()
    page.wait_for_timeout(4500)  # two polls of the Jobs tab's timer, one of the Evaluate tab's
    assert _toasts(page) == []
    assert page.locator("#jobs-job-id .error, #jobs-job-id input:invalid").count() == 0
    page.set_viewport_size(NARROW)
    page.wait_for_timeout(1500)
    assert _toasts(page) == []
    page.screenshot(path=ARTIFACTS / "fresh-jobs-420.png", full_page=True)


@pytest.mark.parametrize("viewport", [NARROW, WIDE], ids=["phone", "wide"])
def test_notices_leave_the_header_visible(page, live_server: LiveServer, viewport: dict) -> None:
    """Gradio's notices sat over the header (on a phone, all of it; wide, the account and Sign out)."""
    page.set_viewport_size(viewport)
    page.locator("#inspect-run").click()  # no image yet: an error notice
    toast = page.locator(".toast-body").first
    toast.wait_for()
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    notice, account = toast.bounding_box(), page.locator("#studio-signout").bounding_box()
    page.screenshot(path=ARTIFACTS / f"notice-{viewport['width']}.png")
    overlaps = not (
        notice["y"] >= account["y"] + account["height"]
        or account["y"] >= notice["y"] + notice["height"]
        or notice["x"] >= account["x"] + account["width"]
        or account["x"] >= notice["x"] + notice["width"]
    )
    assert not overlaps, (notice, account)


def test_inspect_shows_colored_tokens_and_topk_tables(page, live_server: LiveServer) -> None:
    image, sample = _first_sample(live_server)
    _upload(page, image)  # the upload gets a default box at once; then the typed box replaces it
    _set_box(page, sample["bbox"])
    page.locator("#inspect-question textarea").fill(sample["question"])
    page.locator("#inspect-options textarea").fill(", ".join(sample["options"]))
    page.locator("#inspect-run").click()

    tokens = page.locator("#inspect-strip .score-token")
    tokens.first.wait_for()

    def alphas() -> list[float]:
        styles = [tokens.nth(i).get_attribute("style") or "" for i in range(tokens.count())]
        painted = [re.search(r"rgba?\(239, 68, 60(?:, ([\d.]+))?\)", style) for style in styles]
        found = [float(match.group(1) or 1.0) for match in painted if match]  # the browser writes alpha 1 as rgb()
        assert len(found) == len(styles) > 0
        return found

    # The absolute scale by default (a fixed range in nats), and the details open on the most divergent token.
    absolute = alphas()
    page.locator("#inspect-token-details").get_by_text("most divergent").wait_for()
    page.get_by_text("relative to this answer", exact=True).click()
    page.wait_for_function(
        "[...document.querySelectorAll('#inspect-strip .score-token')].some((t) => /rgb\\(239, 68, 60\\)|"
        "rgba\\(239, 68, 60, 1\\)/.test(t.getAttribute('style') || ''))"
    )
    assert max(alphas()) == 1.0, "on the relative scale the most divergent token is painted at full strength"
    assert max(absolute) <= 1.0
    for table in ("#inspect-student-topk", "#inspect-teacher-topk"):  # top-k rows, then the tail mass
        page.locator(table).get_by_text("(tail)", exact=True).filter(visible=True).first.wait_for()
        page.locator(table).get_by_text("mass outside the top-k").filter(visible=True).first.wait_for()
    assert page.locator("#inspect-student-answer textarea").input_value() != ""

    tokens.nth(1).click()
    page.locator("#inspect-token-details").get_by_text("Position 1").wait_for()
    typed = [page.locator(f"#inspect-box-{name} input").input_value() for name in ("x0", "y0", "x1", "y1")]
    assert typed == [str(int(v)) for v in sample["bbox"]], "echoes of the drawing must not overwrite typing"
    _screenshots(page, "inspect")


def test_dragging_on_the_image_draws_moves_and_resizes_the_box(page, live_server: LiveServer) -> None:
    """The studio's central gesture, with the mouse: draw a box by dragging, move it by dragging inside it, resize it
    by a corner; a click alone leaves it as it is. The image (112 px) is shown enlarged; the fields hold pixels of the
    original image."""
    image, _ = _first_sample(live_server)
    _upload(page, image)
    surface = page.locator("#inspect-annotator .vopd-surface")
    rect = surface.bounding_box()
    assert rect["width"] >= 380, "a small image is shown enlarged"
    scale = rect["width"] / 112

    def at(x: float, y: float) -> tuple[float, float]:  # original pixel -> screen point
        return rect["x"] + x * scale, rect["y"] + y * scale

    _drag(page, at(10, 20), at(40, 60))
    _wait_for_box(page, [10, 20, 40, 60])
    page.screenshot(path=ARTIFACTS / "inspect-drawn-1280.png")
    drawn = _box_fields(page)
    page.mouse.click(*at(90, 90))  # a click is not a drag: the box stays
    page.wait_for_timeout(700)
    assert _box_fields(page) == drawn
    _drag(page, at(25, 40), at(55, 45))  # inside the box: move it by (+30, +5)
    _wait_for_box(page, [drawn[0] + 30, drawn[1] + 5, drawn[2] + 30, drawn[3] + 5])
    moved = _box_fields(page)
    _drag(page, at(moved[2], moved[3]), at(100, 90))  # the bottom-right corner handle: resize
    _wait_for_box(page, [moved[0], moved[1], 100, 90])
    final = _box_fields(page)
    assert final[:2] == moved[:2], "a resize keeps the opposite corner"
    box = page.locator("#inspect-annotator .vopd-box").bounding_box()
    assert abs(box["x"] - at(final[0], 0)[0]) < 4 and abs(box["width"] - (final[2] - final[0]) * scale) < 4
    page.locator("#inspect-question textarea").fill("What color is the small shape inside the box?")
    page.locator("#inspect-run").click()
    said = f"the given box, at [{', '.join(str(v) for v in final)}]"
    page.locator("#inspect-evidence").get_by_text(said).wait_for(timeout=60_000)
    _screenshots(page, "inspect-drag")


def test_inspect_without_a_box_draws_the_models_own_evidence(page, live_server: LiveServer) -> None:
    image, sample = _first_sample(live_server)
    _upload(page, image)
    page.locator("#inspect-find input").check()
    page.locator("#inspect-question textarea").fill(sample["question"])
    page.locator("#inspect-options textarea").fill(", ".join(sample["options"]))
    page.locator("#inspect-run").click()
    page.locator("#inspect-evidence").get_by_text("the model's own evidence crop").wait_for(timeout=120_000)
    evidence = page.locator("#inspect-annotator .vopd-evidence")
    evidence.wait_for()
    assert "confidence" in evidence.inner_text()
    assert page.locator("#inspect-annotator .vopd-box.hidden").count() == 1, "no red box: the model chose"
    _screenshots(page, "inspect-no-box")


def test_the_box_free_base_finds_the_black_target_without_a_box(page, live_server: LiveServer, tmp_path: Path) -> None:
    """The service's tiny-nobox model, a plain box-free item ("What shape is the black object?"): the search's crop,
    drawn on the image, holds the target, and the teacher answers right there."""
    from vopd.evidence import contains_centre
    from vopd.synth import SynthConfig, generate_dataset

    data = generate_dataset(tmp_path / "nobox", SynthConfig(n=1, seed=1, no_box=True))
    record = json.loads(data.read_text().splitlines()[0])
    _upload(page, data.parent / record["image"])
    page.locator("#inspect-find input").check()
    page.locator("#inspect-model input").click()
    page.get_by_role("option", name=re.compile(r"^tiny-nobox\b")).click()
    page.locator("#inspect-question textarea").fill(record["question"])
    page.locator("#inspect-options textarea").fill(", ".join(record["options"]))
    page.locator("#inspect-run").click()
    evidence = page.locator("#inspect-evidence")
    evidence.get_by_text("the model's own evidence crop").wait_for(timeout=120_000)
    chosen = [float(v) for v in re.search(r"at \[([^\]]+)\]", evidence.inner_text()).group(1).split(",")]
    assert contains_centre(tuple(chosen), tuple(record["hidden_bbox"])), (chosen, record["hidden_bbox"])
    letter = "ABCD"[record["options"].index(record["answer"])]
    teacher = page.locator("#inspect-teacher-answer textarea, #inspect-teacher-answer input").first
    page.wait_for_function(
        "document.querySelector('#inspect-teacher-answer textarea, #inspect-teacher-answer input')?.value !== ''"
    )
    assert teacher.input_value().startswith(f"{letter}."), teacher.input_value()
    _screenshots(page, "inspect-no-box-tiny-nobox")


def test_a_bad_box_is_reported_in_words(page, live_server: LiveServer) -> None:
    image, sample = _first_sample(live_server)
    _upload(page, image)
    _set_box(page, [50, 10, 20, 30])
    page.locator("#inspect-question textarea").fill(sample["question"])
    page.locator("#inspect-run").click()
    page.get_by_text("need x1 > x0 and y1 > y0").first.wait_for()
    page.screenshot(path=ARTIFACTS / "inspect-bad-box-1280.png")


def _submit_train_form(page, *, steps: int, batch_size: int, rollouts: int) -> None:
    """Fill the Train form's size fields (4-token rollouts keep a CPU job short) and submit the job."""
    page.get_by_role("tab", name="Train").click()
    fields = {
        "#train-steps input": steps,
        "#train-batch-size input": batch_size,
        "#train-rollout-max-new-tokens input": 4,
        "#train-rollout-num-rollouts input": rollouts,
    }
    for selector, value in fields.items():
        page.locator(selector).fill(str(value))
        page.locator(selector).press("Tab")
    page.wait_for_timeout(500)  # the CLI/REST preview follows the form
    page.locator("#train-submit").click()


def _job_once_the_header_says(page, live_server: LiveServer, status: str, *, timeout_ms: int) -> dict:
    """Wait until the open job's header shows ``status``; return that job as the REST API reports it."""
    header = page.locator("#jobs-header")
    header.get_by_text(status).wait_for(timeout=timeout_ms)
    job_id = int(re.search(r"Job (\d+)", header.inner_text()).group(1))
    key = live_server.local_api_key
    return httpx.get(f"{live_server.url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()


def test_a_tiny_training_job_runs_to_succeeded_with_live_curves(page, live_server: LiveServer) -> None:
    _submit_train_form(page, steps=2, batch_size=2, rollouts=2)

    job = _job_once_the_header_says(page, live_server, "succeeded", timeout_ms=150_000)
    assert job["status"] == "succeeded" and job["config"]["steps"] == 2 and job["config"]["batch_size"] == 2
    assert job["config"]["rollout"]["max_new_tokens"] == 4
    page.wait_for_function("(document.querySelector('#jobs-log textarea')?.value ?? '').includes('checkpoint saved')")
    # The next poll's table; Gradio also keeps an invisible copy of the rows for sizing columns.
    page.locator("#jobs-table").get_by_text("succeeded").filter(visible=True).first.wait_for(timeout=10_000)
    page.wait_for_timeout(2500)  # one more poll: the final curves
    page.screenshot(path=ARTIFACTS / "jobs-after-submit-1280.png", full_page=True)  # before any resize of ours
    # The legend names each series and is drawn inside the plot's box (a fixed plot height used to clip it).
    plot = page.locator("#jobs-divergence-plot")
    plot_box = plot.bounding_box()
    for name in ("divergence_mean", "divergence_max"):
        legend_box = plot.locator("svg text", has_text=name).first.bounding_box()
        assert legend_box is not None, name
        assert legend_box["y"] + legend_box["height"] <= plot_box["y"] + plot_box["height"], name
    _screenshots(page, "jobs")


def test_the_train_tabs_cli_command_runs_verbatim(page, live_server: LiveServer, tmp_path: Path) -> None:
    """Copy the Train tab's "Equivalent CLI command" as shown and run it in a shell on the server's VOPD_HOME: the
    registry names (tiny, synth-train) resolve, and every flag is spelled as the CLI spells it."""
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function("(document.querySelector('#train-model input')?.value ?? '') !== ''")
    fields = {"#train-steps input": 1, "#train-batch-size input": 2, "#train-rollout-max-new-tokens input": 4}
    for selector, value in fields.items():
        page.locator(selector).fill(str(value))
        page.locator(selector).press("Tab")
    with_tensorboard = importlib.util.find_spec("tensorboard") is not None  # an optional extra
    if with_tensorboard:
        page.locator("#train-report-to").get_by_label("tensorboard").check()
    page.wait_for_timeout(1000)
    command = page.locator("#train-cli .cm-content").inner_text().strip()
    page.screenshot(path=ARTIFACTS / "train-command-1280.png", full_page=True)
    output = re.match(
        re.escape('vopd train --model tiny --dataset synth-train --output "${VOPD_HOME:-$HOME/.vopd}"/runs/')
        + r"(studio-[0-9a-f]+) --steps 1 --batch-size 2 ",
        command,
    )
    assert output is not None, command
    assert ("--report-to tensorboard" in command) == with_tensorboard
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"VOPD_HOME": str(live_server.home), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    env |= {"OMP_NUM_THREADS": "1"}
    assert shlex.split(command)[0] == "vopd"
    done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = live_server.home / "runs" / output.group(1)
    assert (run / "final" / "config.json").is_file()
    assert bool(list((run / "tensorboard").glob("events.out.tfevents.*"))) == with_tensorboard
    # Written under VOPD_HOME/runs, the run's model is one the studio lists (GET /api/models, kind run).
    models = httpx.get(
        f"{live_server.url}/api/models", headers={"Authorization": f"Bearer {live_server.local_api_key}"}
    ).json()["items"]
    assert any(model["name"] == f"runs/{output.group(1)}/final" and model["kind"] == "run" for model in models)

    # Two devices: the command launches two processes and the request asks the service for them.
    page.locator("#train-gpus input").fill("2")
    page.locator("#train-gpus input").press("Tab")
    page.wait_for_function("document.querySelector('#train-cli .cm-content')?.innerText.includes('--nproc 2')")
    assert '"gpus": 2' in page.locator(".cm-content").nth(2).inner_text()


def test_cancel_then_resume_from_the_jobs_tab(page, live_server: LiveServer) -> None:
    """Click Cancel on a running job, then Resume: it stops with a checkpoint and finishes from it."""
    _submit_train_form(page, steps=150, batch_size=1, rollouts=1)

    _job_once_the_header_says(page, live_server, "running", timeout_ms=60_000)
    # A step done first, so there is a checkpoint to resume from (on busy shared cores, loading alone takes seconds).
    page.locator("#jobs-header").get_by_text(re.compile(r"step [1-9]\d*/150")).wait_for(timeout=60_000)
    page.locator("#jobs-cancel:not([disabled])").click()
    stopped = _job_once_the_header_says(page, live_server, "cancelled", timeout_ms=60_000)
    assert stopped["status"] == "cancelled" and 0 < stopped["step"] < 150, stopped

    page.locator("#jobs-resume:not([disabled])").click()
    finished = _job_once_the_header_says(page, live_server, "succeeded", timeout_ms=240_000)
    assert finished["id"] == stopped["id"], "Resume continues the same job"
    assert finished["status"] == "succeeded" and finished["step"] == 150
    page.wait_for_function("(document.querySelector('#jobs-log textarea')?.value ?? '').includes('resumed from')")


def test_evaluate_compares_accuracies_and_browses_items(page, live_server: LiveServer) -> None:
    page.get_by_role("tab", name="Evaluate").click()
    page.wait_for_function("(document.querySelector('#eval-dataset input')?.value ?? '') !== ''")
    limit = page.locator("#eval-limit input")
    limit.fill("4")
    limit.press("Tab")
    page.locator("#eval-engine input").click()  # the answer engine, asked for explicitly
    page.get_by_role("option", name="hf", exact=True).click()
    page.locator("#eval-run").click()
    table = page.locator("#eval-table")
    table.get_by_text("succeeded").filter(visible=True).first.wait_for(timeout=120_000)
    key = live_server.local_api_key
    evals = httpx.get(
        f"{live_server.url}/api/jobs", params={"kind": "eval"}, headers={"Authorization": f"Bearer {key}"}
    ).json()["items"]
    assert evals[0]["status"] == "succeeded" and evals[0]["result"]["n"] == 4
    assert evals[0]["config"]["engine"] == "hf" and evals[0]["engine"] == "hf"
    table.get_by_text("hf", exact=True).filter(visible=True).first.wait_for(timeout=15_000)  # the engine column
    # the finished job becomes the default of the per-item browser
    page.wait_for_function("(document.querySelector('#eval-items-job input')?.value ?? '').includes('succeeded')")
    page.locator("#eval-load-items").click()
    page.locator("#eval-items").get_by_text("syn-00002").filter(visible=True).first.click()
    page.locator("#eval-item-text").get_by_text("Teacher (crop)").wait_for()
    page.locator("#eval-item-student img").first.wait_for()
    _screenshots(page, "evaluate")


def test_evaluate_on_a_published_benchmark_shows_its_categories(page, live_server: LiveServer) -> None:
    """A V* Bench copy in the server's benchmarks folder, chosen in the Evaluate tab: per-category accuracy."""
    from tests.test_benchmarks import write_vstar

    write_vstar(live_server.home / "benchmarks" / "vstar")
    page.get_by_role("tab", name="Evaluate").click()
    page.wait_for_function("(document.querySelector('#eval-dataset input')?.value ?? '') !== ''")
    page.locator("#eval-benchmark input").click()
    page.get_by_role("option", name="vstar", exact=True).click()
    page.locator("#eval-benchmark-data textarea, #eval-benchmark-data input").first.fill("vstar")
    page.locator("#eval-run").click()
    categories = page.locator("#eval-categories")
    categories.get_by_text("overall").filter(visible=True).first.wait_for(timeout=120_000)
    key = live_server.local_api_key
    evals = httpx.get(
        f"{live_server.url}/api/jobs", params={"kind": "eval"}, headers={"Authorization": f"Bearer {key}"}
    ).json()["items"]
    job = evals[0]
    assert job["status"] == "succeeded" and job["config"]["benchmark"] == "vstar", job
    for category in job["result"]["categories"]:
        categories.get_by_text(category).filter(visible=True).first.wait_for()
    _screenshots(page, "evaluate-benchmark")


def test_demo_answers_a_question_about_a_plain_image(page, live_server: LiveServer) -> None:
    """The sample question is already there and names no box; the answer is an option's text, and the image below it
    shows where the model looked."""
    image, _ = _first_sample(live_server)
    page.get_by_role("tab", name="Demo").click()
    page.wait_for_function("(document.querySelector('#demo-model input')?.value ?? '') !== ''")
    question = page.locator("#demo-question textarea").input_value()
    assert question and "box" not in question.lower()
    page.locator("#demo-image input[type=file]").set_input_files(image)
    page.locator("#demo-image img").first.wait_for()
    # The upload's preview is served from Gradio's shared cache, to the account that uploaded it only: it loads.
    page.wait_for_function("(document.querySelector('#demo-image img')?.naturalWidth ?? 0) > 0")
    page.locator("#demo-ask").click()
    page.wait_for_function("(document.querySelector('#demo-answer textarea')?.value ?? '') !== ''", timeout=60_000)
    answer = page.locator("#demo-answer textarea").input_value()
    assert re.fullmatch(r"[A-D]\. (circle|square|triangle|diamond)", answer), answer  # the default options
    page.locator("#demo-looked-caption").get_by_text("the model's own evidence crop").wait_for()
    page.locator("#demo-looked img").first.wait_for()
    page.wait_for_function("(document.querySelector('#demo-looked img')?.naturalWidth ?? 0) > 0")  # an output, too
    looked = page.evaluate("document.querySelector('#demo-looked img').src")
    assert "/ui/gradio_api/file=" in looked, looked
    # Another account, signed in with its own key, is refused that file (the cache is shared, its reads are not).
    other = httpx.post(
        f"{live_server.url}/api/keys",
        json={"name": "other"},
        headers={"Authorization": f"Bearer {live_server.local_api_key}"},
    ).json()["key"]
    theirs = httpx.get(looked, headers={"Authorization": f"Bearer {other}"})
    assert theirs.status_code == 403, theirs.status_code
    page.wait_for_timeout(500)
    _screenshots(page, "demo")


def test_sign_in_page_then_the_studio_then_sign_out(browser, live_server: LiveServer) -> None:
    """No key: the sign-in page; a wrong key: said so; the right key: the studio, naming who is signed in;
    Sign out: the sign-in page again, and the studio stays closed."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(f"{live_server.url}/ui/", wait_until="load")
        page.wait_for_selector("#signin-key")
        assert page.url.startswith(f"{live_server.url}/signin"), page.url
        assert page.locator("#inspect-run").count() == 0
        _screenshots(page, "signin")

        page.locator("#signin-key").fill("vopd_not-a-key")
        page.locator("#signin-submit").click()
        page.locator("#signin-error").get_by_text("unknown or revoked").wait_for()
        page.screenshot(path=ARTIFACTS / "signin-wrong-key-1280.png", full_page=True)

        page.locator("#signin-key").fill(live_server.local_api_key)
        page.locator("#signin-submit").click()
        page.wait_for_selector("#inspect-run")
        assert page.url.rstrip("/") == f"{live_server.url}/ui"
        account = page.locator("#studio-account")
        account.get_by_text("Signed in as").wait_for()
        assert "local" in account.inner_text() and "admin" in account.inner_text()
        page.wait_for_function("(document.querySelector('#inspect-model input')?.value ?? '') !== ''")
        cookie = next(c for c in context.cookies() if c["name"] == "vopd_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
        assert cookie["value"].startswith("vopds_") and live_server.local_api_key not in cookie["value"]
        assert page.evaluate("document.cookie").find("vopd_session") == -1, "scripts cannot read the session"
        _screenshots(page, "signed-in")

        page.locator("#studio-signout").click()  # a page that asks; its button signs out
        page.wait_for_selector("#signout-submit")
        page.screenshot(path=ARTIFACTS / "signout-confirm-1280.png", full_page=True)
        page.locator("#signout-submit").click()
        page.wait_for_selector("#signin-key")
        page.locator("#signin-note").get_by_text("Signed out").wait_for()
        assert not [c for c in context.cookies() if c["name"] == "vopd_session"]
        ended = httpx.get(f"{live_server.url}/api/me", headers={"Authorization": f"Bearer {cookie['value']}"})
        assert ended.status_code == 401, "sign-out ended the session on the server"
        page.screenshot(path=ARTIFACTS / "signed-out-1280.png", full_page=True)
        page.goto(f"{live_server.url}/ui/", wait_until="load")
        page.wait_for_selector("#signin-key")
        assert page.url.startswith(f"{live_server.url}/signin")
    finally:
        context.close()


def test_the_printed_link_asks_once_then_signs_in_and_is_spent(browser, live_server: LiveServer) -> None:
    """The link `vopd serve` prints carries a one-time code, never the key; opening it shows a button (so a link on
    another site cannot sign a visitor in), the button signs in, and the link is spent."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    link = live_server.signin_link
    assert live_server.local_api_key not in live_server.log.read_text(), "the key is in no line serve wrote"
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(link, wait_until="load")
        page.wait_for_selector("#signin-code-submit")
        assert not [c for c in context.cookies() if c["name"] == "vopd_session"], "a GET alone signs nobody in"
        _screenshots(page, "signin-link")
        page.locator("#signin-code-submit").click()
        page.wait_for_selector("#inspect-run")
        page.locator("#studio-account").get_by_text("Signed in as").wait_for()
    finally:
        context.close()
    again = browser.new_context(viewport=WIDE)
    page = again.new_page()
    try:
        page.goto(link, wait_until="load")
        page.locator("#signin-code-submit").click()
        page.locator("#signin-error").get_by_text("already used").wait_for()
    finally:
        again.close()
