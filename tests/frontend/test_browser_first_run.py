# ruff: noqa: F811  (test_browser's fixtures are imported by name and taken as arguments)
"""A newcomer's first hour in a real browser: the default run and sets, base vs trained on held-out data, charts
that tell the truth. Reuses test_browser's server, browser and signed-in page (every page error fails the test:
tests/frontend/conftest.py)."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.frontend.test_browser import (  # noqa: F401  (fixtures, found by name)
    ARTIFACTS,
    LiveServer,
    _screenshots,
    _toasts,
    browser,
    live_server,
    open_tab,
    page,
)

pytestmark = pytest.mark.browser


def _api(live_server: LiveServer) -> httpx.Client:
    return httpx.Client(
        base_url=live_server.url, headers={"Authorization": f"Bearer {live_server.local_api_key}"}, timeout=30
    )


def _wait_job(api: httpx.Client, job_id: int, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = api.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']}")


def _bars(page) -> int:
    return page.locator("#eval-chart svg path[aria-roledescription='bar']").count()


def test_train_and_evaluate_open_on_the_first_runs_sets(page, live_server: LiveServer) -> None:
    """Train: the recipe that shows a gain, on the training set; Evaluate: the held-out set."""
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function("(document.querySelector('#train-dataset input')?.value ?? '') !== ''")
    assert "Synthetic training set" in page.locator("#train-dataset input").input_value()  # by name, not id
    assert "Tiny world" in page.locator("input[aria-label='Preset']").first.input_value()
    # The preview follows the choices the server makes on load (it read "Choose a dataset." beside a dataset).
    shown = "(document.querySelector('#train-cli')?.innerText ?? '')"
    head = json.dumps('--dataset synth-train --output "${VOPD_HOME:-$HOME/.vopd}"/runs/studio-')
    page.wait_for_function(f"{shown}.includes({head}) && {shown}.includes(' --steps 300 --batch-size 16')")
    page.get_by_role("tab", name="Evaluate").click()
    page.wait_for_function(
        "(document.querySelector('#eval-dataset input')?.value ?? '').includes('Held-out synthetic set')"
    )
    _screenshots(page, "first-run-evaluate-defaults")


def test_evaluate_chart_follows_finished_evaluations_without_pressing_compare(page, live_server: LiveServer) -> None:
    """Two runs one after the other: each finished evaluation's bars appear by the timer alone, and the plot throws
    no page error on the way (the fixture fails the test on one)."""
    page.get_by_role("tab", name="Evaluate").click()
    page.wait_for_function("(document.querySelector('#eval-dataset input')?.value ?? '') !== ''")
    limit = page.locator("#eval-limit input")
    limit.fill("4")
    limit.press("Tab")
    table = page.locator("#eval-table")
    with _api(live_server) as api:
        for run in range(2):
            before = api.get("/api/jobs", params={"kind": "eval"}).json()["total"]
            page.locator("#eval-run").click()
            deadline = time.monotonic() + 30
            while api.get("/api/jobs", params={"kind": "eval"}).json()["total"] == before:
                assert time.monotonic() < deadline, "no evaluation was submitted"
                time.sleep(0.3)
            newest = api.get("/api/jobs", params={"kind": "eval"}).json()["items"][0]
            assert _wait_job(api, newest["id"])["status"] == "succeeded"
            # The bars of the evaluation just finished, by the timer alone (no Compare pressed).
            page.locator("#eval-chart svg text", has_text=f"(#{newest['id']})").first.wait_for(timeout=15_000)
            table.get_by_text("succeeded").filter(visible=True).first.wait_for(timeout=15_000)
            assert _bars(page) == 2, f"run {run}: {_bars(page)} bars"
    assert not [toast for toast in _toasts(page) if "Error" in toast]
    _screenshots(page, "first-run-evaluate-chart")


def test_job_page_compares_base_and_trained_on_held_out_data(page, live_server: LiveServer) -> None:
    """A finished training job offers base vs trained on the held-out set; both show, with the gain, and the
    accuracy plot draws each dataset's measurements (the base at step 0) as a series of its own."""
    with _api(live_server) as api:
        job = api.post(
            "/api/jobs",
            json={
                "kind": "train",
                "recipe": "tiny-world",
                "config": {"model": "tiny", "dataset": "synth-train", "steps": 2, "batch_size": 2, "save_every": 2},
            },
        ).json()
        assert _wait_job(api, job["id"])["status"] == "succeeded"
    page.get_by_role("tab", name="Jobs").click()
    field = page.locator("#jobs-job-id input")
    field.fill(str(job["id"]))
    field.press("Enter")
    page.locator("#jobs-base-vs-trained").get_by_text("Compare base vs trained").first.wait_for()
    page.locator("#jobs-compare-base").click()
    comparison = page.locator("#jobs-base-vs-trained")
    comparison.get_by_text("points").wait_for(timeout=180_000)
    text = comparison.inner_text()
    assert "Held-out synthetic set" in text and "job-" in text and "tiny" in text
    plot = page.locator("#jobs-accuracy-plot")
    plot.locator("svg text", has_text="full image · Held-out synthetic set").first.wait_for(timeout=10_000)
    assert plot.locator("svg path[aria-roledescription='line mark'], svg path[aria-roledescription='point']").count()
    _screenshots(page, "first-run-base-vs-trained")
    page.screenshot(path=ARTIFACTS / "first-run-base-vs-trained-last.png", full_page=True)


