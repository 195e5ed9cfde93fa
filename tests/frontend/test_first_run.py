"""A newcomer's first run: the default recipe and sets, and base vs trained on held-out data from the job page."""

from __future__ import annotations

from typing import Any

import httpx
import pandas as pd
import pytest

from frontend import render, strings
from frontend.client import Job
from frontend.context import HELD_OUT_DATASET_ID, TRAIN_DATASET_ID, choices_update
from frontend.tabs import jobs, train
from tests.frontend.conftest import FakeApi, job_json


def _train_job(**overrides: Any) -> Job:
    fields: dict[str, Any] = {
        "status": "succeeded",
        "step": 300,
        "total_steps": 300,
        "config": {"model": "tiny", "dataset": TRAIN_DATASET_ID, "steps": 300},
        "result": {"model": "job-5/final"},
    }
    fields.update(overrides)
    return Job.model_validate(job_json(5, **fields))


def _eval_job(job_id: int, model: str, dataset: str, full: float | None, status: str = "succeeded") -> Job:
    result = None if full is None else {"full_accuracy": full, "crop_accuracy": 1.0, "gap": 1 - full, "n": 400}
    return Job.model_validate(
        job_json(job_id, kind="eval", status=status, config={"model": model, "dataset": dataset}, result=result)
    )


def test_the_dataset_ids_are_the_ones_the_server_registers() -> None:
    from app.bootstrap import HELD_OUT_DATASET_ID as SERVER_HELD_OUT
    from app.bootstrap import TRAIN_DATASET_ID as SERVER_TRAIN

    assert (TRAIN_DATASET_ID, HELD_OUT_DATASET_ID) == (SERVER_TRAIN, SERVER_HELD_OUT)


def test_the_default_preset_is_the_recipe_that_shows_a_gain() -> None:
    """The form opens on tiny-world (300 steps of 16 prompts), not the 20-step smoke test that showed none."""
    assert train.PRESETS[train.DEFAULT_PRESET] == "tiny-world"
    config = train.config_from_form("tiny", TRAIN_DATASET_ID, train.preset_values(train.DEFAULT_PRESET), "")
    assert (config.steps, config.batch_size, config.lr) == (300, 16, 1e-4)
    assert (config.divergence.alpha, config.teacher.mode, config.freeze_vision_tower) == (0.0, "fixed", False)
    assert config.vision_lr_scale == 0.3 and config.rollout.num_rollouts == 1


def test_dataset_dropdowns_prefer_their_set_over_the_first_one() -> None:
    choices = [("small", "synth-64"), ("train", TRAIN_DATASET_ID), ("held", HELD_OUT_DATASET_ID)]
    assert choices_update(choices, None, preferred=HELD_OUT_DATASET_ID)["value"] == HELD_OUT_DATASET_ID
    assert choices_update(choices, None, preferred=TRAIN_DATASET_ID)["value"] == TRAIN_DATASET_ID
    assert choices_update(choices, "synth-64", preferred=HELD_OUT_DATASET_ID)["value"] == "synth-64"  # user's choice
    assert choices_update(choices[:1], None, preferred=HELD_OUT_DATASET_ID)["value"] == "synth-64"


def test_comparison_uses_the_held_out_set_never_the_training_set() -> None:
    job = _train_job()
    ids = ["synth-64", TRAIN_DATASET_ID, HELD_OUT_DATASET_ID]
    assert jobs.comparison_dataset(job, ids) == HELD_OUT_DATASET_ID
    assert jobs.comparison_dataset(_train_job(config={"model": "tiny", "dataset": HELD_OUT_DATASET_ID}), ids) == (
        "synth-64"
    )
    with pytest.raises(render.UiInputError, match="other than the training set"):
        jobs.comparison_dataset(job, [TRAIN_DATASET_ID])


