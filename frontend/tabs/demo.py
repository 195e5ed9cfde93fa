"""Demo: fine-detail question answering on a plain image, as a trained model is used at inference (no box).

It rides on /api/inspect without a box: the "student" is simply the model looking at the bare image (no drawn box,
no hint), its rollout is the answer, and the server's evidence search says where the model looked, which is drawn on
the image.
"""

from __future__ import annotations

import base64
from typing import Any

import gradio as gr
from PIL import Image

from frontend import render, strings
from frontend.client import InspectResult, VopdClient
from frontend.context import UiContext, readable_errors
from frontend.tabs.inspect import evidence_label


def demo_request(
    image: Image.Image | None, question: str, options_text: str, model: str | None, max_new_tokens: float
) -> dict[str, Any]:
    if image is None:
        raise render.UiInputError(strings.NEED_IMAGE)
    if not question or not question.strip():
        raise render.UiInputError(strings.NEED_QUESTION)
    if not model:
        raise render.UiInputError(strings.NEED_MODEL)
    return {
        "model": model,
        "image_base64": base64.b64encode(render.png_bytes(image)).decode("ascii"),
        "question": question.strip(),
        "options": render.parse_options(options_text),
        "views": {"draw_box": False, "hint": ""},
        "greedy": True,
        "max_new_tokens": int(max_new_tokens),
        "show_topk": 1,
    }


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


def build_demo_tab(ctx: UiContext) -> gr.Dropdown:
    gr.Markdown(strings.DEMO_INTRO)
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
            model = gr.Dropdown(label=strings.MODEL_LABEL, info=strings.MODEL_INFO, choices=[], elem_id="demo-model")
            max_new_tokens = gr.Slider(1, 256, value=32, step=1, label=strings.MAX_NEW_TOKENS_LABEL)
            ask_button = gr.Button(strings.ASK, variant="primary", elem_id="demo-ask")
            reply = gr.Textbox(label=strings.ANSWER_LABEL, interactive=False, lines=3, elem_id="demo-answer")
            looked = gr.Image(
                label=strings.DEMO_LOOKED_LABEL, type="pil", interactive=False, height=300, elem_id="demo-looked"
            )
            looked_caption = gr.Markdown(elem_id="demo-looked-caption")

    @readable_errors
    def on_ask(
        request: gr.Request,
        image_value: Image.Image | None,
        question_text: str,
        options_text: str,
        model_name: str | None,
        tokens: float,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[str, Any, str]:
        question_body = demo_request(image_value, question_text, options_text, model_name, tokens)
        progress(0.2, desc="the model is reading the image...")
        return ask(ctx.client(request), question_body, image_value)

    outputs = [reply, looked, looked_caption]
    ask_button.click(on_ask, [image, question, options, model, max_new_tokens], outputs)
    question.submit(on_ask, [image, question, options, model, max_new_tokens], outputs)
    return model
