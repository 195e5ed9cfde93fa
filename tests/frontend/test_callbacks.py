"""The tabs' pure callbacks against a fake API: values in, values out, no browser."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from frontend import render, strings
from frontend.client import InspectResult, Job
from frontend.tabs import demo, evaluate, inspect, jobs, train
from tests.frontend.conftest import FakeApi, inspect_json, job_json
from vopd.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def _image(width: int = 64, height: int = 48) -> Image.Image:
    return Image.new("RGB", (width, height), (200, 210, 220))


# ----------------------------------------------------------------------------- inspect
def test_drawn_boxes_reach_the_numbers_but_echoes_of_the_uis_own_boxes_do_not() -> None:
    drawn = {"image": _image(), "boxes": [{"xmin": 5, "ymin": 6, "xmax": 20, "ymax": 30, "label": ""}]}
    assert inspect.box_after_annotation(drawn) == (5, 6, 20, 30)
    moved = inspect.annotation_with_box(drawn, (1, 2, 40, 44))
    assert moved["boxes"] == [
        {"xmin": 1, "ymin": 2, "xmax": 40, "ymax": 44, "label": "1,2,40,44", "color": "rgb(255, 0, 0)"}
    ]
    assert Path(moved["image"]).is_file()  # a finished PNG file, never a PIL image Gradio would re-encode
    assert inspect.box_after_annotation(moved) is None  # our own echo
    dragged = {**moved, "boxes": [{**moved["boxes"][0], "xmax": 50}]}  # the user resized our box
    assert inspect.box_after_annotation(dragged) == (1, 2, 50, 44)
    assert inspect.relabelled(dragged, (1, 2, 50, 44))["boxes"][0]["label"] == "1,2,50,44"
    assert inspect.box_after_annotation({"image": _image(), "boxes": []}) is None
    assert inspect.box_after_annotation(None) is None


def test_typed_numbers_leave_the_drawing_alone_when_invalid_or_unchanged() -> None:
    annotation = {"image": _image(), "boxes": [{"xmin": 1, "ymin": 2, "xmax": 3, "ymax": 4, "label": "1,2,3,4"}]}
    assert inspect.annotation_with_box(annotation, (10, 0, 5, 5)) is None
    assert inspect.annotation_with_box(annotation, (0, 0, 65, 10)) is None  # outside the 64x48 image
    assert inspect.annotation_with_box(annotation, (1, 2, 3, 4)) is None
    assert inspect.annotation_with_box(None, (1, 2, 3, 4)) is None


def test_an_upload_gets_a_centred_default_box() -> None:
    value, box = inspect.annotation_with_default_box({"image": _image(64, 48), "boxes": []})
    assert box == (16, 12, 48, 36)
    assert value["boxes"][0]["xmax"] == 48 and inspect.box_after_annotation(value) is None
    assert inspect.annotation_with_default_box(value) is None  # a box is already there


def test_upload_previews_follow_the_box() -> None:
    student, teacher = inspect.upload_previews({"image": _image(64, 48)}, (10, 10, 30, 20))
    # a 20x10 crop doubles to 40x20, then its short side is raised to 28 with the aspect kept
    assert student.size == (64, 48) and teacher.size == (56, 28)
    assert inspect.upload_previews({"image": _image()}, (None, 1, 2, 3)) == (None, None)


def _request(**overrides):
    values = {
        "source": strings.SOURCE_UPLOAD,
        "annotation": {"image": _image()},
        "sample": None,
        "question": " What colour? ",
        "options_text": "red, blue",
        "box_values": (1, 2, 30, 40),
        "model": "tiny",
        "greedy": True,
        "max_new_tokens": 8.0,
        "alpha": 0.3,
        "show_topk": 5.0,
    }
    return inspect.build_request(**(values | overrides))


def test_build_request_for_an_upload_sends_the_image_losslessly() -> None:
    request = _request()
    assert request["bbox"] == [1.0, 2.0, 30.0, 40.0]
    assert request["question"] == "What colour?" and request["options"] == ["red", "blue"]
    assert request["divergence"] == {"alpha": 0.3} and request["max_new_tokens"] == 8
    decoded = Image.open(io.BytesIO(base64.b64decode(request["image_base64"])))
    assert decoded.size == (64, 48) and decoded.convert("RGB").getpixel((5, 5)) == (200, 210, 220)
    assert "dataset" not in request


def test_build_request_for_a_dataset_sample_lets_the_server_read_the_image() -> None:
    request = _request(source=strings.SOURCE_SAMPLE, sample=inspect.SampleRef("synth-64", 3), annotation=None)
    assert (request["dataset"], request["sample"]) == ("synth-64", 3)
    assert "image_base64" not in request


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"annotation": None}, "Upload an image"),
        ({"model": None}, "Choose a model"),
        ({"question": "  "}, "Type a question"),
        ({"box_values": (30, 2, 1, 40)}, "x1 > x0"),
        ({"box_values": (0, 0, 80, 40)}, "outside the 64x48 image"),
        ({"source": strings.SOURCE_SAMPLE}, "load a dataset sample first"),
    ],
)
def test_build_request_names_the_mistake(overrides: dict, message: str) -> None:
    with pytest.raises(render.UiInputError, match=message):
        _request(**overrides)


def test_run_inspect_compares_a_second_model_on_the_same_request(api: FakeApi) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=inspect_json(model=json.loads(request.content)["model"]))

    api.routes["POST /api/inspect"] = answer
    first, second = inspect.run_inspect(api.client(), {"model": "tiny", "question": "q"}, "job-1/final")
    assert (first.model, second.model) == ("tiny", "job-1/final")
    assert [b["model"] for b in api.bodies("POST /api/inspect")] == ["tiny", "job-1/final"]
    _, none = inspect.run_inspect(api.client(), {"model": "tiny", "question": "q"}, "tiny")
    assert none is None


def test_render_result_and_token_details() -> None:
    result = InspectResult.model_validate(inspect_json(divergences=(0.1, 0.5, 0.2)))
    strip, legend, summary, student, teacher = inspect.render_result(result, strings.METRIC_JSD)
    assert [token for token, _ in strip] == ["t0", "t1", "t2"]
    assert strip[1][1] == 1.0 and strip[0][1] == 0.0
    assert student == "B — B" and teacher == "C — C" and "3 tokens" in summary and "JSD(alpha)" in legend
    text, student_top, teacher_top = inspect.token_details(result, 1)
    assert "Position 1" in text and student_top.iloc[0]["token"] == "t1" and teacher_top.iloc[-1]["prob"] == 0.45
    assert inspect.token_details(result, 7) == (strings.SELECT_TOKEN_HINT, None, None)


def test_load_sample_fills_the_form(api: FakeApi) -> None:
    buffer = io.BytesIO()
    _image(8, 8).save(buffer, format="JPEG")
    thumbnail = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    api.routes["GET /api/datasets/synth-64/samples"] = {
        "total": 64,
        "items": [
            {
                "index": 2,
                "id": "s2",
                "question": "Which?",
                "options": ["a", "b"],
                "answer": "a",
                "bbox": [1, 2, 3, 4],
                "student_text": "",
                "teacher_text": "",
                "student_image": thumbnail,
                "teacher_image": thumbnail,
            }
        ],
    }
    question, options, x0, y0, x1, y1, student, teacher, ref = inspect.load_sample(api.client(), "synth-64", 2)
    assert (question, options, (x0, y0, x1, y1)) == ("Which?", "a\nb", (1, 2, 3, 4))
    assert student.size == (8, 8) and ref == inspect.SampleRef("synth-64", 2)
    assert dict(api.requests[0].url.params)["offset"] == "2"
    api.routes["GET /api/datasets/synth-64/samples"] = {"total": 64, "items": []}
    with pytest.raises(render.UiInputError, match="has 64 samples"):
        inspect.load_sample(api.client(), "synth-64", 99)


# ----------------------------------------------------------------------------- train
def test_presets_fill_every_form_field() -> None:
    tiny = dict(zip([spec.path for spec in train.FIELDS], train.preset_values(strings.PRESET_TINY), strict=True))
    assert tiny["runtime.device"] == "cpu" and tiny["rollout.num_rollouts"] == 1
    assert tiny["freeze_vision_tower"] is False and tiny["vision_lr_scale"] == 0.3
    assert tiny["steps"] == 20 and tiny["epochs"] is None
    paper_values = train.preset_values(strings.PRESET_PAPER)
    paper = dict(zip([spec.path for spec in train.FIELDS], paper_values, strict=True))
    assert paper["lr"] == 2e-6 and paper["divergence.alpha"] == 0.5 and paper["warmup_steps"] == 10
    assert paper["rollout.num_rollouts"] == 8 and paper["rollout.max_new_tokens"] == 1024
    assert paper["steps"] is None and paper["epochs"] == 1 and paper["freeze_vision_tower"] is False
    # The form's paper run is the CLI's `--preset paper` (one recipe, one merge).
    from vopd.config import load_config

    form = train.config_from_form("m", "d", paper_values, "")
    cli = load_config(TrainConfig, None, {"model": "m", "dataset": "d"}, preset="paper")
    assert form.model_dump() == cli.model_dump()


def test_config_from_form_validates_with_the_libraries_model() -> None:
    values = train.preset_values(strings.PRESET_TINY)
    config = train.config_from_form("tiny", "synth-64", values, '{"views": {"upscale": 3}, "rollout": {"top_p": 0.9}}')
    assert config.views.upscale == 3 and config.rollout.top_p == 0.9 and config.rollout.num_rollouts == 1
    assert not config.freeze_vision_tower and config.vision_lr_scale == 0.3
    body = train.request_body(config)
    assert body["kind"] == "train" and "output" not in body["config"] and body["config"]["steps"] == 20
    assert TrainConfig.model_validate(body["config"]) == config


@pytest.mark.parametrize(
    ("model", "dataset", "extra", "message"),
    [
        (None, "d", "", "Choose a model"),
        ("m", None, "", "Choose a dataset"),
        ("m", "d", "{not json", "not valid JSON"),
        ("m", "d", "[1]", "give a JSON object"),
        ("m", "d", '{"divergence": {"alpha": 2}}', "divergence.alpha: Input should be less than or equal to 1"),
        ("m", "d", '{"stepz": 3}', "stepz: Extra inputs are not permitted"),
    ],
)
def test_config_from_form_errors_name_the_field(model, dataset, extra, message) -> None:
    with pytest.raises(render.UiInputError, match=message):
        train.config_from_form(model, dataset, train.preset_values(strings.PRESET_TINY), extra)


def test_equivalents_show_the_cli_and_the_rest_request() -> None:
    config = train.config_from_form("tiny", "synth-64", train.preset_values(strings.PRESET_TINY), "")
    cli, rest = train.equivalents(config, "http://127.0.0.1:8000/")
    assert cli.startswith("vopd train --model tiny --dataset synth-64 --steps 20")
    assert "--rollout.num_rollouts 1" in cli and "--runtime.device cpu" in cli
    assert "--vision_lr_scale 0.3" in cli
    assert "curl -X POST http://127.0.0.1:8000/api/jobs" in rest
    body = json.loads(rest.split("-d '", 1)[1].rsplit("'", 1)[0])
    assert body == train.request_body(config)
    invalid_cli, _ = train.preview(None, "d", train.preset_values(strings.PRESET_TINY), "", "http://x")
    assert invalid_cli.startswith("# Choose a model")


def test_submit_posts_the_validated_config(api: FakeApi) -> None:
    api.routes["POST /api/jobs"] = httpx.Response(201, json=job_json(11, status="queued"))
    job = train.submit(api.client(), "tiny", "synth-64", train.preset_values(strings.PRESET_TINY), "")
    assert job.id == 11
    posted = api.bodies("POST /api/jobs")[0]
    assert posted["kind"] == "train" and posted["config"]["model"] == "tiny" and posted["config"]["lr"] == 1e-4


# ----------------------------------------------------------------------------- jobs
def test_poll_job_reads_only_what_is_new_and_keeps_one_row_per_step(api: FakeApi) -> None:
    metric_pages = iter(
        [
            {
                "items": [{"id": 1, "step": 1, "data": {"loss": 0.9}}, {"id": 2, "step": 2, "data": {"loss": 0.8}}],
                "next_since": 2,
            },
            {"items": [{"id": 5, "step": 2, "data": {"loss": 0.7}}], "next_since": 5},  # step 2 recomputed on resume
        ]
    )
    api.routes["GET /api/jobs/4"] = job_json(4)
    api.routes["GET /api/jobs/4/metrics"] = lambda request: httpx.Response(200, json=next(metric_pages))
    api.routes["GET /api/jobs/4/logs"] = {
        "items": [{"id": 3, "level": "info", "message": "started", "created_at": "2026-01-01T00:00:00Z"}],
        "next_since": 3,
    }
    api.routes["GET /api/jobs/4/artifacts"] = {"items": []}
    api.routes["GET /api/jobs"] = {"items": [], "total": 0, "limit": 200, "offset": 0}
    client = api.client()
    first = jobs.poll_job(client, None, 4)
    assert first.new_metrics and first.status_changed and first.view.logs == ["[info] started"]
    second = jobs.poll_job(client, first.view, 4)
    assert [(m.step, m.data["loss"]) for m in second.view.metrics] == [(1, 0.9), (2, 0.7)]
    assert not second.status_changed
    since = [dict(r.url.params).get("since") for r in api.requests if r.url.path.endswith("/metrics")]
    assert since == ["0", "2"]
    loss, divergence, _, _ = jobs.curves(second)
    assert loss["value"].tolist() == [0.9, 0.7]
    assert divergence is None  # nothing to draw: the plot is cleared, never fed an empty frame


def test_a_tick_never_shows_a_table_older_than_the_open_jobs_header(api: FakeApi) -> None:
    state = {"status": "running"}

    def job_route(request: httpx.Request) -> httpx.Response:
        state["status"] = "succeeded"  # the job ends just as its row is read
        return httpx.Response(200, json=job_json(4, status="succeeded"))

    api.routes["GET /api/jobs/4"] = job_route
    api.routes["GET /api/jobs/4/metrics"] = {"items": [], "next_since": 0}
    api.routes["GET /api/jobs/4/logs"] = {"items": [], "next_since": 0}
    api.routes["GET /api/jobs/4/artifacts"] = {"items": []}
    api.routes["GET /api/jobs"] = lambda request: httpx.Response(
        200, json={"items": [job_json(4, status=state["status"])], "total": 1, "limit": 100, "offset": 0}
    )
    snapshot, table = jobs.poll_tick(api.client(), jobs.JobView(4), strings.ANY, strings.ANY)
    assert snapshot is not None and snapshot.job.status == "succeeded"
    assert table["status"].tolist() == ["succeeded"]
    _, table = jobs.poll_tick(api.client(), None, strings.ANY, strings.ANY)  # no job open: the table alone
    assert table["status"].tolist() == ["succeeded"]


def test_cancel_and_resume_availability() -> None:
    def job(**overrides) -> Job:
        return Job.model_validate(job_json(1, **overrides))

    assert jobs.can_cancel(job(status="running")) and not jobs.can_cancel(job(status="succeeded"))
    assert not jobs.can_cancel(job(status="running", cancel_requested=True))
    assert jobs.can_resume(job(status="failed")) and jobs.can_resume(job(status="cancelled"))
    assert not jobs.can_resume(job(status="running"))


def test_parse_job_id() -> None:
    assert jobs.parse_job_id(3.0) == 3
    for bad in (None, "x", 0):
        with pytest.raises(render.UiInputError, match="not a job id"):
            jobs.parse_job_id(bad)


# ----------------------------------------------------------------------------- evaluate
def test_eval_configs_one_per_model() -> None:
    bodies = evaluate.eval_configs(["tiny", "job-2/final"], "synth-64", 16, 8, "plain")
    assert [b["model"] for b in bodies] == ["tiny", "job-2/final"]
    assert bodies[0] == {"model": "tiny", "dataset": "synth-64", "max_new_tokens": 8, "limit": 16, "full_view": "plain"}
    assert "limit" not in evaluate.eval_configs(["tiny"], "d", 0, 16, "student")[0]
    with pytest.raises(render.UiInputError, match="Choose a model"):
        evaluate.eval_configs([], "d", 0, 16, "student")
    with pytest.raises(render.UiInputError, match="max_new_tokens"):
        evaluate.eval_configs(["tiny"], "d", 0, 0, "student")


def test_eval_configs_with_a_benchmark_replace_the_dataset() -> None:
    bodies = evaluate.eval_configs(["tiny"], "synth-64", 0, 8, "student", "hrbench-4k", " hr ")
    assert bodies == [{"model": "tiny", "benchmark": "hrbench-4k", "data": "hr", "max_new_tokens": 8}]
    assert "benchmark" not in evaluate.eval_configs(["tiny"], "d", 0, 8, "student", evaluate.NO_BENCHMARK, "x")[0]
    with pytest.raises(render.UiInputError, match="benchmark's folder"):
        evaluate.eval_configs(["tiny"], None, 0, 8, "student", "vstar", "  ")
    with pytest.raises(render.UiInputError, match="Choose a dataset"):
        evaluate.eval_configs(["tiny"], None, 0, 8, "student", evaluate.NO_BENCHMARK, "")


def test_benchmark_choices_are_the_librarys_registry() -> None:
    from vopd.benchmarks import BENCHMARKS

    assert list(evaluate.BENCHMARK_CHOICES) == list(BENCHMARKS)


def test_a_benchmark_job_shows_its_suite_and_categories() -> None:
    result = {
        "benchmark": "vstar",
        "accuracy": 0.6,
        "full_accuracy": 0.6,
        "n": 5,
        "categories": {
            "direct_attributes": {"n": 3, "correct": 2, "accuracy": 2 / 3},
            "relative_position": {"n": 2, "correct": 1, "accuracy": 0.5},
        },
    }
    done = Job.model_validate(
        job_json(
            4,
            kind="eval",
            status="succeeded",
            result=result,
            config={"model": "tiny", "benchmark": "vstar", "data": "vstar"},
        )
    )
    table, chart = evaluate.comparison([done])
    assert table.iloc[0]["dataset"] == "vstar:vstar" and table.iloc[0]["full-image acc."] == 0.6
    assert chart["bar"].tolist() == ["tiny (#4) · full image"]  # no crop bar: there is no box to crop
    rows = evaluate.category_rows(done)
    assert rows.values.tolist() == [["direct_attributes", 3, 2 / 3], ["relative_position", 2, 0.5], ["overall", 5, 0.6]]
    assert evaluate.eval_job_choices([done]) == [("#4 tiny on vstar:vstar (succeeded)", 4)]
    assert evaluate.item_view(None, done, [{"id": "0", "question": "q", "options": ["a", "b"]}], 0)[1:] == (None, None)


def test_load_records_reads_the_records_artifact(api: FakeApi) -> None:
    api.routes["GET /api/jobs/9"] = job_json(9, kind="eval", status="succeeded")
    api.routes["GET /api/jobs/9/artifacts"] = {
        "items": [{"name": "records.jsonl", "kind": "records", "is_folder": False, "size_bytes": 10}]
    }
    api.routes["GET /api/jobs/9/artifacts/records.jsonl"] = httpx.Response(
        200, text='{"id": "a", "full_correct": true}\n\n{"id": "b", "full_correct": false}\n'
    )
    job, records = evaluate.load_records(api.client(), 9)
    assert job.id == 9 and [r["id"] for r in records] == ["a", "b"]
    api.routes["GET /api/jobs/9/artifacts"] = {"items": []}
    with pytest.raises(render.UiInputError, match="no per-item records"):
        evaluate.load_records(api.client(), 9)


def test_comparison_puts_model_and_condition_on_each_bar() -> None:
    done = Job.model_validate(
        job_json(
            3,
            kind="eval",
            status="succeeded",
            result={"full_accuracy": 0.25, "crop_accuracy": 0.75, "gap": 0.5, "n": 4},
        )
    )
    table, chart = evaluate.comparison([done])
    assert chart["bar"].tolist() == ["tiny (#3) · full image", "tiny (#3) · crop"]
    assert table.iloc[0]["gap"] == 0.5


# ----------------------------------------------------------------------------- demo
def test_demo_request_asks_about_the_plain_full_image() -> None:
    request = demo.demo_request(_image(64, 48), "What is written?", "", "tiny", 16)
    assert request["bbox"] == [0, 0, 64, 48]
    assert request["views"] == {"draw_box": False, "hint": ""} and request["options"] is None
    with pytest.raises(render.UiInputError, match="Upload an image"):
        demo.demo_request(None, "q", "", "tiny", 16)


def test_demo_answer_is_the_students_rollout(api: FakeApi) -> None:
    api.routes["POST /api/inspect"] = inspect_json()
    assert demo.answer(api.client(), {"model": "tiny"}) == "B — B"


# ----------------------------------------------------------------------------- the whole UI
def test_build_ui_holds_no_torch_and_no_database() -> None:
    """The UI is a client of the API: importing and building it must not load torch, transformers or SQLAlchemy."""
    code = (
        "import sys; from frontend.app import build_ui; build_ui('http://127.0.0.1:9'); "
        "print(sorted(m for m in ('torch', 'transformers', 'sqlalchemy', 'vopd.models', 'app') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_zero_run_length_box_means_the_other_length() -> None:
    """Gradio shows an empty number box as 0: the run length not in use is 0 and must not reach the config."""
    values = train.preset_values(strings.PRESET_TINY)
    paths = [spec.path for spec in train.FIELDS]
    values[paths.index("epochs")] = 0
    assert train.config_from_form("m", "d", values, "").steps == 20
    paper = train.preset_values(strings.PRESET_PAPER)
    paper[paths.index("steps")] = 0
    config = train.config_from_form("m", "d", paper, "")
    assert config.epochs == 1 and config.steps is None


# ----------------------------------------------------------------------------- the signed-in key
def _gradio_request(headers: dict[str, str] | None = None, cookies: dict[str, str] | None = None) -> Any:
    import gradio as gr
    from starlette.requests import Request

    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if cookies:
        raw_headers.append((b"cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode()))
    return gr.Request(request=Request({"type": "http", "method": "POST", "path": "/", "headers": raw_headers}))


def test_callbacks_use_the_signed_in_key_and_never_a_fallback() -> None:
    from frontend.client import ApiError
    from frontend.context import UiContext

    ctx = UiContext("http://api.test")
    with pytest.raises(ApiError, match="Not signed in"):
        ctx.client(_gradio_request())
    with pytest.raises(ApiError, match="Not signed in"):
        ctx.client(None)
    by_cookie = ctx.client(_gradio_request(cookies={"vopd_key": "vopd_alice"}))
    assert by_cookie._http.headers["Authorization"] == "Bearer vopd_alice"
    by_header = ctx.client(_gradio_request(headers={"Authorization": "Bearer vopd_bob"}, cookies={"vopd_key": "x"}))
    assert by_header._http.headers["Authorization"] == "Bearer vopd_bob"


def test_every_callback_that_names_a_request_gets_gradios_request() -> None:
    """gr.Request is injected only when the annotation resolves: an unresolvable hint would silently drop it."""
    import inspect as pyinspect

    import gradio as gr
    from gradio.utils import get_type_hints

    from frontend.app import build_ui

    ui = build_ui("http://127.0.0.1:9")
    functions = [block_fn.fn for block_fn in ui.fns.values() if block_fn.fn is not None]
    named = [fn for fn in functions if "request" in pyinspect.signature(fn).parameters]
    assert len(named) >= 20
    for fn in named:
        assert get_type_hints(fn).get("request") is gr.Request, fn.__name__
    assert not any(isinstance(block, gr.Textbox) and block.label == "API key" for block in ui.blocks.values())


def test_the_standalone_studio_asks_for_a_key_too() -> None:
    from fastapi.testclient import TestClient

    from frontend.app import standalone_app

    with TestClient(standalone_app("http://127.0.0.1:9")) as client:
        assert client.get("/ui/config").status_code == 401
        page = client.get("/ui/", headers={"Accept": "text/html"})
        assert page.status_code == 200 and 'id="signin-key"' in page.text  # followed to the sign-in page
        assert client.post("/signin", data={"key": "vopd_x"}).status_code == 401  # the API is unreachable
