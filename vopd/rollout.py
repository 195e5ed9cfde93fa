"""Student rollouts behind one seam: prompts in; token ids, masks and behaviour log-probs out.

The student samples on its own (full-image) view; those very tokens are later scored by the teacher on
the crop view. We keep the behaviour log-probabilities of every sampled token, read from the processed
scores while generating (O(N) memory per step, never the [N, R, V] score history).

Two engines implement the seam (``RolloutEngine``): ``hf`` samples with the student itself through ``generate``
(batched, with the KV cache; the CPU default), ``vllm`` with a colocated vLLM engine whose weights are synced from
the student after every optimizer step (``vopd.vllm_engine``). ``vopd.engines.create_rollout_engine`` picks one from
``rollout.engine``; the trainer only ever calls the seam's methods, never branches on which engine it holds.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import (
    BatchFeature,
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.logits_process import (
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from vopd.config import RolloutConfig
from vopd.models import PIXEL_KEYS, unwrap_model

if TYPE_CHECKING:
    from vopd.models import LoadedModel


@dataclass
class RolloutBatch:
    """The student's sampled responses, right-padded, aligned row by row with the prompts that made them."""

    response_ids: torch.Tensor  # (N, R) long, pad after the end
    response_mask: torch.Tensor  # (N, R) bool: real response tokens, EOS included
    behaviour_logprobs: torch.Tensor  # (N, R) float32: log-prob of each token under the sampling distribution
    truncated: torch.Tensor  # (N,) bool: hit max_new_tokens without an end token

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)


class _RecordProcessedScores(LogitsProcessor):
    """Last in the processor chain: keeps the step's final log-distribution (one [N, V] at a time)."""

    def __init__(self) -> None:
        self.last_logprobs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last_logprobs = torch.log_softmax(scores.float(), dim=-1)  # (N, V)
        return scores


class _SampleEachRowWithItsOwnSeed(LogitsProcessor):
    """Last in the chain: draws each row's token with that row's own generator, records its log-prob, and leaves the
    token the only maximum (+inf), so generate()'s greedy pick returns it.

    One log-softmax per token serves both the sampling distribution and the recorded behaviour log-prob (they are one
    tensor), and the log-prob is read here rather than by a stopping criterion after the append: per decoded token
    this is a handful of tensor ops, which is what a tiny model's step costs on a CPU.

    ``generate(do_sample=True)`` draws every row from one global random stream, so what a prompt samples depends on
    which other prompts share its batch. With one generator per row, seeded by (run seed, step, prompt's place in the
    step, rollout), a prompt samples the same tokens however a step is split into micro-batches (or ranks).
    """

    def __init__(self, row_seeds: list[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in row_seeds]
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} row seeds for a batch of {scores.shape[0]} rows")
        logprobs = torch.log_softmax(scores.float(), dim=-1)  # (N, V)
        probs = logprobs.exp()  # (N, V)
        chosen = torch.cat(
            [torch.multinomial(probs[row], 1, generator=generator) for row, generator in enumerate(self.generators)]
        )[:, None]  # (N, 1)
        self.logprobs.append(logprobs.gather(-1, chosen).squeeze(-1))
        return logprobs.scatter_(-1, chosen, float("inf"))


