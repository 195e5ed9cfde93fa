"""Teacher policies: which weights score the student's rollout on the crop view.

The teacher is the same model conditioned on privileged information (the crop), so it differs from the
student only by its view and, depending on the mode, by its weights:

- ``ema``: an exponential moving average of the student, theta_T <- (1 - r) theta_T + r theta_S after every
  optimizer step (the paper). With LoRA only the adapter is averaged: the base weights are shared.
- ``current``: the student's own weights, under no grad.
- ``fixed``: the initial weights (with LoRA: the student with its adapter disabled).

Only the trainable tensors can differ between teacher and student, so they are all the state a
teacher needs to checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vopd.config import TeacherConfig


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class Teacher:
    """Gives a context in which ``module`` computes the teacher's logits; updated after each step."""

    def __init__(self, student: nn.Module, config: TeacherConfig) -> None:
        self.config = config
        self.student = student
        self.uses_adapter = _is_peft(student)
        self.shadow: dict[str, torch.Tensor] = {}  # EMA (or fixed) copies of the trainable tensors
        self.frozen_copy: nn.Module | None = None  # full fine-tune with ema/fixed: a separate module
        if config.mode == "current" or (config.mode == "fixed" and self.uses_adapter):
            return
        if self.uses_adapter:  # ema over the adapter only
            self.shadow = {name: p.detach().clone() for name, p in trainable_parameters(student).items()}
        else:
            names = list(trainable_parameters(student))
            self.frozen_copy = copy.deepcopy(student)
            self.frozen_copy.requires_grad_(False)
            self.frozen_copy.eval()
            params = dict(self.frozen_copy.named_parameters())
            self.shadow = {name: params[name] for name in names}  # views into the copy: updates act on it

    @contextmanager
    def scoring(self) -> Iterator[nn.Module]:
        """Yield the module to run for teacher logits, with grad off and the right weights in place."""
        with torch.no_grad():
            if self.frozen_copy is not None:
                yield self.frozen_copy
            elif self.config.mode == "current":
                yield self.student
            elif self.config.mode == "fixed":  # LoRA: base weights are the initial weights
                with self.student.disable_adapter():
                    yield self.student
            else:  # LoRA + EMA: swap the averaged adapter in, then restore the student's
                live = trainable_parameters(self.student)
                saved = {name: p.detach().clone() for name, p in live.items()}
                try:
                    for name, param in live.items():
                        param.data.copy_(self.shadow[name])
                    yield self.student
                finally:
                    for name, param in live.items():
                        param.data.copy_(saved[name])

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the EMA towards the student (no-op for current and fixed)."""
        if self.config.mode != "ema":
            return
        for name, param in trainable_parameters(self.student).items():
            self.shadow[name].lerp_(param.detach().to(self.shadow[name].dtype), self.config.ema_rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"teacher state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name])
