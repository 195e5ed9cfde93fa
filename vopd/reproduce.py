"""`vopd reproduce`: does Vision-OPD close the regional-to-global gap, label-free, at toy scale?

One command runs the toy-scale experiment on the tiny world: evaluate the base on a held-out split and on a
fresh-seed set (full image and crop), train several arms from the same base with the same steps and learning rate,
evaluate each again, and report, per arm and over training seeds, greedy accuracy, mean p(correct option), the
predicted-letter distribution and the share of the gap closed = (full_after - full_before) / (crop_before -
full_before). The arms:

* ``opd``: the default Vision-OPD recipe (forward KL to a fixed crop teacher), label-free; its seed-0 model is kept
  in ``DIR/opd/final``. Every arm shares the run settings (``ReproduceSettings``): 300 steps of 16 prompts, lr 1e-4,
  the vision encoder trained at 0.3x that rate;
* ``sft``: supervised fine-tuning *with labels* on full images, the reference a labelled dataset would give;
* ``no_privilege``: Vision-OPD whose teacher sees the full image instead of the crop. It must gain nothing: the
  evidence that the gain comes from the crop. (Implemented with the dataset's precomputed-crop field, so the
  trainer runs unchanged.)
* with ``--arms all``: ``paper`` (JSD 0.5 with an EMA teacher, the paper's recipe), ``teacher_current`` and
  ``teacher_fixed`` (JSD 0.5) and ``reverse_kl_sampled`` (the sampled-token reverse-KL estimate).

Measured results and why the default differs from the paper's recipe: docs/reproduction.md.

``--box-free`` runs the same experiment in the box-free world (``vopd synth --no-box``, base ``tiny-nobox``): the
question names its target, no box is given, and views show no box and no hint. Arms: ``box_free`` (the default
recipe, label-free and box-free: the teacher's crop is the window the teacher itself is most confident on,
``vopd.evidence``), ``true_box`` (the same recipe given the true boxes), ``sft`` (labels, full images) and
``no_privilege`` (the teacher sees the full image). Crop accuracy there is the oracle crop (the hidden box); the
fresh-seed evaluation also reports the searched crop's accuracy and how often it holds the target.

Arms run in parallel worker processes with one torch thread each; every (arm, seed) writes ``result.json`` when it
finishes, so a rerun of the same command only runs what is missing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from vopd.callbacks import CallbackList, ProgressCallback
from vopd.config import merge_settings, recipe
from vopd.synth import NO_BOX_SEARCH

# Synth seeds of the experiment; pretraining used others (vopd.tiny.PRETRAIN_*), so the base never saw these items.
TRAIN_SEED = 1
FRESH_SEED = 2

# Every OPD arm starts from the tiny-world recipe (vopd.config.RECIPES) and changes only what its name says; the run
# size (steps, lr, prompts, rollouts) comes from ReproduceSettings, whose defaults are that recipe's.
_TINY_WORLD = recipe("tiny-world")
_PAPER = recipe("paper")
ARM_CHANGES: dict[str, dict[str, Any]] = {
    # The default recipe: forward KL (alpha 0) to a fixed teacher. Measured at lr 1e-4 it matched labelled SFT, and a
    # fixed teacher cannot drift; the paper's EMA teacher lost a whole answer letter at lr 3e-4 (docs/reproduction.md).
    "opd": {},
    # The paper's loss and teacher (JSD 0.5, EMA at rate 0.05) on the tiny world's run size.
    "paper": {"divergence": _PAPER["divergence"], "teacher": _PAPER["teacher"]},
    "teacher_current": {"divergence": {"alpha": 0.5}, "teacher": {"mode": "current"}},
    "teacher_fixed": {"divergence": {"alpha": 0.5}, "teacher": {"mode": "fixed"}},
    "forward_kl": {"divergence": {"alpha": 0.0}, "teacher": {"mode": "fixed"}},
    "reverse_kl_sampled": {"divergence": {"mode": "sampled_token", "alpha": 1.0}, "teacher": {"mode": "fixed"}},
}
DEFAULT_ARMS = ("opd", "sft", "no_privilege")
# The box-free world's arms (--box-free): every OPD arm is the default recipe; they differ in where the crop comes from.
BOX_FREE_ARMS = ("box_free", "true_box", "sft", "no_privilege")
# Box-free world: no arm draws a box or adds the box hint, so the arms differ only in the teacher's crop.
_NO_BOX_VIEWS: dict[str, Any] = {"draw_box": False, "hint": ""}
ALL_ARMS = (*DEFAULT_ARMS, "paper", "teacher_current", "teacher_fixed", "reverse_kl_sampled")
# forward_kl = the default recipe under its own name (the screens used it); box_free, true_box: --box-free
KNOWN_ARMS = (*ALL_ARMS, "forward_kl", "box_free", "true_box")


@dataclass(frozen=True)
class ReproduceSettings:
    """The experiment's size; ``quick`` shrinks it for CI."""

    steps: int = _TINY_WORLD["steps"]
    lr: float = _TINY_WORLD["lr"]  # the same for every arm, SFT included
    # 16 prompts x 1 rollout costs what 8 x 2 does and sees twice the images; with forward KL over the top-100 +
    # tail a second rollout of the same prompt adds little (docs/reproduction.md).
    batch_size: int = _TINY_WORLD["batch_size"]  # prompts per step, every arm (SFT: labelled examples per step)
    num_rollouts: int = _TINY_WORLD["rollout"]["num_rollouts"]  # rollouts per prompt, OPD arms
    seeds: int = 3
    train_items: int = 4800  # 300 steps x 16 prompts: every prompt is seen once
    eval_items: int = 400
    arms: tuple[str, ...] = DEFAULT_ARMS
    jobs: int = 2
    # The vision encoder trains in every arm (SFT included): frozen, its 16 image tokens capped full-image accuracy
    # near 0.74; trained at the language model's rate, it forgot the crop (docs/reproduction.md).
    freeze_vision_tower: bool = _TINY_WORLD["freeze_vision_tower"]
    # The encoder's learning rate is lr times this in every arm: 0.3 kept the crop view intact.
    vision_lr_scale: float = _TINY_WORLD["vision_lr_scale"]
    # The box-free world (vopd synth --no-box, base tiny-nobox, arms BOX_FREE_ARMS); the search strategy of its
    # box_free arm and of the searched-crop evaluation (vopd.evidence: grid or zoom).
    box_free: bool = False
    search_strategy: str = "zoom"
    # What samples the OPD arms' rollouts (rollout.engine): hf, or vllm to check that the engine learns the same.
    rollout_engine: str = "hf"

    @classmethod
    def quick(cls) -> ReproduceSettings:
        return cls(steps=60, seeds=1, train_items=960, eval_items=200)


