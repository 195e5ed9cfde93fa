"""Demo: fine-detail question answering, as a trained model is used at inference.

It rides on /api/inspect: without a box the "student" is simply the model looking at the bare image (no drawn box, no
hint), its rollout is the answer, and the server's evidence search says where the model looked, which is drawn on the
image; with a box the model sees it drawn in red with the hint, as in training. A gallery of examples (held-out
synthetic items rendered here, deterministically, by ``vopd.synth``: each question has one right answer) fills the
image, box and question and picks the base model that fits each; when a trained model of that base exists, the Demo
asks base and trained side by side.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import gradio as gr
from PIL import Image

from frontend import render, strings
from frontend.client import InspectResult, Job, ModelInfo, VopdClient
from frontend.context import UiContext, readable_errors, serve_images
from frontend.tabs.inspect import evidence_label

# The examples: items of the held-out synthetic sets (synth seed 2, as `synth-heldout`; never trained on by default),
# box world and box-free world. Chosen on the shipped bases: the box world's base answers the first two right from
# the full image and the third wrong (a trained model may do better); the box-free base answers its three right.
HELD_OUT_SEED = 2
EXAMPLE_ITEMS: tuple[tuple[bool, int], ...] = ((False, 0), (False, 1), (False, 11), (True, 2), (True, 3), (True, 7))
# The events that set model choices share one queue, so they apply in the order they were made: a tab's refresh of
# the choices, sent with the model shown then, arrived after a quick click on an example and undid its model.
CHOICES = "model-choices"
BOX_MODEL = "tiny"  # the box world's base (app.bootstrap registers both)
NO_BOX_MODEL = strings.DEMO_MODEL


@dataclass(frozen=True)
class DemoExample:
    """One gallery item: the picture, its question with one right answer, its box (None: box-free) and its model."""

    image_path: str
    thumbnail_path: str  # the gallery's picture: the image with its box outlined in red, as the model will see it
    question: str
    options: tuple[str, ...]
    answer: str
    box: tuple[int, int, int, int] | None
    model: str

    @property
    def caption(self) -> str:
        return f"{'With box' if self.box else 'No box'} · {self.question}"

    @property
    def box_text(self) -> str:
        return ", ".join(str(v) for v in self.box) if self.box else ""


@lru_cache(maxsize=1)
def demo_examples() -> tuple[DemoExample, ...]:
    """The examples, rendered by ``vopd.synth`` (numpy and PIL only; a few milliseconds) into the image folder."""
    from vopd.synth import SynthConfig, generate_item

    examples = []
    for no_box, index in EXAMPLE_ITEMS:
        config = SynthConfig(seed=HELD_OUT_SEED, n=index + 1, no_box=no_box)
        image, record = generate_item(config, index)
        box = None if no_box else tuple(int(v) for v in record["bbox"])
        examples.append(
            DemoExample(
                image_path=render.stable_png_path(image),
                thumbnail_path=render.stable_png_path(outlined(image, box)),
                question=record["question"],
                options=tuple(record["options"]),
                answer=record["answer"],
                box=box,
                model=NO_BOX_MODEL if no_box else BOX_MODEL,
            )
        )
    return tuple(examples)


def outlined(image: Image.Image, box: Sequence[int] | None) -> Image.Image:
    """``image`` with ``box`` outlined in red (a copy); as it is without a box."""
    if box is None:
        return image
    from PIL import ImageDraw

    shown = image.copy()
    ImageDraw.Draw(shown).rectangle(list(box), outline=(220, 30, 30), width=2)
    return shown


def trained_for(base: str | None, models: Sequence[ModelInfo], train_jobs: Sequence[Job]) -> str | None:
    """The newest trained (final) model whose training job started from ``base``; None when there is none."""
    started_from = {job.id: job.model_name for job in train_jobs}
    finals = [m for m in models if m.kind == "final" and m.job_id is not None and started_from.get(m.job_id) == base]
    return max(finals, key=lambda m: m.job_id or 0).name if finals else None


def trained_choices(models: Sequence[ModelInfo]) -> list[tuple[str, str]]:
    return [(f"{m.name}  (trained)", m.name) for m in models if m.kind == "final"]


def trained_update(client: VopdClient, base: str | None, current: str | None, *, keep: bool = True) -> Any:
    """The trained-model dropdown: every trained model offered; the current one kept (when ``keep``), else the newest
    trained from ``base``, else empty (the Demo then asks the base alone)."""
    models = client.models()
    choices = trained_choices(models)
    names = [name for _, name in choices]
    if keep and current in names:
        return gr.update(choices=choices, value=current)
    jobs = client.jobs(kind="train", status="succeeded", limit=100).items if names else []
    return gr.update(choices=choices, value=trained_for(base, models, jobs))


def example_fill(client: VopdClient, index: int) -> tuple[Any, ...]:
    """Clicking example ``index``: its image, question, options and box; its model when the server offers it (else
    the current one stays, and a note says so); the trained model of that base; and the right answer, kept to
    judge the answers by."""
    example = demo_examples()[index]
    offered = [m.name for m in client.models() if m.kind == "base"]
    model = gr.update(value=example.model) if example.model in offered else gr.update()
    note = "" if example.model in offered else strings.DEMO_MODEL_MISSING.format(model=example.model)
    trained = trained_update(client, example.model if example.model in offered else None, None, keep=False)
    return (
        example.image_path,
        example.question,
        ", ".join(example.options),
        example.box_text,
        model,
        trained,
        example.answer,
        note,
    )


def parse_box_text(text: str | None, image: Image.Image | None) -> tuple[float, float, float, float] | None:
    """``"x0, y0, x1, y1"`` (spaces or commas) as a box inside the image; empty: None (box-free)."""
    parts = [part for part in (text or "").replace(",", " ").split() if part]
    if not parts:
        return None
    try:
        values = [float(part) for part in parts]
    except ValueError as error:
        raise render.UiInputError(f"the box must be four numbers x0, y0, x1, y1, not {text!r}") from error
    if len(values) != 4:
        raise render.UiInputError(f"the box must be four numbers x0, y0, x1, y1, not {text!r}")
    return render.parse_box(values, image.size if image is not None else None)


def demo_request(
    image: Image.Image | None,
    question: str,
    options_text: str,
    model: str | None,
    max_new_tokens: float,
    box_text: str | None = None,
) -> dict[str, Any]:
    """The inspect body: without a box the plain image (no drawn box, no hint), as at inference; with a box the
    student's view of training (the box drawn in red, the hint)."""
    if image is None:
        raise render.UiInputError(strings.NEED_IMAGE)
    if not question or not question.strip():
        raise render.UiInputError(strings.NEED_QUESTION)
    if not model:
        raise render.UiInputError(strings.NEED_MODEL)
    box = parse_box_text(box_text, image)
    request: dict[str, Any] = {
        "model": model,
        "image_base64": base64.b64encode(render.png_bytes(image)).decode("ascii"),
        "question": question.strip(),
        "options": render.parse_options(options_text),
        "greedy": True,
        "max_new_tokens": int(max_new_tokens),
        "show_topk": 1,
    }
    if box is None:
        request["views"] = {"draw_box": False, "hint": ""}
    else:
        request["bbox"] = list(box)
    return request


