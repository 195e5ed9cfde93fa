"""Which rollout engine a run samples with: ``create_rollout_engine`` builds the one ``rollout.engine`` names.

It sits above both engines (``vopd.rollout``'s ``HFRolloutEngine`` and ``vopd.vllm_engine``, which builds on the
rollout module's batch and prompt helpers), so neither of them imports the other's module back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vopd.config import RolloutConfig
from vopd.models import LoadedModel
from vopd.rollout import HFRolloutEngine, RolloutEngine, resolve_engine_name


def create_rollout_engine(
    model: torch.nn.Module,
    loaded: LoadedModel,
    rollout: RolloutConfig,
    *,
    strategy: str = "single",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> RolloutEngine:
    """The engine ``rollout.engine`` names for ``model`` (the student, loaded as ``loaded``); not yet synced: call
    ``sync(model, everything=True)`` before its first rollouts. ``auto`` falls back to ``hf`` (and says why through
    ``log``) where vLLM does not support the model."""
    name, why = resolve_engine_name(rollout, loaded.device, strategy)
    if name == "hf":
        return HFRolloutEngine(model, loaded, rollout, synced_gpus=strategy == "fsdp")
    from vopd.vllm_engine import VllmRolloutEngine, VllmUnsupportedModel

    try:
        return VllmRolloutEngine(loaded, rollout, seed=seed)
    except VllmUnsupportedModel as error:
        if rollout.engine == "vllm":
            raise
        if log is not None:
            log(f"{why}, but {error}; sampling with transformers")
        return HFRolloutEngine(model, loaded, rollout, synced_gpus=strategy == "fsdp")
