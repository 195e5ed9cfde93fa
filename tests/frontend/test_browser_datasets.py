# ruff: noqa: F811  (test_browser's fixtures are imported by name and taken as arguments)
"""Datasets from the browser: upload a zip, see it by name everywhere, preview it, read the server's reasons for a
bad file, make a synthetic set, and find a model trained with the CLI under VOPD_HOME/runs in the model lists.

Its own ``vopd serve`` with small first-start sets (the datasets' sizes are not what is tested here); the browser and
the signed-in page are test_browser's (every page error fails the test: tests/frontend/conftest.py)."""

from __future__ import annotations

import io
import json
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.frontend.test_browser import (  # noqa: F401  (fixtures, found by name)
    ARTIFACTS,
    LiveServer,
    _screenshots,
    browser,
    page,
    serving,
)

pytestmark = pytest.mark.browser

CLI_RUN = "runs/cli-demo/final"


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server whose first start builds small sets, with a model trained from the CLI under VOPD_HOME/runs (what
    `vopd train --output $VOPD_HOME/runs/cli-demo` leaves: final/ holding a model)."""
    home = tmp_path_factory.mktemp("vopd-home-datasets")
    with serving(home, {"VOPD_DEMO_TRAIN_ITEMS": "48", "VOPD_HELD_OUT_ITEMS": "24"}) as server:
        shutil.copytree(home / "models" / "tiny", home / CLI_RUN)
        yield server


def _png(color: tuple[int, int, int], size: int = 96) -> bytes:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    image.paste(Image.new("RGB", (24, 24), color), (36, 36))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(path: Path, lines: list[str], images: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("street-signs/data.jsonl", "\n".join(lines) + "\n")
        for name, data in images.items():
            archive.writestr(f"street-signs/{name}", data)
    return path


def _record(index: int, color: str) -> str:
    return json.dumps(
        {
            "id": f"sign-{index}",
            "image": f"images/{index}.png",
            "question": "What color is the square inside the box?",
            "options": ["red", "green", "blue"],
            "answer": color,
            "bbox": [30, 30, 66, 66],
        }
    )


def _options(page, field: str) -> list[str]:
    """The choices of a dropdown as a person sees them: click it open, read the list (a screenshot of it open),
    close it."""
    page.locator(f"#{field} input").click()
    listed = page.get_by_role("option")
    listed.first.wait_for()
    page.screenshot(path=ARTIFACTS / f"datasets-list-{field}-1280.png")
    names = [" ".join(text.replace("✓", "").split()) for text in listed.all_inner_texts()]  # as rendered
    page.keyboard.press("Escape")
    return names


def test_upload_preview_and_synthesize_then_every_list_shows_names(
    page, live_server: LiveServer, tmp_path: Path
) -> None:
    colors = {"red": (215, 35, 35), "green": (40, 160, 60), "blue": (40, 80, 215)}
    good = _zip(
        tmp_path / "street-signs.zip",
        [_record(i, color) for i, color in enumerate(colors)],
        {f"images/{i}.png": _png(rgb) for i, rgb in enumerate(colors.values())},
    )
    page.get_by_role("tab", name="Datasets").click()
    page.locator("#datasets-table").get_by_text("synth-64").first.wait_for()
    # Opening the tab previews the set it offers first, so the preview is never an empty frame.
    page.locator("#datasets-preview-text").get_by_text("samples 0-5 of 48").wait_for()

    # A bad file first: the server's own words, every issue on its line.
    bad_lines = [_record(0, "red"), "{not json", _record(2, "purple").replace("[30, 30, 66, 66]", "[1, 2]")]
    bad = _zip(tmp_path / "broken.zip", bad_lines, {"images/0.png": _png((1, 2, 3)), "images/2.png": _png((3, 2, 1))})
    key = {"Authorization": f"Bearer {live_server.local_api_key}"}
    with httpx.Client(base_url=live_server.url, headers=key) as api:
        refused = api.post("/api/datasets", files={"file": ("broken.zip", bad.read_bytes())})
    assert refused.status_code == 422
    page.locator("#datasets-file input[type=file]").set_input_files(bad)
    page.locator("#datasets-upload").click()
    status = page.locator("#datasets-status")
    status.get_by_text("The server refused the dataset").wait_for()
    shown = status.inner_text()
    assert refused.json()["detail"] in shown
    for issue in refused.json()["issues"]:
        assert f"line {issue['line']}: {issue['field']}: {issue['message']}" in shown, (issue, shown)
    page.locator("#datasets-file button[aria-label='Clear']").first.click()
    _screenshots(page, "datasets-rejected")

    # The good zip: listed by the file's name, previewed at once with its boxes.
    page.locator("#datasets-file input[type=file]").set_input_files(good)
    page.locator("#datasets-upload").click()
    status.get_by_text("Uploaded street-signs").wait_for(timeout=60_000)
    page.locator("#datasets-table").get_by_text("street-signs", exact=True).wait_for()
    page.wait_for_function(
        "(document.querySelector('#datasets-preview-dataset input')?.value ?? '').startsWith('street-signs')"
    )
    gallery = page.locator("#datasets-gallery")
    page.wait_for_function("document.querySelectorAll('#datasets-gallery img').length >= 3")
    preview = page.locator("#datasets-preview-text")
    preview.get_by_text("sign-2").wait_for()
    assert "red, green, blue" in preview.inner_text() and "[30, 30, 66, 66]" in preview.inner_text()
    _screenshots(page, "datasets-uploaded")

    # A synthetic set without a box, made by mouse and keyboard.
    size = page.locator("#datasets-synth-n input")
    size.fill("12")
    seed = page.locator("#datasets-synth-seed input")
    seed.fill("4")
    page.locator("#datasets-synth-world").get_by_text("No box").click()
    page.locator("#datasets-synth").click()
    made = "Synthetic set (12 items, seed 4, no box)"
    status.get_by_text(f"Made {made}").wait_for(timeout=60_000)
    page.locator("#datasets-table").get_by_text(made).wait_for()
    page.wait_for_function(
        f"(document.querySelector('#datasets-preview-dataset input')?.value ?? '').startsWith({json.dumps(made)})"
    )
    preview.get_by_text("What shape is the black object?").first.wait_for()
    assert "hidden" in preview.inner_text()
    gallery.locator("img").first.wait_for()
    _screenshots(page, "datasets-synthetic")
    page.locator("#datasets-table").get_by_text("street-signs", exact=True).click()  # a row previews its set
    preview.get_by_text("sign-2").wait_for()

    # Every tab's dataset list names them (no bare ids), at once; the CLI run is offered as a model.
    for tab, field in (("Train", "train-dataset"), ("Evaluate", "eval-dataset"), ("Inspect", "inspect-dataset")):
        page.get_by_role("tab", name=tab).click()
        if tab == "Inspect":
            page.get_by_label("Dataset sample").check()  # the sample row, and its dataset list, show
        choices = _options(page, field)
        assert "street-signs (3 samples)" in choices and made in choices, (tab, choices)
        assert not [choice for choice in choices if re.search(r"\bds-[0-9a-f]{10}\b", choice)], choices
    page.get_by_role("tab", name="Train").click()
    assert f"{CLI_RUN} (CLI run)" in _options(page, "train-model")
    page.get_by_role("tab", name="Inspect").click()
    assert f"{CLI_RUN} (CLI run)" in _options(page, "inspect-model")
    page.screenshot(path=ARTIFACTS / "datasets-inspect-lists-1280.png", full_page=True)
