"""The Vision-OPD loop: student rollout on the full image -> teacher scores it on the crop -> divergence -> step.

One explicit loop that reads top to bottom. Everything the loop depends on is either in the config or in
the checkpoint (weights, optimizer, scheduler, teacher, RNG, step), and both the data order and the
rollout seeds are pure functions of (seed, step), so a resumed run is bit-identical to an uninterrupted
one and ``--resume --steps N`` can extend a finished run. The trainer never reads answers.

A step first samples every micro-batch's rollouts, then scores them: the loss is the token-mean over every response
token of the whole step, so it is the same however the step is split into micro-batches. Each rollout is drawn with
its own seed, a pure function of (seed, step, the prompt's place in the step, rollout index), for the same reason.

Precision follows the official run's FSDP mixed precision: the trainable weights, AdamW's state and the EMA teacher
live in fp32 (``runtime.master_dtype``) while forward and backward run under autocast in ``runtime.dtype`` (bf16 on
a GPU); fp16 compute adds a gradient scaler. A step whose gradient norm is not finite changes nothing (no optimizer
step, no teacher update) and is counted in ``skipped_steps``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vopd import distributed
from vopd.callbacks import CallbackList, ProgressCallback
from vopd.config import TrainConfig
from vopd.data import Sample, load_dataset
from vopd.divergence import distillation_loss, distribution_stats, gather_token_logprobs, hidden_distillation_loss
from vopd.engines import create_rollout_engine
from vopd.evidence import EvidenceCache, evidence_metrics
from vopd.guard import CollapseGuard
from vopd.micro_batches import padded_tokens, select_rollout, split_to_count, token_budget_groups
from vopd.models import (
    LoadedModel,
    image_features_refusal,
    load_model_and_processor,
    optimizer_param_groups,
    repeat_each_row,
    resolve_dtype,
    select_rows,
    vision_tower_module,
    with_image_features,
)
from vopd.offload import HostAdamW
from vopd.rollout import (
    PromptPass,
    RolloutBatch,
    RolloutEngine,
    head_bypass_refusal,
    head_bypassed,
    packing_refusal,
    prompt_pass_refusal,
    response_logits,
)
from vopd.teacher import Teacher, trainable_parameters
from vopd.trackers import tracker_callbacks
from vopd.views import student_view, teacher_view, to_messages

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    step: int
    total_steps: int
    stopped: bool
    last_metrics: dict[str, Any] = field(default_factory=dict)


def derive_seed(seed: int, *parts: int) -> int:
    """A deterministic seed for (run seed, step, micro-batch, ...): the same wherever the run was resumed."""
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**62)
    return value


class DataOrder:
    """An endless, reshuffled-per-epoch stream of sample indices; position g is a pure function of (seed, g)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._permutations: dict[int, list[int]] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, 7, epoch))
            if len(self._permutations) > 2:  # only the current and next epoch are ever needed together
                self._permutations.clear()
            self._permutations[epoch] = torch.randperm(self.size, generator=generator).tolist()
        return self._permutations[epoch][offset]


def total_steps_for(config: TrainConfig, dataset_size: int) -> int:
    if config.steps is not None:
        return config.steps
    assert config.epochs is not None
    return max(1, math.ceil(config.epochs * dataset_size / (config.batch_size * config.grad_accum)))


def warmup_then_constant(warmup_steps: int):
    """Linear warm-up from 0, then constant: step s (0-based) uses lr x min(1, s / warmup_steps), as the official
    run's constant-with-warm-up schedule does (its first step has lr 0). Never needs the total step count, so runs
    can be extended."""

    def factor(step: int) -> float:
        return min(1.0, step / warmup_steps) if warmup_steps else 1.0

    return factor


def latest_checkpoint(output_dir: Path) -> Path | None:
    folder = output_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    steps = [
        (int(path.name.split("-")[1]), path)
        for path in folder.glob("step-*")
        if path.name.split("-")[1].isdigit() and (path / STATE_FILE).exists()
    ]
    return max(steps)[1] if steps else None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fused_adamw(model: nn.Module, distributed: bool) -> dict[str, bool]:
    """``fused=True`` where torch has the one-kernel AdamW for every trainable tensor (CPU or CUDA, floating point).

    The default for-loop AdamW launches ~10 small ops per parameter tensor: on the tiny model its step took 5x the
    fused one's (bench/RESULTS.md), and fused is what Hugging Face's Trainer, so TRL, uses by default. Sharded or
    replicated parameters (DTensor under FSDP; DDP) keep the default implementation."""
    params = [param for param in model.parameters() if param.requires_grad]
    plain = all(type(param) is nn.Parameter for param in params)
    supported = all(param.device.type in ("cpu", "cuda") and param.is_floating_point() for param in params)
    return {"fused": True} if params and plain and supported and not distributed else {}


