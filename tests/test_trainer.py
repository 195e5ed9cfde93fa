"""The OPD loop end to end on the tiny random Qwen2-VL: updates, EMA teacher, learning, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from vopd.config import TrainConfig
from vopd.trainer import OPDTrainer, latest_checkpoint, train

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}


def write_dataset(folder: Path, count: int = 6, *, with_answers: bool = True) -> Path:
    """A handful of 112 px items: one small coloured disc inside the evidence box."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    names = list(COLORS)
    lines = []
    for index in range(count):
        image = Image.new("RGB", (112, 112), (235, 235, 235))
        draw = ImageDraw.Draw(image)
        x0, y0 = 10 + 13 * index % 70, 20 + 7 * index % 60
        color = names[index % 4]
        draw.ellipse([x0 + 6, y0 + 6, x0 + 18, y0 + 18], fill=COLORS[color])
        image.save(folder / "images" / f"{index}.png")
        record = {
            "id": f"item-{index}",
            "image": f"images/{index}.png",
            "question": "What color is the shape inside the box?",
            "options": names,
            "bbox": [x0, y0, x0 + 24, y0 + 24],
        }
        if with_answers:
            record["answer"] = color
        lines.append(json.dumps(record))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


def make_config(model: Path, dataset: Path, output: Path, **overrides) -> TrainConfig:
    values = {
        "model": str(model),
        "dataset": str(dataset),
        "output": str(output),
        "steps": 2,
        "seed": 0,
        "batch_size": 2,
        "lr": 1e-3,
        "save_every": 100,
        "rollout": {"num_rollouts": 2, "max_new_tokens": 6},
        "divergence": {"topk": 20},
    }
    values.update(overrides)
    return TrainConfig.model_validate(values)


def trainable_snapshot(trainer: OPDTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}


def test_training_updates_weights_and_ema_teacher_moves_by_the_rate(tiny_model_dir, dataset, tmp_path) -> None:
    config = make_config(tiny_model_dir, dataset, tmp_path / "run", steps=1)
    trainer = OPDTrainer(config)
    before = trainable_snapshot(trainer)
    metrics = trainer.train_step()
    after = trainable_snapshot(trainer)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["loss"] > 0 and metrics["response_length"] >= 1
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, "no trainable weight moved"
    rate = config.teacher.ema_rate
    teacher = trainer.teacher.state_dict()
    for name in changed[:20]:
        expected = (1 - rate) * before[name] + rate * after[name]
        torch.testing.assert_close(teacher[name], expected, rtol=1e-5, atol=1e-7)
    for key in (
        "divergence_mean",
        "divergence_max",
        "argmax_agreement",
        "topk_overlap",
        "grad_norm",
        "lr",
        "tokens_per_second",
        "step_time",
        "truncated_fraction",
        "student_topk_mass",
        "teacher_topk_mass",
    ):
        assert key in metrics, key


def test_vision_tower_stays_frozen(tiny_model_dir, dataset, tmp_path) -> None:
    trainer = OPDTrainer(make_config(tiny_model_dir, dataset, tmp_path / "run", steps=1))
    frozen = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if "visual" in n}
    assert frozen and not any(p.requires_grad for n, p in trainer.student.named_parameters() if "visual" in n)
    trainer.train_step()
    for name, param in trainer.student.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name])


def test_trainable_vision_tower_gets_its_scaled_learning_rate(tiny_model_dir, dataset, tmp_path) -> None:
    config = make_config(tiny_model_dir, dataset, tmp_path / "run", freeze_vision_tower=False, vision_lr_scale=0.1)
    trainer = OPDTrainer(config)
    vision = {id(p) for n, p in trainer.student.named_parameters() if "visual" in n}
    lrs = {
        "vision" if all(id(p) in vision for p in group["params"]) else "language": group["lr"]
        for group in trainer.optimizer.param_groups
    }
    assert lrs == pytest.approx({"language": 1e-3, "vision": 1e-4})
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if "visual" in n}
    trainer.train_step()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.student.named_parameters() if n in before)