@dataclass
class ReproduceResult:
    output_dir: Path
    base: dict[str, dict[str, Any]]  # eval set -> summary
    arms: dict[str, list[dict[str, Any]]]  # arm -> one result per seed
    table: str
    headline: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- data
def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def prepare_data(data_dir: Path, settings: ReproduceSettings) -> dict[str, Path]:
    """Train split (unlabelled and labelled copies), held-out split of the same seed, fresh-seed set, and the
    no-privilege copy of the train split whose 'crop' is the student's own full view."""
    from vopd.config import ViewConfig
    from vopd.data import load_dataset
    from vopd.synth import SynthConfig, generate_dataset
    from vopd.views import student_view

    paths = {
        "train": data_dir / "train_unlabelled.jsonl",
        "train_labelled": data_dir / "train_labelled.jsonl",
        "heldout": data_dir / "heldout.jsonl",
        "fresh": data_dir / "fresh" / "data.jsonl",
        "no_privilege": data_dir / "train_no_privilege.jsonl",
    }
    if settings.box_free:
        paths["train_true_box"] = data_dir / "train_true_box.jsonl"
    if all(path.is_file() for path in paths.values()):
        return paths
    no_box = settings.box_free
    split_dir = data_dir / "split"
    all_items = generate_dataset(
        split_dir, SynthConfig(n=settings.train_items + settings.eval_items, seed=TRAIN_SEED, no_box=no_box)
    )
    records = [json.loads(line) for line in all_items.read_text(encoding="utf-8").splitlines()]
    for record in records:
        record["image"] = f"split/{record['image']}"
    train, heldout = records[: settings.train_items], records[settings.train_items :]
    _write_jsonl(paths["train_labelled"], train)
    _write_jsonl(paths["train"], [{k: v for k, v in record.items() if k != "answer"} for record in train])
    _write_jsonl(paths["heldout"], heldout)
    generate_dataset(
        paths["fresh"].parent, SynthConfig(n=settings.eval_items, seed=FRESH_SEED, id_prefix="fresh", no_box=no_box)
    )
    if no_box:  # the true-box arm: the hidden box given as the box (still never drawn: views.draw_box false)
        _write_jsonl(
            paths["train_true_box"],
            [
                {**{k: v for k, v in r.items() if k not in ("answer", "hidden_bbox")}, "bbox": r["hidden_bbox"]}
                for r in train
            ],
        )

    full_views_dir = data_dir / "no_privilege_views"
    full_views_dir.mkdir(parents=True, exist_ok=True)
    no_privilege = []
    views = ViewConfig(**_NO_BOX_VIEWS) if no_box else ViewConfig()
    for sample, record in zip(load_dataset(paths["train"]), train, strict=True):
        view_path = full_views_dir / f"{sample.id}.png"
        student_view(sample, views).image.save(view_path)
        no_privilege.append(
            {
                **{k: v for k, v in record.items() if k not in ("answer", "hidden_bbox")},
                "crop_image": f"no_privilege_views/{view_path.name}",
            }
        )
    _write_jsonl(paths["no_privilege"], no_privilege)
    return paths


