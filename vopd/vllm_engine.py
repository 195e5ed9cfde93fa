"""The colocated vLLM rollout engine: one in-process engine per training process, synced after every optimizer step.

Why: with eager ``generate`` on a GPU, sampling is 90-98% of every Vision-OPD step (bench/RESULTS.md). The official
run, TRL, verl and OpenRLHF all sample with vLLM and re-score with the trainer, correcting the small numerical
mismatch with token-level importance weights clipped at ``divergence.is_clip``. This module is the one place that
owns such an engine's life: it creates it (``__init__``), puts it to sleep and wakes it (GPU only), syncs its weights
(``sync``) and frees it (``close``). vLLM is imported here only, lazily, so that nothing else pays its import time.

Semantics match the ``hf`` engine's (``vopd.rollout.sample_rollouts``): the prompt is the text our processor's chat
template renders (with the same template variables), and vLLM's processor expands its image placeholders from the
same folder's settings, so its prompt ids equal ours (tested); temperature, top-p, the response budget, the end
tokens and the suppressed tokens (as ``allowed_token_ids``) are the same; each row is its own request with its own
seed, so a prompt samples the same tokens however a step is split; the behaviour log-probs are vLLM's *processed*
log-probs (after temperature, top-p and the token mask), i.e. those of the distribution each token was drawn from.

The sync: the student's weights, cast from the fp32 masters to the engine's (compute) dtype, by their transformers
names, into the running engine through vLLM's in-place ``reload_weights`` (no reload from disk), followed by a reset
of the prefix cache and the encoder cache (cached keys, values and image features were made by the old weights).
vLLM re-processes a layer only once all its elements have arrived and leaves a partly sent layer's other elements
undefined, so a sync always sends whole components: the language model with its head always, the vision tower too
when any of its weights trains (or at a full sync). LoRA is synced as merged weights (base + B A, computed on the
fly; the student keeps its adapters): vLLM's adapter path would need its LoRA kernels, a rank limit fixed at start
and an adapter written to disk each step, and it slows every decoded token, while a merged sync costs the same as a
full fine-tune's. The EMA teacher never enters the engine: only the student is synced.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import BatchFeature

from vopd.answering import Answer, answer_from_topk
from vopd.config import RolloutConfig
from vopd.distributed import full_tensor
from vopd.models import render_prompt, unwrap_model, vision_tower_module
from vopd.rollout import VLLM_EXTRA_HINT, PromptPass, RolloutBatch, _mask_after_end
from vopd.views import View, to_messages

if TYPE_CHECKING:
    from vopd.models import LoadedModel

# Prompt room that max_model_len leaves beside the response budget by default (a 1-2 MP image in Qwen-VL tokens).
DEFAULT_PROMPT_ROOM = 4096
# Log-probs per position a greedy answer reads its option probabilities and entropy from: vLLM's default limit
# (max_logprobs), which the engine is started with.
ANSWER_TOPK = 20
# The engines open in this process (their ids): an evaluation's engine may open and close beside a training one.
_OPEN_ENGINES: set[int] = set()
# Whether the first of them found no torch.distributed process group and had vLLM make one (``close``).
_VLLM_MADE_THE_PROCESS_GROUP = False
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _refresh_tied_heads(worker: Any) -> int:
    """Runs in vLLM's worker after a reload: re-derives each LM head tied to the input embeddings from the (reloaded)
    shared weight; returns how many there were.

    Why: vLLM's CPU backend computes the logits with a packed copy of the head's weight made when the head is
    processed. A tied head is never sent by name (checkpoints leave it out), so a reload processes the embedding
    layer, whose storage the head shares, but not the head: its packed copy stays the old weights' (measured on a
    tied Qwen3.5: a sync that changed the embeddings left the log-probs 0.35 off, every other weight synced exactly).
    On a GPU the head reads the shared weight itself and re-processing it changes nothing."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    model = worker.model_runner.model
    embeddings = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead)
    }
    refreshed = 0
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and id(getattr(module, "weight", None)) in embeddings:
            module.quant_method.process_weights_after_loading(module)
            refreshed += 1
    return refreshed


