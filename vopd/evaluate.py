"""Evaluation: multiple-choice accuracy on the full image and on the crop, and the gap between them.

The regional-to-global gap is ``crop_accuracy - full_accuracy``; Vision-OPD should shrink it by raising
the full-image accuracy without lowering the crop's. Decoding is greedy (``vopd.answering``, which this module,
``vopd.benchmarks`` and ``vopd.evidence`` share, so that they import one another one way only).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vopd.answering import (
    Answer,
    AnswerEngine,
    EvalResult,
    accuracy_by,
    answer_record,
    generate_answers,
    is_correct,
    normalize_answer,
    parse_choice,
)
from vopd.benchmarks import evaluate_benchmark
from vopd.callbacks import CallbackList, ProgressCallback
from vopd.config import EvalConfig
from vopd.data import Sample, load_dataset
from vopd.engines import answer_engine_for
from vopd.evidence import box_iou, contains_centre, known_box, search_evidence
from vopd.models import LoadedModel, load_model_and_processor
from vopd.views import full_view, student_view, teacher_view, uses_search

# Re-exported: callers have long imported answering's names from here.
__all__ = [
    "Answer",
    "EvalResult",
    "accuracy_by",
    "answer_record",
    "evaluate",
    "generate_answers",
    "is_correct",
    "normalize_answer",
    "oracle_sample",
    "parse_choice",
    "summarize",
]


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
    config: EvalConfig,
    *,
    callbacks: Sequence[ProgressCallback] = (),
    loaded: LoadedModel | None = None,
    engine: AnswerEngine | None = None,
) -> EvalResult:
    """Greedy accuracy on full-image and crop views of every sample, per-item records, and the gap.

    With ``config.benchmark`` the questions come from a published suite instead (see vopd.benchmarks): full image
    only, per-category accuracy in the summary, crop fields NaN. The answers (the evidence search's included) are
    decoded by the engine ``config.engine`` resolves to (``summary["engine"]`` says which); ``engine``: one made
    elsewhere for ``loaded``'s weights (left open), in place of making one."""
    if config.benchmark is not None:
        return evaluate_benchmark(config, callbacks=callbacks, loaded=loaded, engine=engine)
    events = CallbackList(callbacks)
    assert config.dataset is not None
    samples = load_dataset(config.dataset)
    if config.limit is not None:
        samples = samples[: config.limit]
    if not samples:
        raise ValueError(f"{config.dataset}: no samples to evaluate")
    loaded = loaded or load_model_and_processor(config.model, config.runtime)
    with answer_engine_for(loaded, config, engine, log=events.on_log) as answers_by:
        return _evaluate_dataset(config, samples, events, loaded, answers_by)


def _evaluate_dataset(
    config: EvalConfig,
    samples: list[Sample],
    events: CallbackList,
    loaded: LoadedModel,
    engine: AnswerEngine | None,
) -> EvalResult:
    full_fn = student_view if config.full_view == "student" else lambda s, cfg: full_view(s, cfg)
    searched = config.searched_crop
    if searched is None:
        searched = any(uses_search(sample, config.views) for sample in samples)
    search_views = config.views.model_copy(update={"evidence": "search"})
    budget = config.max_new_tokens
    events.on_start(total=len(samples), start=0, unit="sample")
    records: list[dict[str, Any]] = []
    for start in range(0, len(samples), config.batch_size):
        if events.should_stop():
            events.on_end(status="stopped", result=None)
            raise InterruptedError("evaluation cancelled")
        batch = samples[start : start + config.batch_size]
        options = [sample.options for sample in batch]
        full = generate_answers(
            loaded, [full_fn(s, config.views) for s in batch], options, max_new_tokens=budget, engine=engine
        )
        # The crop condition is the true box's crop (for a box-free item: its hidden box, the oracle).
        oracles = [oracle_sample(s, config.views) for s in batch]
        scored = [i for i, s in enumerate(oracles) if s is not None]
        crop_scored = (
            generate_answers(
                loaded,
                [teacher_view(oracles[i], config.views) for i in scored],  # type: ignore[arg-type]
                [options[i] for i in scored],
                max_new_tokens=budget,
                engine=engine,
            )
            if scored
            else []
        )
        crop = [_NO_ANSWER] * len(batch)
        for i, answer in zip(scored, crop_scored, strict=True):
            crop[i] = answer
        searched_records: list[dict[str, Any]] = [{} for _ in batch]
        if searched:  # the crop the model chooses itself, label-free and box-free (vopd.evidence)
            searched_records = _searched(loaded, batch, search_views, budget, engine)
        for sample, full_answer, crop_answer, extra in zip(batch, full, crop, searched_records, strict=True):
            records.append(
                {
                    "id": sample.id,
                    "question": sample.question,
                    "options": sample.options,
                    "answer": sample.answer,
                    **answer_record(sample, "full", full_answer),
                    **answer_record(sample, "crop", crop_answer),
                    **extra,
                }
            )
        events.on_progress(done=len(records), total=len(samples), metrics=None)

    summary = {**summarize(records), "engine": engine.name if engine is not None else "hf"}
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


def _searched(
    loaded: LoadedModel, batch: Sequence[Sample], views: Any, max_new_tokens: int, engine: AnswerEngine | None = None
) -> list[dict[str, Any]]:
    """Per sample: the searched crop, the answer on it, and (where a box is known) whether it holds the box's centre
    and its IoU with the box."""
    chosen = search_evidence(loaded, batch, views, engine=engine)
    resolved = [s.model_copy(update={"search_box": e.box}) for s, e in zip(batch, chosen, strict=True)]
    answers = generate_answers(
        loaded,
        [teacher_view(s, views) for s in resolved],
        [s.options for s in batch],
        max_new_tokens=max_new_tokens,
        engine=engine,
    )
    rows = []
    for sample, evidence, answer in zip(batch, chosen, answers, strict=True):
        box = known_box(sample)
        rows.append(
            {
                **answer_record(sample, "searched", answer),
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
