"""The memory plan (``vopd.memory_plan``): read from config.json alone, its state terms equal the tensors a trainer
really holds, its activations follow checkpointing, and ``vopd train --dry-run`` / ``--require-fit`` report it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_trainer import make_config, write_dataset
from vopd.cli import main
from vopd.config import TrainConfig, merge_settings, recipe
from vopd.memory_plan import (
    GIB,
    _rollout_engine_bytes,
    parse_size,
    plan_memory,
    read_model_shape,
)
from vopd.models import load_model_and_processor, vision_tower_parameters
from vopd.trainer import OPDTrainer

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), count=4)


@pytest.fixture(scope="module")
def config_only(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's folder without its weights: the plan must not need them."""
    folder = tmp_path_factory.mktemp("config-only") / "model"
    shutil.copytree(tiny_model_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    return folder


def _state_bytes(trainer: OPDTrainer) -> int:
    import sys

    sys.path.insert(0, str(BENCH))
    from memory_model import measured_state_bytes

    return measured_state_bytes(trainer)


def test_the_shape_is_read_from_config_json_alone(tiny_model_dir, config_only) -> None:
    shape = read_model_shape(config_only)
    model = load_model_and_processor(tiny_model_dir, trainable=True).model
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.vision_parameters == sum(p.numel() for p in vision_tower_parameters(model))
    assert shape.text.layers == model.config.text_config.num_hidden_layers
    assert shape.vocab == model.config.text_config.vocab_size
    assert shape.image_tokens == 256  # the tiny processor's 448 x 448 px limit, 28 x 28 px per token
    with pytest.raises(ValueError, match="no config.json"):
        read_model_shape(config_only.parent / "nowhere")


@pytest.mark.parametrize(
    "settings",
    [
        {"teacher": {"mode": "ema"}},
        {"teacher": {"mode": "current"}},
        {"teacher": {"mode": "ema"}, "freeze_vision_tower": False},
        {"teacher": {"mode": "ema"}, "lora": {"enabled": True, "rank": 4}},
        {"teacher": {"mode": "fixed"}, "lora": {"enabled": True, "rank": 4}},
    ],
    ids=["full-ema", "full-current", "full-encoder-trained", "lora-ema", "lora-fixed"],
)
def test_planned_state_equals_the_tensors_a_trainer_holds(settings, tiny_model_dir, dataset, tmp_path) -> None:
    """Masters, gradients, AdamW's moments and the teacher: the plan's bytes are the trainer's, exactly, after a step
    (fp32 on the CPU, where no compute copy or runtime allowance applies)."""
    config = make_config(
        tiny_model_dir,
        dataset,
        tmp_path / "run",
        steps=1,
        collapse_guard={"enabled": False},
        runtime={"device": "cpu", "dtype": "float32"},
        **settings,
    )
    trainer = OPDTrainer(config)
    trainer.train_step()
    plan = plan_memory(read_model_shape(tiny_model_dir), config, device_type="cpu", device_memory=GIB)
    terms = plan.per_device_bytes
    state = terms["masters"] + terms["gradients"] + terms["optimizer"] + terms["teacher"]
    assert terms["compute_copies"] == 0 and terms["runtime"] == 0 and terms["rollout_engine"] == 0
    trainable = sum(p.numel() for p in trainer.student.parameters() if p.requires_grad)
    assert plan.assumptions["trainable_parameters"] == trainable
    assert state == _state_bytes(trainer)
    assert terms["total"] == sum(value for key, value in terms.items() if key != "total")


def _paper(model: Path, **changes) -> TrainConfig:
    return TrainConfig.model_validate(
        merge_settings(recipe("paper"), {"model": str(model), "dataset": "d.jsonl"}, changes)
    )


def test_sharding_divides_the_state_and_checkpointing_the_activations(config_only) -> None:
    shape = read_model_shape(config_only)
    on_device = {"offload_optimizer": False, "offload_params": False, "offload_teacher": False}
    single = plan_memory(
        shape, _paper(config_only, runtime={"gradient_checkpointing": False, **on_device}), world_size=1
    )
    ddp = plan_memory(shape, _paper(config_only, runtime={"strategy": "ddp", **on_device}), world_size=4)
    fsdp = plan_memory(shape, _paper(config_only, runtime={"strategy": "fsdp", **on_device}), world_size=4)
    for term in ("masters", "gradients", "optimizer", "teacher"):
        assert ddp.per_device_bytes[term] == single.per_device_bytes[term]
        assert fsdp.per_device_bytes[term] == pytest.approx(single.per_device_bytes[term] / 4, abs=1)
    # The paper recipe's offload: under fsdp the same shards, on the host.
    offloaded = plan_memory(shape, _paper(config_only, runtime={"strategy": "fsdp"}), world_size=4)
    for term in ("masters", "gradients", "optimizer", "teacher"):
        assert offloaded.per_device_bytes[term] == 0
        assert offloaded.host_bytes[term] == fsdp.per_device_bytes[term]
    # bf16 autocast over fp32 masters on a GPU: a compute-dtype copy of every trainable weight
    assert single.per_device_bytes["compute_copies"] == 2 * single.assumptions["trainable_parameters"]
    assert single.per_device_bytes["runtime"] > 0
    checkpointed = plan_memory(shape, _paper(config_only), world_size=1)
    assert checkpointed.assumptions["gradient_checkpointing"]
    assert checkpointed.activations["with_checkpointing"] == single.activations["with_checkpointing"]
    assert checkpointed.activations["without_checkpointing"] == single.activations["without_checkpointing"]
    assert single.activations["without_checkpointing"] > 2 * single.activations["with_checkpointing"]  # 4 blocks
    assert checkpointed.per_device_bytes["activations"] == checkpointed.activations["with_checkpointing"]
    # per-device rows: the ranks share each micro-batch's prompts
    assert ddp.assumptions["rows_per_micro_batch"] == single.assumptions["rows_per_micro_batch"] // 4


def test_a_plan_that_does_not_fit_says_what_would(config_only) -> None:
    shape = read_model_shape(config_only)
    config = _paper(
        config_only,
        runtime={"gradient_checkpointing": False, "max_tokens_per_micro_batch": None},
        rollout={"max_new_tokens": 4096},
    )
    roomy = plan_memory(shape, config, device_memory=10**15)
    assert roomy.fits and roomy.suggestions == []
    budget = int(roomy.per_device_bytes["total"] * 0.6)
    tight = plan_memory(shape, config, device_memory=budget)
    assert not tight.fits and tight.suggestions
    first = tight.suggestions[0]
    assert first["set"] == {"runtime.gradient_checkpointing": True}  # the smallest change comes first
    for suggestion in tight.suggestions:  # each one, planned again, fits
        data = config.model_dump()
        for dotted, value in suggestion["set"].items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        again = plan_memory(
            shape, TrainConfig.model_validate(data), world_size=suggestion.get("devices", 1), device_memory=budget
        )
        assert again.fits and again.per_device_bytes["total"] == suggestion["total_bytes"]


def test_the_rollout_engine_term() -> None:
    def config(engine: str, strategy: str = "single") -> TrainConfig:
        return TrainConfig(
            model="m",
            dataset="d",
            steps=1,
            rollout={"engine": engine, "vllm": {"gpu_memory_utilization": 0.3}},
            runtime={"strategy": strategy},
        )

    assert _rollout_engine_bytes(config("hf"), 80 * GIB, "cuda") == 0
    assert _rollout_engine_bytes(config("vllm"), 80 * GIB, "cuda") == int(0.3 * 80 * GIB)
    assert _rollout_engine_bytes(config("vllm"), 80 * GIB, "cpu") == 0  # the CPU engine takes no device share
    assert _rollout_engine_bytes(config("auto", "fsdp"), 80 * GIB, "cuda") == 0  # auto samples with transformers


def test_parse_size() -> None:
    assert parse_size("80GiB") == 80 * GIB
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("1.5 gib") == int(1.5 * GIB)
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("eighty")


def test_dry_run_prints_the_plan_and_require_fit_refuses_before_loading(config_only, dataset, tmp_path, capsys) -> None:
    args = ["train", "--preset", "paper", "--model", str(config_only), "--dataset", str(dataset)]
    args += ["--output", str(tmp_path / "run")]
    assert main([*args, "--dry-run", "--device-memory", "80GiB"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    plan = printed["plan"]
    assert printed["batch_size"] == 8  # still the resolved config, with the plan beside it
    assert plan["fits"] is True and plan["device"]["memory_bytes"] == 80 * GIB and plan["device"]["type"] == "cuda"
    terms = plan["per_device_bytes"]
    expected = {"masters", "gradients", "optimizer", "teacher", "compute_copies", "rollout_engine", "activations"}
    assert expected <= set(terms)
    assert terms["total"] == sum(value for key, value in terms.items() if key != "total")
    assert plan["model"]["parameters"] > 0 and plan["suggestions"] == []
    assert "GiB per device" in captured.err and "fits in 80.0 GiB" in captured.err

    assert main([*args, "--dry-run", "--device-memory", "1MiB", "--require-fit"]) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["plan"]["fits"] is False
    assert "does NOT fit" in captured.err and "--require-fit" in captured.err
    # Without --dry-run the same refusal comes before any weight is read (this folder has none) or any file written.
    assert main([*args, "--steps", "1", "--device-memory", "1MiB", "--require-fit"]) == 3
    assert not (tmp_path / "run").exists()


def test_a_model_that_cannot_be_read_gives_a_plan_error_not_a_crash(tmp_path, capsys) -> None:
    args = ["train", "--model", "m", "--dataset", "d", "--steps", "1", "--dry-run"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["fits"] is None and "config.json" in plan["error"]
    assert main([*args, "--require-fit"]) == 3


def test_a_token_budget_bounds_the_planned_forward(config_only) -> None:
    shape = read_model_shape(config_only)
    whole = plan_memory(shape, _paper(config_only, runtime={"max_tokens_per_micro_batch": None}))
    budget = plan_memory(shape, _paper(config_only, runtime={"max_tokens_per_micro_batch": 3000}))
    row = whole.assumptions["prompt_tokens"] + whole.assumptions["response_tokens"]
    assert whole.assumptions["tokens_per_forward"] == whole.assumptions["rows_per_micro_batch"] * row
    assert budget.assumptions["tokens_per_forward"] == (3000 // row) * row
    assert budget.activations["phases"]["student_backward"] < whole.activations["phases"]["student_backward"]
    alone = plan_memory(shape, _paper(config_only, runtime={"max_tokens_per_micro_batch": 10}))
    assert alone.assumptions["tokens_per_forward"] == row  # a row longer than the budget runs alone


def _saved_bytes_per_block(folder: Path, rows: int, length: int) -> dict[str, float]:
    """The bytes each decoder block of the model in ``folder`` saves for its backward in one fp32 forward (distinct
    storage, weights left out), by layer type, averaged over the blocks of that type."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = model.model.language_model.layers
    current: list[int | None] = [None]
    saved: dict[int, dict[int, int]] = {}

    def pack(tensor):
        if current[0] is not None and tensor.untyped_storage().data_ptr() not in weights:
            saved.setdefault(current[0], {})[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, index=index: current.__setitem__(0, index))
        layer.register_forward_hook(lambda *_: current.__setitem__(0, None))
    ids = torch.randint(10, 200, (rows, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    kinds = model.config.text_config.layer_types
    by_kind: dict[str, list[int]] = {}
    for index, tensors in saved.items():
        by_kind.setdefault(kinds[index], []).append(sum(tensors.values()))
    return {kind: sum(values) / len(values) for kind, values in by_kind.items()}


@pytest.mark.parametrize("shape_args", [{}, {"hidden": 128}, {"vllm_shape": True}], ids=["tiny", "wider", "wide-heads"])
def test_qwen35_blocks_plan_what_they_save_for_the_backward(shape_args, tmp_path) -> None:
    """Gated DeltaNet blocks (the reference chunked kernel's fp32 copies, chunk x chunk matrices and per-chunk states)
    and the gated full-attention block: planned from config.json within 10% of what each block saves, on three
    shapes of different head counts and widths, one of them not a whole number of chunks long."""
    from vopd.memory_plan import _block_saved_bytes, _linear_block_saved_bytes
    from vopd.tiny_models import build_tiny_qwen35

    folder = build_tiny_qwen35(tmp_path / "qwen35", **shape_args)
    shape = read_model_shape(folder).text
    assert shape.linear_layers == 3 and shape.gated_attention and shape.cache_layers == 1
    rows, length = 2, 200
    measured = _saved_bytes_per_block(folder, rows, length)
    tokens = rows * length
    planned = {
        "linear_attention": _linear_block_saved_bytes(shape, 4, tokens, rows),
        "full_attention": _block_saved_bytes(shape, 4, tokens),
    }
    for kind, value in planned.items():
        assert value == pytest.approx(measured[kind], rel=0.10), kind
