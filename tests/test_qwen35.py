"""The whole Vision-OPD loop on the paper's own architecture, Qwen3.5, built tiny with random weights and offline.

Qwen3.5 differs from the Qwen2-VL the other tests use where the loop is fragile: three of every four decoder layers
are Gated DeltaNet linear attention (a recurrent state in the cache, no keys and values), the full-attention layer
uses partial interleaved M-RoPE fed by ``mm_token_type_ids``, the vision tower takes 16 px patches, and the chat
template opens a ``<think>`` block after the assistant header unless thinking is switched off.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from tests.test_trainer import make_config as qwen2vl_make_config
from tests.test_trainer import trainable_snapshot
from vopd.config import EvalConfig, InspectConfig, LoraConfig, RuntimeConfig, TrainConfig, ViewConfig
from vopd.data import Sample
from vopd.models import (
    LoadedModel,
    load_model_and_processor,
    parameter_count,
    register_image_only_processors,
)
from vopd.rollout import RolloutBatch, response_logits, sample_rollouts
from vopd.synth import SynthConfig, generate_dataset
from vopd.tiny_models import QWEN3_5_SPECIAL_TOKENS, build_tiny_qwen35
from vopd.trainer import OPDTrainer, latest_checkpoint, train
from vopd.views import student_view, teacher_view, to_messages

CPU = RuntimeConfig(device="cpu", dtype="float32")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


@pytest.fixture(scope="module")
def qwen35_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Qwen3.5 folder (about 0.3M parameters), built once for this module. Treat it as read-only."""
    return build_tiny_qwen35(tmp_path_factory.mktemp("tiny-qwen3_5"), seed=0)


@pytest.fixture(scope="module")
def loaded(qwen35_dir: Path) -> LoadedModel:
    return load_model_and_processor(qwen35_dir, CPU)


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth"), SynthConfig(n=6, seed=5))


