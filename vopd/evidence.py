"""Box-free evidence: the teacher finds its own crop.

Vision-OPD's teacher sees the evidence box cropped and enlarged. Most VQA data has no box, so here the model looks
for one itself, label-free, as training-free zoom methods do (ViCrop crops where the model looks; ZoomEye searches
zoomed views by the model's confidence): the image is covered by a grid of overlapping square windows at one or two
zoom levels (``views.search_windows``, ``views.search_overlap``), each window is cropped and upscaled exactly like
the box crop, the teacher answers the question on every window in batches, and the window it is most confident on
becomes the sample's evidence box. Confidence is read from the answer, never from a label:

* multiple choice: the probability mass of the top option letter where the greedy answer names its letter (a
  window without the evidence leaves the model unsure between the options; 0 when it names no letter);
* open questions: ``exp(-H)`` of the first answer token's distribution (1 = certain).

Confidences within ``TIE_TOLERANCE`` of the best count as equal and the smaller window wins: the tighter crop of the
same evidence is the more useful teacher view.

The trainer keeps the choice per sample in an ``EvidenceCache`` and searches again once it is
``views.search_refresh_steps`` old (the teacher moves under EMA; a fixed teacher always chooses the same crop). The
cache is part of the checkpoint, so a resumed run uses the very crops the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from vopd.answering import AnswerEngine, generate_answers
from vopd.config import ViewConfig
from vopd.data import Sample
from vopd.models import LoadedModel
from vopd.views import View, crop_box, format_question, uses_search

Box = tuple[float, float, float, float]

# Two windows whose confidences differ by less than this are a tie, won by the smaller window.
TIE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Evidence:
    """The crop chosen for one sample: its box in image pixels, the teacher's confidence there, and when."""

    box: Box
    confidence: float
    step: int


def _positions(length: int, side: int, stride: int) -> list[int]:
    """Window starts from 0 to ``length - side`` every ``stride`` pixels, the far edge always included."""
    if side >= length:
        return [0]
    starts = list(range(0, length - side + 1, stride))
    if starts[-1] != length - side:
        starts.append(length - side)
    return starts


def level_windows(width: int, height: int, fraction: float, overlap: float) -> list[Box]:
    """One zoom level of the grid: square windows of ``fraction`` of the shorter side, overlapping by ``overlap``."""
    side = max(1, round(fraction * min(width, height)))
    stride = max(1, round(side * (1.0 - overlap)))
    return [
        (float(x), float(y), float(min(x + side, width)), float(min(y + side, height)))
        for y in _positions(height, min(side, height), stride)
        for x in _positions(width, min(side, width), stride)
    ]


def candidate_windows(width: int, height: int, cfg: ViewConfig) -> list[Box]:
    """The whole search grid: every ``search_windows`` level overlapping by ``search_overlap``, in level order,
    without duplicates."""
    windows: list[Box] = []
    for fraction in cfg.search_windows:
        windows.extend(w for w in level_windows(width, height, fraction, cfg.search_overlap) if w not in windows)
    return windows


def _inside(window: Box, outer: Box) -> bool:
    return window[0] >= outer[0] and window[1] >= outer[1] and window[2] <= outer[2] and window[3] <= outer[3]


def view_confidences(
    loaded: LoadedModel,
    views: Sequence[View],
    options: Sequence[Sequence[str] | None],
    *,
    max_new_tokens: int,
    model: nn.Module | None = None,
    engine: AnswerEngine | None = None,
) -> list[float]:
    """Label-free confidence of ``model`` (default: ``loaded.model``) answering each view (see the module doc): read
    from the same greedy answers evaluation gives (``vopd.answering.generate_answers``), decoded by ``engine`` when
    given (it holds ``loaded.model``'s weights, so it cannot answer for another ``model``)."""
    if engine is not None and model is not None and model is not loaded.model:
        raise ValueError("an answer engine holds loaded.model's weights: it cannot score another model's windows")
    module = model if model is not None else loaded.model
    was_training = module.training
    try:
        answers = generate_answers(
            dataclasses.replace(loaded, model=module), views, options, max_new_tokens=max_new_tokens, engine=engine
        )
    finally:
        module.train(was_training)
    confidences: list[float] = []
    for answer, row_options in zip(answers, options, strict=True):
        if not row_options:
            assert answer.first_token_entropy is not None
            confidences.append(math.exp(-answer.first_token_entropy))
        else:
            confidences.append(max(answer.option_probs) if answer.option_probs else 0.0)
    return confidences


def _window_view(sample: Sample, image: Any, box: Box, cfg: ViewConfig) -> View:
    """A candidate window as the teacher would see it: cropped, upscaled like the box crop, the student's text."""
    return View(image=crop_box(image, box, cfg), text=format_question(sample, ""))


def _best(boxes: Sequence[Box], confidences: Sequence[float]) -> tuple[Box, float]:
    """The most confident window; near-ties (``TIE_TOLERANCE``) go to the smaller one, then to the earlier one."""
    top = max(confidences)
    tied = [i for i, value in enumerate(confidences) if value >= top - TIE_TOLERANCE]
    chosen = min(tied, key=lambda i: ((boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]), i))
    return boxes[chosen], confidences[chosen]