def _delta_weight(module: Any, adapter: str) -> torch.Tensor:
    """A LoRA layer's B A (times its scaling), whole. Under FSDP the adapter's A and B are DTensor shards: they are
    gathered (two small all-gathers) and multiplied as peft's linear layers do; elsewhere peft computes it."""
    from torch.distributed.tensor import DTensor

    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if not isinstance(a, DTensor) and not isinstance(b, DTensor):
        return module.get_delta_weight(adapter).detach()
    if not isinstance(module.lora_A[adapter], nn.Linear):
        raise VllmEngineError(f"syncing a sharded LoRA {type(module).__name__} layer is not supported; use ddp")
    delta = full_tensor(b.detach()) @ full_tensor(a.detach())
    if getattr(module, "fan_in_fan_out", False):
        delta = delta.T
    return delta * module.scaling[adapter]


class VllmUnsupportedModel(ValueError):
    """vLLM cannot run this model (architecture, head size, dtype...); the message names ``rollout.engine: hf``."""


class VllmEngineError(RuntimeError):
    """The engine failed to start or to sample; the message names the model and the way out."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ValueError(f"rollout.engine vllm: vLLM cannot be imported ({error}); {VLLM_EXTRA_HINT}") from error
    return vllm


class _DropUnsentLayerWarnings(logging.Filter):
    """vLLM warns "Failed to load weights" for every layer a reload did not include; a partial sync leaves out the
    frozen vision tower on purpose, every step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in record.getMessage()


def model_folder(loaded: LoadedModel) -> Path:
    """The folder of the student's base weights (an adapter folder's base model for LoRA checkpoints)."""
    base = unwrap_model(loaded.model)
    name = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
    return Path(name) if name else loaded.path


