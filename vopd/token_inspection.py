"""Per-token inspection: where, along its own answer, does the full-image student disagree with the crop teacher?

For one (image, question, options, box) the student answers on its view (full image, red box, hint); the same
model then scores those very tokens on the teacher view (the crop). Each position gets both top-k lists, both
entropies, the divergence under the chosen alpha (plus forward KL, reverse KL and JSD for comparison) and whether
the two argmaxes agree. The teacher's own answer on the crop stands beside the student's.

Without a box the model finds its own crop first (``vopd.evidence``: the grid window it answers most confidently);
the student then sees the plain full image (no drawn box, no hint) and the result's ``evidence`` says which box the
teacher saw, whether it was given or searched, and the search's confidence.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import BaseModel, Field

from vopd.answering import generate_answers, parse_choice
from vopd.config import InspectConfig
from vopd.data import Sample, option_letter
from vopd.divergence import per_token_details, token_divergence
from vopd.models import LoadedModel, load_model_and_processor
from vopd.rollout import response_logits, sample_rollouts
from vopd.views import student_view, teacher_view, to_messages


class InspectCancelled(RuntimeError):
    """Raised by ``inspect_sample`` once its ``should_stop`` hook says so (a time budget ran out, the client left)."""


@contextmanager
def _stoppable(model: torch.nn.Module, should_stop: Callable[[], bool] | None) -> Iterator[Callable[[], None]]:
    """Check ``should_stop`` before every forward pass of the model (each generated token, each scoring pass) and
    between phases, so the work itself ends instead of running on for a caller who no longer waits."""

    def check(*_: object) -> None:
        if should_stop is not None and should_stop():
            raise InspectCancelled("inspect stopped before it finished")

    handle = model.register_forward_pre_hook(check) if should_stop is not None else None
    try:
        yield check
    finally:
        if handle is not None:
            handle.remove()


class TopToken(BaseModel):
    token: str
    token_id: int
    prob: float
    rank: int


class TokenRecord(BaseModel):
    position: int
    token: str
    token_id: int
    student_prob: float
    teacher_prob: float
    divergence: float
    forward_kl: float
    reverse_kl: float
    jsd: float
    student_entropy: float
    teacher_entropy: float
    argmax_agree: bool
    student_in_topk: bool
    student_top: list[TopToken]
    teacher_top: list[TopToken]
    student_tail_mass: float
    teacher_tail_mass: float


class EvidenceInfo(BaseModel):
    """The teacher's crop: the box given with the request (or the sample's), or the one the search chose."""

    box: tuple[float, float, float, float] = Field(description="[x0, y0, x1, y1] in pixels of the image.")
    source: Literal["given", "search"]
    confidence: float | None = Field(
        None, description="search: the teacher's label-free confidence on that crop (vopd.evidence); given: null."
    )


class InspectResult(BaseModel):
    model: str
    student_text: str
    student_choice: str | None
    teacher_answer: str
    teacher_choice: str | None
    student_prompt: str
    teacher_prompt: str
    alpha: float
    mean_divergence: float
    tokens: list[TokenRecord]
    evidence: EvidenceInfo | None = Field(None, description="Where the teacher's crop came from.")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2's table, which Qwen's tokenizers share):
    printable Latin-1 bytes stand for themselves, the rest map to code points from 256 up, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = [byte for byte in range(256) if byte not in kept]
    return {chr(byte): byte for byte in kept} | {chr(256 + n): byte for n, byte in enumerate(shifted)}


def token_text(tokenizer: Any, token_id: int) -> str:
    """How one token reads. A token holding only part of a multi-byte character decodes alone to U+FFFD, which
    says nothing; it reads as its bytes instead (``<0xE2>``, as byte-fallback tokenizers name byte tokens), with
    any complete characters it also holds kept as text."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id)
    alphabet = _byte_level_alphabet()
    if not isinstance(piece, str) or not piece or any(char not in alphabet for char in piece):
        return piece if isinstance(piece, str) and piece.startswith("<0x") else text
    raw = bytes(alphabet[char] for char in piece).decode("utf-8", errors="surrogateescape")
    return "".join(f"<0x{ord(char) - 0xDC00:02X}>" if 0xDC80 <= ord(char) <= 0xDCFF else char for char in raw)


def _top_tokens(tokenizer, ids: torch.Tensor, probs: torch.Tensor) -> list[TopToken]:
    return [
        TopToken(token=token_text(tokenizer, token_id), token_id=token_id, prob=prob, rank=rank + 1)
        for rank, (token_id, prob) in enumerate(zip(ids.tolist(), probs.tolist(), strict=True))
    ]


