"""The collapse guard: letter entropy, and the trainer's probe metrics, warnings and optional stop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vopd.callbacks import ProgressCallback
from vopd.config import TrainConfig
from vopd.guard import letter_entropy
from vopd.synth import SynthConfig, generate_dataset
from vopd.trainer import train


def test_letter_entropy_is_one_when_balanced_and_zero_when_collapsed() -> None:
    assert letter_entropy([0, 1, 2, 3] * 5, 4) == pytest.approx(1.0)
    assert letter_entropy([2] * 20, 4) == pytest.approx(0.0)
    assert letter_entropy([0, 0, 1, 1], 4) == pytest.approx(0.5)
    assert letter_entropy([None, None, 0, 0], 4) == pytest.approx(math.log(2) / math.log(4))
    assert math.isnan(letter_entropy([], 4))


class Recorder(ProgressCallback):
    def __init__(self) -> None:
        self.logs: list[tuple[str, str]] = []
        self.ends: list[str] = []

    def on_log(self, message: str, *, level: str = "info") -> None:
        self.logs.append((level, message))

    def on_end(self, *, status: str, result=None) -> None:
        self.ends.append(status)


def _config(model: Path, dataset: Path, output: Path, **guard) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": str(model),
            "dataset": str(dataset),
            "output": str(output),
            "steps": 3,
            "batch_size": 2,
            "lr": 1e-3,
            "rollout": {"num_rollouts": 1, "max_new_tokens": 4},
            "divergence": {"topk": 20},
            "collapse_guard": {"every": 1, "probe_size": 4, "max_new_tokens": 4, **guard},
        }
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("guard-data"), SynthConfig(n=6, seed=3))


def test_guard_metrics_are_logged_every_n_steps(tiny_model_dir, dataset, tmp_path) -> None:
    recorder = Recorder()
    # Thresholds no run can trip: the metrics must appear without any warning.
    result = train(
        _config(tiny_model_dir, dataset, tmp_path / "run", min_letter_entropy=0.0, min_teacher_stability=0.0),
        callbacks=[recorder],
    )
    assert not result.stopped
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert 0.0 <= record["guard/letter_entropy"] <= 1.0 or math.isnan(record["guard/letter_entropy"])
        assert 0.0 <= record["guard/teacher_stability"] <= 1.0
        assert 0.0 <= record["guard/teacher_crop_accuracy"] <= 1.0  # the synth set has answers
    assert any("collapse guard baseline" in message for _, message in recorder.logs)
    assert not [message for level, message in recorder.logs if level == "warning"]


def test_guard_warns_and_optionally_stops(tiny_model_dir, dataset, tmp_path) -> None:
    # A random model cannot give perfectly balanced answers on 4 probe items: entropy < 1.0 must warn.
    warned = Recorder()
    result = train(_config(tiny_model_dir, dataset, tmp_path / "warn", min_letter_entropy=1.0), callbacks=[warned])
    assert not result.stopped and result.step == 3
    assert any(level == "warning" and "collapse" in message for level, message in warned.logs)

    stopped = Recorder()
    config = _config(tiny_model_dir, dataset, tmp_path / "stop", min_letter_entropy=1.0, stop_on_collapse=True)
    result = train(config, callbacks=[stopped])
    assert result.stopped and result.step == 1
    assert stopped.ends == ["stopped"]
    assert (tmp_path / "stop" / "checkpoints" / "step-1").is_dir()
