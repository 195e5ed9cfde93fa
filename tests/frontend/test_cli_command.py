"""The Train tab's "Equivalent CLI command" runs verbatim, in a shell, against a VOPD_HOME laid out as the service
keeps it (model and dataset by their registry names, as the form names them), and writes its run under
VOPD_HOME/runs, where the service lists CLI runs' models."""

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
from vopd.home import resolve_model_name, run_models


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
    run_name = train.cli_run_name(config)
    assert command.startswith(
        f'vopd train --model tiny --dataset synth-64 --output "${{VOPD_HOME:-$HOME/.vopd}}"/runs/{run_name} '
    )

    bin_dir = Path(sys.executable).parent  # the venv's `vopd` script sits next to its python
    env = os.environ | {"VOPD_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env |= {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = home / "runs" / run_name
    assert (run / "final" / "config.json").is_file() and (run / "checkpoints" / "step-1").is_dir()
    assert bool(list((run / "tensorboard").glob("events.out.tfevents.*"))) == with_tensorboard
    assert not (tmp_path / "runs").exists()  # nothing beside the working directory
    # The service lists the run's models (GET /api/models reads run_models) and `vopd` resolves their names.
    listed = dict(run_models(home))
    assert listed[f"runs/{run_name}/final"] is None and listed[f"runs/{run_name}/checkpoints/step-1"] == 1
    assert resolve_model_name(f"runs/{run_name}/final", home) == run / "final"


def test_the_command_writes_under_the_default_home_when_vopd_home_is_unset(tmp_path: Path) -> None:
    """Unset or empty, VOPD_HOME means ~/.vopd to the CLI and the service (vopd.home.vopd_home); the shell agrees."""
    config = train.config_from_form("tiny", "synth-64", _form_with({}), "")
    output = train.cli_output(config)
    for value in (None, "", "my home"):
        env = {k: v for k, v in os.environ.items() if k != "VOPD_HOME"} | {"HOME": str(tmp_path)}
        if value is not None:
            env["VOPD_HOME"] = value
        done = subprocess.run(
            f"printf %s {output}", shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, check=True
        )
        home = value or f"{tmp_path}/.vopd"
        assert done.stdout == f"{home}/runs/{train.cli_run_name(config)}"  # one argument, spaces and all