# --------------------------------------------------------------------------- one arm
def _evaluate_sets(
    model_dir: Path, data: dict[str, Path], settings: ReproduceSettings | None = None
) -> dict[str, dict[str, Any]]:
    """Held-out and fresh-seed accuracy. Box-free world: the plain full image, the oracle crop (hidden box) and, on
    the fresh set, the crop the model's own search chooses."""
    from vopd.config import EvalConfig, RuntimeConfig
    from vopd.evaluate import evaluate
    from vopd.models import load_model_and_processor

    loaded = load_model_and_processor(model_dir, RuntimeConfig(device="cpu", dtype="float32"))
    box_free = settings is not None and settings.box_free
    results = {}
    for name in ("heldout", "fresh"):
        extra: dict[str, Any] = {}
        if box_free:
            views = {**_NO_BOX_VIEWS, **NO_BOX_SEARCH, "search_strategy": settings.search_strategy}  # type: ignore[union-attr]
            extra = {"views": views, "searched_crop": name == "fresh"}
        config = EvalConfig(model=str(model_dir), dataset=str(data[name]), batch_size=50, **extra)
        results[name] = evaluate(config, loaded=loaded).summary
    return results


def train_sft(
    base: Path,
    dataset: Path,
    output: Path,
    *,
    steps: int,
    seed: int,
    lr: float,
    batch_size: int,
    freeze_vision_tower: bool = True,
    vision_lr_scale: float = 1.0,
    callbacks=(),
) -> Path:
    """Supervised fine-tuning with labels on the student's full view: same optimizer, data order, steps and
    learning rate as the OPD arms (and the same frozen or trainable vision tower), only the target differs."""
    import torch

    from vopd.config import RuntimeConfig, TrainConfig
    from vopd.data import load_dataset
    from vopd.models import load_model_and_processor, optimizer_param_groups
    from vopd.tiny import supervised_loss
    from vopd.trainer import DataOrder
    from vopd.views import student_view

    defaults = TrainConfig(model="-", dataset="-", steps=1)  # weight decay, clip, views: as in OPD
    events = CallbackList(callbacks)
    samples = load_dataset(dataset)
    if any(sample.answer_letter is None for sample in samples):
        raise ValueError(f"{dataset}: SFT needs an answer on every sample")
    order = DataOrder(len(samples), seed)
    torch.manual_seed(seed)
    loaded = load_model_and_processor(
        base,
        RuntimeConfig(device="cpu", dtype="float32"),
        freeze_vision_tower=freeze_vision_tower,
        trainable=True,
    )
    parameters = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(loaded.model, lr, vision_lr_scale), lr=lr, weight_decay=defaults.weight_decay
    )
    events.on_start(total=steps, start=0, unit="step")
    metrics_path = output / "metrics.jsonl"
    output.mkdir(parents=True, exist_ok=True)
    with metrics_path.open("w", encoding="utf-8") as metrics_log:
        for step in range(steps):
            batch = [samples[order.index(step * batch_size + i)] for i in range(batch_size)]
            loss = supervised_loss(
                loaded, [student_view(s, defaults.views) for s in batch], [s.answer_letter or "" for s in batch]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, defaults.grad_clip)
            optimizer.step()
            metrics_log.write(json.dumps({"step": step + 1, "loss": float(loss.detach())}) + "\n")
            events.on_progress(done=step + 1, total=steps, metrics={"loss": float(loss.detach())})
    final = output / "final"
    loaded.model.save_pretrained(final)
    loaded.processor.save_pretrained(final)
    events.on_end(status="succeeded", result={"final_dir": str(final)})
    return final


