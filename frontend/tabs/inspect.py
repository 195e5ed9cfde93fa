"""Inspect: where, along its own answer, does the full-image student part ways with the crop teacher?

Pure callbacks first (values in, values out), then the layout and its wiring.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
from gradio_image_annotation import image_annotator
from PIL import Image

from frontend import render, strings
from frontend.client import InspectResult, VopdClient
from frontend.context import UiContext, readable_errors

BoxValues = tuple[float | None, float | None, float | None, float | None]
EMPTY_BOX: BoxValues = (None, None, None, None)


@dataclass
class SampleRef:
    """A dataset sample chosen as the image source; the server reads the original image itself."""

    dataset: str
    index: int


# ----------------------------------------------------------------------------- pure callbacks
def image_of(annotation: dict[str, Any] | None) -> Image.Image | None:
    """The uploaded image of the annotator's value (a PIL image; a file path is accepted too)."""
    image = (annotation or {}).get("image")
    if image is None or isinstance(image, Image.Image):
        return image
    with Image.open(image) as opened:
        return opened.convert("RGB")


def _box_label(box: tuple[float, float, float, float]) -> str:
    return ",".join(f"{round(v)}" for v in box)


def box_after_annotation(annotation: dict[str, Any] | None) -> tuple[float, float, float, float] | None:
    """The box the user drew or moved, for the four number fields; None when there is nothing new.

    Every box the UI itself puts into the drawing (an upload's default box, typed numbers) carries its own corners
    as its label, and the drawing reports it back as a change event, possibly after the user typed on. A box whose
    corners still match its label is such an echo and is ignored, so it never overwrites typing; one the user
    dragged no longer matches. The check looks only at the value itself: no state that could race.
    """
    boxes = (annotation or {}).get("boxes")
    box = render.box_from_annotation(boxes)
    if box is None or boxes[-1].get("label") == _box_label(box):  # type: ignore[index]
        return None
    return box


