"""One configuration model per job kind, shared by the CLI, the REST API and the worker.

Every knob of Vision-OPD (arXiv 2605.18740) is a documented field. The defaults are the paper's loss, teacher and
optimizer settings sized for one device; the official run as a whole (96 prompts x 8 rollouts, 1024 tokens, warm-up,
trained encoder, one epoch) is the ``paper`` recipe in ``RECIPES``, and docs/fidelity.md compares every knob.
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


# Upper bounds that say what is sane: far above any real run (the paper's is 96 prompts x 8 rollouts x 1024 tokens,
# one epoch of 65 steps), far below what would exhaust a machine before the first step or overflow a counter. A value
# beyond one is refused with the bound named, instead of a job that grows to gigabytes and dies.
MAX_STEPS = 1_000_000  # optimizer steps, warm-up, checkpoint and probe intervals
MAX_EPOCHS = 1000.0
MAX_BATCH = 1024  # prompts per micro-batch (train) or decoded together (eval)
MAX_GRAD_ACCUM = 1024  # micro-batches per optimizer step
MAX_LR = 0.1  # AdamW diverges far below this on any model (the paper: 2e-6; the tiny model: 1e-4)
MAX_TEMPERATURE = 100.0
MAX_VOCAB = 1_000_000  # top-k of the divergence: no tokenizer comes close
MAX_IMAGE_SIDE = 16384  # pixels
MAX_SAMPLES = 10_000_000  # eval limit
MAX_SEED = 2**63 - 1


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
        28,
        ge=1,
        le=MAX_IMAGE_SIDE,
        description="The upscaled crop's shorter side is raised to at least this (one vision patch group).",
    )
    max_crop_side: int = Field(
        1344, ge=1, le=MAX_IMAGE_SIDE, description="The upscaled crop's longer side is capped at this."
    )
    max_pixels: int | None = Field(
        None,
        ge=28 * 28,
        le=MAX_IMAGE_SIDE**2,
        description=(
            "Downscale the student's full image (aspect kept) to at most this many pixels before the processor; "
            "None (the official run) leaves the image to the processor's own pixel limit. 1003520 (= 1280 x 28 x 28, "
            "about 1 MP) caps a Qwen2-VL image at 1280 image tokens."
        ),
    )
    # Box-free training (vopd.evidence): without an evidence box the teacher's crop is the window the model itself
    # answers most confidently, so Vision-OPD runs on plain VQA data (question, options, image).
    evidence: Literal["auto", "box", "search"] = Field(
        "auto",
        description=(
            "Where the teacher's crop comes from: box = the sample's evidence box (or precomputed crop); search = the "
            "window of a grid the teacher is most confident on, label-free (the student then sees the full image "
            "with no drawn box and no hint); auto = box when the sample has a box or crop, search when it has none."
        ),
    )
    search_windows: list[float] = Field(
        default_factory=lambda: [0.5, 0.25],
        min_length=1,
        max_length=4,
        description=(
            "Search: window sides as fractions of the image's shorter side, one per zoom level; each window is "
            "cropped and upscaled like the box crop (padding, upscale, min/max crop side)."
        ),
    )
    search_overlap: float = Field(
        0.5,
        ge=0.0,
        le=0.9,
        description="Search: neighbouring windows overlap by this fraction of their side (stride = side x (1 - it)).",
    )
    search_refresh_steps: int = Field(
        50,
        ge=1,
        le=MAX_STEPS,
        description=(
            "Search: a sample's chosen crop is cached and searched again once it is this many steps old, as the "
            "teacher moves (a fixed teacher always chooses the same crop). The cache is saved in checkpoints."
        ),
    )
    search_strategy: Literal["grid", "zoom"] = Field(
        "grid",
        description=(
            "Search: grid = score every window of every zoom level; zoom = score the first level, then only the next "
            "level's windows inside the best window so far (a ZoomEye-like descent: 18 instead of 58 candidates on "
            "the tiny world's 112 px canvas)."
        ),
    )
    search_batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="Search: candidate crops scored together.")
    search_max_new_tokens: int = Field(
        8, ge=1, le=256, description="Search: greedy tokens decoded per candidate to reach the answer letter."
    )

    @model_validator(mode="after")
    def _sides(self) -> ViewConfig:
        if self.min_crop_side > self.max_crop_side:
            raise ValueError("min_crop_side must not exceed max_crop_side")
        for side in self.search_windows:
            if not 0.0 < side <= 1.0:
                raise ValueError(f"search_windows are fractions of the image's shorter side in (0, 1], got {side}")
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
        100,
        ge=0,
        le=MAX_VOCAB,
        description="Compare distributions on the student's top-k tokens (0 = the full vocabulary).",
    )
    add_tail: bool = Field(True, description="Add one bucket holding the probability mass outside the top-k.")
    mode: Literal["full_logits", "sampled_token"] = Field(
        "full_logits",
        description=(
            "full_logits: differentiate the divergence itself; sampled_token: policy gradient with the per-token "
            "advantage log p_T(y) - log p_S(y) at the sampled token (reverse-KL estimate)."
        ),
    )
    temperature: float = Field(
        1.0, gt=0.0, le=MAX_TEMPERATURE, description="Both logits are divided by this before the softmax."
    )
    is_clip: float | None = Field(
        2.0,
        gt=0.0,
        le=1000.0,
        description=(
            "Clip of the importance weight p_current/p_behaviour for tokens sampled by an older policy "
            "(gradient accumulation, several rollouts); None disables it."
        ),
    )
    from_hidden_states: bool = Field(
        True,
        description=(
            "Compute the full_logits loss and its metrics from the final hidden states and the LM head, a few "
            "hundred positions at a time, so that neither side's (batch, response, vocabulary) logits are ever built "
            "(gigabytes at a 150k vocabulary); same values up to rounding. The trainer falls back to the logits where "
            "it cannot: sampled_token mode, a trust_region teacher, or a head that is not a plain linear layer."
        ),
    )


class TeacherConfig(_Strict):
    """Which weights score the crop view. The teacher is never differentiated."""

    mode: Literal["ema", "current", "fixed", "trust_region", "progressive"] = Field(
        "ema",
        description=(
            "ema: exponential moving average of the student (paper); current: the student's own weights under "
            "no grad; fixed: the initial weights (with LoRA: the adapter disabled); trust_region: logits mixed as "
            "(1 - c) initial + c current with c = trust_region_mix; progressive: the initial weights, replaced by a "
            "copy of the student every sync_every steps."
        ),
    )
    ema_rate: float = Field(
        0.05, gt=0.0, le=1.0, description="EMA update theta_T <- (1 - r) theta_T + r theta_S after every step."
    )
    trust_region_mix: float = Field(
        0.05, ge=0.0, le=1.0, description="trust_region: weight c of the current student's logits in the mix."
    )
    sync_every: int = Field(
        10, ge=1, le=MAX_STEPS, description="progressive: copy the student into the teacher every N steps."
    )


class VllmConfig(_Strict):
    """The colocated vLLM engine's settings (``rollout.engine: vllm``); each training process owns one engine."""

    gpu_memory_utilization: float = Field(
        0.7,
        gt=0.0,
        le=1.0,
        description=(
            "Share of the GPU's memory the engine may take for its weights and KV cache (the official run's 0.7); "
            "the trainer's model, gradients and optimizer state need the rest. Ignored on CPU."
        ),
    )
    max_model_len: int | None = Field(
        None,
        ge=64,
        le=1_048_576,
        description=(
            "Longest prompt + response the engine accepts. None = rollout.max_new_tokens + 4096 (room for a prompt "
            "with a 1-2 megapixel image), capped by the model's own limit."
        ),
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=64,
        le=4_194_304,
        description=(
            "Tokens the engine schedules per step. None = max(max_model_len, 16384). On CPU a prefill split over two "
            "steps breaks seeded sampling, so keep it above the tokens of all prompts sampled at once there."
        ),
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "GPUs each engine spreads its weights over (1 = one engine per training process; must be 1 under ddp and "
            "fsdp, where each process owns an engine on its own device)."
        ),
    )
    sleep: bool = Field(
        True,
        description=(
            "On GPU: put the engine to sleep between rollout phases (weights to CPU memory, KV cache freed), so "
            "training gets the memory back; woken for the weight sync and the sampling. No effect on CPU."
        ),
    )
    enforce_eager: bool = Field(
        False,
        description="Decode without CUDA graphs (slower; less memory and start-up time). Always eager on CPU.",
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse a prompt's KV cache across its rollouts (reset after every weight sync)."
    )


