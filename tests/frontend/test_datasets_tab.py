"""The Datasets tab's callbacks against a fake API, and names instead of ids wherever the studio shows a dataset."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from frontend import render, strings
from frontend.client import ApiError, Dataset, Job, ModelInfo
from frontend.context import dataset_choices, model_choices
from frontend.tabs import datasets, evaluate, jobs
from tests.frontend.conftest import FakeApi, job_json


def dataset_json(dataset_id: str = "ds-6eafe25355", name: str = "street signs", **overrides: Any) -> dict[str, Any]:
    """A DatasetOut as the server dumps it."""
    from app.schemas import DatasetOut

    body = {
        "id": dataset_id,
        "name": name,
        "n_samples": 3,
        "size_bytes": 2048,
        "shared": False,
        "created_at": "2026-01-01T00:00:00Z",
    }
    body.update(overrides)
    return DatasetOut.model_validate(body).model_dump(mode="json")


def _thumbnail(width: int = 56, height: int = 56) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (250, 250, 250)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def sample_json(index: int, **overrides: Any) -> dict[str, Any]:
    from app.schemas import SampleOut

    body = {
        "index": index,
        "id": f"syn-{index:05d}",
        "question": "What color is the small shape inside the box?",
        "options": ["red", "green", "blue", "yellow"],
        "answer": "green",
        "bbox": [40, 52, 64, 76],
        "width": 112,
        "height": 112,
        "student_text": "",
        "teacher_text": "",
        "student_image": _thumbnail(),
        "teacher_image": _thumbnail(),
        "evidence": "box",
    }
    body.update(overrides)
    return SampleOut.model_validate(body).model_dump(mode="json")


def _multipart(request: httpx.Request) -> bytes:
    return request.read()


# ----------------------------------------------------------------------------- upload
def test_an_upload_sends_the_file_and_its_name_and_says_what_was_stored(api: FakeApi, tmp_path: Path) -> None:
    api.routes["POST /api/datasets"] = httpx.Response(201, json=dataset_json(name="my signs", n_samples=1234))
    picked = tmp_path / "signs.zip"
    picked.write_bytes(b"PK-not-really")
    dataset, message = datasets.upload(api.client(), [str(picked)], "my signs", tmp_path / "scratch")
    assert dataset is not None and dataset.name == "my signs"
    assert "**my signs**" in message and "1,234 samples" in message and "2.0 KB" in message
    body = _multipart(api.requests[0])
    assert b'filename="signs.zip"' in body and b'name="name"' in body and b"my signs" in body


def test_a_rejected_dataset_shows_the_apis_message_and_every_issue(api: FakeApi, tmp_path: Path) -> None:
    """The 422 body of POST /api/datasets, shown in the API's own words: its detail, then one line per issue."""
    issues = [{"line": n, "field": "bbox", "message": f"must hold 4 numbers, got 2 (line {n})"} for n in range(2, 60)]
    issues.insert(0, {"line": 1, "field": "json", "message": "invalid JSON (Expecting value)"})
    rejected = {"detail": f"{len(issues)} problem(s) in the dataset; nothing was stored", "issues": issues}
    api.routes["POST /api/datasets"] = httpx.Response(422, json=rejected)
    picked = tmp_path / "bad.jsonl"
    picked.write_text("{not json\n")
    dataset, message = datasets.upload(api.client(), str(picked), None, tmp_path / "scratch")
    assert dataset is None
    assert "59 problem(s) in the dataset; nothing was stored" in message
    assert "- line 1: json: invalid JSON (Expecting value)" in message
    assert "- line 2: bbox: must hold 4 numbers, got 2 (line 2)" in message
    assert "line 51: bbox" not in message and "… and 9 more." in message  # 50 shown, the rest counted


