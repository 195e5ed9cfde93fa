"""Demo: fine-detail question answering on a plain image, as a trained model is used at inference (no box).

It rides on /api/inspect: the box spans the whole image and the student view is set to draw no box and add no
hint, so the "student" is simply the model looking at the bare image; its rollout is the answer.
"""

from __future__ import annotations

import base64
from typing import Any

import gradio as gr
from PIL import Image

from frontend import render, strings
from frontend.client import InspectResult, VopdClient
from frontend.context import UiContext, readable_errors


def demo_request(
    image: Image.Image | None, question: str, options_text: str, model: str | None, max_new_tokens: float
) -> dict[str, Any]:
    if image is None:
        raise render.UiInputError(strings.NEED_IMAGE)
    if not question or not question.strip():
        raise render.UiInputError(strings.NEED_QUESTION)
    if not model:
        raise render.UiInputError(strings.NEED_MODEL)
    width, height = image.size
    return {
        "model": model,
        "image_base64": base64.b64encode(render.png_bytes(image)).decode("ascii"),
        "question": question.strip(),
        "options": render.parse_options(options_text),
        "bbox": [0, 0, width, height],
        "views": {"draw_box": False, "hint": ""},
        "greedy": True,
        "max_new_tokens": int(max_new_tokens),
        "show_topk": 1,
    }


def answer(client: VopdClient, request: dict[str, Any]) -> str:
    result: InspectResult = client.inspect(request)
    return render.answer_text(result.student_text, result.student_choice)


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
            question = gr.Textbox(label=strings.QUESTION_LABEL, lines=2, elem_id="demo-question")
            options = gr.Textbox(label=strings.OPTIONS_LABEL, lines=2)
            model = gr.Dropdown(label=strings.MODEL_LABEL, info=strings.MODEL_INFO, choices=[], elem_id="demo-model")
            max_new_tokens = gr.Slider(1, 256, value=32, step=1, label=strings.MAX_NEW_TOKENS_LABEL)
            ask = gr.Button(strings.ASK, variant="primary", elem_id="demo-ask")
            reply = gr.Textbox(label=strings.ANSWER_LABEL, interactive=False, lines=3, elem_id="demo-answer")

    @readable_errors
    def on_ask(
        request: gr.Request,
        image_value: Image.Image | None,
        question_text: str,
        options_text: str,
        model_name: str | None,
        tokens: float,
        progress: gr.Progress = gr.Progress(),
    ) -> str:
        question_body = demo_request(image_value, question_text, options_text, model_name, tokens)
        progress(0.2, desc="the model is reading the image...")
        return answer(ctx.client(request), question_body)

    ask.click(on_ask, [image, question, options, model, max_new_tokens], reply)
    question.submit(on_ask, [image, question, options, model, max_new_tokens], reply)
    return model
