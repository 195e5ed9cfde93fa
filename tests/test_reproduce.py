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
    box_free_headline,
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


# --------------------------------------------------------------------------- the box-free experiment (--box-free)
def test_box_free_data_hide_the_box_from_every_arm_but_true_box(tmp_path: Path) -> None:
    settings = ReproduceSettings(train_items=6, eval_items=4, box_free=True)
    paths = prepare_data(tmp_path, settings)
    train, true_box = load_dataset(paths["train"]), load_dataset(paths["train_true_box"])
    labelled, control = load_dataset(paths["train_labelled"]), load_dataset(paths["no_privilege"])
    fresh = load_dataset(paths["fresh"])
    assert all(s.bbox is None and s.answer is None and not s.has_crop for s in train)  # plain VQA: search
    assert [s.bbox for s in true_box] == [s.hidden_bbox for s in train]
    assert all(s.answer is None and s.hidden_bbox is None for s in true_box + control)
    assert all(s.answer and s.bbox is None for s in labelled)
    assert all(s.hidden_bbox is not None and s.bbox is None and s.answer for s in fresh)
    assert all(s.question.startswith("What shape is the ") for s in train)
    plain = ViewConfig(draw_box=False, hint="")
    assert ImageChops.difference(control[0].load_crop(), student_view(train[0], plain).image).getbbox() is None

    configs = {
        arm: arm_train_config(arm, Path("base"), paths, tmp_path / arm, 0, settings)
        for arm in ("box_free", "true_box", "no_privilege")
    }
    assert configs["box_free"].dataset == str(paths["train"]) and configs["box_free"].views.evidence == "search"
    assert configs["box_free"].views.search_windows == [0.5, 0.35]  # the box-free world's own search grid
    assert configs["box_free"].views.search_overlap == 0.67
    assert configs["true_box"].dataset == str(paths["train_true_box"]) and configs["true_box"].views.evidence == "box"
    assert configs["no_privilege"].dataset == str(paths["no_privilege"])
    for config in configs.values():  # the same recipe; no arm draws a box or adds the hint
        assert config.views.draw_box is False and config.views.hint == ""
        assert config.teacher == configs["box_free"].teacher and config.divergence == configs["box_free"].divergence


def test_box_free_headline_checks_its_goal() -> None:
    base = {"heldout": summary(0.6, 1.0), "fresh": {**summary(0.6, 1.0), "searched_accuracy": 0.9}}
    base["fresh"]["searched_centre_hit"] = 0.85

    def run(seed: int, full: float, crop: float = 1.0) -> dict:
        return {"seed": seed, "eval": {"heldout": summary(full, crop), "fresh": summary(full, crop)}}

    results = {
        "box_free": [run(0, 0.68), run(1, 0.70, 0.98)],
        "true_box": [run(0, 0.72), run(1, 0.72)],
        "sft": [run(0, 0.74)],
        "no_privilege": [run(0, 0.60)],
    }
    headline = box_free_headline(summarize_arms(base, results), base)
    assert headline["box_free_gap_closed"] == pytest.approx(0.225)
    assert headline["true_box_gap_closed"] == pytest.approx(0.30)
    assert headline["box_free_vs_true_box"] == pytest.approx(0.75)
    assert headline["box_free_crop_drop"] == pytest.approx(0.01)
    assert headline["sft_gap_closed"] == pytest.approx(0.35) and headline["no_privilege_gap_closed"] == 0.0
    assert headline["searched_before"] == 0.9 and headline["goal_met"] is True
    results["box_free"] = [run(0, 0.64)]  # 0.10 of the gap: a third of the true box's
    assert box_free_headline(summarize_arms(base, results), base)["goal_met"] is False
