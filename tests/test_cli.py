"""The `vopd` command: help, train with resume, clean one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_trainer import write_dataset
from vopd.cli import main


def test_help_lists_the_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "vopd.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("views", "train", "eval", "inspect", "synth"):
        assert name in out.stdout


def test_train_then_resume_to_more_steps(tiny_model_dir, tmp_path, capsys) -> None:
    data = write_dataset(tmp_path / "data", count=4)
    run = tmp_path / "run"
    common = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output",
        str(run),
        "--seed",
        "1",
        "--lr",
        "1e-3",
        "--batch-size",
        "2",
        "--rollout.num_rollouts",
        "1",
        "--rollout.max_new_tokens",
        "4",
        "--divergence.topk",
        "8",
    ]
    assert main([*common, "--steps", "1"]) == 0
    assert (run / "final" / "config.json").exists() and (run / "checkpoints" / "step-1").is_dir()
    assert main([*common, "--steps", "2", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    assert "final model" in capsys.readouterr().out


def test_bad_settings_are_one_line_errors(tiny_model_dir, tmp_path, capsys) -> None:
    data = write_dataset(tmp_path / "data", count=2)
    code = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--output",
            str(tmp_path / "r"),
            "--steps",
            "1",
            "--divergence.alpha",
            "3",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "alpha" in err and "Traceback" not in err
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(tmp_path / "missing.jsonl"),
                "--output",
                str(tmp_path / "r2"),
                "--steps",
                "1",
            ]
        )
        == 2
    )


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--rollouts", "0", "--rollouts must be at least 1"),
        ("--batch-size", "0", "--batch-size must be at least 1"),
        ("--vision-lr-scale", "0", "--vision-lr-scale must be positive"),
    ],
)
def test_reproduce_refuses_bad_run_settings_before_any_work(tmp_path, capsys, flag, value, message) -> None:
    output = tmp_path / "exp"
    assert main(["reproduce", "--output", str(output), flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()  # refused before the data or the base are written


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--preset",
            "paper",
            "--model",
            "m",
            "--dataset",
            "d.jsonl",
            "--output",
            str(run),
            "--grad_accum",
            "24",
            "--batch-size",
            "4",
            "--dry-run",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    resolved = json.loads(captured.out)
    assert resolved["batch_size"] == 4 and resolved["grad_accum"] == 24 and resolved["epochs"] == 1
    assert resolved["rollout"]["max_new_tokens"] == 1024 and resolved["divergence"]["topk"] == 100
    assert resolved["runtime"]["master_dtype"] == "float32" and resolved["warmup_steps"] == 10
    assert "prompts per step: 96 (batch_size 4 x grad_accum 24); rollouts per step: 768" in captured.err
    assert not run.exists()


def test_tiny_build_qwen3_5(tmp_path, capsys) -> None:
    from transformers import AutoConfig

    assert main(["tiny", "build", "--arch", "qwen3_5", "--output", str(tmp_path / "q")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "q", local_files_only=True).model_type == "qwen3_5"


# --------------------------------------------------------------------------- names the REST API uses (vopd.home)
def _home_with_names(home, tiny_model_dir):
    """A VOPD_HOME laid out as the service keeps it: a base model, a dataset id, a job's final model and checkpoint."""
    import shutil

    shutil.copytree(tiny_model_dir, home / "models" / "tiny")
    write_dataset(home / "datasets" / "synth-9", count=2)
    run = home / "artifacts" / "jobs" / "3"
    shutil.copytree(tiny_model_dir, run / "final")
    shutil.copytree(tiny_model_dir, run / "checkpoints" / "step-20")
    return home