# Each header's words, and on how many lines its text is laid out (the text nodes' line boxes; icons not counted).
_HEADER_LINES = """(selector) => [...document.querySelectorAll(selector + ' thead th')].map((th) => {
  const walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
  const tops = new Set();
  let text = '';
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!node.textContent.trim() || node.parentElement.closest('button')) continue;  // the column menu's icon
    text += node.textContent;
    const range = document.createRange();
    range.selectNodeContents(node);
    for (const rect of range.getClientRects()) if (rect.width > 0) tops.add(Math.round(rect.top));
  }
  return [text.trim(), tops.size];
}).filter(([text]) => text)"""


def test_narrow_tables_keep_each_header_word_whole(page, live_server: LiveServer) -> None:
    """At 420 px the jobs table's headers broke letter by letter ("progr/ess"): a one-word header stays on one
    line, a longer one wraps between words only (the table scrolls inside itself instead)."""
    with _api(live_server) as api:  # a row in both tables
        job = api.post(
            "/api/jobs", json={"kind": "eval", "config": {"model": "tiny", "dataset": "synth-heldout", "limit": 2}}
        ).json()
        assert _wait_job(api, job["id"])["status"] == "succeeded"
    page.set_viewport_size({"width": 420, "height": 800})
    open_tab(page, "Jobs")
    page.locator("#jobs-table").get_by_text("succeeded").filter(visible=True).first.wait_for(timeout=30_000)
    for selector in ("#jobs-table", "#eval-table"):
        if selector == "#eval-table":
            open_tab(page, "Evaluate")  # on a phone, in the "More tabs" menu
            page.locator("#eval-jobs input").click()
            page.get_by_role("option").first.click()
            page.locator("#eval-table").get_by_text("succeeded").filter(visible=True).first.wait_for(timeout=15_000)
        headers = page.evaluate(_HEADER_LINES, selector)
        assert headers, selector
        for text, lines in headers:
            words = re.split(r"[\s-]+", text.replace("⋮", "").strip())  # a hyphen is a place to wrap too
            assert lines <= len(words), f"{selector}: header {text!r} on {lines} lines"
    page.screenshot(path=ARTIFACTS / "first-run-narrow-tables-420.png", full_page=True)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 2, f"the page scrolls sideways by {overflow}px at 420 px"


def test_the_demo_asks_the_box_free_base_a_question_with_one_answer(page, live_server: LiveServer, tmp_path) -> None:
    """The Demo opens on the box-free world's base and its question (the only black object's shape), and answers a
    box-free picture with one of the shapes."""
    import json

    from vopd.synth import SHAPE_OPTIONS, SynthConfig, generate_dataset

    generate_dataset(tmp_path / "nobox", SynthConfig(n=1, seed=5, no_box=True))
    item = json.loads((tmp_path / "nobox" / "data.jsonl").read_text().splitlines()[0])
    page.get_by_role("tab", name="Demo").click()
    page.wait_for_function("(document.querySelector('#demo-model input')?.value ?? '').includes('tiny-nobox')")
    assert page.locator("#demo-question textarea").input_value() == item["question"]
    page.locator("#demo-image input[type=file]").set_input_files(tmp_path / "nobox" / item["image"])
    page.locator("#demo-image img").first.wait_for()
    # The width of the picture as drawn inside its element (Gradio's object-fit scale-down kept it at 112 px).
    drawn = page.evaluate(
        "Math.max(...[...document.querySelectorAll('#demo-image img')].filter((i) => i.naturalWidth).map((i) => {"
        " const r = i.getBoundingClientRect(), fit = getComputedStyle(i).objectFit;"
        " const scale = Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight);"
        " return i.naturalWidth * (fit === 'scale-down' || fit === 'none' ? Math.min(1, scale) : scale); }))"
    )
    assert drawn >= 224, f"the 112 px picture is drawn {drawn} px wide"
    page.locator("#demo-ask").click()
    page.wait_for_function("(document.querySelector('#demo-answer textarea')?.value ?? '') !== ''", timeout=60_000)
    answer = page.locator("#demo-answer textarea").input_value()
    assert any(shape in answer for shape in SHAPE_OPTIONS), answer
    _screenshots(page, "first-run-demo")
