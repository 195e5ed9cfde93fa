"""Padding of the scoring forwards, and what packing them (``runtime.pack_sequences``) saves.

Responses end at very different points: one forward over a micro-batch's rows is right-padded to the longest, and the
token budget (``runtime.max_tokens_per_micro_batch``, rows grouped longest first) cuts most of that padding but not
all; packing lays each forward's rows end to end and computes no padding at all. This runs the tiny Qwen2-VL (5M,
random weights, fp32) on the synthetic dataset, ``--batch`` prompts x ``--rollouts`` rollouts per step, responses
ending at random (an end token every ``--end-every`` token ids, so lengths are about geometric, capped at
``--new-tokens``), at no budget and at budgets of 4 and 2 rows at the longest response. For each budget a padded and
a packed trainer take the same steps in turn in this one process (the same rollouts: sampling does not depend on
packing), after ``--warmup`` steps; reported per budget: ``padding_fraction`` (the step's metric: the share of the
student's forward tokens that were padding), the student's forwards per step, the tokens they computed and their
attention score pairs (rows x width^2 of each forward: a packed row of T tokens computes T^2 pairs, masking most),
the forwards' time (the teacher's
forward and the student's forward + backward, the step's ``teacher_time`` + ``student_time``; sampling is not packed
and not counted) padded and packed, medians over ``--steps``, and the relative difference of the two trainers'
first-step losses (``loss_rel_diff``: rounding only). Both trainers score the prompts in their own forward (no shared
prompt pass, which packing refuses). Ends with one JSON line.

    python bench/packing.py             # 4 x 4 rows, up to 64 tokens, 3 steps after 1: minutes on 2 busy cores
    python bench/packing.py --quick     # 2 x 2 rows, up to 16 tokens, 1 step after 1: checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any


def _trainer(files: dict[str, str], work: Path, args: argparse.Namespace, packed: bool, budget: int | None) -> Any:
    from vopd.config import TrainConfig
    from vopd.trainer import OPDTrainer

    config = TrainConfig(
        model=files["model"],
        dataset=files["data"],
        output=str(work / f"run-{budget}-{packed}"),
        steps=10_000,
        batch_size=args.batch,
        lr=1e-4,
        # Both score the prompts in their own forward (packing refuses the shared prompt pass): only padding differs.
        rollout={"num_rollouts": args.rollouts, "max_new_tokens": args.new_tokens, "share_prompt_pass": False},
        collapse_guard={"enabled": False},
        runtime={"device": "cpu", "dtype": "float32", "pack_sequences": packed, "max_tokens_per_micro_batch": budget},
    )
    trainer = OPDTrainer(config)
    vocab = trainer.student.get_output_embeddings().weight.shape[0]
    suppressed = set(trainer.loaded.suppressed_token_ids)
    trainer.loaded.eos_token_ids += [token for token in range(0, vocab, args.end_every) if token not in suppressed]
    return trainer


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vopd.synth import SynthConfig, generate_dataset
    from vopd.tiny_models import build_tiny_qwen2vl
    from vopd.views import student_view, teacher_view

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vopd-packing-"))
    files = {
        "model": str(build_tiny_qwen2vl(work / "tiny", size="5m", seed=0)),
        "data": str(generate_dataset(work / "data", SynthConfig(n=16, seed=0, size=112, box_size=28))),
    }
    probe = _trainer(files, work, args, False, None)
    widest = max(
        int(probe._encode(probe._conversations(probe._samples_for(0), view))["input_ids"].shape[1])
        for view in (student_view, teacher_view)
    )
    del probe
    budgets = {"none": None, "4 rows": 4 * (widest + args.new_tokens), "2 rows": 2 * (widest + args.new_tokens)}
    results: dict[str, Any] = {}
    for label, budget in budgets.items():
        trainers = {packed: _trainer(files, work, args, packed, budget) for packed in (False, True)}
        # The shapes of the student's scoring forwards (sampling runs under inference mode): tokens computed and
        # attention score pairs, rows x width^2 (the causal half is the same share either way), per measured step.
        shapes: dict[bool, list[tuple[int, int]]] = {False: [], True: []}
        for packed, trainer in trainers.items():

            def record(_module, inputs, _output, packed=packed, shapes=shapes) -> None:
                if not torch.is_inference_mode_enabled() and torch.is_grad_enabled():
                    shapes[packed].append(tuple(inputs[0].shape))

            trainer.student.get_input_embeddings().register_forward_hook(record)
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        first: dict[bool, float] = {}
        for step in range(args.warmup + args.steps):
            order = (False, True) if step % 2 == 0 else (True, False)
            for packed in order:
                trainer = trainers[packed]
                if step == args.warmup:
                    shapes[packed].clear()
                metrics = trainer.train_step()
                trainer.step += 1
                if step == 0:
                    first[packed] = metrics["loss"]
                if step >= args.warmup:
                    runs[packed].append(metrics)
        row: dict[str, Any] = {"budget_tokens": budget}
        for packed, name in ((False, "padded"), (True, "packed")):
            row[f"padding_fraction_{name}"] = round(statistics.mean(m["padding_fraction"] for m in runs[packed]), 4)
            row[f"forward_s_{name}"] = round(
                statistics.median(m["teacher_time"] + m["student_time"] for m in runs[packed]), 4
            )
        for packed, name in ((False, "padded"), (True, "packed")):
            row[f"tokens_{name}"] = sum(rows * width for rows, width in shapes[packed]) // args.steps
            row[f"attention_pairs_{name}"] = sum(rows * width * width for rows, width in shapes[packed]) // args.steps
        row["attention_pairs_ratio_packed_vs_padded"] = round(
            row["attention_pairs_packed"] / max(row["attention_pairs_padded"], 1), 3
        )
        row["student_forwards"] = statistics.mean(m["student_forwards"] for m in runs[False])
        row["response_length"] = round(statistics.mean(m["response_length"] for m in runs[False]), 2)
        row["forward_time_ratio_packed_vs_padded"] = round(row["forward_s_packed"] / row["forward_s_padded"], 3)
        # The first step's losses (the same weights, the same rollouts) differ by rounding only; later the weights
        # differ by rounding too, and a rollout may then sample another token.
        row["loss_rel_diff"] = abs(first[True] - first[False]) / max(abs(first[False]), 1e-12)
        results[label] = row
    return {"widest_prompt": widest, "budgets": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="the longest response")
    parser.add_argument("--end-every", type=int, default=24, help="every this many token ids is an end token")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per trainer")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 x 2 rows, up to 16 tokens, 1 step after 1")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.rollouts, args.new_tokens, args.end_every, args.steps, args.warmup = 2, 2, 16, 6, 1, 1
    measured = measure(args)
    print(
        f"tiny Qwen2-VL (5M), fp32, {args.threads} threads, {args.batch} x {args.rollouts} rows, responses up to "
        f"{args.new_tokens} tokens, prompts up to {measured['widest_prompt']} tokens; median of {args.steps} steps"
    )
    print(
        "| token budget | forwards | padding_fraction padded | packed | student tokens padded | packed "
        "| attention pairs padded | packed | forwards s padded | packed | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, row in measured["budgets"].items():
        print(
            f"| {label} ({row['budget_tokens']}) | {row['student_forwards']:.1f} | {row['padding_fraction_padded']:.3f}"
            f" | {row['padding_fraction_packed']:.3f} | {row['tokens_padded']} | {row['tokens_packed']}"
            f" | {row['attention_pairs_padded']:,} | {row['attention_pairs_packed']:,}"
            f" | {row['forward_s_padded']:.3f} | {row['forward_s_packed']:.3f}"
            f" | {row['forward_time_ratio_packed_vs_padded']:.2f} |"
        )
    headline = {
        "rows": args.batch * args.rollouts,
        "max_new_tokens": args.new_tokens,
        "widest_prompt": measured["widest_prompt"],
        **{
            f"{key}[{label}]": row[key]
            for label, row in measured["budgets"].items()
            for key in (
                "padding_fraction_padded",
                "attention_pairs_ratio_packed_vs_padded",
                "forward_time_ratio_packed_vs_padded",
                "response_length",
            )
        },
        "loss_rel_diff": max(row["loss_rel_diff"] for row in measured["budgets"].values()),
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