def test_divergence_falls_against_a_fixed_teacher(tiny_model_dir, tmp_path) -> None:
    """The learning test: one prompt, a frozen teacher, plain gradient steps -> the divergence shrinks."""
    one = write_dataset(tmp_path / "one", count=1)
    config = make_config(
        tiny_model_dir,
        one,
        tmp_path / "run",
        steps=12,
        batch_size=1,
        lr=3e-3,
        teacher={"mode": "fixed"},
        rollout={"num_rollouts": 4, "max_new_tokens": 4},
        divergence={"topk": 0},
    )
    trainer = OPDTrainer(config)
    losses = [trainer.train_step()["divergence_mean"] for _ in range(config.steps)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses


def test_resume_is_exact_and_extends_a_finished_run(tiny_model_dir, dataset, tmp_path) -> None:
    straight = train(make_config(tiny_model_dir, dataset, tmp_path / "straight", steps=4))
    split_config = make_config(tiny_model_dir, dataset, tmp_path / "split", steps=2)
    first = train(split_config)
    assert first.step == 2 and latest_checkpoint(tmp_path / "split").name == "step-2"
    resumed = train(split_config.model_copy(update={"steps": 4}), resume=True)
    assert resumed.step == 4

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "split")) == 4
    for a, b in zip(losses(tmp_path / "straight"), losses(tmp_path / "split"), strict=True):
        assert abs(a - b) <= 1e-6
    weights_a = load_file(straight.final_dir / "model.safetensors")
    weights_b = load_file(resumed.final_dir / "model.safetensors")
    for name, tensor in weights_a.items():
        torch.testing.assert_close(tensor, weights_b[name], rtol=0, atol=1e-6)


def test_training_never_reads_answers(tiny_model_dir, tmp_path) -> None:
    labelled = write_dataset(tmp_path / "labelled", with_answers=True)
    unlabelled = write_dataset(tmp_path / "unlabelled", with_answers=False)
    runs = []
    for name, data in (("a", labelled), ("b", unlabelled)):
        trainer = OPDTrainer(make_config(tiny_model_dir, data, tmp_path / name, steps=2))
        losses = [trainer.train_step()["loss"] for _ in range(2)]
        runs.append((losses, trainable_snapshot(trainer)))
    assert runs[0][0] == runs[1][0]
    for name, tensor in runs[0][1].items():
        assert torch.equal(tensor, runs[1][1][name])


def test_refuses_to_overwrite_a_run_without_resume(tiny_model_dir, dataset, tmp_path) -> None:
    config = make_config(tiny_model_dir, dataset, tmp_path / "run", steps=1)
    train(config)
    with pytest.raises(ValueError, match="--resume"):
        OPDTrainer(config)


