"""State on the host (``runtime.offload_optimizer``, ``runtime.offload_teacher``, ``runtime.offload_params``): the
settings resolve and validate, a run with them trains exactly the weights, optimizer state and teacher of a run
without them (full fine-tune and LoRA), the state really lives in tensors of its own, a checkpoint resumes with the
offload switched either way, and the memory plan moves the terms to the host."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_trainer import make_config, write_dataset
from vopd.config import RuntimeConfig, TrainConfig, merge_settings, recipe
from vopd.memory_plan import GIB, plan_memory, read_model_shape
from vopd.offload import HostAdamW, HostModule
from vopd.trainer import OPDTrainer

OFFLOAD = {"offload_optimizer": True, "offload_teacher": True}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), count=8)


def _run(model: Path, dataset: Path, output: Path, runtime: dict, steps: int = 3, **settings) -> OPDTrainer:
    config = make_config(
        model,
        dataset,
        output,
        steps=steps,
        save_every=2,
        collapse_guard={"enabled": False},
        runtime={"device": "cpu", "dtype": "float32", **runtime},
        **settings,
    )
    trainer = OPDTrainer(config)
    trainer.train()
    return trainer


def _student(trainer: OPDTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.student.named_parameters()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[name] - b[name]).abs().max()) for name in a)
    assert worst <= 1e-6, worst


def _moments(trainer: OPDTrainer) -> list[torch.Tensor]:
    state = trainer.optimizer.state_dict()["state"]
    return [state[index][key] for index in sorted(state) for key in ("exp_avg", "exp_avg_sq")]


def test_the_settings_resolve_and_validate() -> None:
    assert RuntimeConfig().offload_optimizer is False and RuntimeConfig().offload_teacher is False
    paper = recipe("paper")["runtime"]
    assert paper["offload_optimizer"] and paper["offload_params"] and paper["offload_teacher"]
    assert RuntimeConfig(strategy="fsdp", offload_optimizer=True, offload_params=True).offload_params
    with pytest.raises(ValueError, match="offload_params"):
        RuntimeConfig(strategy="fsdp", offload_optimizer=True)
    # Outside fsdp offload_params has no shards to move: accepted (the paper recipe on one device), said by the plan.
    assert RuntimeConfig(offload_params=True).offload_params


@pytest.mark.parametrize(
    "settings",
    [{"teacher": {"mode": "ema"}}, {"teacher": {"mode": "ema"}, "lora": {"enabled": True, "rank": 4}}],
    ids=["full", "lora"],
)
def test_offloaded_state_trains_the_same_weights_optimizer_and_teacher(
    settings, tiny_model_dir, dataset, tmp_path
) -> None:
    plain = _run(tiny_model_dir, dataset, tmp_path / "plain", {}, **settings)
    offloaded = _run(tiny_model_dir, dataset, tmp_path / "offloaded", OFFLOAD, **settings)
    assert isinstance(offloaded.optimizer, HostAdamW) and not isinstance(plain.optimizer, HostAdamW)
    _assert_equal(_student(plain), _student(offloaded))
    _assert_equal(plain.teacher.state_dict(), offloaded.teacher.state_dict())
    for a, b in zip(_moments(plain), _moments(offloaded), strict=True):
        assert torch.equal(a, b)
    assert plain.optimizer.state_dict()["param_groups"] == offloaded.optimizer.state_dict()["param_groups"]
    # The host state is storage of its own, not the device's tensors.
    device = {p.untyped_storage().data_ptr() for p in offloaded.student.parameters()}
    assert not device & {t.untyped_storage().data_ptr() for t in offloaded.optimizer.host_tensors()}
    assert not device & {t.untyped_storage().data_ptr() for t in offloaded.teacher.shadow.values()}
    if "lora" not in settings:
        # A full fine-tune's teacher module holds empty placeholders between its forwards: its weights are on the host.
        assert isinstance(offloaded.teacher.host_module, HostModule)
        assert all(p.numel() == 0 for p in offloaded.teacher.frozen_copy.parameters())


def test_a_checkpoint_resumes_with_the_offload_switched_either_way(tiny_model_dir, dataset, tmp_path) -> None:
    """Steps 1-2 with the state on the device, 3-4 on the host (and the reverse) equal 4 uninterrupted steps."""
    whole = _run(tiny_model_dir, dataset, tmp_path / "whole", {}, steps=4)
    for first, second, name in ((dict(), OFFLOAD, "on"), (OFFLOAD, dict(), "off")):
        output = tmp_path / f"switched-{name}"
        _run(tiny_model_dir, dataset, output, first, steps=2)
        config = make_config(
            tiny_model_dir,
            dataset,
            output,
            steps=4,
            save_every=2,
            collapse_guard={"enabled": False},
            runtime={"device": "cpu", "dtype": "float32", **second},
        )
        resumed = OPDTrainer(config, resume=True)
        assert resumed.step == 2
        resumed.train()
        _assert_equal(_student(whole), _student(resumed))
        _assert_equal(whole.teacher.state_dict(), resumed.teacher.state_dict())


def test_a_streamed_teacher_brings_one_block_at_a_time(tiny_model_dir, dataset, tmp_path) -> None:
    config = make_config(
        tiny_model_dir,
        dataset,
        tmp_path / "run",
        steps=1,
        collapse_guard={"enabled": False},
        runtime={"device": "cpu", "dtype": "float32", "offload_teacher": True},
    )
    trainer = OPDTrainer(config)
    host = trainer.teacher.host_module
    assert host is not None
    seen: list[int] = []

    def count(*_args) -> None:
        seen.append(sum(p.numel() for p in trainer.teacher.frozen_copy.parameters()))

    handles = [block.register_forward_hook(count) for block in host._blocks]
    trainer.train_step()
    for handle in handles:
        handle.remove()
    shape = read_model_shape(tiny_model_dir)
    assert seen, "the teacher ran no block"
    # While a block runs: the weights outside the blocks and that block, never the whole model.
    assert max(seen) <= shape.non_block_parameters + shape.largest_block_parameters < shape.parameters
    assert all(p.numel() == 0 for p in trainer.teacher.frozen_copy.parameters())


def _paper(model: Path, **changes) -> TrainConfig:
    return TrainConfig.model_validate(
        merge_settings(recipe("paper"), {"model": str(model), "dataset": "d.jsonl"}, changes)
    )


def _off(**runtime) -> dict:
    return {"runtime": {"offload_optimizer": False, "offload_params": False, "offload_teacher": False, **runtime}}


def test_the_plan_moves_each_offloaded_term_to_the_host(tiny_model_dir) -> None:
    shape = read_model_shape(tiny_model_dir)
    base = plan_memory(shape, _paper(tiny_model_dir, **_off()), device_type="cpu")
    assert base.host_bytes == {"total": 0}
    terms = base.per_device_bytes
    optimizer = plan_memory(shape, _paper(tiny_model_dir, **_off(offload_optimizer=True)), device_type="cpu")
    assert optimizer.per_device_bytes["optimizer"] == 0
    assert optimizer.per_device_bytes["total"] == terms["total"] - terms["optimizer"]
    # AdamW's moments, and its host copy of each trainable weight and gradient.
    assert optimizer.host_bytes["optimizer"] == terms["optimizer"] + 2 * terms["gradients"]
    teacher = plan_memory(shape, _paper(tiny_model_dir, **_off(offload_teacher=True)), device_type="cpu")
    assert teacher.per_device_bytes["teacher"] == 0 and teacher.host_bytes["teacher"] == terms["teacher"]
    streamed = teacher.assumptions["teacher_streamed_bytes"]
    assert streamed == 4 * (shape.non_block_parameters + shape.largest_block_parameters)
    assert teacher.activations["phases"]["teacher_forward"] == base.activations["phases"]["teacher_forward"] + streamed
    # offload_params: FSDP2's CPU offload moves the shards, their gradients and AdamW's state; nothing outside fsdp.
    single = plan_memory(shape, _paper(tiny_model_dir, **_off(offload_params=True)), device_type="cpu")
    assert single.per_device_bytes == terms and "offload_params_note" in single.assumptions
    fsdp_off = _paper(tiny_model_dir, **_off(strategy="fsdp"))
    fsdp_on = _paper(tiny_model_dir, **_off(strategy="fsdp", offload_params=True, offload_optimizer=True))
    sharded = plan_memory(shape, fsdp_off, world_size=4, device_type="cpu").per_device_bytes
    offloaded = plan_memory(shape, fsdp_on, world_size=4, device_type="cpu")
    for term in ("masters", "gradients", "optimizer"):
        assert offloaded.per_device_bytes[term] == 0 and offloaded.host_bytes[term] == sharded[term]
    # The root unit (the weights outside the blocks) is copied to the device for the forward.
    assert offloaded.per_device_bytes["compute_copies"] == sharded["compute_copies"] + 4 * shape.non_block_parameters


def test_offload_is_suggested_where_it_is_what_makes_a_plan_fit(tiny_model_dir) -> None:
    shape = read_model_shape(tiny_model_dir)
    short = {"batch_size": 1, "grad_accum": 1, "rollout": {"num_rollouts": 1, "max_new_tokens": 8}}
    config = _paper(tiny_model_dir, **short, **_off())
    plan = plan_memory(shape, config, device_type="cpu", device_memory=GIB, prompt_tokens=32)
    terms = plan.per_device_bytes
    # More than the plan without AdamW's moments, less than it without any activation: only an offload fits.
    memory = terms["total"] - terms["optimizer"] + 1
    assert memory < terms["total"] - terms["activations"]
    plan = plan_memory(shape, config, device_type="cpu", device_memory=memory, prompt_tokens=32)
    assert not plan.fits
    assert plan.suggestions[0]["set"] == {"runtime.offload_optimizer": True}
    assert "devices" not in plan.suggestions[0]


def test_fsdp_units_get_the_cpu_offload_policy_only_when_asked(tiny_model_dir) -> None:
    """The wiring of ``runtime.offload_params`` / ``offload_teacher`` under fsdp: every unit ``shard`` makes carries
    FSDP2's CPUOffloadPolicy, or none (one gloo process here; the weights' equality is tests/test_distributed.py's)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    from vopd.distributed import shard
    from vopd.models import load_model_and_processor, vision_tower_module

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for offload in (True, False):
            model = load_model_and_processor(tiny_model_dir, trainable=True).model
            shard(model, vision_tower_module(model), offload=offload)
            units = [module for module in model.modules() if isinstance(module, FSDPModule)]
            assert len(units) > 2
            policies = [unit._get_fsdp_state()._fsdp_param_group.offload_policy for unit in units]
            assert all(isinstance(policy, CPUOffloadPolicy) == offload for policy in policies)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_planned_device_and_host_bytes_are_the_tensors_a_trainer_holds(lora, tiny_model_dir, dataset, tmp_path):
    """With AdamW's state and the teacher offloaded, after a step: the plan's device state terms are the bytes of the
    weights and gradients the trainer holds on the device, and its host terms those of the host tensors, exactly."""
    settings = {"lora": {"enabled": True, "rank": 4}} if lora else {}
    config = make_config(
        tiny_model_dir,
        dataset,
        tmp_path / "run",
        steps=1,
        collapse_guard={"enabled": False},
        runtime={"device": "cpu", "dtype": "float32", **OFFLOAD},
        teacher={"mode": "ema"},
        **settings,
    )
    trainer = OPDTrainer(config)
    trainer.train_step()

    def size(tensors) -> int:
        unique = {t.untyped_storage().data_ptr(): t for t in tensors if t is not None and t.numel()}
        return sum(t.numel() * t.element_size() for t in unique.values())

    params = list(trainer.student.parameters())
    device = size(params + [p.grad for p in params])
    if trainer.teacher.frozen_copy is not None:  # placeholders only
        assert size(trainer.teacher.frozen_copy.parameters()) == 0
    teacher_host = trainer.teacher.host_module.host.values() if not lora else trainer.teacher.shadow.values()
    plan = plan_memory(read_model_shape(tiny_model_dir), config, device_type="cpu", device_memory=GIB)
    terms = plan.per_device_bytes
    assert terms["optimizer"] == 0 and terms["teacher"] == 0
    assert terms["masters"] + terms["gradients"] == device
    assert plan.host_bytes["optimizer"] == size(trainer.optimizer.host_tensors())
    assert plan.host_bytes["teacher"] == size(teacher_host)
