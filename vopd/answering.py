"""Greedy answering and its scoring, shared by evaluation, benchmark suites, the evidence search, inspection and the
collapse guard.

It sits below all of them (it imports no other evaluation module), so ``vopd.evaluate``, ``vopd.benchmarks`` and
``vopd.evidence`` can import it and each other one way only. Answers are parsed leniently (a letter, "Answer: B",
"(B)", or the option's text) because small and large models phrase them differently.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch

from vopd.data import Sample, option_letter
from vopd.models import LoadedModel
from vopd.views import View, to_messages

_ANSWER_IS = re.compile(r"answer\s*(?:is)?\s*[:：]?\s*\(?\s*([A-Za-z])\s*\)?(?![A-Za-z])", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^\(?([A-Z])\)?(?=$|[\s.:,)])")
_LONE_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """Index of the option a free-text answer names, or None when it names none (or several)."""
    count = len(options)

    def valid(letter: str) -> int | None:
        index = ord(letter.upper()) - ord("A")
        return index if 0 <= index < count else None

    if match := _ANSWER_IS.search(text):
        return valid(match.group(1))
    stripped = text.strip()
    if match := _LEADING_LETTER.match(stripped):
        index = valid(match.group(1))
        rest = stripped[match.end() :]
        # "B", "B.", "(B) blue", "B blue" name an option; "A dog is green" starts with an article.
        marked = match.group(0).startswith("(") or rest[:1] in (".", ":", ",", ")") or not rest.strip()
        if index is not None and (marked or rest.strip().lower().startswith(options[index].lower())):
            return index
    lowered = text.lower()
    named = [i for i, option in enumerate(options) if re.search(rf"(?<!\w){re.escape(option.lower())}(?!\w)", lowered)]
    if len(named) == 1:
        return named[0]
    letters = {valid(letter) for letter in _LONE_LETTER.findall(text)} - {None}
    return letters.pop() if len(letters) == 1 else None


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, articles and extra spaces (SQuAD-style) for free-form exact match."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@lru_cache(maxsize=8)
def _letter_token_ids(tokenizer: Any, count: int) -> tuple[tuple[int, ...], ...]:
    """For each option letter, every vocabulary id that decodes to exactly that letter (with or without space)."""
    letters = [option_letter(i) for i in range(count)]
    ids: list[list[int]] = [[] for _ in letters]
    for token, token_id in tokenizer.get_vocab().items():
        if len(token) > 4:
            continue
        text = tokenizer.decode([token_id]).strip()
        if text in letters:
            ids[letters.index(text)].append(token_id)
    return tuple(tuple(group) for group in ids)


@dataclass
class Answer:
    """One greedy answer: the text, the option it names, and the probability of each option letter."""

    text: str
    choice: int | None
    option_probs: list[float] | None  # at the first generated letter token, None when no letter was generated
    first_token_entropy: float | None = None  # of the first answer token's distribution, in nats


class AnswerEngine(Protocol):
    """Decodes greedy answers in place of transformers' ``generate`` (the vllm engine, ``vopd.vllm_engine``): the same
    prompts (chat template, views, pixel limits), suppressed and end tokens and response budget; option-letter
    probabilities and the first token's entropy from its top-k log-probs (``answer_from_topk``)."""

    name: str

    def answer(
        self, views: Sequence[View], options: Sequence[Sequence[str] | None], *, max_new_tokens: int
    ) -> list[Answer]: ...


