"""The memory plan (``vopd.memory_plan``) against the peaks a training step reaches on the CPU.

For each model (the tiny Qwen2-VL 5M and 20M, LLaVA and Qwen3.5), activation checkpointing off and on, and two
micro-batch token counts (rows x forced response tokens), one process allocates what a step leaves behind (gradients,
AdamW's moments; or runs ``--warmup`` training steps) and then runs one measured step, Vision-OPD as the paper runs
it (EMA teacher on the crop, JSD 0.5 on the student's top-100 + tail, loss from hidden states), fp32.
Measured: the state (every weight, gradient, AdamW moment and teacher tensor the trainer holds, by their bytes)
plus what the step adds to the resident size at its peak (``VmHWM`` reset just before it, minus the resident size
then; glibc's mmap threshold pinned low so that freed blocks leave the process).
Planned: ``plan_memory`` on the model's config.json and the run's config, given the prompt length the processor made
(the plan's own prompt estimate is an input, not what is checked here).

Prints a table and ends with one JSON line: ``plan_error_max`` (the largest |planned - measured| / measured total
over the rows), ``activation_error_max`` (the same over the activations alone), and
``checkpointing_activation_ratio`` (the measured activations without / with checkpointing on the 20M model at its
longest responses). Not a test: nothing here asserts.

    python bench/plan_memory.py                          # 4 models x checkpointing off/on x 4 x 256, 4 x 512
    python bench/plan_memory.py --models qwen2vl-20m     # the 20M rows alone (~35 min on 2 busy cores)
    python bench/plan_memory.py --quick                  # the 5M model, 2 x 32 and 2 x 64 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MIB = 2**20
MODELS = ("qwen2vl-5m", "llava", "qwen35", "qwen2vl-20m")


def build(name: str, folder: Path) -> Path:
    from vopd.tiny_models import build_tiny_llava, build_tiny_qwen2vl, build_tiny_qwen35

    if name.startswith("qwen2vl"):
        return build_tiny_qwen2vl(folder, size=name.split("-")[1])  # type: ignore[arg-type]
    if name == "llava":
        return build_tiny_llava(folder)
    return build_tiny_qwen35(folder)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def child(args: argparse.Namespace) -> None:
    import torch
    from loss_memory import _pin_mmap_threshold  # (this script's folder is on the path)
    from memory_model import measured_state_bytes

    from vopd.config import TrainConfig
    from vopd.memory_plan import plan_memory, read_model_shape
    from vopd.trainer import OPDTrainer
    from vopd.views import student_view

    _pin_mmap_threshold(args.mmap_threshold)
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        model=args.model,
        dataset=args.data,
        output=str(Path(args.data).parent / f"run-{os.getpid()}"),
        steps=10_000,
        batch_size=args.rows,
        lr=1e-4,
        rollout={"num_rollouts": 1, "max_new_tokens": args.new_tokens},
        divergence={"alpha": 0.5, "topk": 100},
        collapse_guard={"enabled": False},
        runtime={"device": "cpu", "dtype": "float32", "gradient_checkpointing": args.checkpointing},
    )
    trainer = OPDTrainer(config)
    trainer.loaded.eos_token_ids = [trainer.loaded.suppressed_token_ids[0]]  # full-length responses: never sampled
    for _ in range(args.warmup):
        trainer.train_step()
        trainer.step += 1
    if not args.warmup:  # the state a step leaves behind, without a step: gradients and AdamW's moments allocated
        for parameter in trainer.student.parameters():
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
        trainer.optimizer.step()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    trainer.train_step()
    extra = _status_bytes("VmHWM") - before
    state = measured_state_bytes(trainer)
    samples = trainer._samples_for(0)
    prompt_tokens = int(trainer._encode(trainer._conversations(samples, student_view))["input_ids"].shape[1])
    plan = plan_memory(
        read_model_shape(args.model), config, world_size=1, device_type="cpu", prompt_tokens=prompt_tokens
    )
    planned = plan.per_device_bytes
    print(
        "@@"
        + json.dumps(
            {
                "state": state,
                "extra": extra,
                "planned_total": planned["total"],
                "planned_state": planned["total"] - planned["activations"],
                "planned_activations": planned["activations"],
                "peak_phase": plan.activations["peak_phase"],
                "prompt_tokens": prompt_tokens,
                "parameters": plan.assumptions["parameters"],
            }
        )
    )


def run(model: str, folder: Path, data: Path, rows: int, new_tokens: int, checkpointing: bool, args) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(folder), "--data", str(data)]
    command += ["--rows", str(rows), "--new-tokens", str(new_tokens), "--warmup", str(args.warmup)]
    command += ["--threads", str(args.threads), "--mmap-threshold", str(args.mmap_threshold)]
    command += ["--checkpointing"] if checkpointing else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]),
        "OMP_NUM_THREADS": str(args.threads),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("@@")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{model} failed:\n{done.stderr[-3000:]}")
    measured = json.loads(lines[-1][2:])
    return {"model": model, "rows": rows, "new_tokens": new_tokens, "checkpointing": checkpointing, **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--rows", type=int, default=4, help="rollout rows per micro-batch (one rollout per prompt)")
    parser.add_argument("--new-tokens", default="256,512", help="the two response lengths (forced), comma-separated")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help=(
            "training steps before the measured one (0: gradients and AdamW's state allocated without a step; the "
            "measured step then also holds the first step's one-time allocations, 30-50 MiB here)"
        ),
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=2**20,
        help=(
            "glibc's mmap threshold in bytes: blocks below it come from the heap, where the warm-up step's freed "
            "memory is already resident and so is not counted; lower it for models whose tensors are smaller "
            "(LLaVA's and Qwen3.5's tiny ones: 65536)"
        ),
    )
    parser.add_argument("--quick", action="store_true", help="the 5M model, 2 rows x 32 and 64 tokens")
    parser.add_argument(
        "--replan",
        metavar="FILE",
        help="rows measured earlier (the JSON lines this script prints on stderr), re-planned",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.new_tokens = int(args.new_tokens)
        child(args)
        return
    if args.replan:  # the measurements of earlier runs (their stderr lines), planned again by the current plan
        rows = [replan(json.loads(line)) for line in Path(args.replan).read_text().splitlines() if line.strip()]
        report(rows, args)
        return
    if args.quick:
        args.models, args.rows, args.new_tokens = "qwen2vl-5m", 2, "32,64"
    from vopd.synth import SynthConfig, generate_dataset

    work = Path(tempfile.mkdtemp(prefix="vopd-plan-memory-"))
    data = generate_dataset(work / "data", SynthConfig(n=16, seed=0, size=112, box_size=28))
    lengths = [int(value) for value in args.new_tokens.split(",")]
    rows = []
    for model in args.models.split(","):
        folder = build(model, work / model)
        for new_tokens in lengths:
            for checkpointing in (False, True):
                rows.append(run(model, folder, data, args.rows, new_tokens, checkpointing, args))
                print(f"  {json.dumps(rows[-1])}", file=sys.stderr)

    report(rows, args)


def replan(row: dict[str, Any]) -> dict[str, Any]:
    """``row``'s plan made again from its model (built again, deterministic) and settings."""
    from vopd.config import TrainConfig
    from vopd.memory_plan import plan_memory, read_model_shape

    folder = build(row["model"], Path(tempfile.mkdtemp(prefix="vopd-replan-")) / row["model"])
    config = TrainConfig(
        model=str(folder),
        dataset="unused.jsonl",
        steps=1,
        batch_size=row["rows"],
        rollout={"num_rollouts": 1, "max_new_tokens": row["new_tokens"]},
        divergence={"alpha": 0.5, "topk": 100},
        runtime={"device": "cpu", "dtype": "float32", "gradient_checkpointing": row["checkpointing"]},
    )
    plan = plan_memory(read_model_shape(folder), config, device_type="cpu", prompt_tokens=row["prompt_tokens"])
    planned = plan.per_device_bytes
    return {
        **row,
        "planned_total": planned["total"],
        "planned_state": planned["total"] - planned["activations"],
        "planned_activations": planned["activations"],
    }


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print("fp32 on the CPU, responses forced to full length")
    print(
        "| model | tokens | ckpt | prompt | measured state MiB | measured step MiB | planned state MiB | "
        "planned activations MiB | measured total | planned total | error |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    errors, activation_errors = [], []
    for row in rows:
        measured = row["state"] + row["extra"]
        error = abs(row["planned_total"] - measured) / measured
        activation_error = abs(row["planned_activations"] - row["extra"]) / row["extra"]
        errors.append(error)
        activation_errors.append(activation_error)
        print(
            f"| {row['model']} | {row['rows']} x {row['new_tokens']} | {'on' if row['checkpointing'] else 'off'} | "
            f"{row['prompt_tokens']} | {row['state'] / MIB:.1f} | {row['extra'] / MIB:.1f} | "
            f"{row['planned_state'] / MIB:.1f} | {row['planned_activations'] / MIB:.1f} | {measured / MIB:.1f} | "
            f"{row['planned_total'] / MIB:.1f} | {error:.3f} |"
        )
    largest = max(rows, key=lambda row: (row["parameters"], row["new_tokens"]))
    pair = {
        row["checkpointing"]: row["extra"]
        for row in rows
        if row["model"] == largest["model"] and row["new_tokens"] == largest["new_tokens"]
    }
    headline = {
        "rows": sorted({row["rows"] for row in rows}),
        "new_tokens": sorted({row["new_tokens"] for row in rows}),
        "plan_error_max": round(max(errors), 4),
        "activation_error_max": round(max(activation_errors), 4),
        "checkpointing_activation_ratio": round(pair[False] / max(pair[True], 1), 2),
        "ratio_row": f"{largest['model']} {largest['rows']} x {largest['new_tokens']}",
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
