"""Pruning old checkpoints is said in the run's log, naming each one deleted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.test_trainer import make_config, write_dataset
from vopd.callbacks import ProgressCallback
from vopd.trainer import train


class _Lines(ProgressCallback):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_log(self, message: str, *, level: str = "info", **_: Any) -> None:
        self.lines.append(message)


def test_the_log_names_the_pruned_checkpoints(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    lines = _Lines()
    config = make_config(
        tiny_model_dir,
        data,
        tmp_path / "run",
        steps=3,
        save_every=1,
        keep_checkpoints=1,
        rollout={"num_rollouts": 1, "max_new_tokens": 2},
    )
    train(config, callbacks=[lines])
    pruned = [line for line in lines.lines if "pruned" in line]
    assert pruned == [
        "checkpoints pruned (keep_checkpoints 1): step-1",
        "checkpoints pruned (keep_checkpoints 1): step-2",
    ], lines.lines
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-3"]