def _annotator_value(image: Image.Image, box: tuple[float, float, float, float]) -> dict[str, Any]:
    """A finished PNG (never a PIL image, which Gradio would re-encode into a file it rewrites on every event,
    racing concurrent readers) and one red box labelled with its corners."""
    x0, y0, x1, y1 = (round(v) for v in box)
    drawn = {"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1, "label": _box_label(box), "color": "rgb(255, 0, 0)"}
    return {"image": render.stable_png_path(image), "boxes": [drawn]}


def annotation_with_default_box(
    annotation: dict[str, Any] | None,
) -> tuple[dict[str, Any], tuple[float, float, float, float]] | None:
    """A fresh upload gets a centred box so both views show at once; the user then drags it onto the evidence.
    None when there is no image or a box is already drawn."""
    image = image_of(annotation)
    if image is None or (annotation or {}).get("boxes"):
        return None
    box = render.default_box(image.size)
    return _annotator_value(image, box), box


def annotation_with_box(annotation: dict[str, Any] | None, box_values: BoxValues) -> dict[str, Any] | None:
    """Typed numbers move the drawn box; None (leave the drawing alone) without an image, for invalid numbers,
    or when the drawing already shows exactly this box."""
    image = image_of(annotation)
    if image is None:
        return None
    try:
        box = render.parse_box(box_values, image.size)
    except render.UiInputError:
        return None
    current = render.box_from_annotation((annotation or {}).get("boxes"))
    if current is not None and tuple(round(v) for v in current) == tuple(round(v) for v in box):
        return None
    return _annotator_value(image, box)


def relabelled(annotation: dict[str, Any], box: tuple[float, float, float, float]) -> dict[str, Any]:
    """After the user moved the box, its label shows the new corners (and marks the value as known)."""
    image = image_of(annotation)
    assert image is not None
    return _annotator_value(image, box)


def upload_previews(annotation: dict[str, Any] | None, box_values: BoxValues) -> tuple[Image.Image | None, ...]:
    """Student and teacher views of the uploaded image and the current box; nothing while the box is invalid."""
    image = image_of(annotation)
    if image is None:
        return None, None
    try:
        box = render.parse_box(box_values, image.size)
        return render.view_previews(render.png_bytes(image), box)
    except render.UiInputError:
        return None, None


def load_sample(client: VopdClient, dataset: str | None, index: float | None) -> tuple[Any, ...]:
    """Question, options, box and both views of a dataset sample; returns the sample as the new image source."""
    if not dataset:
        raise render.UiInputError(strings.NEED_DATASET)
    position = int(index or 0)
    page = client.samples(dataset, offset=position, limit=1)
    if not page.items:
        raise render.UiInputError(f"dataset {dataset} has {page.total} samples; index {position} does not exist")
    sample = page.items[0]
    box = sample.bbox or EMPTY_BOX
    return (
        sample.question,
        "\n".join(sample.options or []),
        *box,
        render.image_from_data_url(sample.student_image),
        render.image_from_data_url(sample.teacher_image),
        SampleRef(dataset, position),
    )


def build_request(
    *,
    source: str,
    annotation: dict[str, Any] | None,
    sample: SampleRef | None,
    question: str,
    options_text: str,
    box_values: BoxValues,
    model: str | None,
    greedy: bool,
    max_new_tokens: float,
    alpha: float,
    show_topk: float,
) -> dict[str, Any]:
    """The POST /api/inspect body, validated here first so mistakes are named before the server is asked."""
    if not model:
        raise render.UiInputError(strings.NEED_MODEL)
    if not question or not question.strip():
        raise render.UiInputError(strings.NEED_QUESTION)
    request: dict[str, Any] = {
        "model": model,
        "question": question.strip(),
        "options": render.parse_options(options_text),
        "greedy": bool(greedy),
        "max_new_tokens": int(max_new_tokens),
        "show_topk": int(show_topk),
        "divergence": {"alpha": float(alpha)},
    }
    if source == strings.SOURCE_SAMPLE:
        if sample is None:
            raise render.UiInputError("load a dataset sample first (or switch the source to Upload)")
        request |= {"dataset": sample.dataset, "sample": sample.index, "bbox": list(render.parse_box(box_values))}
    else:
        image = image_of(annotation)
        if image is None:
            raise render.UiInputError(strings.NEED_IMAGE)
        box = render.parse_box(box_values, image.size)
        request |= {"image_base64": base64.b64encode(render.png_bytes(image)).decode("ascii"), "bbox": list(box)}
    return request


def run_inspect(
    client: VopdClient, request: dict[str, Any], compare_model: str | None
) -> tuple[InspectResult, InspectResult | None]:
    """The chosen model, and optionally a second one on the very same request (before vs after training)."""
    result = client.inspect(request)
    compared = None
    if compare_model and compare_model != request["model"]:
        compared = client.inspect({**request, "model": compare_model})
    return result, compared


def render_result(result: InspectResult | None, metric: str) -> tuple[Any, str, str, str, str]:
    """Token strip, legend, rollout summary and both answers."""
    if result is None:
        return None, "", "", "", ""
    strip, scale = render.token_strip(result.tokens, metric)
    return (
        strip,
        render.legend_html(scale, metric),
        render.rollout_summary_markdown(result, metric),
        render.answer_text(result.student_text, result.student_choice),
        render.answer_text(result.teacher_answer, result.teacher_choice),
    )


def token_details(result: InspectResult | None, index: int | None) -> tuple[str, pd.DataFrame | None, ...]:
    if result is None or index is None or not 0 <= index < len(result.tokens):
        return strings.SELECT_TOKEN_HINT, None, None
    record = result.tokens[index]
    student, teacher = render.topk_tables(record)
    return render.token_details_markdown(record), student, teacher


# ----------------------------------------------------------------------------- layout and wiring
@dataclass
class InspectTab:
    model: gr.Dropdown
    compare_model: gr.Dropdown
    dataset: gr.Dropdown


def build_inspect_tab(ctx: UiContext) -> InspectTab:
    gr.Markdown(strings.INSPECT_INTRO)
    sample_state = gr.State(None)
    result_state = gr.State(None)
    compare_state = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            source = gr.Radio(
                [strings.SOURCE_UPLOAD, strings.SOURCE_SAMPLE], value=strings.SOURCE_UPLOAD, label=strings.SOURCE_LABEL
            )
            with gr.Row(visible=False) as sample_row:
                dataset = gr.Dropdown(label=strings.DATASET_LABEL, choices=[], scale=3, min_width=160)
                sample_index = gr.Number(
                    0, label=strings.SAMPLE_INDEX_LABEL, precision=0, minimum=0, scale=1, min_width=100
                )
                load_button = gr.Button(strings.LOAD_SAMPLE, scale=1, min_width=100, elem_id="inspect-load-sample")
            annotator = image_annotator(
                label=strings.ANNOTATOR_LABEL,
                image_type="pil",
                single_box=True,
                disable_edit_boxes=True,
                sources=["upload", "clipboard"],
                height=360,
                boxes_alpha=0.15,
                elem_id="inspect-annotator",
                show_download_button=False,
            )
            with gr.Row():
                box_fields = [
                    gr.Number(label=name, precision=0, minimum=0, min_width=70, elem_id=f"inspect-box-{name}")
                    for name in strings.BOX_LABELS
                ]
            gr.Markdown(strings.BOX_INFO)
        with gr.Column(scale=2, min_width=280):
            question = gr.Textbox(label=strings.QUESTION_LABEL, lines=2, elem_id="inspect-question")
            options = gr.Textbox(label=strings.OPTIONS_LABEL, lines=2, elem_id="inspect-options")
            model = gr.Dropdown(label=strings.MODEL_LABEL, info=strings.MODEL_INFO, choices=[], elem_id="inspect-model")
            compare_model = gr.Dropdown(
                label=strings.COMPARE_MODEL_LABEL, info=strings.COMPARE_MODEL_INFO, choices=[], value=None
            )
            with gr.Accordion("Decoding and divergence", open=False):
                greedy = gr.Checkbox(True, label=strings.GREEDY_LABEL)
                max_new_tokens = gr.Slider(
                    1, 256, value=32, step=1, label=strings.MAX_NEW_TOKENS_LABEL, elem_id="inspect-max-new-tokens"
                )
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label=strings.ALPHA_LABEL)
                show_topk = gr.Slider(1, 50, value=10, step=1, label=strings.TOPK_LABEL)
            run_button = gr.Button(strings.RUN_INSPECT, variant="primary", elem_id="inspect-run")
    with gr.Row():
        student_view = gr.Image(
            label=strings.STUDENT_VIEW_LABEL, type="pil", interactive=False, height=280, min_width=200
        )
        teacher_view = gr.Image(
            label=strings.TEACHER_VIEW_LABEL, type="pil", interactive=False, height=280, min_width=200
        )
    with gr.Row():
        student_answer = gr.Textbox(
            label=strings.STUDENT_ANSWER_LABEL, interactive=False, min_width=200, elem_id="inspect-student-answer"
        )
        teacher_answer = gr.Textbox(
            label=strings.TEACHER_ANSWER_LABEL, interactive=False, min_width=200, elem_id="inspect-teacher-answer"
        )
    metric = gr.Radio(list(render.METRIC_FIELDS), value=strings.METRIC_JSD, label=strings.METRIC_LABEL)
    legend = gr.HTML()
    strip = gr.HighlightedText(
        label=strings.TOKEN_STRIP_LABEL,
        show_legend=False,
        show_inline_category=False,
        combine_adjacent=False,
        elem_id="inspect-strip",
    )
    summary = gr.Markdown()
    details = gr.Markdown(strings.SELECT_TOKEN_HINT, elem_id="inspect-token-details")
    with gr.Row():
        student_topk = gr.Dataframe(
            headers=strings.TOPK_COLUMNS,
            label=strings.STUDENT_TOPK_LABEL,
            interactive=False,
            wrap=True,
            min_width=260,
            elem_id="inspect-student-topk",
        )
        teacher_topk = gr.Dataframe(
            headers=strings.TOPK_COLUMNS,
            label=strings.TEACHER_TOPK_LABEL,
            interactive=False,
            wrap=True,
            min_width=260,
            elem_id="inspect-teacher-topk",
        )
    with gr.Accordion(strings.COMPARE_STRIP_LABEL, open=True, visible=False) as compare_box:
        compare_legend = gr.HTML()
        compare_strip = gr.HighlightedText(
            label=strings.COMPARE_STRIP_LABEL, show_legend=False, show_inline_category=False
        )
        compare_summary = gr.Markdown()
        with gr.Row():
            compare_student = gr.Textbox(label=strings.STUDENT_ANSWER_LABEL, interactive=False, min_width=200)
            compare_teacher = gr.Textbox(label=strings.TEACHER_ANSWER_LABEL, interactive=False, min_width=200)

    # --- image source and box
    def on_source(choice: str) -> tuple[Any, Any]:
        """A dataset sample brings its own image: the drawing is for uploads only."""
        sample = choice == strings.SOURCE_SAMPLE
        return gr.update(visible=sample), gr.update(visible=not sample)

    source.change(on_source, source, [sample_row, annotator])

    def on_upload(annotation: dict | None) -> tuple[Any, ...]:
        fresh = annotation_with_default_box(annotation)
        return (gr.skip(),) * 5 if fresh is None else (fresh[0], *fresh[1])

    annotator.upload(on_upload, annotator, [annotator, *box_fields])

    def numbers_from_drawing(annotation: dict | None) -> tuple[Any, ...]:
        box = box_after_annotation(annotation)
        if box is None or annotation is None:
            return (gr.skip(),) * 5
        return (*box, relabelled(annotation, box))

    annotator.change(numbers_from_drawing, annotator, [*box_fields, annotator])

    def move_box(annotation: dict | None, *box: float | None) -> Any:
        moved = annotation_with_box(annotation, box)  # type: ignore[arg-type]
        return gr.skip() if moved is None else moved

    gr.on([event for f in box_fields for event in (f.submit, f.blur)], move_box, [annotator, *box_fields], annotator)

    def previews(src: str, annotation: dict | None, *box: float | None) -> tuple[Any, Any]:
        if src != strings.SOURCE_UPLOAD:
            return gr.skip(), gr.skip()
        return upload_previews(annotation, box)  # type: ignore[arg-type]

    gr.on([f.change for f in box_fields], previews, [source, annotator, *box_fields], [student_view, teacher_view])

    @readable_errors
    def on_load_sample(request: gr.Request, dataset_id: str | None, index: float | None) -> tuple[Any, ...]:
        return load_sample(ctx.client(request), dataset_id, index)

    load_button.click(
        on_load_sample,
        [dataset, sample_index],
        [question, options, *box_fields, student_view, teacher_view, sample_state],
    )

    # --- run and render
    @readable_errors
    def on_run(
        request: gr.Request,
        src: str,
        annotation: dict | None,
        sample: SampleRef | None,
        question_text: str,
        options_text: str,
        x0: float | None,
        y0: float | None,
        x1: float | None,
        y1: float | None,
        model_name: str | None,
        compare_name: str | None,
        greedy_value: bool,
        tokens: float,
        alpha_value: float,
        topk: float,
        metric_name: str,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        progress(0.1, desc="running the student and the teacher...")
        body = build_request(
            source=src,
            annotation=annotation,
            sample=sample,
            question=question_text,
            options_text=options_text,
            box_values=(x0, y0, x1, y1),
            model=model_name,
            greedy=greedy_value,
            max_new_tokens=tokens,
            alpha=alpha_value,
            show_topk=topk,
        )
        result, compared = run_inspect(ctx.client(request), body, compare_name)
        first = render_result(result, metric_name)
        second = render_result(compared, metric_name)
        detail = token_details(result, 0 if result.tokens else None)
        return (
            result,
            compared,
            *first,
            *detail,
            gr.update(visible=compared is not None),
            second[0],
            second[1],
            second[2],
            second[3],
            second[4],
        )

    run_outputs = [
        result_state,
        compare_state,
        strip,
        legend,
        summary,
        student_answer,
        teacher_answer,
        details,
        student_topk,
        teacher_topk,
        compare_box,
        compare_strip,
        compare_legend,
        compare_summary,
        compare_student,
        compare_teacher,
    ]
    run_button.click(
        on_run,
        [
            source,
            annotator,
            sample_state,
            question,
            options,
            *box_fields,
            model,
            compare_model,
            greedy,
            max_new_tokens,
            alpha,
            show_topk,
            metric,
        ],
        run_outputs,
    )

    def on_metric(result: InspectResult | None, compared: InspectResult | None, metric_name: str) -> tuple[Any, ...]:
        first, second = render_result(result, metric_name), render_result(compared, metric_name)
        return first[0], first[1], first[2], second[0], second[1], second[2]

    metric.change(
        on_metric,
        [result_state, compare_state, metric],
        [strip, legend, summary, compare_strip, compare_legend, compare_summary],
    )

    def on_select(result: InspectResult | None, event: gr.SelectData) -> tuple[Any, ...]:
        return token_details(result, event.index if isinstance(event.index, int) else None)

    strip.select(on_select, result_state, [details, student_topk, teacher_topk])

    return InspectTab(model=model, compare_model=compare_model, dataset=dataset)
