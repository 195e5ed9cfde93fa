"""Image features computed once per view and handed to every forward of a step (``vopd.models.with_image_features``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_trainer import make_config, trainable_snapshot, write_dataset
from vopd.config import RuntimeConfig
from vopd.models import image_features_refusal, load_model_and_processor, repeat_each_row, with_image_features
from vopd.rollout import response_logits, sample_rollouts
from vopd.trainer import OPDTrainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), count=4)


def _prompts(loaded, dataset: Path):
    from vopd.config import ViewConfig
    from vopd.data import load_dataset
    from vopd.views import student_view, to_messages

    samples = load_dataset(dataset)[:3]
    return loaded.encode([to_messages(student_view(sample, ViewConfig())) for sample in samples])


@pytest.mark.parametrize("family", ["qwen2vl", "llava"])
def test_precomputed_features_sample_and_score_exactly_as_the_pixels_do(
    family, tiny_model_dir, tiny_llava_dir, dataset
) -> None:
    folder = tiny_model_dir if family == "qwen2vl" else tiny_llava_dir
    loaded = load_model_and_processor(folder, RuntimeConfig(device="cpu", dtype="float32"), trainable=True)
    if family == "llava":  # its projector lies outside the vision tower and trains: no sharing until it is frozen
        assert "multi_modal_projector" in str(image_features_refusal(loaded.model))
        loaded.model.model.multi_modal_projector.requires_grad_(False)
    assert image_features_refusal(loaded.model) is None  # Qwen2-VL: its merger is inside the frozen vision tower
    pixels = _prompts(loaded, dataset)
    features = with_image_features(loaded.model, pixels)
    assert "pixel_values" not in features and "mm_encoder_outputs" in features
    assert torch.equal(features["input_ids"], pixels["input_ids"])
    settings = {
        "max_new_tokens": 5,
        "temperature": 1.0,
        "top_p": 1.0,
        "eos_token_ids": loaded.eos_token_ids,
        "pad_token_id": loaded.pad_token_id,
        "suppressed_token_ids": loaded.suppressed_token_ids,
        "row_seeds": [3, 4, 5],
    }
    from_pixels = sample_rollouts(loaded.model, pixels, **settings)
    from_features = sample_rollouts(loaded.model, features, **settings)
    assert torch.equal(from_pixels.response_ids, from_features.response_ids)
    assert torch.equal(from_pixels.behaviour_logprobs, from_features.behaviour_logprobs)
    with torch.no_grad():
        expected = response_logits(loaded.model, pixels, from_pixels)
        actual = response_logits(loaded.model, features, from_pixels)
    assert torch.equal(expected, actual)


@pytest.mark.parametrize("family", ["qwen2vl", "llava"])
def test_features_of_each_prompt_once_repeated_for_its_rollouts_score_as_every_row_encoded(
    family, tiny_model_dir, tiny_llava_dir, dataset
) -> None:
    """The trainer encodes each prompt's image once and repeats its features for the prompt's rollouts: the forward
    over the repeated rows gives what encoding every row gives."""
    folder = tiny_model_dir if family == "qwen2vl" else tiny_llava_dir
    loaded = load_model_and_processor(folder, RuntimeConfig(device="cpu", dtype="float32"), trainable=True)
    unique = _prompts(loaded, dataset)
    every_row = repeat_each_row(unique, 2)  # the pixels repeated: what the processor gives for the repeated list
    assert every_row is not None
    repeated = repeat_each_row(with_image_features(loaded.model, unique), 2)
    assert repeated is not None and "pixel_values" not in repeated
    features = repeated["mm_encoder_outputs"]["image"]
    assert features.last_hidden_state is None  # the encoder's internals are not repeated: nothing may read them
    with torch.no_grad():
        expected = loaded.model(**every_row).logits
        actual = loaded.model(**repeated).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(actual[0], actual[1]) and not torch.equal(actual[1], actual[2])


def test_features_are_not_shared_when_a_weight_behind_them_trains(tiny_model_dir) -> None:
    runtime = RuntimeConfig(device="cpu", dtype="float32")
    trained_tower = load_model_and_processor(tiny_model_dir, runtime, trainable=True, freeze_vision_tower=False)
    reason = image_features_refusal(trained_tower.model)
    assert reason is not None and "trained weights" in reason and "visual" in reason

    class TextOnly(nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return input_ids

    assert "does not take precomputed image features" in str(image_features_refusal(TextOnly()))


def _count_encoder_calls(trainer: OPDTrainer) -> list[int]:
    from vopd.models import vision_tower_module

    calls = [0]
    for model in (trainer.student, trainer.teacher.frozen_copy):  # the EMA teacher holds a copy of the encoder
        if model is not None:
            vision_tower_module(model).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a_step_that_shares_image_features_equals_one_that_does_not(tiny_model_dir, dataset, tmp_path) -> None:
    """Same loss, metrics and weights; the encoder runs once per view (student, crop) instead of in every forward
    (generate, teacher, student)."""
    shared = OPDTrainer(make_config(tiny_model_dir, dataset, tmp_path / "shared", steps=1))
    unshared = OPDTrainer(make_config(tiny_model_dir, dataset, tmp_path / "unshared", steps=1))
    assert shared.shares_image_features
    unshared.shares_image_features = False
    for trainer in (shared, unshared):  # a prompt pass spares generate and the student's forward the encoder anyway
        trainer.prompt_pass_refusal = "switched off by the test"
    shared_calls, unshared_calls = _count_encoder_calls(shared), _count_encoder_calls(unshared)
    first, second = shared.train_step(), unshared.train_step()
    assert (shared_calls[0], unshared_calls[0]) == (2, 3)
    for key in ("loss", "divergence_mean", "grad_norm", "response_length"):
        assert first[key] == pytest.approx(second[key], rel=1e-6, abs=1e-9), key
    after_shared, after_unshared = trainable_snapshot(shared), trainable_snapshot(unshared)
    for name, value in after_shared.items():
        torch.testing.assert_close(value, after_unshared[name], rtol=1e-6, atol=1e-7, msg=name)


def test_features_that_do_not_split_by_image_are_encoded_for_every_row_after_the_first_refusal(
    tiny_model_dir, dataset, tmp_path, monkeypatch
) -> None:
    """Qwen3-VL's encoder also returns deepstack features concatenated over all images, which cannot be repeated
    image by image: the trainer then encodes every row, and learns it once rather than on every call."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    from vopd import trainer as trainer_module
    from vopd.views import student_view

    trainer = OPDTrainer(make_config(tiny_model_dir, dataset, tmp_path / "run", steps=1))
    rollouts = trainer.config.rollout.num_rollouts
    conversations = trainer._conversations(trainer._samples_for(0), student_view)
    calls = _count_encoder_calls(trainer)
    plain = trainer._encode(conversations)  # each prompt's image once, its features repeated
    assert calls[0] == 1 and len(plain["mm_encoder_outputs"]["image"].pooler_output) == len(conversations)

    def with_deepstack(model, prompts):
        encoded = with_image_features(model, prompts)
        pooled = encoded["mm_encoder_outputs"]["image"].pooler_output
        encoded["mm_encoder_outputs"]["image"] = BaseModelOutputWithDeepstackFeatures(
            pooler_output=pooled, deepstack_features=[torch.cat(pooled)]
        )
        return encoded

    monkeypatch.setattr(trainer_module, "with_image_features", with_deepstack)
    assert repeat_each_row(with_deepstack(trainer.student, trainer.loaded.encode(conversations[::rollouts])), 2) is None
    calls[0] = 0
    refused = trainer._encode(conversations)  # the unique rows' features are refused, then every row is encoded
    again = trainer._encode(conversations)
    assert calls[0] == 1 + 1 + 1 and not trainer.repeats_image_features
    for encoded in (refused, again):
        assert torch.equal(encoded["input_ids"], plain["input_ids"])
        features = encoded["mm_encoder_outputs"]["image"]
        assert len(features.pooler_output) == len(conversations) and features.deepstack_features is not None
        expected = plain["mm_encoder_outputs"]["image"].pooler_output
        for got, want in zip(features.pooler_output, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_teacher_on_the_students_own_view_takes_the_same_features(tiny_model_dir, tmp_path) -> None:
    """TRL's setting (the teacher sees the student's image): the encoder runs once a step."""
    data = write_dataset(tmp_path / "data", count=4)
    same = data.parent / "same.jsonl"
    records = [json.loads(line) for line in data.read_text().splitlines()]
    same.write_text("".join(json.dumps(record | {"crop_image": record["image"]}) + "\n" for record in records))
    trainer = OPDTrainer(make_config(tiny_model_dir, same, tmp_path / "run", steps=1, views={"draw_box": False}))
    calls = _count_encoder_calls(trainer)
    trainer.train_step()
    assert calls[0] == 1