RolloutEngineName = Literal["auto", "hf", "vllm"]


class RolloutConfig(_Strict):
    """How the student samples its own answers on the full image."""

    engine: RolloutEngineName = Field(
        "auto",
        description=(
            "What samples the rollouts: hf = the student itself through transformers' generate (the CPU default); "
            "vllm = a colocated vLLM engine whose weights are synced from the student after every optimizer step "
            "(install the `vllm` extra); auto = vllm when it is installed and the device is a CUDA GPU, else hf."
        ),
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="Settings of the vllm engine.")
    num_rollouts: int = Field(4, ge=1, le=64, description="Rollouts sampled per prompt.")
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Longest response sampled.")
    share_prompt_pass: bool = Field(
        True,
        description=(
            "Run the student's prompts once, with gradient, and let both the sampling and the scoring start from "
            "that forward's KV cache, instead of once for each (same values; one process or DDP, grad_accum 1, "
            "full-attention models without dropout). Off: the prompts' activations are not held while sampling."
        ),
    )


class LoraConfig(_Strict):
    """Low-rank adapters through peft; disabled means a full fine-tune of the language model."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of the full weights.")
    rank: int = Field(16, ge=1, le=4096, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0.0, le=65536.0, description="LoRA scaling alpha (effective scale alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            # Qwen3.5's linear-attention layers (3 in 4) name their projections differently.
            "in_proj_qkv",
            "in_proj_z",
            "out_proj",
        ],
        description="Module names to adapt (the language model's attention and MLP projections by default).",
    )


class CollapseGuardConfig(_Strict):
    """A probe set answered every N steps to catch letter collapse and teacher drift (see vopd.guard)."""

    enabled: bool = Field(True, description="Probe the student and the teacher during training.")
    every: int = Field(
        25, ge=1, le=MAX_STEPS, description="Probe every N optimizer steps (and at the start, for the baseline)."
    )
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
Tracker = Literal["tensorboard", "wandb", "mlflow"]
Device = Literal["auto", "cpu", "cuda", "mps"]


MasterDtype = Literal["float32", "compute"]


class RuntimeConfig(_Strict):
    """Where and in which precision the model runs, and how its prompts are rendered; shared by every job kind."""

    dtype: Dtype = Field(
        "auto",
        description=(
            "Compute dtype of forward and backward: auto = bfloat16 on a GPU that has it, float32 on CPU. Inference "
            "jobs load their weights in it; training keeps its weights in master_dtype and computes under autocast."
        ),
    )
    master_dtype: MasterDtype = Field(
        "float32",
        description=(
            "Training only: the dtype of the trainable weights, the optimizer state and the EMA teacher's average. "
            "float32 (the official run's FSDP mixed precision) keeps small updates; 'compute' stores them in the "
            "compute dtype (pure bf16: at lr 2e-6 most updates round away and the EMA teacher barely moves)."
        ),
    )
    device: Device = Field("auto", description="auto = cuda when available, else cpu.")
    strategy: Literal["single", "ddp", "fsdp"] = Field(
        "single",
        description=(
            "Training only: single = one process; ddp = one process per device, each with the whole model "
            "(DistributedDataParallel); fsdp = one process per device, weights, gradients, optimizer state and the "
            "EMA teacher sharded over them (FSDP2). Launch several with `vopd train --nproc N` or torchrun."
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Training only: keep each transformer block's input alone and recompute the block in the backward "
            "(the model's own non-reentrant activation checkpointing, as the official run's "
            "enable_gradient_checkpointing), so the student's activations cost about one hidden vector per token and "
            "layer instead of a dozen; about a third more compute per step. The student's prompts then run twice a "
            "step (rollout.share_prompt_pass needs the KV cache, which checkpointed blocks do not keep)."
        ),
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description=(
            "Training only: the most tokens (prompt + response, image tokens included, padding counted) that one "
            "forward of the student or the teacher may hold, as the official run's ppo_max_token_len_per_gpu (9216). "
            "After sampling, each micro-batch's rows are sorted by length and grouped to fill it, each group padded "
            "only to its own longest response; the loss stays the token-mean over the whole step, so the gradient is "
            "the same. A row longer than the budget runs alone. None = one forward per micro-batch. Sampling is not "
            "split: it runs every row of the micro-batch together."
        ),
    )
    pack_sequences: bool = Field(
        False,
        description=(
            "Training only: run each scoring forward of the student and the teacher over its rows laid end to end, "
            "without the prompts' left padding or the responses' right padding, each row attending only to itself "
            "(position ids that restart per row, no attention mask: transformers' packed-sequence masks, with eager, "
            "sdpa or flash attention). The logits are the padded forward's up to rounding; padding_fraction drops to "
            "0. Full-attention models only (Qwen2/2.5-VL, LLaVA): refused at start for linear-attention or "
            "sliding-window layers (Qwen3.5). The student's prompts then run twice a step (no shared prompt pass). "
            "Sampling stays padded. With eager or sdpa attention (the default) the block-diagonal mask is dense, so "
            "the attention computes every pair of the packed row: measured slower than padded forwards on the CPU; "
            "it pays with flash-attention's variable-length kernel (docs/scaling.md)."
        ),
    )
    offload_optimizer: bool = Field(
        False,
        description=(
            "Training only: keep AdamW's moments, its step and an fp32 copy of each trainable weight on the host; "
            "each step copies the gradients there, steps on the CPU and copies the weights back (as the official "
            "run's optimizer offload). Frees 8 bytes per trainable parameter on the device at the cost of two "
            "transfers per step; results equal the on-device optimizer's. Under fsdp it comes with offload_params "
            "(the state follows the host-held shards)."
        ),
    )
    offload_params: bool = Field(
        False,
        description=(
            "Training only, fsdp: keep the sharded fp32 master weights and their gradients on the host (FSDP2's CPU "
            "offload policy); each block is gathered onto the device for its forward and backward, and AdamW steps "
            "on the host shards, so its state lives there too. Single-process and ddp runs hold whole weights on the "
            "device: there it has no effect (the plan says so). CUDA only in practice: not measured on a CPU run."
        ),
    )
    offload_teacher: bool = Field(
        False,
        description=(
            "Training only: keep the EMA (fixed, progressive) teacher's weights on the host. Under single and ddp "
            "they stream to the device one transformer block at a time for the teacher's forward and are released "
            "after it; the EMA update runs on the host. Under fsdp the teacher's shards use FSDP2's CPU offload "
            "policy. Results equal the on-device teacher's."
        ),
    )
    dist_timeout_s: float = Field(
        600.0,
        gt=0,
        le=86400,
        description="Training across ranks: a collective that waits longer (a rank died or hangs) ends the job.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description=(
            'Extra variables for the chat template of both views, e.g. {"enable_thinking": false}. None = '
            '{"enable_thinking": false} for templates that know the switch (Qwen3, Qwen3.5: the official run\'s '
            "non-thinking prompt), nothing otherwise."
        ),
    )
    chat_template: str | None = Field(
        None,
        description="Path of a Jinja chat template file that replaces the model's own (saved with checkpoints).",
    )

    @model_validator(mode="after")
    def _precision(self) -> RuntimeConfig:
        if self.master_dtype == "compute" and self.dtype == "float16":
            raise ValueError(
                "float16 weights cannot be trained (updates underflow and the loss scaler refuses fp16 gradients): "
                "keep runtime.master_dtype float32 with runtime.dtype float16, or use bfloat16"
            )
        return self

    @model_validator(mode="after")
    def _offload(self) -> RuntimeConfig:
        if self.strategy == "fsdp" and self.offload_optimizer and not self.offload_params:
            raise ValueError(
                "under fsdp AdamW's state lives with the parameter shards: offload it with runtime.offload_params "
                "(FSDP2's CPU offload policy), which moves the shards, their gradients and the optimizer state to the "
                "host together"
            )
        return self


class TrainConfig(_Strict):
    """A Vision-OPD training run. Field names are the CLI flags and the REST job body's keys."""

    model: str = Field(..., min_length=1, description="Model folder (or, in the service, a name from /api/models).")
    dataset: str = Field(..., min_length=1, description="JSONL/parquet file (or, in the service, a dataset id).")
    output: str | None = Field(None, description="Run folder: checkpoints/step-N/, final/, metrics.jsonl.")
    steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Optimizer steps to run (total, also when resuming)."
    )
    epochs: float | None = Field(
        None, gt=0, le=MAX_EPOCHS, description="Alternative to steps: passes over the dataset."
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seeds data order, rollouts and initialisation; runs are reproducible."
    )
    batch_size: int = Field(
        8,
        ge=1,
        le=MAX_BATCH,
        description=(
            "Prompts per micro-batch, each sampled num_rollouts times. Prompts per optimizer step = batch_size x "
            "grad_accum; how a step is split into micro-batches changes memory, not what is sampled or learnt."
        ),
    )
    grad_accum: int = Field(1, ge=1, le=MAX_GRAD_ACCUM, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(
        2e-6,
        gt=0.0,
        le=MAX_LR,
        description="Peak learning rate. 2e-6 is the paper's full fine-tune of a 4B model; tiny models need ~1e-4.",
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        le=MAX_STEPS,
        description=(
            "Linear warm-up from 0 over this many steps (step s uses lr x s / warmup_steps), then constant; "
            "the schedule never depends on the run length, so runs can be extended. The official run uses 10."
        ),
    )
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0.0, le=1e4, description="Global gradient-norm clip.")
    freeze_vision_tower: bool = Field(
        True,
        description="Keep the vision encoder frozen. The official run trains it (the `paper` recipe sets False).",
    )
    vision_lr_scale: float = Field(
        1.0,
        gt=0.0,
        le=10.0,
        description="With a trainable vision encoder, its learning rate is lr times this (keeps the crop view intact).",
    )
    save_every: int = Field(
        50, ge=1, le=MAX_STEPS, description="Checkpoint every N steps (and always at the last step)."
    )
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="Older checkpoints beyond this many are deleted.")
    export_dtype: Literal["master", "float32", "bfloat16", "float16"] = Field(
        "master",
        description=(
            "dtype of the final model folder; master = the training weights' own dtype (float32 by default). "
            "Checkpoints always keep the master dtype, so that resuming is exact."
        ),
    )
    report_to: list[Tracker] = Field(
        default_factory=list,
        description=(
            "Experiment trackers that also receive the run's metrics (the curves the studio plots), as with Hugging "
            "Face trainers: tensorboard (event files in OUTPUT/tensorboard), mlflow (MLFLOW_TRACKING_URI, default a "
            "SQLite store in OUTPUT/mlflow), wandb (WANDB_* settings). None by default; install them with the "
            "`trackers` extra."
        ),
    )
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    views: ViewConfig = Field(default_factory=ViewConfig)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    collapse_guard: CollapseGuardConfig = Field(default_factory=CollapseGuardConfig)

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        """``"tensorboard,mlflow"`` or a list; ``"none"`` (as in Hugging Face's TrainingArguments) means none."""
        if value is None:
            return []
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value
        names = [str(item).strip().lower() for item in items if str(item).strip()]
        return list(dict.fromkeys(name for name in names if name != "none"))

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.steps is None and self.epochs is None:
            raise ValueError("give either steps or epochs")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self


