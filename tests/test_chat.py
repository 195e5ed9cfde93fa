"""vopd.chat: the reply an OpenAI-compatible endpoint serves, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vopd.answering import generate_answers
from vopd.chat import ChatCancelled, ChatMessage, complete_chat
from vopd.config import RuntimeConfig
from vopd.models import load_model_and_processor
from vopd.views import View

QUESTION = "What color is the small shape?\nA. red\nB. green\nC. blue\nD. yellow"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model_and_processor(tiny_model_dir, RuntimeConfig(device="cpu", dtype="float32"))


def _image() -> Image.Image:
    image = Image.new("RGB", (112, 112), (240, 240, 240))
    image.paste((0, 160, 0), (40, 40, 56, 56))
    return image


def test_a_greedy_reply_is_what_evaluation_decodes(loaded) -> None:
    image = _image()
    reply = complete_chat(loaded, [ChatMessage("user", [image, QUESTION])], max_new_tokens=8)
    (answer,) = generate_answers(loaded, [View(image=image, text=QUESTION)], [None], max_new_tokens=8)
    assert reply.text == answer.text
    assert reply.prompt_tokens > 16 and 1 <= reply.completion_tokens <= 8
    assert reply.finish_reason in ("stop", "length")


def test_the_streamed_pieces_make_the_reply(loaded) -> None:
    pieces: list[str] = []
    reply = complete_chat(loaded, [ChatMessage("user", [_image(), QUESTION])], max_new_tokens=12, on_text=pieces.append)
    assert pieces and "".join(pieces) == reply.text


def test_sampling_repeats_with_its_seed(loaded) -> None:
    def sample(seed: int) -> str:
        messages = [ChatMessage("user", [_image(), QUESTION])]
        return complete_chat(loaded, messages, max_new_tokens=12, temperature=1.0, seed=seed).text

    first = sample(5)
    assert sample(5) == first
    assert any(sample(seed) != first for seed in (6, 7, 8))  # a random model's samples differ from seed to seed


def test_length_and_stop(loaded) -> None:
    reply = complete_chat(loaded, [ChatMessage("user", [_image(), QUESTION])], max_new_tokens=1)
    assert reply.completion_tokens == 1 and reply.finish_reason in ("length", "stop")
    asked = []

    def stop_at_once() -> bool:
        asked.append(1)
        return True

    with pytest.raises(ChatCancelled):
        complete_chat(loaded, [ChatMessage("user", [QUESTION])], max_new_tokens=8, should_stop=stop_at_once)
    assert asked
    with pytest.raises(ValueError, match="at least one message"):
        complete_chat(loaded, [], max_new_tokens=4)