class _GatherSampledLogprob(StoppingCriteria):
    """Runs after the new token is appended: reads its log-prob from the recorded distribution; never stops."""

    def __init__(self, recorder: _RecordProcessedScores) -> None:
        self.recorder = recorder
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: object, **kwargs: object) -> torch.BoolTensor:
        assert self.recorder.last_logprobs is not None
        self.logprobs.append(self.recorder.last_logprobs.gather(-1, input_ids[:, -1:]).squeeze(-1))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def sample_rollouts(
    model: torch.nn.Module,
    prompts: BatchFeature,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_ids: list[int],
    pad_token_id: int,
    suppressed_token_ids: list[int],
    seed: int | None = None,
    row_seeds: list[int] | None = None,
    synced_gpus: bool = False,
    prompt_pass: PromptPass | None = None,
) -> RolloutBatch:
    """Sample one response per prompt row (repeat rows beforehand for several rollouts per prompt).

    ``temperature == 0`` means greedy. A ``seed`` makes the sample depend only on it, the weights and the batch;
    ``row_seeds`` (one per row) make each row's sample depend only on its own seed, the weights and its prompt, so
    the same prompt samples the same response in any batch. Either is what makes resumed training bit-identical to
    an uninterrupted run. ``synced_gpus`` keeps stepping until every rank has finished (sharded weights: every
    forward is a collective). Temperature, top-p and
    token suppression are applied by our own processor chain (with generate's own warpers switched
    off), so the recorded behaviour log-probs are those of the distribution each token was drawn from,
    whatever defaults a model's generation_config.json carries. With a ``prompt_pass`` of these prompts,
    ``generate`` starts from its cache: it runs the last prompt token and the response only.
    """
    if seed is not None:
        torch.manual_seed(seed)
    greedy = temperature == 0.0
    processors = LogitsProcessorList()
    # generate() already suppresses what the model's generation_config names (models.py sets it at load);
    # add our own suppressor only for ids it lacks (a second one of the same type would replace it, noisily).
    configured = set(getattr(model.generation_config, "suppress_tokens", None) or [])
    if suppressed_token_ids and not set(suppressed_token_ids) <= configured:
        processors.append(SuppressTokensLogitsProcessor(suppressed_token_ids, device=prompts["input_ids"].device))
    if not greedy and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if not greedy and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    per_row = row_seeds is not None and not greedy
    sampler: _SampleEachRowWithItsOwnSeed | None = None
    stopping = StoppingCriteriaList()
    if per_row:
        assert row_seeds is not None
        sampler = _SampleEachRowWithItsOwnSeed(row_seeds, prompts["input_ids"].device)
        processors.append(sampler)
    else:
        recorder = _RecordProcessedScores()
        processors.append(recorder)
        gatherer = _GatherSampledLogprob(recorder)
        stopping.append(gatherer)
    was_training = model.training
    model.eval()
    sampling = not greedy and not per_row  # per-row sampling draws in its processor; generate then picks greedily
    # Inference mode skips autograd's bookkeeping on every op (about a tenth of a small model's decoding on a CPU).
    # Its tensors may never enter autograd, so the results are cloned out below. Under FSDP (synced_gpus) training
    # refills the sharded parameters' gathered buffers in place, which tensors made in inference mode would forbid.
    try:
        with torch.no_grad() if synced_gpus else torch.inference_mode():
            inputs, cache = (prompts, {}) if prompt_pass is None else prompt_pass.generation_start(model)
            sequences = model.generate(
                **inputs,
                **cache,
                do_sample=sampling,
                **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if sampling else {}),
                repetition_penalty=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_ids,
                pad_token_id=pad_token_id,
                logits_processor=processors,
                stopping_criteria=stopping,
                use_cache=True,
                synced_gpus=synced_gpus,
            )
    finally:
        model.train(was_training)
    response_ids = sequences[:, prompts["input_ids"].shape[1] :].clone()  # (N, R)
    behaviour = torch.stack(sampler.logprobs if sampler is not None else gatherer.logprobs, dim=1).clone()  # (N, R)
    return _mask_after_end(response_ids, behaviour, eos_token_ids, pad_token_id)


def _mask_after_end(
    response_ids: torch.Tensor, behaviour: torch.Tensor, eos_token_ids: list[int], pad_token_id: int
) -> RolloutBatch:
    """Keep tokens up to and including the first end token; everything after it is padding."""
    is_end = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    ended_before = (is_end.long().cumsum(dim=1) - is_end.long()) > 0  # (N, R) an end token came earlier
    response_mask = ~ended_before
    truncated = ~is_end.any(dim=1)
    response_ids = response_ids.masked_fill(~response_mask, pad_token_id)
    behaviour = behaviour.masked_fill(~response_mask, 0.0)
    return RolloutBatch(response_ids, response_mask, behaviour, truncated)


def append_response(prompts: BatchFeature, rollout: RolloutBatch) -> BatchFeature:
    """Prompt (left-padded) + response (right-padded) as one model input, for scoring with a forward pass.

    Both views put their prompt on the left and the same response on the right, so the last R positions
    line up between student and teacher although their prompts differ in length.
    """
    prompt_shape = prompts["input_ids"].shape
    inputs = dict(prompts)
    for key, value in prompts.items():  # per-token side tensors (e.g. mm_token_type_ids): responses are text (0)
        if key not in ("input_ids", "attention_mask") and torch.is_tensor(value) and value.shape == prompt_shape:
            inputs[key] = torch.cat([value, value.new_zeros(rollout.response_ids.shape)], dim=1)
    inputs["input_ids"] = torch.cat([prompts["input_ids"], rollout.response_ids], dim=1)
    inputs["attention_mask"] = torch.cat(
        [prompts["attention_mask"], rollout.response_mask.to(prompts["attention_mask"].dtype)], dim=1
    )
    return BatchFeature(inputs)