def test_a_lone_jsonl_whose_images_are_missing_says_to_pick_them_too(api: FakeApi, tmp_path: Path) -> None:
    issue = {"line": 1, "field": "image", "message": "image file not found: images/0.png"}
    rejected = {"detail": "1 problem(s) in the dataset; nothing was stored", "issues": [issue]}
    api.routes["POST /api/datasets"] = httpx.Response(422, json=rejected)
    picked = tmp_path / "data.jsonl"
    picked.write_text(json.dumps({"image": "images/0.png", "question": "q"}) + "\n")
    _, message = datasets.upload(api.client(), [str(picked)], None, tmp_path / "scratch")
    assert "- line 1: image: image file not found: images/0.png" in message
    assert strings.UPLOAD_IMAGES_HINT in message
    archive = tmp_path / "set.zip"
    archive.write_bytes(b"zip")
    _, message = datasets.upload(api.client(), [str(archive)], None, tmp_path / "scratch")
    assert strings.UPLOAD_IMAGES_HINT not in message  # a zip holds its images: the lines are wrong, not the pick


def test_a_refusal_before_validation_shows_its_detail(api: FakeApi, tmp_path: Path) -> None:
    api.routes["POST /api/datasets"] = httpx.Response(
        422, json={"detail": "unsupported upload 'notes.txt': send a .zip (data.jsonl + images)"}
    )
    picked = tmp_path / "notes.txt"
    picked.write_text("hello")
    dataset, message = datasets.upload(api.client(), [str(picked)], None, tmp_path)
    assert dataset is None and "unsupported upload &#x27;notes.txt&#x27;: send a .zip" in message
    api.routes["POST /api/datasets"] = httpx.Response(401, json={"detail": "unknown key"})
    with pytest.raises(ApiError, match="not authorised"):  # not a dataset problem: the usual error toast
        datasets.upload(api.client(), [str(picked)], None, tmp_path)