def arm_train_config(arm: str, base: Path, data: dict[str, Path], output: Path, seed: int, settings: ReproduceSettings):
    """The TrainConfig of an OPD arm (no_privilege = the default recipe on the full-view-teacher dataset). In the
    box-free world every arm is the default recipe without a drawn box or hint: box_free searches for its crop,
    true_box cuts it from the true box."""
    from vopd.config import TrainConfig

    dataset = {"no_privilege": "no_privilege", "true_box": "train_true_box"}.get(arm, "train")
    run = {
        "model": str(base),
        "dataset": str(data[dataset]),
        "output": str(output),
        "steps": settings.steps,
        "seed": seed,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "rollout": {"num_rollouts": settings.num_rollouts, "engine": settings.rollout_engine},
        "freeze_vision_tower": settings.freeze_vision_tower,
        "vision_lr_scale": settings.vision_lr_scale,
        "save_every": settings.steps,
        "keep_checkpoints": 1,
    }
    if settings.box_free:
        evidence = "search" if arm == "box_free" else "box"
        run["views"] = {
            **_NO_BOX_VIEWS,
            **NO_BOX_SEARCH,
            "evidence": evidence,
            "search_strategy": settings.search_strategy,
        }
    changes = ARM_CHANGES["opd" if arm in ("no_privilege", "box_free", "true_box") else arm]
    values = merge_settings(_TINY_WORLD, changes, run)
    return TrainConfig.model_validate(values)


