"""The shared configuration: paper defaults, validation, files plus dotted CLI overrides."""

import json

import pytest
from pydantic import ValidationError

from vopd.cli import CliError, parse_dotted_overrides
from vopd.config import (
    PAPER_HINT,
    EvalConfig,
    InspectConfig,
    TrainConfig,
    config_to_cli,
    load_config,
    merge_settings,
    recipe,
)


def test_paper_defaults() -> None:
    config = TrainConfig(model="m", dataset="d", steps=1)
    assert config.divergence.alpha == 0.5
    assert config.divergence.topk == 100 and config.divergence.add_tail
    assert config.divergence.mode == "full_logits" and config.divergence.is_clip == 2.0
    assert config.teacher.mode == "ema" and config.teacher.ema_rate == 0.05
    assert config.views.hint == PAPER_HINT and config.views.draw_box and config.views.upscale == 2.0
    assert config.views.padding == 0.0
    assert config.lr == 2e-6 and config.weight_decay == 0.01 and config.grad_clip == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        {"divergence": {"alpha": 1.5}},
        {"divergence": {"topk": -1}},
        {"teacher": {"mode": "frozen"}},
        {"rollout": {"num_rollouts": 0}},
        {"lr": 0},
        {"unknown_knob": 1},
        {"divergence": {"alfa": 0.3}},
        {"views": {"min_crop_side": 100, "max_crop_side": 50}},
    ],
)
def test_invalid_values_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"model": "m", "dataset": "d", "steps": 1, **bad})


def test_steps_or_epochs() -> None:
    with pytest.raises(ValidationError, match="steps or epochs"):
        TrainConfig(model="m", dataset="d")
    with pytest.raises(ValidationError, match="not both"):
        TrainConfig(model="m", dataset="d", steps=3, epochs=1)


def test_file_then_overrides(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: a\ndataset: b\nsteps: 10\ndivergence:\n  alpha: 0.2\n  topk: 5\n")
    config = load_config(TrainConfig, path, {"divergence.alpha": 0.9, "teacher.mode": "fixed", "steps": 3})
    assert config.divergence.alpha == 0.9 and config.divergence.topk == 5
    assert config.teacher.mode == "fixed" and config.steps == 3
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"model": "a", "dataset": "b", "epochs": 1.5}))
    assert load_config(TrainConfig, json_path).epochs == 1.5
    assert load_config(TrainConfig, json_path, {"divergence.is_clip": None}).divergence.is_clip is None


def test_cli_override_parsing() -> None:
    parsed = parse_dotted_overrides(["--divergence.alpha", "0.3", "--lora.enabled=true", "--views.hint", "", "--x"])
    assert parsed == {"divergence.alpha": 0.3, "lora.enabled": True, "views.hint": "", "x": True}
    with pytest.raises(CliError):
        parse_dotted_overrides(["stray"])


def test_config_round_trips_through_cli_string() -> None:
    config = TrainConfig(model="m", dataset="d", steps=4, divergence={"alpha": 0.25})
    command = config_to_cli(config, "train")
    assert "--divergence.alpha 0.25" in command and "--steps 4" in command
    tokens = command.split()[2:]
    rebuilt = load_config(TrainConfig, None, parse_dotted_overrides(tokens))
    assert rebuilt == config


def test_eval_and_inspect_configs() -> None:
    assert EvalConfig(model="m", dataset="d").full_view == "student"
    with pytest.raises(ValidationError, match="x1 > x0"):
        InspectConfig(model="m", question="q", bbox=(10, 10, 5, 20))