def test_compare_button_submits_base_and_trained_on_the_held_out_set(api: FakeApi) -> None:
    job = _train_job()
    api.routes["GET /api/datasets"] = {
        "items": [
            {"id": TRAIN_DATASET_ID, "name": "t", "n_samples": 4800},
            {"id": HELD_OUT_DATASET_ID, "name": "h", "n_samples": 400},
        ]
    }
    api.routes["POST /api/jobs"] = job_json(9, kind="eval", status="queued", config={"model": "tiny"})
    submitted = jobs.submit_base_vs_trained(api.client(), job)
    assert len(submitted) == 2
    assert [body["config"] for body in api.bodies("POST /api/jobs")] == [
        {"model": "tiny", "dataset": HELD_OUT_DATASET_ID},
        {"model": "job-5/final", "dataset": HELD_OUT_DATASET_ID},
    ]
    assert all(body["kind"] == "eval" for body in api.bodies("POST /api/jobs"))


def test_compare_is_offered_only_once_training_succeeded() -> None:
    assert jobs.can_compare(_train_job())
    assert not jobs.can_compare(_train_job(status="running"))
    with pytest.raises(render.UiInputError, match="once training has succeeded"):
        jobs.base_vs_trained_configs(_train_job(status="failed"), HELD_OUT_DATASET_ID)
    assert jobs.base_vs_trained_markdown(_train_job(), []) == strings.COMPARE_OFFER
    assert jobs.base_vs_trained_markdown(_train_job(status="running"), []) == ""


def test_job_page_shows_base_and_trained_side_by_side_with_the_gain() -> None:
    job = _train_job()
    evals = [
        _eval_job(6, "job-5/final", TRAIN_DATASET_ID, 0.9),  # on its training set: not the comparison
        _eval_job(7, "tiny", HELD_OUT_DATASET_ID, 0.66),
        _eval_job(8, "job-5/final", HELD_OUT_DATASET_ID, 0.775),
    ]
    text = jobs.base_vs_trained_markdown(job, evals)
    assert f"`{HELD_OUT_DATASET_ID}`" in text
    assert "| base | `tiny` | succeeded | 66.0% | 100.0% | 400 |" in text
    assert "| trained | `job-5/final` | succeeded | 77.5% | 100.0% | 400 |" in text
    assert "+11.5 points" in text
    running = jobs.base_vs_trained_markdown(
        job, [*evals[:2], _eval_job(8, "job-5/final", HELD_OUT_DATASET_ID, None, "running")]
    )
    assert "running (50%)" in running and "points" not in running


def test_accuracy_plot_has_one_series_per_dataset_with_the_base_at_step_zero() -> None:
    job = _train_job()
    evals = [
        _eval_job(6, "job-5/final", TRAIN_DATASET_ID, 0.9),
        _eval_job(7, "tiny", HELD_OUT_DATASET_ID, 0.66),
        _eval_job(8, "job-5/final", HELD_OUT_DATASET_ID, 0.775),
        _eval_job(9, "tiny", "elsewhere", 0.5),  # the base on a set this job's weights were never evaluated on
    ]
    frame = render.eval_accuracy_frame(job, evals)
    series = {name: group[["step", "value"]].values.tolist() for name, group in frame.groupby("series")}
    assert series == {
        f"full image · {HELD_OUT_DATASET_ID}": [[0, 0.66], [300, 0.775]],
        f"crop · {HELD_OUT_DATASET_ID}": [[0, 1.0], [300, 1.0]],
        f"full image · {TRAIN_DATASET_ID}": [[300, 0.9]],
        f"crop · {TRAIN_DATASET_ID}": [[300, 1.0]],
    }


def test_a_series_with_one_point_is_drawn_as_points() -> None:
    single = render.curve_frame([{"step": 4, "value": 0.5, "series": "full image · d"}])
    assert jobs.measured_value(single)["mark"] == "point"
    line = render.curve_frame([{"step": s, "value": 0.5, "series": "loss"} for s in (1, 2)])
    assert jobs.measured_value(line)["mark"] == "line"
    assert jobs.measured_value(None) is None