class VllmRolloutEngine:
    """A vLLM ``LLM`` in this process that samples the student's rollouts (the ``vllm`` side of ``RolloutEngine``)."""

    name = "vllm"
    samples_with_the_student = False

    def __init__(self, loaded: LoadedModel, rollout: RolloutConfig, *, seed: int = 0) -> None:
        self.loaded = loaded
        self.rollout = rollout
        self.settings = rollout.vllm
        self.device = loaded.device
        self.dtype = loaded.compute_dtype or loaded.dtype
        self.folder = model_folder(loaded)
        self.on_gpu = self.device.type == "cuda"
        self.tied_head = bool(getattr(loaded.model.config.get_text_config(), "tie_word_embeddings", False)) or bool(
            getattr(loaded.model.config, "tie_word_embeddings", False)
        )
        self.state = "awake"  # or "asleep" (weights in CPU memory, no KV cache) or "weights" (weights back only)
        self.sync_count = 0
        # Extra SamplingParams for every rollout request (bench/gpu_step.py forces full-length responses with
        # {"ignore_eos": True}); empty for training.
        self.sampling_overrides: dict[str, Any] = {}
        vocabulary = loaded.model.get_output_embeddings().weight.shape[0]
        suppressed = set(loaded.suppressed_token_ids)
        # None when nothing is suppressed: vLLM then skips the per-request token mask.
        self.allowed_token_ids = [i for i in range(vocabulary) if i not in suppressed] if suppressed else None
        self.max_model_len = self.settings.max_model_len or rollout.max_new_tokens + DEFAULT_PROMPT_ROOM
        text_config = loaded.model.config.get_text_config()
        model_limit = getattr(text_config, "max_position_embeddings", None)
        if self.settings.max_model_len is None and model_limit:
            self.max_model_len = min(self.max_model_len, int(model_limit))
        vllm = _import_vllm()
        self._check_architecture(vllm)
        # Colocated means in this process: the weights are handed over as tensors, and a Celery prefork child may not
        # start processes of its own.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise VllmEngineError(
                "the colocated vllm engine runs in the training process: unset VLLM_ENABLE_V1_MULTIPROCESSING or "
                "set it to 0"
            )
        if not self.on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes a large share of RAM
        # Under ddp/fsdp every training process owns an engine of its own, on its own device: vLLM joins the
        # processes' group (torchrun's RANK and LOCAL_RANK) as an external data-parallel dimension, each engine a
        # tensor-parallel group of one that samples its rank's prompts alone.
        self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if self.world_size > 1 and self.settings.tensor_parallel_size != 1:
            raise ValueError(
                "rollout.vllm.tensor_parallel_size must be 1 under ddp or fsdp: each training process owns one engine "
                f"on its own device (got {self.settings.tensor_parallel_size})"
            )
        arguments = self.engine_arguments(seed)
        global _VLLM_MADE_THE_PROCESS_GROUP
        if not _OPEN_ENGINES:
            _VLLM_MADE_THE_PROCESS_GROUP = not torch.distributed.is_initialized()
        try:
            self.llm = vllm.LLM(**arguments)
        except Exception as error:  # vLLM raises many kinds (ValueError, RuntimeError, its own) for one meaning
            raise VllmUnsupportedModel(
                f"vLLM could not start an engine for {self.folder} ({type(error).__name__}: {error}); set "
                "rollout.engine: hf to sample with transformers"
            ) from error
        _OPEN_ENGINES.add(id(self))
        self.sampling = vllm.SamplingParams
        if self.on_gpu and self.settings.sleep:
            self.sleep()

    # ------------------------------------------------------------------ life
    def engine_arguments(self, seed: int) -> dict[str, Any]:
        """``vllm.LLM``'s keyword arguments for this model and these settings."""
        settings = self.settings
        max_batched = settings.max_num_batched_tokens or max(self.max_model_len, 16384)
        arguments: dict[str, Any] = {
            "model": str(self.folder),
            "tokenizer": str(self.folder),
            "dtype": _DTYPE_NAMES.get(self.dtype, "auto"),
            "seed": seed,
            "max_model_len": self.max_model_len,
            "max_num_batched_tokens": max_batched,
            "tensor_parallel_size": settings.tensor_parallel_size,
            "enable_prefix_caching": settings.enable_prefix_caching,
            # Our prompts carry one image each, never a video (a limit of 0 skips profiling that modality).
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            # The log-probs of the distribution sampled from (after temperature, top-p, the token mask): what the
            # importance weights divide by.
            "logprobs_mode": "processed_logprobs",
            "max_logprobs": ANSWER_TOPK,  # greedy answers read their top 20 (``answer``); rollouts their token's only
            # Sampling settings come from the run's config only, never from the folder's generation_config.json.
            "generation_config": "vllm",
            "disable_log_stats": True,
        }
        if self.world_size > 1:
            arguments["distributed_executor_backend"] = "external_launcher"
        if self.on_gpu:
            arguments["gpu_memory_utilization"] = settings.gpu_memory_utilization
            arguments["enforce_eager"] = settings.enforce_eager
            arguments["enable_sleep_mode"] = settings.sleep
        else:
            arguments["enforce_eager"] = True
        return arguments

    def _check_architecture(self, vllm: Any) -> None:
        architectures = getattr(unwrap_model(self.loaded.model).config, "architectures", None) or []
        supported = set(vllm.ModelRegistry.get_supported_archs())
        if architectures and not any(name in supported for name in architectures):
            raise VllmUnsupportedModel(
                f"vLLM does not support the architecture {', '.join(architectures)} of {self.folder}; set "
                "rollout.engine: hf to sample with transformers"
            )

    def wake(self) -> None:
        if self.state == "asleep":
            self.llm.wake_up()
        elif self.state == "weights":
            self.llm.wake_up(tags=["kv_cache"])
        self.state = "awake"

    def sleep(self) -> None:
        """Level 1: the weights go to CPU memory and come back on waking (the frozen vision tower is never re-sent),
        the KV cache is dropped. Only on GPU with ``rollout.vllm.sleep``; vLLM's CPU backend has no sleep mode."""
        if self.on_gpu and self.settings.sleep and self.state != "asleep":
            self.llm.sleep(level=1)
            self.state = "asleep"

    def close(self) -> None:
        """Free the engine. In-process engines share vLLM's process groups (the first sets them up, later ones reuse
        them), and under ddp/fsdp those groups are built on the training processes' own: vLLM's shutdown would take
        them all down (the training's default group included). So only the last engine of a process whose process
        group vLLM made shuts down whole; any other just lets go of its model and caches."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        _OPEN_ENGINES.discard(id(self))
        global _VLLM_MADE_THE_PROCESS_GROUP
        if not _OPEN_ENGINES and _VLLM_MADE_THE_PROCESS_GROUP:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            with contextlib.suppress(Exception):
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
            _VLLM_MADE_THE_PROCESS_GROUP = False
        else:
            # vLLM shuts its in-process core down when the client is collected (a weakref finalizer), which would
            # take the shared groups down all the same: detached, the core is only let go of.
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core._finalizer.detach()
        gc.unfreeze()  # vLLM freezes what it allocates while starting; its shutdown unfreezes, this path must too
        del llm
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ weights
    def named_weights(self, model: nn.Module, *, everything: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(transformers name, tensor in the engine's dtype) of each weight a sync sends, one at a time (each cast is
        made just before vLLM copies it, so at most one extra tensor exists at once). LoRA layers give their merged
        weight under the base layer's name. Whole components only (see the module's docstring)."""
        base = unwrap_model(model)
        tower = vision_tower_module(base)
        tower_ids = {id(parameter) for parameter in tower.parameters()}
        with_tower = everything or any(parameter.requires_grad for parameter in tower.parameters())
        tower_prefix = next(name for name, module in base.named_modules() if module is tower) + "."
        from peft.tuners.lora import LoraLayer

        seen: set[int] = set()
        skipped: list[str] = []
        for module_name, module in base.named_modules():
            if any(module_name.startswith(prefix) for prefix in skipped):
                continue
            if not with_tower and module_name.startswith(tower_prefix):
                continue
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, LoraLayer):
                skipped.append(prefix)
                layer = module.get_base_layer()
                weight = full_tensor(layer.weight.detach())
                for adapter in module.active_adapters:
                    if adapter in module.lora_A and adapter not in getattr(module, "merged_adapters", []):
                        weight = weight + _delta_weight(module, adapter).to(weight.dtype)
                seen.add(id(layer.weight))
                yield f"{prefix}weight", weight.to(self.dtype)
                if getattr(layer, "bias", None) is not None:
                    seen.add(id(layer.bias))
                    yield f"{prefix}bias", full_tensor(layer.bias.detach()).to(self.dtype)
                continue
            for name, parameter in module.named_parameters(recurse=False):
                if id(parameter) in seen or (not with_tower and id(parameter) in tower_ids):
                    continue
                seen.add(id(parameter))
                # Under FSDP an all-gather of this one tensor, in which every rank takes part (every rank syncs its
                # own engine, walking the same names in the same order): one whole tensor at a time, never the model.
                yield f"{prefix}{name}", full_tensor(parameter.detach()).to(self.dtype)

    @torch.no_grad()
    def sync(self, model: nn.Module, *, everything: bool = False) -> float:
        """Load ``model``'s weights into the engine in place and reset its caches; the seconds it took."""
        started = time.perf_counter()
        if self.state == "asleep":  # the weights' memory back; the KV cache's waits for the sampling
            self.llm.wake_up(tags=["weights"])
            self.state = "weights"
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        quiet = _DropUnsentLayerWarnings()
        layerwise.addFilter(quiet)
        try:
            weights = self.named_weights(model, everything=everything)
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        finally:
            layerwise.removeFilter(quiet)
        if self.tied_head:
            self.llm.collective_rpc(_refresh_tied_heads)
        # Cached prefixes' keys and values and cached image features were computed by the old weights.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.sync_count += 1
        if self.on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    # ------------------------------------------------------------------ sampling
    def requests(self, conversations: Sequence[Any]) -> list[dict[str, Any]]:
        """vLLM prompts for one chat per row: the text our chat template renders and its image. Each distinct chat is
        rendered once (a step repeats each prompt's chat for its rollouts)."""
        rendered: dict[int, dict[str, Any]] = {}
        requests = []
        for index, conversation in enumerate(conversations):
            key = id(conversation)
            if key not in rendered:
                text, images = render_prompt(
                    self.loaded.processor,
                    conversation,
                    chat_template_kwargs=self.loaded.chat_template_kwargs,
                    index=index,
                )
                request: dict[str, Any] = {"prompt": text}
                if images:
                    request["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
                rendered[key] = request
            requests.append(rendered[key])
        return requests

    def sampling_params(self, seed: int, **overrides: Any) -> Any:
        rollout = self.rollout
        greedy = rollout.temperature == 0.0
        settings: dict[str, Any] = {
            "n": 1,
            "temperature": 0.0 if greedy else rollout.temperature,
            "top_p": 1.0 if greedy else rollout.top_p,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "max_tokens": rollout.max_new_tokens,
            "stop_token_ids": list(self.loaded.eos_token_ids),
            "logprobs": 0,  # the sampled token's own log-prob only
            "seed": int(seed) % (2**63),
            "detokenize": False,
            "skip_special_tokens": False,
        }
        if self.allowed_token_ids is not None:
            settings["allowed_token_ids"] = self.allowed_token_ids
        settings.update(overrides)
        return self.sampling(**settings)

    def sample(
        self,
        conversations: Sequence[Any],
        prompts: BatchFeature,
        *,
        row_seeds: list[int],
        prompt_pass: PromptPass | None = None,
    ) -> RolloutBatch:
        if len(row_seeds) != len(conversations):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(conversations)} rows")
        if self.llm is None:
            raise VllmEngineError("the vllm engine was closed")
        self.wake()
        try:
            outputs = self.llm.generate(
                self.requests(conversations),
                [self.sampling_params(seed, **self.sampling_overrides) for seed in row_seeds],
                use_tqdm=False,
            )
        except Exception as error:
            raise VllmEngineError(
                f"the vllm engine failed while sampling ({type(error).__name__}: {error}); set rollout.engine: hf to "
                "sample with transformers"
            ) from error
        return self._batch([output.outputs[0] for output in outputs])

    def _batch(self, completions: Sequence[Any]) -> RolloutBatch:
        """Right-padded tensors from vLLM's completions, masked after the first end token as the hf engine does."""
        pad = self.loaded.pad_token_id
        width = max(len(completion.token_ids) for completion in completions)
        response_ids = torch.full((len(completions), width), pad, dtype=torch.long)
        behaviour = torch.zeros((len(completions), width), dtype=torch.float32)
        for row, completion in enumerate(completions):
            ids = list(completion.token_ids)
            response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            if completion.logprobs is None:
                raise VllmEngineError("the vllm engine returned no log-probs for a completion")
            behaviour[row, : len(ids)] = torch.tensor(
                [position[token].logprob for token, position in zip(ids, completion.logprobs, strict=True)],
                dtype=torch.float32,
            )
        device = self.device
        return _mask_after_end(response_ids.to(device), behaviour.to(device), self.loaded.eos_token_ids, pad)

    # ------------------------------------------------------------------ greedy answers (evaluation)
    def answer(
        self, views: Sequence[View], options: Sequence[Sequence[str] | None], *, max_new_tokens: int
    ) -> list[Answer]:
        """Greedy answers, as ``vopd.answering.generate_answers`` gives them with transformers: the same prompts (our
        chat template over the same views, so the same images at the same pixel limits), suppressed and end tokens
        and budget. Option probabilities and the first token's entropy come from each position's top
        ``ANSWER_TOPK`` log-probs (``answer_from_topk`` states the error); the log-probs are those after the token
        mask, as transformers' ``output_scores`` are."""
        if self.llm is None:
            raise VllmEngineError("the vllm engine was closed")
        if not views:
            return []
        self.wake()
        conversations = [to_messages(view) for view in views]
        params = self.sampling_params(0, temperature=0.0, top_p=1.0, max_tokens=max_new_tokens, logprobs=ANSWER_TOPK)
        try:
            outputs = self.llm.generate(self.requests(conversations), params, use_tqdm=False)
        except Exception as error:
            raise VllmEngineError(
                f"the vllm engine failed while answering ({type(error).__name__}: {error}); set engine: hf to decode "
                "with transformers"
            ) from error
        answers = []
        for output, row_options in zip(outputs, options, strict=True):
            completion = output.outputs[0]
            top = [
                {token: math.exp(entry.logprob) for token, entry in position.items()}
                for position in completion.logprobs or []
            ]
            answers.append(answer_from_topk(self.loaded, list(completion.token_ids), top, row_options))
        return answers

    def prompt_ids(self, conversations: Sequence[Any]) -> list[list[int]]:
        """The token ids vLLM makes of each row's prompt, image placeholders expanded (for tests against ours)."""
        outputs = self.llm.generate(
            self.requests(conversations),
            self.sampling_params(0, max_tokens=1, logprobs=None, temperature=0.0),
            use_tqdm=False,
        )
        return [list(output.prompt_token_ids) for output in outputs]
