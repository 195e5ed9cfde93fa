"""Which engine a run generates with: ``create_rollout_engine`` builds the one ``rollout.engine`` names for training's
rollouts, ``create_answer_engine`` the one an evaluation's ``engine`` names for its greedy answers.

It sits above both engines (``vopd.rollout``'s ``HFRolloutEngine`` and ``vopd.vllm_engine``, which builds on the
rollout module's batch and prompt helpers), so neither of them imports the other's module back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from vopd.answering import AnswerEngine
from vopd.config import EvalConfig, RolloutConfig, VllmConfig
from vopd.models import LoadedModel
from vopd.rollout import HFRolloutEngine, RolloutEngine, resolve_engine, resolve_engine_name


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


def create_answer_engine(
    loaded: LoadedModel,
    engine: str,
    vllm: VllmConfig,
    *,
    max_new_tokens: int,
    log: Callable[[str], None] | None = None,
) -> AnswerEngine | None:
    """What decodes greedy answers (evaluation, the benchmark suites, the evidence search) for ``loaded``: the vllm
    engine where ``engine`` (an EvalConfig's) resolves to it, synced whole from ``loaded.model`` (a LoRA folder's
    adapters merged in); None = transformers' ``generate``. The caller closes it. As in training, ``auto`` falls back
    to transformers (and says why through ``log``) where vLLM does not support the model."""
    name, why = resolve_engine(engine, loaded.device)
    if name == "hf":
        return None
    from vopd.vllm_engine import VllmRolloutEngine, VllmUnsupportedModel

    # Greedy, one answer per prompt; an evaluation has no training to give the memory to, so the engine stays awake.
    settings = RolloutConfig(
        engine="vllm",
        vllm=vllm.model_copy(update={"sleep": False}),
        num_rollouts=1,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
    )
    try:
        answer_engine = VllmRolloutEngine(loaded, settings)
    except VllmUnsupportedModel as error:
        if engine == "vllm":
            raise
        if log is not None:
            log(f"{why}, but {error}; decoding with transformers")
        return None
    answer_engine.sync(loaded.model, everything=True)
    if log is not None:
        log(f"answers from the vllm engine ({why})")
    return answer_engine


@contextmanager
def answer_engine_for(
    loaded: LoadedModel,
    config: EvalConfig,
    engine: AnswerEngine | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> Iterator[AnswerEngine | None]:
    """The answer engine an evaluation decodes with: ``engine`` when the caller made one (left open), else the one
    ``config.engine`` resolves to (``create_answer_engine``), closed on the way out."""
    if engine is not None:
        yield engine
        return
    budget = max(config.max_new_tokens, config.views.search_max_new_tokens)
    owned = create_answer_engine(loaded, config.engine, config.vllm, max_new_tokens=budget, log=log)
    try:
        yield owned
    finally:
        if owned is not None:
            owned.close()