class _WarningLog(ProgressCallback):
    """Keeps the trainer's warnings (the collapse guard's) so the experiment can report them per run."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def on_log(self, message: str, *, level: str = "info") -> None:
        if level == "warning":
            self.warnings.append(message)


def run_arm(
    arm: str, seed: int, base: Path, data: dict[str, Path], run_dir: Path, settings: ReproduceSettings
) -> dict[str, Any]:
    """Train one arm for one seed and evaluate it; runs in a worker process with one torch thread."""
    import torch

    torch.set_num_threads(1)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    started = time.perf_counter()
    if run_dir.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(run_dir)
    guard = _WarningLog()  # stays empty for SFT, which has no teacher to probe
    if arm == "sft":
        final = train_sft(
            base,
            data["train_labelled"],
            run_dir,
            steps=settings.steps,
            seed=seed,
            lr=settings.lr,
            batch_size=settings.batch_size,
            freeze_vision_tower=settings.freeze_vision_tower,
            vision_lr_scale=settings.vision_lr_scale,
        )
    else:
        from vopd.trainer import train

        final = train(arm_train_config(arm, base, data, run_dir, seed, settings), callbacks=[guard]).final_dir
        assert final is not None
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimizer states: 3x the model, not needed
    result = {
        "arm": arm,
        "seed": seed,
        "steps": settings.steps,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "num_rollouts": settings.num_rollouts,
        "freeze_vision_tower": settings.freeze_vision_tower,
        "vision_lr_scale": settings.vision_lr_scale,
        "model": str(final),
        "guard_warnings": guard.warnings,
        "evidence": _evidence_summary(run_dir / "metrics.jsonl"),
        "eval": _evaluate_sets(final, data, settings),
        "seconds": time.perf_counter() - started,
    }
    result_path.write_text(json.dumps(result, indent=2))
    return result


def _evidence_summary(metrics_path: Path) -> dict[str, float]:
    """Mean training-time search metrics of a box-free run (empty for other arms)."""
    if not metrics_path.is_file():
        return {}
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line]
    summary = {}
    for key in ("evidence/confidence", "evidence/centre_hit", "evidence/iou", "evidence_time"):
        values = [row[key] for row in rows if key in row]
        if values:
            summary[key] = statistics.fmean(values)
    return summary


# --------------------------------------------------------------------------- the experiment
def _run_dir(output: Path, arm: str, seed: int) -> Path:
    return output / "opd" if (arm == "opd" and seed == 0) else output / "runs" / f"{arm}-seed{seed}"


def reproduce(
    output_dir: str | Path,
    settings: ReproduceSettings | None = None,
    *,
    base: str | Path | None = None,
    callbacks: Sequence[ProgressCallback] = (),
) -> ReproduceResult:
    """Run (or finish) the experiment in ``output_dir``; returns the per-arm results, the table and the headline."""
    from vopd.tiny import shipped_base_model_dir, shipped_no_box_model_dir

    settings = settings or ReproduceSettings()
    unknown = set(settings.arms) - set(KNOWN_ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; known: {', '.join(KNOWN_ARMS)}")
    events = CallbackList(callbacks)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    shipped = shipped_no_box_model_dir() if settings.box_free else shipped_base_model_dir()
    source = Path(base) if base is not None else shipped
    if not (source / "config.json").is_file():
        raise ValueError(f"{source} holds no model; build one with `vopd tiny pretrain`")
    base_dir = output / "base"
    if not (base_dir / "config.json").is_file():
        shutil.copytree(source, base_dir, dirs_exist_ok=True)
    settings_path = output / "settings.json"
    recorded = {**settings.__dict__, "base": str(source.resolve())}
    if settings_path.is_file():  # finished runs are reused: they must have been made the same way
        previous = json.loads(settings_path.read_text())
        fixed = (
            "steps",
            "lr",
            "batch_size",
            "num_rollouts",
            "train_items",
            "eval_items",
            "base",
            "freeze_vision_tower",
            "vision_lr_scale",
            "box_free",
            "search_strategy",
        )
        # experiments recorded before these options existed: 8 prompts x 2 rollouts, frozen tower, one rate
        legacy = {
            "batch_size": 8,
            "num_rollouts": 2,
            "freeze_vision_tower": True,
            "vision_lr_scale": 1.0,
            "box_free": False,
            "search_strategy": "zoom",
        }
        changed = [
            f"{key} {previous.get(key, legacy.get(key))} -> {recorded[key]}"
            for key in fixed
            if previous.get(key, legacy.get(key)) != recorded[key]
        ]
        if changed:
            raise ValueError(
                f"{output} holds an experiment made with other settings ({'; '.join(changed)}): use another --output"
            )
    settings_path.write_text(json.dumps(recorded, indent=2))
    events.on_log("writing the data splits")
    data = prepare_data(output / "data", settings)

    base_path = output / "base_eval.json"
    if base_path.is_file():
        base_eval = json.loads(base_path.read_text())
    else:
        events.on_log("evaluating the base model")
        base_eval = _evaluate_sets(base_dir, data, settings)
        base_path.write_text(json.dumps(base_eval, indent=2))

    jobs = [(arm, seed) for seed in range(settings.seeds) for arm in settings.arms]
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in settings.arms}
    events.on_start(total=len(jobs), start=0, unit="run")
    # spawn, not fork: a forked child inherits torch's thread pools and any lock held at fork time.
    with ProcessPoolExecutor(max_workers=max(1, settings.jobs), mp_context=get_context("spawn")) as pool:
        futures = {}
        for arm, seed in jobs:
            run_dir = _run_dir(output, arm, seed)
            future = pool.submit(run_arm, arm, seed, base_dir, data, run_dir, settings)
            futures[future] = (arm, seed)
        for done, future in enumerate(as_completed(futures), start=1):
            arm, seed = futures[future]
            result = future.result()
            results[arm].append(result)
            fresh = result["eval"]["fresh"]
            events.on_log(
                f"{arm} seed {seed}: fresh full {fresh['full_accuracy']:.3f} crop {fresh['crop_accuracy']:.3f} "
                f"({result['seconds'] / 60:.1f} min)"
            )
            warnings = result.get("guard_warnings", [])
            if warnings:
                more = f" (+{len(warnings) - 1} more in result.json)" if len(warnings) > 1 else ""
                events.on_log(f"{arm} seed {seed}: collapse guard: {warnings[0]}{more}", level="warning")
            events.on_progress(done=done, total=len(jobs), metrics=None)
    for arm_results in results.values():
        arm_results.sort(key=lambda r: r["seed"])

    rows = summarize_arms(base_eval, results)
    table = format_table(base_eval, rows)
    headline = box_free_headline(rows, base_eval) if settings.box_free else headline_numbers(rows, settings)
    (output / "results.json").write_text(json.dumps({"base": base_eval, "arms": rows, "headline": headline}, indent=2))
    (output / "table.md").write_text(table + "\n")
    events.on_end(status="succeeded", result=headline)
    return ReproduceResult(output, base_eval, results, table, headline)


# --------------------------------------------------------------------------- numbers
def gap_closed(full_before: float, full_after: float, crop_before: float) -> float:
    """(full_after - full_before) / (crop_before - full_before); NaN when there is no gap to close."""
    gap = crop_before - full_before
    return (full_after - full_before) / gap if gap > 0 else float("nan")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _letters_total(summaries: Sequence[dict[str, Any]], key: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for summary in summaries:
        for letter, count in summary[key].items():
            total[letter] = total.get(letter, 0) + count
    return dict(sorted(total.items()))


def summarize_arms(base_eval: dict[str, dict[str, Any]], results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per arm and eval set: mean and std over seeds of accuracies, p(correct), gap closed; summed letters."""
    rows: dict[str, Any] = {}
    for arm, arm_results in results.items():
        if not arm_results:
            continue
        rows[arm] = {
            "seeds": [r["seed"] for r in arm_results],
            "guard_warned_seeds": [r["seed"] for r in arm_results if r.get("guard_warnings")],
        }
        for set_name, before in base_eval.items():
            after = [r["eval"][set_name] for r in arm_results]
            entry: dict[str, Any] = {}
            for key in ("full_accuracy", "crop_accuracy", "full_p_correct", "crop_p_correct"):
                entry[key], entry[f"{key}_std"] = _mean_std([a[key] for a in after])
            for key in ("searched_accuracy", "searched_centre_hit"):
                if all(key in a for a in after):
                    entry[key], entry[f"{key}_std"] = _mean_std([a[key] for a in after])
            closed = [gap_closed(before["full_accuracy"], a["full_accuracy"], before["crop_accuracy"]) for a in after]
            entry["gap_closed"], entry["gap_closed_std"] = _mean_std(closed)
            entry["full_gain"] = entry["full_accuracy"] - before["full_accuracy"]
            entry["crop_change"] = entry["crop_accuracy"] - before["crop_accuracy"]
            entry["full_letters"] = _letters_total(after, "full_letters")
            entry["crop_letters"] = _letters_total(after, "crop_letters")
            rows[arm][set_name] = entry
    return rows


