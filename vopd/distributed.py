"""One process per device under torch.distributed: data-parallel (DDP) or sharded (FSDP2) training.

A config means the same run on any number of ranks. ``batch_size`` stays the number of prompts per micro-batch for
the *whole* job: rank r takes its contiguous share of each micro-batch's prompts, and each prompt keeps the rollout
seed of its place in the step (vopd.trainer), so what is sampled does not depend on the number of ranks. The loss is
the token-mean over the global step: every rank divides its token sum by the token count all-reduced over ranks and
multiplies by the world size, because DDP and FSDP average gradients over ranks. The result then differs from a
single-process run only by float reduction order.

Launch with ``vopd train --nproc N`` (which runs torchrun) or ``torchrun --nproc-per-node N -m vopd.cli train``. On a
CPU the gloo backend is used (the tests train that way); on GPUs, NCCL with one device per rank. Rank 0 alone writes
metrics, checkpoints and the final folder; checkpoints hold the gathered (full, unsharded) state, so a run can resume
on another number of ranks and the final folder is a plain Hugging Face one.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from vopd.models import unwrap_model

Strategy = Literal["single", "ddp", "fsdp"]


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job: its rank, how many there are, and the strategy that joins them."""

    strategy: Strategy = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "single"

    # ----------------------------------------------------------------------------------------------- collectives
    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (the values themselves in a single process)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def max(self, value: float, device: torch.device) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (for decisions that must agree, e.g. whether to stop)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(strategy: Strategy, timeout_s: float) -> Ranks:
    """Join the process group that torchrun described in the environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).

    ``single`` needs no launcher; ``ddp`` and ``fsdp`` need one (a world of one process is allowed, which is how a
    strategy is tested alone). The timeout bounds every collective, so a rank that dies ends the others with an
    error instead of a hang.
    """
    if strategy == "single":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                f"this process is one of {os.environ['WORLD_SIZE']} launched together, but runtime.strategy is "
                "'single': set runtime.strategy to ddp or fsdp"
            )
        return Ranks()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"runtime.strategy {strategy!r} needs a launcher: use `vopd train --nproc N ...` or "
            "`torchrun --nproc-per-node N -m vopd.cli train ...`"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)  # "cuda" now names this rank's own device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(strategy, dist.get_rank(), dist.get_world_size(), local_rank)


def teardown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ wrapping
def _shard_units(model: nn.Module, vision_tower: nn.Module | None) -> list[nn.Module]:
    """The sub-modules that become their own FSDP units: every transformer block the model names in
    ``_no_split_modules`` (decoder layers, vision blocks) and the vision tower, which generate() calls directly."""
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    units = [module for module in model.modules() if type(module).__name__ in block_names]
    if vision_tower is not None:
        units.append(vision_tower)
    return units


def shard(model: nn.Module, vision_tower: nn.Module | None, *, offload: bool = False) -> nn.Module:
    """FSDP2 ``fully_shard`` on each block, the vision tower and the root, in place; parameters become DTensor
    shards over all ranks. Forward and backward then gather each unit's weights just in time.

    ``offload`` (``runtime.offload_params`` for the student, ``runtime.offload_teacher`` for the teacher): FSDP2's
    ``CPUOffloadPolicy``, the shards (and a student's gradients) on the host, each unit copied to the device for its
    all-gather; the optimizer then steps on the host shards, so its state lives there too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = CPUOffloadPolicy(pin_memory=device_type == "cuda") if offload else OffloadPolicy()
    # The root is the transformers model under peft's wrapper: peft's generate() calls the inner model directly, so a
    # root on the wrapper would never gather the embeddings for it.
    root = unwrap_model(model)
    for unit in _shard_units(root, vision_tower):
        fully_shard(unit, mesh=mesh, offload_policy=policy)
    fully_shard(root, mesh=mesh, offload_policy=policy)
    return model


def first_forward(model: nn.Module, input_ids: torch.Tensor) -> None:
    """FSDP2 initialises its units on the root's first forward; generate() reaches the vision tower before any,
    which would make that unit a root of its own. One two-token text forward settles it."""
    with torch.no_grad():
        model(input_ids=input_ids[:1, :2], attention_mask=torch.ones_like(input_ids[:1, :2]))
    reshard(model)


def reshard(model: nn.Module) -> None:
    """Back to shards after a forward that no backward follows (FSDP2 keeps the root's weights gathered after a
    forward, expecting one): the module's parameters are then the same DTensor shards that the EMA updates."""
    from torch.distributed.fsdp import FSDPModule

    root = unwrap_model(model)
    if isinstance(root, FSDPModule):
        root.reshard()


def data_parallel(model: nn.Module, ranks: Ranks) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ranks.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, ranks: Ranks, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches before the step's last one (it would be repeated anyway)."""
    if ranks.strategy == "ddp" and not enabled:
        with wrapped.no_sync():  # type: ignore[operator]
            yield
        return
    if ranks.strategy == "fsdp":
        unwrap_model(wrapped).set_requires_gradient_sync(enabled)  # type: ignore[operator]
    yield


def is_sharded(model: nn.Module) -> bool:
    """Whether ``shard`` made ``model`` an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into ``target``, which may be a DTensor shard: each rank keeps its own part."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        target.copy_(distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements))
    else:
        target.copy_(full)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor shard (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
