"""Activation checkpointing (``runtime.gradient_checkpointing``): the same gradients, fewer saved activations.

Each family's blocks are recomputed in the backward under torch's non-reentrant checkpoint; in fp32 the gradients must
equal a plain backward's (1e-5 relative) for a full fine-tune and for LoRA, on the tiny Qwen2-VL, LLaVA and Qwen3.5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_trainer import make_config, write_dataset
from vopd.callbacks import ProgressCallback
from vopd.config import LoraConfig, RuntimeConfig, ViewConfig
from vopd.data import load_dataset
from vopd.models import (
    activation_checkpointing_enabled,
    enable_activation_checkpointing,
    load_model_and_processor,
)
from vopd.rollout import head_bypassed, response_logits, sample_rollouts
from vopd.trainer import OPDTrainer
from vopd.views import student_view, to_messages

CPU = RuntimeConfig(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), count=4)


@pytest.fixture(scope="module")
def tiny_qwen35_dir(tmp_path_factory) -> Path:
    from vopd.tiny_models import build_tiny_qwen35

    return build_tiny_qwen35(tmp_path_factory.mktemp("tiny-qwen3_5"), seed=0)


def _folder(family: str, request: pytest.FixtureRequest) -> Path:
    fixture = {"qwen2vl": "tiny_model_dir", "llava": "tiny_llava_dir", "qwen35": "tiny_qwen35_dir"}[family]
    return request.getfixturevalue(fixture)


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _mlp_calls(model: torch.nn.Module) -> list[int]:
    """Counts the first decoder block's MLP runs: a checkpointed block runs it again in the backward (the recompute
    calls the block's ``forward`` directly, so the block's own hooks would not see it; its children's do; a pre-hook,
    because the recompute stops as soon as it has every saved tensor, inside the last one)."""
    calls = [0]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.get_base_model().get_decoder()
    decoder.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("family", ["qwen2vl", "llava", "qwen35"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointed_gradients_equal_the_plain_backward(family, lora, dataset, request) -> None:
    folder = _folder(family, request)
    adapters = LoraConfig(enabled=True, rank=4) if lora else None
    loaded = load_model_and_processor(folder, CPU, lora=adapters, freeze_vision_tower=False, trainable=True)
    model = loaded.model
    if lora:  # peft starts B at zero, which would leave every A's gradient zero: give the adapters a value
        generator = torch.Generator().manual_seed(0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    samples = load_dataset(dataset)[:2]
    prompts = loaded.encode([to_messages(student_view(sample, ViewConfig())) for sample in samples])
    rollout = sample_rollouts(
        model,
        prompts,
        max_new_tokens=5,
        temperature=1.0,
        top_p=1.0,
        eos_token_ids=loaded.eos_token_ids,
        pad_token_id=loaded.pad_token_id,
        suppressed_token_ids=loaded.suppressed_token_ids,
        row_seeds=[3, 4],
    )

    def backward() -> dict[str, torch.Tensor]:
        # The trainer's own scoring: the head bypassed (hidden states), the head applied by the loss.
        with head_bypassed(model) as head:
            hidden = response_logits(model, prompts, rollout)  # (N, R, H)
            logits = hidden @ head.weight.T  # (N, R, V)
        torch.log_softmax(logits, dim=-1)[..., :50].square().mean().backward()
        return _gradients(model)

    calls = _mlp_calls(model)
    expected = backward()
    assert calls[0] == 1
    enable_activation_checkpointing(model)
    assert activation_checkpointing_enabled(model)
    actual = backward()
    assert calls[0] == 3  # the checkpointed block ran again in the backward
    assert actual.keys() == expected.keys()
    if lora:  # the adapters' A and B both get a gradient
        assert any("lora_A" in name for name in expected) and any("lora_B" in name for name in expected)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-7 * float(grad.abs().max()) + 1e-12)


def test_the_runtime_setting_checkpoints_the_trained_model_only(tiny_model_dir) -> None:
    on = CPU.model_copy(update={"gradient_checkpointing": True})
    assert activation_checkpointing_enabled(load_model_and_processor(tiny_model_dir, on, trainable=True).model)
    assert not activation_checkpointing_enabled(load_model_and_processor(tiny_model_dir, CPU, trainable=True).model)
    assert not activation_checkpointing_enabled(load_model_and_processor(tiny_model_dir, on).model)  # inference


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_training_step_with_checkpointing_equals_one_without(lora, tiny_model_dir, dataset, tmp_path) -> None:
    """The whole step (the EMA teacher, the loss from hidden states; the prompts run once without checkpointing and
    twice with it, since checkpointed blocks keep no cache): the same loss and the same gradients."""
    results = []
    for checkpointing in (False, True):
        config = make_config(
            tiny_model_dir,
            dataset,
            tmp_path / f"run-{checkpointing}",
            steps=1,
            collapse_guard={"enabled": False},
            lora={"enabled": lora, "rank": 4},
            runtime={"device": "cpu", "dtype": "float32", "gradient_checkpointing": checkpointing},
        )
        trainer = OPDTrainer(config)
        assert activation_checkpointing_enabled(trainer.student) == checkpointing
        assert trainer.logits_fallback is None
        step_gradients: dict[str, torch.Tensor] = {}
        take_step = trainer.optimizer.step

        def record_then_step(*args, trainer=trainer, take_step=take_step, step_gradients=step_gradients, **kwargs):
            for name, parameter in trainer.student.named_parameters():
                if parameter.grad is not None:
                    step_gradients[name] = parameter.grad.clone()
            return take_step(*args, **kwargs)

        trainer.optimizer.step = record_then_step
        metrics = trainer.train_step()
        results.append((metrics, step_gradients))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    assert plain_grads and checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():  # (Adam's first step turns any rounding into +-lr: compare gradients)
        scale = float(grad.abs().max())
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-5 * scale + 1e-12)


def test_the_prompt_pass_is_refused_with_checkpointing_and_says_why(tiny_model_dir, dataset, tmp_path) -> None:
    config = make_config(
        tiny_model_dir,
        dataset,
        tmp_path / "run",
        steps=1,
        collapse_guard={"enabled": False},
        runtime={"device": "cpu", "dtype": "float32", "gradient_checkpointing": True},
    )
    logs: list[str] = []

    class Recorder(ProgressCallback):
        def on_log(self, message: str, *, level: str = "info") -> None:
            logs.append(message)

    trainer = OPDTrainer(config, callbacks=[Recorder()])
    assert trainer.prompt_pass_refusal is not None
    assert "gradient_checkpointing" in trainer.prompt_pass_refusal
    assert any("prompts run twice" in line and "gradient_checkpointing" in line for line in logs)
