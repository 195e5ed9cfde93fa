"""One configuration model per job kind, shared by the CLI, the REST API and the worker.

Every knob of Vision-OPD (arXiv 2605.18740) is a documented field whose default is the paper's.
The same JSON body that ``POST /api/jobs`` takes is what ``vopd train --config FILE`` reads, and
each field can be overridden on the command line by its dotted name (``--divergence.alpha 0.3``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PAPER_HINT = "Only focus on the objects inside the red bounding box in the image to answer this question."


class _Strict(BaseModel):
    """Refuse unknown keys: a misspelt knob must be an error, never a silent default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ViewConfig(_Strict):
    """How one sample becomes the student's view (full image) and the teacher's view (crop)."""

    draw_box: bool = Field(True, description="Draw the evidence box on the student's full image, as the paper does.")
    box_color: tuple[int, int, int] = Field((255, 0, 0), description="RGB colour of the drawn box (the hint says red).")
    box_width: int = Field(3, ge=1, le=64, description="Line width of the drawn box in pixels of the original image.")
    hint: str = Field(
        PAPER_HINT,
        description="Sentence appended to the question in both views; empty string disables it.",
    )
    padding: float = Field(
        0.0, ge=0.0, le=4.0, description="Crop padding as a fraction of the box side, added on every side."
    )
    upscale: float = Field(2.0, gt=0.0, le=16.0, description="Factor by which the teacher's crop is enlarged.")
    min_crop_side: int = Field(
        28, ge=1, description="The upscaled crop's shorter side is raised to at least this (one vision patch group)."
    )
    max_crop_side: int = Field(1344, ge=1, description="The upscaled crop's longer side is capped at this.")
    max_pixels: int = Field(
        1280 * 28 * 28,
        ge=28 * 28,
        description="The student's full image is downscaled (aspect kept) to at most this many pixels.",
    )

    @model_validator(mode="after")
    def _sides(self) -> ViewConfig:
        if self.min_crop_side > self.max_crop_side:
            raise ValueError("min_crop_side must not exceed max_crop_side")
        return self


class DivergenceConfig(_Strict):
    """The token-level divergence between teacher and student along the student's rollout."""

    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Generalized JSD interpolation: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher), "
            "0.5 = symmetric JSD (paper)."
        ),
    )
    topk: int = Field(
        100, ge=0, description="Compare distributions on the student's top-k tokens (0 = the full vocabulary)."
    )
    add_tail: bool = Field(True, description="Add one bucket holding the probability mass outside the top-k.")
    mode: Literal["full_logits", "sampled_token"] = Field(
        "full_logits",
        description=(
            "full_logits: differentiate the divergence itself; sampled_token: policy gradient with the per-token "
            "advantage log p_T(y) - log p_S(y) at the sampled token (reverse-KL estimate)."
        ),
    )
    temperature: float = Field(1.0, gt=0.0, description="Both logits are divided by this before the softmax.")
    is_clip: float | None = Field(
        2.0,
        gt=0.0,
        description=(
            "Clip of the importance weight p_current/p_behaviour for tokens sampled by an older policy "
            "(gradient accumulation, several rollouts); None disables it."
        ),
    )


class TeacherConfig(_Strict):
    """Which weights score the crop view. The teacher is never differentiated."""

    mode: Literal["ema", "current", "fixed"] = Field(
        "ema",
        description=(
            "ema: exponential moving average of the student (paper); current: the student's own weights under "
            "no grad; fixed: the initial weights (with LoRA: the adapter disabled)."
        ),
    )
    ema_rate: float = Field(
        0.05, gt=0.0, le=1.0, description="EMA update theta_T <- (1 - r) theta_T + r theta_S after every step."
    )


class RolloutConfig(_Strict):
    """How the student samples its own answers on the full image."""

    num_rollouts: int = Field(4, ge=1, le=64, description="Rollouts sampled per prompt.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Longest response sampled.")