def test_an_evaluation_finishing_after_training_redraws_the_accuracy_plot(api: FakeApi) -> None:
    """The job itself no longer changes (succeeded, no new metrics): the finished evaluation must still redraw."""
    api.routes["GET /api/jobs/5"] = _train_job().model_dump(mode="json")
    api.routes["GET /api/jobs/5/metrics"] = {"items": [], "next_since": 0}
    api.routes["GET /api/jobs/5/logs"] = {"items": [], "next_since": 0}
    api.routes["GET /api/jobs/5/artifacts"] = {"items": []}
    page = {"items": [job_json(8, kind="eval", status="running", config={"model": "job-5/final"})], "total": 1}
    api.routes["GET /api/jobs"] = lambda request: httpx.Response(200, json={**page, "limit": 200, "offset": 0})
    first = jobs.poll_job(api.client(), None, 5)
    assert jobs.poll_job(api.client(), first.view, 5).evaluations_changed is False
    page["items"] = [
        job_json(
            8,
            kind="eval",
            status="succeeded",
            config={"model": "job-5/final", "dataset": HELD_OUT_DATASET_ID},
            result={"full_accuracy": 0.7, "crop_accuracy": 1.0},
        )
    ]
    later = jobs.poll_job(api.client(), first.view, 5)
    assert later.evaluations_changed and not later.status_changed and not later.new_metrics
    assert isinstance(jobs.curves(later)[3], pd.DataFrame)


def test_evaluate_moves_to_the_held_out_set_when_no_dataset_is_chosen_yet() -> None:
    """On page load the models' choice arrives first, with no dataset yet: it used to pick the first set (the
    training set)."""
    from frontend.tabs import evaluate

    ids = ["synth-64", TRAIN_DATASET_ID, HELD_OUT_DATASET_ID]
    assert evaluate.held_out_dataset(None, ids, {}) == HELD_OUT_DATASET_ID
    assert evaluate.held_out_dataset("synth-64", ids, {}) == "synth-64"  # the user's choice stays
    assert evaluate.held_out_dataset(TRAIN_DATASET_ID, ids, {"job-1/final": TRAIN_DATASET_ID}) == HELD_OUT_DATASET_ID


def test_the_evaluate_chart_is_rebuilt_only_when_its_bars_change() -> None:
    """Each new ``sort`` rebuilds Gradio's chart (and leaked a resize observer that threw page errors): the order
    is sent when it changes, and a drawn chart is not emptied while the next evaluation runs."""
    from frontend.tabs import evaluate

    done = _eval_job(7, "tiny", HELD_OUT_DATASET_ID, 0.66)
    _, chart = evaluate.comparison([done])
    first, shown = evaluate.chart_update(chart, None)
    assert first["sort"] == shown["order"] and len(shown["order"]) == 2 and not evaluate.chart_settled(shown)
    again, shown = evaluate.chart_update(chart, shown)  # the next tick sends the bars again, without a rebuild
    assert "sort" not in again and again["value"] is chart and evaluate.chart_settled(shown)
    kept, still = evaluate.chart_update(None, shown)
    assert kept == evaluate.gr.skip() and still == shown


def test_the_demos_sample_question_has_one_right_answer_and_a_model_that_fits_it() -> None:
    """The box-free world's question: its target is the only black object of the picture (the earlier "What color
    is the small shape?" fitted many shapes), asked of the box-free base the server registers."""
    from app.bootstrap import NO_BOX_MODEL_NAME
    from vopd.synth import NO_BOX_QUESTION, NO_BOX_TARGET_COLOR, SHAPE_OPTIONS

    assert NO_BOX_QUESTION.format(color=NO_BOX_TARGET_COLOR) == strings.DEMO_QUESTION
    assert [option.strip() for option in strings.DEMO_OPTIONS.split(",")] == list(SHAPE_OPTIONS)
    assert strings.DEMO_MODEL == NO_BOX_MODEL_NAME
