"""The ``vopd`` command. Each subcommand parses its flags and hands a config model to the library.

Config-driven commands (train, eval) accept ``--config FILE`` plus any field by its dotted name, e.g.
``--lr 1e-4 --divergence.alpha 0.3 --teacher.mode fixed``; the command line wins over the file.
Heavy imports (torch, transformers) happen inside the subcommands so ``vopd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vopd.callbacks import ProgressCallback
from vopd.config import parse_override_value

Handler = Callable[[argparse.Namespace, dict[str, Any]], int | None]


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2, no traceback."""


def parse_dotted_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """Turn ``['--a.b', '1', '--c=x', '--flag']`` into ``{'a.b': 1, 'c': 'x', 'flag': True}``."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(extra):
        token = extra[index]
        if not token.startswith("--") or token == "--":
            raise CliError(f"unexpected argument {token!r}; settings are given as --name value")
        key = token[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            overrides[key] = parse_override_value(raw)
        elif index + 1 < len(extra) and not extra[index + 1].startswith("--"):
            overrides[key] = parse_override_value(extra[index + 1])
            index += 1
        else:
            overrides[key] = True
        index += 1
    return overrides


# --------------------------------------------------------------------------- views
def _add_views(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="JSONL or parquet dataset")
    parser.add_argument("--out", required=True, help="folder for the PNG pairs")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")


def _run_views(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from vopd.views import write_view_pairs

    written = write_view_pairs(args.dataset, args.out, limit=args.limit, overrides=overrides)
    print(f"wrote {written} student/teacher pairs to {args.out}")
    return 0


# --------------------------------------------------------------------------- progress
class TqdmProgress(ProgressCallback):
    """Shows a library job's progress as a tqdm bar with ETA and the latest headline metrics."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: tqdm | None = None

    def on_start(self, *, total: int, start: int, unit: str) -> None:
        self.bar = tqdm(total=total, initial=start, unit=unit, desc=self.description, dynamic_ncols=True)

    def on_progress(self, *, done: int, total: int, metrics: dict[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(done - self.bar.n)
        if metrics:
            shown = {k: metrics[k] for k in ("loss", "argmax_agreement", "response_length") if k in metrics}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def on_log(self, message: str, *, level: str = "info") -> None:
        (self.bar.write if self.bar else print)(f"[{level}] {message}")

    def on_end(self, *, status: str, result: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- train
_RUN_FLAGS = ("model", "dataset", "output", "steps", "epochs", "seed", "lr", "batch_size", "report_to")


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON TrainConfig; flags below and --group.field overrides win")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    parser.add_argument(
        "--preset",
        "--recipe",
        dest="preset",
        help="start from a named recipe: paper (the official run), tiny-world (reproduction), tiny-cpu (CPU demo)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        help=(
            "launch N training processes (one per device) with torchrun; runtime.strategy ddp unless the config "
            "says fsdp. batch_size stays the prompts per micro-batch of the whole job, shared by the N processes"
        ),
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=(
            "print the fully resolved config and its memory plan (key 'plan': per-device bytes by term, whether it "
            "fits, the smallest changes that make it fit; read from the model's config.json, no weight is loaded) as "
            "one JSON object, a short table on stderr, and exit (nothing is written)"
        ),
    )
    parser.add_argument(
        "--device-memory",
        dest="device_memory",
        metavar="SIZE",
        help="memory of each device to plan for, e.g. 80GiB (default: the first visible GPU's, else the host's)",
    )
    parser.add_argument(
        "--prompt-tokens",
        dest="prompt_tokens",
        type=int,
        metavar="N",
        help="plan with prompts of N tokens, images included (default: the processor's or views.max_pixels' limit)",
    )
    parser.add_argument(
        "--require-fit",
        dest="require_fit",
        action="store_true",
        help="plan the memory first and exit with status 3, before anything loads, when the plan does not fit",
    )
    parser.add_argument("--model", help="model folder (any AutoModelForImageTextToText)")
    parser.add_argument("--dataset", help="JSONL or parquet dataset (answers are never read)")
    parser.add_argument("--output", help="run folder: checkpoints/step-N/, final/, metrics.jsonl")
    parser.add_argument("--steps", type=int, help="total optimizer steps (also the target when resuming)")
    parser.add_argument("--epochs", type=float, help="passes over the dataset instead of --steps")
    parser.add_argument("--seed", type=int, help="run seed (data order, rollouts)")
    parser.add_argument("--lr", type=float, help="peak learning rate (paper 2e-6; tiny models ~1e-4)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="prompts per micro-batch")
    parser.add_argument(
        "--report-to",
        dest="report_to",
        metavar="TRACKERS",
        help="also log metrics to experiment trackers: tensorboard, mlflow, wandb (comma-separated; none by default)",
    )
    parser.epilog = (
        "Any other TrainConfig field by its dotted name, e.g. --divergence.alpha 0.3 --teacher.mode fixed "
        "--rollout.num_rollouts 2 --lora.enabled true --runtime.dtype bfloat16."
    )


def resolve_names(config: Any, fields: Sequence[str] = ("model", "dataset"), *, strict: bool = True) -> Any:
    """The config with service names (``tiny``, ``job-3/final``, ``synth-64``) replaced by the paths they stand for
    in VOPD_HOME (``vopd.home``), so the commands the studio shows run as shown; existing paths stay as they are.
    ``strict=False`` (a dry run, which loads nothing) leaves what resolves to nothing as it is."""
    from vopd.home import names_hint, resolve_dataset_name, resolve_model_name, vopd_home

    home = vopd_home()
    resolvers = {"model": resolve_model_name, "dataset": resolve_dataset_name}
    updates: dict[str, str] = {}
    for field in fields:
        value = getattr(config, field, None)
        if not value:
            continue
        path = resolvers[field](value, home)
        if path is None and not strict:
            continue
        if path is None:
            raise CliError(
                f"--{field} {value!r}: no such file or folder, and no {field} of that name; {names_hint(home)}"
            )
        if str(path) != value:
            updates[field] = str(path)
    return config.model_copy(update=updates) if updates else config


def _flag_overrides(args: argparse.Namespace, names: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    merged.update(overrides)
    return merged


def _run_train(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from vopd.config import TrainConfig, load_config
    from vopd.trainer import train

    config = load_config(TrainConfig, args.config, _flag_overrides(args, _RUN_FLAGS, overrides), preset=args.preset)
    config = resolve_names(config, strict=not args.dry_run)
    plan = _memory_plan(args, config) if args.dry_run or args.require_fit else None
    table = plan.pop("table", None) if plan is not None else None
    if args.dry_run:
        import json

        print(json.dumps({**config.model_dump(mode="json"), "plan": plan}))
        prompts = config.batch_size * config.grad_accum
        print(
            f"prompts per step: {prompts} (batch_size {config.batch_size} x grad_accum {config.grad_accum}); "
            f"rollouts per step: {prompts * config.rollout.num_rollouts}",
            file=sys.stderr,
        )
    if plan is not None:
        print(table or f"no memory plan: {plan.get('error')}", file=sys.stderr)
        if args.require_fit and plan.get("fits") is not True:
            reason = "it does not fit" if plan.get("fits") is False else f"it could not be made ({plan.get('error')})"
            print(f"--require-fit: the memory plan says {reason}; nothing was loaded", file=sys.stderr)
            return 3
    if args.dry_run:
        return 0
    if config.output is None:
        raise CliError("--output is required (the run folder)")
    if args.nproc is not None:
        return _launch_ranks(args, config)
    result = train(config, callbacks=[TqdmProgress("train")], resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 speaks for the job
    if result.stopped:
        print(f"stopped at step {result.step}/{result.total_steps}; resume with --resume")
        return 1
    print(f"final model: {result.final_dir}")
    return 0


def _memory_plan(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """The memory plan of ``config`` as the dry run prints it (``vopd.memory_plan``), or ``{"fits": None, "error"}``
    when the model's config.json cannot be read. Nothing is loaded: the model is read from its config alone."""
    from vopd.memory_plan import format_table, parse_size, plan_memory, read_model_shape, visible_device_memory

    visible_type, visible_bytes, source = visible_device_memory()
    if args.device_memory is not None:
        try:
            device_memory = parse_size(args.device_memory)
        except ValueError as error:
            raise CliError(f"--device-memory: {error}") from None
        source = "--device-memory"
    else:
        device_memory = visible_bytes
    device_type = config.runtime.device if config.runtime.device in ("cpu", "cuda") else None
    if device_type is None:  # auto: a GPU when one is visible, or when a device's memory is given to plan for
        device_type = "cuda" if visible_type == "cuda" or args.device_memory is not None else "cpu"
    world_size = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    device = {"type": device_type, "memory_bytes": device_memory, "memory_source": source, "world_size": world_size}
    try:
        shape = read_model_shape(config.model)
    except (OSError, ValueError, KeyError) as error:
        return {"fits": None, "error": str(error), "device": device}
    plan = plan_memory(
        shape,
        config,
        world_size=world_size,
        device_type=device_type,
        device_memory=device_memory,
        prompt_tokens=args.prompt_tokens,
    )
    return {**plan.to_dict(), "model": shape.to_dict(), "device": device, "table": format_table(plan, shape)}


def _launch_ranks(args: argparse.Namespace, config: Any) -> int:
    """Run this very command in ``--nproc`` processes under torchrun (a free local port, one node)."""
    import subprocess

    if args.nproc < 1:
        raise CliError("--nproc must be at least 1")
    if config.batch_size % args.nproc:
        raise CliError(
            f"--batch-size {config.batch_size} must be a multiple of --nproc {args.nproc}: the processes share each "
            "micro-batch's prompts"
        )
    argv = list(args.argv)
    index = next(i for i, token in enumerate(argv) if token == "--nproc" or token.startswith("--nproc="))
    del argv[index : index + (1 if "=" in argv[index] else 2)]
    if config.runtime.strategy == "single":
        argv += ["--runtime.strategy", "ddp"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "vopd.cli",
        *argv,
    ]
    returncode = subprocess.run(command, check=False).returncode
    if returncode:
        raise CliError(f"the {args.nproc} training processes failed (exit {returncode}); each rank's error is above")
    return 0


# --------------------------------------------------------------------------- eval
def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON EvalConfig")
    parser.add_argument("--model", help="model folder")
    parser.add_argument("--dataset", help="JSONL or parquet dataset with answers")
    parser.add_argument(
        "--benchmark",
        help=(
            "a published suite instead of --dataset: vstar, zoombench, hrbench-4k, hrbench-8k, mme-realworld(-cn, "
            "-lite), mmstar, pope-adversarial, pope-popular, pope-random, cv-bench, mmvp, visualprobe"
        ),
    )
    parser.add_argument("--data", help="the benchmark's local folder, in its published layout")
    parser.add_argument("--output", help="per-item JSONL records")
    parser.add_argument("--limit", type=int, help="only the first N samples")
    parser.epilog = (
        "Other EvalConfig fields by dotted name, e.g. --full_view plain --views.upscale 3. A benchmark is asked on "
        "the full image with the official prompt (--prompt project for ours), on its crops too where it ships them "
        "(--crops false to skip), and prints accuracy per category; --judge.url URL --judge.model NAME adds an LLM "
        "judge (key in VOPD_JUDGE_API_KEY) (docs/benchmarks.md)."
    )


def _run_eval(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import json

    from vopd.config import EvalConfig, load_config
    from vopd.evaluate import evaluate

    flags = _flag_overrides(args, ("model", "dataset", "benchmark", "data", "output", "limit"), overrides)
    config = load_config(EvalConfig, args.config, flags)
    config = resolve_names(config, ("model", "dataset") if config.dataset else ("model",))
    result = evaluate(config, callbacks=[TqdmProgress("eval")])
    if config.benchmark is not None:
        from vopd.benchmarks import format_summary_table

        print(format_summary_table(result.summary))
    print(json.dumps(result.summary))
    return 0


# --------------------------------------------------------------------------- inspect
def _add_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or checkpoint")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True)
    parser.add_argument("--options", help="comma-separated options, e.g. red,green,blue,yellow")
    parser.add_argument(
        "--bbox", default=None, help="x0,y0,x1,y1 in pixels; without it the model searches for its own crop"
    )
    parser.add_argument("--json", action="store_true", help="print the full records as JSON instead of a table")
    parser.epilog = "Also --alpha, --greedy false, --max_new_tokens N, --show_topk K, --views.upscale 3 ..."


def _run_inspect(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from vopd.config import InspectConfig, load_config
    from vopd.data import decode_image

    bbox = None
    if args.bbox is not None:
        try:
            bbox = [float(v) for v in args.bbox.split(",")]
        except ValueError as error:
            raise CliError(f"--bbox must be four numbers x0,y0,x1,y1, got {args.bbox!r}") from error
    if "alpha" in overrides:
        overrides["divergence.alpha"] = overrides.pop("alpha")
    values: dict[str, Any] = {"model": args.model, "question": args.question, "bbox": bbox}
    if args.options:
        values["options"] = [o.strip() for o in args.options.split(",") if o.strip()]
    config = load_config(InspectConfig, None, {**values, **overrides})
    config = resolve_names(config, ("model",))
    from vopd.token_inspection import inspect_sample

    result = inspect_sample(config, decode_image(Path(args.image)))
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    print(format_inspect_table(result))
    return 0


def format_inspect_table(result: Any) -> str:
    """A per-token table for a terminal: the divergence column is what the UI colours."""
    lines = []
    evidence = getattr(result, "evidence", None)
    if evidence is not None:
        confidence = "" if evidence.confidence is None else f", confidence {evidence.confidence:.3f}"
        box = ", ".join(f"{value:g}" for value in evidence.box)
        lines.append(f"teacher's crop: [{box}] ({evidence.source}{confidence})")
    lines += [
        f"student: {result.student_text!r} (choice {result.student_choice})",
        f"teacher: {result.teacher_answer!r} (choice {result.teacher_choice})",
        f"alpha={result.alpha}  mean divergence={result.mean_divergence:.4f}",
        "",
        f"{'pos':>3}  {'token':<12} {'p_S':>6} {'p_T':>6} {'div':>7} {'H_S':>5} {'H_T':>5} agree  "
        "student top-3 | teacher top-3",
    ]
    for record in result.tokens:
        top_s = " ".join(f"{t.token!r}:{t.prob:.2f}" for t in record.student_top[:3])
        top_t = " ".join(f"{t.token!r}:{t.prob:.2f}" for t in record.teacher_top[:3])
        lines.append(
            f"{record.position:>3}  {record.token!r:<12} {record.student_prob:6.3f} {record.teacher_prob:6.3f} "
            f"{record.divergence:7.4f} {record.student_entropy:5.2f} {record.teacher_entropy:5.2f} "
            f"{'yes' if record.argmax_agree else 'NO ':<5}  {top_s} | {top_t}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- synth
def _add_synth(parser: argparse.ArgumentParser) -> None:
    # Optional knobs default to None so SynthConfig's defaults stay the single source of truth.
    parser.add_argument("--output", required=True, help="folder for data.jsonl, images/ and README.md")
    parser.add_argument("--n", type=int, required=True, help="number of items")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical dataset")
    parser.add_argument("--size", type=int, default=None, help="canvas side in px (default 112)")
    parser.add_argument("--box-size", type=int, default=None, help="evidence box side in px (default 24)")
    parser.add_argument("--distractors", default=None, metavar="MIN,MAX", help="distractor count (default 12,20)")
    parser.add_argument("--target-size", default=None, metavar="MIN,MAX", help="target radius in px (default 5,7)")
    parser.add_argument("--backgrounds", default=None, metavar="DIR", help="folder of photos to draw on")
    parser.add_argument("--question", choices=["color", "shape", "both"], default=None, help="default color")
    parser.add_argument("--id-prefix", default=None, help="item ids are PREFIX-00001... (default syn)")
    parser.add_argument(
        "--no-box",
        dest="no_box",
        action="store_true",
        default=None,
        help="box-free world: the question names the target, the only black object, and asks its shape; the box "
        "is kept as hidden_bbox",
    )
    parser.add_argument(
        "--no-box-target-size",
        default=None,
        metavar="MIN,MAX",
        help="box-free world: radius of the black target in px (default 5,10)",
    )


def _run_synth(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import json

    from pydantic import ValidationError

    from vopd.synth import SynthConfig, answer_summary, format_validation_error, generate_dataset

    fields = (
        "n",
        "seed",
        "size",
        "box_size",
        "distractors",
        "target_size",
        "backgrounds",
        "question",
        "id_prefix",
        "no_box",
        "no_box_target_size",
    )
    try:
        config = SynthConfig(**{name: getattr(args, name) for name in fields if getattr(args, name) is not None})
    except ValidationError as error:
        raise CliError(format_validation_error(error)) from error
    data_path = generate_dataset(args.output, config, progress=sys.stderr.isatty())
    with data_path.open(encoding="utf-8") as lines:
        summary = answer_summary(json.loads(line) for line in lines)
    print(data_path)
    print(summary)
    return 0


# --------------------------------------------------------------------------- tiny (vopd.tiny)
def _add_tiny(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="tiny_action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="write a random-weight tiny VLM with the benchmark's tokenizer")
    build.add_argument("--output", required=True, help="model folder to write")
    build.add_argument(
        "--arch",
        choices=["qwen2_vl", "qwen3_5"],
        default="qwen2_vl",
        help="qwen2_vl (the tiny world's base) or qwen3_5 (the paper's architecture, 0.3M parameters)",
    )
    build.add_argument("--size", choices=["5m", "20m"], default="5m", help="qwen2_vl: about 4.7M or 20M parameters")
    build.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    build.add_argument(
        "--vllm-shape",
        action="store_true",
        help="qwen3_5: a shape vLLM's CPU backend runs (head dim 64, linear-attention head dim 128, bf16 weights)",
    )
    pretrain = actions.add_parser("pretrain", help="deterministic supervised pretraining of the tiny base model")
    pretrain.add_argument("--output", required=True, help="run folder; the fp16 base model lands in OUTPUT/model")
    pretrain.add_argument("--seed", type=int, default=0, help="weights and data seed (0 rebuilds the shipped base)")
    pretrain.add_argument("--eval-items", type=int, default=400, help="held-out items evaluated after each stage")
    pretrain.add_argument("--stop-after", default=None, help="stop after this stage (e.g. crops; see vopd.tiny)")
    pretrain.add_argument(
        "--world",
        choices=["box", "no_box"],
        default="box",
        help="box: the shipped tiny-base; no_box: the box-free world's base (vopd/assets/tiny-nobox)",
    )
    parser.epilog = "A rerun of pretrain with the same --output skips the stages already finished."


def _run_tiny(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import json

    from vopd.tiny import build_tiny, pretrain

    if args.tiny_action == "build":
        if args.arch == "qwen3_5":
            from vopd.tiny_models import build_tiny_qwen35

            print(build_tiny_qwen35(args.output, seed=args.seed, vllm_shape=args.vllm_shape))
        else:
            print(build_tiny(args.output, size=args.size, seed=args.seed))
        return 0
    result = pretrain(
        args.output,
        seed=args.seed,
        eval_items=args.eval_items,
        stop_after=args.stop_after,
        world=args.world,
        callbacks=[TqdmProgress("pretrain")],
    )
    for stage, summary in result.evaluations.items():
        print(json.dumps({"stage": stage, **{k: summary[k] for k in ("full_accuracy", "crop_accuracy", "gap")}}))
    if (result.model_dir / "config.json").is_file():
        print(f"model: {result.model_dir} ({result.seconds / 60:.1f} min)")
    return 0


# --------------------------------------------------------------------------- reproduce (vopd.reproduce)
def _add_reproduce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="experiment folder (a rerun finishes what is missing)")
    parser.add_argument("--quick", action="store_true", help="reduced run for CI: one seed, 60 steps, 200 eval items")
    parser.add_argument(
        "--arms", default="default", help="default (opd, sft, no_privilege), all, or a comma-separated list"
    )
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per arm (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per arm (default 300; quick 60)")
    parser.add_argument("--eval-items", type=int, default=None, help="items per evaluation set (default 400)")
    parser.add_argument("--train-items", type=int, default=None, help="items in the unlabelled training split")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of every arm, SFT included (1e-4)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step, every arm (default 16)")
    parser.add_argument("--rollouts", type=int, default=None, help="rollouts per prompt, OPD arms (default 1)")
    parser.add_argument(
        "--rollout-engine",
        choices=["hf", "vllm"],
        default="hf",
        help="what samples the OPD arms' rollouts (default hf; vllm needs the vllm extra, docs/rollouts.md)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel arms, one thread each (default: CPU count)")
    parser.add_argument("--base", default=None, help="base model folder (default: the shipped tiny base)")
    parser.add_argument(
        "--freeze-vision", action="store_true", help="keep the vision encoder frozen in every arm (default: trained)"
    )
    parser.add_argument(
        "--vision-lr-scale", type=float, default=None, help="encoder lr = lr x this, every arm (default 0.3)"
    )
    parser.add_argument(
        "--box-free",
        action="store_true",
        help="the box-free world (synth --no-box, base tiny-nobox): arms box_free, true_box, sft, no_privilege",
    )
    parser.add_argument(
        "--search-strategy",
        choices=["grid", "zoom"],
        default=None,
        help="--box-free: how the box_free arm and the searched-crop evaluation search (default zoom)",
    )


def _run_reproduce(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import dataclasses
    import json

    from vopd.reproduce import ALL_ARMS, BOX_FREE_ARMS, DEFAULT_ARMS, ReproduceSettings, default_jobs, reproduce

    settings = ReproduceSettings.quick() if args.quick else ReproduceSettings()
    default_arms = BOX_FREE_ARMS if args.box_free else DEFAULT_ARMS
    arms = {"default": default_arms, "all": ALL_ARMS}.get(args.arms) or tuple(
        arm.strip() for arm in args.arms.split(",") if arm.strip()
    )
    changes: dict[str, Any] = {
        "arms": arms,
        "jobs": args.jobs or default_jobs(),
        "box_free": args.box_free,
        "rollout_engine": args.rollout_engine,
    }
    if args.search_strategy is not None:
        changes["search_strategy"] = args.search_strategy
    if args.freeze_vision:
        changes["freeze_vision_tower"] = True
    if args.vision_lr_scale is not None:
        if args.vision_lr_scale <= 0:
            raise CliError("--vision-lr-scale must be positive")
        changes["vision_lr_scale"] = args.vision_lr_scale
    if args.lr is not None:
        if args.lr <= 0:
            raise CliError("--lr must be positive")
        changes["lr"] = args.lr
    if args.rollouts is not None:
        if args.rollouts < 1:
            raise CliError("--rollouts must be at least 1")
        changes["num_rollouts"] = args.rollouts
    for name in ("seeds", "steps", "eval_items", "train_items", "batch_size"):
        if getattr(args, name) is not None:
            if getattr(args, name) < 1:
                raise CliError(f"--{name.replace('_', '-')} must be at least 1")
            changes[name] = getattr(args, name)
    settings = dataclasses.replace(settings, **changes)
    if settings.train_items < settings.steps * settings.batch_size and args.train_items is None:
        settings = dataclasses.replace(settings, train_items=settings.steps * settings.batch_size)
    result = reproduce(args.output, settings, base=args.base, callbacks=[TqdmProgress("reproduce")])
    print(result.table)
    print(json.dumps(result.headline))
    return 0


# --------------------------------------------------------------------------- service (app/, worker/)
def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--no-worker", dest="worker", action="store_false", help="do not start a local worker")
    parser.add_argument("--no-ui", dest="ui", action="store_false", help="API only, no Gradio UI at /ui")
    parser.add_argument(
        "--access-log",
        choices=("off", "errors", "all"),
        default=None,
        help="which requests the access log shows: errors (4xx/5xx, the default, VOPD_ACCESS_LOG), all, or off",
    )
    parser.epilog = "State lives in VOPD_HOME (default ~/.vopd); DATABASE_URL and REDIS_URL point elsewhere."


def _run_serve(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from app.serve import serve

    return serve(args.host, args.port, start_worker=args.worker, ui=args.ui, access_log=args.access_log)


def _add_worker(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", help="queue to consume (default VOPD_QUEUE or 'vopd'; one per GPU type)")
    parser.add_argument(
        "--gpus",
        type=int,
        help="devices this worker may give one job (default: the CUDA devices it sees, else 1); it takes jobs of "
        "up to this many (resources.gpus) and runs their processes with torchrun (on a CPU: gloo processes)",
    )
    group = parser.add_argument_group(
        "node group", "several machines that run one job together: start a worker on each with the same --queue"
    )
    group.add_argument("--nodes", type=int, help="machines in this worker's group (VOPD_NODES; default 1)")
    group.add_argument(
        "--node-rank", type=int, help="this machine's place, 0 .. nodes-1; 0 takes the jobs (VOPD_NODE_RANK)"
    )
    group.add_argument("--master-addr", help="machine 0's address as the others reach it (VOPD_MASTER_ADDR)")
    group.add_argument("--master-port", type=int, help="the group's rendezvous port on machine 0 (VOPD_MASTER_PORT)")
    parser.add_argument("--loglevel", default="INFO", help="Celery log level")


def _run_worker(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import os

    from worker.main import run_worker

    if args.gpus is not None and not 1 <= args.gpus <= 64:
        raise CliError("--gpus must be between 1 and 64")
    # The node group's settings travel as the environment the worker's settings (and its pool processes) read.
    for flag in ("nodes", "node_rank", "master_addr", "master_port"):
        if getattr(args, flag) is not None:
            os.environ[f"VOPD_{flag.upper()}"] = str(getattr(args, flag))
    from app.settings import get_settings

    get_settings()  # a bad group (node rank beyond the nodes, say) fails here, before Celery starts
    return run_worker(args.queue, args.loglevel, gpus=args.gpus)


def _add_apikey(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Each key is an account: jobs and datasets belong to the key that made them. create prints a new key as "
        "its last line; list shows every key (id, prefix, name, admin, revoked); revoke ID_OR_PREFIX refuses the "
        "key everywhere at once and ends its studio sessions (its jobs and datasets stay); signin-link [ID_OR_PREFIX] "
        "prints a one-time link that signs a browser in to the studio (the local key when no key is named). Reads "
        "DATABASE_URL / VOPD_HOME like the server."
    )
    parser.add_argument(
        "action",
        choices=["create", "list", "revoke", "signin-link"],
        help="create: make a new key and print it (last line); list; revoke ID_OR_PREFIX; signin-link [ID_OR_PREFIX]",
    )
    parser.add_argument(
        "target",
        nargs="?",
        metavar="ID_OR_PREFIX",
        help="revoke, signin-link: the key's id or its prefix as list shows it (vopd_AbC123)",
    )
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="signin-link: the server's address as the browser reaches it"
    )
    parser.add_argument("--name", default="user", help="who the key is for; jobs and datasets belong to the key")
    parser.add_argument(
        "--admin", action="store_true", help="create: the key may list and revoke every key over HTTP (/api/keys)"
    )


def _run_apikey(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from app.auth import (
        KeyNotFound,
        create_api_key,
        create_signin_code,
        find_api_key,
        list_api_keys,
        resolve_api_key,
        revoke_api_key,
    )
    from app.db import make_engine, make_session_factory, run_migrations, session_scope
    from app.settings import get_settings

    if args.action == "revoke" and not args.target:
        raise CliError("revoke needs the key's id or prefix (see `vopd apikey list`)")
    if args.action not in ("revoke", "signin-link") and args.target:
        raise CliError(f"unrecognized arguments: {args.target}")
    settings = get_settings()
    engine = make_engine(settings)
    try:
        run_migrations(engine, settings)
        with session_scope(make_session_factory(engine)) as session:
            if args.action == "create":
                _, key = create_api_key(session, args.name, admin=args.admin)
                role = "admin " if args.admin else ""
                print(f"{role}API key for {args.name!r} (shown once; send as 'Authorization: Bearer <key>'):")
                print(key)
            elif args.action == "list":
                print(f"{'id':>4}  {'prefix':<12}  {'admin':<5}  {'revoked':<7}  {'created (UTC)':<16}  name")
                for row in list_api_keys(session):
                    print(
                        f"{row.id:>4}  {row.prefix:<12}  {'yes' if row.admin else '':<5}  "
                        f"{'yes' if row.revoked else '':<7}  {row.created_at:%Y-%m-%d %H:%M}  {row.name}"
                    )
            elif args.action == "signin-link":
                try:
                    if args.target:
                        row = resolve_api_key(session, args.target)
                    else:
                        local = settings.local_key_file
                        key = local.read_text().strip() if local.is_file() else ""
                        row = find_api_key(session, key) if key else None
                        if row is None:
                            raise KeyNotFound(f"no live local key in {local}: name a key (see `vopd apikey list`)")
                    if row.revoked:
                        raise KeyNotFound(f"key {row.id} ({row.prefix}) is revoked")
                except KeyNotFound as error:
                    raise CliError(str(error)) from error
                _, code = create_signin_code(session, row, settings.signin_code_ttl_s)
                minutes = settings.signin_code_ttl_s / 60
                print(f"one-time sign-in link for {row.name!r} (good once, for {minutes:g} minutes):")
                print(f"{args.url.rstrip('/')}/signin?code={code}")
            else:
                try:
                    row = revoke_api_key(session, args.target)
                except KeyNotFound as error:
                    raise CliError(str(error)) from error
                print(f"revoked key {row.id} ({row.prefix}, {row.name!r}): it is refused everywhere from now on")
    finally:
        engine.dispose()
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler, bool]] = {
    # name: (help, add_arguments, run, accepts dotted config overrides)
    "views": ("write each sample's student and teacher views as PNG", _add_views, _run_views, True),
    "train": ("train a model with Vision-OPD (label-free)", _add_train, _run_train, True),
    "eval": ("full-image vs crop accuracy and the gap", _add_eval, _run_eval, True),
    "inspect": ("per-token student vs teacher divergence on one image", _add_inspect, _run_inspect, True),
    "synth": ("generate the synthetic fine-detail benchmark (deterministic by seed)", _add_synth, _run_synth, False),
    "tiny": ("build or pretrain the tiny offline VLM (tiny build / tiny pretrain)", _add_tiny, _run_tiny, False),
    "reproduce": ("the toy-scale Vision-OPD experiment: arms x seeds", _add_reproduce, _run_reproduce, False),
    "serve": ("API + UI + a local worker on embedded defaults", _add_serve, _run_serve, False),
    "worker": ("a Celery worker for queued jobs (one at a time)", _add_worker, _run_worker, False),
    "apikey": ("create, list or revoke API keys; print a sign-in link", _add_apikey, _run_apikey, False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vopd",
        description="Vision-OPD: on-policy self-distillation for fine-detail vision-language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc` runs this same command in N processes
    if args.command is None:
        parser.print_help()
        return 0
    _, _, run, accepts_overrides = COMMANDS[args.command]
    try:
        if extra and not accepts_overrides:
            raise CliError(f"unrecognized arguments: {' '.join(extra)}")
        overrides = parse_dotted_overrides(extra)
        return int(run(args, overrides) or 0)
    except CliError as error:
        print(f"vopd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vopd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # user-facing errors from the library carry their own message
        from pydantic import ValidationError

        if isinstance(error, ValidationError | ValueError | FileNotFoundError):
            print(f"vopd {args.command}: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
