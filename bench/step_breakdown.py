"""Where an OPD step's time goes, against its irreducible parts measured alone.

Irreducible parts: student generation, teacher forward, student forward+backward (+ optimizer step). The
step's overhead is everything else (views, processor, divergence, metrics, EMA). Prints a table and the
ratio step / sum(parts); the goal is at most 1.3 on the 4.6M tiny model at 224 px, batch 4, 16 new tokens.

    python bench/step_breakdown.py [--size 224] [--batch 4] [--new-tokens 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vopd.config import TrainConfig
from vopd.rollout import response_logits, sample_rollouts
from vopd.synth import SynthConfig, generate_dataset
from vopd.tiny_models import build_tiny_qwen2vl
from vopd.trainer import OPDTrainer, derive_seed
from vopd.views import student_view, teacher_view


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=224, help="canvas size in px")
    parser.add_argument("--batch", type=int, default=4, help="rollouts per step (prompts x rollouts)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="vopd-bench-"))
    model_dir = build_tiny_qwen2vl(work / "tiny", size="5m")
    data = generate_dataset(work / "data", SynthConfig(n=32, seed=0, size=args.size, box_size=args.size // 4))
    config = TrainConfig(
        model=str(model_dir),
        dataset=str(data),
        output=str(work / "run"),
        steps=1000,
        batch_size=args.batch,
        lr=1e-4,
        rollout={"num_rollouts": 1, "max_new_tokens": args.new_tokens, "temperature": 1.0},
        # force full-length responses so every part sees the same number of tokens
    )
    trainer = OPDTrainer(config)
    loaded = trainer.loaded
    eos = loaded.eos_token_ids
    never = [loaded.suppressed_token_ids[0]]  # a suppressed id as "end": full-length responses, a fair comparison
    trainer.loaded.eos_token_ids = never
    samples = trainer._samples_for(0)
    student_prompts = trainer.loaded.encode(trainer._conversations(samples, student_view))
    teacher_prompts = trainer.loaded.encode(trainer._conversations(samples, teacher_view))

    def generate():
        return sample_rollouts(
            trainer.student,
            student_prompts,
            max_new_tokens=args.new_tokens,
            temperature=1.0,
            top_p=1.0,
            eos_token_ids=never,
            pad_token_id=loaded.pad_token_id,
            suppressed_token_ids=loaded.suppressed_token_ids,
            seed=derive_seed(0, 0, 0),
        )

    generation_time, rollout = timed(generate, args.repeats)

    def teacher_forward():
        with trainer.teacher.scoring() as module:
            return response_logits(module, teacher_prompts, rollout)

    teacher_time, _ = timed(teacher_forward, args.repeats)

    def student_forward_backward():
        logits = response_logits(trainer.student, student_prompts, rollout)
        logits.float().logsumexp(-1).mean().backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    student_time, _ = timed(student_forward_backward, args.repeats)
    step_time, metrics = timed(trainer.train_step, args.repeats)
    trainer.loaded.eos_token_ids = eos
    parts = generation_time + teacher_time + student_time

    rows = [
        ("generation", generation_time),
        ("teacher forward", teacher_time),
        ("student forward+backward+optimizer", student_time),
        ("sum of parts", parts),
        ("full OPD step", step_time),
    ]
    print(
        f"tiny 5m Qwen2-VL, {args.size} px, {args.batch} rollouts x {args.new_tokens} tokens, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print(f"{'part':<38} {'seconds':>8}")
    for name, seconds in rows:
        print(f"{name:<38} {seconds:8.3f}")
    print(f"{'step / sum of parts':<38} {step_time / parts:8.2f}")
    print(
        f"in-step: rollout {metrics['rollout_time']:.3f}s teacher {metrics['teacher_time']:.3f}s "
        f"student {metrics['student_time']:.3f}s"
    )


if __name__ == "__main__":
    main()
