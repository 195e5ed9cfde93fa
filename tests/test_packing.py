"""Packed scoring forwards (``runtime.pack_sequences``): a micro-batch's rows laid end to end without padding, each
attending only to itself, give the padded forward's logits and the step's gradient, and the step reports no padding."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.test_micro_batches import _step_gradients, assert_same_step, budget_for_rows, uneven_step_trainer
from tests.test_trainer import make_config, write_dataset
from vopd.config import RuntimeConfig, ViewConfig
from vopd.data import load_dataset
from vopd.models import load_model_and_processor, with_image_features
from vopd.rollout import RolloutBatch, packing_refusal, response_logits
from vopd.trainer import OPDTrainer
from vopd.views import student_view, to_messages


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), count=8)


def _rollout(rows: int, width: int, lengths: list[int], seed: int = 0) -> RolloutBatch:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return RolloutBatch(
        response_ids=torch.randint(10, 200, (rows, width), generator=generator).masked_fill(~mask, 0),
        response_mask=mask,
        behaviour_logprobs=torch.zeros(rows, width),
        truncated=torch.zeros(rows, dtype=torch.bool),
    )


@pytest.mark.parametrize("family", ["qwen2vl", "llava"])
@pytest.mark.parametrize("image_features", [False, True])
def test_packed_rows_score_and_backpropagate_as_padded_rows(
    family, image_features, tiny_model_dir, tiny_llava_dir, dataset
):
    """Prompts of different lengths (left-padded) and responses of different lengths (right-padded): the packed
    forward's log-probs at every kept position and the gradient of their sum equal the padded forward's (fp32)."""
    folder = tiny_model_dir if family == "qwen2vl" else tiny_llava_dir
    loaded = load_model_and_processor(folder, RuntimeConfig(device="cpu", dtype="float32"))
    model = loaded.model.requires_grad_(True)
    assert packing_refusal(model) is None
    samples = load_dataset(dataset)[:4]
    conversations = [to_messages(student_view(sample, ViewConfig())) for sample in samples]
    conversations[1][-1]["content"].append({"type": "text", "text": " and say it in several more words please"})
    prompts = loaded.encode(conversations)
    assert bool((prompts["attention_mask"] == 0).any())  # some prompt is left-padded
    if image_features:
        with torch.no_grad():
            prompts = with_image_features(model, prompts)
    rollout = _rollout(4, 6, [6, 2, 4, 1])
    results = {}
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        logits = response_logits(model, prompts, rollout, packed=packed)
        assert logits.shape[:2] == rollout.response_ids.shape
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token = logprobs.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)[rollout.response_mask]
        token.sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[packed] = (token.detach(), grads)
    (padded, padded_grads), (packed_tokens, packed_grads) = results[False], results[True]
    torch.testing.assert_close(packed_tokens, padded, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    # Some of a random tiny model's gradients are rounding residue (1e-10 where others are 1e-2): the tolerance is
    # relative to the largest gradient of any weight, as a gradient norm would see it.
    largest = max(float(grad.abs().max()) for grad in padded_grads.values())
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6 * largest, msg=name)


def test_recurrent_and_sliding_window_models_are_refused() -> None:
    def model(**config) -> torch.nn.Module:
        module = torch.nn.Module()
        module.config = SimpleNamespace(**config)
        return module

    assert packing_refusal(model(layer_types=["full_attention"] * 2)) is None
    refusal = packing_refusal(model(layer_types=["linear_attention", "full_attention"]))
    assert refusal is not None and "linear_attention" in refusal
    assert "sliding-window" in (packing_refusal(model(use_sliding_window=True)) or "")


@pytest.mark.parametrize("budget", [None, "three rows"])
def test_a_packed_step_has_the_padded_steps_gradient(budget, tiny_model_dir, dataset, tmp_path):
    """The same step with padded and with packed scoring forwards, whole or in token-budget groups (responses of
    varied lengths, a teacher that differs): the same loss, metrics and gradient, and no padding computed."""
    results = {}
    for packed in (False, True):
        runtime = {"pack_sequences": packed}
        trainer = uneven_step_trainer(tiny_model_dir, dataset, tmp_path / f"run-{packed}", runtime, end_every=3)
        assert trainer.prompt_pass_refusal is not None  # the scoring forward is its own
        if budget is not None:  # room for three of a micro-batch's rows at the longest response
            trainer.config.runtime.max_tokens_per_micro_batch = budget_for_rows(trainer, 3)
        results[packed] = _step_gradients(trainer)
    (plain, plain_grads), (packed, packed_grads) = results[False], results[True]
    assert plain["padding_fraction"] > 0 and packed["padding_fraction"] == 0
    assert packed["response_length"] < 8  # responses did end early, so the padded forwards held right padding
    assert_same_step((plain, plain_grads), (packed, packed_grads))


def test_a_qwen35_run_with_packing_is_refused_at_start(dataset, tmp_path) -> None:
    """Qwen3.5's Gated DeltaNet layers would carry their state across packed rows: the trainer refuses to start."""
    from vopd.tiny_models import build_tiny_qwen35

    folder = build_tiny_qwen35(tmp_path / "qwen35", seed=0)
    config = make_config(folder, dataset, tmp_path / "run", runtime={"device": "cpu", "pack_sequences": True})
    with pytest.raises(ValueError, match="pack_sequences: .*linear_attention"):
        OPDTrainer(config)