def headline_numbers(rows: dict[str, Any], settings: ReproduceSettings) -> dict[str, Any]:
    """The default recipe on the fresh-seed set, against the experiment's goal (gap closed >= 30%, crop loss <= 3
    points, >= 70% of labelled SFT's gain)."""
    if "opd" not in rows:
        return {}
    opd = rows["opd"]["fresh"]
    base_full = opd["full_accuracy"] - opd["full_gain"]
    base_crop = opd["crop_accuracy"] - opd["crop_change"]
    headline: dict[str, Any] = {
        "eval_set": "fresh",
        "seeds": len(rows["opd"]["seeds"]),
        "steps": settings.steps,
        "full_before": round(base_full, 4),
        "full_after": round(opd["full_accuracy"], 4),
        "crop_before": round(base_crop, 4),
        "crop_after": round(opd["crop_accuracy"], 4),
        "gap_closed": round(opd["gap_closed"], 4),
        "gap_closed_std": round(opd["gap_closed_std"], 4),
        "heldout_gap_closed": round(rows["opd"]["heldout"]["gap_closed"], 4),
    }
    if "sft" in rows:
        sft = rows["sft"]["fresh"]
        headline["sft_gap_closed"] = round(sft["gap_closed"], 4)
        headline["sft_gap_closed_std"] = round(sft["gap_closed_std"], 4)
        ratio = opd["full_gain"] / sft["full_gain"] if sft["full_gain"] > 0 else float("nan")
        headline["opd_vs_sft_gain"] = round(ratio, 4)
    if "no_privilege" in rows:
        headline["no_privilege_gap_closed"] = round(rows["no_privilege"]["fresh"]["gap_closed"], 4)
    headline["goal_met"] = bool(
        opd["gap_closed"] >= 0.30
        and -opd["crop_change"] <= 0.03
        and headline.get("opd_vs_sft_gain", float("nan")) >= 0.70
    )
    return headline


