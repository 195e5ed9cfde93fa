"""`vopd reproduce`: the numbers (gap closed, mean ± std, headline), the data splits, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import ImageChops

from vopd.cli import main
from vopd.config import ViewConfig
from vopd.data import load_dataset
from vopd.reproduce import (
    ReproduceSettings,
    arm_train_config,
    format_table,
    gap_closed,
    headline_numbers,
    prepare_data,
    summarize_arms,
)
from vopd.tiny import build_tiny, shipped_base_model_dir
from vopd.views import student_view


def summary(full: float, crop: float, letters: dict[str, int] | None = None) -> dict:
    return {
        "full_accuracy": full,
        "crop_accuracy": crop,
        "full_p_correct": full - 0.1,
        "crop_p_correct": crop - 0.05,
        "full_letters": letters or {"A": 1, "B": 1},
        "crop_letters": {"A": 2},
    }


def test_gap_closed_is_the_share_of_the_crop_minus_full_gap() -> None:
    assert gap_closed(0.6, 0.7, 1.0) == pytest.approx(0.25)
    assert gap_closed(0.6, 0.5, 1.0) == pytest.approx(-0.25)
    assert math.isnan(gap_closed(0.9, 0.95, 0.9))  # no gap to close


def test_arms_are_summarised_over_seeds_and_the_headline_checks_the_goal() -> None:
    base = {"heldout": summary(0.6, 1.0), "fresh": summary(0.6, 1.0)}
    results = {
        "opd": [
            {"seed": 0, "eval": {"heldout": summary(0.72, 1.0), "fresh": summary(0.70, 1.0, {"A": 3})}},
            {
                "seed": 1,
                "eval": {"heldout": summary(0.76, 0.99), "fresh": summary(0.74, 0.98, {"A": 1, "C": 2})},
                "guard_warnings": ["collapse guard: teacher stability 0.75 < 0.85"],
            },
        ],
        "sft": [
            {"seed": 0, "eval": {"heldout": summary(0.74, 1.0), "fresh": summary(0.74, 1.0)}},
            {"seed": 1, "eval": {"heldout": summary(0.74, 1.0), "fresh": summary(0.74, 1.0)}},
        ],
    }
    rows = summarize_arms(base, results)
    fresh = rows["opd"]["fresh"]
    assert fresh["full_accuracy"] == pytest.approx(0.72)
    assert fresh["gap_closed"] == pytest.approx(0.30)  # (0.25 + 0.35) / 2
    assert fresh["gap_closed_std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # sample std of 0.25 and 0.35
    assert fresh["crop_change"] == pytest.approx(-0.01)
    assert fresh["full_letters"] == {"A": 4, "C": 2}
    assert rows["opd"]["guard_warned_seeds"] == [1] and rows["sft"]["guard_warned_seeds"] == []
    table = format_table(base, rows)
    assert "| seed 1 |" in table.splitlines()[4] and table.splitlines()[5].endswith("| - |")

    headline = headline_numbers(rows, ReproduceSettings(steps=10, seeds=2))
    assert headline["full_before"] == pytest.approx(0.6) and headline["crop_before"] == pytest.approx(1.0)
    assert headline["sft_gap_closed"] == pytest.approx(0.35)
    assert headline["opd_vs_sft_gain"] == pytest.approx(0.12 / 0.14, abs=1e-4)
    assert headline["goal_met"] is True
    results["opd"][1]["eval"]["fresh"] = summary(0.74, 0.90)  # same gain, but 5 points of crop accuracy lost
    assert headline_numbers(summarize_arms(base, results), ReproduceSettings())["goal_met"] is False


def test_data_splits_are_disjoint_unlabelled_for_opd_and_the_control_teacher_sees_the_full_view(tmp_path) -> None:
    paths = prepare_data(tmp_path, ReproduceSettings(train_items=6, eval_items=4))
    train, labelled = load_dataset(paths["train"]), load_dataset(paths["train_labelled"])
    heldout, fresh = load_dataset(paths["heldout"]), load_dataset(paths["fresh"])
    assert len(train) == 6 and len(heldout) == 4 and len(fresh) == 4
    assert all(sample.answer is None for sample in train) and all(sample.answer for sample in labelled)
    assert not {s.id for s in train} & {s.id for s in heldout}
    assert [s.load_image().tobytes() for s in fresh] != [s.load_image().tobytes() for s in heldout]

    control = load_dataset(paths["no_privilege"])
    expected = student_view(train[0], ViewConfig()).image
    assert control[0].answer is None
    assert ImageChops.difference(control[0].load_crop(), expected).getbbox() is None
    settings = ReproduceSettings(steps=3)
    control_config = arm_train_config("no_privilege", Path("base"), paths, tmp_path / "run", 1, settings)
    default_config = arm_train_config("opd", Path("base"), paths, tmp_path / "run", 1, settings)
    assert control_config.dataset == str(paths["no_privilege"]) and default_config.dataset == str(paths["train"])
    assert control_config.teacher == default_config.teacher and control_config.divergence == default_config.divergence


def test_reproduce_runs_end_to_end_on_a_tiny_budget(tmp_path: Path, capsys) -> None:
    base = shipped_base_model_dir()
    if not (base / "config.json").is_file():
        base = build_tiny(tmp_path / "random-base")
    argv = ["reproduce", "--output", str(tmp_path / "exp"), "--quick", "--steps", "2", "--eval-items", "6"]
    argv += ["--train-items", "16", "--jobs", "2", "--base", str(base)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    headline = json.loads(lines[-1])
    required = {
        "full_before",
        "full_after",
        "crop_before",
        "crop_after",
        "gap_closed",
        "gap_closed_std",
        "sft_gap_closed",
    }
    assert required <= set(headline)
    assert any(line.startswith("| opd |") for line in lines)
    exp = tmp_path / "exp"
    assert (exp / "opd" / "final" / "config.json").is_file() and (exp / "base" / "config.json").is_file()
    results = json.loads((exp / "results.json").read_text())
    assert set(results["arms"]) == {"opd", "sft", "no_privilege"}
    assert results["base"]["fresh"]["n"] == 6
    # Finished arms are not run again: a rerun only re-reads results.
    mtime = (exp / "opd" / "result.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (exp / "opd" / "result.json").stat().st_mtime_ns == mtime
    # ...but not with other settings, whose numbers would be mixed with these.
    assert main([*argv, "--lr", "3e-4"]) == 2
    assert "other settings" in capsys.readouterr().err