@torch.no_grad()
def generate_answers(
    loaded: LoadedModel,
    views: Sequence[View],
    options: Sequence[Sequence[str] | None],
    *,
    max_new_tokens: int,
    engine: AnswerEngine | None = None,
) -> list[Answer]:
    """Greedy answers for a batch of views, with option-letter probabilities read from the generation scores.

    ``engine``: decode with it instead (it holds ``loaded.model``'s weights); None = transformers' ``generate``."""
    if engine is not None:
        return engine.answer(views, options, max_new_tokens=max_new_tokens)
    prompts = loaded.encode([to_messages(view) for view in views])
    loaded.model.eval()
    output = loaded.model.generate(
        **prompts,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=loaded.eos_token_ids,
        pad_token_id=loaded.pad_token_id,
        suppress_tokens=loaded.suppressed_token_ids or None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    generated = output.sequences[:, prompts["input_ids"].shape[1] :]  # (N, R)
    tokenizer = loaded.processor.tokenizer
    answers = []
    for row, row_options in enumerate(options):
        ids = generated[row].tolist()
        end = next((i for i, token in enumerate(ids) if token in loaded.eos_token_ids), len(ids))
        text = _without_reasoning(tokenizer.decode(ids[:end], skip_special_tokens=True))
        first = output.scores[0][row].float().softmax(dim=-1)  # (V,)  only the positions read, never (N, R, V)
        entropy = float(-(first * first.clamp_min(1e-30).log()).sum())
        if not row_options:
            answers.append(Answer(text, None, None, entropy))
            continue
        letter_ids = _letter_token_ids(tokenizer, len(row_options))
        all_letter_ids = {token for group in letter_ids for token in group}
        position = next((i for i in range(end) if ids[i] in all_letter_ids), None)
        option_probs = None
        if position is not None:
            probs = output.scores[position][row].float().softmax(dim=-1)  # (V,)
            option_probs = [float(probs[list(group)].sum()) if group else 0.0 for group in letter_ids]
        answers.append(Answer(text, parse_choice(text, row_options), option_probs, entropy))
    return answers


def answer_from_topk(
    loaded: LoadedModel,
    ids: Sequence[int],
    top: Sequence[dict[int, float]],
    row_options: Sequence[str] | None,
) -> Answer:
    """One greedy answer from an engine that returns each generated position's top-k probabilities (``top[i]``:
    token id -> probability at position i, the chosen token among them) instead of full distributions.

    What it reads, and its error against the full distributions the hf path reads (both only ever too low):

    * option probabilities: at the first generated letter token, the summed probabilities of each option's letter
      tokens that are among the top k. A letter token outside the top k is missed; the missed mass of all options
      together is at most the mass outside the top k at that position (``1 - sum(top)``), and each missed token's
      at most the k-th largest probability.
    * first-token entropy: over the top k plus one tail bucket holding the rest of the mass (as one outcome). The
      true entropy lies between this and this + tail * log(V - k).

    A confident greedy answer leaves almost nothing outside its top 20, so both errors are about rounding where it
    matters (measured on the tiny model: docs/rollouts.md)."""
    tokenizer = loaded.processor.tokenizer
    end = next((i for i, token in enumerate(ids) if token in loaded.eos_token_ids), len(ids))
    text = _without_reasoning(tokenizer.decode(list(ids[:end]), skip_special_tokens=True))
    entropy = None
    if top:
        probs = [p for p in top[0].values() if p > 0.0]
        tail = max(0.0, 1.0 - sum(probs))
        entropy = -sum(p * math.log(p) for p in probs) - (tail * math.log(tail) if tail > 0.0 else 0.0)
    if not row_options:
        return Answer(text, None, None, entropy)
    letter_ids = _letter_token_ids(tokenizer, len(row_options))
    all_letter_ids = {token for group in letter_ids for token in group}
    position = next((i for i in range(min(end, len(top))) if ids[i] in all_letter_ids), None)
    option_probs = None
    if position is not None:
        at = top[position]
        option_probs = [sum(at.get(token, 0.0) for token in group) for group in letter_ids]
    return Answer(text, parse_choice(text, row_options), option_probs, entropy)


def _without_reasoning(text: str) -> str:
    """The answer after a closed think block (Qwen3-style ``<think>...</think>``, where the tags are plain tokens that
    ``skip_special_tokens`` keeps): letters inside the reasoning must not be read as the chosen option."""
    return text.rsplit("</think>", 1)[-1].strip()


@dataclass
class EvalResult:
    full_accuracy: float
    crop_accuracy: float
    gap: float
    n: int
    records_path: Path | None
    summary: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


def is_correct(sample: Sample, answer: Answer) -> bool | None:
    if sample.answer is None:
        return None
    if sample.options:
        return answer.choice is not None and sample.options[answer.choice] == sample.answer
    return normalize_answer(answer.text) == normalize_answer(sample.answer)


def answer_record(sample: Sample, condition: str, answer: Answer) -> dict[str, Any]:
    p_correct = None
    if answer.option_probs is not None and sample.answer_index is not None:
        p_correct = answer.option_probs[sample.answer_index]
    elif sample.answer_index is not None:
        p_correct = 0.0
    return {
        f"{condition}_text": answer.text,
        f"{condition}_choice": option_letter(answer.choice) if answer.choice is not None else None,
        f"{condition}_correct": is_correct(sample, answer),
        f"{condition}_p_correct": p_correct,
    }


def accuracy_by(records: Sequence[dict[str, Any]], key: str, correct_key: str = "full_correct") -> dict[str, Any]:
    """Per-value accuracy of ``records[key]`` (e.g. a category): ``{value: {"n", "correct", "accuracy"}}``.

    Unscored records (no answer) are left out, as in summarize; the counts of all values add up to the scored total,
    so an overall accuracy is always the n-weighted mean of these."""
    groups: dict[str, list[bool]] = {}
    for record in records:
        if record.get(correct_key) is None or record.get(key) is None:
            continue
        groups.setdefault(str(record[key]), []).append(bool(record[correct_key]))
    return {
        name: {"n": len(hits), "correct": sum(hits), "accuracy": sum(hits) / len(hits)}
        for name, hits in sorted(groups.items())
    }
