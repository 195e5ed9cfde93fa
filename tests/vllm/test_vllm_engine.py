"""The vllm rollout engine on CPU against the hf path: same prompts, same log-probs, same seeds, and a weight sync
that keeps the engine equal to the trained student after every optimizer step (full fine-tuning, LoRA, a resume).

Each sync test also runs with the sync switched off after the start, and shows that its check then fails: a test
that passed either way would prove nothing about the sync.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_trainer import write_dataset
from tests.vllm.conftest import ROLLOUT
from vopd.config import TrainConfig
from vopd.models import LoadedModel
from vopd.rollout import RolloutBatch, response_logits
from vopd.trainer import OPDTrainer
from vopd.views import student_view, to_messages

# fp32 on both sides: vLLM's and transformers' kernels differ in summation order only.
LOGPROB_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), count=4)


def conversations_for(loaded: LoadedModel, dataset: Path, repeats: int = 2) -> list[Any]:
    from vopd.config import ViewConfig
    from vopd.data import load_dataset

    views = ViewConfig()
    chats = [to_messages(student_view(sample, views)) for sample in load_dataset(str(dataset))]
    return [chat for chat in chats for _ in range(repeats)]


@torch.no_grad()
def hf_logprobs(model: torch.nn.Module, loaded: LoadedModel, conversations: list[Any], rollout: RolloutBatch) -> Any:
    """The student's log-probs of the rollout's tokens under the distribution the hf engine samples from (suppressed
    tokens removed, temperature 1), in fp32, from a plain forward over prompt + response."""
    prompts = loaded.encode(conversations)
    logits = response_logits(model, prompts, rollout).float()  # (N, R, V)
    logits[..., loaded.suppressed_token_ids] = float("-inf")
    return torch.log_softmax(logits, dim=-1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)


def max_difference(engine: Any, model: torch.nn.Module, loaded: LoadedModel, conversations: list[Any]) -> float:
    """max |engine log-prob - trainer log-prob| over the response tokens the engine samples for ``conversations``."""
    seeds = list(range(100, 100 + len(conversations)))
    rollout = engine.sample(conversations, loaded.encode(conversations), row_seeds=seeds)
    expected = hf_logprobs(model, loaded, conversations, rollout)
    mask = rollout.response_mask
    return float((rollout.behaviour_logprobs - expected)[mask].abs().max())


def test_prompt_ids_equal_ours(engine: Any, loaded: LoadedModel, dataset: Path) -> None:
    conversations = conversations_for(loaded, dataset, repeats=1)
    ours = loaded.encode(conversations)
    theirs = engine.prompt_ids(conversations)
    for row, ids in enumerate(theirs):
        mask = ours["attention_mask"][row].bool()
        assert ids == ours["input_ids"][row][mask].tolist()
    assert any(loaded.model.config.image_token_id in ids for ids in theirs)  # image placeholders expanded


def test_sampled_logprobs_equal_transformers(engine: Any, loaded: LoadedModel, dataset: Path) -> None:
    conversations = conversations_for(loaded, dataset)
    assert max_difference(engine, loaded.model, loaded, conversations) < LOGPROB_TOLERANCE


def test_same_seeds_same_tokens_across_calls_and_splits(engine: Any, loaded: LoadedModel, dataset: Path) -> None:
    conversations = conversations_for(loaded, dataset)
    seeds = [7 * row + 3 for row in range(len(conversations))]
    prompts = loaded.encode(conversations)
    whole = engine.sample(conversations, prompts, row_seeds=seeds)
    again = engine.sample(conversations, prompts, row_seeds=seeds)
    half = len(conversations) // 2
    first = engine.sample(conversations[:half], loaded.encode(conversations[:half]), row_seeds=seeds[:half])
    second = engine.sample(conversations[half:], loaded.encode(conversations[half:]), row_seeds=seeds[half:])
    assert torch.equal(whole.response_ids, again.response_ids)

    def rows(batch: RolloutBatch) -> list[list[int]]:
        return [ids[mask].tolist() for ids, mask in zip(batch.response_ids, batch.response_mask, strict=True)]

    assert rows(whole) == rows(first) + rows(second)
    # Two rollouts of one prompt with different seeds are different draws (temperature 1 on a tiny model).
    other = engine.sample(conversations, prompts, row_seeds=[seed + 1 for seed in seeds])
    assert rows(other) != rows(whole)


def make_config(model: Path, dataset: Path, output: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "model": str(model),
        "dataset": str(dataset),
        "output": str(output),
        "steps": 3,
        "seed": 0,
        "batch_size": 2,
        "lr": 1e-3,
        "save_every": 100,
        "rollout": ROLLOUT,
        "divergence": {"topk": 20},
        "collapse_guard": {"enabled": False},
        "runtime": {"device": "cpu", "dtype": "float32"},
    }
    values.update(overrides)
    return TrainConfig.model_validate(values)


@pytest.fixture
def broken_sync(request: pytest.FixtureRequest, engine: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Parametrised: False = the real engine; True = its per-step sync skipped (only the start's whole sync runs)."""
    broken = bool(request.param)
    if broken:
        real_sync = engine.sync
        monkeypatch.setattr(engine, "sync", lambda model, everything=False: real_sync(model) if everything else 0.0)
    yield broken


def check_follows(trainer: OPDTrainer, engine: Any, loaded: LoadedModel, dataset: Path, steps: int) -> list[float]:
    """After each optimizer step: max |engine - trainer| log-prob on fixed prompts and seeds, and the step's metric."""
    differences = []
    conversations = conversations_for(trainer.loaded, dataset)
    for _ in range(steps):
        metrics = trainer.train_step()
        trainer.step += 1
        assert metrics["rollout/logprob_diff_max"] >= 0 and "rollout/sync_s" in metrics
        differences.append(max_difference(engine, trainer.student, trainer.loaded, conversations))
    return differences


