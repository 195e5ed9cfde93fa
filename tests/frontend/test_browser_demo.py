# ruff: noqa: F811  (test_browser's fixtures are imported by name and taken as arguments)
"""The Demo's examples and its side-by-side answers, with real mouse clicks in Chromium against `vopd serve`."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.frontend.test_browser import (  # noqa: F401  (fixtures)
    LiveServer,
    _screenshots,
    browser,
    live_server,
    page,
)

pytestmark = pytest.mark.browser


def _train_a_tiny_model(live_server: LiveServer) -> str:
    """A two-step training of the box world's base over the API: a trained model of `tiny` exists afterwards."""
    headers = {"Authorization": f"Bearer {live_server.local_api_key}"}
    config = {
        "model": "tiny",
        "dataset": "synth-64",
        "steps": 2,
        "batch_size": 2,
        "lr": 1e-4,
        "save_every": 100,
        "rollout": {"num_rollouts": 1, "max_new_tokens": 4},
    }
    job = httpx.post(f"{live_server.url}/api/jobs", headers=headers, json={"kind": "train", "config": config}).json()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = httpx.get(f"{live_server.url}/api/jobs/{job['id']}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    assert job["status"] == "succeeded", job
    return job["result"]["model"]


def _value(page, selector: str) -> str:
    return page.locator(selector).first.input_value()


def test_demo_examples_fill_the_inputs_and_base_and_trained_answer_side_by_side(page, live_server: LiveServer) -> None:
    page.get_by_role("tab", name="Demo").click()
    thumbnails = page.locator("#demo-examples img")
    thumbnails.nth(5).wait_for()

    # A box-free example: its question, no box, the box-free base; no trained model of it, so one answer panel.
    thumbnails.nth(3).click()
    page.wait_for_function("(document.querySelector('#demo-model input')?.value ?? '').includes('tiny-nobox')")
    page.wait_for_function("(document.querySelector('#demo-question textarea')?.value ?? '').includes('black')")
    assert _value(page, "#demo-box input, #demo-box textarea") == ""
    page.wait_for_function("(document.querySelector('#demo-image img')?.naturalWidth ?? 0) > 0")
    page.locator("#demo-ask").click()
    page.wait_for_function("(document.querySelector('#demo-answer textarea')?.value ?? '') !== ''", timeout=120_000)
    assert re.fullmatch(r"[A-D]\. (circle|square|triangle|diamond)", _value(page, "#demo-answer textarea"))
    page.locator("#demo-base-title").get_by_text("tiny-nobox").wait_for()
    assert re.search(r"✓ right|✗ the right answer is", page.locator("#demo-base-title").inner_text())
    assert not page.locator("#demo-trained-answer").is_visible()
    _screenshots(page, "demo-example-nobox")

    # Once a trained model of the box world's base exists, a box example asks base and trained side by side.
    trained = _train_a_tiny_model(live_server)
    page.get_by_role("tab", name="Inspect").click()
    page.get_by_role("tab", name="Demo").click()  # the tab refreshes its model lists when shown
    thumbnails.nth(0).click()
    page.wait_for_function(
        "(document.querySelector('#demo-box input, #demo-box textarea')?.value ?? '') === '13, 31, 37, 55'"
    )
    page.wait_for_function(r"/^tiny(\s|$)/.test(document.querySelector('#demo-model input')?.value ?? '')")
    page.wait_for_function(f"(document.querySelector('#demo-trained input')?.value ?? '').includes('{trained}')")
    page.wait_for_function("(document.querySelector('#demo-question textarea')?.value ?? '').includes('color')")
    page.locator("#demo-ask").click()
    page.locator("#demo-trained-answer").wait_for(state="visible", timeout=120_000)
    page.wait_for_function(
        "(document.querySelector('#demo-trained-answer textarea')?.value ?? '') !== ''", timeout=120_000
    )
    assert re.fullmatch(r"[A-D]\. (red|green|blue|yellow)", _value(page, "#demo-answer textarea"))
    assert re.fullmatch(r"[A-D]\. (red|green|blue|yellow)", _value(page, "#demo-trained-answer textarea"))
    page.locator("#demo-trained-title").get_by_text(trained).wait_for()
    # The example's model held: the tab's own refresh of the choices, made before the click, did not undo it.
    assert page.evaluate("document.querySelector('#demo-base-title code').textContent") == "tiny"
    assert re.match(r"tiny(\s|$)", _value(page, "#demo-model input"))
    page.locator("#demo-looked-caption").get_by_text("13, 31, 37, 55").wait_for()  # the given box, drawn
    # Where each looked is a finished file Gradio copied once (Gradio's own PIL outputs, image.webp, were rewritten
    # in place on every event: a browser re-reading one got a body shorter than its Content-Length).
    for selector in ("#demo-looked img", "#demo-trained-looked img"):
        source = page.evaluate(f"document.querySelector('{selector}').src")
        assert re.search(r"/[0-9a-f]{32}\.png$", source), source
    page.wait_for_timeout(500)
    _screenshots(page, "demo-side-by-side")