def answer(client: VopdClient, request: dict[str, Any]) -> str:
    """The model's answer, in words: an option's letter with its text, an open question's reply as said."""
    return ask(client, request)[0]


def ask(client: VopdClient, request: dict[str, Any], image: Image.Image | None = None) -> tuple[str, Any, str]:
    """The answer, the image with where the model looked drawn on it (None without an image or an older server that
    does not say), and a caption for it."""
    result: InspectResult = client.inspect(request)
    text = render.answer_text(result.student_text, result.student_choice, request.get("options"))
    if image is None or result.evidence is None:
        return text, None, ""
    label = evidence_label(result.evidence)
    box = ", ".join(f"{round(v)}" for v in result.evidence.box)
    return (
        text,
        render.image_with_box(image, result.evidence.box, label),
        strings.DEMO_LOOKED.format(label=label, box=box),
    )


def verdict(text: str, expected: str | None) -> str:
    """What the title says of an answer to an example: right, or wrong and the right answer (nothing otherwise)."""
    if not expected or not text:
        return ""
    chosen = text.split(". ", 1)[1] if ". " in text[:4] else text
    if chosen.strip().lower() == expected.lower():
        return strings.DEMO_RIGHT
    return strings.DEMO_WRONG.format(answer=expected)


def ask_side_by_side(
    client: VopdClient, request: dict[str, Any], image: Image.Image | None, trained: str | None, expected: str | None
) -> tuple[Any, ...]:
    """The base's panel (title, answer, where it looked, caption), then the trained panel's visibility and its four
    values: the same question to the trained model when one is chosen (and differs from the base)."""
    base_text, base_looked, base_caption = ask(client, request, image)
    base_title = strings.DEMO_BASE_TITLE.format(model=request["model"]) + verdict(base_text, expected)
    if not trained or trained == request["model"]:
        return base_title, base_text, base_looked, base_caption, gr.update(visible=False), "", "", None, ""
    text, looked, caption = ask(client, {**request, "model": trained}, image)
    title = strings.DEMO_TRAINED_TITLE.format(model=trained) + verdict(text, expected)
    return base_title, base_text, base_looked, base_caption, gr.update(visible=True), title, text, looked, caption


@dataclass
class DemoTab:
    """What the studio wires to the rest: the base model dropdown (choices refreshed with the other tabs') and the
    trained model's refresh, for when a training job has finished since."""

    model: gr.Dropdown
    trained: gr.Dropdown
    refresh_trained: Any
    trained_inputs: list[Any]


