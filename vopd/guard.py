"""The collapse guard: a small probe set answered every N steps, so a run that is going wrong says so early.

Self-distillation has two characteristic failures (measured on the tiny world): the student *collapses* onto one
answer letter (the teacher's letter prior wins over what the image shows), and the teacher *drifts* (an EMA or
current teacher follows a student that is getting worse, so its crop answers stop being the evidence). Both show on
a few dozen fixed prompts long before they show in the loss:

* ``guard/letter_entropy``: entropy of the student's greedy full-image letters on the probe, divided by log(K)
  (1 = balanced answers, 0 = one letter for everything);
* ``guard/teacher_stability``: share of probe items where the teacher's crop answer equals its answer at the start
  of the run (label-free drift);
* ``guard/student_teacher_agreement``: share where the student's full-image answer equals the teacher's crop answer;
* ``guard/teacher_crop_accuracy`` and ``guard/student_full_accuracy``, only when the dataset carries answers. They
  are read for monitoring here and never reach the loss: training stays label-free.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import nn

from vopd.answering import generate_answers
from vopd.config import CollapseGuardConfig, ViewConfig
from vopd.data import Sample
from vopd.models import LoadedModel
from vopd.views import student_view, teacher_view


def letter_entropy(choices: Sequence[int | None], option_count: int) -> float:
    """Normalised entropy of the chosen options (unparsable answers count as one more outcome)."""
    if not choices or option_count < 2:
        return float("nan")
    counts = Counter(choices)
    total = len(choices)
    entropy = -sum((count / total) * math.log(count / total) for count in counts.values())
    return entropy / math.log(option_count)


class CollapseGuard:
    """Probe the student (full image) and the teacher (crop) on fixed samples; warn or stop on collapse or drift."""

    def __init__(self, config: CollapseGuardConfig, samples: Sequence[Sample], views: ViewConfig) -> None:
        self.config = config
        self.views = views
        # The first probe_size multiple-choice samples of the dataset: fixed, so every probe is comparable.
        self.probe = [sample for sample in samples if sample.options][: config.probe_size]
        self.initial_teacher_choices: list[int | None] | None = None

    @property
    def active(self) -> bool:
        return self.config.enabled and bool(self.probe)

    def due(self, step: int) -> bool:
        """Probe after every ``every``-th step (the trainer probes once more before the first, for the baseline)."""
        return self.active and step % self.config.every == 0

    def _answers(self, loaded: LoadedModel, model: nn.Module, view_fn: Any) -> list[int | None]:
        was_training = model.training
        probe_model = dataclasses.replace(loaded, model=model)
        try:
            choices: list[int | None] = []
            for start in range(0, len(self.probe), 32):
                batch = self.probe[start : start + 32]
                answers = generate_answers(
                    probe_model,
                    [view_fn(sample, self.views) for sample in batch],
                    [sample.options for sample in batch],
                    max_new_tokens=self.config.max_new_tokens,
                )
                choices.extend(answer.choice for answer in answers)
            return choices
        finally:
            model.train(was_training)

    def check(self, loaded: LoadedModel, teacher_model: nn.Module) -> tuple[dict[str, float], list[str]]:
        """Probe metrics and the warnings they raise (empty when all is well)."""
        student_choices = self._answers(loaded, loaded.model, student_view)
        teacher_choices = self._answers(loaded, teacher_model, teacher_view)
        if self.initial_teacher_choices is None:
            self.initial_teacher_choices = teacher_choices
        count = len(self.probe)
        option_count = max(len(sample.options or ()) for sample in self.probe)
        metrics = {
            "guard/letter_entropy": letter_entropy(student_choices, option_count),
            "guard/teacher_stability": sum(
                now == then for now, then in zip(teacher_choices, self.initial_teacher_choices, strict=True)
            )
            / count,
            "guard/student_teacher_agreement": sum(
                s == t and s is not None for s, t in zip(student_choices, teacher_choices, strict=True)
            )
            / count,
        }
        labelled = [(i, sample.answer_index) for i, sample in enumerate(self.probe) if sample.answer_index is not None]
        if labelled:
            metrics["guard/teacher_crop_accuracy"] = sum(teacher_choices[i] == a for i, a in labelled) / len(labelled)
            metrics["guard/student_full_accuracy"] = sum(student_choices[i] == a for i, a in labelled) / len(labelled)
        warnings = []
        if metrics["guard/letter_entropy"] < self.config.min_letter_entropy:
            top, top_count = Counter(student_choices).most_common(1)[0]
            letter = "unparsable" if top is None else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[top]
            warnings.append(
                f"collapse: the student's answers are concentrating on one option ({letter} for {top_count} of "
                f"{count} probe items, letter entropy {metrics['guard/letter_entropy']:.2f} < "
                f"{self.config.min_letter_entropy}); lower the learning rate or use a fixed teacher"
            )
        if metrics["guard/teacher_stability"] < self.config.min_teacher_stability:
            warnings.append(
                f"teacher drift: the teacher now gives its initial crop answer on only "
                f"{metrics['guard/teacher_stability']:.0%} of probe items (< {self.config.min_teacher_stability:.0%}); "
                "a fixed teacher or a smaller teacher.ema_rate keeps the crop evidence intact"
            )
        return metrics, warnings
