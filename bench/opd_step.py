"""Our OPD step against the trainer users would pick instead: TRL's ``DistillationTrainer``.

All three run on the same tiny Qwen2-VL (built locally, random weights), the same prompts, the same batch, the same
number of response tokens (every rollout is forced to full length: the end tokens are suppressed), JSD at alpha 0.5
(TRL: ``beta=0.5``), fp32, ``--threads`` threads, each in its own process:

* ``vision-opd``: our step as the paper runs it: the teacher is an EMA of the student and sees the crop.
* ``ours, TRL's mode``: our step with TRL's setting: a fixed teacher (the initial weights) on the student's own image.
* ``TRL DistillationTrainer``: ``trl.DistillationTrainer`` with a separate frozen teacher (its only mode), timed from
  ``on_step_begin`` to ``on_step_end`` of a callback (generation, processing, forwards, loss, backward, optimizer).

The machine is shared and noisy, so the processes are driven in lock step by this one: every round runs one step in
each process in turn (the first one rotating), times are medians over ``--steps`` rounds after ``--warmup``, and a
ratio to TRL is the median over rounds of the ratio within the round (the same minute of load for both). In each
round one of our processes (in turn) also times the step's irreducible parts alone, each the way the step runs it
(each view through the vision encoder once where the trainer shares image features; student generation, from one
prompt pass with gradient where the trainer shares it; teacher forward; student forward, over the response alone
after a prompt pass, + backward + optimizer step); ``loop_overhead`` is our step over their sum, minus 1. Peak
RSS is each process's ``ru_maxrss``. Prints a table and ends with one JSON line: ``step_time_ratio_vs_trl`` (our
step in TRL's mode over TRL's; goal at most 0.8), ``vision_opd_ratio_vs_trl`` (goal at most 1.0), ``loop_overhead``
(goal at most 0.15).

    python bench/opd_step.py                        # 112 px, batch 4, 16 tokens, 10 steps after 2: about 2 minutes
    python bench/opd_step.py --size 224 --new-tokens 32 --steps 20
    python bench/opd_step.py --smoke                # 2 steps after 1, checks the script (needs the `bench` extra)
    python bench/opd_step.py --baseline /tmp/old    # adds our two rows run on another copy of the repository

``--baseline DIR`` runs our rows a second time with ``vopd`` imported from ``DIR`` (a copy of the repository at
another revision), in the same rounds: a before/after comparison that the machine's load cannot skew.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROLES = ("vision-opd", "ours-trl-mode", "trl")
LABELS = {
    "vision-opd": "ours: Vision-OPD (crop, EMA)",
    "ours-trl-mode": "ours: TRL's mode (fixed, full)",
    "trl": "TRL DistillationTrainer",
}


# ------------------------------------------------------------------------------------------------ shared setup
def prepare(work: Path, size: int) -> dict[str, str]:
    """The tiny model, the synthetic dataset, and its TRL-mode copies; every process reads the same files."""
    from vopd.config import ViewConfig
    from vopd.data import load_dataset
    from vopd.synth import SynthConfig, generate_dataset
    from vopd.tiny_models import build_tiny_qwen2vl
    from vopd.views import student_view

    model_dir = build_tiny_qwen2vl(work / "tiny", size="5m")
    data = generate_dataset(work / "data", SynthConfig(n=32, seed=0, size=size, box_size=size // 4))
    # TRL's mode: the teacher sees what the student sees. Both get the student's own view (box drawn, hint): ours as
    # image and crop of a dataset whose box is already drawn, TRL's as its prompt and image.
    views = work / "student_views"
    views.mkdir(exist_ok=True)
    same_view, trl_rows = [], []
    for sample in load_dataset(data):
        view = student_view(sample, ViewConfig())
        path = views / f"{sample.id}.png"
        view.image.save(path)
        same_view.append(
            {"id": sample.id, "image": f"student_views/{path.name}", "crop_image": f"student_views/{path.name}"}
            | {"question": sample.question}
            | {"options": sample.options, "bbox": list(sample.bbox) if sample.bbox else None}
        )
        trl_rows.append({"image": str(path), "text": view.text})
    same_view_path = work / "same_view.jsonl"
    same_view_path.write_text("".join(json.dumps(row) + "\n" for row in same_view))
    trl_path = work / "trl_prompts.jsonl"
    trl_path.write_text("".join(json.dumps(row) + "\n" for row in trl_rows))
    return {"model": str(model_dir), "data": str(data), "same_view": str(same_view_path), "trl": str(trl_path)}


# ------------------------------------------------------------------------------------------------ our processes
class OursWorker:
    """Our trainer in one process: ``step`` runs ``train_step``; ``parts`` times its irreducible parts alone."""

    def __init__(self, role: str, files: dict[str, str], args: argparse.Namespace, work: Path) -> None:
        from vopd.config import TrainConfig
        from vopd.trainer import OPDTrainer, derive_seed
        from vopd.views import student_view, teacher_view

        trl_mode = role == "ours-trl-mode"
        config = TrainConfig(
            model=files["model"],
            dataset=files["same_view" if trl_mode else "data"],
            output=str(work / f"run-{role}"),
            steps=10_000,
            batch_size=args.batch,
            lr=1e-4,
            rollout={"num_rollouts": 1, "max_new_tokens": args.new_tokens, "temperature": 1.0},
            divergence={"alpha": 0.5},
            teacher={"mode": "fixed" if trl_mode else "ema"},
            # TRL's mode: the dataset's images already carry the box (the text is formatted as TRL's prompt is).
            views={"draw_box": False} if trl_mode else {},
        )
        self.trainer = trainer = OPDTrainer(config)
        # Full-length responses: a suppressed id (never sampled) is the only end token, as in bench/step_breakdown.py.
        self.never = [trainer.loaded.suppressed_token_ids[0]]
        trainer.loaded.eos_token_ids = self.never
        samples = trainer._samples_for(0)
        student_conversations = trainer._conversations(samples, student_view)
        teacher_conversations = trainer._conversations(samples, teacher_view)
        self.same_view = student_conversations == teacher_conversations
        self.student_prompts = trainer.loaded.encode(student_conversations)
        self.teacher_prompts = trainer.loaded.encode(teacher_conversations)
        self.seed = derive_seed(0, 0, 0)
        self.args = args

    def step(self) -> dict[str, float]:
        start = time.perf_counter()
        metrics = self.trainer.train_step()
        return {"seconds": time.perf_counter() - start, "tokens": metrics["response_length"] * self.args.batch}

    def parts(self) -> dict[str, float]:
        from vopd.models import with_image_features
        from vopd.rollout import PromptPass, response_logits, sample_rollouts

        trainer, loaded = self.trainer, self.trainer.loaded
        student_prompts, teacher_prompts = self.student_prompts, self.teacher_prompts
        timed: dict[str, float] = {}
        if trainer.shares_image_features:  # as the step does: each view through the vision encoder once
            start = time.perf_counter()
            student_prompts = with_image_features(trainer.student, student_prompts)
            if self.same_view:
                teacher_prompts = student_prompts
            else:
                teacher_prompts = with_image_features(trainer.student, teacher_prompts)
            timed["encoder"] = time.perf_counter() - start
        start = time.perf_counter()
        # As the step does where it applies: one forward over the prompts (with gradient) for sampling and scoring.
        prompt_pass = None if trainer.prompt_pass_refusal else PromptPass.run(trainer.student, student_prompts)
        rollout = sample_rollouts(
            trainer.student,
            student_prompts,
            prompt_pass=prompt_pass,
            max_new_tokens=self.args.new_tokens,
            temperature=1.0,
            top_p=1.0,
            eos_token_ids=self.never,
            pad_token_id=loaded.pad_token_id,
            suppressed_token_ids=loaded.suppressed_token_ids,
            seed=self.seed,
        )
        generation = time.perf_counter() - start
        start = time.perf_counter()
        with trainer.teacher.scoring() as module:
            response_logits(module, teacher_prompts, rollout)
        teacher = time.perf_counter() - start
        start = time.perf_counter()
        if prompt_pass is None:
            logits = response_logits(trainer.student, student_prompts, rollout)
        else:
            logits = prompt_pass.response_logits(trainer.student, rollout)
        logits.logsumexp(-1).mean().backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        student = time.perf_counter() - start
        return timed | {"generation": generation, "teacher": teacher, "student": student}


# ------------------------------------------------------------------------------------------------ TRL's process
class TRLWorker:
    """TRL's DistillationTrainer, paused by a callback before every step until the driver says go."""

    def __init__(self, files: dict[str, str], args: argparse.Namespace, work: Path) -> None:
        from datasets import Dataset
        from PIL import Image
        from transformers import TrainerCallback
        from trl import DistillationConfig, DistillationTrainer

        from vopd.config import RuntimeConfig
        from vopd.models import load_model_and_processor

        runtime = RuntimeConfig(device="cpu", dtype="float32")
        loaded = load_model_and_processor(files["model"], runtime, trainable=True)
        teacher = load_model_and_processor(files["model"], runtime, trainable=False).model
        rows = [json.loads(line) for line in Path(files["trl"]).read_text().splitlines()]
        dataset = Dataset.from_list(
            [
                {"prompt": [{"role": "user", "content": row["text"]}], "image": Image.open(row["image"]).convert("RGB")}
                for row in rows
            ]
        )
        total = args.warmup + args.steps
        config = DistillationConfig(
            output_dir=str(work / "trl-run"),
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,  # ours does not checkpoint either
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            learning_rate=1e-4,
            max_steps=total + 1,
            max_completion_length=args.new_tokens,
            beta=0.5,
            temperature=1.0,
            top_p=1.0,
            logging_steps=10**6,
            save_strategy="no",
            report_to="none",
            disable_dropout=True,
            dataloader_num_workers=0,
            seed=0,
            # Full length, as ours: the end tokens join the image/vision tokens that may never be sampled.
            generation_kwargs={"suppress_tokens": sorted({*loaded.suppressed_token_ids, *loaded.eos_token_ids})},
        )
        self.lines = sys.stdin
        driver = self

        class LockStep(TrainerCallback):
            def on_step_begin(self, *_: Any, **__: Any) -> None:
                driver.wait_for_go()
                driver.started = time.perf_counter()

            def on_step_end(self, *_: Any, **__: Any) -> None:
                seconds = time.perf_counter() - driver.started
                lengths = driver.trainer._metrics["train"]["completions/mean_length"]  # what TRL itself counted
                _reply({"seconds": seconds, "tokens": args.batch * lengths[-1]})

        self.trainer = DistillationTrainer(
            model=loaded.model,
            teacher_model=teacher,
            args=config,
            train_dataset=dataset,
            processing_class=loaded.processor,
            callbacks=[LockStep()],
        )
        self.started = 0.0

    def wait_for_go(self) -> None:
        command = self.lines.readline().strip()
        if command != "step":
            _reply({"maxrss_mib": _maxrss_mib()})
            os._exit(0)  # the driver is done with this process: leave Trainer's loop at once

    def run(self) -> None:
        _reply({"ready": True})
        self.trainer.train()
        self.wait_for_go()


