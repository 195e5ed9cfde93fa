"""The tabs' pure callbacks against a fake API: values in, values out, no browser."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
from PIL import Image

from frontend import drawing, render, strings
from frontend.client import Evidence, InspectResult, Job, ModelInfo
from frontend.tabs import demo, evaluate, inspect, jobs, train
from tests.frontend.conftest import FakeApi, inspect_json, job_json
from vopd.config import RolloutEngineName, TrainConfig

REPO = Path(__file__).resolve().parents[2]


def _image(width: int = 64, height: int = 48) -> Image.Image:
    return Image.new("RGB", (width, height), (200, 210, 220))


def _image_file(width: int = 64, height: int = 48) -> str:
    return render.stable_png_path(_image(width, height))


# ----------------------------------------------------------------------------- inspect
def _upload(tmp_path: Path, width: int = 64, height: int = 48) -> str:
    """An uploaded image as the studio keeps it: a PNG file path."""
    path = tmp_path / f"upload-{width}x{height}.png"
    _image(width, height).save(path)
    return inspect.on_image_uploaded(str(path))[0]


def test_an_upload_gets_a_centred_default_box_and_a_stable_png(tmp_path: Path) -> None:
    source = tmp_path / "photo.jpg"
    _image(64, 48).save(source)
    stored, box = inspect.on_image_uploaded(str(source))
    assert box == (16, 12, 48, 36)
    assert stored.endswith(".png") and Image.open(stored).size == (64, 48)
    with pytest.raises(render.UiInputError, match="Upload an image"):
        inspect.on_image_uploaded(None)


def test_the_surface_shows_the_typed_box_in_percent_of_the_image(tmp_path: Path) -> None:
    path = _upload(tmp_path, 200, 100)
    html = inspect.surface(path, (50, 25, 150, 75))
    assert 'data-width="200" data-height="100" data-box="50,25,150,75"' in html
    assert "left:25.0000%;top:25.0000%;width:50.0000%;height:50.0000%" in html
    assert "vopd-box hidden" not in html
    # An invalid or incomplete box, or "let the model find the evidence": no red box on the image.
    assert "vopd-box hidden" in inspect.surface(path, (150, 25, 50, 75))
    assert 'data-box=""' in inspect.surface(path, (50, 25, 150, 75), find_evidence=True)
    assert "Upload an image" in inspect.surface(None, (1, 2, 3, 4))


def test_the_surface_draws_the_models_evidence_with_its_confidence(tmp_path: Path) -> None:
    path = _upload(tmp_path, 200, 100)
    evidence = Evidence(box=(20, 10, 60, 50), source="search", confidence=0.8312)
    html = inspect.surface(path, (0, 0, 1, 1), find_evidence=True, evidence=evidence)
    assert 'class="vopd-evidence" style="left:10.0000%;top:10.0000%;width:20.0000%;height:40.0000%"' in html
    assert "the model&#x27;s own evidence crop · confidence 83.1%" in html


def test_drag_events_carry_the_box_in_original_pixels() -> None:
    assert drawing.box_from_event({"box": [5, 6, 20, 30]}) == (5, 6, 20, 30)
    assert drawing.box_from_event({"box": [20, 6, 5, 30]}) is None  # never an inverted box
    assert drawing.box_from_event({"box": [5, 6, 5, 30]}) is None  # nor a point or a line
    assert drawing.box_from_event({"box": ["a", 1, 2, 3]}) is None
    assert drawing.box_from_event(None) is None


@pytest.mark.parametrize(
    ("size", "width"),
    [((112, 112), 384), ((64, 32), 384), ((32, 64), 192), ((640, 480), 640), ((4000, 3000), 720)],
)
def test_small_images_are_shown_enlarged_and_large_ones_capped(size: tuple[int, int], width: int) -> None:
    assert drawing.display_width(size) == width


def test_the_image_sent_to_the_browser_is_capped_but_the_box_stays_in_original_pixels() -> None:
    html = drawing.surface_html(_image(3000, 1500), (300, 150, 600, 450))
    encoded = html.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert Image.open(io.BytesIO(base64.b64decode(encoded))).size == (1024, 512)
    assert 'data-width="3000" data-height="1500" data-box="300,150,600,450"' in html


def test_upload_previews_follow_the_box(tmp_path: Path) -> None:
    path = _upload(tmp_path, 64, 48)
    student, teacher = inspect.upload_previews(path, (10, 10, 30, 20))
    # a 20x10 crop doubles to 40x20, then its short side is raised to 28 with the aspect kept (56x28); both views
    # are shown scaled by a whole factor to at least 320 px (64x48 x5, 56x28 x6)
    assert student.size == (320, 240) and teacher.size == (336, 168)
    assert inspect.upload_previews(path, (None, 1, 2, 3)) == (None, None)
    assert inspect.upload_previews(None, (1, 1, 2, 3)) == (None, None)


def _request(**overrides):
    values = {
        "source": strings.SOURCE_UPLOAD,
        "image_path": inspect.on_image_uploaded(_image_file())[0],
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
    request = _request(source=strings.SOURCE_SAMPLE, sample=inspect.SampleRef("synth-64", 3), image_path=None)
    assert (request["dataset"], request["sample"]) == ("synth-64", 3)
    assert "image_base64" not in request


def test_letting_the_model_find_the_evidence_sends_no_box() -> None:
    request = _request(find_evidence=True, box_values=(None, None, None, None))
    assert "bbox" not in request and "image_base64" in request
    sample = _request(source=strings.SOURCE_SAMPLE, sample=inspect.SampleRef("s", 0), find_evidence=True)
    assert "bbox" not in sample  # and the sample's own box is set aside: the search is asked for by name
    assert request["views"] == sample["views"] == {"evidence": "search"}
    assert "views" not in _request()


def test_a_result_names_the_evidence_and_older_servers_without_it_still_parse() -> None:
    old = InspectResult.model_validate(inspect_json())
    assert old.evidence is None and inspect.evidence_markdown(old) == ""
    searched = InspectResult.model_validate(
        inspect_json() | {"evidence": {"box": [1, 2, 30.4, 40], "source": "search", "confidence": 0.5}}
    )
    assert inspect.evidence_markdown(searched) == (
        "Evidence: the model's own evidence crop · confidence 50.0%, at [1, 2, 30, 40] (pixels of the original image)."
    )
    given = InspectResult.model_validate(
        inspect_json() | {"evidence": {"box": [1, 2, 3, 4], "source": "given", "confidence": None}}
    )
    assert "the given box, at [1, 2, 3, 4]" in inspect.evidence_markdown(given)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_path": None}, "Missing: an image"),
        ({"model": None}, "Missing: a model"),
        ({"question": "  "}, "Missing: a question"),
        ({"box_values": (30, 2, 1, 40)}, "x1 > x0"),
        ({"box_values": (0, 0, 80, 40)}, "outside the 64x48 image"),
        ({"source": strings.SOURCE_SAMPLE}, "Missing: a dataset sample"),
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
    strip, legend, summary, student, teacher = inspect.render_result(
        result, strings.METRIC_JSD, None, strings.SCALE_RELATIVE
    )
    assert [token for token, _ in strip] == ["t0", "t1", "t2"]
    assert strip[1][1] == 1.0 and strip[0][1] == 0.0
    assert student == "B" and teacher == "C" and "3 tokens" in summary and "JSD(alpha)" in legend
    # with the question's options, an answer is the option's letter and its text
    _, _, _, student, teacher = inspect.render_result(result, strings.METRIC_JSD, ["red", "green", "blue"])
    assert (student, teacher) == ("B. green", "C. blue")
    text, student_top, teacher_top = inspect.token_details(result, 1)
    assert "Position 1" in text and student_top.iloc[0]["token"] == "t1" and teacher_top.iloc[-1]["p"] == "45.0%"
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
    question, options, x0, y0, x1, y1, student, teacher, ref, find, _, _ = inspect.load_sample(
        api.client(), "synth-64", 2
    )
    assert (question, options, (x0, y0, x1, y1)) == ("Which?", "a\nb", (1, 2, 3, 4)) and find is False
    assert student.size == (320, 320) and ref == inspect.SampleRef("synth-64", 2)  # an 8 px thumbnail, x40
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
    assert paper["runtime.offload_optimizer"] and paper["runtime.offload_teacher"] and paper["runtime.offload_params"]
    assert tiny["runtime.offload_optimizer"] is False and tiny["runtime.offload_teacher"] is False
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
    run = train.cli_run_name(config)
    assert run.startswith("studio-") and run == train.cli_run_name(config.model_copy())  # stable across previews
    assert cli.startswith(
        f'vopd train --model tiny --dataset synth-64 --output "${{VOPD_HOME:-$HOME/.vopd}}"/runs/{run} --steps 20 '
        "--batch-size 4"
    )
    other = train.config_from_form("tiny", "synth-64", train.preset_values(strings.PRESET_TINY_WORLD), "")
    assert train.cli_run_name(other) != run  # another form, another run folder
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


def test_plan_posts_the_validated_config_and_shows_the_servers_table(api: FakeApi) -> None:
    from app.schemas import JobPlanOut

    answer = JobPlanOut(
        fits=False,
        per_device_bytes={"masters": 1, "total": 1},
        device_memory_bytes=10,
        activations={},
        assumptions={},
        suggestions=[{"set": {"runtime.gradient_checkpointing": True}, "total_bytes": 9}],
        model={},
        table="does NOT fit in 80.0 GiB per device",
    )
    api.routes["POST /api/jobs/plan"] = answer.model_dump(mode="json")
    values = train.preset_values(strings.PRESET_TINY)
    shown = train.plan(api.client(), "tiny", "synth-64", values, "", 1, 1, "80GiB")
    assert shown == "does NOT fit in 80.0 GiB per device"
    posted = api.bodies("POST /api/jobs/plan")[0]
    assert posted["kind"] == "train" and posted["config"]["model"] == "tiny" and posted["device_memory"] == "80GiB"
    train.plan(api.client(), "tiny", "synth-64", values, "")  # no memory named: the server's own device
    assert "device_memory" not in api.bodies("POST /api/jobs/plan")[-1]
    assert api.bodies("POST /api/jobs") == []  # nothing submitted


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


def test_the_chosen_answer_engine_reaches_the_eval_jobs_body(api: FakeApi) -> None:
    """The Evaluate tab's engine goes into each job's config as EvalConfig.engine; auto, the default, is left out."""
    from app.schemas import EvalJobCreate

    api.routes["POST /api/jobs"] = httpx.Response(201, json=job_json(21, kind="eval", status="queued"))
    for engine in ("vllm", "hf"):
        bodies = evaluate.eval_configs(["tiny", "job-2/final"], "synth-64", 4, 8, "plain", engine=engine)
        evaluate.submit_evals(api.client(), bodies)
    suite = evaluate.eval_configs(["tiny"], None, 0, 8, "student", "vstar", "vstar", "vllm")
    evaluate.submit_evals(api.client(), suite)
    posted = api.bodies("POST /api/jobs")
    assert [(body["kind"], body["config"]["model"], body["config"]["engine"]) for body in posted] == [
        ("eval", "tiny", "vllm"),
        ("eval", "job-2/final", "vllm"),
        ("eval", "tiny", "hf"),
        ("eval", "job-2/final", "hf"),
        ("eval", "tiny", "vllm"),
    ]
    assert posted[-1]["config"]["benchmark"] == "vstar"
    for body in posted:  # the server accepts exactly what the studio sends
        assert EvalJobCreate.model_validate(body).config.engine == body["config"]["engine"]
    assert "engine" not in evaluate.eval_configs(["tiny"], "d", 0, 8, "student", engine="auto")[0]
    assert list(evaluate.ENGINE_CHOICES) == list(get_args(RolloutEngineName))  # the tab offers the config's choices
    with pytest.raises(render.UiInputError, match="engine"):
        evaluate.eval_configs(["tiny"], "d", 0, 8, "student", engine="sglang")


def test_the_eval_table_shows_the_engine_the_worker_chose() -> None:
    """Once the result says which engine answered (the API's engine), the row shows it; until then what was asked."""
    result = {"full_accuracy": 0.5, "crop_accuracy": 0.75, "gap": 0.25, "n": 4, "engine": "vllm"}
    done = Job.model_validate(
        job_json(5, kind="eval", status="succeeded", result=result, config={"model": "tiny", "dataset": "d"})
    )
    asked = Job.model_validate(
        job_json(6, kind="eval", status="queued", config={"model": "tiny", "dataset": "d", "engine": "hf"})
    )
    plain = Job.model_validate(job_json(7, kind="eval", status="running", config={"model": "tiny", "dataset": "d"}))
    assert done.engine == "vllm"
    table, _ = evaluate.comparison([done, asked, plain])
    assert table.set_index("job")["engine"].to_dict() == {5: "vllm", 6: "hf", 7: "auto"}
    assert table.iloc[0]["full-image acc."] == 0.5


def test_benchmark_choices_are_the_librarys_registry() -> None:
    from vopd.benchmarks import BENCHMARKS

    assert list(evaluate.BENCHMARK_CHOICES) == list(BENCHMARKS)


def test_suites_table_puts_models_side_by_side_with_the_average_of_the_six() -> None:
    def job(job_id: int, model: str, suite: str, reported: dict, model_job_id: int | None = None) -> Job:
        body = job_json(
            job_id,
            kind="eval",
            status="succeeded",
            result={"benchmark": suite, "accuracy": 0.1, "reported": reported},
            config={"model": model, "benchmark": suite, "data": suite},
        )
        return Job.model_validate({**body, "model_job_id": model_job_id})

    six = {"vstar": 0.5, "zoombench": 0.4, "hrbench-4k": 0.6, "hrbench-8k": 0.3, "mme-realworld": 0.2}
    jobs = [job(i, "job-1/final", suite, {"Overall": value + 0.1}, model_job_id=1) for i, (suite, value) in
            enumerate(six.items(), start=10)]  # fmt: skip
    jobs += [job(i, "base", suite, {"Overall": value}) for i, (suite, value) in enumerate(six.items(), start=20)]
    jobs.append(job(30, "base", "mme-realworld-cn", {"Perception": 0.9, "Overall": 0.6}))
    jobs.append(job(31, "base", "visualprobe", {"Easy": 1.0, "Average": 0.7}))
    jobs.append(job(32, "base", "pope-random", {"Accuracy": 0.8, "F1": 0.75}))
    table = evaluate.suite_rows(jobs)
    assert list(table.columns) == ["suite", "base", "job-1/final"]  # base before trained
    rows = {row[0]: row[1:] for row in table.values.tolist()}
    assert rows["vstar"] == [0.5, 0.6] and rows["visualprobe"][0] == 0.7 and rows["pope-random"][0] == 0.8
    assert rows["average of the six"][0] == pytest.approx((0.5 + 0.4 + 0.6 + 0.3 + 0.2 + 0.6) / 6)
    assert rows["average of the six"][1] is None or rows["average of the six"][1] != rows["average of the six"][1]
    assert table.values.tolist()[-1][0] == "average of the six"  # the trained model lacks MME-RealWorld-CN


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
    assert chart[evaluate.CHART_X].tolist() == ["tiny (#4) · full image"]  # no crop bar: there is no box to crop
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
    assert chart[evaluate.CHART_X].tolist() == ["tiny (#3) · full image", "tiny (#3) · crop"]
    assert table.iloc[0]["gap"] == 0.5


# ----------------------------------------------------------------------------- demo
def test_demo_request_asks_about_the_plain_full_image_with_no_box() -> None:
    request = demo.demo_request(_image(64, 48), "What is written?", "", "tiny", 16)
    assert "bbox" not in request  # the server's evidence search says where the model looked
    assert request["views"] == {"draw_box": False, "hint": ""} and request["options"] is None
    with pytest.raises(render.UiInputError, match="Upload an image"):
        demo.demo_request(None, "q", "", "tiny", 16)


def test_the_demos_sample_question_needs_no_box() -> None:
    assert "box" not in strings.DEMO_QUESTION.lower() and render.parse_options(strings.DEMO_OPTIONS)


def test_demo_answer_is_the_students_rollout(api: FakeApi) -> None:
    api.routes["POST /api/inspect"] = inspect_json()
    assert demo.answer(api.client(), {"model": "tiny"}) == "B"
    assert demo.answer(api.client(), {"model": "tiny", "options": ["red", "green"]}) == "B. green"


def test_demo_shows_where_the_model_looked(api: FakeApi) -> None:
    api.routes["POST /api/inspect"] = inspect_json() | {
        "evidence": {"box": [8, 8, 24, 24], "source": "search", "confidence": 0.9}
    }
    text, looked, caption = demo.ask(api.client(), {"model": "tiny", "options": ["a", "b"]}, _image(32, 32))
    assert text == "B. b" and looked.size == (384, 384)  # enlarged 12x
    assert looked.getpixel((8 * 12, 8 * 12 + 30)) == (37, 99, 235)  # the dashed outline's left edge
    assert caption == "Dashed box: the model's own evidence crop · confidence 90.0%, at [8, 8, 24, 24]."
    api.routes["POST /api/inspect"] = inspect_json()  # an older server says nothing about evidence
    assert demo.ask(api.client(), {"model": "tiny"}, _image(32, 32))[1:] == (None, "")


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
    # The cookie holds a session (never a key), forwarded as the Bearer credential the API resolves to its key.
    by_cookie = ctx.client(_gradio_request(cookies={"vopd_session": "vopds_alice"}))
    assert by_cookie._http.headers["Authorization"] == "Bearer vopds_alice"
    by_header = ctx.client(
        _gradio_request(headers={"Authorization": "Bearer vopd_bob"}, cookies={"vopd_session": "vopds_x"})
    )
    assert by_header._http.headers["Authorization"] == "Bearer vopd_bob"
    with pytest.raises(ApiError, match="Not signed in"):  # an older version's key cookie is never read
        ctx.client(_gradio_request(cookies={"vopd_key": "vopd_alice"}))


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


# ----------------------------------------------------------------------------- a newcomer's first minutes
def _number_components(ui: Any) -> list[Any]:
    import gradio as gr

    return [block for block in ui.blocks.values() if isinstance(block, gr.Number)]


def test_no_number_field_refuses_what_an_empty_field_sends() -> None:
    """Opening the Jobs tab showed "Error (3): Value 0 is less than minimum value 1." with the job-id field outlined
    red: an empty Number field reaches Python as 0 (it is an input of the tab's open and of the timer), and a
    ``minimum`` above that made Gradio refuse every such event."""
    from frontend.app import build_ui

    fields = _number_components(build_ui("http://api.test"))
    assert any(field.elem_id == "jobs-job-id" for field in fields)
    for field in fields:
        sent = field.value if field.value is not None else 0
        field.preprocess(sent)  # raises gr.Error for a value below the minimum


def test_the_log_tail_shows_the_newest_line_first() -> None:
    assert render.log_tail(["one", "two", "three"], keep=2) == "three\ntwo"


def _snapshot(job: Job, metrics: list[dict[str, Any]], eval_jobs: list[Job] = ()) -> jobs.JobSnapshot:
    from frontend.client import Metric

    view = jobs.JobView(job.id, metrics=[Metric.model_validate(m) for m in metrics])
    return jobs.JobSnapshot(job, view, True, True, True, [], list(eval_jobs))


def test_an_empty_accuracy_plot_says_what_fills_it() -> None:
    running = Job.model_validate(job_json(4, status="running", step=2, total_steps=20))
    snapshot = _snapshot(running, [{"id": 1, "step": 2, "data": {"loss": 0.5}}])
    assert "run an evaluation of it in the **Evaluate** tab" in jobs.accuracy_empty_note(snapshot)
    evaluated = Job.model_validate(
        job_json(
            9,
            kind="eval",
            status="succeeded",
            config={"model": "job-4/step-2", "dataset": "synth-64"},
            result={"full_accuracy": 0.5, "crop_accuracy": 0.9, "gap": 0.4, "n": 4},
        )
    )
    assert jobs.accuracy_empty_note(_snapshot(running, [], [evaluated])) == ""


def test_curves_share_an_x_range_from_zero_to_the_last_step() -> None:
    """One metric row at step 2 used to make its plot's whole x axis a single odd label."""
    job = Job.model_validate(job_json(4, status="running", step=2, total_steps=20))
    assert jobs.step_range(_snapshot(job, [{"id": 1, "step": 2, "data": {"loss": 0.5}}])) == [0, 20]
    finished_early = Job.model_validate(job_json(5, status="cancelled", step=3, total_steps=None))
    assert jobs.step_range(_snapshot(finished_early, [{"id": 1, "step": 3, "data": {}}])) == [0, 10]  # whole ticks


def test_empty_states_say_what_to_do() -> None:
    assert "click a row" in strings.NO_JOB and "Train" in strings.NO_JOB
    assert "Run evaluation" in strings.EVAL_EMPTY


def _eval_job(job_id: int, model: str, **overrides: Any) -> Job:
    result = {"full_accuracy": 0.5, "crop_accuracy": 0.9, "gap": 0.4, "n": 4}
    return Job.model_validate(
        job_json(job_id, kind="eval", status="succeeded", config={"model": model, "dataset": "d"}, result=result)
        | overrides
    )


def test_evaluations_read_base_first_then_trained_by_step() -> None:
    picked = [_eval_job(7, "job-2/final"), _eval_job(8, "job-2/step-10"), _eval_job(9, "tiny")]
    table, chart = evaluate.comparison(picked)
    assert table["model"].tolist() == ["tiny", "job-2/step-10", "job-2/final"]
    assert chart[evaluate.CHART_X].tolist()[:2] == ["tiny (#9) · full image", "tiny (#9) · crop"]
    order = evaluate.chart_update(chart)[0]["sort"]  # pinned: Vega-Lite would sort the labels alphabetically
    assert order[0] == "tiny (#9) · full image" and order[-1] == "job-2/final (#7) · crop" and len(order) == 6


def test_the_chart_has_axis_titles_and_a_legend_with_swatches() -> None:
    from frontend.app import build_ui

    ui = build_ui("http://api.test")
    chart = next(block for block in ui.blocks.values() if getattr(block, "elem_id", None) == "eval-chart")
    assert chart.x == evaluate.CHART_X != "bar" and chart.x_title and chart.y_title == "accuracy"
    assert chart.color_map == render.CONDITION_COLORS
    legend = render.condition_legend_html()
    for name, color in render.CONDITION_COLORS.items():
        assert f"background:{color}" in legend and name in legend


def test_evaluation_defaults_to_data_the_model_did_not_train_on() -> None:
    train_job = Job.model_validate(job_json(2, kind="train", status="succeeded"))  # trained on synth-64
    trained = evaluate.trained_on(["tiny", "job-2/final", "job-2/step-10", "job-9/final"], [train_job])
    assert trained == {"job-2/final": "synth-64", "job-2/step-10": "synth-64"}
    assert evaluate.held_out_dataset("synth-64", ["synth-64", "ds-held"], trained) == "ds-held"
    assert evaluate.held_out_dataset("ds-held", ["synth-64", "ds-held"], trained) == "ds-held"
    # nothing else to evaluate on: keep it, and warn
    assert evaluate.held_out_dataset("synth-64", ["synth-64"], trained) == "synth-64"
    warning = evaluate.trained_on_warning("synth-64", trained)
    assert "`job-2/final`, `job-2/step-10` trained on `synth-64`" in warning
    assert evaluate.trained_on_warning("ds-held", trained) == ""
    assert evaluate.trained_on_warning("synth-64", {}) == ""


def test_the_train_form_offers_the_trackers() -> None:
    values = train.preset_values(strings.PRESET_TINY)
    index = [spec.path for spec in train.FIELDS].index("report_to")
    assert values[index] == []
    values[index] = ["tensorboard", "mlflow"]
    config = train.config_from_form("tiny", "synth-64", values, "")
    assert config.report_to == ["tensorboard", "mlflow"]
    assert "--report-to tensorboard,mlflow" in train.equivalents(config, "http://x")[0]
    assert train.request_body(config)["config"]["report_to"] == ["tensorboard", "mlflow"]


def test_the_cli_commands_flags_are_spelled_as_vopd_train_spells_them() -> None:
    """The Train tab's command used --batch_size where the CLI (and README) say --batch-size."""
    from vopd.cli import build_parser
    from vopd.config import CLI_FLAGS

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    own = {action.dest: action.option_strings[0] for action in train_parser._actions if action.option_strings}
    for field, flag in CLI_FLAGS.items():
        assert own[field] == flag
    config = train.config_from_form("tiny", "synth-64", train.preset_values(strings.PRESET_TINY), "")
    cli = train.equivalents(config, "http://x")[0]
    assert "--batch-size 4" in cli and "--batch_size" not in cli and f"--output {train.cli_output(config)} " in cli


def test_after_a_box_free_run_the_previews_are_what_the_model_saw(tmp_path: Path) -> None:
    path = _upload(tmp_path, 64, 48)
    searched = Evidence(box=(0, 0, 32, 24), source="search", confidence=0.9)
    student, teacher = inspect.upload_previews(path, (None, None, None, None), searched)
    # shown x5 (render.enlarged): 64x48 -> 320x240; pixel (33, 10) of the view is (165..169, 50..54) here
    assert student.size == (320, 240) and student.getpixel((167, 52)) == (200, 210, 220)  # no red outline drawn
    assert teacher.size[0] > 32  # the chosen crop, upscaled
    given = Evidence(box=(10, 10, 30, 20), source="given")
    assert inspect.upload_previews(path, (10, 10, 30, 20), given)[1].size == (336, 168)  # 56x28, shown x6


def test_a_job_on_several_devices_or_machines_asks_for_them_as_the_server_checks(api: FakeApi) -> None:
    from app.schemas import TrainJobCreate

    values = train.preset_values(strings.PRESET_TINY)  # batch size 4
    config = train.config_from_form("tiny", "synth-64", values, "")
    assert "resources" not in train.request_body(config)
    two = train.request_body(config, gpus=2)
    assert two["resources"] == {"gpus": 2}
    four = train.request_body(config, gpus=2, nodes=2)
    assert four["resources"] == {"gpus": 2, "nodes": 2}
    for body in (two, four):  # the server accepts exactly what the studio sends
        TrainJobCreate.model_validate(body)
    cli, rest = train.equivalents(config, "http://x", gpus=2)
    assert cli.endswith("--nproc 2") and '"resources"' in rest
    cli, _ = train.equivalents(config, "http://x", gpus=2, nodes=2)
    assert cli.startswith("# over several machines")
    refused, _ = train.preview("tiny", "synth-64", values, "", "http://x", gpus=3)
    assert refused.startswith("# batch size 4 must be a multiple of the 3 training processes")

    api.routes["POST /api/jobs"] = httpx.Response(201, json=job_json(12, status="queued"))
    train.submit(api.client(), "tiny", "synth-64", values, "", gpus=2, nodes=2)
    assert api.bodies("POST /api/jobs")[0]["resources"] == {"gpus": 2, "nodes": 2}


def test_a_picked_suite_fills_in_its_folder_on_the_server() -> None:
    from frontend.client import BenchmarkFolder, BenchmarkFolderList
    from frontend.tabs.evaluate import NO_BENCHMARK, benchmark_data_for, benchmarks_found_note

    found = BenchmarkFolderList(
        items=[BenchmarkFolder(suite="vstar", data="vstar_bench"), BenchmarkFolder(suite="zoombench", data="zb")],
        folder="$VOPD_HOME/benchmarks",
    )
    assert benchmark_data_for("vstar", "", found) == "vstar_bench"
    assert benchmark_data_for("zoombench", "vstar_bench", found) == "zb"  # another found suite's folder is replaced
    assert benchmark_data_for("zoombench", "my/own/copy", found) is None  # a folder typed by hand stays
    assert benchmark_data_for("mmstar", "", found) is None  # not on the server: nothing to fill
    assert benchmark_data_for(NO_BENCHMARK, "", found) is None
    assert "vstar (`vstar_bench`)" in benchmarks_found_note(found)
    empty = benchmarks_found_note(BenchmarkFolderList(items=[], folder="$VOPD_HOME/benchmarks"))
    assert "No published suite" in empty and "$VOPD_HOME/benchmarks" in empty


# ----------------------------------------------------------------------------- demo: examples, side by side
def _models_route(*trained: tuple[int, str]) -> dict[str, Any]:
    items = [{"name": "tiny", "kind": "base"}, {"name": "tiny-nobox", "kind": "base"}]
    items += [{"name": f"job-{job_id}/final", "kind": "final", "job_id": job_id} for job_id, _ in trained]
    return {"items": items}


def _train_jobs(*trained: tuple[int, str]) -> dict[str, Any]:
    items = [
        job_json(job_id, status="succeeded", config={"model": base, "dataset": "synth-train"})
        for job_id, base in trained
    ]
    return {"items": items, "total": len(items), "limit": 100, "offset": 0}


def test_the_demo_examples_have_one_right_answer_with_and_without_a_box() -> None:
    from vopd.synth import SynthConfig, generate_item

    examples = demo.demo_examples()
    assert len(examples) >= 4
    assert {example.box is None for example in examples} == {True, False}  # both worlds
    for example, (no_box, index) in zip(examples, demo.EXAMPLE_ITEMS, strict=True):
        image, record = generate_item(SynthConfig(seed=demo.HELD_OUT_SEED, n=index + 1, no_box=no_box), index)
        assert example.answer == record["answer"] and example.answer in example.options
        assert Image.open(example.image_path).tobytes() == image.tobytes()  # the very item, rendered here
        if no_box:  # the box-free world: the only black object, asked of the box-free base
            assert example.model == "tiny-nobox" and "box" not in example.question
        else:  # the box world: the target alone inside the box, asked of the box world's base
            assert example.model == "tiny" and list(example.box) == record["bbox"]


def test_clicking_an_example_fills_the_inputs_and_picks_its_model_and_trained_model(api: FakeApi) -> None:
    api.routes["GET /api/models"] = _models_route((4, "tiny"), (7, "tiny"), (9, "tiny-nobox"))
    api.routes["GET /api/jobs"] = _train_jobs((4, "tiny"), (7, "tiny"), (9, "tiny-nobox"))
    boxed = next(i for i, e in enumerate(demo.demo_examples()) if e.box)
    image, question, options, box, model, trained, expected, note = demo.example_fill(api.client(), boxed)
    example = demo.demo_examples()[boxed]
    assert image == example.image_path and question == example.question and expected == example.answer
    assert options == "red, green, blue, yellow" and box == ", ".join(str(v) for v in example.box)
    assert model["value"] == "tiny" and note == ""
    assert trained["value"] == "job-7/final"  # the newest trained from that base, not the box-free one
    free = next(i for i, e in enumerate(demo.demo_examples()) if e.box is None)
    *_, model, trained, _, _ = demo.example_fill(api.client(), free)
    assert model["value"] == "tiny-nobox" and trained["value"] == "job-9/final"

    api.routes["GET /api/models"] = {"items": [{"name": "tiny", "kind": "base"}]}  # no box-free base, nothing trained
    *_, model, trained, _, note = demo.example_fill(api.client(), free)
    assert "value" not in model and "tiny-nobox" in note and trained["value"] is None


def test_the_demo_request_sends_a_given_box_as_training_drew_it() -> None:
    request = demo.demo_request(_image(112, 112), "q?", "a, b", "tiny", 8, "13, 31, 37, 55")
    assert request["bbox"] == [13, 31, 37, 55] and "views" not in request  # the box drawn in red, the hint
    with pytest.raises(render.UiInputError, match="four numbers"):
        demo.demo_request(_image(112, 112), "q?", "a, b", "tiny", 8, "13, 31, 37")
    with pytest.raises(render.UiInputError, match="outside"):
        demo.demo_request(_image(112, 112), "q?", "a, b", "tiny", 8, "13, 31, 137, 55")


def test_the_demo_answers_with_base_and_trained_side_by_side(api: FakeApi) -> None:
    def answer_by_model(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        reply = inspect_json(body["model"]) | {"student_text": "D" if body["model"] == "tiny" else "A"}
        return httpx.Response(200, json=reply | {"student_choice": reply["student_text"]})

    api.routes["POST /api/inspect"] = answer_by_model
    request = {"model": "tiny", "options": ["red", "green", "blue", "yellow"]}
    base_title, base_text, _, _, panel, title, text, _, _ = demo.ask_side_by_side(
        api.client(), request, None, "job-7/final", "yellow"
    )
    assert [body["model"] for body in api.bodies("POST /api/inspect")] == ["tiny", "job-7/final"]
    assert base_text == "D. yellow" and "✓ right" in base_title and "`tiny`" in base_title
    assert text == "A. red" and "job-7/final" in title and "**yellow**" in title and panel["visible"] is True
    alone = demo.ask_side_by_side(api.client(), request, None, None, None)
    assert alone[4]["visible"] is False and alone[1] == "D. yellow" and "right" not in alone[0]
    assert len(api.bodies("POST /api/inspect")) == 3  # no trained model: the base alone


def test_trained_for_picks_the_newest_final_model_of_that_base() -> None:
    models = [ModelInfo(name=f"job-{i}/final", kind="final", job_id=i) for i in (2, 5, 6)]
    models.append(ModelInfo(name="job-5/step-10", kind="checkpoint", job_id=5, step=10))
    jobs = [
        Job.model_validate(job_json(i, config={"model": base, "dataset": "d"}))
        for i, base in ((2, "tiny"), (5, "tiny"), (6, "x"))
    ]
    assert demo.trained_for("tiny", models, jobs) == "job-5/final"
    assert demo.trained_for("tiny-nobox", models, jobs) is None


def test_the_handlers_that_show_images_hand_gradio_finished_files() -> None:
    """Re-serving an image Gradio had rewritten in place ended short of its Content-Length: every handler that shows
    a picture (Inspect's previews, Demo's answers) hands Gradio a file written once (``render.served``)."""
    from frontend.app import build_ui

    blocks = list(build_ui("http://127.0.0.1:9").fns.values())
    fns = {block.name: block.fn for block in blocks}
    path = render.stable_png_path(_image(64, 48))
    student, teacher = fns["previews"](strings.SOURCE_UPLOAD, path, False, 10, 10, 30, 20)
    assert isinstance(student, str) and isinstance(teacher, str) and Image.open(student).size == (320, 240)
    serving = {block.name for block in blocks if getattr(block.fn, "serves_images", False)}
    assert {"previews", "on_load_sample", "on_run", "on_item", "on_ask"} <= serving, serving