@torch.no_grad()
def inspect_sample(
    config: InspectConfig,
    image: Image.Image,
    *,
    loaded: LoadedModel | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> InspectResult:
    """Run the student's rollout on the full image and compare it token by token with the crop teacher.

    ``should_stop`` (optional) is polled before every forward pass and between phases; once it returns True the work
    ends with ``InspectCancelled``."""
    if should_stop is not None and should_stop():
        raise InspectCancelled("inspect stopped before it started")
    loaded = loaded or load_model_and_processor(config.model, config.runtime)
    with _stoppable(loaded.model, should_stop) as check:
        return _inspect(config, image, loaded, check)


def _inspect(
    config: InspectConfig, image: Image.Image, loaded: LoadedModel, check: Callable[[], None]
) -> InspectResult:
    width, height = image.size
    views = config.views
    if config.bbox is not None:
        x0, y0, x1, y1 = config.bbox
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"bbox {list(config.bbox)} lies outside the {width}x{height} image")
    sample = Sample(
        id="inspect", question=config.question, options=config.options, bbox=config.bbox, image_bytes=_png_bytes(image)
    )
    if config.bbox is None or views.evidence == "search":  # the model finds its own crop, as box-free training does
        from vopd.evidence import search_evidence

        views = views.model_copy(update={"evidence": "search"})  # a given box is then set aside, never drawn
        sample = sample.model_copy(update={"bbox": None})
        found = search_evidence(loaded, [sample], views)[0]
        sample = sample.model_copy(update={"search_box": found.box})
        evidence = EvidenceInfo(box=found.box, source="search", confidence=found.confidence)
        check()
    else:
        evidence = EvidenceInfo(box=config.bbox, source="given", confidence=None)
    student = student_view(sample, views)
    teacher = teacher_view(sample, views)

    check()
    student_prompts, teacher_prompts = loaded.encode([to_messages(student)]), loaded.encode([to_messages(teacher)])
    check()
    rollout = sample_rollouts(
        loaded.model,
        student_prompts,
        max_new_tokens=config.max_new_tokens,
        temperature=0.0 if config.greedy else config.temperature,
        top_p=config.top_p,
        eos_token_ids=loaded.eos_token_ids,
        pad_token_id=loaded.pad_token_id,
        suppressed_token_ids=loaded.suppressed_token_ids,
        seed=config.seed,
    )
    length = int(rollout.response_mask[0].sum())
    student_logits = response_logits(loaded.model, student_prompts, rollout)[0, :length].float()  # (R, V)
    teacher_logits = response_logits(loaded.model, teacher_prompts, rollout)[0, :length].float()  # (R, V)
    response_ids = rollout.response_ids[0, :length]

    check()
    div = config.divergence
    common = {"topk": div.topk, "add_tail": div.add_tail, "temperature": div.temperature}
    chosen = token_divergence(student_logits, teacher_logits, alpha=div.alpha, **common)
    forward = token_divergence(student_logits, teacher_logits, alpha=0.0, **common)
    reverse = token_divergence(student_logits, teacher_logits, alpha=1.0, **common)
    jsd = token_divergence(student_logits, teacher_logits, alpha=0.5, **common)
    details = per_token_details(student_logits, teacher_logits, k=config.show_topk, temperature=div.temperature)
    student_logprobs = torch.log_softmax(student_logits / div.temperature, dim=-1)
    teacher_logprobs = torch.log_softmax(teacher_logits / div.temperature, dim=-1)

    tokenizer = loaded.processor.tokenizer
    records = []
    for position in range(length):
        token_id = int(response_ids[position])
        student_top_ids = details["student_topk_ids"][position]
        records.append(
            TokenRecord(
                position=position,
                token=token_text(tokenizer, token_id),
                token_id=token_id,
                student_prob=float(student_logprobs[position, token_id].exp()),
                teacher_prob=float(teacher_logprobs[position, token_id].exp()),
                divergence=float(chosen[position]),
                forward_kl=float(forward[position]),
                reverse_kl=float(reverse[position]),
                jsd=float(jsd[position]),
                student_entropy=float(details["student_entropy"][position]),
                teacher_entropy=float(details["teacher_entropy"][position]),
                argmax_agree=bool(details["argmax_agreement"][position]),
                student_in_topk=token_id in student_top_ids.tolist(),
                student_top=_top_tokens(tokenizer, student_top_ids, details["student_topk_probs"][position]),
                teacher_top=_top_tokens(
                    tokenizer, details["teacher_topk_ids"][position], details["teacher_topk_probs"][position]
                ),
                student_tail_mass=float(details["student_tail_mass"][position]),
                teacher_tail_mass=float(details["teacher_tail_mass"][position]),
            )
        )
    check()
    student_text = tokenizer.decode(response_ids.tolist(), skip_special_tokens=True).strip()
    options = config.options or []
    student_choice = parse_choice(student_text, options) if options else None
    teacher_answer = generate_answers(loaded, [teacher], [config.options], max_new_tokens=config.max_new_tokens)[0]
    return InspectResult(
        model=config.model,
        student_text=student_text,
        student_choice=option_letter(student_choice) if student_choice is not None else None,
        teacher_answer=teacher_answer.text,
        teacher_choice=option_letter(teacher_answer.choice) if teacher_answer.choice is not None else None,
        student_prompt=student.text,
        teacher_prompt=teacher.text,
        alpha=div.alpha,
        mean_divergence=float(chosen.mean()) if length else 0.0,
        tokens=records,
        evidence=evidence,
    )
