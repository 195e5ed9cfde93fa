"""The tiny offline VLM: build, supervised loss, deterministic and resumable pretraining, and the shipped base."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from vopd.cli import main
from vopd.config import EvalConfig, RuntimeConfig
from vopd.data import Sample
from vopd.evaluate import evaluate
from vopd.models import encode_prompts, load_model_and_processor, register_image_only_processors
from vopd.synth import SynthConfig, generate_dataset, generate_item
from vopd.tiny import (
    PretrainStage,
    _grid_windows,
    build_tiny,
    make_view,
    pretrain,
    sample_from_item,
    shipped_base_model_dir,
    shipped_no_box_model_dir,
    supervised_loss,
)
from vopd.views import to_messages

CPU = RuntimeConfig(device="cpu", dtype="float32")


def synth_samples(count: int, seed: int = 7):
    config = SynthConfig(n=count, seed=seed)
    return [sample_from_item(*generate_item(config, index)) for index in range(count)]


def test_tiny_build_loads_with_auto_classes_and_prompts_tokenize_short(tmp_path: Path) -> None:
    assert main(["tiny", "build", "--output", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    register_image_only_processors()
    processor = AutoProcessor.from_pretrained(tmp_path / "tiny", local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny", local_files_only=True)
    assert processor.image_processor is not None and model.config.model_type == "qwen2_vl"
    assert 4_000_000 < sum(p.numel() for p in model.parameters()) < 6_000_000

    # The benchmark's words are whole tokens: the full-image prompt is 16 image tokens plus well under 100 others.
    sample = synth_samples(1)[0]
    prompt = encode_prompts(processor, [to_messages(make_view("full", sample))])
    image_tokens = int((prompt["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == 16
    assert prompt["input_ids"].shape[1] - image_tokens < 90
    for word in ("Ġyellow", "Ġbounding", "Answer"):
        assert word in processor.tokenizer.get_vocab()


def test_supervised_loss_is_the_cross_entropy_of_the_reply_tokens_only(tmp_path: Path) -> None:
    model_dir = build_tiny(tmp_path / "tiny", seed=1)
    loaded = load_model_and_processor(model_dir, CPU, trainable=True, freeze_vision_tower=False)
    samples = synth_samples(2)
    views = [make_view("crop", samples[0]), make_view("full", samples[1])]
    loss = supervised_loss(loaded, views, ["A", "C"])

    # Reference: the whole chat (prompt + "Answer: X<|im_end|>") through the model, CE on the reply positions.
    tokenizer = loaded.tokenizer
    reference_losses = []
    for view, letter in zip(views, ["A", "C"], strict=True):
        prompt = encode_prompts(loaded.processor, [to_messages(view)])
        reply = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"] + [loaded.eos_token_ids[0]]
        reply_ids = torch.tensor([reply])
        inputs = dict(prompt)
        inputs["input_ids"] = torch.cat([prompt["input_ids"], reply_ids], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(reply_ids)], dim=1)
        logits = loaded.model(**inputs).logits[0, -len(reply) - 1 : -1]  # (A, V)
        reference_losses.append(torch.nn.functional.cross_entropy(logits, reply_ids[0], reduction="none"))
    reference = torch.cat(reference_losses).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-4)
    loss.backward()
    vision_grads = [p.grad for n, p in loaded.model.named_parameters() if "visual" in n and p.grad is not None]
    assert vision_grads and any(float(g.abs().sum()) > 0 for g in vision_grads)


TINY_STAGES = (
    # Stage "a" stops early after its first step (any accuracy is >= 0): the resumed run must skip exactly 1 x 3 items.
    PretrainStage(
        "a",
        steps=3,
        lr=1e-3,
        views=(("crop_large", 1), ("crop", 1), ("context", 1)),
        stop_at_full_accuracy=0.0,
        check_from=1,
    ),
    PretrainStage("b", steps=2, lr=1e-3, views=(("crop", 2), ("full", 2))),
)
SMALL = {"eval_items": 4, "select_items": 4}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_pretraining_is_deterministic_and_resumes_exactly(tmp_path: Path) -> None:
    whole = pretrain(tmp_path / "whole", stages=TINY_STAGES, **SMALL)
    interrupted = pretrain(tmp_path / "split", stages=TINY_STAGES, stop_after="a", **SMALL)
    assert not (interrupted.model_dir / "config.json").exists()
    assert json.loads((tmp_path / "split" / "stages" / "a" / "stage.json").read_text())["steps_run"] == 1
    resumed = pretrain(tmp_path / "split", stages=TINY_STAGES, **SMALL)

    final_whole, final_resumed = _weights(whole.model_dir), _weights(resumed.model_dir)
    initial = _weights(tmp_path / "whole" / "init")
    assert all(tensor.dtype == torch.float16 for tensor in final_whole.values())
    assert final_whole.keys() == final_resumed.keys()
    assert all(torch.equal(final_whole[name], final_resumed[name]) for name in final_whole)
    assert any(not torch.equal(final_whole[name], initial[name].half()) for name in final_whole)
    assert set(whole.evaluations) == {"a", "b", "final_fp16"}
    log = [json.loads(line) for line in (tmp_path / "whole" / "pretrain_log.jsonl").read_text().splitlines()]
    assert {entry["stage"] for entry in log} == {"a", "b", "final_fp16"}


def test_unknown_stop_after_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names no stage"):
        pretrain(tmp_path / "x", stages=TINY_STAGES, stop_after="nope")


# --------------------------------------------------------------------------- the shipped base model
BASE = shipped_base_model_dir()


def test_shipped_base_is_small_fp16_and_loads_with_auto_classes() -> None:
    files = [path for path in BASE.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 20 * 2**20
    assert all(t.dtype == torch.float16 for t in _weights(BASE).values())
    assert (BASE / "BUILD.md").is_file()
    register_image_only_processors()
    assert AutoProcessor.from_pretrained(BASE, local_files_only=True).image_processor is not None
    AutoModelForImageTextToText.from_pretrained(BASE, local_files_only=True)


def test_shipped_base_sees_crops_and_shows_a_gap(tmp_path: Path) -> None:
    # A fresh seed no pretraining or reproduce split uses; 64 items: one standard error is about 0.03 near 0.95.
    data = generate_dataset(tmp_path / "data", SynthConfig(n=64, seed=4242))
    summary = evaluate(EvalConfig(model=str(BASE), dataset=str(data), batch_size=64, runtime=CPU)).summary
    assert summary["crop_accuracy"] >= 0.88
    assert summary["crop_accuracy"] - summary["full_accuracy"] >= 0.10
    assert summary["full_accuracy"] >= 0.35  # well above chance (0.25)
    assert max(summary["full_letters"].values()) <= 0.45 * 64  # no letter collapse


# --------------------------------------------------------------------------- the box-free world's pretraining
def test_no_box_views_windows_hold_the_target_and_decoys_miss_it() -> None:
    config = SynthConfig(n=6, seed=11, no_box=True)
    for index in range(config.n):
        sample = sample_from_item(*generate_item(config, index))
        x0, y0, x1, y1 = sample.bbox  # the hidden box: pretraining is supervised and may use it
        full = make_view("full", sample, world="no_box")
        assert full.image.tobytes() == sample.load_image().tobytes()  # no box drawn
        assert "bounding box" not in full.text and full.text.startswith("What shape is the ")
        for kind in ("crop", "window", "decoy", "zoom"):
            assert make_view(kind, sample, index=index, world="no_box").text == full.text
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        holding = _grid_windows(sample, "holding")
        missing = _grid_windows(sample, "missing")
        assert holding and missing
        assert all(w[0] <= cx - 10 and w[2] > cx + 10 for w in holding)  # the largest target is whole inside
        assert all(not (w[0] <= cx < w[2] and w[1] <= cy < w[3]) for w in missing)
        # zoom: a window of some size holding the whole target, shown at the full image's size
        target_pixels = int(_black_pixels(full.image).sum())
        for seed in range(4):
            zoom = make_view("zoom", sample, index=index, seed=seed, world="no_box").image
            assert zoom.size == full.image.size  # enlarged 1x-4.7x: the whole target, at least as large as in full
            assert _black_pixels(zoom).sum() >= 0.9 * target_pixels


def _black_pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int).max(axis=-1) < 60


def test_unsure_rows_are_taught_every_letter_equally(tmp_path: Path) -> None:
    """A decoy row (letter None) is trained towards equal mass on A-D at the letter's position, where a labelled row
    is trained towards its letter: the search's confidence is then low where the target is not."""
    from vopd.evidence import view_confidences

    model_dir = build_tiny(tmp_path / "tiny", seed=1, world="no_box")
    sample = sample_from_item(*generate_item(SynthConfig(n=1, seed=2, no_box=True), 0))
    view = make_view("decoy", sample, world="no_box")
    confidence = {}
    for letter in ("A", None):
        loaded = load_model_and_processor(model_dir, CPU, trainable=True, freeze_vision_tower=False)
        assert "Ġblack" in loaded.tokenizer.get_vocab()  # the box-free questions' words are whole tokens
        optimizer = torch.optim.AdamW([p for p in loaded.model.parameters() if p.requires_grad], lr=3e-3)
        for _ in range(60):
            optimizer.zero_grad()
            supervised_loss(loaded, [view], [letter]).backward()
            optimizer.step()
        (confidence[letter],) = view_confidences(loaded, [view], [sample.options], max_new_tokens=4)
    assert confidence["A"] > 0.9  # sure of its letter
    assert 0.2 < confidence[None] < 0.4  # about a quarter for each of the four letters