def box_free_headline(rows: dict[str, Any], base_eval: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The box-free experiment on the fresh-seed set, against its goal: the box-free arm closes at least 60% of what
    the true-box arm closes, loses at most 3 points of (oracle) crop accuracy, and the no-privilege control gains
    nothing (at most 0.05 of the gap)."""
    fresh = base_eval["fresh"]
    headline: dict[str, Any] = {
        "eval_set": "fresh",
        "world": "no_box",
        "full_before": round(fresh["full_accuracy"], 4),
        "crop_before": round(fresh["crop_accuracy"], 4),
    }
    if "searched_accuracy" in fresh:
        headline["searched_before"] = round(fresh["searched_accuracy"], 4)
        headline["searched_centre_hit_before"] = round(fresh["searched_centre_hit"], 4)
    for arm in ("box_free", "true_box", "sft", "no_privilege"):
        if arm in rows:
            entry = rows[arm]["fresh"]
            headline[f"{arm}_gap_closed"] = round(entry["gap_closed"], 4)
            headline[f"{arm}_gap_closed_std"] = round(entry["gap_closed_std"], 4)
            headline[f"{arm}_full_after"] = round(entry["full_accuracy"], 4)
            headline[f"{arm}_crop_drop"] = round(-entry["crop_change"], 4)
    if "box_free" in rows:
        headline["seeds"] = len(rows["box_free"]["seeds"])
    if "box_free" in rows and "true_box" in rows:
        true_box = rows["true_box"]["fresh"]["gap_closed"]
        ratio = rows["box_free"]["fresh"]["gap_closed"] / true_box if true_box > 0 else float("nan")
        headline["box_free_vs_true_box"] = round(ratio, 4)
        headline["goal_met"] = bool(
            ratio >= 0.60
            and headline["box_free_crop_drop"] <= 0.03
            and headline.get("no_privilege_gap_closed", 0.0) <= 0.05
        )
    return headline


def _pm(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f}±{std:.{digits}f}"


def format_table(base_eval: dict[str, dict[str, Any]], rows: dict[str, Any]) -> str:
    """A Markdown table: one line per arm, fresh-seed numbers first (the held-out gap closed beside them)."""
    fresh, heldout = base_eval["fresh"], base_eval["heldout"]
    searched = ""
    if "searched_accuracy" in fresh:
        searched = (
            f"; fresh searched crop {fresh['searched_accuracy']:.3f} (holds the target's centre "
            f"{fresh['searched_centre_hit']:.0%})"
        )
    lines = [
        f"base: fresh full {fresh['full_accuracy']:.3f} crop {fresh['crop_accuracy']:.3f} "
        f"p(correct) full {fresh['full_p_correct']:.3f}; held-out full {heldout['full_accuracy']:.3f} "
        f"crop {heldout['crop_accuracy']:.3f}{searched}",
        "",
        "| arm | seeds | full acc (fresh) | crop acc (fresh) | p(correct) full | gap closed fresh | "
        "gap closed held-out | full letters (fresh) | collapse guard warned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in rows.items():
        f, h = row["fresh"], row["heldout"]
        letters = " ".join(f"{k}:{v}" for k, v in f["full_letters"].items())
        warned = row.get("guard_warned_seeds", [])
        guard = ", ".join(f"seed {seed}" for seed in warned) if warned else "-"
        lines.append(
            f"| {arm} | {len(row['seeds'])} | {_pm(f['full_accuracy'], f['full_accuracy_std'])} | "
            f"{_pm(f['crop_accuracy'], f['crop_accuracy_std'])} | {_pm(f['full_p_correct'], f['full_p_correct_std'])} "
            f"| {_pm(f['gap_closed'], f['gap_closed_std'], 2)} | {_pm(h['gap_closed'], h['gap_closed_std'], 2)} | "
            f"{letters} | {guard} |"
        )
    return "\n".join(lines)


def default_jobs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))
