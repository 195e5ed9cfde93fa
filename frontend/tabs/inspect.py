"""Inspect: where, along its own answer, does the full-image student part ways with the crop teacher?

Pure callbacks first (values in, values out), then the layout and its wiring.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from frontend import drawing, render, strings
from frontend.client import Evidence, InspectResult, VopdClient
from frontend.context import UiContext, readable_errors, serve_images
from vopd.config import ViewConfig

BoxValues = tuple[float | None, float | None, float | None, float | None]
EMPTY_BOX: BoxValues = (None, None, None, None)


@dataclass
class SampleRef:
    """A dataset sample chosen as the image source; the server reads the original image itself."""

    dataset: str
    index: int


# ----------------------------------------------------------------------------- pure callbacks
def open_image(path: str | None) -> Image.Image | None:
    """The uploaded image (kept as a finished PNG file per session), in RGB; None before any upload."""
    if not path:
        return None
    with Image.open(path) as opened:
        return opened.convert("RGB")


def on_image_uploaded(path: str | None) -> tuple[str, tuple[float, float, float, float]]:
    """A fresh upload: stored as a lossless PNG named by its content, with a centred default box so both views show
    at once; the user then drags the box onto the evidence."""
    image = open_image(path)
    if image is None:
        raise render.UiInputError(strings.NEED_IMAGE)
    return render.stable_png_path(image), render.default_box(image.size)


def typed_box(box_values: BoxValues, image: Image.Image | None) -> tuple[float, float, float, float] | None:
    """The four number fields as a box inside the image, or None while they are incomplete or invalid."""
    try:
        return render.parse_box(box_values, image.size if image is not None else None)
    except render.UiInputError:
        return None


def evidence_label(evidence: Evidence) -> str:
    """What the dashed box on the image says: where the model looked, and how sure the search was."""
    source = strings.EVIDENCE_GIVEN if evidence.source == "given" else strings.EVIDENCE_SEARCH
    if evidence.confidence is None:
        return source
    return f"{source} · {strings.EVIDENCE_CONFIDENCE} {render.probability_text(evidence.confidence)}"


def surface(
    image_path: str | None,
    box_values: BoxValues,
    *,
    find_evidence: bool = False,
    evidence: Evidence | None = None,
) -> str:
    """The drawing surface: the uploaded image, the red box (none while the model is to find the evidence) and the
    evidence the model used in the last run, dashed."""
    image = open_image(image_path)
    box = None if find_evidence else typed_box(box_values, image)
    if evidence is not None and evidence.source == "given":
        evidence = None  # the red box already shows it
    return drawing.surface_html(
        image,
        box,
        evidence=evidence.box if evidence is not None else None,
        evidence_label=evidence_label(evidence) if evidence is not None else "",
        empty_message=strings.DRAWING_EMPTY,
        alt=strings.ANNOTATOR_LABEL,
    )


def upload_previews(
    image_path: str | None, box_values: BoxValues, evidence: Evidence | None = None
) -> tuple[Image.Image | None, ...]:
    """Student and teacher views of the uploaded image and the current box; nothing while the box is invalid.

    With the model's own ``evidence`` (a box-free run) they are what that run showed: the plain image (no box drawn,
    no hint) and the crop the search chose."""
    image = open_image(image_path)
    if image is None:
        return None, None
    searched = evidence is not None and evidence.source == "search"
    box = tuple(evidence.box) if searched else typed_box(box_values, image)  # type: ignore[union-attr]
    if box is None:
        return None, None
    try:
        views = ViewConfig(draw_box=False, hint="") if searched else None
        student, teacher = render.view_previews(render.png_bytes(image), box, views)  # type: ignore[arg-type]
        return render.enlarged(student), render.enlarged(teacher)
    except render.UiInputError:
        return None, None


def load_sample(client: VopdClient, dataset: str | None, index: float | None) -> tuple[Any, ...]:
    """Question, options, box and both views of a dataset sample; returns the sample as the new image source."""
    if not dataset:
        raise render.UiInputError(strings.NEED_DATASET)
    position = int(index or 0)
    page = client.samples(dataset, offset=position, limit=1, original=True)
    if not page.items:
        raise render.UiInputError(f"dataset {dataset} has {page.total} samples; index {position} does not exist")
    sample = page.items[0]
    box = sample.bbox or EMPTY_BOX
    # The sample's own image on the drawing surface, so its box can be dragged as an upload's can (older servers
    # send none: the box is typed then).
    image_path = render.stable_png_path(render.image_from_data_url(sample.image)) if sample.image else None
    find = sample.bbox is None  # a sample without a box: the model has to find the evidence itself
    return (
        sample.question,
        "\n".join(sample.options or []),
        *box,
        render.enlarged(render.image_from_data_url(sample.student_image)),
        render.enlarged(render.image_from_data_url(sample.teacher_image)),
        SampleRef(dataset, position),
        find,
        image_path,
        surface(image_path, box, find_evidence=find) if image_path else drawing.empty_html(strings.DRAWING_EMPTY),
    )


def build_request(
    *,
    source: str,
    image_path: str | None,
    sample: SampleRef | None,
    question: str,
    options_text: str,
    box_values: BoxValues,
    model: str | None,
    greedy: bool,
    max_new_tokens: float,
    alpha: float,
    show_topk: float,
    find_evidence: bool = False,
) -> dict[str, Any]:
    """The POST /api/inspect body, validated here first so mistakes are named before the server is asked.

    With ``find_evidence`` the body carries no box and asks for the search (``views.evidence``), so a dataset
    sample's own box is set aside too: the server lets the model search for the evidence itself and answers with
    the crop it chose (``evidence``)."""
    # Everything missing at once, each with where to give it (with no image, this used to say "Type a question.").
    missing = []
    if not model:
        missing.append(strings.MISSING_MODEL)
    if source == strings.SOURCE_SAMPLE and sample is None:
        missing.append(strings.MISSING_SAMPLE)
    if source != strings.SOURCE_SAMPLE and open_image(image_path) is None:
        missing.append(strings.MISSING_IMAGE)
    if not question or not question.strip():
        missing.append(strings.MISSING_QUESTION)
    if missing:
        raise render.UiInputError(strings.MISSING.format(items="; ".join(missing)))
    assert model is not None
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
        request |= {"dataset": sample.dataset, "sample": sample.index}
        if not find_evidence:
            request["bbox"] = list(render.parse_box(box_values))
    else:
        image = open_image(image_path)
        if image is None:
            raise render.UiInputError(strings.NEED_IMAGE)
        request["image_base64"] = base64.b64encode(render.png_bytes(image)).decode("ascii")
        if not find_evidence:
            request["bbox"] = list(render.parse_box(box_values, image.size))
    if find_evidence:
        request["views"] = {"evidence": "search"}
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


def render_result(
    result: InspectResult | None,
    metric: str,
    options: list[str] | None = None,
    scale_mode: str = strings.SCALE_ABSOLUTE,
) -> tuple[Any, str, str, str, str]:
    """Token strip, legend, rollout summary and both answers (an option's letter with its text)."""
    if result is None:
        return None, "", "", "", ""
    strip, scale = render.token_strip(result.tokens, metric, scale_mode)
    return (
        strip,
        render.legend_html(scale, metric, scale_mode),
        render.rollout_summary_markdown(result, metric),
        render.answer_text(result.student_text, result.student_choice, options),
        render.answer_text(result.teacher_answer, result.teacher_choice, options),
    )


def evidence_markdown(result: InspectResult | None) -> str:
    """Where the model looked: the box it was given, or the crop its own search chose (older servers say nothing)."""
    if result is None or result.evidence is None:
        return ""
    box = ", ".join(f"{round(v)}" for v in result.evidence.box)
    return strings.EVIDENCE_LINE.format(label=evidence_label(result.evidence), box=box)


def token_details(
    result: InspectResult | None, index: int | None, note: str = ""
) -> tuple[str, pd.DataFrame | None, ...]:
    if result is None or index is None or not 0 <= index < len(result.tokens):
        return strings.SELECT_TOKEN_HINT, None, None
    record = result.tokens[index]
    student, teacher = render.topk_tables(record)
    text = render.token_details_markdown(record)
    return (f"{note}  \n{text}" if note else text), student, teacher


def first_details(result: InspectResult | None, metric: str) -> tuple[str, pd.DataFrame | None, ...]:
    """The detail panel after a run: the most divergent token, the one the summary names (it opened on position 0)."""
    if result is None:
        return token_details(None, None)
    return token_details(
        result, render.most_divergent(result.tokens, metric), strings.MOST_DIVERGENT.format(metric=metric)
    )


# ----------------------------------------------------------------------------- layout and wiring
@dataclass
class InspectTab:
    model: gr.Dropdown
    compare_model: gr.Dropdown
    dataset: gr.Dropdown


def build_inspect_tab(ctx: UiContext) -> InspectTab:
    gr.Markdown(strings.INSPECT_INTRO)
    sample_state = gr.State(None)
    image_state = gr.State(None)  # the uploaded image as a PNG file path (original pixels)
    result_state = gr.State(None)
    compare_state = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            source = gr.Radio(
                [strings.SOURCE_UPLOAD, strings.SOURCE_SAMPLE], value=strings.SOURCE_UPLOAD, label=strings.SOURCE_LABEL
            )
            with gr.Row(visible=False) as sample_row:
                dataset = gr.Dropdown(
                    label=strings.DATASET_LABEL, choices=[], scale=3, min_width=160, elem_id="inspect-dataset"
                )
                sample_index = gr.Number(
                    0, label=strings.SAMPLE_INDEX_LABEL, precision=0, minimum=0, scale=1, min_width=100
                )
                load_button = gr.Button(strings.LOAD_SAMPLE, scale=1, min_width=100, elem_id="inspect-load-sample")
            with gr.Column(elem_id="inspect-drawing-area"):
                upload = gr.UploadButton(
                    strings.UPLOAD_IMAGE, file_types=["image"], size="sm", elem_id="inspect-upload"
                )
                drawer = gr.HTML(
                    drawing.empty_html(strings.DRAWING_EMPTY),
                    label=strings.ANNOTATOR_LABEL,
                    show_label=True,
                    container=True,
                    padding=True,
                    css_template=drawing.SURFACE_CSS,
                    js_on_load=drawing.SURFACE_JS,
                    elem_id="inspect-annotator",
                )
            find_evidence = gr.Checkbox(
                False, label=strings.FIND_EVIDENCE_LABEL, info=strings.FIND_EVIDENCE_INFO, elem_id="inspect-find"
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
            label=strings.STUDENT_VIEW_LABEL,
            type="pil",
            interactive=False,
            height=320,
            min_width=200,
            buttons=["fullscreen"],  # click to enlarge
            elem_id="inspect-student-view",
        )
        teacher_view = gr.Image(
            label=strings.TEACHER_VIEW_LABEL,
            type="pil",
            interactive=False,
            height=320,
            min_width=200,
            buttons=["fullscreen"],  # click to enlarge
            elem_id="inspect-teacher-view",
        )
    evidence_text = gr.Markdown(elem_id="inspect-evidence")
    with gr.Row():
        student_answer = gr.Textbox(
            label=strings.STUDENT_ANSWER_LABEL, interactive=False, min_width=200, elem_id="inspect-student-answer"
        )
        teacher_answer = gr.Textbox(
            label=strings.TEACHER_ANSWER_LABEL, interactive=False, min_width=200, elem_id="inspect-teacher-answer"
        )
    with gr.Row():
        metric = gr.Radio(list(render.METRIC_FIELDS), value=strings.METRIC_JSD, label=strings.METRIC_LABEL)
        scale_mode = gr.Radio(
            [strings.SCALE_ABSOLUTE, strings.SCALE_RELATIVE],
            value=strings.SCALE_ABSOLUTE,
            label=strings.SCALE_LABEL,
            elem_id="inspect-scale",
        )
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
            wrap=False,
            min_width=260,
            elem_id="inspect-student-topk",
        )
        teacher_topk = gr.Dataframe(
            headers=strings.TOPK_COLUMNS,
            label=strings.TEACHER_TOPK_LABEL,
            interactive=False,
            wrap=False,
            min_width=260,
            elem_id="inspect-teacher-topk",
        )
    gr.Markdown(render.topk_columns_help(), elem_id="inspect-topk-help")
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
        """A dataset sample brings its own image (drawn on the same surface once loaded): no upload button then."""
        sample = choice == strings.SOURCE_SAMPLE
        return gr.update(visible=sample), gr.update(visible=not sample)

    source.change(on_source, source, [sample_row, upload])

    @readable_errors
    def on_upload(file: Any, find: bool) -> tuple[Any, ...]:
        path = file if isinstance(file, str) else getattr(file, "name", None)
        stored, box = on_image_uploaded(path)
        return (stored, surface(stored, box, find_evidence=find), *box, None)

    upload.upload(on_upload, [upload, find_evidence], [image_state, drawer, *box_fields, result_state])

    def numbers_from_drawing(event: gr.EventData) -> tuple[Any, ...]:
        """A drag on the surface ends: its box (original pixels) fills the fields and is the box to use."""
        box = drawing.box_from_event(getattr(event, "_data", None))
        if box is None:
            return (gr.skip(),) * 5
        return (*box, False)

    drawer.input(numbers_from_drawing, None, [*box_fields, find_evidence])

    def redraw(path: str | None, find: bool, *box: float | None) -> Any:
        """Typed numbers (or the evidence switch) redraw the surface; the last run's evidence is dropped."""
        return surface(path, box, find_evidence=find) if path else gr.skip()  # type: ignore[arg-type]

    gr.on(
        [event for f in box_fields for event in (f.submit, f.blur)] + [find_evidence.input],
        redraw,
        [image_state, find_evidence, *box_fields],
        drawer,
    )

    def on_find(find: bool) -> list[Any]:
        return [gr.update(interactive=not find) for _ in box_fields]

    find_evidence.change(on_find, find_evidence, box_fields)

    @serve_images
    def previews(src: str, path: str | None, find: bool, *box: float | None) -> tuple[Any, Any]:
        """The views of the typed box; none while the model is to find the evidence (the run shows its own)."""
        if not path:
            return gr.skip(), gr.skip()
        return (None, None) if find else upload_previews(path, box)  # type: ignore[arg-type]

    gr.on(
        [f.change for f in box_fields] + [find_evidence.change],
        previews,
        [source, image_state, find_evidence, *box_fields],
        [student_view, teacher_view],
    )

    @serve_images
    @readable_errors
    def on_load_sample(request: gr.Request, dataset_id: str | None, index: float | None) -> tuple[Any, ...]:
        return load_sample(ctx.client(request), dataset_id, index)

    load_button.click(
        on_load_sample,
        [dataset, sample_index],
        [question, options, *box_fields, student_view, teacher_view, sample_state, find_evidence, image_state, drawer],
    )

    # --- run and render
    @serve_images
    @readable_errors
    def on_run(
        request: gr.Request,
        src: str,
        path: str | None,
        sample: SampleRef | None,
        question_text: str,
        options_text: str,
        find: bool,
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
        scale_name: str,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        progress(0.1, desc="running the student and the teacher...")
        body = build_request(
            source=src,
            image_path=path,
            sample=sample,
            question=question_text,
            options_text=options_text,
            box_values=(x0, y0, x1, y1),
            model=model_name,
            greedy=greedy_value,
            max_new_tokens=tokens,
            alpha=alpha_value,
            show_topk=topk,
            find_evidence=find,
        )
        result, compared = run_inspect(ctx.client(request), body, compare_name)
        first = render_result(result, metric_name, body.get("options"), scale_name)
        second = render_result(compared, metric_name, body.get("options"), scale_name)
        detail = first_details(result, metric_name)
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
            evidence_markdown(result),
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
        evidence_text,
    ]

    def after_run(
        src: str, path: str | None, find: bool, result: InspectResult | None, *box: float | None
    ) -> tuple[Any, ...]:
        """The evidence the run used, on the image; for a box-free run, the views it showed. (A step of its own: as
        outputs of the run, the drawing and the views would carry Gradio's "Error" badge whenever a run is refused.)"""
        if not path or result is None:
            return gr.skip(), gr.skip(), gr.skip()
        drawn = surface(path, box, find_evidence=find, evidence=result.evidence)  # type: ignore[arg-type]
        if result.evidence is None or result.evidence.source != "search":
            return drawn, gr.skip(), gr.skip()
        return (drawn, *upload_previews(path, box, result.evidence))  # type: ignore[arg-type]

    run_button.click(
        on_run,
        [
            source,
            image_state,
            sample_state,
            question,
            options,
            find_evidence,
            *box_fields,
            model,
            compare_model,
            greedy,
            max_new_tokens,
            alpha,
            show_topk,
            metric,
            scale_mode,
        ],
        run_outputs,
    ).success(
        after_run,
        [source, image_state, find_evidence, result_state, *box_fields],
        [drawer, student_view, teacher_view],
        show_progress="hidden",
    )

    def on_metric(
        result: InspectResult | None,
        compared: InspectResult | None,
        metric_name: str,
        options_text: str,
        scale_name: str,
    ) -> tuple[Any, ...]:
        try:
            option_list = render.parse_options(options_text)
        except render.UiInputError:
            option_list = None
        first = render_result(result, metric_name, option_list, scale_name)
        second = render_result(compared, metric_name, option_list, scale_name)
        return first[0], first[1], first[2], second[0], second[1], second[2]

    gr.on(
        [metric.change, scale_mode.change],
        on_metric,
        [result_state, compare_state, metric, options, scale_mode],
        [strip, legend, summary, compare_strip, compare_legend, compare_summary],
    )

    def on_select(result: InspectResult | None, event: gr.SelectData) -> tuple[Any, ...]:
        return token_details(result, event.index if isinstance(event.index, int) else None)

    strip.select(on_select, result_state, [details, student_topk, teacher_topk])

    return InspectTab(model=model, compare_model=compare_model, dataset=dataset)
