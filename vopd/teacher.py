"""Teacher policies: which weights score the student's rollout on the crop view.

The teacher is the same model conditioned on privileged information (the crop), so it differs from the
student only by its view and, depending on the mode, by its weights:

- ``ema``: an exponential moving average of the student, theta_T <- (1 - r) theta_T + r theta_S after every
  optimizer step that was taken (the paper). With LoRA only the adapter is averaged: the base weights are shared.
- ``current``: the student's own weights, under no grad.
- ``fixed``: the initial weights (with LoRA: the student with its adapter disabled).
- ``trust_region``: the logits (1 - c) z_initial + c z_student, both on the crop view (the official code's
  trust-region option: a teacher that can move only a little away from where training started).
- ``progressive``: the initial weights, replaced by an exact copy of the student every ``sync_every`` steps.

Only the trainable tensors can differ between teacher and student, so they are all the state a teacher needs to
checkpoint. They are kept in the student's dtype, which is the fp32 master dtype in training: an EMA at rate 0.05
towards a bf16 copy would round most of its updates away.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import BatchFeature

from vopd.config import TeacherConfig
from vopd.distributed import copy_full_into, full_tensor, is_sharded, local_tensor, reshard
from vopd.offload import HostModule, to_host
from vopd.rollout import RolloutBatch, head_bypassed, response_logits


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class Teacher:
    """Scores rollouts on the crop view with the teacher's weights; updated after each step."""

    def __init__(
        self,
        student: nn.Module,
        config: TeacherConfig,
        *,
        frozen_copy: nn.Module | None = None,
        offload: bool = False,
        packed: bool = False,
    ) -> None:
        """``student`` is the model itself (not a DDP wrapper). ``frozen_copy`` is the teacher's own module when the
        caller made it (``initial_copy``, then sharded like the student); otherwise it is copied here if needed.

        ``offload`` (``runtime.offload_teacher`` outside fsdp, whose shards are offloaded by FSDP2 itself): the
        teacher's weights live on the host (``vopd.offload``); a separate module streams to the device block by block
        for each forward, an adapter is copied into the student's for it; the EMA update runs on the host.

        ``packed`` (``runtime.pack_sequences``): score rows laid end to end without padding (``response_logits``)."""
        self.config = config
        self.packed = packed
        self.student = student
        self.uses_adapter = _is_peft(student)
        self.shadow: dict[str, torch.Tensor] = {}  # EMA (or fixed) copies of the trainable tensors
        self.frozen_copy: nn.Module | None = None  # full fine-tune with a weight-holding mode: a separate module
        self.host_module: HostModule | None = None  # the frozen copy's weights on the host (offload)
        self.offload = offload
        if config.mode == "current":
            return
        if self.uses_adapter and config.mode in ("fixed", "trust_region"):
            return  # the initial weights are the base with the adapter disabled
        device = next(student.parameters()).device
        if self.uses_adapter:  # ema / progressive over the adapter only
            trainable = trainable_parameters(student)
            self.shadow = {name: to_host(p, device) if offload else p.detach().clone() for name, p in trainable.items()}
        else:
            names = list(trainable_parameters(student))
            if frozen_copy is None:
                frozen_copy = self.initial_copy(student, config, offload=offload)
            self.frozen_copy = frozen_copy
            if offload and not is_sharded(self.frozen_copy):
                # The weights come from the student's (a copy made with ``offload`` holds placeholders).
                self.host_module = HostModule(self.frozen_copy, device, source=student)
                params = self.host_module.host
            else:
                params = dict(self.frozen_copy.named_parameters())
            self.shadow = {name: params[name] for name in names}  # views into the copy: updates act on it

    @staticmethod
    def initial_copy(student: nn.Module, config: TeacherConfig, *, offload: bool = False) -> nn.Module | None:
        """The separate frozen module a full fine-tune's teacher needs (None when it needs none).

        ``offload``: the copy's parameters are empty placeholders (its weights go to the host from the student's, in
        ``Teacher``), so the device never holds a second whole model, not even while the copy is made."""
        if config.mode == "current" or _is_peft(student):
            return None
        memo: dict[int, object] = {}
        if offload:
            for param in student.parameters():
                memo[id(param)] = nn.Parameter(torch.empty(0, dtype=param.dtype, device=param.device), False)
        frozen = copy.deepcopy(student, memo)
        frozen.requires_grad_(False)
        frozen.eval()
        return frozen

    @contextmanager
    def scoring(self) -> Iterator[nn.Module]:
        """Yield the module that holds the teacher's weights, with grad off (trust_region: its initial weights)."""
        with torch.no_grad():
            if self.host_module is not None:
                with self.host_module.on_device() as module:
                    yield module
            elif self.frozen_copy is not None:
                try:
                    yield self.frozen_copy
                finally:
                    reshard(self.frozen_copy)
            elif self.config.mode == "current":
                yield self.student
            elif self.config.mode in ("fixed", "trust_region"):  # LoRA: base weights are the initial weights
                with self.student.disable_adapter():
                    yield self.student
            else:  # LoRA + ema/progressive: swap the teacher's adapter in, then restore the student's
                live = trainable_parameters(self.student)
                device = next(iter(live.values())).device
                saved = {name: to_host(p, device) if self.offload else p.detach().clone() for name, p in live.items()}
                try:
                    for name, param in live.items():
                        param.data.copy_(self.shadow[name])
                    yield self.student
                finally:
                    for name, param in live.items():
                        param.data.copy_(saved[name])

    @torch.no_grad()
    def response_logits(self, prompts: BatchFeature, rollout: RolloutBatch) -> torch.Tensor:
        """The teacher's logits for each response position of ``rollout`` on ``prompts`` (the crop view): (N, R, V)."""
        with self.scoring() as module:
            logits = response_logits(module, prompts, rollout, packed=self.packed)
        if self.config.mode == "trust_region":
            current = response_logits(self.student, prompts, rollout, packed=self.packed)
            logits = torch.lerp(logits, current, self.config.trust_region_mix)
        return logits

    @torch.no_grad()
    def response_hidden(self, prompts: BatchFeature, rollout: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's final hidden states at the response positions (N, R, H) and its LM head (V, H): what
        ``response_logits`` would project, for the loss that never builds the logits (not for trust_region, whose
        logits mix two models)."""
        if self.config.mode == "trust_region":
            raise ValueError("a trust_region teacher's logits mix two models: score it with response_logits")
        with self.scoring() as module, head_bypassed(module) as head:
            hidden = response_logits(module, prompts, rollout, packed=self.packed)
            weight = head.weight.detach()
            # A sharded teacher frees its whole weights when ``scoring`` reshards it: keep a copy of the head. Otherwise
            # the head is never among the weights ``scoring`` swaps in and back (head_bypassed refuses a LoRA-wrapped
            # head), so the tensor still holds the teacher's head after the context is left.
            return hidden, weight.clone() if self.frozen_copy is not None and is_sharded(self.frozen_copy) else weight

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based) was taken: move the teacher's weights as its mode says."""
        if self.config.mode == "ema":
            live = trainable_parameters(self.student)
            shadows = [self.shadow[name] for name in live]
            # DTensor shards (FSDP) are updated through their local parts: student and teacher are sharded alike.
            shadows = [local_tensor(shadow) for shadow in shadows]
            params = [local_tensor(param.detach()) for param in live.values()]
            if any(param.device != shadow.device for param, shadow in zip(params, shadows, strict=True)):
                # The teacher on the host: each student tensor comes over and is averaged in, one at a time (a copy
                # of all of them at once would be a second model in host memory).
                for param, shadow in zip(params, shadows, strict=True):
                    shadow.lerp_(param.to(device=shadow.device, dtype=shadow.dtype), self.config.ema_rate)
            else:
                # One call for all tensors (the same lerp per tensor, without ~100 Python-level ops per step).
                targets = [param.to(shadow.dtype) for param, shadow in zip(params, shadows, strict=True)]
                torch._foreach_lerp_(shadows, targets, self.config.ema_rate)
        elif self.config.mode == "progressive" and step % self.config.sync_every == 0:
            for name, param in trainable_parameters(self.student).items():
                self.shadow[name].copy_(param.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors, also when the teacher is sharded over ranks (every rank must call it then)."""
        return {name: full_tensor(tensor).detach().clone() for name, tensor in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"teacher state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for name, tensor in self.shadow.items():
            copy_full_into(tensor, state[name])
