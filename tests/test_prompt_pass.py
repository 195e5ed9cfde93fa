"""One forward over the prompts whose KV cache serves both sampling and scoring (``vopd.rollout.PromptPass``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_trainer import make_config, write_dataset
from vopd.config import RuntimeConfig, ViewConfig
from vopd.models import load_model_and_processor, with_image_features
from vopd.rollout import PromptPass, head_bypassed, prompt_pass_refusal, response_logits, sample_rollouts
from vopd.trainer import OPDTrainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), count=4)


def _loaded_and_prompts(folder: Path, dataset: Path):
    from vopd.data import load_dataset
    from vopd.views import student_view, to_messages

    loaded = load_model_and_processor(folder, RuntimeConfig(device="cpu", dtype="float32"), trainable=True)
    samples = load_dataset(dataset)[:3]
    prompts = loaded.encode([to_messages(student_view(sample, ViewConfig())) for sample in samples])
    return loaded, prompts


def _settings(loaded) -> dict:
    return {
        "max_new_tokens": 6,
        "temperature": 1.0,
        "top_p": 1.0,
        "eos_token_ids": loaded.eos_token_ids,
        "pad_token_id": loaded.pad_token_id,
        "suppressed_token_ids": loaded.suppressed_token_ids,
        "row_seeds": [7, 8, 9],
    }


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("family", ["qwen2vl", "llava"])
@pytest.mark.parametrize("image_features", [False, True])
def test_sampling_and_scoring_from_one_prompt_pass_equal_the_two_forwards(
    family, image_features, tiny_model_dir, tiny_llava_dir, dataset
) -> None:
    loaded, prompts = _loaded_and_prompts(tiny_model_dir if family == "qwen2vl" else tiny_llava_dir, dataset)
    model = loaded.model
    if image_features:
        model.requires_grad_(False)  # the features must not depend on a trained weight; the gradient below is
        model.get_decoder().requires_grad_(True)  # the language model's
        prompts = with_image_features(model, prompts)
    assert prompt_pass_refusal(model) is None
    plain = sample_rollouts(model, prompts, **_settings(loaded))
    expected = response_logits(model, prompts, plain)
    expected.square().mean().backward()
    expected_grads = _gradients(model)

    prompt_pass = PromptPass.run(model, prompts)
    seen: list[tuple[int, ...]] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: seen.append(tuple(args[0].shape)))
    shared = sample_rollouts(model, prompts, prompt_pass=prompt_pass, **_settings(loaded))
    hook.remove()
    assert seen[0] == (3, 1)  # generate started from the cache: the last prompt token alone
    assert torch.equal(shared.response_ids, plain.response_ids)
    torch.testing.assert_close(shared.behaviour_logprobs, plain.behaviour_logprobs, rtol=0, atol=1e-5)
    actual = prompt_pass.response_logits(model, plain)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    actual.square().mean().backward()
    actual_grads = _gradients(model)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():  # the gradient reaches the prompt's own forward through the cache
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_pass_works_with_the_head_bypassed(tiny_model_dir, dataset) -> None:
    loaded, prompts = _loaded_and_prompts(tiny_model_dir, dataset)
    model = loaded.model
    rollout = sample_rollouts(model, prompts, **_settings(loaded))
    with head_bypassed(model):
        expected = response_logits(model, prompts, rollout)
        actual = PromptPass.run(model, prompts).response_logits(model, rollout)
    assert actual.shape == expected.shape and actual.shape[-1] == model.config.text_config.hidden_size
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_models_whose_forward_the_pass_cannot_share_are_refused(tiny_model_dir) -> None:
    from vopd.config import LoraConfig

    runtime = RuntimeConfig(device="cpu", dtype="float32")
    with_dropout = load_model_and_processor(
        tiny_model_dir, runtime, trainable=True, lora=LoraConfig(enabled=True, dropout=0.1)
    ).model
    assert "dropout of 0.1" in str(prompt_pass_refusal(with_dropout))
    plain = load_model_and_processor(tiny_model_dir, runtime, trainable=True).model
    plain.config.text_config.layer_types = ["linear_attention", "full_attention"] * 2
    assert "linear_attention layers" in str(prompt_pass_refusal(plain))


def test_a_step_from_one_prompt_pass_equals_one_with_two(tiny_model_dir, dataset, tmp_path) -> None:
    shared = OPDTrainer(make_config(tiny_model_dir, dataset, tmp_path / "shared", steps=1))
    separate = OPDTrainer(make_config(tiny_model_dir, dataset, tmp_path / "separate", steps=1))
    assert shared.prompt_pass_refusal is None
    separate.prompt_pass_refusal = "switched off by the test"
    first, second = shared.train_step(), separate.train_step()
    for key in ("loss", "divergence_mean", "grad_norm", "response_length", "student_entropy"):
        if key in first:
            assert first[key] == pytest.approx(second[key], rel=1e-4, abs=1e-7), key
    # The step's gradients (still on the weights after the update). Not the weights: AdamW's first step moves each
    # weight by about lr whatever its gradient's size, so a rounding-level gradient can flip its sign either way.
    separate_grads = {name: p.grad for name, p in separate.student.named_parameters() if p.grad is not None}
    shared_grads = {name: p.grad for name, p in shared.student.named_parameters() if p.grad is not None}
    assert shared_grads.keys() == separate_grads.keys() and shared_grads
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, separate_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"grad_accum": 2}, "grad_accum"),
        ({"rollout": {"num_rollouts": 2, "max_new_tokens": 6, "share_prompt_pass": False}}, "share_prompt_pass is off"),
    ],
)
def test_the_trainer_says_why_it_runs_the_prompts_twice(overrides, reason, tiny_model_dir, dataset, tmp_path) -> None:
    trainer = OPDTrainer(make_config(tiny_model_dir, dataset, tmp_path / "run", steps=1, **overrides))
    assert reason in str(trainer.prompt_pass_refusal)
    assert trainer.train_step()["loss"] > 0


def test_a_prompt_ending_in_an_image_token_is_refused_before_any_forward(tiny_model_dir, dataset) -> None:
    """The pass leaves the last prompt token to generate: it must be text, or the images' features would not fit."""
    loaded, prompts = _loaded_and_prompts(tiny_model_dir, dataset)
    cut = dict(prompts)
    last_image = int((prompts["input_ids"][0] == loaded.model.config.image_token_id).nonzero().max()) + 1
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        cut[key] = prompts[key][:, :last_image]
    calls: list[int] = []
    hook = loaded.model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="ends with an image token"):
        PromptPass.run(loaded.model, cut)
    hook.remove()
    assert not calls


def test_positions_give_none_for_what_a_release_requires_and_the_inputs_lack() -> None:
    """transformers 5.19's Qwen2.5-VL requires video_grid_thw and past_key_values of compute_3d_position_ids; a
    prompt batch has neither (images only, positions from scratch)."""
    from vopd.rollout import _positions

    seen: dict[str, object] = {}

    class Inner(torch.nn.Module):
        def compute_3d_position_ids(self, input_ids, image_grid_thw, video_grid_thw, past_key_values, inputs_embeds):
            seen.update(video_grid_thw=video_grid_thw, past_key_values=past_key_values, image_grid_thw=image_grid_thw)
            return torch.zeros(3, *input_ids.shape, dtype=torch.long)

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

    grid = torch.tensor([[1, 2, 2]])
    positions = _positions(Outer(), {"input_ids": torch.ones(1, 5, dtype=torch.long), "image_grid_thw": grid})
    assert positions.shape == (3, 1, 5)
    assert seen["video_grid_thw"] is None and seen["past_key_values"] is None and seen["image_grid_thw"] is grid