class OPDTrainer:
    """Holds the loop state (model, teacher, optimizer, scheduler, step) so that it can be checkpointed whole."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        callbacks: Sequence[ProgressCallback] = (),
        resume: bool = False,
        rollout_engine: RolloutEngine | None = None,
    ):
        """``rollout_engine``: an engine made elsewhere for the same model (tests share one vLLM engine between runs);
        the trainer syncs it whole at the start and leaves it open. By default the trainer makes the engine that
        ``rollout.engine`` names and closes it at the end of ``train``."""
        if config.output is None:
            raise ValueError("TrainConfig.output must name the run folder")
        self.config = config
        self.output_dir = Path(config.output)
        self.ranks = distributed.setup(config.runtime.strategy, config.runtime.dist_timeout_s)
        if config.batch_size % self.ranks.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} (prompts per micro-batch, for the whole job) must be a multiple of "
                f"the {self.ranks.world_size} ranks, which share each micro-batch's prompts"
            )
        # Rank 0 alone reports: progress, logs and the cancellation decision (broadcast to the others); it alone feeds
        # the experiment trackers of config.report_to (a missing tracker library fails here, before any work).
        trackers = tracker_callbacks(config.report_to, self.output_dir, config) if self.ranks.is_main else []
        self.callbacks = CallbackList([*callbacks, *trackers] if self.ranks.is_main else ())
        self.samples: list[Sample] = load_dataset(config.dataset)
        if not self.samples:
            raise ValueError(f"{config.dataset}: the dataset is empty")
        self.order = DataOrder(len(self.samples), config.seed)
        self.total_steps = total_steps_for(config, len(self.samples))
        checkpoint = latest_checkpoint(self.output_dir) if resume else None
        if resume and checkpoint is None:
            self.callbacks.on_log(f"no checkpoint in {self.output_dir}; starting from step 0", level="warning")
        if not resume and checkpoint is None and latest_checkpoint(self.output_dir) is not None:
            raise ValueError(f"{self.output_dir} already holds checkpoints: pass --resume or choose another --output")

        torch.manual_seed(config.seed)
        self.loaded = self._load_student(checkpoint)
        # `student` is the model itself (generate, the teacher's copies, parameter names); `trained` is what the
        # loss backpropagates through: the DDP wrapper under ddp, the same (sharded) module otherwise.
        self.student: nn.Module = self.loaded.model
        runtime = config.runtime
        # Outside fsdp the teacher's weights go to the host (vopd.offload): its copy is made without them; under fsdp
        # its shards go there when it is sharded.
        offload_teacher = runtime.offload_teacher and self.ranks.strategy != "fsdp"
        frozen_copy = Teacher.initial_copy(self.student, config.teacher, offload=offload_teacher)
        self.trained: nn.Module = self.student
        if self.ranks.strategy == "fsdp":
            for module, offload in ((self.student, runtime.offload_params), (frozen_copy, runtime.offload_teacher)):
                if module is not None:
                    distributed.shard(module, vision_tower_module(module), offload=offload)
                    distributed.first_forward(module, self._two_token_ids())
        elif self.ranks.strategy == "ddp":
            self.trained = distributed.data_parallel(self.student, self.ranks)
        if runtime.offload_params and self.ranks.strategy != "fsdp":
            self.callbacks.on_log(
                f"runtime.offload_params applies to fsdp's shards: this {self.ranks.strategy} run keeps its weights "
                "on the device"
            )
        if runtime.pack_sequences and (refusal := packing_refusal(self.student)) is not None:
            name = type(self.student).__name__
            raise ValueError(f"runtime.pack_sequences: {name} cannot take packed rows: {refusal}")
        self.teacher = Teacher(
            self.student,
            config.teacher,
            frozen_copy=frozen_copy,
            offload=offload_teacher,
            packed=runtime.pack_sequences,
        )
        self.guard = CollapseGuard(config.collapse_guard, self.samples, config.views)
        # Box-free samples (views.evidence search/auto): the teacher's crop is the window it is most confident on,
        # searched per sample, cached and refreshed every views.search_refresh_steps (vopd.evidence); checkpointed.
        self.evidence = EvidenceCache(config.views)
        if not trainable_parameters(self.student):
            raise ValueError("no trainable parameters: check lora/freeze settings")
        groups = optimizer_param_groups(self.student, config.lr, config.vision_lr_scale)
        self.optimizer: torch.optim.Optimizer
        if runtime.offload_optimizer and self.ranks.strategy != "fsdp":
            # AdamW's state and the step on the host (under fsdp, offload_params moved the shards there instead).
            self.optimizer = HostAdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(
                groups,
                lr=config.lr,
                weight_decay=config.weight_decay,
                **_fused_adamw(self.student, self.ranks.distributed),
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_then_constant(config.warmup_steps))
        # fp16 arithmetic over fp32 masters needs loss scaling (bf16 has fp32's range and does not).
        self.scaler: torch.amp.GradScaler | None = None
        if self.loaded.mixed_precision and self.loaded.compute_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.loaded.device.type)
        self.skipped_steps = 0
        # Importance weights p_S/p_behaviour only mean something when both are the same distribution family:
        # sampling at the divergence's temperature without top-p truncation. (Rollouts here are always fresh,
        # so the weight is ~1 then; with other sampling settings it would be a bias, not a correction.)
        self._behaviour_comparable = (
            config.rollout.temperature == config.divergence.temperature and config.rollout.top_p == 1.0
        )
        # What samples the rollouts (vopd.rollout's seam): the student itself, or a colocated engine synced with it,
        # from the first step on, whole (a resumed student's weights come from its checkpoint).
        self.owns_engine = rollout_engine is None
        self.engine: RolloutEngine = rollout_engine or create_rollout_engine(
            self.student,
            self.loaded,
            config.rollout,
            strategy=self.ranks.strategy,
            seed=config.seed,
            log=self.callbacks.on_log,
        )
        self.initial_sync_s = self.engine.sync(self.student, everything=True)
        if not self.engine.samples_with_the_student:
            synced = f"synced in {self.initial_sync_s:.2f} s"
            self.callbacks.on_log(f"rollouts from the {self.engine.name} engine ({synced})")
        # The loss from hidden states (never the (N, R, V) logits) where it applies; the reason when it does not.
        self.logits_fallback = self._logits_fallback()
        # With no trained weight behind the image features (a frozen vision tower and projector, the default), each
        # view's images go through the encoder once per micro-batch; generate, the teacher and the student reuse them.
        self.shares_image_features = image_features_refusal(self.student) is None
        # Whether a prompt's image features can be repeated for its rollouts (``repeat_each_row``); learnt from the
        # first features the encoder returns, so a family whose features do not split by image is encoded once.
        self.repeats_image_features = True
        # One forward over the student's prompts for both the sampling and the scoring, where it applies.
        self.prompt_pass_refusal = self._prompt_pass_refusal()
        if self.prompt_pass_refusal is not None and config.rollout.share_prompt_pass:
            self.callbacks.on_log(f"the student's prompts run twice a step: {self.prompt_pass_refusal}")
        if self.logits_fallback is not None and config.divergence.from_hidden_states:
            self.callbacks.on_log(f"the loss is computed from full logits: {self.logits_fallback}")
        self.step = 0
        if checkpoint is not None:
            self._load_state(checkpoint)
            self.callbacks.on_log(f"resumed from {checkpoint} at step {self.step}")

    # ------------------------------------------------------------------ setup
    def _load_student(self, checkpoint: Path | None) -> LoadedModel:
        config = self.config
        if checkpoint is not None and not config.lora.enabled:
            return load_model_and_processor(
                checkpoint, config.runtime, freeze_vision_tower=config.freeze_vision_tower, trainable=True
            )
        loaded = load_model_and_processor(
            config.model,
            config.runtime,
            lora=config.lora,
            freeze_vision_tower=config.freeze_vision_tower,
            trainable=True,
        )
        if checkpoint is not None:  # LoRA: base weights from the model, adapter from the checkpoint
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(loaded.model, load_file(checkpoint / "adapter_model.safetensors"))
        return loaded

    def _logits_fallback(self) -> str | None:
        """Why this run scores with full logits instead of hidden states and the LM head (None: it does not)."""
        config = self.config
        if not config.divergence.from_hidden_states:
            return "divergence.from_hidden_states is off"
        if config.divergence.mode != "full_logits":
            return f"divergence mode {config.divergence.mode} reads the sampled tokens' log-probs from the logits"
        if config.teacher.mode == "trust_region":
            return "a trust_region teacher's logits mix two models"
        return head_bypass_refusal(self.student)

    def _prompt_pass_refusal(self) -> str | None:
        """Why the student's prompts run twice a step, once to sample and once to score (None: once, ``PromptPass``)."""
        config = self.config
        if not config.rollout.share_prompt_pass:
            return "rollout.share_prompt_pass is off"
        if not self.engine.samples_with_the_student:
            return f"the rollouts come from the {self.engine.name} engine, not from the student's own forward"
        if self.ranks.strategy == "fsdp":
            return "under FSDP the scoring forward must be the one forward of the sharded model before the backward"
        if config.grad_accum > 1:
            return "with grad_accum above 1 every micro-batch's prompt activations would be held until its scoring"
        if config.runtime.max_tokens_per_micro_batch is not None:
            return "runtime.max_tokens_per_micro_batch: the scoring forwards take groups of the sampled rows"
        if config.runtime.pack_sequences:
            return "runtime.pack_sequences: the scoring forward packs the rows, the sampling's cache is padded"
        if config.runtime.gradient_checkpointing:
            # Checkpointed blocks drop the cache of a forward with gradient (the recompute would write it twice), and
            # holding the prompts' activations through the sampling is what checkpointing exists to avoid.
            return "runtime.gradient_checkpointing: checkpointed blocks keep no KV cache in a forward with gradient"
        return prompt_pass_refusal(self.student)

    def _two_token_ids(self) -> torch.Tensor:
        return torch.full((1, 2), self.loaded.pad_token_id, dtype=torch.long, device=self.loaded.device)

    def _load_state(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint / STATE_FILE, map_location=self.loaded.device, weights_only=False)
        if self.ranks.distributed and not isinstance(self.optimizer, HostAdamW):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.student,
                self.optimizer,
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.teacher.load_state_dict(state["teacher"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("evidence"):
            self.evidence.load_state_dict(state["evidence"])

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        config = self.config
        if self.ranks.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(config.model_dump_json(indent=2))
        metrics_log = self._open_metrics_log()
        self.callbacks.on_start(total=self.total_steps, start=self.step, unit="step")
        last_metrics: dict[str, Any] = {}
        stopped = False
        if self.guard.active and self.step < self.total_steps:
            baseline, _ = self._guard_check()  # the teacher's starting answers, against which drift is measured
            rounded = {key: round(value, 3) for key, value in baseline.items()}
            self.callbacks.on_log(f"collapse guard baseline at step {self.step}: {json.dumps(rounded)}")
        try:
            while self.step < self.total_steps:
                if self.ranks.broadcast_object(self.callbacks.should_stop()):
                    stopped = True
                    break
                # The step's numbers, and the engine rollout.engine resolved to (hf or vllm; auto is decided by the
                # device and what is installed): text, which the trackers leave out and the job page shows.
                last_metrics = {**self.train_step(), "rollout/engine": self.engine.name}
                self.step += 1
                if self.guard.due(self.step):
                    guard_metrics, collapse_stop = self._guard_check()
                    last_metrics.update(guard_metrics)
                    stopped = self.ranks.broadcast_object(collapse_stop)
                if metrics_log is not None:
                    metrics_log.write(json.dumps({"step": self.step, **last_metrics}) + "\n")
                    metrics_log.flush()
                self.callbacks.on_progress(done=self.step, total=self.total_steps, metrics=last_metrics)
                if self.step % config.save_every == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
                if stopped:
                    break
        finally:
            if metrics_log is not None:
                metrics_log.close()
            if self.owns_engine:
                self.engine.close()
        if stopped:
            if latest_checkpoint(self.output_dir) != self._checkpoint_dir(self.step) and self.step > 0:
                self.save_checkpoint()
            self.callbacks.on_log(f"stopped at step {self.step} of {self.total_steps}")
            self.callbacks.on_end(status="stopped", result={"step": self.step})
            return TrainResult(self.output_dir, None, self.step, self.total_steps, True, last_metrics)
        final_dir = self.export_final()
        self.callbacks.on_end(status="succeeded", result={"step": self.step, "final_dir": str(final_dir)})
        return TrainResult(self.output_dir, final_dir, self.step, self.total_steps, False, last_metrics)

    def _with_evidence(self, samples: list[Sample]) -> tuple[list[Sample], dict[str, float]]:
        """``samples`` with their searched crop set where the crop is searched for (by the teacher's weights, cached),
        and the evidence metrics of those samples (empty when every sample has its box)."""
        if not any(self.evidence.needs(sample) for sample in samples):
            return samples, {}
        searched_before = self.evidence.searches
        with self.teacher.scoring() as teacher_module, self.loaded.autocast():
            resolved, chosen = self.evidence.resolve(self.loaded, samples, self.step, model=teacher_module)
        wanted = [sample for sample in samples if self.evidence.needs(sample)]
        metrics = evidence_metrics(wanted, chosen)
        metrics["evidence/searched"] = float(self.evidence.searches - searched_before)
        return resolved, metrics

    def _guard_check(self) -> tuple[dict[str, float], bool]:
        """Probe for letter collapse and teacher drift (vopd.guard); the metrics and whether to stop the run."""
        self.guard.probe, _ = self._with_evidence(list(self.guard.probe))  # box-free probes: the teacher's crop
        with self.teacher.scoring() as teacher_module, self.loaded.autocast():
            metrics, warnings = self.guard.check(self.loaded, teacher_module)
        for warning in warnings:
            self.callbacks.on_log(warning, level="warning")
        return metrics, bool(warnings) and self.config.collapse_guard.stop_on_collapse

    @property
    def _share(self) -> int:
        """Prompts of each micro-batch that this rank takes."""
        return self.config.batch_size // self.ranks.world_size

    def _samples_for(self, micro_batch: int) -> list[Sample]:
        """This rank's contiguous share of micro-batch ``micro_batch`` (counted from the start of the run)."""
        start = micro_batch * self.config.batch_size + self.ranks.rank * self._share
        return [self.samples[self.order.index(start + i)] for i in range(self._share)]

    def _conversations(self, samples: list[Sample], view_fn) -> list[Any]:
        """One conversation per rollout row. Each sample's view is made once and its messages repeated for its
        rollouts (the processor only reads them): decoding, drawing on and cropping a large image is not free, and
        the paper samples eight rollouts per prompt."""
        per_sample = [to_messages(view_fn(sample, self.config.views)) for sample in samples]
        return [messages for messages in per_sample for _ in range(self.config.rollout.num_rollouts)]

    def _encode(self, conversations: list[Any]) -> Any:
        """The model's inputs for ``conversations`` (as ``_conversations`` makes them: each sample's messages repeated
        for its rollouts); where the trainer shares image features, with the images already through the vision
        encoder (under the same autocast as the forwards that would otherwise run it).

        Each sample goes through the processor and the encoder once and its rows are repeated, where their layout
        allows it (``repeat_each_row``); otherwise every row goes through that stage. The processor's layout is known
        before the encoder runs, so only the first refused features (Qwen3-VL's deepstack ones) are computed twice.
        """
        repeats = self.config.rollout.num_rollouts
        unique: Any = self.loaded.encode(conversations[::repeats])
        prompts = repeat_each_row(unique, repeats)
        if prompts is None:  # a processor layout it does not know: every row through the processor
            unique, prompts = None, self.loaded.encode(conversations)
        if not self.shares_image_features:
            return prompts
        with self.loaded.autocast():
            if unique is not None and self.repeats_image_features:
                repeated = repeat_each_row(with_image_features(self.student, unique), repeats)
                if repeated is not None:
                    return repeated
                self.repeats_image_features = False
            return with_image_features(self.student, prompts)

    def _teacher_prompts(self, samples: list[Sample], student_conversations: list[Any], student_prompts: Any) -> Any:
        """The teacher's encoded prompts: the student's own when both views are the same (a teacher without the crop,
        as TRL's distillation or the no-privilege arm runs it), which spares encoding the images a second time."""
        conversations = self._conversations(samples, teacher_view)
        # One row per sample is enough (its rollouts repeat the same messages); PIL images compare by their pixels.
        every_sample = slice(None, None, self.config.rollout.num_rollouts)
        if conversations[every_sample] == student_conversations[every_sample]:
            return student_prompts
        return self._encode(conversations)

    def _row_seeds(self, micro: int) -> list[int]:
        """One sampling seed per rollout row: (run seed, step, the prompt's place in the step, rollout index)."""
        config = self.config
        first = micro * config.batch_size + self.ranks.rank * self._share
        return [
            derive_seed(config.seed, self.step, first + prompt, rollout)
            for prompt in range(self._share)
            for rollout in range(config.rollout.num_rollouts)
        ]

    def _sample(self, samples: list[Sample], micro: int) -> tuple[list[Any], Any, RolloutBatch]:
        """The student's conversations and encoded prompts for ``samples`` (a ``PromptPass`` of them where the prompts
        run once), and its rollouts on them."""
        conversations = self._conversations(samples, student_view)
        student_prompts = self._encode(conversations)
        with self.loaded.autocast():
            prompt_pass = None if self.prompt_pass_refusal else PromptPass.run(self.student, student_prompts)
            rollout = self.engine.sample(
                conversations, student_prompts, row_seeds=self._row_seeds(micro), prompt_pass=prompt_pass
            )
        return conversations, student_prompts if prompt_pass is None else prompt_pass, rollout

    def _forwards(
        self,
        samples: list[Sample],
        student_conversations: list[Any],
        student_prompts: Any,
        teacher_prompts: Any,
        rollout: RolloutBatch,
    ) -> list[tuple[Any, Any, RolloutBatch]]:
        """(student prompts, teacher prompts, rollout) of each forward this micro-batch takes: itself whole, or groups
        of its rows that keep every forward within ``runtime.max_tokens_per_micro_batch`` (``token_budget_groups``),
        each padded only to its own longest response. Under FSDP every rank runs as many as the rank with the most."""
        budget = self.config.runtime.max_tokens_per_micro_batch
        if budget is None:
            return [(student_prompts, teacher_prompts, rollout)]
        widest = max(int(student_prompts["input_ids"].shape[1]), int(teacher_prompts["input_ids"].shape[1]))
        groups = token_budget_groups(widest, rollout.lengths.tolist(), budget)
        if self.ranks.strategy == "fsdp":  # each forward of sharded weights is a collective: the same count everywhere
            groups = split_to_count(groups, int(self.ranks.max(float(len(groups)), self.loaded.device)))
        if len(groups) == 1 and groups[0] == list(range(len(groups[0]))):
            return [(student_prompts, teacher_prompts, rollout)]
        teacher_conversations: list[Any] | None = None
        forwards = []
        for rows in groups:
            student_rows = self._rows_of(student_prompts, student_conversations, rows)
            if teacher_prompts is student_prompts:
                teacher_rows = student_rows
            else:
                teacher_rows = select_rows(teacher_prompts, rows)
                if teacher_rows is None:
                    teacher_conversations = teacher_conversations or self._conversations(samples, teacher_view)
                    teacher_rows = self._rows_of(teacher_prompts, teacher_conversations, rows)
            forwards.append((student_rows, teacher_rows, select_rollout(rollout, rows)))
        return forwards

    def _rows_of(self, prompts: Any, conversations: list[Any], rows: list[int]) -> Any:
        """The encoded prompts of ``rows``: taken from ``prompts`` where their layout allows (``select_rows``), else
        those rows' conversations encoded again (and their images through the encoder where features are shared)."""
        selected = select_rows(prompts, rows)
        if selected is not None:
            return selected
        encoded = self.loaded.encode([conversations[row] for row in rows])
        if not self.shares_image_features:
            return encoded
        with self.loaded.autocast():
            return with_image_features(self.student, encoded)

    def _student_scores(self, student_prompts: Any, rollout: RolloutBatch) -> torch.Tensor:
        """The student's forward with gradient: logits (or hidden states, the head bypassed) at the response positions;
        over the response alone when ``student_prompts`` is the prompt pass the sampling started from."""
        if isinstance(student_prompts, PromptPass):
            return student_prompts.response_logits(self.trained, rollout)
        return response_logits(self.trained, student_prompts, rollout, packed=self.config.runtime.pack_sequences)

    def _loss(
        self,
        student_prompts: Any,
        rollout: RolloutBatch,
        teacher_outputs: tuple[torch.Tensor, torch.Tensor | None],
        normalizer: float,
        sampled_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The student's forward on its prompts and the micro-batch's loss: (loss, per-token divergence, metrics).

        ``teacher_outputs`` is (hidden states, LM head) on the loss-from-hidden-states path, (logits, None) otherwise.
        ``sampled_logprobs`` (N, R), when given, receives the student's log-prob of each sampled token (at the
        divergence's temperature), read from the same forward.
        """
        config = self.config
        teacher, teacher_head = teacher_outputs
        behaviour = rollout.behaviour_logprobs if self._behaviour_comparable else None
        stats_topk = config.divergence.topk or 100
        if teacher_head is not None:
            with self.loaded.autocast(), head_bypassed(self.student) as head:
                student_hidden = self._student_scores(student_prompts, rollout)  # (N, R, H)
                student_head = head.weight  # after the forward: whole under FSDP too, until the backward
            return hidden_distillation_loss(
                student_hidden,
                student_head,
                teacher,
                teacher_head,
                rollout.response_mask,
                config.divergence,
                response_ids=rollout.response_ids,
                behaviour_logprobs=behaviour,
                normalizer=normalizer,
                stats_topk=stats_topk,
                matmul_dtype=self.loaded.compute_dtype if self.loaded.mixed_precision else None,
                sampled_logprobs_out=sampled_logprobs,
            )
        with self.loaded.autocast():
            student_logits = self._student_scores(student_prompts, rollout)  # (N, R, V)
        loss, per_token = distillation_loss(
            student_logits,
            teacher,
            rollout.response_mask,
            config.divergence,
            response_ids=rollout.response_ids,
            behaviour_logprobs=behaviour,
            normalizer=normalizer,
        )
        if sampled_logprobs is not None:
            with torch.no_grad():
                sampled_logprobs.copy_(
                    gather_token_logprobs(
                        student_logits.detach(), rollout.response_ids, temperature=config.divergence.temperature
                    )
                )
        stats = distribution_stats(
            student_logits.detach(),
            teacher,
            rollout.response_mask,
            topk=stats_topk,
            temperature=config.divergence.temperature,
        )
        return loss, per_token, stats

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics."""
        config = self.config
        started = time.perf_counter()
        timings = {"rollout_time": 0.0, "teacher_time": 0.0, "student_time": 0.0}
        if not self.student.training:  # a transformers model's train() walks every module: only when needed
            self.student.train()
        self.optimizer.zero_grad(set_to_none=True)

        # 1. Every micro-batch's rollouts first: the step's token count is the loss's denominator.
        tick = time.perf_counter()
        micro_batches: list[tuple[list[Sample], list[Any] | None, Any, RolloutBatch]] = []
        evidence_totals: dict[str, float] = {}
        self.engine.wake()
        for micro in range(config.grad_accum):
            samples = self._samples_for(self.step * config.grad_accum + micro)
            evidence_tick = time.perf_counter()
            samples, found = self._with_evidence(samples)
            for key, value in found.items():
                share = value if key == "evidence/searched" else value / config.grad_accum
                self._accumulate(evidence_totals, key, share)
            if found:
                self._accumulate(timings, "evidence_time", time.perf_counter() - evidence_tick)
            conversations, student_prompts, rollout = self._sample(samples, micro)
            # One micro-batch keeps its conversations and encoded prompts; several rebuild them below (the images of
            # every micro-batch at once can outweigh the model at real image sizes).
            if config.grad_accum == 1:
                micro_batches.append((samples, conversations, student_prompts, rollout))
            else:
                micro_batches.append((samples, None, None, rollout))
            del conversations, student_prompts
        self.engine.sleep()  # training takes the engine's device memory until the next rollouts
        timings["rollout_time"] = time.perf_counter() - tick - timings.get("evidence_time", 0.0)
        local_tokens = sum(int(rollout.response_mask.sum()) for *_, rollout in micro_batches)
        (step_tokens,) = self.ranks.sum([float(local_tokens)], self.loaded.device)
        # Each rank divides its token sum by the step's tokens over all ranks; DDP and FSDP then *average* the ranks'
        # gradients, so the denominator is divided by the world size to make their sum the global token-mean.
        normalizer = max(step_tokens, 1.0) / self.ranks.world_size

        # 2. Teacher on the crop, student on the full image, loss and backward, one micro-batch at a time.
        totals: dict[str, float] = {}
        padding: dict[str, float] = {}
        divergence_sum = 0.0
        divergence_max = 0.0
        rows = 0
        truncated = 0
        # An engine's behaviour log-probs against the trainer's own (on-policy) ones, where they are one distribution
        # (the student's own sampling agrees with its scoring by construction).
        compare = not self.engine.samples_with_the_student and self._behaviour_comparable
        agreement = {"diff_sum": 0.0, "diff_max": 0.0, "clipped": 0.0}
        forward_count = 0
        while micro_batches:
            last_micro_batch = len(micro_batches) == 1
            samples, student_conversations, student_prompts, rollout = micro_batches.pop(0)
            if student_conversations is None:
                student_conversations = self._conversations(samples, student_view)
                student_prompts = self._encode(student_conversations)
            encoded = student_prompts.prompts if isinstance(student_prompts, PromptPass) else student_prompts
            teacher_prompts = self._teacher_prompts(samples, student_conversations, encoded)

            # The forwards of this micro-batch: one, or groups of rows within runtime.max_tokens_per_micro_batch.
            micro_tokens = max(int(rollout.response_mask.sum()), 1)
            forwards = self._forwards(samples, student_conversations, student_prompts, teacher_prompts, rollout)
            del student_prompts, teacher_prompts
            while forwards:
                group_prompts, group_teacher_prompts, group = forwards.pop(0)
                last_forward = last_micro_batch and not forwards
                encoded = group_prompts.prompts if isinstance(group_prompts, PromptPass) else group_prompts
                real, computed = padded_tokens(encoded["attention_mask"], group)
                if self.config.runtime.pack_sequences:  # the forward holds the real tokens alone
                    computed = real
                self._accumulate(padding, "real", real)
                self._accumulate(padding, "computed", computed)

                tick = time.perf_counter()
                with self.loaded.autocast():
                    if self.logits_fallback is None:  # (N, R, H) and (V, H): the logits are never built
                        teacher_outputs = self.teacher.response_hidden(group_teacher_prompts, group)
                    else:  # (N, R, V)
                        teacher_outputs = (self.teacher.response_logits(group_teacher_prompts, group), None)
                timings["teacher_time"] += time.perf_counter() - tick

                tick = time.perf_counter()
                with distributed.gradient_sync(self.trained, self.ranks, enabled=last_forward):
                    sampled = torch.zeros_like(group.behaviour_logprobs) if compare else None
                    loss, per_token, stats = self._loss(group_prompts, group, teacher_outputs, normalizer, sampled)
                    (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                timings["student_time"] += time.perf_counter() - tick
                if sampled is not None:
                    self._compare_logprobs(agreement, sampled, group)

                self._accumulate(totals, "loss", loss.item())
                mask = group.response_mask
                if mask.any():
                    divergence_sum += float(per_token[mask].sum())
                    divergence_max = max(divergence_max, float(per_token[mask].max()))
                share = int(mask.sum()) / micro_tokens / config.grad_accum  # the metrics are token-means
                for key, value in stats.items():
                    self._accumulate(totals, key, value * share)
                rows += mask.shape[0]
                truncated += int(group.truncated.sum())
                forward_count += 1
                del teacher_outputs, group, group_prompts, group_teacher_prompts, loss, per_token
            del rollout, student_conversations

        # 3. The update, unless the gradient is not finite: then neither the student nor the teacher moves.
        parameters = [p for p in self.student.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip))
        lr = self.scheduler.get_last_lr()[0]
        finite = bool(torch.isfinite(grad_norm))
        sync_s = 0.0
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.teacher.update(self.step + 1)
            # The next rollouts must come from the updated student (never from the EMA teacher).
            sync_s = self.engine.sync(self.student)
        else:
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.callbacks.on_log(
                f"step {self.step + 1}: gradient norm is {float(grad_norm)}; skipped the update "
                f"({self.skipped_steps} skipped so far)",
                level="warning",
            )
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()
        if self.ranks.distributed:  # the step's figures over every rank
            stat_keys = [key for key in totals if key != "loss"]
            loss_sum, divergence_sum, rows, truncated, real, computed, forward_count, *stat_sums = self.ranks.sum(
                [
                    totals.get("loss", 0.0),
                    divergence_sum,
                    rows,
                    truncated,
                    padding.get("real", 0.0),
                    padding.get("computed", 0.0),
                    forward_count,
                    *(totals[key] for key in stat_keys),
                ],
                self.loaded.device,
            )
            padding = {"real": real, "computed": computed}
            totals = {"loss": loss_sum / self.ranks.world_size}
            totals.update({key: value / self.ranks.world_size for key, value in zip(stat_keys, stat_sums, strict=True)})
            divergence_max = self.ranks.max(divergence_max, self.loaded.device)
        if compare and self.ranks.distributed:
            agreement["diff_sum"], agreement["clipped"] = self.ranks.sum(
                [agreement["diff_sum"], agreement["clipped"]], self.loaded.device
            )
            agreement["diff_max"] = self.ranks.max(agreement["diff_max"], self.loaded.device)
        rollout_metrics = {
            "rollout/tokens_per_s": step_tokens / max(timings["rollout_time"], 1e-9),
            "rollout/sync_s": sync_s,
        }
        if compare:
            rollout_metrics.update(
                {
                    "rollout/logprob_diff_mean": agreement["diff_sum"] / max(step_tokens, 1.0),
                    "rollout/logprob_diff_max": agreement["diff_max"],
                    "rollout/is_clipped_frac": agreement["clipped"] / max(step_tokens, 1.0),
                }
            )
        step_time = time.perf_counter() - started
        return {
            **totals,
            **evidence_totals,
            "divergence_mean": divergence_sum / max(step_tokens, 1.0),
            "divergence_max": divergence_max,
            "response_length": step_tokens / max(rows, 1),
            "truncated_fraction": truncated / max(rows, 1),
            # The share of the student's forwards' tokens that were padding (left of the prompts, right of the
            # responses): what grouping rows by length (runtime.max_tokens_per_micro_batch) saves; 0 with
            # runtime.pack_sequences, whose forwards hold no padding.
            "padding_fraction": 1.0 - padding.get("real", 0.0) / max(padding.get("computed", 0.0), 1.0),
            "student_forwards": float(forward_count) / self.ranks.world_size,
            "grad_norm": float(grad_norm),
            "skipped_steps": float(self.skipped_steps),
            "lr": lr,
            "tokens_per_second": step_tokens / step_time,
            "step_time": step_time,
            **timings,
            **rollout_metrics,
        }

    def _compare_logprobs(self, agreement: dict[str, float], sampled: torch.Tensor, rollout: RolloutBatch) -> None:
        """Adds one micro-batch's |engine log-prob - trainer log-prob| (sum, max) over its response tokens to
        ``agreement``, and how many tokens' importance weight p_trainer / p_engine reached ``divergence.is_clip``."""
        mask = rollout.response_mask
        if not mask.any():
            return
        log_ratio = (sampled.float() - rollout.behaviour_logprobs.float())[mask]
        agreement["diff_sum"] += float(log_ratio.abs().sum())
        agreement["diff_max"] = max(agreement["diff_max"], float(log_ratio.abs().max()))
        is_clip = self.config.divergence.is_clip
        if is_clip is not None:
            agreement["clipped"] += float((log_ratio.exp() >= is_clip).sum())

    @staticmethod
    def _accumulate(totals: dict[str, float], key: str, value: float) -> None:
        totals[key] = totals.get(key, 0.0) + value

    # ------------------------------------------------------------------ files
    def _open_metrics_log(self):
        """Append to metrics.jsonl, first dropping records past the resumed step (they will be redone)."""
        if not self.ranks.is_main:
            return None
        path = self.output_dir / METRICS_FILE
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in kept))
        return path.open("a", encoding="utf-8")

    def _checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / CHECKPOINTS_DIR / f"step-{step}"

    def _gathered_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Whole (unsharded) model and optimizer state dicts, on rank 0's CPU; every rank must call this."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.student, options=options)
        if isinstance(self.optimizer, HostAdamW):  # ddp: every rank holds the whole state already
            return model_state, self.optimizer.state_dict()
        return model_state, get_optimizer_state_dict(self.student, self.optimizer, options=options)

    def save_checkpoint(self) -> Path:
        """Write into a temporary folder, then rename: a crash never leaves a half checkpoint behind.

        Across ranks the checkpoint holds the gathered state (weights, optimizer, teacher), written by rank 0, so a
        run resumes exactly on any number of ranks."""
        final = self._checkpoint_dir(self.step)
        model_state, optimizer_state = self._gathered_state() if self.ranks.distributed else ({}, {})
        teacher_state = self.teacher.state_dict()
        if self.ranks.is_main:
            partial = final.with_name(final.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            if self.ranks.distributed:
                self.student.save_pretrained(partial, state_dict=model_state)
            else:
                self.student.save_pretrained(partial)
                optimizer_state = self.optimizer.state_dict()
            self.loaded.processor.save_pretrained(partial)
            state = {
                "step": self.step,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "teacher": teacher_state,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "skipped_steps": self.skipped_steps,
                "evidence": self.evidence.state_dict(),
                "rng": _rng_state(),
                "config": self.config.model_dump(mode="json"),
            }
            torch.save(state, partial / STATE_FILE)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            pruned = self._prune_checkpoints()
            if pruned:
                # Said where the user reads: a checkpoint that silently vanished looked like a lost one.
                self.callbacks.on_log(
                    f"checkpoints pruned (keep_checkpoints {self.config.keep_checkpoints}): "
                    + ", ".join(f"step-{step}" for step in pruned)
                )
        self.ranks.barrier()  # no rank reads a checkpoint before rank 0 has written it
        self.callbacks.on_checkpoint(step=self.step, path=final)
        return final

    def _prune_checkpoints(self) -> list[int]:
        """Delete all but the newest ``keep_checkpoints`` checkpoints; the steps deleted, oldest first."""
        folder = self.output_dir / CHECKPOINTS_DIR
        steps = sorted(
            (int(path.name.split("-")[1]), path) for path in folder.glob("step-*") if path.name.split("-")[1].isdigit()
        )
        pruned = steps[: -self.config.keep_checkpoints]
        for _, path in pruned:
            shutil.rmtree(path, ignore_errors=True)
        return [step for step, _ in pruned]

    def export_final(self) -> Path:
        """The trained model as a standard folder: LoRA merged into the weights, loadable with from_pretrained.

        The weights keep the master dtype unless ``export_dtype`` names another; casting happens in place, so this
        is the run's last act."""
        final = self.output_dir / FINAL_DIR
        model = self.student
        if self.ranks.strategy == "fsdp":  # gather the shards; rank 0 rebuilds a whole model from them
            model_state, _ = self._gathered_state()
            model = self._rebuilt_on_cpu(model_state) if self.ranks.is_main else None
        self.ranks.barrier()
        if not self.ranks.is_main:
            self.ranks.barrier()
            return final
        partial = final.with_name(FINAL_DIR + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        assert model is not None
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        if self.config.export_dtype != "master":
            model.to(resolve_dtype(self.config.export_dtype, self.loaded.device))
        model.save_pretrained(partial)
        self.loaded.processor.save_pretrained(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        self.ranks.barrier()
        return final

    def _rebuilt_on_cpu(self, model_state: dict[str, Any]) -> nn.Module:
        """An unsharded copy of the student on the CPU (built as at the start, then given the trained weights)."""
        config = self.config
        runtime = config.runtime.model_copy(update={"device": "cpu", "strategy": "single"})
        rebuilt = load_model_and_processor(
            config.model, runtime, lora=config.lora, freeze_vision_tower=config.freeze_vision_tower, trainable=True
        ).model
        rebuilt.load_state_dict(model_state)
        return rebuilt


def train(config: TrainConfig, *, callbacks: Sequence[ProgressCallback] = (), resume: bool = False) -> TrainResult:
    """Run (or resume, or extend) a Vision-OPD training run described by ``config`` (on this rank, under torchrun)."""
    trainer = OPDTrainer(config, callbacks=callbacks, resume=resume)
    try:
        return trainer.train()
    finally:
        distributed.teardown(trainer.ranks)