def test_the_cli_resolves_the_services_names_through_vopd_home(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from vopd.cli import CliError, resolve_names
    from vopd.config import TrainConfig

    home = _home_with_names(tmp_path / "home", tiny_model_dir)
    monkeypatch.setenv("VOPD_HOME", str(home))
    named = TrainConfig(model="tiny", dataset="synth-9", steps=1)
    resolved = resolve_names(named)
    assert resolved.model == str(home / "models" / "tiny")
    assert resolved.dataset == str(home / "datasets" / "synth-9" / "data.jsonl")
    assert resolve_names(named.model_copy(update={"model": "job-3/final"})).model == str(
        home / "artifacts" / "jobs" / "3" / "final"
    )
    assert resolve_names(named.model_copy(update={"model": "job-3/step-20"})).model.endswith("checkpoints/step-20")
    paths = TrainConfig(model=str(tiny_model_dir), dataset=resolved.dataset, steps=1)
    assert resolve_names(paths) == paths  # paths are used as they are
    for field, value in (("model", "job-3/step-5"), ("model", "../tiny"), ("dataset", "nope")):
        with pytest.raises(CliError, match=f"--{field} '{value}'.*VOPD_HOME"):
            resolve_names(named.model_copy(update={field: value}))


def test_the_cli_resolves_a_runs_model_names_and_a_sharded_upload(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """The names the service lists for a CLI run under VOPD_HOME/runs (runs/NAME/final, its checkpoints) run as
    shown; an uploaded dataset whose data file is a Parquet file in a subfolder (a published layout) resolves too."""
    import shutil

    from vopd.cli import CliError, resolve_names
    from vopd.config import TrainConfig
    from vopd.home import run_models

    home = _home_with_names(tmp_path / "home", tiny_model_dir)
    shutil.copytree(tiny_model_dir, home / "runs" / "opd" / "final")
    shutil.copytree(tiny_model_dir, home / "runs" / "opd" / "checkpoints" / "step-20")
    (home / "runs" / "opd" / "checkpoints" / "step-30.partial").mkdir()  # being written: not a checkpoint yet
    shared = home / "datasets" / "ds-parquet" / "Vision-OPD-6K" / "data"
    shared.mkdir(parents=True)
    (shared / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    # `vopd reproduce --output $VOPD_HOME/runs/repro` nests its arms: repro/opd and repro/runs/sft-seed1
    shutil.copytree(tiny_model_dir, home / "runs" / "repro" / "opd" / "final")
    shutil.copytree(tiny_model_dir, home / "runs" / "repro" / "runs" / "sft-seed1" / "final")
    shutil.copytree(tiny_model_dir, home / "runs" / "a" / "b" / "c" / "d" / "final")  # deeper than runs are looked for
    monkeypatch.setenv("VOPD_HOME", str(home))
    assert run_models(home) == [
        ("runs/opd/final", None),
        ("runs/opd/checkpoints/step-20", 20),
        ("runs/repro/opd/final", None),
        ("runs/repro/runs/sft-seed1/final", None),
    ]
    nested = resolve_names(TrainConfig(model="runs/repro/runs/sft-seed1/final", dataset="synth-9", steps=1))
    assert nested.model == str(home / "runs" / "repro" / "runs" / "sft-seed1" / "final")
    named = TrainConfig(model="runs/opd/final", dataset="ds-parquet", steps=1)
    resolved = resolve_names(named)
    assert resolved.model == str(home / "runs" / "opd" / "final")
    assert resolved.dataset == str(shared / "train-00000-of-00001.parquet")
    step = resolve_names(named.model_copy(update={"model": "runs/opd/checkpoints/step-20"}))
    assert step.model == str(home / "runs" / "opd" / "checkpoints" / "step-20")
    for value in ("runs/opd/checkpoints/step-30", "runs/other/final", "runs/../models/tiny"):
        with pytest.raises(CliError, match=f"--model '{value}'"):
            resolve_names(named.model_copy(update={"model": value}))


def test_train_accepts_a_dataset_id_and_a_model_name(tiny_model_dir, tmp_path, monkeypatch, capsys) -> None:
    home = _home_with_names(tmp_path / "home", tiny_model_dir)
    monkeypatch.setenv("VOPD_HOME", str(home))
    args = ["--model", "tiny", "--dataset", "synth-9", "--output", str(tmp_path / "run"), "--steps", "1"]
    assert main(["train", *args, "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model"] == str(home / "models" / "tiny") and resolved["dataset"].endswith("synth-9/data.jsonl")
    assert (
        main(["train", "--model", "tiny", "--dataset", "synth-64", "--output", str(tmp_path / "r"), "--steps", "1"])
        == 2
    )
    assert "no dataset of that name" in capsys.readouterr().err


def test_report_to_flag_reaches_the_config(capsys) -> None:
    code = main(
        ["train", "--model", "m", "--dataset", "d", "--steps", "1", "--report-to", "tensorboard,mlflow", "--dry-run"]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["report_to"] == ["tensorboard", "mlflow"]
