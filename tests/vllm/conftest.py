"""One vLLM engine on the shipped tiny-base (Qwen2-VL, fp32) for the whole session: importing vLLM takes 20-30 s
here and each engine a few seconds more. Every trainer syncs the engine whole when it starts, so runs can share it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vopd.config import RolloutConfig, RuntimeConfig
from vopd.models import LoadedModel, load_model_and_processor
from vopd.tiny import shipped_base_model_dir

# The rollout settings every test here samples with (an engine's are fixed when it starts).
ROLLOUT = {"num_rollouts": 2, "max_new_tokens": 6, "engine": "vllm", "vllm": {"max_model_len": 1024}}


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    return shipped_base_model_dir()


@pytest.fixture(scope="session")
def loaded(tiny_base: Path) -> LoadedModel:
    return load_model_and_processor(tiny_base, RuntimeConfig(device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def engine(loaded: LoadedModel) -> Iterator[object]:
    from vopd.vllm_engine import VllmRolloutEngine

    engine = VllmRolloutEngine(loaded, RolloutConfig.model_validate(ROLLOUT), seed=0)
    engine.sync(loaded.model, everything=True)
    yield engine
    engine.close()
