"""The vllm engine on the paper's architecture, Qwen3.5 (Gated DeltaNet + gated attention, tied embeddings), in bf16
as vLLM's CPU kernels need it: the sync keeps the engine equal to the trained student after every step, within
bf16 rounding, and fails that check when the per-step sync is skipped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_trainer import write_dataset
from tests.vllm.conftest import ROLLOUT
from vopd.config import RolloutConfig, RuntimeConfig, TrainConfig
from vopd.models import load_model_and_processor
from vopd.tiny_models import build_tiny_qwen35
from vopd.trainer import OPDTrainer

# Both sides compute in bf16 (vLLM's kernels, transformers under autocast) in different orders: measured max
# |difference| 1.1-1.3e-2 at every step; a skipped sync gives 0.09-0.23, and a sync that leaves the tied LM head's
# CPU copy stale (without ``_refresh_tied_heads``) 0.045-0.08.
BF16_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def qwen35_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen35(tmp_path_factory.mktemp("tiny-qwen3_5-vllm"), seed=0, vllm_shape=True)


@pytest.fixture(scope="module")
def qwen35_engine(qwen35_dir: Path) -> Iterator[Any]:
    from vopd.vllm_engine import VllmRolloutEngine

    loaded = load_model_and_processor(qwen35_dir, RuntimeConfig(device="cpu", dtype="bfloat16"))
    engine = VllmRolloutEngine(loaded, RolloutConfig.model_validate(ROLLOUT), seed=0)
    yield engine
    engine.close()


@pytest.fixture
def broken_sync(request: pytest.FixtureRequest, qwen35_engine: Any, monkeypatch: pytest.MonkeyPatch) -> bool:
    broken = bool(request.param)
    if broken:
        real_sync = qwen35_engine.sync
        monkeypatch.setattr(
            qwen35_engine, "sync", lambda model, everything=False: real_sync(model) if everything else 0
        )
    return broken


@pytest.mark.parametrize("broken_sync", [False, True], ids=["synced", "sync-skipped"], indirect=True)
def test_qwen35_engine_follows_training(
    qwen35_engine: Any, qwen35_dir: Path, tmp_path: Path, broken_sync: bool
) -> None:
    config = TrainConfig.model_validate(
        {
            "model": str(qwen35_dir),
            "dataset": str(write_dataset(tmp_path / "data", count=4)),
            "output": str(tmp_path / "run"),
            "steps": 4,
            "batch_size": 2,
            "lr": 3e-3,
            "rollout": ROLLOUT,
            "divergence": {"topk": 20},
            "collapse_guard": {"enabled": False},
            "runtime": {"device": "cpu", "dtype": "bfloat16"},
        }
    )
    trainer = OPDTrainer(config, rollout_engine=qwen35_engine)
    differences = []
    for _ in range(config.steps):
        differences.append(trainer.train_step()["rollout/logprob_diff_max"])
        trainer.step += 1
    # Step 1 samples from the start's whole sync; steps 2-4 from the syncs after optimizer steps 1-3.
    assert differences[0] < BF16_TOLERANCE, differences
    if broken_sync:
        assert min(differences[1:]) > 0.05, differences
    else:
        assert max(differences[1:]) < BF16_TOLERANCE, differences


def test_model_the_engine_cannot_run_names_the_hf_engine(tmp_path: Path) -> None:
    """The default tiny Qwen3.5 has 16-wide heads: vLLM starts an engine for it, but its CPU attention refuses them at
    the first prompt. The job fails with that reason and the way out, never a hang."""
    from PIL import Image

    from vopd.vllm_engine import VllmEngineError, VllmRolloutEngine

    folder = build_tiny_qwen35(tmp_path / "qwen3_5-16", seed=0)
    loaded = load_model_and_processor(folder, RuntimeConfig(device="cpu", dtype="bfloat16"))
    engine = VllmRolloutEngine(loaded, RolloutConfig.model_validate(ROLLOUT), seed=0)
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    try:
        with pytest.raises(VllmEngineError, match=r"head_dim=16.*rollout\.engine: hf"):
            engine.sample([chat], loaded.encode([chat]), row_seeds=[0])
    finally:
        engine.close()