def _png(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height), (225, 225, 225))
    ImageDraw.Draw(image).ellipse([8, 8, 24, 24], fill=(30, 170, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _mixed_size_samples() -> list[Sample]:
    """Images and boxes of different shapes: prompts of different lengths, so batches are left-padded."""
    shapes = [(112, 112, (4, 4, 36, 36)), (192, 96, (4, 4, 60, 44)), (64, 160, (2, 2, 30, 30))]
    return [
        Sample(
            id=f"mixed-{index}",
            question="What color is the shape inside the box?",
            options=["red", "green", "blue", "yellow"],
            bbox=bbox,
            image_bytes=_png(width, height),
        )
        for index, (width, height, bbox) in enumerate(shapes)
    ]


def _sample(loaded: LoadedModel, prompts, *, temperature: float, max_new_tokens: int = 6, seed: int = 1):
    return sample_rollouts(
        loaded.model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        eos_token_ids=loaded.eos_token_ids,
        pad_token_id=loaded.pad_token_id,
        suppressed_token_ids=loaded.suppressed_token_ids,
        seed=seed,
    )


def make_config(model: Path, dataset: Path, output: Path, **overrides) -> TrainConfig:
    """The Qwen2-VL tests' small run (tests.test_trainer), with 4-token rollouts and no collapse guard."""
    values = {
        "rollout": {"num_rollouts": 2, "max_new_tokens": 4},
        "collapse_guard": {"enabled": False},
        "runtime": {"device": "cpu", "dtype": "float32"},
    }
    return qwen2vl_make_config(model, dataset, output, **{**values, **overrides})


# --------------------------------------------------------------------------------------------- build and load


def test_generation_prompt_thinking_switch(loaded: LoadedModel) -> None:
    """Qwen3.5's template: thinking is on by default (an opened block), enable_thinking=False closes an empty one."""
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.new("RGB", (64, 64))}, {"type": "text", "text": "Which?"}],
        }
    ]
    render = loaded.processor.apply_chat_template
    thinking = render(conversation, add_generation_prompt=True, tokenize=False)
    plain = render(conversation, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    explicit = render(conversation, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    user_turn = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which?<|im_end|>\n"
    assert thinking == explicit == user_turn + "<|im_start|>assistant\n<think>\n"  # no default system turn
    assert plain == user_turn + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render(conversation, add_generation_prompt=False, tokenize=False) == user_turn
    # An earlier assistant turn drops its reasoning; <think> and </think> stay single tokens, not special ones.
    history = conversation + [
        {"role": "assistant", "content": "<think>\nmaybe\n</think>\n\nB"},
        {"role": "user", "content": "Sure?"},
    ]
    assert "<|im_start|>assistant\nB<|im_end|>\n" in render(history, tokenize=False)
    tokenizer = loaded.tokenizer
    ids = tokenizer("<think>\n\n</think>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<think>", "</think>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\n\n</think>"


def test_repeating_encoded_rows_equals_encoding_the_repeated_conversations(loaded: LoadedModel) -> None:
    """The trainer encodes each prompt once and repeats its rows for the rollouts: the same inputs, exactly."""
    from tests.test_models import assert_repeating_rows_equals_encoding_them_all, two_prompts

    assert_repeating_rows_equals_encoding_them_all(loaded.processor, two_prompts())


def test_builds_qwen35_with_its_real_classes_and_loads_offline(qwen35_dir: Path, loaded: LoadedModel) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    model, processor = loaded.model, loaded.processor
    assert isinstance(model, Qwen3_5ForConditionalGeneration) and model.config.model_type == "qwen3_5"
    text = model.config.text_config
    assert text.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert isinstance(processor, Qwen3VLProcessor) and not hasattr(processor, "video_processor")
    assert processor.image_processor.patch_size == 16 and processor.image_processor.merge_size == 2
    assert 100_000 < parameter_count(model) < 1_000_000
    assert text.vocab_size == len(loaded.tokenizer)

    # Exactly the pixel placeholders are suppressed; the turn ends on <|im_end|> or <|endoftext|>.
    ids = loaded.tokenizer.convert_tokens_to_ids
    assert loaded.suppressed_token_ids == sorted(ids(token) for token in VISION_TOKENS)
    assert set(loaded.eos_token_ids) == {ids("<|im_end|>"), ids("<|endoftext|>")}
    assert [ids(token) for token in QWEN3_5_SPECIAL_TOKENS] == list(
        range(ids("<|endoftext|>"), ids("<|video_pad|>") + 1)
    )

    # The auto classes see the same folder once the image-only processor is registered.
    register_image_only_processors()
    assert AutoProcessor.from_pretrained(qwen35_dir, local_files_only=True).image_processor is not None
    AutoModelForImageTextToText.from_pretrained(qwen35_dir, local_files_only=True)

    # A 112 px image is 7 x 7 patches of 16 px, resized to 8 x 8, merged 2 x 2: 16 image tokens. The loop renders
    # both views without thinking (the official run's prompt): each prompt ends after an empty, closed think block.
    sample = _mixed_size_samples()[0]
    prompt = loaded.encode([to_messages(student_view(sample, ViewConfig()))])
    assert int((prompt["input_ids"] == model.config.image_token_id).sum()) == 16
    assert prompt["mm_token_type_ids"].shape == prompt["input_ids"].shape
    assert loaded.chat_template_kwargs == {"enable_thinking": False}
    assert loaded.tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")

    # Trainable load: the vision tower (patch merger included) is frozen, the language model trains.
    trainable = load_model_and_processor(qwen35_dir, CPU, trainable=True)
    frozen = {name for name, p in trainable.model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in trainable.model.named_parameters() if name.startswith("model.visual.")}


def test_build_is_deterministic(qwen35_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_qwen35(tmp_path / "again", seed=0)
    other = build_tiny_qwen35(tmp_path / "other", seed=1)
    reference = load_file(qwen35_dir / "model.safetensors")
    assert all(torch.equal(tensor, load_file(again / "model.safetensors")[name]) for name, tensor in reference.items())
    assert not all(torch.equal(t, load_file(other / "model.safetensors")[n]) for n, t in reference.items())
    assert (again / "tokenizer.json").read_text() == (qwen35_dir / "tokenizer.json").read_text()


# --------------------------------------------------------------------------------------------- rollouts and views


def test_rollouts_never_emit_suppressed_tokens(loaded: LoadedModel) -> None:
    """Push the image placeholders to the top of the distribution: sampling must still never pick one."""
    prompts = loaded.encode([to_messages(student_view(s, ViewConfig())) for s in _mixed_size_samples()])
    suppressed = torch.tensor(loaded.suppressed_token_ids)

    def favour_placeholders(module, inputs, output):
        output = output.clone()
        output[..., suppressed] += 20.0
        return output

    handle = loaded.model.lm_head.register_forward_hook(favour_placeholders)
    try:
        raw = loaded.model(**prompts).logits[:, -1]  # (N, V)
        assert torch.isin(raw.argmax(-1), suppressed).all()  # without suppression they would be sampled
        for seed in range(3):
            rollout = _sample(loaded, prompts, temperature=1.0, max_new_tokens=8, seed=seed)
            assert not torch.isin(rollout.response_ids, suppressed).any()
            assert torch.isfinite(rollout.behaviour_logprobs).all()
        greedy = _sample(loaded, prompts, temperature=0.0, max_new_tokens=8)
        assert not torch.isin(greedy.response_ids, suppressed).any()
    finally:
        handle.remove()


def test_teacher_scores_the_crop_and_logits_line_up(loaded: LoadedModel) -> None:
    """Left-padded batches through the linear-attention layers score each row as if it were alone, on both views."""
    samples = _mixed_size_samples()
    views = ViewConfig()
    conversations = {
        "student": [to_messages(student_view(s, views)) for s in samples],
        "teacher": [to_messages(teacher_view(s, views)) for s in samples],
    }
    prompts = {name: loaded.encode(chats) for name, chats in conversations.items()}
    assert prompts["student"]["attention_mask"].sum(1).unique().numel() == 3  # three lengths: padding is exercised

    # The teacher's images are the upscaled crops, not the full images.
    for index, sample in enumerate(samples):
        crop = teacher_view(sample, views).image
        x0, y0, x1, y1 = sample.bbox
        assert crop.size == (round((x1 - x0) * views.upscale), round((y1 - y0) * views.upscale))
        alone = loaded.processor.image_processor(images=[crop], return_tensors="pt")["image_grid_thw"][0]
        assert torch.equal(prompts["teacher"]["image_grid_thw"][index], alone)
    assert not torch.equal(prompts["teacher"]["image_grid_thw"], prompts["student"]["image_grid_thw"])

    rollout = _sample(loaded, prompts["student"], temperature=1.0)
    mask = rollout.response_mask
    logits = {name: response_logits(loaded.model, batch, rollout) for name, batch in prompts.items()}
    assert logits["student"].shape == logits["teacher"].shape == (*rollout.response_ids.shape, len(loaded.tokenizer))
    for name, batch_logits in logits.items():
        for row in range(len(samples)):
            single_prompt = loaded.encode([conversations[name][row]])
            single_rollout = RolloutBatch(
                *(t[row : row + 1] for t in (rollout.response_ids, mask, rollout.behaviour_logprobs, rollout.truncated))
            )
            alone = response_logits(loaded.model, single_prompt, single_rollout)[0]
            torch.testing.assert_close(batch_logits[row][mask[row]], alone[mask[row]], atol=1e-5, rtol=1e-5)

    # The rollout's behaviour log-probs are the student's own (T = 1, placeholders masked): the cached decode through
    # the recurrent layers equals the full forward, and Qwen3.5's sampling defaults (T 0.6, top-k 20) were not used.
    masked = logits["student"].clone()
    masked[..., loaded.suppressed_token_ids] = float("-inf")
    expected = masked.log_softmax(-1).gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(rollout.behaviour_logprobs[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits["student"][mask], logits["teacher"][mask])  # the views do differ


# --------------------------------------------------------------------------------------------- training


def test_training_with_the_ema_teacher(qwen35_dir: Path, synth_data: Path, tmp_path: Path) -> None:
    config = make_config(qwen35_dir, synth_data, tmp_path / "run", steps=2)
    trainer = OPDTrainer(config)
    before = trainable_snapshot(trainer)
    metrics = trainer.train_step()
    after = trainable_snapshot(trainer)
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    assert metrics["loss"] > 0 and metrics["response_length"] >= 1
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    # Both kinds of mixer learn: the Gated DeltaNet layers and the full-attention layer.
    assert any(".linear_attn." in name for name in changed) and any(".self_attn." in name for name in changed)
    rate = config.teacher.ema_rate
    teacher = trainer.teacher.state_dict()
    for name in changed:
        torch.testing.assert_close(teacher[name], (1 - rate) * before[name] + rate * after[name], rtol=1e-5, atol=1e-7)
    visual = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if n.startswith("model.visual.")}
    assert visual and not any(p.requires_grad for n, p in trainer.student.named_parameters() if n in visual)

    trainer.step += 1
    result = trainer.train()
    assert result.step == 2 and result.final_dir is not None
    for name, param in trainer.student.named_parameters():
        if name in visual:
            assert torch.equal(param, visual[name])
    final = load_model_and_processor(result.final_dir, CPU)
    assert final.model.config.model_type == "qwen3_5" and final.processor.image_processor.patch_size == 16


def test_resume_is_exact(qwen35_dir: Path, synth_data: Path, tmp_path: Path) -> None:
    straight = train(make_config(qwen35_dir, synth_data, tmp_path / "straight", steps=4))
    split_config = make_config(qwen35_dir, synth_data, tmp_path / "split", steps=2)
    assert train(split_config).step == 2 and latest_checkpoint(tmp_path / "split").name == "step-2"
    resumed = train(split_config.model_copy(update={"steps": 4}), resume=True)
    assert resumed.step == 4

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    straight_losses, resumed_losses = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(straight_losses) == len(resumed_losses) == 4
    for a, b in zip(straight_losses, resumed_losses, strict=True):
        assert abs(a - b) <= 1e-6 and a == pytest.approx(b, rel=1e-4)
    weights_a = load_file(straight.final_dir / "model.safetensors")
    weights_b = load_file(resumed.final_dir / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        torch.testing.assert_close(tensor, weights_b[name], rtol=0, atol=1e-6)


def test_lora_trains_and_exports_merged_weights(qwen35_dir: Path, synth_data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    config = make_config(qwen35_dir, synth_data, tmp_path / "lora", steps=1, lora={"enabled": True, "rank": 4})
    trainer = OPDTrainer(config)
    adapters = trainable_snapshot(trainer)
    assert adapters and all("lora_" in name for name in adapters)
    result = trainer.train()
    merged = AutoModelForImageTextToText.from_pretrained(result.final_dir, local_files_only=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForImageTextToText.from_pretrained(qwen35_dir, local_files_only=True).state_dict()
    moved = [name for name, tensor in merged.state_dict().items() if not torch.equal(tensor, base[name])]
    assert moved and not any(name.startswith("model.visual.") for name in moved)


def test_default_lora_adapts_every_attention_layer(qwen35_dir: Path) -> None:
    loaded = load_model_and_processor(qwen35_dir, CPU, lora=LoraConfig(enabled=True, rank=4), trainable=True)
    adapted = {name for name, _ in loaded.model.named_parameters() if "lora_A" in name}
    layers = loaded.model.config.text_config.layer_types
    for index, kind in enumerate(layers):
        mixer = "linear_attn" if kind == "linear_attention" else "self_attn"
        assert any(f"layers.{index}.{mixer}." in name for name in adapted), (index, kind)


# --------------------------------------------------------------------------------------------- evaluate and inspect


def test_evaluate(qwen35_dir: Path, synth_data: Path, loaded: LoadedModel, tmp_path: Path) -> None:
    from vopd.evaluate import evaluate

    config = EvalConfig(
        model=str(qwen35_dir),
        dataset=str(synth_data),
        batch_size=3,
        max_new_tokens=4,
        output=str(tmp_path / "eval.jsonl"),
        runtime=CPU,
    )
    result = evaluate(config, loaded=loaded)
    assert result.n == 6 and len(result.records) == 6
    assert 0.0 <= result.full_accuracy <= 1.0 and 0.0 <= result.crop_accuracy <= 1.0
    assert result.gap == pytest.approx(result.crop_accuracy - result.full_accuracy)
    records = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [r["id"] for r in result.records]
    for record in records:
        assert isinstance(record["full_text"], str) and isinstance(record["crop_text"], str)
        assert not any(token in record["full_text"] + record["crop_text"] for token in VISION_TOKENS)


def test_inspect(qwen35_dir: Path, loaded: LoadedModel) -> None:
    from vopd.divergence import token_divergence
    from vopd.token_inspection import _png_bytes, inspect_sample

    image = Image.new("RGB", (112, 112), (230, 230, 230))
    ImageDraw.Draw(image).ellipse([40, 40, 52, 52], fill=(30, 170, 60))
    config = InspectConfig.model_validate(
        {
            "model": str(qwen35_dir),
            "question": "What color is the shape inside the box?",
            "options": ["red", "green", "blue", "yellow"],
            "bbox": (34, 34, 58, 58),
            "max_new_tokens": 5,
            "show_topk": 5,
            "divergence": {"alpha": 0.5, "topk": 0},
        }
    )
    result = inspect_sample(config, image, loaded=loaded)
    assert result.tokens and result.alpha == 0.5
    suppressed = set(loaded.suppressed_token_ids)
    for record in result.tokens:
        assert record.token_id not in suppressed
        assert record.student_top[0].token_id == record.token_id  # greedy
        assert record.divergence >= 0 and record.argmax_agree == (
            record.student_top[0].token_id == record.teacher_top[0].token_id
        )

    # The per-token divergences are those of the crop teacher against the full-image student along this answer.
    sample = Sample(
        id="s", question=config.question, options=config.options, bbox=config.bbox, image_bytes=_png_bytes(image)
    )
    ids = torch.tensor([[record.token_id for record in result.tokens]])
    rollout = RolloutBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(ids.shape), torch.tensor([False]))
    logits = [
        response_logits(loaded.model, loaded.encode([to_messages(view)]), rollout)[0]
        for view in (student_view(sample, config.views), teacher_view(sample, config.views))
    ]
    expected = token_divergence(logits[0], logits[1], alpha=0.5, topk=0)
    torch.testing.assert_close(torch.tensor([r.divergence for r in result.tokens]), expected, atol=1e-6, rtol=1e-4)
