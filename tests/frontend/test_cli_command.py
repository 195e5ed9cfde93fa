"""The Train tab's "Equivalent CLI command" runs verbatim, in a shell, against a VOPD_HOME laid out as the service
keeps it (model and dataset by their registry names, as the form names them)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from frontend import strings
from frontend.tabs import train
from tests.test_trainer import write_dataset


def _form_with(values: dict[str, object]) -> list[object]:
    form = train.preset_values(strings.PRESET_TINY)
    paths = [spec.path for spec in train.FIELDS]
    for path, value in values.items():
        form[paths.index(path)] = value
    return form


def test_the_train_tabs_command_runs_as_shown(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")
    write_dataset(home / "datasets" / "synth-64", count=2)
    with_tensorboard = importlib.util.find_spec("tensorboard") is not None  # an optional extra
    trackers = ["tensorboard"] if with_tensorboard else []
    form = _form_with({"steps": 1, "batch_size": 2, "rollout.max_new_tokens": 4, "report_to": trackers})
    config = train.config_from_form("tiny", "synth-64", form, "")
    command, _ = train.equivalents(config, "http://127.0.0.1:8000")
    assert command.startswith("vopd train --model tiny --dataset synth-64 --output runs/studio")

    bin_dir = Path(sys.executable).parent  # the venv's `vopd` script sits next to its python
    env = os.environ | {"VOPD_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env |= {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "studio"
    assert (run / "final" / "config.json").is_file() and (run / "checkpoints" / "step-1").is_dir()
    assert bool(list((run / "tensorboard").glob("events.out.tfevents.*"))) == with_tensorboard
