"""State kept on the host instead of the device: AdamW's (``runtime.offload_optimizer``) and the teacher's weights
(``runtime.offload_teacher``).

Both keep their tensors on ``host`` (the CPU) as tensors of their own, never views of the device's, and bring them
over when they are needed: the optimizer copies the gradients to the host, steps there with torch's own AdamW and
copies the weights back; the teacher's weights stream to the device one transformer block at a time for its forward
and are released after it. On a CPU-only machine host and device are the same kind of memory, but the copies are
still separate storage and every transfer still runs, so the CPU tests exercise the same code path a GPU run takes
(and prove the results equal the on-device state's).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

HOST = torch.device("cpu")


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked host memory where the device is a GPU (asynchronous copies need it); plain memory otherwise."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


def to_host(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor of its own (``copy=True``: never the device tensor itself, even when both are on the CPU)."""
    return _pinned(tensor.detach().to(HOST, dtype=dtype or tensor.dtype, copy=True), device)


class HostAdamW(torch.optim.Optimizer):
    """AdamW whose moments, step counts and a copy of the weights (in their master dtype) live on the host.

    Its ``param_groups`` hold the device's trainable weights, so everything that reads or changes an optimizer's
    groups (the learning-rate schedule, gradient clipping, the fp16 loss scaler, ``zero_grad``) works on it as on a
    plain AdamW. ``step`` copies each gradient into a host buffer, runs torch's AdamW over the host weights (fused on
    the CPU where torch has it) and copies the updated weights back. ``state_dict`` is the inner AdamW's, which has
    the same layout as an on-device AdamW over the same groups: a checkpoint resumes with the offload on or off.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], **defaults: Any) -> None:
        groups = [dict(group) for group in param_groups]
        super().__init__(groups, dict(defaults))
        params = [param for group in self.param_groups for param in group["params"]]
        self.device = params[0].device if params else HOST
        inner_groups = []
        for group in self.param_groups:
            hosts = [to_host(param, self.device) for param in group["params"]]  # in the weights' own (master) dtype
            inner_groups.append({**{key: value for key, value in group.items() if key != "params"}, "params": hosts})
        fused = all(param.dtype in (torch.float32, torch.float16, torch.bfloat16) for param in params)
        self.inner = torch.optim.AdamW(inner_groups, **({"fused": True} if params and fused else {}))
        self._pairs = [
            (device_param, host_param)
            for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True)
            for device_param, host_param in zip(outer["params"], inner["params"], strict=True)
        ]

    def _sync_groups(self) -> None:
        """The outer groups' hyper-parameters (the schedule writes ``lr`` there) onto the inner optimizer's."""
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner.update({key: value for key, value in outer.items() if key != "params"})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("HostAdamW takes no closure")
        self._sync_groups()
        for device_param, host_param in self._pairs:
            grad = device_param.grad
            if grad is None:
                host_param.grad = None
                continue
            if host_param.grad is None:
                host_param.grad = _pinned(torch.empty_like(host_param, device=HOST), self.device)
            host_param.grad.copy_(grad, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the gradients have reached the host
        self.inner.step()
        for device_param, host_param in self._pairs:
            if host_param.grad is not None:
                device_param.copy_(host_param, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        self._sync_groups()
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """The inner AdamW's state (moved to the host by torch, which follows each weight's device) and the groups'
        hyper-parameters on both; the device weights are the checkpoint's own already."""
        self.inner.load_state_dict(state_dict)
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            outer.update({key: value for key, value in inner.items() if key != "params"})
        with torch.no_grad():
            for device_param, host_param in self._pairs:
                host_param.copy_(device_param)

    def host_tensors(self) -> list[torch.Tensor]:
        """Every tensor this optimizer holds on the host: weights, gradient buffers, moments (not the step counts)."""
        tensors = [host for _, host in self._pairs] + [host.grad for _, host in self._pairs if host.grad is not None]
        for state in self.inner.state.values():
            tensors += [value for value in state.values() if torch.is_tensor(value) and value.dim() > 0]
        return tensors


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks the model names in ``_no_split_modules``: the units the teacher streams."""
    root = model
    while hasattr(root, "base_model") and root.base_model is not root:  # peft's wrapper
        root = root.base_model
    names = set(getattr(root, "_no_split_modules", None) or getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    # Outermost blocks only (a block inside another one streams with it).
    inside = {id(child) for block in blocks for child in block.modules() if child is not block}
    return [block for block in blocks if id(block) not in inside]


class HostModule:
    """A module whose weights live on the host and stream to ``device`` block by block while it runs.

    The module's parameters hold an empty placeholder between uses; ``on_device()`` moves the weights outside any
    block (embeddings, the LM head, norms, the vision merger) over for the whole use and each block's own just before
    its forward, releasing them after it, so at most those and one block are on the device. ``host`` maps each
    parameter's name to its host tensor, which the EMA updates in place."""

    def __init__(self, module: nn.Module, device: torch.device, *, source: nn.Module | None = None) -> None:
        """``source``: a module of the same structure whose weights ``module`` starts from (the student, for a
        teacher copied with placeholders); ``module``'s own otherwise."""
        self.module = module
        self.device = device
        self._params = dict(module.named_parameters())
        start = dict((source or module).named_parameters())
        self.host = {name: to_host(start[name], device) for name in self._params}
        self._blocks = _blocks(module)
        in_blocks = {id(param) for block in self._blocks for param in block.parameters()}
        self._rest = [name for name, param in self._params.items() if id(param) not in in_blocks]
        self._names = {id(param): name for name, param in self._params.items()}
        self._release(self._params)

    def _release(self, names: Iterable[str]) -> None:
        for name in names:
            param = self._params[name]
            param.data = torch.empty(0, dtype=param.dtype, device=self.device)

    def _bring(self, names: Iterable[str]) -> None:
        for name in names:
            self._params[name].data = self.host[name].to(self.device, non_blocking=True, copy=True)

    def _block_names(self, block: nn.Module) -> list[str]:
        return [self._names[id(param)] for param in block.parameters()]

    @contextmanager
    def on_device(self) -> Iterator[nn.Module]:
        handles = []
        for block in self._blocks:
            names = self._block_names(block)
            handles.append(block.register_forward_pre_hook(lambda _m, _a, names=names: self._bring(names)))
            handles.append(block.register_forward_hook(lambda _m, _a, _o, names=names: self._release(names)))
        self._bring(self._rest)
        try:
            yield self.module
        finally:
            for handle in handles:
                handle.remove()
            self._release(self._params)