class JudgeConfig(_Strict):
    """An LLM judge behind any OpenAI-compatible endpoint, asked the official Yes/No question about each answer.

    The key is never part of the config (configs are written into job rows and run folders): it is read from the
    VOPD_JUDGE_API_KEY environment variable of the process that runs the evaluation."""

    url: str = Field(
        ...,
        min_length=1,
        pattern=r"^https?://",
        description="The endpoint's base URL, the part before /chat/completions (e.g. http://127.0.0.1:8000/v1).",
    )
    model: str = Field(..., min_length=1, description="The judge model's name at that endpoint.")
    max_tokens: int = Field(256, ge=1, le=8192, description="Longest judge reply (a reasoning judge needs more).")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Seconds one judge request may take.")
    workers: int = Field(8, ge=1, le=64, description="Judge requests in flight at once.")


class EvalConfig(_Strict):
    """Multiple-choice accuracy on full images and on crops: the regional-to-global gap."""

    model: str = Field(..., min_length=1, description="Model folder (or a name from /api/models in the service).")
    dataset: str | None = Field(
        None, min_length=1, description="JSONL/parquet file (or a dataset id in the service); omit with benchmark."
    )
    benchmark: str | None = Field(
        None,
        min_length=1,
        description=(
            "A published suite read in its own layout (vstar, zoombench, hrbench-4k, hrbench-8k, mme-realworld, "
            "mme-realworld-cn, mme-realworld-lite, mmstar, pope-adversarial, pope-popular, pope-random, cv-bench, "
            "mmvp, visualprobe; see vopd.benchmarks): full image, per-category accuracy. None = evaluate `dataset`."
        ),
    )
    data: str | None = Field(
        None,
        min_length=1,
        description="The benchmark's folder (or, in the service, a folder under VOPD_HOME/benchmarks).",
    )
    output: str | None = Field(None, description="Per-item JSONL records are written here when given.")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="Prompts decoded together.")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Greedy decoding length for the answer.")
    limit: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="Evaluate only the first N samples.")
    full_view: Literal["student", "plain"] = Field(
        "student",
        description=(
            "Full-image condition: 'student' = the training view (red box + hint, needed when the question "
            "refers to the box); 'plain' = the bare image and question, as on V* at inference."
        ),
    )
    searched_crop: bool | None = Field(
        None,
        description=(
            "Also answer on the crop the evidence search chooses (vopd.evidence) and report searched_accuracy, with "
            "how often that crop holds the box's centre where a box is known; None = when some sample has no box."
        ),
    )
    prompt: Literal["official", "project"] = Field(
        "official",
        description=(
            "Benchmarks only: 'official' asks each suite's question in the paper's evaluation wording (prompt wording "
            "moves HR-Bench by points); 'project' = our own format (question, 'A. option' lines, one instruction)."
        ),
    )
    crops: bool = Field(
        True,
        description=(
            "Benchmarks only: where a suite ships a crop (ZoomBench) or an evidence box (V* annotations), also answer "
            "on the crop and report crop_accuracy and the gap (crop - full)."
        ),
    )
    judge: JudgeConfig | None = Field(
        None,
        description=(
            "Benchmarks only: also score each full-image answer with an LLM judge (Yes/No, as the paper's evaluation) "
            "and report its accuracy beside the rule-based one, with their agreement. None = rules only."
        ),
    )
    engine: RolloutEngineName = Field(
        "auto",
        description=(
            "What decodes the greedy answers (the dataset's, a suite's and the evidence search's): hf = "
            "transformers' generate (the CPU default); vllm = an in-process vLLM engine (install the `vllm` extra), "
            "whose option probabilities and first-token entropy come from its top-20 log-probs (docs/rollouts.md); "
            "auto = vllm when it is installed and the device is a CUDA GPU, else hf."
        ),
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="Settings of the vllm engine.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    views: ViewConfig = Field(default_factory=ViewConfig)

    @model_validator(mode="after")
    def _source(self) -> EvalConfig:
        # One source of questions: a dataset file (crop vs full, needs boxes) or a published suite (full image only).
        if self.benchmark is None:
            if self.dataset is None:
                raise ValueError("give a dataset, or a benchmark with its data folder")
            if self.data is not None:
                raise ValueError("data is the benchmark's folder: give it together with benchmark")
            return self
        if self.dataset is not None:
            raise ValueError("give either a dataset or a benchmark, not both")
        if self.data is None:
            raise ValueError(f"benchmark {self.benchmark!r} needs data: the folder holding the suite's files")
        return self


class InspectConfig(_Strict):
    """Per-token student-vs-teacher view of one (image, question, box); without a box the teacher's crop is searched
    for (vopd.evidence) and the student sees the plain full image."""

    model: str = Field(..., min_length=1, description="Model folder or checkpoint.")
    question: str = Field(..., min_length=1, description="The question asked about the image.")
    options: list[str] | None = Field(
        None, max_length=26, description="Multiple-choice options, shown as A., B., ... (at most 26: A to Z)."
    )
    bbox: tuple[float, float, float, float] | None = Field(
        None, description="Evidence box [x0, y0, x1, y1] in pixels; None = the model searches for its own crop."
    )
    greedy: bool = Field(True, description="Greedy rollout; otherwise sampled with the temperature and top_p below.")
    temperature: float = Field(1.0, gt=0.0, le=MAX_TEMPERATURE, description="Sampling temperature when not greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus threshold when not greedy.")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Longest rollout.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of a sampled rollout.")
    show_topk: int = Field(10, ge=1, le=100, description="Tokens listed per position for each side.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    views: ViewConfig = Field(default_factory=ViewConfig)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)

    @field_validator("bbox")
    @classmethod
    def _box_order(cls, box: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        if box is None:
            return None
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise ValueError("bbox must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        return box


# ------------------------------------------------------------------------------------------------ recipes
# Named, partial TrainConfigs: the one home of every recipe. `vopd train --preset NAME`, the studio's Train tab, the
# REST job body's "recipe" and `vopd reproduce`'s arms all start from these, merged by `merge_settings`; a config file
# and the command line (or the job's own config) still override them. docs/fidelity.md compares them knob by knob.

# The CPU recipes keep the student's image at about 1 MP (1280 Qwen2-VL image tokens) so a laptop stays responsive.
CPU_MAX_PIXELS = 1280 * 28 * 28

RECIPES: dict[str, dict[str, Any]] = {
    # The official run (scripts/run_vision_opd.sh of the authors' verl fork): 96 prompts x 8 rollouts per step, up to
    # 1024 response tokens at temperature 1, lr 2e-6 constant after 10 warm-up steps from 0, AdamW with weight decay
    # 0.01 and clip 1.0, the whole model trained (encoder included) with fp32 master weights, JSD(0.5) over the
    # student's top-100 + tail, EMA teacher at rate 0.05, truncated importance weights at 2.0, one epoch (65 steps
    # on Vision-OPD-6K). 96 prompts = 8 per micro-batch x 12 micro-batches; split them as memory allows. Its memory
    # settings: activation checkpointing (enable_gradient_checkpointing) and forwards of at most 9216 tokens
    # (use_dynamic_bsz with ppo_max_token_len_per_gpu 9216); the actor's parameters and optimizer state and the
    # reference (teacher) parameters offloaded to the host (param_offload, optimizer_offload, ref param_offload).
    "paper": {
        "epochs": 1,
        "batch_size": 8,
        "grad_accum": 12,
        "lr": 2e-6,
        "warmup_steps": 10,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "freeze_vision_tower": False,
        "vision_lr_scale": 1.0,
        "rollout": {"num_rollouts": 8, "max_new_tokens": 1024, "temperature": 1.0, "top_p": 1.0},
        "divergence": {
            "alpha": 0.5,
            "topk": 100,
            "add_tail": True,
            "mode": "full_logits",
            "temperature": 1.0,
            "is_clip": 2.0,
        },
        "teacher": {"mode": "ema", "ema_rate": 0.05},
        "runtime": {
            "master_dtype": "float32",
            "gradient_checkpointing": True,
            "max_tokens_per_micro_batch": 9216,
            "offload_optimizer": True,
            "offload_params": True,
            "offload_teacher": True,
        },
        "views": {"max_pixels": None},
    },
    # `vopd reproduce`'s default arm on the tiny world (docs/reproduction.md): forward KL (alpha 0) to a fixed crop
    # teacher, lr 1e-4, 16 prompts x 1 rollout per step, 8 response tokens, the vision encoder trained at 0.3x the rate.
    "tiny-world": {
        "steps": 300,
        "batch_size": 16,
        "lr": 1e-4,
        "freeze_vision_tower": False,
        "vision_lr_scale": 0.3,
        "rollout": {"num_rollouts": 1, "max_new_tokens": 8},
        "divergence": {"alpha": 0.0},
        "teacher": {"mode": "fixed"},
        "runtime": {"device": "cpu", "dtype": "float32"},
        "views": {"max_pixels": CPU_MAX_PIXELS},
    },
}
# The CPU demo: the tiny-world recipe cut to a couple of minutes (20 steps of 4 prompts).
RECIPES["tiny-cpu"] = {"steps": 20, "batch_size": 4, "save_every": 10}
RECIPE_BASES: dict[str, str] = {"tiny-cpu": "tiny-world"}  # a recipe written as changes to another one

# Kept for callers of the earlier name.
TRAIN_PRESETS = RECIPES


def merge_settings(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Merge partial configs, later layers winning, nested groups merged key by key.

    ``steps`` and ``epochs`` are two ways of giving one run length: a layer that sets one drops the other from the
    layers below it, so ``--steps 10`` on top of a one-epoch recipe means ten steps rather than a conflict.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        for length, other in (("steps", "epochs"), ("epochs", "steps")):
            if layer.get(length) is not None:
                merged.pop(other, None)
        merged = _merge_two(merged, layer)
    return merged


def _merge_two(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        both_groups = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge_two(merged[key], value) if both_groups else value
    return merged


def recipe(name: str) -> dict[str, Any]:
    """The named recipe as a partial TrainConfig (a fresh dict: callers may change it)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    base = RECIPE_BASES.get(name)
    return merge_settings(recipe(base) if base else None, RECIPES[name])


def apply_preset(data: dict[str, Any], preset: str | None) -> dict[str, Any]:
    """``data`` over the named recipe (nested groups merged key by key); ``data`` itself when no recipe is named."""
    if preset is None:
        return data
    return merge_settings(recipe(preset), data)


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
    """Build a config from an optional recipe, then a file, then dotted overrides (each wins over the last)."""
    dotted: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        set_dotted(dotted, key, value)
    base = recipe(preset) if preset is not None else None
    return config_cls.model_validate(merge_settings(base, read_config_file(path) if path else None, dotted))


# Top-level fields that `vopd train` has a flag of its own for, spelled as that flag (tests pin it to the parser);
# the rest go by their dotted field name (--rollout.num_rollouts). A list flag takes comma-separated values.
CLI_FLAGS: dict[str, str] = {"batch_size": "--batch-size", "report_to": "--report-to"}


def config_to_cli(config: BaseModel, command: str) -> str:
    """The equivalent ``vopd`` command line for a config, listing only non-default fields, each spelled as the
    command spells it (``--batch-size``), so the line runs as shown."""
    default_free = config.model_dump(mode="json", exclude_defaults=True)
    parts = [f"vopd {command}"]

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{name}.", value)
            elif name in CLI_FLAGS:
                rendered = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
                parts.append(f"{CLI_FLAGS[name]} {_shell_quote(rendered)}")
            else:
                rendered = json.dumps(value) if not isinstance(value, str) else value
                parts.append(f"--{name} {_shell_quote(rendered)}")

    walk("", default_free)
    return " ".join(parts)


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