# ------------------------------------------------------------------------------------------------ plumbing
def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reply(payload: dict[str, Any]) -> None:
    sys.stdout.write("@@" + json.dumps(payload) + "\n")
    sys.stdout.flush()


def child(args: argparse.Namespace) -> None:
    import torch

    import vopd

    print(f"vopd imported from {Path(vopd.__file__).parent}", file=sys.stderr)  # the log shows which tree ran

    torch.set_num_threads(args.threads)
    files = json.loads(Path(args.files).read_text())
    work = Path(args.files).parent
    if args.child == "trl":
        TRLWorker(files, args, work).run()
        return
    worker = OursWorker(args.child, files, args, work)
    _reply({"ready": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            _reply(worker.step())
        elif command == "parts":
            _reply(worker.parts())
        else:
            _reply({"maxrss_mib": _maxrss_mib()})
            return


class Process:
    """A child process spoken to line by line (``@@``-prefixed JSON replies; everything else is its log)."""

    def __init__(self, role: str, files_path: Path, args: argparse.Namespace, log: Path) -> None:
        name, _, baseline = role.partition("@")
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--files", str(files_path)]
        for name in ("batch", "new_tokens", "steps", "warmup", "threads"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        env = {
            **os.environ,
            "PYTHONPATH": str(Path(args.baseline).resolve() if baseline else Path(__file__).resolve().parents[1]),
            "OMP_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_VERBOSITY": "error",
        }
        self.role = role
        self.log = log.open("w")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )

    def ask(self, command: str | None = None) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"{self.role} exited: see {self.log.name}")


def drive(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vopd-opd-step-"))
    files_path = work / "files.json"
    files_path.write_text(json.dumps(prepare(work, args.size)))
    roles = list(args.roles)
    if args.baseline:
        roles += [f"{role}@baseline" for role in args.roles if role != "trl"]
    processes = {role: Process(role, files_path, args, work / f"{role}.log") for role in roles}
    for process in processes.values():
        process.ask()  # wait until every process has set up (built its trainer) before timing anything
    steps: dict[str, list[float]] = {role: [] for role in processes}
    tokens: dict[str, float] = {}
    parts: dict[str, dict[str, list[float]]] = {role: {} for role in processes if role != "trl" and "@" not in role}
    roles = list(processes)
    for round_index in range(args.warmup + args.steps):
        # Rotate who goes first, so no process always follows the same neighbour; one of our processes (in turn)
        # also times its parts alone, which keeps a round short.
        for role in roles[round_index % len(roles) :] + roles[: round_index % len(roles)]:
            result = processes[role].ask("step")
            if round_index >= args.warmup:
                steps[role].append(result["seconds"])
                tokens[role] = result["tokens"]
        if parts:
            role = list(parts)[round_index % len(parts)]
            result = processes[role].ask("parts")
            if round_index >= args.warmup:
                for name, seconds in result.items():
                    parts[role].setdefault(name, []).append(seconds)
    peaks = {role: process.ask("quit")["maxrss_mib"] for role, process in processes.items()}
    for process in processes.values():
        process.process.wait(60)
    return {"steps": steps, "tokens": tokens, "parts": parts, "peaks": peaks}


def _label(role: str) -> str:
    name, _, baseline = role.partition("@")
    return LABELS[name] + (" [baseline]" if baseline else "")


def report(args: argparse.Namespace, measured: dict[str, Any]) -> dict[str, Any]:
    medians = {role: statistics.median(times) for role, times in measured["steps"].items()}
    # Ratios within each round (the same minute of machine load for both), then their median.
    round_ratios = {
        role: statistics.median(a / b for a, b in zip(times, measured["steps"]["trl"], strict=True))
        for role, times in measured["steps"].items()
        if "trl" in measured["steps"]
    }
    part_sums = {
        role: sum(statistics.median(times) for times in named.values()) for role, named in measured["parts"].items()
    }
    print(
        f"tiny 5m Qwen2-VL, {args.size} px, batch {args.batch} x {args.new_tokens} forced tokens, JSD 0.5, fp32, "
        f"{args.threads} threads; median of {args.steps} steps after {args.warmup}, processes in lock step"
    )
    print(
        f"| {'trainer':<32} | {'step s':>7} | {'tokens/s':>8} | {'vs TRL':>6} | {'parts s':>7} | {'peak RSS MiB':>12} |"
    )
    print(f"|{'-' * 45}|{'-' * 8}:|{'-' * 9}:|{'-' * 7}:|{'-' * 8}:|{'-' * 13}:|")
    trl = medians.get("trl")
    for role, seconds in medians.items():
        ratio = f"{round_ratios[role]:.2f}" if trl else "-"
        summed = f"{part_sums[role]:.3f}" if role in part_sums else "-"
        rate = measured["tokens"][role] / seconds
        print(
            f"| {_label(role):<43} | {seconds:7.3f} | {rate:8.1f} | {ratio:>6} | {summed:>7} | "
            f"{measured['peaks'][role]:12.0f} |"
        )
    for role, named in measured["parts"].items():
        text = ", ".join(f"{name} {statistics.median(times):.3f}s" for name, times in named.items())
        print(f"{_label(role)} parts alone: {text}")
    headline: dict[str, Any] = {
        "step_s": {role: round(seconds, 4) for role, seconds in medians.items()},
        "tokens_per_s": {role: round(measured["tokens"][role] / s, 1) for role, s in medians.items()},
        "peak_rss_mib": {role: round(mib) for role, mib in measured["peaks"].items()},
    }
    if trl and "ours-trl-mode" in medians:
        headline["step_time_ratio_vs_trl"] = round(round_ratios["ours-trl-mode"], 3)
    if trl and "vision-opd" in medians:
        headline["vision_opd_ratio_vs_trl"] = round(round_ratios["vision-opd"], 3)
    if trl and "ours-trl-mode@baseline" in medians:
        headline["baseline_step_time_ratio_vs_trl"] = round(round_ratios["ours-trl-mode@baseline"], 3)
    if trl and "vision-opd@baseline" in medians:
        headline["baseline_vision_opd_ratio_vs_trl"] = round(round_ratios["vision-opd@baseline"], 3)
    if trl:
        headline["ratio_of_medians_vs_trl"] = {role: round(s / trl, 3) for role, s in medians.items() if role != "trl"}
    overheads = {role: medians[role] / part_sums[role] - 1 for role in part_sums}
    if overheads:
        headline["loop_overhead"] = round(max(overheads.values()), 3)
        headline["loop_overhead_by_row"] = {role: round(value, 3) for role, value in overheads.items()}
    print(json.dumps(headline))
    return headline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=112, help="canvas size in px")
    parser.add_argument("--batch", type=int, default=4, help="prompts per step (one rollout each)")
    parser.add_argument("--new-tokens", type=int, default=16, help="response tokens per rollout (forced)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--roles", nargs="+", default=list(ROLES), choices=ROLES, help="which rows to run")
    parser.add_argument("--smoke", action="store_true", help="2 steps after 1 warm-up: checks the script")
    parser.add_argument("--baseline", help="also run our rows with vopd from this copy of the repository")
    parser.add_argument("--child", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.smoke:
        args.steps, args.warmup = 2, 1
    report(args, drive(args))


if __name__ == "__main__":
    main()
