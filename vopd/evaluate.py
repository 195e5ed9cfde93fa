"""Evaluation: multiple-choice accuracy on the full image and on the crop, and the gap between them.

The regional-to-global gap is ``crop_accuracy - full_accuracy``; Vision-OPD should shrink it by raising
the full-image accuracy without lowering the crop's. Decoding is greedy; answers are parsed leniently
(a letter, "Answer: B", "(B)", or the option's text) because small and large models phrase them differently.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from vopd.callbacks import CallbackList, ProgressCallback
from vopd.config import EvalConfig
from vopd.data import Sample, load_dataset, option_letter
from vopd.models import LoadedModel, load_model_and_processor
from vopd.views import View, full_view, student_view, teacher_view, to_messages, uses_search

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


@torch.no_grad()
def generate_answers(
    loaded: LoadedModel, views: Sequence[View], options: Sequence[Sequence[str] | None], *, max_new_tokens: int
) -> list[Answer]:
    """Greedy answers for a batch of views, with option-letter probabilities read from the generation scores."""
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


def _is_correct(sample: Sample, answer: Answer) -> bool | None:
    if sample.answer is None:
        return None
    if sample.options:
        return answer.choice is not None and sample.options[answer.choice] == sample.answer
    return normalize_answer(answer.text) == normalize_answer(sample.answer)


def _record(sample: Sample, condition: str, answer: Answer) -> dict[str, Any]:
    p_correct = None
    if answer.option_probs is not None and sample.answer_index is not None:
        p_correct = answer.option_probs[sample.answer_index]
    elif sample.answer_index is not None:
        p_correct = 0.0
    return {
        f"{condition}_text": answer.text,
        f"{condition}_choice": option_letter(answer.choice) if answer.choice is not None else None,
        f"{condition}_correct": _is_correct(sample, answer),
        f"{condition}_p_correct": p_correct,
    }


def oracle_sample(sample: Sample, cfg: Any) -> Sample | None:
    """The sample whose teacher view is the crop of its true box: the box itself, or for a box-free item its
    ``hidden_bbox`` (the oracle crop); None when a box-free item has no hidden box (no crop condition to score)."""
    if not uses_search(sample, cfg):
        return sample
    if sample.hidden_bbox is None:
        return None
    return sample.model_copy(update={"search_box": sample.hidden_bbox})


_NO_ANSWER = Answer("", None, None)


def evaluate(
    config: EvalConfig, *, callbacks: Sequence[ProgressCallback] = (), loaded: LoadedModel | None = None
) -> EvalResult:
    """Greedy accuracy on full-image and crop views of every sample, per-item records, and the gap.

    With ``config.benchmark`` the questions come from a published suite instead (see vopd.benchmarks): full image
    only, per-category accuracy in the summary, crop fields NaN."""
    if config.benchmark is not None:
        from vopd.benchmarks import evaluate_benchmark  # imports this module: resolved at call time

        return evaluate_benchmark(config, callbacks=callbacks, loaded=loaded)
    events = CallbackList(callbacks)
    samples = load_dataset(config.dataset)
    if config.limit is not None:
        samples = samples[: config.limit]
    if not samples:
        raise ValueError(f"{config.dataset}: no samples to evaluate")
    loaded = loaded or load_model_and_processor(config.model, config.runtime)
    full_fn = student_view if config.full_view == "student" else lambda s, cfg: full_view(s, cfg)
    searched = config.searched_crop
    if searched is None:
        searched = any(uses_search(sample, config.views) for sample in samples)
    search_views = config.views.model_copy(update={"evidence": "search"})
    events.on_start(total=len(samples), start=0, unit="sample")
    records: list[dict[str, Any]] = []
    for start in range(0, len(samples), config.batch_size):
        if events.should_stop():
            events.on_end(status="stopped", result=None)
            raise InterruptedError("evaluation cancelled")
        batch = samples[start : start + config.batch_size]
        options = [sample.options for sample in batch]
        full = generate_answers(
            loaded, [full_fn(s, config.views) for s in batch], options, max_new_tokens=config.max_new_tokens
        )
        # The crop condition is the true box's crop (for a box-free item: its hidden box, the oracle).
        oracles = [oracle_sample(s, config.views) for s in batch]
        scored = [i for i, s in enumerate(oracles) if s is not None]
        crop_scored = (
            generate_answers(
                loaded,
                [teacher_view(oracles[i], config.views) for i in scored],  # type: ignore[arg-type]
                [options[i] for i in scored],
                max_new_tokens=config.max_new_tokens,
            )
            if scored
            else []
        )
        crop = [_NO_ANSWER] * len(batch)
        for i, answer in zip(scored, crop_scored, strict=True):
            crop[i] = answer
        searched_records: list[dict[str, Any]] = [{} for _ in batch]
        if searched:  # the crop the model chooses itself, label-free and box-free (vopd.evidence)
            searched_records = _searched(loaded, batch, search_views, config.max_new_tokens)
        for sample, full_answer, crop_answer, extra in zip(batch, full, crop, searched_records, strict=True):
            records.append(
                {
                    "id": sample.id,
                    "question": sample.question,
                    "options": sample.options,
                    "answer": sample.answer,
                    **_record(sample, "full", full_answer),
                    **_record(sample, "crop", crop_answer),
                    **extra,
                }
            )
        events.on_progress(done=len(records), total=len(samples), metrics=None)

    summary = summarize(records)
    records_path = None
    if config.output:
        records_path = Path(config.output)
        records_path.parent.mkdir(parents=True, exist_ok=True)
        records_path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = EvalResult(
        full_accuracy=summary["full_accuracy"],
        crop_accuracy=summary["crop_accuracy"],
        gap=summary["gap"],
        n=summary["n"],
        records_path=records_path,
        summary=summary,
        records=records,
    )
    events.on_end(status="succeeded", result=summary)
    return result


def _searched(loaded: LoadedModel, batch: Sequence[Sample], views: Any, max_new_tokens: int) -> list[dict[str, Any]]:
    """Per sample: the searched crop, the answer on it, and (where a box is known) whether it holds the box's centre
    and its IoU with the box."""
    from vopd.evidence import box_iou, contains_centre, known_box, search_evidence

    chosen = search_evidence(loaded, batch, views)
    resolved = [s.model_copy(update={"search_box": e.box}) for s, e in zip(batch, chosen, strict=True)]
    answers = generate_answers(
        loaded,
        [teacher_view(s, views) for s in resolved],
        [s.options for s in batch],
        max_new_tokens=max_new_tokens,
    )
    rows = []
    for sample, evidence, answer in zip(batch, chosen, answers, strict=True):
        box = known_box(sample)
        rows.append(
            {
                **_record(sample, "searched", answer),
                "searched_box": list(evidence.box),
                "searched_confidence": evidence.confidence,
                "searched_centre_hit": None if box is None else contains_centre(evidence.box, box),
                "searched_iou": None if box is None else box_iou(evidence.box, box),
            }
        )
    return rows


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracies, gap, mean p(correct option) and predicted-letter distributions (collapse shows there); with a
    searched crop (vopd.evidence) also its accuracy, confidence and how often it holds the known box's centre."""
    scored = [r for r in records if r["full_correct"] is not None]
    n = len(scored)

    def mean(key: str) -> float:
        values = [r[key] for r in scored if r[key] is not None]
        return float(sum(values) / len(values)) if values else float("nan")

    full_accuracy = sum(bool(r["full_correct"]) for r in scored) / n if n else float("nan")
    crop_accuracy = sum(bool(r["crop_correct"]) for r in scored) / n if n else float("nan")
    return {
        "full_accuracy": full_accuracy,
        "crop_accuracy": crop_accuracy,
        "gap": crop_accuracy - full_accuracy,
        "n": n,
        "n_items": len(records),
        "full_p_correct": mean("full_p_correct"),
        "crop_p_correct": mean("crop_p_correct"),
        "full_letters": dict(sorted(Counter(str(r["full_choice"]) for r in records).items())),
        "crop_letters": dict(sorted(Counter(str(r["crop_choice"]) for r in records).items())),
        **_searched_summary(records, scored),
    }


def _searched_summary(records: Sequence[dict[str, Any]], scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not records or "searched_correct" not in records[0]:
        return {}

    def mean(key: str, rows: Sequence[dict[str, Any]]) -> float:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        return float(sum(values) / len(values)) if values else float("nan")

    return {
        "searched_accuracy": mean("searched_correct", scored),
        "searched_p_correct": mean("searched_p_correct", scored),
        "searched_confidence": mean("searched_confidence", records),
        "searched_centre_hit": mean("searched_centre_hit", records),
        "searched_iou": mean("searched_iou", records),
        "searched_letters": dict(sorted(Counter(str(r["searched_choice"]) for r in records).items())),
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