def test_lora_with_ema_adapter_and_fixed_teacher(tiny_model_dir, dataset, tmp_path) -> None:
    for mode in ("ema", "fixed", "current"):
        config = make_config(
            tiny_model_dir,
            dataset,
            tmp_path / mode,
            steps=1,
            lora={"enabled": True, "rank": 4},
            teacher={"mode": mode},
        )
        trainer = OPDTrainer(config)
        adapter_before = trainable_snapshot(trainer)
        assert adapter_before and all("lora_" in name for name in adapter_before)
        metrics = trainer.train_step()
        assert torch.isfinite(torch.tensor(metrics["loss"]))
        if mode == "ema":
            rate = config.teacher.ema_rate
            after = trainable_snapshot(trainer)
            for name, tensor in trainer.teacher.state_dict().items():
                torch.testing.assert_close(tensor, (1 - rate) * adapter_before[name] + rate * after[name])
    result = train(make_config(tiny_model_dir, dataset, tmp_path / "export", steps=1, lora={"enabled": True}))
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(result.final_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_cancellation_checkpoints_and_stops(tiny_model_dir, dataset, tmp_path) -> None:
    from vopd.callbacks import ProgressCallback

    class StopAfterOne(ProgressCallback):
        def __init__(self) -> None:
            self.done = 0
            self.checkpoints: list[int] = []

        def on_progress(self, *, done, total, metrics=None) -> None:
            self.done = done

        def on_checkpoint(self, *, step, path) -> None:
            self.checkpoints.append(step)

        def should_stop(self) -> bool:
            return self.done >= 1

    callback = StopAfterOne()
    result = train(make_config(tiny_model_dir, dataset, tmp_path / "run", steps=3), callbacks=[callback])
    assert result.stopped and result.step == 1 and callback.checkpoints == [1]
    assert result.final_dir is None


def _step_gradients(trainer: OPDTrainer) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Run one step, keeping the gradients the optimizer was about to apply."""
    captured: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in trainer.student.named_parameters()}
    original_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        for group in trainer.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    captured[names[id(param)]] = param.grad.detach().clone()
        return original_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    metrics = trainer.train_step()
    return captured, metrics


def test_how_a_step_is_split_into_micro_batches_changes_nothing(tiny_model_dir, tmp_path) -> None:
    """8 prompts in one micro-batch or 4 micro-batches of 2: the same rollouts and the same gradient, because each
    rollout has its own seed and the loss is the token-mean over the whole step."""
    data = write_dataset(tmp_path / "data", count=8)
    common = {"steps": 1, "rollout": {"num_rollouts": 2, "max_new_tokens": 6}, "collapse_guard": {"enabled": False}}
    whole = OPDTrainer(make_config(tiny_model_dir, data, tmp_path / "whole", batch_size=8, grad_accum=1, **common))
    split = OPDTrainer(make_config(tiny_model_dir, data, tmp_path / "split", batch_size=2, grad_accum=4, **common))
    grads_whole, metrics_whole = _step_gradients(whole)
    grads_split, metrics_split = _step_gradients(split)
    assert metrics_whole["response_length"] == metrics_split["response_length"]
    assert metrics_whole["loss"] == pytest.approx(metrics_split["loss"], rel=1e-5)
    assert grads_whole.keys() == grads_split.keys() and grads_whole
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_split[name], grad, rtol=1e-4, atol=1e-7)


def test_trust_region_teacher_mixes_initial_and_current_logits(tiny_model_dir, dataset, tmp_path) -> None:
    from vopd.rollout import response_logits
    from vopd.views import teacher_view

    config = make_config(
        tiny_model_dir, dataset, tmp_path / "run", steps=1, teacher={"mode": "trust_region", "trust_region_mix": 0.3}
    )
    trainer = OPDTrainer(config)
    trainer.train_step()  # the student moves away from the initial weights
    samples = trainer._samples_for(0)
    _, _, rollout = trainer._sample(samples, 0)
    prompts = trainer._encode(trainer._conversations(samples, teacher_view))
    with torch.no_grad():
        initial = response_logits(trainer.teacher.frozen_copy, prompts, rollout)
        current = response_logits(trainer.student, prompts, rollout)
    mixed = trainer.teacher.response_logits(prompts, rollout)
    torch.testing.assert_close(mixed, 0.7 * initial + 0.3 * current, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(initial, current)


def test_progressive_teacher_is_replaced_by_the_student_every_n_steps(tiny_model_dir, dataset, tmp_path) -> None:
    config = make_config(
        tiny_model_dir, dataset, tmp_path / "run", steps=4, teacher={"mode": "progressive", "sync_every": 2}
    )
    trainer = OPDTrainer(config)
    initial = trainer.teacher.state_dict()
    trainer.train_step()
    trainer.step += 1
    assert all(torch.equal(t, initial[n]) for n, t in trainer.teacher.state_dict().items())
    trainer.train_step()
    trainer.step += 1
    student = trainable_snapshot(trainer)
    assert all(torch.equal(t, student[n]) for n, t in trainer.teacher.state_dict().items())
    assert any(not torch.equal(t, initial[n]) for n, t in trainer.teacher.state_dict().items())


def test_warm_up_starts_from_zero(tiny_model_dir, dataset, tmp_path) -> None:
    trainer = OPDTrainer(make_config(tiny_model_dir, dataset, tmp_path / "run", steps=3, warmup_steps=2))
    lrs = []
    for _ in range(3):
        lrs.append(trainer.train_step()["lr"])
        trainer.step += 1
    assert lrs == pytest.approx([0.0, 0.5e-3, 1e-3])


def test_the_loss_from_hidden_states_matches_the_logits_and_never_builds_them(tiny_model_dir, tmp_path) -> None:
    """One step scored from hidden states and the LM heads against the same step scored from full logits: the same
    loss, metrics and gradients (over two micro-batches); and on that path the LM
    heads only ever see generation's one position per row, never a response's worth of positions."""
    data = write_dataset(tmp_path / "data", count=4)
    common = {"steps": 1, "grad_accum": 2, "collapse_guard": {"enabled": False}}
    runs = {}
    for from_hidden in (True, False):
        divergence = {"topk": 20, "from_hidden_states": from_hidden}
        trainer = OPDTrainer(
            make_config(tiny_model_dir, data, tmp_path / f"run-{from_hidden}", divergence=divergence, **common)
        )
        assert trainer.logits_fallback is None if from_hidden else "is off" in trainer.logits_fallback
        positions: list[int] = []
        heads = [trainer.student.get_output_embeddings(), trainer.teacher.frozen_copy.get_output_embeddings()]
        record = positions.append
        hooks = [head.register_forward_hook(lambda _m, args, _o, r=record: r(args[0].shape[1])) for head in heads]
        runs[from_hidden] = (*_step_gradients(trainer), positions)
        for hook in hooks:
            hook.remove()
    (grads, metrics, positions), (expected_grads, expected_metrics, expected_positions) = runs[True], runs[False]
    assert max(positions) == 1 and max(expected_positions) == 6 + 1  # the logits path: max_new_tokens + 1
    assert metrics["response_length"] == expected_metrics["response_length"]
    for name in ("loss", "divergence_mean", "student_topk_mass", "topk_overlap", "student_entropy", "grad_norm"):
        assert metrics[name] == pytest.approx(expected_metrics[name], rel=1e-4, abs=1e-7), name
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-6)


def test_the_loss_falls_back_to_logits_where_hidden_states_cannot_serve(tiny_model_dir, dataset, tmp_path) -> None:
    """A teacher whose logits mix two models, or the sampled-token loss, is scored from full logits, and says why."""
    mixed = OPDTrainer(make_config(tiny_model_dir, dataset, tmp_path / "mix", teacher={"mode": "trust_region"}))
    assert "trust_region" in mixed.logits_fallback
    sampled = make_config(tiny_model_dir, dataset, tmp_path / "pg", divergence={"mode": "sampled_token"})
    assert "sampled_token" in OPDTrainer(sampled).logits_fallback


def test_the_teacher_reuses_the_students_prompts_only_when_it_sees_the_same(tiny_model_dir, tmp_path) -> None:
    """A teacher shown the student's own image and text (crop_image = image, no box drawn) takes the student's
    encoded prompts as they are; the crop view is encoded on its own."""
    from vopd.views import student_view

    data = write_dataset(tmp_path / "data", count=4)
    same = data.parent / "same.jsonl"  # beside the images: paths stay relative
    records = [json.loads(line) for line in data.read_text().splitlines()]
    same.write_text("".join(json.dumps(record | {"crop_image": record["image"]}) + "\n" for record in records))
    plain = OPDTrainer(make_config(tiny_model_dir, same, tmp_path / "same", views={"draw_box": False}))
    samples = plain._samples_for(0)
    conversations = plain._conversations(samples, student_view)
    student_prompts = plain._encode(conversations)
    assert plain._teacher_prompts(samples, conversations, student_prompts) is student_prompts
    # Each sample's view is made once and repeated for its rollouts, in the sample's order.
    rollouts = plain.config.rollout.num_rollouts
    assert rollouts > 1 and len(conversations) == len(samples) * rollouts
    assert all(conversations[i] is conversations[i - i % rollouts] for i in range(len(conversations)))
    assert conversations[0] is not conversations[rollouts]
    cropped = OPDTrainer(make_config(tiny_model_dir, data, tmp_path / "crop"))
    samples = cropped._samples_for(0)
    conversations = cropped._conversations(samples, student_view)
    student_prompts = cropped._encode(conversations)
    teacher_prompts = cropped._teacher_prompts(samples, conversations, student_prompts)
    assert teacher_prompts is not student_prompts
    student_images = student_prompts["mm_encoder_outputs"]["image"].pooler_output  # encoded once per view
    teacher_images = teacher_prompts["mm_encoder_outputs"]["image"].pooler_output
    assert not all(torch.equal(a, b) for a, b in zip(student_images, teacher_images, strict=False))