def response_logits(
    model: torch.nn.Module, prompts: BatchFeature, rollout: RolloutBatch, *, packed: bool = False
) -> torch.Tensor:
    """Logits that predict each response token: ``(N, R, V)``, computing the LM head only where needed.

    ``packed``: one forward over the rows laid end to end without padding (``packed_response_logits``); the logits
    at masked response positions are then zeros instead of the padded forward's values (both are masked out)."""
    if packed:
        return packed_response_logits(model, prompts, rollout)
    response_length = rollout.response_ids.shape[1]
    inputs = append_response(prompts, rollout)
    output = model(**inputs, logits_to_keep=response_length + 1, use_cache=False)
    return output.logits[:, :-1, :]  # position P-1+j predicts response token j


def packing_refusal(model: torch.nn.Module) -> str | None:
    """Why ``model``'s forward cannot take packed rows (None when it can; ``packed_response_logits``).

    transformers builds a block-diagonal causal mask from position ids that restart at 0 when no attention mask is
    passed (its ``find_packed_sequence_indices``), for eager, sdpa and flash attention alike; the Qwen-VL families
    take the text positions as a fourth row ahead of their 3-D rotary ones for that. Recurrent layers (Qwen3.5's
    Gated DeltaNet) carry their state across the row boundary in PyTorch's reference kernel, and a sliding window
    is not checked here, so both are refused; so is a model whose loss is computed inside its forward on labels.
    """
    other_layers, sliding_window = _attention_kinds(model)
    if other_layers:
        return f"its {', '.join(other_layers)} layers would carry state from one packed row into the next"
    if sliding_window:
        return "its sliding-window attention is not checked against packed rows"
    return None


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attention_kinds(model: torch.nn.Module) -> tuple[list[str], bool]:
    """The language model's layer kinds other than full attention (sorted), and whether it uses a sliding window:
    what both the packed forward and the shared prompt pass must refuse."""
    text_config = _text_config(model)
    other_layers = sorted(
        {kind for kind in getattr(text_config, "layer_types", None) or [] if kind != "full_attention"}
    )
    return other_layers, bool(getattr(text_config, "use_sliding_window", False))


def packed_response_logits(model: torch.nn.Module, prompts: BatchFeature, rollout: RolloutBatch) -> torch.Tensor:
    """``response_logits`` from one forward over the rows' real tokens laid end to end (no left or right padding):
    ``(N, R, V)``, zeros at the masked response positions.

    Each row keeps its own positions, counting from 0 (and, for the Qwen-VL families, the 3-D rotary positions a
    padded forward computes for it, with the text positions ahead of them), and no attention mask is passed, so the
    attention is block-diagonal: a row sees only itself. The images keep their order (each row's image tokens are
    where its features go), so the pixel tensors pass through as they are. The LM head runs only where a response
    token is predicted. Equal to the padded forward at every kept position up to rounding (tested, gradients too).
    """
    whole = append_response(prompts, rollout)
    kept = whole["attention_mask"].bool()  # (N, P + R): real prompt and response tokens
    rows = kept.shape[0]
    device = kept.device
    per_token = _per_token_keys(whole)
    inputs: dict[str, Any] = {key: value for key, value in whole.items() if key not in per_token}
    for key in per_token:
        if key != "attention_mask":
            inputs[key] = whole[key][kept].unsqueeze(0)  # (1, T) in row order
    lengths = kept.sum(dim=1)  # (N,)
    starts = torch.cumsum(lengths, dim=0) - lengths  # each row's first place in the packed row
    # Position within the row (0, 1, ...) at each real token, in the packed row's order.
    text = (kept.long().cumsum(dim=1) - 1)[kept].unsqueeze(0)  # (1, T)
    positions = _positions(model, whole)
    if positions is None:
        inputs["position_ids"] = text
    else:  # (3, N, P + R) rotary positions: the real tokens', behind the text positions that separate the rows
        inputs["position_ids"] = torch.cat([text.unsqueeze(0), positions[:, kept].unsqueeze(1)], dim=0)
    # Place P - 1 + j of padded row i predicts response token j; packed, the response's j-th token sits at
    # start_i + length_i - r_i + j, so the prediction is one before it.
    response_length = rollout.response_ids.shape[1]
    counts = rollout.response_mask.sum(dim=1)  # (N,) real response tokens (a prefix: _mask_after_end)
    offsets = torch.arange(response_length, device=device)
    wanted = rollout.response_mask.bool()  # (N, R)
    places = (starts + lengths - counts - 1).unsqueeze(1) + offsets.unsqueeze(0)  # (N, R)
    selected = places[wanted]  # (K,) ascending: rows in order, each row's positions in order
    output = model(**inputs, attention_mask=None, logits_to_keep=selected, use_cache=False)
    scores = output.logits[0]  # (K, V)
    logits = scores.new_zeros((rows, response_length, scores.shape[-1]))
    logits[wanted] = scores
    return logits