@pytest.mark.parametrize("broken_sync", [False, True], ids=["synced", "sync-skipped"], indirect=True)
def test_engine_equals_the_trained_model_after_every_step(
    engine: Any, loaded: LoadedModel, tiny_base: Path, dataset: Path, tmp_path: Path, broken_sync: bool
) -> None:
    trainer = OPDTrainer(make_config(tiny_base, dataset, tmp_path / "run"), rollout_engine=engine)
    differences = check_follows(trainer, engine, loaded, dataset, steps=3)
    if broken_sync:
        assert min(differences) > 1e-2, differences
    else:
        assert max(differences) < LOGPROB_TOLERANCE, differences


@pytest.mark.parametrize("broken_sync", [False, True], ids=["synced", "sync-skipped"], indirect=True)
def test_lora_syncs_merged_weights(
    engine: Any, loaded: LoadedModel, tiny_base: Path, dataset: Path, tmp_path: Path, broken_sync: bool
) -> None:
    # q and v only: vLLM packs q, k and v into one layer, which a sync must send whole.
    lora = {"enabled": True, "rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    trainer = OPDTrainer(make_config(tiny_base, dataset, tmp_path / "run", lr=5e-3, lora=lora), rollout_engine=engine)
    differences = check_follows(trainer, engine, loaded, dataset, steps=3)
    if broken_sync:
        assert min(differences) > 1e-3, differences
    else:
        assert max(differences) < LOGPROB_TOLERANCE, differences


@pytest.mark.parametrize("broken_sync", [False, True], ids=["synced", "sync-skipped"], indirect=True)
def test_resumed_run_syncs_the_checkpoint(
    engine: Any, loaded: LoadedModel, tiny_base: Path, dataset: Path, tmp_path: Path, broken_sync: bool
) -> None:
    config = make_config(tiny_base, dataset, tmp_path / "run", steps=2, save_every=1)
    OPDTrainer(config, rollout_engine=engine).train()
    engine.sync(loaded.model, everything=True)  # the engine back at the base weights, as a fresh one would be
    resumed = OPDTrainer(config.model_copy(update={"steps": 3}), resume=True, rollout_engine=engine)
    assert resumed.step == 2
    conversations = conversations_for(loaded, dataset)
    start = max_difference(engine, resumed.student, resumed.loaded, conversations)
    after = check_follows(resumed, engine, loaded, dataset, steps=1)[0]
    if broken_sync:
        assert after > 1e-2
    else:
        assert max(start, after) < LOGPROB_TOLERANCE, (start, after)


def test_training_run_writes_the_rollout_metrics(engine: Any, tiny_base: Path, dataset: Path, tmp_path: Path) -> None:
    result = OPDTrainer(make_config(tiny_base, dataset, tmp_path / "run", steps=2), rollout_engine=engine).train()
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        assert record["rollout/logprob_diff_max"] < 1e-4
        assert record["rollout/logprob_diff_mean"] <= record["rollout/logprob_diff_max"]
        assert record["rollout/is_clipped_frac"] == 0.0
        assert record["rollout/tokens_per_s"] > 0 and record["rollout/sync_s"] > 0
    assert engine.llm is not None  # a shared engine stays open after the run


def test_unsupported_architecture_names_the_hf_engine(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    from vopd.config import RolloutConfig
    from vopd.vllm_engine import VllmRolloutEngine, VllmUnsupportedModel

    monkeypatch.setattr(loaded.model.config, "architectures", ["NoSuchModelForConditionalGeneration"])
    with pytest.raises(VllmUnsupportedModel, match=r"NoSuchModelForConditionalGeneration.*rollout\.engine: hf"):
        VllmRolloutEngine(loaded, RolloutConfig.model_validate(ROLLOUT))


def test_resumed_run_samples_what_the_uninterrupted_run_sampled(
    engine: Any, tiny_base: Path, dataset: Path, tmp_path: Path
) -> None:
    whole = make_config(tiny_base, dataset, tmp_path / "whole", steps=3)
    OPDTrainer(whole, rollout_engine=engine).train()
    split = make_config(tiny_base, dataset, tmp_path / "split", steps=2, save_every=1)
    OPDTrainer(split, rollout_engine=engine).train()
    OPDTrainer(split.model_copy(update={"steps": 3}), resume=True, rollout_engine=engine).train()

    def last(run: Path) -> dict[str, float]:
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])

    resumed, uninterrupted = last(tmp_path / "split"), last(tmp_path / "whole")
    assert resumed["step"] == uninterrupted["step"] == 3
    for key in ("response_length", "loss", "divergence_mean"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-6, abs=1e-9), key


def test_an_engine_that_dies_mid_run_fails_the_run_with_its_own_error(
    engine: Any, tiny_base: Path, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine samples step 1, then dies: the run stops at once with an error that names the engine and the way
    out (never a hang, never a silent fallback), and step 1's record and checkpoint are kept."""
    from vopd.vllm_engine import VllmEngineError

    real_generate = engine.llm.generate
    calls = {"count": 0}

    def dies_after_the_first_step(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1
        if calls["count"] > 1:
            raise RuntimeError("EngineDeadError: the engine core stopped")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(engine.llm, "generate", dies_after_the_first_step)
    run = tmp_path / "run"
    with pytest.raises(VllmEngineError, match=r"failed while sampling .*EngineDeadError.*rollout\.engine: hf"):
        OPDTrainer(make_config(tiny_base, dataset, run, steps=3, save_every=1), rollout_engine=engine).train()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1]
    assert (run / "checkpoints" / "step-1").is_dir()
