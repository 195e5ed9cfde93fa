"""Training across processes on the CPU (gloo): DDP and FSDP2 give the single-process run's weights, resume exactly,
export a plain folder (LoRA merged), and a rank that dies ends the job with an error instead of a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_trainer import write_dataset
from vopd.cli import main

pytestmark = pytest.mark.slow

# 8 prompts per step for the whole job: one process takes all 8, two take 4 each.
COMMON = [
    "--steps",
    "2",
    "--batch-size",
    "8",
    "--lr",
    "1e-3",
    "--seed",
    "3",
    "--rollout.num_rollouts",
    "1",
    "--rollout.max_new_tokens",
    "4",
    "--divergence.topk",
    "20",
    "--collapse_guard.enabled",
    "false",
    "--runtime.device",
    "cpu",
    "--runtime.dtype",
    "float32",
    "--runtime.dist_timeout_s",
    "60",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), count=16)


def _vopd_train(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`vopd train` in its own process (torchrun needs a command line of its own)."""
    return subprocess.run(
        [sys.executable, "-m", "vopd.cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[name].float() - b[name].float()).abs().max()) for name in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output", str(run), *COMMON]) == 0
    return run


def test_two_data_parallel_processes_train_the_single_process_weights(tiny_model_dir, data, single_run, tmp_path):
    """DDP: 2 processes x 4 prompts against 1 process x 8 (FSDP's equality is the resume test's, below)."""
    strategy = "ddp"
    run = tmp_path / strategy
    done = _vopd_train(
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output",
        str(run),
        *COMMON,
        "--nproc",
        "2",
        "--runtime.strategy",
        strategy,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "full logits" not in done.stdout + done.stderr  # scored from hidden states, the head's gradient synced
    assert "prompts run twice" not in done.stdout + done.stderr  # one prompt pass per rank, synced through DDP
    _assert_same_weights(_weights(single_run), _weights(run))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["loss"] for line in (single_run / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(expected, rel=1e-4)
    assert json.loads((run / "final" / "config.json").read_text())["model_type"] == "qwen2_vl"


def test_a_sharded_run_stopped_and_resumed_equals_an_uninterrupted_one(tiny_model_dir, data, single_run, tmp_path):
    """FSDP over 2 processes, stopped after step 1 and resumed: the single process's weights after 2 steps. The loss is
    scored from the hidden states and the LM head, whose weight is whole only between the forward and the backward."""
    run = tmp_path / "resumed"
    first = [*COMMON]
    first[first.index("--steps") + 1] = "1"
    args = [
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output",
        str(run),
        "--nproc",
        "2",
        "--runtime.strategy",
        "fsdp",
    ]
    done = _vopd_train(*args, *first)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints" / "step-1" / "trainer_state.pt").is_file()
    done = _vopd_train(*args, *COMMON, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "full logits" not in done.stdout + done.stderr  # scored from hidden states, the head's shards updated
    assert "the student's prompts run twice a step: under FSDP" in done.stdout + done.stderr
    _assert_same_weights(_weights(single_run), _weights(run))
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("ddp", []), ("fsdp", []), ("fsdp", ["--runtime.max_tokens_per_micro_batch", "400"])],
    ids=["ddp", "fsdp", "fsdp-token-budget"],
)
def test_checkpointed_blocks_across_processes_train_the_single_process_weights(
    strategy, extra, tiny_model_dir, data, single_run, tmp_path
) -> None:
    """runtime.gradient_checkpointing under DDP's and FSDP2's hooks: the recomputed blocks give the weights of the
    single process that checkpointed nothing; with a token budget too (sharded ranks must run as many forwards)."""
    run = tmp_path / strategy
    done = _vopd_train(
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output",
        str(run),
        *COMMON,
        "--nproc",
        "2",
        "--runtime.strategy",
        strategy,
        "--runtime.gradient_checkpointing",
        "true",
        *extra,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "full logits" not in done.stdout + done.stderr
    _assert_same_weights(_weights(single_run), _weights(run))
    if extra:  # 4 rows per rank of ~180 tokens: 2 per forward
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(record["student_forwards"] >= 2 for record in metrics)


def test_lora_across_sharded_processes_exports_merged_weights(tiny_model_dir, data, tmp_path) -> None:
    """LoRA under FSDP (DDP's LoRA is the single-process LoRA on each rank): an EMA adapter, a merged final folder."""
    from transformers import AutoModelForImageTextToText

    strategy = "fsdp"
    run = tmp_path / f"lora-{strategy}"
    one_step = [*COMMON]
    one_step[one_step.index("--steps") + 1] = "1"
    done = _vopd_train(
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output",
        str(run),
        *one_step,
        "--nproc",
        "2",
        "--runtime.strategy",
        strategy,
        "--lora.enabled",
        "true",
        "--lora.rank",
        "4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    merged = AutoModelForImageTextToText.from_pretrained(run / "final", local_files_only=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, local_files_only=True).state_dict()
    moved = [name for name, tensor in merged.state_dict().items() if not torch.equal(tensor, base[name])]
    assert moved and all("visual" not in name for name in moved)


def _rank_processes(marker: str) -> dict[int, int]:
    """pid of each training rank of the run whose environment carries ``marker``."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if values.get(b"VOPD_TEST_RUN") == marker.encode() and b"RANK" in values and b"LOCAL_RANK" in values:
            found[int(values[b"RANK"])] = int(entry.name)
    return found


def test_a_rank_that_dies_ends_the_job_with_an_error_not_a_hang(tiny_model_dir, data, tmp_path) -> None:
    marker = uuid.uuid4().hex
    long_run = [*COMMON]
    long_run[long_run.index("--steps") + 1] = "500"
    run = tmp_path / "dies"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vopd.cli",
            "train",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--output",
            str(run),
            *long_run,
            "--nproc",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VOPD_TEST_RUN": marker},
    )
    try:
        deadline = time.monotonic() + 180
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never reached its first step"
            time.sleep(0.5)
        ranks = _rank_processes(marker)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert time.monotonic() - killed_at < 60  # far below the collective timeout: the launcher ends the job
    assert process.returncode == 2
    assert "the 2 training processes failed" in stderr and "exitcode  : -9" in stderr
    assert not _rank_processes(marker)  # no rank left behind


def test_a_strategy_without_its_launcher_and_a_lone_single_rank_are_refused(monkeypatch) -> None:
    from vopd.distributed import setup

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="needs a launcher"):
        setup("fsdp", timeout_s=5)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="set runtime.strategy to ddp or fsdp"):
        setup("single", timeout_s=5)


def test_nproc_refuses_a_batch_the_processes_cannot_share(tiny_model_dir, data, tmp_path, capsys) -> None:
    run = tmp_path / "refused"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output", str(run), "--steps", "1"]
    assert main([*args, "--batch-size", "3", "--nproc", "2"]) == 2
    assert "--batch-size 3 must be a multiple of --nproc 2" in capsys.readouterr().err
    assert main([*args, "--batch-size", "2", "--nproc", "0"]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err
    assert not run.exists()  # refused before anything was launched or written


@pytest.mark.parametrize(
    ("strategy", "offload"),
    [
        ("ddp", ["--runtime.offload_optimizer", "true", "--runtime.offload_teacher", "true"]),
        ("fsdp", ["--runtime.offload_params", "true", "--runtime.offload_optimizer", "true"]),
        ("fsdp", ["--runtime.offload_params", "true", "--runtime.offload_teacher", "true"]),
    ],
    ids=["ddp-optimizer-teacher", "fsdp-params", "fsdp-params-teacher"],
)
def test_offloaded_state_across_processes_trains_the_single_process_weights(
    strategy, offload, tiny_model_dir, data, single_run, tmp_path
) -> None:
    """AdamW's state and the teacher on the host under DDP (vopd.offload), the shards on the host under FSDP (FSDP2's
    CPUOffloadPolicy, which runs on gloo too): the weights of the single process that offloaded nothing."""
    run = tmp_path / strategy
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--output", str(run), *COMMON]
    done = _vopd_train(*args, "--nproc", "2", "--runtime.strategy", strategy, *offload)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_weights(_weights(single_run), _weights(run))