def test_a_jsonl_with_its_images_is_sent_as_one_zip_with_the_images_where_the_lines_name_them(
    api: FakeApi, tmp_path: Path
) -> None:
    api.routes["POST /api/datasets"] = httpx.Response(201, json=dataset_json(name="colours"))
    jsonl = tmp_path / "colours.jsonl"
    jsonl.write_text(
        json.dumps({"image": "images/a.png", "question": "q"}) + "\n" + json.dumps({"image": "b.png", "question": "q"})
    )
    for name in ("a.png", "b.png", "extra.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    picked = [str(jsonl), str(tmp_path / "a.png"), str(tmp_path / "b.png"), str(tmp_path / "extra.png")]
    datasets.upload(api.client(), picked, None, tmp_path / "scratch")
    body = _multipart(api.requests[0])
    assert b'filename="colours.zip"' in body  # the default name is the .jsonl's
    start = body.index(b"PK\x03\x04")
    with zipfile.ZipFile(io.BytesIO(body[start:])) as archive:
        assert sorted(archive.namelist()) == ["b.png", "data.jsonl", "extra.png", "images/a.png"]
        assert archive.read("data.jsonl") == jsonl.read_bytes()


@pytest.mark.parametrize(
    "names", [[], ["a.png", "b.png"], ["one.jsonl", "two.jsonl"], ["data.jsonl", "notes.txt"], ["x.zip", "y.png"]]
)
def test_picks_that_make_no_dataset_are_refused_before_sending(api: FakeApi, tmp_path: Path, names: list) -> None:
    for name in names:
        (tmp_path / name).write_text("x")
    with pytest.raises(render.UiInputError):
        datasets.upload(api.client(), [str(tmp_path / name) for name in names], None, tmp_path / "scratch")
    assert not api.requests


# ----------------------------------------------------------------------------- synthetic sets
def test_make_a_synthetic_set_posts_size_seed_and_world(api: FakeApi) -> None:
    made = dataset_json("ds-0123456789", "Synthetic set (200 items, seed 5, no box)", n_samples=200)
    api.routes["POST /api/datasets/synthetic"] = httpx.Response(201, json=made)
    dataset, message = datasets.make_synthetic(api.client(), 200.0, 5, strings.SYNTH_NO_BOX, "  ")
    assert api.bodies("POST /api/datasets/synthetic") == [{"n": 200, "seed": 5, "box": False}]
    assert dataset.id == "ds-0123456789" and "Synthetic set (200 items, seed 5, no box)" in message
    datasets.make_synthetic(api.client(), 8, 0, strings.SYNTH_WITH_BOX, "mine")
    assert api.bodies("POST /api/datasets/synthetic")[1] == {"n": 8, "seed": 0, "box": True, "name": "mine"}


def test_a_synthetic_set_out_of_range_is_refused_in_the_apis_words(api: FakeApi) -> None:
    api.routes["POST /api/datasets/synthetic"] = httpx.Response(
        422, json={"detail": "n: at most 2,000 items are built on request (VOPD_MAX_SYNTH_ITEMS), got 5,000"}
    )
    with pytest.raises(ApiError, match=r"n: at most 2,000 items are built on request .* \[HTTP 422\]"):
        datasets.make_synthetic(api.client(), 5000, 0, strings.SYNTH_WITH_BOX, None)
    for n, seed in ((None, 0), (0, 0), (2.5, 0), (4, -1), (4, None)):
        with pytest.raises(render.UiInputError):
            datasets.make_synthetic(api.client(), n, seed, strings.SYNTH_WITH_BOX, None)
    assert len(api.requests) == 1


# ----------------------------------------------------------------------------- list and preview
def test_the_table_lists_names_sizes_and_owners() -> None:
    listed = [
        Dataset.model_validate(dataset_json("synth-64", "Small synthetic set", shared=True, n_samples=64)),
        Dataset.model_validate(dataset_json()),
    ]
    table = datasets.dataset_table(listed)
    assert table.values.tolist() == [
        ["Small synthetic set", 64, "2.0 KB", "shared", "synth-64"],
        ["street signs", 3, "2.0 KB", "yours", "ds-6eafe25355"],
    ]


def test_preview_draws_each_samples_box_and_lists_question_options_answer(api: FakeApi) -> None:
    hidden = sample_json(
        1, question="What shape is the black object?", bbox=None, hidden_bbox=[56, 0, 112, 56], evidence="search"
    )
    api.routes["GET /api/datasets/ds-6eafe25355/samples"] = {"total": 40, "items": [sample_json(0), hidden]}
    gallery, text = datasets.preview(api.client(), "ds-6eafe25355", {"ds-6eafe25355": "street signs"})
    assert [caption for _, caption in gallery] == [
        "#0 · What color is the small shape inside the box?",
        "#1 · What shape is the black object?",
    ]
    assert "**street signs**: samples 0-1 of 40" in text
    row = "- **#0** `syn-00000`: What color is the small shape inside the box?  \n  options: red, green, blue, yellow"
    assert row in text and "answer: **green**" in text
    assert "[40, 52, 64, 76]" in text and "[56, 0, 112, 56] hidden" in text
    with Image.open(gallery[1][0]) as drawn:  # the hidden box drawn dashed blue on the right half, none on the left
        pixels = drawn.convert("RGB")
        width, height = pixels.size
        blue = [(x, y) for x in range(width) for y in range(height) if pixels.getpixel((x, y)) == (37, 99, 235)]
        assert blue and min(x for x, _ in blue) >= width // 2 - 2 and max(y for _, y in blue) <= height // 2 + 2
    params = dict(api.requests[0].url.params)
    assert params["limit"] == str(strings.PREVIEW_COUNT)
    with pytest.raises(render.UiInputError):
        datasets.preview(api.client(), None)


# ----------------------------------------------------------------------------- names everywhere
def test_dataset_lists_show_names_and_keep_ids_as_values() -> None:
    listed = [
        Dataset.model_validate(dataset_json("ds-6eafe25355", "street signs", n_samples=1200)),
        Dataset.model_validate(dataset_json("ds-aaaaaaaaaa", "copy", n_samples=3)),
        Dataset.model_validate(dataset_json("ds-bbbbbbbbbb", "copy", n_samples=3)),
    ]
    assert dataset_choices(listed) == [
        ("street signs  (1,200 samples)", "ds-6eafe25355"),
        ("copy  (3 samples, ds-aaaaaaaaaa)", "ds-aaaaaaaaaa"),  # a shared name tells its sets apart by id
        ("copy  (3 samples, ds-bbbbbbbbbb)", "ds-bbbbbbbbbb"),
    ]
    named = Dataset.model_validate(dataset_json("synth-train", "Synthetic training set (4,800 items, seed 1)"))
    assert dataset_choices([named.model_copy(update={"n_samples": 4800})]) == [
        ("Synthetic training set (4,800 items, seed 1)", "synth-train")  # the name already says its size
    ]


def test_job_and_evaluation_views_name_the_dataset() -> None:
    names = {"ds-6eafe25355": "street signs"}
    job = Job.model_validate(job_json(7, config={"model": "tiny", "dataset": "ds-6eafe25355", "steps": 4}))
    table = render.job_rows([job], names)
    assert table["dataset"].tolist() == ["street signs"]
    assert "dataset `street signs`" in render.job_header_markdown(job, names)
    assert "ds-6eafe25355" not in render.job_header_markdown(job, names)
    evaluation = Job.model_validate(
        job_json(8, kind="eval", status="succeeded", config={"model": "tiny", "dataset": "ds-6eafe25355"})
    )
    eval_table, _ = evaluate.comparison([evaluation], names)
    assert eval_table["dataset"].tolist() == ["street signs"]
    assert evaluate.eval_job_choices([evaluation], names) == [("#8 tiny on street signs (succeeded)", 8)]
    assert "street signs" in evaluate.trained_on_warning("ds-6eafe25355", {"job-1/final": "ds-6eafe25355"}, names)
    with pytest.raises(render.UiInputError, match="street signs"):
        jobs.comparison_dataset(job, ["ds-6eafe25355"], names)
    unknown = Job.model_validate(job_json(9, config={"model": "tiny", "dataset": "ds-gone"}))
    assert render.job_rows([unknown], names)["dataset"].tolist() == ["ds-gone"]  # a deleted set keeps its id


def test_the_job_table_reads_names_once_per_few_seconds_and_afresh_after_an_upload(
    api: FakeApi, tmp_path: Path
) -> None:
    api.routes["GET /api/datasets"] = {"items": [dataset_json()]}
    api.routes["GET /api/jobs"] = {
        "items": [job_json(1, config={"model": "tiny", "dataset": "ds-6eafe25355"})],
        "total": 1,
        "limit": 100,
        "offset": 0,
    }
    client = api.client()
    for _ in range(3):
        assert jobs.jobs_table(client, None, None)["dataset"].tolist() == ["street signs"]
    assert sum(1 for r in api.requests if r.method == "GET" and r.url.path == "/api/datasets") == 1
    api.routes["POST /api/datasets"] = httpx.Response(201, json=dataset_json("ds-1111111111", "new"))
    picked = tmp_path / "new.zip"
    picked.write_bytes(b"zip")
    datasets.upload(client, [str(picked)], None, tmp_path)
    jobs.jobs_table(client, None, None)
    assert sum(1 for r in api.requests if r.method == "GET" and r.url.path == "/api/datasets") == 2
    api.routes["GET /api/datasets"] = httpx.Response(503, json={"detail": "busy"})
    client._names = None
    assert jobs.jobs_table(client, None, None)["dataset"].tolist() == ["ds-6eafe25355"]  # names are a courtesy


def test_cli_runs_are_offered_beside_base_and_trained_models() -> None:
    models = [
        ModelInfo(name="tiny", kind="base"),
        ModelInfo(name="runs/opd/final", kind="run"),
        ModelInfo(name="runs/opd/checkpoints/step-20", kind="run", step=20),
        ModelInfo(name="job-3/final", kind="final", job_id=3),
    ]
    assert model_choices(models) == [
        ("tiny  (base)", "tiny"),
        ("runs/opd/final  (CLI run)", "runs/opd/final"),
        ("runs/opd/checkpoints/step-20  (CLI run checkpoint)", "runs/opd/checkpoints/step-20"),
        ("job-3/final  (trained)", "job-3/final"),
    ]