def test_presets_sit_under_file_and_overrides(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: a\ndataset: b\nrollout:\n  max_new_tokens: 5\n")
    config = load_config(TrainConfig, path, {"lr": 3e-4}, preset="tiny-cpu")
    assert config.teacher.mode == "fixed" and config.divergence.alpha == 0.0 and config.steps == 20
    assert config.rollout.max_new_tokens == 5 and config.rollout.num_rollouts == 1  # group merged key by key
    assert not config.freeze_vision_tower and config.vision_lr_scale == 0.3
    assert config.lr == 3e-4
    paper = load_config(TrainConfig, None, {"model": "a", "dataset": "b"}, preset="paper")
    assert paper.teacher.mode == "ema" and paper.divergence.alpha == 0.5 and paper.lr == 2e-6
    with pytest.raises(ValueError, match="known recipes: paper, tiny-world, tiny-cpu"):
        load_config(TrainConfig, None, {"model": "a", "dataset": "b"}, preset="fast")


def test_the_paper_recipe_is_the_official_run() -> None:
    """The authors' run_vision_opd.sh: 96 prompts x 8 rollouts, 1024 tokens, lr 2e-6 after 10 warm-up steps,
    AdamW wd 0.01, clip 1.0, encoder trained, JSD 0.5 on the student's top-100 + tail, EMA 0.05, one epoch."""
    paper = load_config(TrainConfig, None, {"model": "a", "dataset": "b"}, preset="paper")
    assert paper.batch_size * paper.grad_accum == 96 and paper.rollout.num_rollouts == 8
    assert paper.rollout.max_new_tokens == 1024 and paper.rollout.temperature == 1.0 and paper.rollout.top_p == 1.0
    assert (paper.lr, paper.warmup_steps, paper.weight_decay, paper.grad_clip) == (2e-6, 10, 0.01, 1.0)
    assert not paper.freeze_vision_tower and paper.vision_lr_scale == 1.0
    assert paper.divergence.model_dump() == {
        "alpha": 0.5,
        "topk": 100,
        "add_tail": True,
        "mode": "full_logits",
        "temperature": 1.0,
        "is_clip": 2.0,
        "from_hidden_states": True,  # how the loss is computed, not what: the values are the logits path's
    }
    assert paper.teacher.mode == "ema" and paper.teacher.ema_rate == 0.05
    assert paper.epochs == 1 and paper.steps is None
    assert paper.runtime.master_dtype == "float32" and paper.views.max_pixels is None


def test_a_run_length_override_replaces_the_recipes_other_length() -> None:
    """--steps over a one-epoch recipe (or --epochs over a fixed-step one) is a new length, not a conflict."""
    steps = load_config(TrainConfig, None, {"model": "a", "dataset": "b", "steps": 3}, preset="paper")
    assert steps.steps == 3 and steps.epochs is None
    epochs = load_config(TrainConfig, None, {"model": "a", "dataset": "b", "epochs": 2}, preset="tiny-cpu")
    assert epochs.epochs == 2 and epochs.steps is None
    assert merge_settings({"steps": 5, "rollout": {"top_p": 0.9}}, {"epochs": 1, "rollout": {"max_new_tokens": 3}}) == {
        "epochs": 1,
        "rollout": {"top_p": 0.9, "max_new_tokens": 3},
    }


def test_recipes_share_one_home() -> None:
    from vopd.reproduce import ReproduceSettings, arm_train_config

    tiny_world = recipe("tiny-world")
    demo = recipe("tiny-cpu")
    assert demo["divergence"] == tiny_world["divergence"] and demo["teacher"] == tiny_world["teacher"]
    assert demo["steps"] == 20 and tiny_world["steps"] == 300
    settings = ReproduceSettings()
    data = {"train": "train.jsonl", "no_privilege": "np.jsonl"}
    opd = arm_train_config("opd", "base", data, "out", 0, settings)
    for key in ("lr", "batch_size", "freeze_vision_tower", "vision_lr_scale"):
        assert getattr(opd, key) == tiny_world[key]
    assert opd.divergence.alpha == tiny_world["divergence"]["alpha"] and opd.teacher.mode == "fixed"
    paper_arm = arm_train_config("paper", "base", data, "out", 0, settings)
    assert paper_arm.divergence.alpha == recipe("paper")["divergence"]["alpha"]
    assert paper_arm.teacher.mode == recipe("paper")["teacher"]["mode"] and paper_arm.lr == tiny_world["lr"]


@pytest.mark.parametrize(
    ("bad", "bound"),
    [
        ({"batch_size": 10**9}, "1024"),
        ({"grad_accum": 10**6}, "1024"),
        ({"steps": 10**12}, "1000000"),
        ({"steps": None, "epochs": 1e12}, "1000"),
        ({"lr": 1e9}, "0.1"),
        ({"warmup_steps": 10**12}, "1000000"),
        ({"save_every": 10**12}, "1000000"),
        ({"seed": 2**70}, str(2**63 - 1)),
        ({"rollout": {"num_rollouts": 10**6}}, "64"),
        ({"rollout": {"max_new_tokens": 10**9}}, "32768"),
        ({"rollout": {"temperature": 1e9}}, "100"),
        ({"divergence": {"topk": 10**9}}, "1000000"),
        ({"lora": {"rank": 10**6}}, "4096"),
        ({"collapse_guard": {"every": 10**12}}, "1000000"),
        ({"views": {"max_pixels": 10**12}}, str(16384**2)),
    ],
)
def test_absurd_train_settings_are_refused_with_the_bound(bad: dict, bound: str) -> None:
    with pytest.raises(ValidationError, match=f"less than or equal to {bound}"):
        TrainConfig.model_validate(merge_settings({"model": "m", "dataset": "d", "steps": 1}, bad))


def test_absurd_eval_and_inspect_settings_are_refused() -> None:
    for bad in ({"batch_size": 10**9}, {"limit": 10**12}, {"max_new_tokens": 10**6}):
        with pytest.raises(ValidationError, match="less than or equal to"):
            EvalConfig.model_validate({"model": "m", "dataset": "d", **bad})
    box = (0, 0, 1, 1)
    for bad in ({"temperature": 1e9}, {"max_new_tokens": 10**6}, {"options": [str(i) for i in range(27)]}):
        with pytest.raises(ValidationError, match="less than or equal to|at most 26"):
            InspectConfig.model_validate({"model": "m", "question": "q", "bbox": box, **bad})


def test_every_recipe_stays_inside_the_bounds() -> None:
    from vopd.config import RECIPES

    for name in RECIPES:
        config = load_config(TrainConfig, None, {"model": "a", "dataset": "b"}, preset=name)
        assert config.model_dump()  # validated: the paper's 96 x 8 x 1024, one epoch, and the tiny recipes