def search_evidence(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    cfg: ViewConfig,
    *,
    model: nn.Module | None = None,
    step: int = 0,
    engine: AnswerEngine | None = None,
) -> list[Evidence]:
    """For each sample, the grid window ``model`` answers most confidently; candidates of all samples are scored
    together in batches of ``cfg.search_batch_size``. ``grid`` scores every window of every level at once; ``zoom``
    goes level by level, keeping only the windows inside the best one so far. Never reads a box or an answer.
    ``engine``: decode the windows' answers with it (an evaluation's vllm engine) instead of transformers."""
    images = [sample.load_image() for sample in samples]
    scored: list[list[tuple[Box, float]]] = [[] for _ in samples]

    def score(candidates: list[tuple[int, Box]]) -> None:
        for start in range(0, len(candidates), cfg.search_batch_size):
            chunk = candidates[start : start + cfg.search_batch_size]
            views = [_window_view(samples[index], images[index], box, cfg) for index, box in chunk]
            options = [samples[index].options for index, _ in chunk]
            values = view_confidences(
                loaded, views, options, max_new_tokens=cfg.search_max_new_tokens, model=model, engine=engine
            )
            for (index, box), value in zip(chunk, values, strict=True):
                scored[index].append((box, value))

    if cfg.search_strategy == "grid":
        score(
            [
                (index, box)
                for index, image in enumerate(images)
                for box in candidate_windows(image.width, image.height, cfg)
            ]
        )
    else:
        best: list[Box | None] = [None] * len(samples)
        for fraction in cfg.search_windows:
            level: list[tuple[int, Box]] = []
            for index, image in enumerate(images):
                windows = level_windows(image.width, image.height, fraction, cfg.search_overlap)
                outer = best[index]
                inside = [w for w in windows if outer is None or _inside(w, outer)]
                seen = {box for box, _ in scored[index]}
                level.extend((index, w) for w in (inside or windows) if w not in seen)
            score(level)
            best = [_best([b for b, _ in rows], [c for _, c in rows])[0] if rows else None for rows in scored]
    results = []
    for rows in scored:
        box, confidence = _best([b for b, _ in rows], [c for _, c in rows])
        results.append(Evidence(box=box, confidence=confidence, step=step))
    return results


# --------------------------------------------------------------------------- metrics against a known box
def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two [x0, y0, x1, y1) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def contains_centre(window: Box, box: Box) -> bool:
    """Whether ``window`` holds the centre of ``box`` (the target of a synth item sits at its box's centre)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return window[0] <= cx < window[2] and window[1] <= cy < window[3]


def known_box(sample: Sample) -> Box | None:
    """The box a search can be checked against (metrics only): the hidden one of a box-free item, else the box."""
    return sample.hidden_bbox if sample.hidden_bbox is not None else sample.bbox


def evidence_metrics(samples: Sequence[Sample], chosen: Sequence[Evidence]) -> dict[str, float]:
    """Mean confidence of the chosen crops and, over samples with a known box, the share whose crop holds the box's
    centre and the mean IoU."""
    if not chosen:
        return {}
    metrics = {"evidence/confidence": sum(e.confidence for e in chosen) / len(chosen)}
    checked = [(known_box(s), e) for s, e in zip(samples, chosen, strict=True) if known_box(s) is not None]
    if checked:
        metrics["evidence/centre_hit"] = sum(contains_centre(e.box, box) for box, e in checked) / len(checked)
        metrics["evidence/iou"] = sum(box_iou(e.box, box) for box, e in checked) / len(checked)
    return metrics


# --------------------------------------------------------------------------- the trainer's cache
class EvidenceCache:
    """The chosen crop per sample id, searched again once ``refresh_steps`` old; saved in checkpoints."""

    def __init__(self, cfg: ViewConfig) -> None:
        self.cfg = cfg
        self.entries: dict[str, Evidence] = {}
        self.searches = 0  # samples searched so far (a refresh counts again)

    def needs(self, sample: Sample) -> bool:
        return uses_search(sample, self.cfg)

    def stale(self, sample_id: str, step: int) -> bool:
        entry = self.entries.get(sample_id)
        return entry is None or step - entry.step >= self.cfg.search_refresh_steps

    def resolve(
        self, loaded: LoadedModel, samples: Sequence[Sample], step: int, *, model: nn.Module | None = None
    ) -> tuple[list[Sample], list[Evidence]]:
        """``samples`` with ``search_box`` set where the crop is searched for (stale entries searched first, all of
        them in one batched search), and the evidence used for each of those."""
        wanted = [sample for sample in samples if self.needs(sample)]
        missing: dict[str, Sample] = {}
        for sample in wanted:
            if self.stale(sample.id, step):
                missing.setdefault(sample.id, sample)
        if missing:
            found = search_evidence(loaded, list(missing.values()), self.cfg, model=model, step=step)
            self.entries.update(zip(missing, found, strict=True))
            self.searches += len(found)
        resolved = [
            sample.model_copy(update={"search_box": self.entries[sample.id].box}) if self.needs(sample) else sample
            for sample in samples
        ]
        return resolved, [self.entries[sample.id] for sample in wanted]

    def state_dict(self) -> dict[str, Any]:
        return {
            "entries": {key: dataclasses.asdict(value) for key, value in self.entries.items()},
            "searches": self.searches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = {
            key: Evidence(box=tuple(value["box"]), confidence=float(value["confidence"]), step=int(value["step"]))
            for key, value in state.get("entries", {}).items()
        }
        self.searches = int(state.get("searches", 0))


def describe(evidence: Evidence) -> str:
    """One line for logs: the box and the confidence."""
    x0, y0, x1, y1 = evidence.box
    return f"[{x0:g}, {y0:g}, {x1:g}, {y1:g}] confidence {evidence.confidence:.3f}"


__all__ = [
    "Evidence",
    "EvidenceCache",
    "box_iou",
    "candidate_windows",
    "contains_centre",
    "describe",
    "evidence_metrics",
    "known_box",
    "search_evidence",
    "view_confidences",
]
