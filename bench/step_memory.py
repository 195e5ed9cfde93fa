"""Peak memory and time of one whole OPD training step, scored from hidden states or from full logits.

The trainer computes the loss and its metrics from the final hidden states and the LM heads, a few hundred positions
at a time (``divergence.from_hidden_states``, the default), instead of building both sides' (rows, response, V)
logits. This measures what that buys at a real vocabulary on a model small enough for a CPU: the tiny Qwen2-VL
(hidden 256) with its vocabulary grown to ``--vocab`` (151,936 = Qwen2/2.5-VL's), one rollout per prompt,
``--batch`` prompts x ``--new-tokens`` forced response tokens, fp32, Vision-OPD as the paper runs it (EMA teacher
on the crop, JSD 0.5 on the student's top-100 + tail).

Each path runs in its own process: ``--warmup`` steps, then ``--steps`` timed ones. Its peak is the kernel's
high-water mark of the resident size (``VmHWM``, reset after the warm-up) minus the resident size at that reset (the
model, the teacher's copy, AdamW's state and the data are there by then), so it is what a step itself adds:
generation's KV cache, activations, the logits or their chunks, gradients. glibc's mmap threshold is pinned low so
that freed blocks leave the process. Prints a table
and ends with one JSON line: ``peak_ratio_logits_vs_hidden`` (logits path peak / hidden-states path peak),
``step_time_ratio_hidden_vs_logits``, and the same two for the student's prompts run once for sampling and scoring
(the default, ``rollout.share_prompt_pass``) against twice (``..._prompt_pass_vs_two_passes``: the prompt pass holds
the prompts' activations while sampling); all paths' losses must agree (``loss_rel_diff``).

    python bench/step_memory.py                          # vocab 151,936, 4 x 256 tokens: about 2 minutes
    python bench/step_memory.py --quick                  # vocab 32,000, 2 x 32 tokens: seconds (also a test)
    python bench/step_memory.py --new-tokens 512 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PATHS = {
    "hidden": "from hidden states (default)",
    "logits": "from full logits",
    "two-passes": "hidden states, prompts run twice",
}


def _status_mib(field: str) -> float:
    """A size from /proc/self/status (VmRSS: resident now; VmHWM: its high-water mark), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def prepare(work: Path, vocab: int) -> dict[str, str]:
    """The tiny Qwen2-VL with ``vocab`` output rows (new rows random, as a real head's are to this bench) and a
    synthetic dataset."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vopd.synth import SynthConfig, generate_dataset
    from vopd.tiny_models import build_tiny_qwen2vl

    model_dir = build_tiny_qwen2vl(work / "tiny", size="5m")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(model_dir)
    data = generate_dataset(work / "data", SynthConfig(n=32, seed=0, size=112, box_size=28))
    return {"model": str(model_dir), "data": str(data)}


def child(args: argparse.Namespace) -> None:
    import torch
    from loss_memory import _pin_mmap_threshold  # (this script's folder is on the path)

    from vopd.config import TrainConfig
    from vopd.trainer import OPDTrainer

    _pin_mmap_threshold(2**20)
    torch.set_num_threads(args.threads)
    files = json.loads(Path(args.files).read_text())
    config = TrainConfig(
        model=files["model"],
        dataset=files["data"],
        output=str(Path(args.files).parent / f"run-{args.child}"),
        steps=10_000,
        batch_size=args.batch,
        lr=1e-4,
        rollout={"num_rollouts": 1, "max_new_tokens": args.new_tokens, "share_prompt_pass": args.child != "two-passes"},
        divergence={"alpha": 0.5, "topk": 100, "from_hidden_states": args.child != "logits"},
        collapse_guard={"enabled": False},
        runtime={"device": "cpu", "dtype": "float32"},
    )
    trainer = OPDTrainer(config)
    assert (trainer.logits_fallback is None) == (args.child != "logits"), trainer.logits_fallback
    assert (trainer.prompt_pass_refusal is None) == (args.child != "two-passes"), trainer.prompt_pass_refusal
    trainer.loaded.eos_token_ids = [trainer.loaded.suppressed_token_ids[0]]  # full-length responses: never sampled
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            before = _status_mib("VmRSS")
            _reset_peak()
        start = time.perf_counter()
        metrics = trainer.train_step()
        trainer.step += 1
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
    peak = _status_mib("VmHWM")
    print("@@" + json.dumps({"before_mib": before, "peak_mib": peak, "times": times, "losses": losses}))


def run_path(path: str, files: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", path, "--files", str(files)]
    for name in ("batch", "new_tokens", "steps", "warmup", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": str(args.threads),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("@@")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{path} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batch", type=int, default=4, help="prompts per step (one rollout each)")
    parser.add_argument("--new-tokens", type=int, default=256, help="response tokens per rollout (forced)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="vocab 32,000, 2 x 32 tokens, 1 step after 1")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.vocab, args.batch, args.new_tokens, args.steps, args.warmup = 32_000, 2, 32, 1, 1
    work = Path(tempfile.mkdtemp(prefix="vopd-step-memory-"))
    files = work / "files.json"
    files.write_text(json.dumps(prepare(work, args.vocab)))
    results = {path: run_path(path, files, args) for path in PATHS}

    print(
        f"tiny Qwen2-VL (hidden 256), vocabulary {args.vocab:,}, {args.batch} x {args.new_tokens} forced tokens, "
        f"fp32, {args.threads} threads; median of {args.steps} steps after {args.warmup}"
    )
    print(f"| {'loss computed':<32} | {'peak extra MiB':>14} | {'step s':>7} | {'loss (first step)':>17} |")
    print(f"|{'-' * 34}|{'-' * 15}:|{'-' * 8}:|{'-' * 18}:|")
    peaks, steps = {}, {}
    for path, result in results.items():
        peaks[path] = result["peak_mib"] - result["before_mib"]
        steps[path] = statistics.median(result["times"])
        print(f"| {PATHS[path]:<32} | {peaks[path]:14.0f} | {steps[path]:7.2f} | {result['losses'][0]:17.6e} |")
    first = [results[path]["losses"][0] for path in PATHS]
    headline = {
        "vocab": args.vocab,
        "response_tokens": args.batch * args.new_tokens,
        "peak_extra_mib": {path: round(value) for path, value in peaks.items()},
        "step_s": {path: round(value, 3) for path, value in steps.items()},
        "peak_ratio_logits_vs_hidden": round(peaks["logits"] / max(peaks["hidden"], 1.0), 2),
        "step_time_ratio_hidden_vs_logits": round(steps["hidden"] / steps["logits"], 3),
        "peak_ratio_prompt_pass_vs_two_passes": round(peaks["hidden"] / max(peaks["two-passes"], 1.0), 2),
        "step_time_ratio_prompt_pass_vs_two_passes": round(steps["hidden"] / steps["two-passes"], 3),
        "loss_rel_diff": max(abs(value - first[0]) for value in first) / max(abs(first[0]), 1e-12),
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
