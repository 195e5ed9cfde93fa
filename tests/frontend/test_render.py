"""Pure display logic: the colour scale, top-k tables, inputs, previews, job and evaluation views."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image

from frontend import render, strings
from frontend.client import InspectResult, Job, Metric, TokenRecord
from tests.frontend.conftest import inspect_json, job_json, token_json


def test_robust_scale_is_mean_plus_minus_sigmas_narrowed_to_the_data() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    mean, sigma = 2.5, math.sqrt(1.25)
    scale = render.robust_scale(values, sigmas=0.5)
    assert scale.low == pytest.approx(mean - 0.5 * sigma)
    assert scale.high == pytest.approx(mean + 0.5 * sigma)
    wide = render.robust_scale(values)  # 2.5 sigma reaches past the data: the data's own range is used
    assert (wide.low, wide.high) == (1.0, 4.0)


def test_an_outlier_saturates_instead_of_washing_out_the_other_tokens() -> None:
    values = [0.1, 0.2, 0.3, 0.2, 0.1, 0.3, 0.2, 0.1, 0.3, 0.2] * 30 + [50.0]  # a 300-token answer
    scale = render.robust_scale(values)
    assert scale.high < 50.0
    assert scale.score(50.0) == 1.0
    naive = [(v - min(values)) / (max(values) - min(values)) for v in values]
    robust = [scale.score(v) for v in values]
    # the spread of ordinary tokens is far more visible than on a min-max scale
    assert robust[2] - robust[0] > 5 * (naive[2] - naive[0])
    assert all(0.0 <= s <= 1.0 for s in robust)


def test_degenerate_scales() -> None:
    assert render.robust_scale([]).score(1.0) == 0.5
    flat = render.robust_scale([0.3, 0.3])
    assert flat.score(0.3) == 0.5 and render.robust_scale([0.0, 0.0]).score(0.0) == 0.0
    assert render.robust_scale([0.1, float("nan"), 0.2]).score(float("inf")) == 1.0


def _tokens(*divergences: float) -> list[TokenRecord]:
    return [TokenRecord.model_validate(token_json(i, f"t{i}", i, d)) for i, d in enumerate(divergences)]


def test_token_strip_colors_by_the_chosen_divergence() -> None:
    tokens = _tokens(0.1, 0.4, 0.2)
    tokens[0] = tokens[0].model_copy(update={"reverse_kl": 9.0, "token": ""})
    jsd, _ = render.token_strip(tokens, strings.METRIC_JSD)
    reverse, _ = render.token_strip(tokens, strings.METRIC_REVERSE)
    assert [text for text, _ in jsd] == [render.EMPTY_TOKEN, "t1", "t2"]
    assert max(jsd, key=lambda pair: pair[1])[0] == "t1"
    assert max(reverse, key=lambda pair: pair[1])[0] == render.EMPTY_TOKEN
    with pytest.raises(render.UiInputError, match="unknown divergence"):
        render.token_strip(tokens, "cosine")


def test_legend_names_the_metric_and_both_ends() -> None:
    legend = render.legend_html(render.ColorScale(0.012, 0.5), "reverse KL")
    assert "reverse KL" in legend and "0.012" in legend and "0.5" in legend and "2.5σ" in legend


def test_topk_frame_has_log_ratio_where_both_sides_list_the_token_and_a_tail_row() -> None:
    record = TokenRecord.model_validate(token_json(0, "A", 5, 0.2))
    student, teacher = render.topk_tables(record)
    assert list(student.columns) == strings.TOPK_COLUMNS
    shared = student.iloc[0]
    assert shared["token"] == "A" and shared["Δ log p"] == f"{math.log(0.6 / 0.3):+.3g}" == "+0.693"
    assert teacher.iloc[0]["Δ log p"] == "-0.693"
    only_student = student.iloc[1]
    assert only_student["token"] == "x" and only_student["note"] == strings.TOPK_NOT_LISTED
    assert only_student["Δ log p"] == ""
    assert student.iloc[-1]["token"] == strings.TOPK_TAIL and student.iloc[-1]["p"] == "20.0%"
    assert teacher.iloc[-1]["p"] == "45.0%"


@pytest.mark.parametrize(
    ("prob", "text"),
    [
        (0.6, "60.0%"),
        (0.123456, "12.3%"),
        (0.00412, "0.412%"),
        (0.0001234, "0.0123%"),
        (3.1e-7, "3.10e-05%"),  # rounded to 4 decimals, every one of these used to print as 0
        (0.99999, "100%"),
        (1.0, "100%"),
        (0.0, "0%"),
    ],
)
def test_probabilities_show_three_significant_figures(prob: float, text: str) -> None:
    assert render.probability_text(prob) == text


@pytest.mark.parametrize(
    ("token", "shown"),
    [
        ("\n", "<0x0A>"),
        ("a\tb", "a<0x09>b"),
        ("\x7f", "<0x7F>"),
        ("\ufffd", "<byte>"),  # one byte of a multi-byte character, decoded alone
        (" the", " the"),
        ("é", "é"),
        ("", render.EMPTY_TOKEN),
    ],
)
def test_unprintable_tokens_show_by_their_byte_value(token: str, shown: str) -> None:
    assert render.display_token(token) == shown


def test_every_topk_column_has_a_one_line_explanation_and_short_headers() -> None:
    help_text = render.topk_columns_help()
    assert help_text.count("\n") == len(strings.TOPK_COLUMNS) - 1
    assert "**Δ log p**: log p(this side) − log p(other side)" in help_text
    assert "&lt;0xNN&gt;" in help_text and "<0xNN>" not in help_text  # markdown would take it for an HTML tag
    assert all(len(name) <= 7 for name in strings.TOPK_COLUMNS)  # no header wraps (it used to read "ran k")


@pytest.mark.parametrize(
    ("text", "choice", "options", "shown"),
    [
        ("B", "B", ["red", "green"], "B. green"),
        ("Answer: B", "B", ["red", "green"], "B. green"),
        ("B", "B", None, "B"),
        ("a small red circle", None, None, "a small red circle"),
        ("", None, None, "(empty)"),
    ],
)
def test_answers_show_the_options_text_with_its_letter(text, choice, options, shown) -> None:
    assert render.answer_text(text, choice, options) == shown


def test_an_open_question_answered_with_a_bare_letter_is_flagged() -> None:
    shown = render.answer_text("B", None, None)
    assert shown.startswith("B (a bare letter, though no options were given")


def test_details_and_summary_point_at_argmax_disagreements() -> None:
    data = inspect_json(divergences=(0.1, 0.9, 0.2))
    data["tokens"][1]["argmax_agree"] = False
    data["tokens"][1]["teacher_top"][0]["token"] = "Z"
    result = InspectResult.model_validate(data)
    summary = render.rollout_summary_markdown(result, strings.METRIC_JSD)
    assert "disagree at 1 of 3 positions: #1 `t1`" in summary and "highest at #1" in summary
    details = render.token_details_markdown(result.tokens[1])
    assert "argmaxes disagree" in details and "`Z`" in details and "teacher 1.500" in details


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", None), ("red, green ,blue", ["red", "green", "blue"]), ("a, b\nc, d\n", ["a, b", "c, d"])],
)
def test_parse_options(text: str, expected: list[str] | None) -> None:
    assert render.parse_options(text) == expected


def test_a_single_option_is_refused() -> None:
    with pytest.raises(render.UiInputError, match="at least two options"):
        render.parse_options("only")


def test_parse_box_names_what_is_wrong() -> None:
    assert render.parse_box([1, 2, 30, 40], (64, 64)) == (1.0, 2.0, 30.0, 40.0)
    with pytest.raises(render.UiInputError, match="set the evidence box"):
        render.parse_box([1, None, 3, 4])
    with pytest.raises(render.UiInputError, match="x1 > x0"):
        render.parse_box([10, 0, 5, 4])
    with pytest.raises(render.UiInputError, match="outside the 64x48 image"):
        render.parse_box([0, 0, 10, 50], (64, 48))
    with pytest.raises(render.UiInputError, match="negative"):
        render.parse_box([-1, 0, 10, 10])


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (255, 255, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_view_previews_are_what_the_models_see() -> None:
    student, teacher = render.view_previews(_png(96, 64), (40, 20, 60, 40))
    assert student.size == (96, 64)
    assert student.getpixel((38, 30)) == (255, 0, 0)  # the red outline just outside the box
    assert student.getpixel((50, 30)) == (255, 255, 255)  # the evidence itself is untouched
    assert teacher.size == (40, 40)  # 20x20 box, upscaled 2x (the paper's setting)


def test_stable_png_path_is_lossless_and_reused() -> None:
    image = Image.new("RGB", (7, 5), (1, 2, 3))
    first, second = render.stable_png_path(image), render.stable_png_path(image)
    assert first == second
    with Image.open(first) as reread:
        assert reread.convert("RGB").getpixel((3, 3)) == (1, 2, 3)


def test_job_table_and_header() -> None:
    queued = Job.model_validate(
        job_json(2, status="queued", queue_position=3, progress=0.0, step=0, total_steps=None, eta_seconds=None)
    )
    running = Job.model_validate(job_json(1, eta_seconds=125.0))
    table = render.job_rows([queued, running])
    assert table["queue pos."].tolist() == [3, ""]
    assert table["ETA"].tolist() == ["", "2m05s"]
    assert table["step"].tolist() == ["0", "2/4"]
    assert "queue position 3" in render.job_header_markdown(queued)
    failed = Job.model_validate(job_json(4, status="failed", error="out of memory: CUDA"))
    assert "**Failed:** out of memory: CUDA" in render.job_header_markdown(failed)
    assert 'value="0.5000"' in render.progress_html(running)


def test_job_header_names_the_rollout_engine_and_its_speed() -> None:
    asked = {"model": "tiny", "dataset": "synth-64", "steps": 4, "rollout": {"engine": "vllm"}}
    vllm = Job.model_validate(job_json(5, config=asked, latest_metrics={"rollout/tokens_per_s": 1234.4}))
    assert "rollouts `vllm` at 1,234 tok/s" in render.job_header_markdown(vllm)
    default = Job.model_validate(job_json(6))  # nothing asked, no step done yet
    assert "rollouts `auto`" in render.job_header_markdown(default)
    assert "rollouts" not in render.job_header_markdown(Job.model_validate(job_json(7, kind="eval")))


def test_job_header_shows_the_engine_the_worker_resolved() -> None:
    """auto is what was asked; the header shows what ran (the API's engine, from the trainer's rollout/engine)."""
    resolved = job_json(8, latest_metrics={"rollout/engine": "vllm", "rollout/tokens_per_s": 10.0})
    assert resolved["engine"] == "vllm"  # the server's own schema derives it
    header = render.job_header_markdown(Job.model_validate(resolved))
    assert "rollouts `vllm` (asked `auto`) at 10 tok/s" in header
    forced = job_json(9, config={"model": "tiny", "dataset": "d", "rollout": {"engine": "hf"}}, engine="hf")
    assert "rollouts `hf`" in render.job_header_markdown(Job.model_validate(forced))
    assert "asked" not in render.job_header_markdown(Job.model_validate(forced))
    waiting = render.job_header_markdown(Job.model_validate(job_json(10)))
    assert "rollouts `auto` (resolved by the worker)" in waiting
    evaluation = job_json(11, kind="eval", config={"model": "tiny", "dataset": "d"}, result={"engine": "vllm", "n": 4})
    assert "answers `vllm` (asked `auto`)" in render.job_header_markdown(Job.model_validate(evaluation))


@pytest.mark.parametrize(("seconds", "text"), [(None, ""), (9.4, "9s"), (61, "1m01s"), (3700, "1h01m")])
def test_format_eta(seconds: float | None, text: str) -> None:
    assert render.format_eta(seconds) == text


def test_curve_frames_group_metrics_by_name() -> None:
    metrics = [
        Metric(
            id=1,
            step=1,
            data={
                "loss": 0.5,
                "divergence_mean": 0.2,
                "divergence_max": 0.9,
                "argmax_agreement": 0.4,
                "lr": 1e-4,
                "note": "x",
            },
        ),
        Metric(
            id=2,
            step=2,
            data={
                "loss": 0.4,
                "divergence_mean": 0.1,
                "divergence_max": None,
                "argmax_agreement": 0.5,
                "eval_accuracy": 0.3,
            },
        ),
    ]
    frames = render.curve_frames(metrics)
    assert frames["loss"]["value"].tolist() == [0.5, 0.4]
    assert sorted(set(frames["divergence"]["series"])) == ["divergence_max", "divergence_mean"]
    assert len(frames["divergence"]) == 3  # the missing max at step 2 is skipped, not drawn as zero
    assert frames["agreement"]["series"].unique().tolist() == ["argmax_agreement"]
    assert frames["accuracy"][["step", "value"]].values.tolist() == [[2, 0.3]]


def test_empty_curves_are_typed_so_plots_keep_numeric_axes() -> None:
    import gradio as gr

    frames = render.curve_frames([])
    assert all(len(frame) == 0 for frame in frames.values())
    payload = gr.LinePlot(x="step", y="value", color="series").postprocess(frames["loss"])
    assert payload.datatypes == {"step": "quantitative", "value": "quantitative", "series": "nominal"}


def test_eval_accuracy_frame_places_checkpoint_evaluations_by_step() -> None:
    train = Job.model_validate(job_json(5, status="succeeded", step=4, total_steps=4))
    evals = [
        Job.model_validate(
            job_json(
                6,
                kind="eval",
                status="succeeded",
                config={"model": "job-5/step-2"},
                result={"full_accuracy": 0.25, "crop_accuracy": 0.5},
            )
        ),
        Job.model_validate(
            job_json(
                7,
                kind="eval",
                status="succeeded",
                config={"model": "job-5/final"},
                result={"full_accuracy": 0.4, "crop_accuracy": 0.5},
            )
        ),
        Job.model_validate(
            job_json(
                8,
                kind="eval",
                status="succeeded",
                config={"model": "job-55/final"},
                result={"full_accuracy": 0.9, "crop_accuracy": 0.9},
            )
        ),
        Job.model_validate(job_json(9, kind="eval", status="running", config={"model": "job-5/step-3"})),
    ]
    frame = render.eval_accuracy_frame(train, evals)
    assert sorted(map(tuple, frame.values.tolist())) == [
        (2, 0.25, "full image"),
        (2, 0.5, "crop"),
        (4, 0.4, "full image"),
        (4, 0.5, "crop"),
    ]


def test_eval_table_chart_and_items() -> None:
    done = Job.model_validate(
        job_json(
            3,
            kind="eval",
            status="succeeded",
            config={"model": "tiny", "dataset": "d"},
            result={"full_accuracy": 0.25, "crop_accuracy": 0.75, "gap": 0.5, "n": 4},
        )
    )
    pending = Job.model_validate(job_json(4, kind="eval", status="queued", config={"model": "job-1/final"}))
    table = render.eval_table([done, pending])
    assert table.iloc[0][["full-image acc.", "crop acc.", "gap", "n"]].tolist() == [0.25, 0.75, 0.5, 4]
    assert table.iloc[1]["status"] == "queued"
    chart = render.eval_chart_frame([done, pending])
    assert chart.values.tolist() == [["tiny (#3)", 0.25, "full image"], ["tiny (#3)", 0.75, "crop"]]
    records = [
        {
            "id": "s1",
            "question": "q?",
            "options": ["a", "b"],
            "answer": "b",
            "full_text": "A",
            "full_choice": "A",
            "full_correct": False,
            "crop_text": "B",
            "crop_choice": "B",
            "crop_correct": True,
        }
    ]
    rows = render.item_rows(records)
    assert rows.iloc[0][["✓ student", "✓ teacher"]].tolist() == ["✗", "✓"]
    assert "Teacher (crop): B. b ✓" in render.item_markdown(records[0])
    assert rows.iloc[0]["teacher"] == "B. b"


def test_image_from_data_url_round_trip() -> None:
    import base64

    url = "data:image/png;base64," + base64.b64encode(_png(5, 3)).decode()
    assert render.image_from_data_url(url).size == (5, 3)


def test_served_images_are_finished_files_written_once(tmp_path) -> None:
    """Finding: re-serving an image logged "Response content shorter than Content-Length". Gradio writes a PIL output
    into its cache on every event, in place under a name its content decides, so the same image shown again was
    rewritten while a browser still read it. Handed a finished file, Gradio copies it once and never rewrites it."""
    import os

    from gradio import processing_utils

    image = Image.new("RGB", (40, 30), (10, 200, 30))
    first = processing_utils.save_pil_to_cache(image, str(tmp_path), format="png")
    written = os.stat(first).st_mtime_ns
    os.utime(first, ns=(written - 10**9, written - 10**9))
    processing_utils.save_pil_to_cache(image, str(tmp_path), format="png")
    assert os.stat(first).st_mtime_ns > written - 10**9  # the cause: the same picture written again, in place

    outputs = render.served((image, "text", [image], None, {"visible": True}))
    path = outputs[0]
    assert (
        isinstance(path, str)
        and outputs[2] == [path]
        and outputs[1:2] + outputs[3:] == ("text", None, {"visible": True})
    )
    assert Image.open(path).tobytes() == image.tobytes()
    before = os.stat(path)
    cached = processing_utils.save_file_to_cache(render.served(image), str(tmp_path))
    again = processing_utils.save_file_to_cache(render.served(image), str(tmp_path))
    assert again == cached and (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