class LoraConfig(_Strict):
    """Low-rank adapters through peft; disabled means a full fine-tune of the language model."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of the full weights.")
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0.0, description="LoRA scaling alpha (effective scale alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names to adapt (language model projections by default).",
    )


class CollapseGuardConfig(_Strict):
    """A probe set answered every N steps to catch letter collapse and teacher drift (see vopd.guard)."""

    enabled: bool = Field(True, description="Probe the student and the teacher during training.")
    every: int = Field(25, ge=1, description="Probe every N optimizer steps (and at the start, for the baseline).")
    probe_size: int = Field(16, ge=1, le=512, description="The first N multiple-choice samples of the dataset.")
    max_new_tokens: int = Field(8, ge=1, le=256, description="Greedy answer length on the probe.")
    min_letter_entropy: float = Field(
        0.5, ge=0.0, le=1.0, description="Warn when the student's normalised answer-letter entropy falls below this."
    )
    min_teacher_stability: float = Field(
        0.85, ge=0.0, le=1.0, description="Warn when a smaller share of teacher probe answers equal its first ones."
    )
    stop_on_collapse: bool = Field(False, description="Checkpoint and stop the run when a warning fires.")


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda", "mps"]


class RuntimeConfig(_Strict):
    """Where the model runs; shared by every job kind."""

    dtype: Dtype = Field("auto", description="Weights dtype: auto = bfloat16 on GPU, float32 on CPU.")
    device: Device = Field("auto", description="auto = cuda when available, else cpu.")


class TrainConfig(_Strict):
    """A Vision-OPD training run. Field names are the CLI flags and the REST job body's keys."""

    model: str = Field(..., min_length=1, description="Model folder (or, in the service, a name from /api/models).")
    dataset: str = Field(..., min_length=1, description="JSONL/parquet file (or, in the service, a dataset id).")
    output: str | None = Field(None, description="Run folder: checkpoints/step-N/, final/, metrics.jsonl.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps to run (total, also when resuming).")
    epochs: float | None = Field(None, gt=0, description="Alternative to steps: passes over the dataset.")
    seed: int = Field(0, ge=0, description="Seeds data order, rollouts and initialisation; runs are reproducible.")
    batch_size: int = Field(8, ge=1, description="Prompts per micro-batch (each sampled num_rollouts times).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(
        2e-6,
        gt=0.0,
        description="Peak learning rate. 2e-6 is the paper's full fine-tune of a 4B model; tiny models need ~1e-4.",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps, then constant (never depends on steps).")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0.0, description="Global gradient-norm clip.")
    freeze_vision_tower: bool = Field(True, description="Keep the vision encoder frozen (paper trains the LLM).")
    vision_lr_scale: float = Field(
        1.0,
        gt=0.0,
        description="With a trainable vision encoder, its learning rate is lr times this (keeps the crop view intact).",
    )
    save_every: int = Field(50, ge=1, description="Checkpoint every N steps (and always at the last step).")
    keep_checkpoints: int = Field(3, ge=1, description="Older checkpoints beyond this many are deleted.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    views: ViewConfig = Field(default_factory=ViewConfig)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    collapse_guard: CollapseGuardConfig = Field(default_factory=CollapseGuardConfig)

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.steps is None and self.epochs is None:
            raise ValueError("give either steps or epochs")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self


class EvalConfig(_Strict):
    """Multiple-choice accuracy on full images and on crops: the regional-to-global gap."""

    model: str = Field(..., min_length=1, description="Model folder (or a name from /api/models in the service).")
    dataset: str = Field(..., min_length=1, description="JSONL/parquet file (or a dataset id in the service).")
    output: str | None = Field(None, description="Per-item JSONL records are written here when given.")
    batch_size: int = Field(16, ge=1, description="Prompts decoded together.")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Greedy decoding length for the answer.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N samples.")
    full_view: Literal["student", "plain"] = Field(
        "student",
        description=(
            "Full-image condition: 'student' = the training view (red box + hint, needed when the question "
            "refers to the box); 'plain' = the bare image and question, as on V* at inference."
        ),
    )
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    views: ViewConfig = Field(default_factory=ViewConfig)


class InspectConfig(_Strict):
    """Per-token student-vs-teacher view of one (image, question, box)."""

    model: str = Field(..., min_length=1, description="Model folder or checkpoint.")
    question: str = Field(..., min_length=1, description="The question asked about the image.")
    options: list[str] | None = Field(None, description="Multiple-choice options, shown as A., B., ...")
    bbox: tuple[float, float, float, float] = Field(..., description="Evidence box [x0, y0, x1, y1] in pixels.")
    greedy: bool = Field(True, description="Greedy rollout; otherwise sampled with the temperature and top_p below.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature when not greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus threshold when not greedy.")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Longest rollout.")
    seed: int = Field(0, ge=0, description="Seed of a sampled rollout.")
    show_topk: int = Field(10, ge=1, le=100, description="Tokens listed per position for each side.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    views: ViewConfig = Field(default_factory=ViewConfig)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)

    @field_validator("bbox")
    @classmethod
    def _box_order(cls, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise ValueError("bbox must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        return box


# Named starting points for a TrainConfig, shared by `vopd train --preset`, the studio's Train tab and scripts.
# A preset is a partial config: the file and the command line still override it.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on a CPU with the shipped tiny base. Its recipe is `vopd reproduce`'s default, the one that worked at
    # toy scale (docs/reproduction.md): forward KL (alpha 0) to a fixed teacher, lr 1e-4, one rollout per prompt,
    # the vision encoder trained at 0.3x the rate.
    "tiny-cpu": {
        "steps": 20,
        "batch_size": 4,
        "lr": 1e-4,
        "freeze_vision_tower": False,
        "vision_lr_scale": 0.3,
        "save_every": 10,
        "rollout": {"num_rollouts": 1, "max_new_tokens": 8},
        "divergence": {"alpha": 0.0},
        "teacher": {"mode": "fixed"},
        "runtime": {"device": "cpu", "dtype": "float32"},
    },
    # The paper's recipe is TrainConfig's defaults (JSD alpha 0.5 over top-100 + tail, EMA teacher 0.05,
    # lr 2e-6 full fine-tune); only the run length, which the paper does not fix per step, is ours.
    "paper": {"steps": 500},
}


def apply_preset(data: dict[str, Any], preset: str | None) -> dict[str, Any]:
    """``data`` over the named preset (nested groups merged key by key)."""
    if preset is None:
        return data
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(TRAIN_PRESETS)}")

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        merged = dict(base)
        for key, value in extra.items():
            both_groups = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = merge(merged[key], value) if both_groups else value
        return merged

    return merge(TRAIN_PRESETS[preset], data)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a plain dict (YAML is a superset of JSON)."""
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def set_dotted(target: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set ``target['a']['b'] = value`` for ``'a.b'``, creating the inner mappings."""
    *parents, leaf = dotted_key.replace("-", "_").split(".")
    node = target
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{dotted_key}: {part} is not a group of settings")
    node[leaf] = value


def parse_override_value(raw: str) -> Any:
    """Interpret a command-line value as YAML so ``0.3``, ``true``, ``null`` and ``[1,2]`` get their types."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load_config(
    config_cls: type[ConfigT],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    preset: str | None = None,
) -> ConfigT:
    """Build a config from an optional preset, then a file, then dotted overrides (each wins over the last)."""
    data: dict[str, Any] = apply_preset(read_config_file(path) if path else {}, preset)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return config_cls.model_validate(data)


def config_to_cli(config: BaseModel, command: str) -> str:
    """The equivalent ``vopd`` command line for a config, listing only non-default fields."""
    default_free = config.model_dump(mode="json", exclude_defaults=True)
    parts = [f"vopd {command}"]

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{name}.", value)
            else:
                rendered = json.dumps(value) if not isinstance(value, str) else value
                parts.append(f"--{name} {_shell_quote(rendered)}")

    walk("", default_free)
    return " ".join(parts)


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