def build_demo_tab(ctx: UiContext) -> DemoTab:
    gr.Markdown(strings.DEMO_INTRO)
    examples = demo_examples()
    gallery = gr.Gallery(
        [(example.thumbnail_path, example.caption) for example in examples],
        label=strings.DEMO_EXAMPLES_LABEL,
        columns=6,
        height=210,
        allow_preview=False,
        object_fit="contain",
        elem_id="demo-examples",
    )
    expected = gr.State(None)  # the clicked example's right answer, until the image or question is changed
    with gr.Row(equal_height=False):
        image = gr.Image(
            label=strings.DEMO_IMAGE_LABEL,
            type="pil",
            image_mode="RGB",
            sources=["upload", "clipboard"],
            height=360,
            min_width=280,
            elem_id="demo-image",
        )
        with gr.Column(min_width=260):
            question = gr.Textbox(
                strings.DEMO_QUESTION,
                label=strings.QUESTION_LABEL,
                lines=2,
                placeholder=strings.DEMO_QUESTION,
                elem_id="demo-question",
            )
            options = gr.Textbox(strings.DEMO_OPTIONS, label=strings.OPTIONS_LABEL, lines=2, elem_id="demo-options")
            box = gr.Textbox(label=strings.DEMO_BOX_LABEL, info=strings.DEMO_BOX_INFO, elem_id="demo-box")
            model = gr.Dropdown(label=strings.MODEL_LABEL, info=strings.MODEL_INFO, choices=[], elem_id="demo-model")
            trained = gr.Dropdown(
                label=strings.DEMO_TRAINED_LABEL, info=strings.DEMO_TRAINED_INFO, choices=[], elem_id="demo-trained"
            )
            max_new_tokens = gr.Slider(1, 256, value=32, step=1, label=strings.MAX_NEW_TOKENS_LABEL)
            note = gr.Markdown(elem_id="demo-note")
            ask_button = gr.Button(strings.ASK, variant="primary", elem_id="demo-ask")
    with gr.Row(equal_height=False):
        with gr.Column(min_width=260):
            base_title = gr.Markdown(elem_id="demo-base-title")
            reply = gr.Textbox(label=strings.ANSWER_LABEL, interactive=False, lines=2, elem_id="demo-answer")
            looked = gr.Image(
                label=strings.DEMO_LOOKED_LABEL, type="pil", interactive=False, height=300, elem_id="demo-looked"
            )
            looked_caption = gr.Markdown(elem_id="demo-looked-caption")
        with gr.Column(min_width=260, visible=False) as trained_panel:
            trained_title = gr.Markdown(elem_id="demo-trained-title")
            trained_reply = gr.Textbox(
                label=strings.ANSWER_LABEL, interactive=False, lines=2, elem_id="demo-trained-answer"
            )
            trained_looked = gr.Image(
                label=strings.DEMO_LOOKED_LABEL,
                type="pil",
                interactive=False,
                height=300,
                elem_id="demo-trained-looked",
            )
            trained_caption = gr.Markdown(elem_id="demo-trained-caption")

    @readable_errors
    def on_example(request: gr.Request, event: gr.SelectData) -> tuple[Any, ...]:
        return example_fill(ctx.client(request), int(event.index))

    gallery.select(
        on_example, None, [image, question, options, box, model, trained, expected, note], concurrency_id=CHOICES
    )

    @readable_errors
    def refresh_trained(request: gr.Request, base: str | None, current: str | None) -> Any:
        return trained_update(ctx.client(request), base, current)

    @readable_errors
    def on_model_change(request: gr.Request, base: str | None) -> Any:
        return trained_update(ctx.client(request), base, None, keep=False)

    # A base picked by hand: its own trained model, if any.
    model.input(on_model_change, model, trained, concurrency_id=CHOICES)

    def forget_expected() -> None:
        return None

    for edited in (image.upload, image.clear, question.input, options.input, box.input):
        edited(forget_expected, None, expected)

    @serve_images
    @readable_errors
    def on_ask(
        request: gr.Request,
        image_value: Image.Image | None,
        question_text: str,
        options_text: str,
        box_text: str,
        model_name: str | None,
        trained_name: str | None,
        tokens: float,
        right_answer: str | None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        question_body = demo_request(image_value, question_text, options_text, model_name, tokens, box_text)
        progress(0.2, desc="the model is reading the image...")
        return ask_side_by_side(ctx.client(request), question_body, image_value, trained_name, right_answer)

    inputs = [image, question, options, box, model, trained, max_new_tokens, expected]
    outputs = [
        base_title,
        reply,
        looked,
        looked_caption,
        trained_panel,
        trained_title,
        trained_reply,
        trained_looked,
        trained_caption,
    ]
    ask_button.click(on_ask, inputs, outputs)
    question.submit(on_ask, inputs, outputs)
    return DemoTab(model=model, trained=trained, refresh_trained=refresh_trained, trained_inputs=[model, trained])
