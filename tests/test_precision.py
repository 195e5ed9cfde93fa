"""Mixed precision as the official run does it: fp32 master weights, optimizer state and EMA teacher; bf16 arithmetic
under autocast; non-finite steps skipped; the final folder in the master dtype unless an export dtype is asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_trainer import make_config, write_dataset
from vopd.callbacks import ProgressCallback
from vopd.trainer import OPDTrainer, train

PAPER_LR = 2e-6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), count=8)


def _config(model: Path, dataset: Path, output: Path, runtime: dict, **overrides):
    values = {
        "steps": 5,
        "lr": PAPER_LR,
        "runtime": {"device": "cpu", **runtime},
        "rollout": {"num_rollouts": 2, "max_new_tokens": 6},
        "collapse_guard": {"enabled": False},
    }
    values.update(overrides)
    return make_config(model, dataset, output, **values)


def _fractions_changed(trainer: OPDTrainer, steps: int) -> tuple[float, float]:
    """Share of trainable entries of the student, and of the teacher's copy of them, changed by ``steps`` steps."""
    student_before = {n: p.detach().float().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
    teacher_before = {n: t.float() for n, t in trainer.teacher.state_dict().items()}
    for _ in range(steps):
        trainer.train_step()
    student_after = {n: p.detach().float() for n, p in trainer.student.named_parameters() if p.requires_grad}
    teacher_after = {n: t.float() for n, t in trainer.teacher.state_dict().items()}
    total = sum(t.numel() for t in student_before.values())
    student = sum(int((student_before[n] != student_after[n]).sum()) for n in student_before) / total
    teacher = sum(int((teacher_before[n] != teacher_after[n]).sum()) for n in teacher_before) / total
    return student, teacher


def test_fp32_masters_under_bf16_autocast_keep_the_papers_small_updates(tiny_model_dir, dataset, tmp_path) -> None:
    mixed = OPDTrainer(_config(tiny_model_dir, dataset, tmp_path / "mixed", {"dtype": "bfloat16"}))
    assert mixed.loaded.dtype == torch.float32 and mixed.loaded.compute_dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in mixed.teacher.state_dict().values())
    student, teacher = _fractions_changed(mixed, 3)
    # The entries left are embedding rows of tokens no rollout used (no gradient, so Adam does not move them).
    assert student >= 0.95 and teacher >= 0.95, (student, teacher)
    state = next(iter(mixed.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32

    pure = OPDTrainer(
        _config(tiny_model_dir, dataset, tmp_path / "pure", {"dtype": "bfloat16", "master_dtype": "compute"})
    )
    assert pure.loaded.dtype == torch.bfloat16 and not pure.loaded.mixed_precision
    student, teacher = _fractions_changed(pure, 3)
    assert student < 0.2 and teacher < 0.05, (student, teacher)  # most updates round away in bf16


def test_fp32_compute_runs_without_autocast_and_equals_fp32_weights_in_compute_dtype(
    tiny_model_dir, dataset, tmp_path
) -> None:
    """At fp32 compute the mixed-precision machinery stays out of the way: the same run, bit for bit."""
    runs = []
    for name, master in (("masters", "float32"), ("compute", "compute")):
        trainer = OPDTrainer(
            _config(tiny_model_dir, dataset, tmp_path / name, {"dtype": "float32", "master_dtype": master}, lr=1e-3)
        )
        assert not trainer.loaded.mixed_precision and trainer.scaler is None
        losses = [trainer.train_step()["loss"] for _ in range(2)]
        runs.append((losses, {n: p.detach().clone() for n, p in trainer.student.named_parameters()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(tensor, runs[1][1][name]) for name, tensor in runs[0][1].items())


class _Warnings(ProgressCallback):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def on_log(self, message: str, *, level: str = "info") -> None:
        if level == "warning":
            self.messages.append(message)


def test_a_non_finite_gradient_skips_the_step_and_training_carries_on(tiny_model_dir, dataset, tmp_path) -> None:
    warnings = _Warnings()
    config = _config(tiny_model_dir, dataset, tmp_path / "run", {"dtype": "bfloat16"}, lr=1e-3)
    trainer = OPDTrainer(config, callbacks=[warnings])
    poison = {"on": False}
    victim = next(p for p in trainer.student.parameters() if p.requires_grad)
    victim.register_hook(lambda grad: grad * float("nan") if poison["on"] else grad)

    trainer.train_step()
    trainer.step += 1
    student = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    teacher = trainer.teacher.state_dict()
    adam_steps = [int(s["step"]) for s in trainer.optimizer.state.values()]

    poison["on"] = True
    metrics = trainer.train_step()
    trainer.step += 1
    assert metrics["skipped_steps"] == 1 and not torch.isfinite(torch.tensor(metrics["grad_norm"]))
    assert all(torch.equal(p, student[n]) for n, p in trainer.student.named_parameters())
    assert all(torch.equal(t, teacher[n]) for n, t in trainer.teacher.state_dict().items())
    assert [int(s["step"]) for s in trainer.optimizer.state.values()] == adam_steps
    assert len(warnings.messages) == 1 and "skipped" in warnings.messages[0]

    poison["on"] = False
    metrics = trainer.train_step()
    assert metrics["skipped_steps"] == 1 and torch.isfinite(torch.tensor(metrics["grad_norm"]))
    assert any(not torch.equal(p, student[n]) for n, p in trainer.student.named_parameters())


def test_fp16_compute_scales_the_loss(tiny_model_dir, dataset, tmp_path) -> None:
    config = _config(
        tiny_model_dir,
        dataset,
        tmp_path / "run",
        {"dtype": "float16"},
        steps=1,
        lr=1e-3,
        rollout={"num_rollouts": 1, "max_new_tokens": 2},
    )
    trainer = OPDTrainer(config)
    assert trainer.scaler is not None and trainer.loaded.dtype == torch.float32
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
    metrics = trainer.train_step()
    assert metrics["skipped_steps"] == 0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.student.named_parameters() if n in before)
    with pytest.raises(ValueError, match="float16 weights cannot be trained"):
        _config(tiny_model_dir, dataset, tmp_path / "x", {"dtype": "float16", "master_dtype": "compute"})


def test_checkpoints_keep_the_master_dtype_and_the_export_dtype_is_a_choice(tiny_model_dir, dataset, tmp_path) -> None:
    kept = train(_config(tiny_model_dir, dataset, tmp_path / "kept", {"dtype": "bfloat16"}, steps=1))
    final = load_file(kept.final_dir / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}
    checkpoint = load_file(tmp_path / "kept" / "checkpoints" / "step-1" / "model.safetensors")
    assert {t.dtype for t in checkpoint.values()} == {torch.float32}

    exported = train(
        _config(tiny_model_dir, dataset, tmp_path / "bf16", {"dtype": "bfloat16"}, steps=1, export_dtype="bfloat16")
    )
    assert {t.dtype for t in load_file(exported.final_dir / "model.safetensors").values()} == {torch.bfloat16}
    checkpoint = load_file(tmp_path / "bf16" / "checkpoints" / "step-1" / "model.safetensors")
    assert {t.dtype for t in checkpoint.values()} == {torch.float32}