NO_BOX_BASE = shipped_no_box_model_dir()


def test_shipped_no_box_base_has_a_gap_and_finds_its_own_evidence(tmp_path: Path) -> None:
    """The box-free world's base: under 20 MB of fp16 weights whose tokenizer speaks the box-free question, sure of
    the answer on the oracle crop (the hidden box), well short of it on the full image, and its own evidence search
    mostly lands on the target. Its BUILD.md has the 400-item numbers (crop 1.000, full 0.580)."""
    from vopd.synth import NO_BOX_SEARCH

    files = [path for path in NO_BOX_BASE.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 20 * 2**20
    assert all(t.dtype == torch.float16 for t in _weights(NO_BOX_BASE).values())
    assert (NO_BOX_BASE / "BUILD.md").is_file()
    data = generate_dataset(tmp_path / "data", SynthConfig(n=48, seed=4243, no_box=True))
    config = EvalConfig(
        model=str(NO_BOX_BASE),
        dataset=str(data),
        batch_size=48,
        runtime=CPU,
        searched_crop=True,
        views={"draw_box": False, "hint": "", **NO_BOX_SEARCH},
    )
    summary = evaluate(config).summary
    assert summary["crop_accuracy"] >= 0.9
    assert max(summary["crop_letters"].values()) <= 0.4 * 48
    assert 0.3 <= summary["full_accuracy"] <= 0.85  # a real gap (0.58 on 400 items), above chance
    assert summary["searched_centre_hit"] >= 0.6 and summary["searched_accuracy"] > summary["full_accuracy"]


def test_a_window_view_the_grid_cannot_give_is_refused_not_mislabelled() -> None:
    """A canvas too small for any grid window to hold the whole target: no window view to pretrain on, said so,
    rather than a window without the target taught as if it showed the answer."""
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), "white").save(buffer, format="PNG")
    sample = Sample(
        id="small", question="q", options=["a", "b"], answer="a", bbox=(0, 0, 24, 24), image_bytes=buffer.getvalue()
    )
    with pytest.raises(ValueError, match="no holding window of the grid for sample 'small'"):
        make_view("window", sample, world="no_box")