# What a prompt pass's generation start needs none of: its images are in the cache already.
_IMAGE_INPUT_KEYS = (*PIXEL_KEYS, "mm_encoder_outputs")


def _cache_keyword(model: torch.nn.Module) -> str:
    """The name this model's forward takes its KV cache under (``cache`` from transformers 5.x's rename on)."""
    base = unwrap_model(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _per_token_keys(prompts: BatchFeature) -> list[str]:
    """The tensors laid out like ``input_ids`` (the attention mask, mm_token_type_ids and other side tensors)."""
    shape = prompts["input_ids"].shape
    return [key for key, value in prompts.items() if torch.is_tensor(value) and value.shape == shape]


def prompt_pass_refusal(model: torch.nn.Module) -> str | None:
    """Why ``model``'s prompt forward cannot serve both sampling and scoring (None when it can; ``PromptPass``).

    The cache must carry its gradient as plain tensors (full attention only: linear-attention states and sliding
    windows are updated in place), and the forward in training mode must equal the one ``generate`` runs in
    evaluation mode (no active dropout), since ``generate`` samples from the cache the training-mode pass made.
    """
    other_layers, sliding_window = _attention_kinds(model)
    if other_layers:
        return f"its {', '.join(other_layers)} layers keep a cache that is updated in place"
    if sliding_window:
        return "its sliding-window attention keeps a cache that is updated in place"
    if (getattr(_text_config(model), "attention_dropout", 0.0) or 0.0) > 0:
        return "its attention dropout makes the training-mode forward differ from the one generate runs"
    dropout = next((m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0), None)
    if dropout is not None:
        return f"a dropout of {dropout.p} makes the training-mode forward differ from the one generate runs"
    return None


@dataclass
class PromptPass:
    """The student's forward over its prompts but their last token, in the caller's grad mode, whose KV cache serves
    both the sampling and the scoring.

    The scoring forward would otherwise run the prompts a second time: ``generate`` runs them without gradient, the
    loss needs them with it. Here ``generate`` starts from a detached copy of the cache (it runs the last prompt
    token, then the response), and ``response_logits`` runs the last prompt token and the response on the cache
    itself, so the gradient flows back through the cached keys and values into the prompt's own forward. The result
    equals a forward over prompt + response up to rounding (tested, gradients included). Only for models that
    ``prompt_pass_refusal`` accepts; build it in the mode the scoring forward runs in (training).
    """

    prompts: BatchFeature
    cache: DynamicCache

    @classmethod
    def run(cls, model: torch.nn.Module, prompts: BatchFeature) -> PromptPass:
        inputs = dict(prompts)
        for key in _per_token_keys(prompts):
            inputs[key] = prompts[key][:, :-1]
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is not None and bool((prompts["input_ids"][:, -1] == image_token_id).any()):
            raise ValueError("a prompt ends with an image token: its last token must be text to start a prompt pass")
        output = model(**inputs, use_cache=True, logits_to_keep=1)
        cache = getattr(output, "cache", None) or output.past_key_values
        if type(cache) is not DynamicCache or any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
            raise ValueError(f"{type(model).__name__} returned a {type(cache).__name__}, not a plain dynamic cache")
        return cls(prompts, cache)

    @property
    def prompt_length(self) -> int:
        return int(self.prompts["input_ids"].shape[1])

    def generation_start(self, model: torch.nn.Module) -> tuple[BatchFeature, dict[str, DynamicCache]]:
        """``generate``'s inputs: the prompts without their images (all cached) and a detached copy of the cache,
        which ``generate`` extends as it goes while this one stays for the scoring."""
        with torch.no_grad():
            copy = DynamicCache(
                ddp_cache_data=[(layer.keys.detach(), layer.values.detach()) for layer in self.cache.layers]
            )
        prompts = BatchFeature({key: value for key, value in self.prompts.items() if key not in _IMAGE_INPUT_KEYS})
        return prompts, {_cache_keyword(model): copy}

    def response_logits(self, model: torch.nn.Module, rollout: RolloutBatch) -> torch.Tensor:
        """``response_logits(model, prompts, rollout)`` from a forward over the last prompt token and the response but
        its last token, on this pass's cache: ``(N, R, V)``, or the hidden states with the head bypassed. Once only:
        the forward extends the cache."""
        start = self.prompt_length - 1
        whole = append_response(self.prompts, rollout)  # prompt + response: the positions are computed over it
        keep = start + rollout.response_ids.shape[1]  # up to the response's last token, which predicts nothing
        per_token = _per_token_keys(whole)
        inputs = {key: whole[key][:, start:keep] for key in per_token if key != "attention_mask"}
        inputs["attention_mask"] = whole["attention_mask"][:, :keep]
        positions = _positions(
            model, {key: value[:, :keep] if key in per_token else value for key, value in whole.items()}
        )
        if positions is not None:
            inputs["position_ids"] = positions[..., start:keep]
        output = model(**inputs, **{_cache_keyword(model): self.cache}, use_cache=True)
        return output.logits


def _positions(model: torch.nn.Module, inputs: BatchFeature | dict) -> torch.Tensor | None:
    """The position ids a forward over ``inputs`` from scratch would use, where the family computes its own (the
    Qwen-VL families' 3-D rotary positions, which depend on where the images are); None where they simply count."""
    base = unwrap_model(model)
    inner = getattr(base, "model", base)
    compute = getattr(inner, "compute_3d_position_ids", None)
    if compute is None:
        return None
    wanted = inspect.signature(compute).parameters
    arguments = {key: value for key, value in inputs.items() if key in wanted}
    arguments.setdefault("inputs_embeds", None)
    # Releases differ in which of these they require (transformers 5.19's Qwen2.5-VL also wants video_grid_thw and
    # past_key_values): what these inputs lack is None, a forward from scratch over images only.
    for name, parameter in wanted.items():
        if parameter.default is inspect.Parameter.empty and parameter.kind is not parameter.VAR_KEYWORD:
            arguments.setdefault(name, None)
    positions = compute(**arguments)
    if positions is None:
        raise ValueError(f"{type(base).__name__} could not compute the 3-D positions of these prompts")
    return positions


def _head_slot(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.Module]:
    """(parent module, attribute name, the LM head) of ``model``'s output embeddings."""
    head = model.get_output_embeddings()
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is head:
                return parent, name, head
    raise ValueError(f"{type(model).__name__} has no LM head module to take the hidden states from")


def head_bypass_refusal(model: torch.nn.Module) -> str | None:
    """Why the logits of ``model`` are not simply ``hidden @ lm_head.weight.T`` (None when they are).

    The loss from hidden states (``vopd.divergence.hidden_distillation_loss``) applies the head itself, so it needs a
    plain linear head without bias, and no logit scaling or soft-capping after it (Gemma, Cohere).
    """
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain Linear layer"
    if head.bias is not None:
        return "the LM head has a bias"
    text_config = _text_config(model)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(text_config, name, None)
        if value not in (None, 1, 1.0):
            return f"the model transforms its logits after the head ({name}={value})"
    return None


@contextmanager
def head_bypassed(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """While inside, ``model``'s forward returns the LM head's *inputs* (final hidden states) as its "logits".

    Yields the head module (set aside); read its ``weight`` *after* the forward: under FSDP2 that is when the
    root's parameters are whole (they stay so until the backward has used them). Call the forward through any
    wrapper of ``model`` (DDP): the wrapper runs the same module, so its gradient hooks still see every parameter,
    the head's included once the loss uses its weight. Only for models ``head_bypass_refusal`` accepts.
    """
    refusal = head_bypass_refusal(model)
    if refusal is not None:
        raise ValueError(f"cannot take the hidden states in place of the logits: {refusal}")
    parent, name, head = _head_slot(model)
    setattr(parent, name, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, name, head)


# --------------------------------------------------------------------------------------------------------------
# The engine seam


class RolloutEngine(Protocol):
    """What samples the student's rollouts. The trainer calls, per step: ``wake``, ``sample`` for each micro-batch,
    ``sleep``; after each optimizer step ``sync``; at the end ``close``. Sampling settings (temperature, top-p, the
    response budget, suppressed and end tokens) are fixed when the engine is made."""

    name: str
    # True when sampling runs the trained student itself (so a ``PromptPass`` of its prompts can serve it).
    samples_with_the_student: bool

    def sample(
        self,
        conversations: Sequence[Any],
        prompts: BatchFeature,
        *,
        row_seeds: list[int],
        prompt_pass: PromptPass | None = None,
    ) -> RolloutBatch:
        """One response per row of ``conversations`` (one chat per row, rollouts repeated), aligned with ``prompts``
        (the same rows encoded by the student's processor); row i drawn with ``row_seeds[i]`` alone."""
        ...

    def sync(self, model: torch.nn.Module, *, everything: bool = False) -> float:
        """Make the engine sample from ``model``'s current weights; returns the seconds it took. ``everything``:
        every weight (at the start and after a resume), else those a step can have changed."""
        ...

    def wake(self) -> None:
        """Before a rollout phase: take back the device memory given up by ``sleep``."""
        ...

    def sleep(self) -> None:
        """After a rollout phase: give the device memory to training until the next ``wake``."""
        ...

    def close(self) -> None:
        """Free the engine for good."""
        ...


class HFRolloutEngine:
    """Rollouts from the student itself through ``generate`` (``sample_rollouts``): nothing to sync, nothing to free.

    ``synced_gpus`` keeps every rank stepping until all have finished (FSDP: every forward is a collective)."""

    name = "hf"
    samples_with_the_student = True

    def __init__(self, model: torch.nn.Module, loaded: LoadedModel, rollout: RolloutConfig, *, synced_gpus: bool):
        self.model = model
        self.loaded = loaded
        self.rollout = rollout
        self.synced_gpus = synced_gpus

    def sample(
        self,
        conversations: Sequence[Any],
        prompts: BatchFeature,
        *,
        row_seeds: list[int],
        prompt_pass: PromptPass | None = None,
    ) -> RolloutBatch:
        return sample_rollouts(
            self.model,
            prompts,
            max_new_tokens=self.rollout.max_new_tokens,
            temperature=self.rollout.temperature,
            top_p=self.rollout.top_p,
            eos_token_ids=self.loaded.eos_token_ids,
            pad_token_id=self.loaded.pad_token_id,
            suppressed_token_ids=self.loaded.suppressed_token_ids,
            row_seeds=row_seeds,
            synced_gpus=self.synced_gpus,
            prompt_pass=prompt_pass,
        )

    def sync(self, model: torch.nn.Module, *, everything: bool = False) -> float:
        return 0.0  # the student samples with its own weights

    def wake(self) -> None:
        pass

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


VLLM_EXTRA_HINT = "install the vllm extra (pip install 'vision-opd-studio[vllm]'), or set rollout.engine: hf"


def vllm_installed() -> bool:
    """Whether vLLM can be imported here, without importing it (that takes tens of seconds)."""
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_name(rollout: RolloutConfig, device: torch.device, strategy: str = "single") -> tuple[str, str]:
    """(engine name, why): what ``rollout.engine`` means on this device (``resolve_engine``)."""
    return resolve_engine(rollout.engine, device, strategy, setting="rollout.engine")


def resolve_engine(
    engine: str, device: torch.device, strategy: str = "single", *, setting: str = "engine"
) -> tuple[str, str]:
    """(engine name, why): what an engine setting (``setting``: rollout.engine for training, engine for evaluation)
    means on this device. ``auto`` takes vLLM only where it pays (a CUDA device, vLLM installed); an explicit
    ``vllm`` that cannot run is an error naming the fix. Under ``strategy`` ddp or fsdp each training process owns an
    engine of its own (``vopd.vllm_engine``), so the strategy changes nothing here."""
    if engine == "hf":
        return "hf", f"{setting} is hf"
    if engine == "vllm":
        if not vllm_installed():
            hint = VLLM_EXTRA_HINT.replace("rollout.engine", setting)
            raise ValueError(f"{setting} vllm: vLLM is not installed; {hint}")
        return "vllm", f"{setting} is vllm"
    if device.type != "cuda":
        return "hf", f"{setting} auto decodes with transformers on {device.type}"
    if not vllm_installed():
        return "hf", f"{setting} auto: vLLM is not installed (the vllm extra); decoding with transformers"
    return "vllm", f"{setting} auto: vLLM is installed and the device is a CUDA GPU" + (
        f" (an engine per {strategy} process)" if strategy != "single" else ""
    )
