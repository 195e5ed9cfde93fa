"""One chat completion from a loaded model: what an OpenAI-compatible ``/v1/chat/completions`` serves.

The official evaluation (and every OpenAI client) asks a model behind such an endpoint: a user turn with an image and
a question, ``temperature`` 0, a token budget, and for Qwen3/Qwen3.5 ``chat_template_kwargs.enable_thinking``. This
module turns those messages into the model's own chat template, generates (greedy at temperature 0, sampled above it,
seeded when a seed is given), and hands back the text with its token counts, streaming it piece by piece when asked.
It knows nothing of HTTP: the service parses requests and images, and calls ``complete_chat`` on its inference thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from vopd.models import LoadedModel, encode_prompts

Role = Literal["system", "user", "assistant"]


class ChatCancelled(RuntimeError):
    """The caller's ``should_stop`` said stop (client gone, time budget spent): generation ended early."""


@dataclass
class ChatMessage:
    """One turn: its role and its parts in order, each a text or an already decoded image."""

    role: Role
    parts: list[str | Image.Image]


@dataclass
class ChatCompletion:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


def to_template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The messages in the shape transformers' chat templates take (images as ``{"type": "image"}`` parts)."""
    turns = []
    for message in messages:
        content: list[dict[str, Any]] = []
        for part in message.parts:
            if isinstance(part, Image.Image):
                content.append({"type": "image", "image": part})
            else:
                content.append({"type": "text", "text": part})
        turns.append({"role": message.role, "content": content})
    return turns


class _StopWhenAsked(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop
        self.stopped = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.stopped = self.stopped or self.should_stop()
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


class _CallbackStreamer(TextStreamer):
    """transformers' streamer, which decodes whole words as they complete, handing each piece to a callback."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


@torch.no_grad()
def complete_chat(
    loaded: LoadedModel,
    messages: Sequence[ChatMessage],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    on_text: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ChatCompletion:
    """Generate the assistant's reply to ``messages``.

    ``temperature`` 0 decodes greedily (the official evaluation's setting); above 0 it samples, from ``seed`` when
    given. ``chat_template_kwargs`` are laid over the model's own (its non-thinking default for Qwen3-style templates).
    ``on_text`` receives the reply piece by piece as it is decoded; ``should_stop`` is asked after every token and
    ends the generation with ``ChatCancelled``. Special tokens are left out of the text; a think block is kept, as
    OpenAI-compatible servers without a reasoning parser return it.
    """
    if not messages:
        raise ValueError("a chat needs at least one message")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    template_kwargs = {**loaded.chat_template_kwargs, **(chat_template_kwargs or {})}
    prompts = encode_prompts(loaded.processor, [to_template_messages(messages)], chat_template_kwargs=template_kwargs)
    prompts = prompts.to(loaded.device)
    if "pixel_values" in prompts and prompts["pixel_values"].is_floating_point():
        prompts["pixel_values"] = prompts["pixel_values"].to(loaded.dtype)
    stopper = _StopWhenAsked(should_stop or (lambda: False))
    sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if seed is not None:
            torch.manual_seed(seed)  # the inference thread runs one request at a time
    loaded.model.eval()
    with loaded.autocast():
        sequences = loaded.model.generate(
            **prompts,
            **sampling,
            max_new_tokens=max_new_tokens,
            eos_token_id=loaded.eos_token_ids,
            pad_token_id=loaded.pad_token_id,
            suppress_tokens=loaded.suppressed_token_ids or None,
            stopping_criteria=StoppingCriteriaList([stopper]),
            streamer=_CallbackStreamer(loaded.tokenizer, on_text) if on_text is not None else None,
        )
    if stopper.stopped:
        raise ChatCancelled("generation stopped before the reply was complete")
    prompt_length = prompts["input_ids"].shape[1]
    generated = sequences[0, prompt_length:].tolist()
    end = next((i for i, token in enumerate(generated) if token in loaded.eos_token_ids), None)
    reply = generated if end is None else generated[:end]
    return ChatCompletion(
        text=loaded.tokenizer.decode(reply, skip_special_tokens=True),
        finish_reason="length" if end is None and len(generated) >= max_new_tokens else "stop",
        prompt_tokens=int(prompts["attention_mask"][0].sum()),
        completion_tokens=len(reply) + (0 if end is None else 1),
    )
