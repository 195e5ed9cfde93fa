"""A memory plan before anything loads: per-device bytes of a training run, from a model's config.json and a config.

``read_model_shape`` reads the shape of a model folder without its weights: its config.json, its processor's pixel
limit, and a model built on the ``meta`` device (no storage), whose parameters are counted by role (vision tower, LM
head, the largest block, LoRA's target layers). ``plan_memory`` is a pure function of that shape, a ``TrainConfig``
and the machine (world size, device type, device memory); it returns every term by name, whether the total fits, and
the smallest changes that make it fit (each one planned again). ``vopd train --dry-run`` prints it.

The terms, per device (``S`` = the world size under FSDP, 1 otherwise; ``m`` the master dtype's bytes, ``c`` the
compute dtype's):

* ``masters``: every weight the student holds, in its dtype (a full fine-tune: all in ``m``; LoRA: the base in
  ``c``, the adapters in fp32), / S.
* ``gradients``: one per trainable weight, in its dtype, / S.
* ``optimizer``: AdamW's two moments per trainable weight, / S.
* ``teacher``: the EMA (or fixed, progressive, trust-region) teacher: a whole copy of the model in a full fine-tune,
  a copy of the adapters with LoRA, nothing for ``current`` / S.
* ``compute_copies``: under autocast (``m`` > ``c``), the compute-dtype copy of each trainable weight, which
  autocast caches for the whole forward; under FSDP also the gathered block being computed and the prefetched next.
* ``rollout_engine``: the sampling engine's own reservation: 0 for ``hf`` (``generate`` on the student, counted under
  activations); ``rollout.vllm.gpu_memory_utilization`` x the device memory for a colocated ``vllm`` engine.
* ``activations``: the largest phase of a step at the largest micro-batch: the student's forward and backward (the
  tensors saved for the backward, block by block, or with checkpointing one hidden vector per token and block plus one
  block recomputed), generation's KV cache, the loss's logits where they are built; with and without checkpointing.
* ``runtime``: an allowance for the CUDA context, kernels' workspaces and allocator slack on a GPU (0 on a CPU, where
  the plan counts tensors only).

The offload settings (``runtime.offload_optimizer``, ``offload_params`` under fsdp, ``offload_teacher``) move terms
to ``host_bytes`` (per process): AdamW's moments with its host copies of the weights and gradients; the shards, their
gradients and AdamW's state; the teacher, whose streamed blocks then count in the teacher's forward phase.

The activation formula counts the tensors a block saves for its backward (two norms, the attention's q/k/v and
output, the MLP's four intermediates; Qwen3.5's attention gate and q/k norms; for its Gated DeltaNet blocks what
the reference chunked kernel keeps: fp32 copies, chunk x chunk matrices and one state per chunk, from the config's
linear-attention heads); ``bench/plan_memory.py`` checks it against the peaks measured on the CPU
(bench/RESULTS.md). What is only planned and never measured (bf16 autocast copies, FSDP's gathered blocks, the CUDA
allowance, a vLLM engine) is said in docs/scaling.md.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vopd.config import TrainConfig

GIB = 1024**3
# A GPU's memory that no tensor of ours holds: the CUDA context, cuBLAS/cuDNN workspaces, the caching allocator's
# fragmentation. An allowance, not a measurement.
CUDA_RUNTIME_BYTES = 1 * GIB
# Tokens of a prompt that are not image tokens (chat template, question, options, the hint): an assumption, stated in
# the plan; ``prompt_tokens`` overrides the whole prompt length.
TEXT_PROMPT_TOKENS = 96
# Rows of the loss from hidden states computed together (``vopd.divergence``): a few [chunk, V] fp32 blocks.
LOSS_CHUNK_ROWS = 256


@dataclass(frozen=True)
class BlockShape:
    """One stack of transformer blocks: what its saved activations and KV cache scale with."""

    layers: int
    hidden: int
    intermediate: int
    q_dim: int  # attention heads x head width
    kv_dim: int  # key/value heads x head width
    cache_layers: int  # blocks that keep a KV cache while generating (full attention)
    # Qwen3.5-style full attention: an output gate (q_proj twice as wide) and RMS norms over q and k heads.
    gated_attention: bool = False
    # Gated DeltaNet (linear-attention) blocks among ``layers``, and their key/value heads and head widths.
    linear_layers: int = 0
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model, read without its weights (``read_model_shape``)."""

    model_type: str
    parameters: int  # every parameter once (tied embeddings counted once)
    vision_parameters: int  # the vision tower's, frozen by ``freeze_vision_tower``
    largest_block_parameters: int  # the biggest decoder or vision block: FSDP gathers one at a time
    vocab: int
    text: BlockShape
    vision: BlockShape | None
    # LoRA's candidate layers: (last name component, in features, out features, inside the vision tower).
    linear_layers: tuple[tuple[str, int, int, bool], ...] = ()
    image_tokens: int = 0  # tokens of one image at the processor's pixel limit (merged, as the text model sees them)
    pixels_per_token: int | None = None  # Qwen-VL families: (patch x merge)^2 pixels per token; None: a fixed count
    patches_per_token: int = 1  # vision-tower positions per merged token (merge^2)
    # Parameters outside every transformer block (embeddings, LM head, final norm, the vision tower's patch embedding
    # and merger): what a streamed (offloaded) module keeps on the device for a whole forward.
    non_block_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("linear_layers")
        return data


# ------------------------------------------------------------------------------------------------------ reading
def _text_block(text_config: Any, *, gated_attention: bool = False) -> BlockShape:
    hidden = int(text_config.hidden_size)
    heads = int(getattr(text_config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(text_config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    layers = int(text_config.num_hidden_layers)
    layer_types = list(getattr(text_config, "layer_types", None) or [])
    cache_layers = sum(kind == "full_attention" for kind in layer_types) if layer_types else layers
    linear = sum(kind == "linear_attention" for kind in layer_types)
    return BlockShape(
        layers=layers,
        hidden=hidden,
        intermediate=int(getattr(text_config, "intermediate_size", 4 * hidden)),
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        cache_layers=cache_layers,
        gated_attention=gated_attention,
        linear_layers=linear,
        linear_key_heads=int(getattr(text_config, "linear_num_key_heads", 0) or 0) if linear else 0,
        linear_value_heads=int(getattr(text_config, "linear_num_value_heads", 0) or 0) if linear else 0,
        linear_key_dim=int(getattr(text_config, "linear_key_head_dim", 0) or 0) if linear else 0,
        linear_value_dim=int(getattr(text_config, "linear_value_head_dim", 0) or 0) if linear else 0,
    )


def _vision_block(vision_config: Any) -> BlockShape | None:
    if vision_config is None:
        return None
    hidden = int(getattr(vision_config, "embed_dim", None) or vision_config.hidden_size)
    layers = int(getattr(vision_config, "depth", None) or getattr(vision_config, "num_hidden_layers", 0))
    ratio = getattr(vision_config, "mlp_ratio", None)
    intermediate = getattr(vision_config, "intermediate_size", None) or int(hidden * (ratio or 4))
    return BlockShape(layers, hidden, int(intermediate), hidden, hidden, 0)


def _image_tokens(folder: Path, config: Any, vision: Any) -> tuple[int, int | None, int]:
    """(tokens of one image at the processor's pixel limit, pixels per token or None, vision positions per token)."""
    processor: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            processor = data.get("image_processor", data) if isinstance(data, dict) else {}
            break
    merge = int(getattr(vision, "spatial_merge_size", None) or processor.get("merge_size") or 1)
    patch = int(getattr(vision, "patch_size", None) or processor.get("patch_size") or 14)
    max_pixels = processor.get("max_pixels") or (processor.get("size") or {}).get("longest_edge")
    if getattr(vision, "spatial_merge_size", None) is not None and max_pixels:  # Qwen-VL families: pixels decide
        per_token = (patch * merge) ** 2
        return int(max_pixels) // per_token, per_token, merge * merge
    fixed = getattr(config, "image_seq_length", None) or getattr(config, "mm_tokens_per_image", None)
    if fixed is None and vision is not None and getattr(vision, "image_size", None):
        fixed = (int(vision.image_size) // patch) ** 2
    return int(fixed or 0), None, 1


def read_model_shape(folder: str | Path) -> ModelShape:
    """The shape of the model in ``folder`` from its config.json alone: no weight is read (the model is built on the
    meta device, which allocates nothing, so that every family's parameters are counted exactly)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vopd.models import vision_tower_module

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json to plan from (a model folder or a checkpoint)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    seen: set[int] = set()
    parameters = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            parameters += parameter.numel()
    try:
        tower = vision_tower_module(model)
    except ValueError:
        tower = None
    vision_parameters = sum(p.numel() for p in tower.parameters()) if tower is not None else 0
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    largest = max((sum(p.numel() for p in block.parameters()) for block in blocks), default=0)
    nested = {id(child) for block in blocks for child in block.modules() if child is not block}
    in_blocks = {id(p) for block in blocks if id(block) not in nested for p in block.parameters()}
    non_block = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_blocks)
    tower_ids = {id(module) for module in tower.modules()} if tower is not None else set()
    linears = tuple(
        (name.rsplit(".", 1)[-1], module.in_features, module.out_features, id(module) in tower_ids)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    text_config = config.get_text_config()
    # Qwen3.5-style gated attention: a q projection twice the heads' width (queries and their output gate).
    heads = int(getattr(text_config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // heads)
    gated = any(
        name == "q_proj" and fan_out == 2 * heads * head_dim and not in_vision
        for name, _, fan_out, in_vision in linears
    )
    vision_config = getattr(config, "vision_config", None)
    image_tokens, pixels_per_token, patches_per_token = _image_tokens(folder, config, vision_config)
    return ModelShape(
        model_type=str(config.model_type),
        parameters=parameters,
        vision_parameters=vision_parameters,
        largest_block_parameters=largest,
        vocab=int(text_config.vocab_size),
        text=_text_block(text_config, gated_attention=gated),
        vision=_vision_block(vision_config),
        linear_layers=linears,
        image_tokens=image_tokens,
        pixels_per_token=pixels_per_token,
        patches_per_token=patches_per_token,
        non_block_parameters=non_block,
    )


# ------------------------------------------------------------------------------------------------------ the plan
@dataclass
class MemoryPlan:
    """Per-device bytes of a run by term, whether they fit, and what would make them fit."""

    per_device_bytes: dict[str, int]  # each term by name, and "total"
    device_memory_bytes: int
    fits: bool
    activations: dict[str, Any]  # with and without checkpointing, and the phase that peaks
    assumptions: dict[str, Any]  # what the numbers rest on (world size, dtypes, rows, tokens...)
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    # What each process keeps in the host's memory instead (the offload settings), by term, and "total".
    host_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dtype_bytes(name: str, device_type: str) -> int:
    if name == "auto":
        return 2 if device_type == "cuda" else 4
    return 4 if name == "float32" else 2


def _block_saved_bytes(block: BlockShape, compute_bytes: int, tokens: int) -> int:
    """Bytes a block saves for its backward over ``tokens`` positions (no checkpointing).

    Each norm keeps its input and its normalised output in fp32 (the residual stream stays fp32 under autocast, since
    the embeddings' output is), plus their cast to the compute dtype that the next projections share; the attention
    keeps q, k, v (after the rotary embedding), its output and that output's re-laid-out copy (the output projection's
    input); the gated MLP keeps the gate and up projections, the activated gate and their product.
    """
    norms = 2 * (8 * block.hidden + (compute_bytes * block.hidden if compute_bytes < 4 else 0))
    attention = compute_bytes * (3 * block.q_dim + 2 * block.kv_dim)
    if block.gated_attention:
        # The q projection's gate half, its sigmoid and the gated product (the output projection's input); the q and
        # k heads' RMS norms keep their fp32 normalised values and their cast back.
        attention += 3 * compute_bytes * block.q_dim + (4 + compute_bytes) * (block.q_dim + block.kv_dim)
    mlp = compute_bytes * 4 * block.intermediate
    return tokens * (norms + attention + mlp)


# The reference chunked kernel of the gated delta rule (transformers' ``torch_chunk_gated_delta_rule``) splits the
# sequence into chunks of this many positions (its ``chunk_size`` default).
DELTA_RULE_CHUNK = 64


def _linear_block_saved_bytes(block: BlockShape, compute_bytes: int, tokens: int, rows: int) -> int:
    """Bytes a Gated DeltaNet block saves for its backward over ``tokens`` positions in ``rows`` rows (no
    checkpointing), as PyTorch's reference chunked kernel keeps them (what runs where flash-linear-attention is not
    installed, and on every CPU).

    Outside the kernel, in the compute dtype: the convolution's input and its activation's input (q, k and v
    together), the output gate z. Inside it, in fp32 with each key head repeated for its value heads (width ``kv`` =
    value heads x key width): q and k each as copied, normalised and padded, and decayed (3 each), v copied and padded,
    beta x k and beta x v, the triangular solves' outputs, each chunk's corrected values and the output; per position
    five chunk x chunk matrices per value head (the pairwise decays, the UT system and the intra-chunk attention,
    before and after their masks); per chunk the recurrent state (value heads x key width x value width). The gated
    RMS norm keeps its fp32 input, normalised and weighted values and the gate's activation, and its output.
    """
    chunk = DELTA_RULE_CHUNK
    key = block.linear_key_heads * block.linear_key_dim
    value = block.linear_value_heads * block.linear_value_dim
    kv = block.linear_value_heads * block.linear_key_dim
    per_token = 2 * (8 * block.hidden + (compute_bytes * block.hidden if compute_bytes < 4 else 0))  # the norms
    per_token += compute_bytes * (2 * (2 * key + value) + value)  # convolution in and activation in; the gate z
    per_token += 4 * (8 * kv + 6 * value)  # the kernel's q, k, v copies and their products
    per_token += 4 * 5 * block.linear_value_heads * chunk  # chunk x chunk matrices
    per_token += 4 * 4 * value + compute_bytes * value  # the gated norm; its output, the out projection's input
    per_token += compute_bytes * 4 * block.intermediate  # the MLP
    # The kernel pads each row to whole chunks; one recurrent state per chunk.
    padded = rows * math.ceil(tokens / max(rows, 1) / chunk) * chunk
    states = rows * math.ceil(tokens / max(rows, 1) / chunk) * 4 * block.linear_value_heads
    states *= block.linear_key_dim * block.linear_value_dim
    chunk_part = 4 * 5 * block.linear_value_heads * chunk
    return tokens * (per_token - chunk_part) + padded * chunk_part + states


def _text_saved_bytes(block: BlockShape, compute_bytes: int, tokens: int, rows: int) -> tuple[int, int]:
    """(bytes every block saves together, bytes the largest block saves) over ``tokens`` positions in ``rows``."""
    full = _block_saved_bytes(block, compute_bytes, tokens)
    if not block.linear_layers:
        return block.layers * full, full
    linear = _linear_block_saved_bytes(block, compute_bytes, tokens, rows)
    return (block.layers - block.linear_layers) * full + block.linear_layers * linear, max(full, linear)


def _rows_and_tokens(config: TrainConfig, shape: ModelShape, world_size: int, prompt_tokens: int | None):
    rows = max(1, config.batch_size // max(world_size, 1)) * config.rollout.num_rollouts
    source = "given"
    if prompt_tokens is None:
        image = shape.image_tokens
        source = "processor pixel limit"
        if shape.pixels_per_token and config.views.max_pixels is not None:
            image = (
                min(image, config.views.max_pixels // shape.pixels_per_token)
                if image
                else (config.views.max_pixels // shape.pixels_per_token)
            )
            source = "views.max_pixels"
        prompt_tokens = image + TEXT_PROMPT_TOKENS
    return rows, prompt_tokens, source


def forward_tokens(rows: int, row_tokens: int, budget: int | None) -> int:
    """Tokens of the largest training forward: every row at full length, or as many whole rows as the token budget
    holds (at least one: a row longer than the budget runs alone). Planned at full length, the worst case."""
    if budget is None:
        return rows * row_tokens
    return max(1, min(rows, budget // row_tokens)) * row_tokens


def activation_bytes(
    shape: ModelShape,
    config: TrainConfig,
    *,
    world_size: int = 1,
    device_type: str = "cuda",
    prompt_tokens: int | None = None,
    checkpointing: bool | None = None,
) -> dict[str, Any]:
    """The largest phase of a step at the largest micro-batch, in bytes, and each phase's figure."""
    checkpointing = config.runtime.gradient_checkpointing if checkpointing is None else checkpointing
    compute = _dtype_bytes(config.runtime.dtype, device_type)
    rows, prompt, _ = _rows_and_tokens(config, shape, world_size, prompt_tokens)
    response = config.rollout.max_new_tokens
    tokens = forward_tokens(rows, prompt + response, config.runtime.max_tokens_per_micro_batch)
    forward_rows = max(1, tokens // (prompt + response))
    text = shape.text
    all_blocks, one_block = _text_saved_bytes(text, compute, tokens, forward_rows)
    # The backward of a block holds the gradients of its widest tensors for a moment (the MLP's, the hidden state's).
    backward_transient = tokens * (2 * compute * text.intermediate + 3 * 4 * text.hidden)
    # With checkpointing, one block recomputed at a time; its saved tensors are released as its backward consumes
    # them, which offsets the gradients' transients (measured on the CPU: bench/RESULTS.md).
    recomputed = text.layers * tokens * 4 * text.hidden + one_block
    student = recomputed if checkpointing else all_blocks + backward_transient
    student += tokens * 4 * text.hidden * 2  # the embeddings' output and the final norm's
    vision = shape.vision
    if vision is not None and not config.freeze_vision_tower and shape.image_tokens:
        # A trained encoder runs in every forward with gradient: its positions per row are the image's patches.
        image_tokens = max(prompt - TEXT_PROMPT_TOKENS, 0)
        patches = forward_rows * image_tokens * shape.patches_per_token
        vision_block = _block_saved_bytes(vision, compute, patches)
        student += vision_block * (1 if checkpointing else vision.layers)
        if checkpointing:
            student += vision.layers * patches * 4 * vision.hidden
    vocab_rows = forward_rows * response
    if config.divergence.from_hidden_states and config.divergence.mode == "full_logits":
        # Both sides' hidden states at the response, the student's gradient of them, a few [chunk, V] blocks.
        loss = vocab_rows * text.hidden * 4 * 3 + 4 * min(vocab_rows, LOSS_CHUNK_ROWS) * shape.vocab * 4
    else:  # both sides' (rows, response, V) logits and the student's gradient of them
        loss = vocab_rows * shape.vocab * 4 * 3
    # Generation: the KV cache of every row at full length, one step's logits; the teacher's forward keeps only its
    # hidden states (no gradient): one block's widest tensors at a time.
    cache = rows * (prompt + response) * text.cache_layers * 2 * text.kv_dim * compute
    generation = cache + rows * shape.vocab * 4 * 3
    teacher = tokens * (3 * compute * text.intermediate + 4 * 4 * text.hidden)
    phases = {"student_backward": student + loss, "generation": generation, "teacher_forward": teacher}
    peak_phase = max(phases, key=phases.__getitem__)
    return {"bytes": phases[peak_phase], "phase": peak_phase, "phases": phases, "rows": forward_rows, "tokens": tokens}


def _lora_parameters(shape: ModelShape, config: TrainConfig) -> int:
    wanted = set(config.lora.target_modules)
    return sum(
        config.lora.rank * (fan_in + fan_out)
        for name, fan_in, fan_out, in_vision in shape.linear_layers
        if name in wanted and (not in_vision or not config.freeze_vision_tower)
    )


def _rollout_engine_bytes(config: TrainConfig, device_memory: int, device_type: str) -> int:
    """A colocated vLLM engine reserves ``rollout.vllm.gpu_memory_utilization`` of the device up front (on a CUDA
    device, where ``auto`` picks it when vLLM is installed and one process trains); ``generate`` reserves nothing."""
    from vopd.rollout import vllm_installed

    engine = config.rollout.engine
    if engine == "auto":
        single = config.runtime.strategy == "single"
        engine = "vllm" if device_type == "cuda" and single and vllm_installed() else "hf"
    if engine != "vllm" or device_type != "cuda":
        return 0
    return int(config.rollout.vllm.gpu_memory_utilization * device_memory)


def plan_memory(
    shape: ModelShape,
    config: TrainConfig,
    *,
    world_size: int = 1,
    device_type: str = "cuda",
    device_memory: int = 80 * GIB,
    prompt_tokens: int | None = None,
    suggest: bool = True,
) -> MemoryPlan:
    """Per-device bytes of ``config`` on ``shape`` with ``world_size`` devices of ``device_memory`` bytes each."""
    runtime = config.runtime
    compute = _dtype_bytes(runtime.dtype, device_type)
    lora = config.lora.enabled
    master = 4 if lora or runtime.master_dtype == "float32" else compute
    shards = world_size if runtime.strategy == "fsdp" else 1
    if lora:
        trainable = _lora_parameters(shape, config)
        held = shape.parameters * compute + trainable * 4  # the base in the compute dtype, the adapters in fp32
        teacher = trainable * 4 if config.teacher.mode in ("ema", "progressive") else 0
    else:
        trainable = shape.parameters - (shape.vision_parameters if config.freeze_vision_tower else 0)
        held = shape.parameters * master
        teacher = shape.parameters * master if config.teacher.mode != "current" else 0
    fsdp = runtime.strategy == "fsdp"
    copies = trainable * compute if compute < master else 0
    gathered = 2 * shape.largest_block_parameters * master  # the block being computed and the prefetched next
    if fsdp and (world_size > 1 or runtime.offload_params):
        copies += gathered
    if fsdp and runtime.offload_params:  # the root unit (outside every block) is copied over for the whole forward
        copies += shape.non_block_parameters * master
    # The teacher's weights on the device while it scores, when they live on the host: streamed block by block (the
    # weights outside the blocks for the whole forward); an adapter is copied into the student's, costing nothing.
    streamed = 0
    if runtime.offload_teacher and teacher and not lora:
        blocks = gathered if fsdp else shape.largest_block_parameters * master
        streamed = blocks + shape.non_block_parameters * master
    activations = activation_bytes(
        shape, config, world_size=world_size, device_type=device_type, prompt_tokens=prompt_tokens
    )
    other = activation_bytes(
        shape,
        config,
        world_size=world_size,
        device_type=device_type,
        prompt_tokens=prompt_tokens,
        checkpointing=not runtime.gradient_checkpointing,
    )
    for figures in (activations, other):
        if streamed:
            figures["phases"]["teacher_forward"] += streamed
            figures["phase"] = max(figures["phases"], key=figures["phases"].__getitem__)
            figures["bytes"] = figures["phases"][figures["phase"]]
    state = {
        "masters": math.ceil(held / shards),
        "gradients": math.ceil(trainable * master / shards),
        "optimizer": math.ceil(2 * trainable * master / shards),
        "teacher": math.ceil(teacher / shards),
    }
    # Where each offload setting moves a term: to the host, whole (per process).
    host: dict[str, int] = {}
    if fsdp and runtime.offload_params:  # FSDP2's CPU offload: the shards, their gradients and so AdamW's state
        for name in ("masters", "gradients", "optimizer"):
            host[name] = state.pop(name)
    elif runtime.offload_optimizer and not fsdp:
        # AdamW's moments, plus its host copy of each trainable weight and a host buffer for each gradient.
        host["optimizer"] = state.pop("optimizer") + 2 * math.ceil(trainable * master)
    if runtime.offload_teacher and teacher:
        host["teacher"] = state.pop("teacher")
    terms = {
        **{name: state.get(name, 0) for name in ("masters", "gradients", "optimizer", "teacher")},
        "compute_copies": copies,
        "rollout_engine": _rollout_engine_bytes(config, device_memory, device_type),
        "activations": int(activations["bytes"]),
        "runtime": CUDA_RUNTIME_BYTES if device_type == "cuda" else 0,
    }
    terms["total"] = sum(terms.values())
    host["total"] = sum(host.values())
    with_ckpt, without_ckpt = (activations, other) if runtime.gradient_checkpointing else (other, activations)
    rows, prompt, source = _rows_and_tokens(config, shape, world_size, prompt_tokens)
    plan = MemoryPlan(
        per_device_bytes=terms,
        device_memory_bytes=int(device_memory),
        fits=terms["total"] <= device_memory,
        activations={
            "with_checkpointing": int(with_ckpt["bytes"]),
            "without_checkpointing": int(without_ckpt["bytes"]),
            "peak_phase": activations["phase"],
            "phases": {key: int(value) for key, value in activations["phases"].items()},
        },
        assumptions={
            "world_size": world_size,
            "strategy": runtime.strategy,
            "device_type": device_type,
            "compute_dtype_bytes": compute,
            "master_dtype_bytes": master,
            "trainable_parameters": trainable,
            "parameters": shape.parameters,
            "rows_per_micro_batch": rows,
            "prompt_tokens": prompt,
            "prompt_tokens_source": source,
            "response_tokens": config.rollout.max_new_tokens,
            "tokens_per_micro_batch": rows * (prompt + config.rollout.max_new_tokens),
            "max_tokens_per_micro_batch": runtime.max_tokens_per_micro_batch,
            "tokens_per_forward": int(activations["tokens"]),
            "gradient_checkpointing": runtime.gradient_checkpointing,
            "offload_optimizer": runtime.offload_optimizer and not fsdp,
            "offload_params": runtime.offload_params and fsdp,
            "offload_teacher": runtime.offload_teacher and bool(teacher),
            "teacher_streamed_bytes": streamed,
            "host_bytes_are": "per process",
        },
        host_bytes=host,
    )
    if runtime.offload_params and not fsdp:
        plan.assumptions["offload_params_note"] = "runtime.offload_params applies under fsdp only: no effect here"
    if runtime.offload_optimizer and fsdp and not runtime.offload_params:
        plan.assumptions["offload_optimizer_note"] = "under fsdp the optimizer moves with runtime.offload_params"
    if suggest and not plan.fits:
        plan.suggestions = suggestions(
            shape,
            config,
            world_size=world_size,
            device_type=device_type,
            device_memory=device_memory,
            prompt_tokens=prompt_tokens,
        )
    return plan


def _changed(config: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    data = config.model_dump()
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return TrainConfig.model_validate(data)


def _candidates(config: TrainConfig, world_size: int) -> list[tuple[dict[str, Any], int]]:
    """Changes that keep the run's method (what is sampled and learnt), smallest first: each with its world size."""
    out: list[tuple[dict[str, Any], int]] = []
    runtime = config.runtime
    if not runtime.gradient_checkpointing:
        out.append(({"runtime.gradient_checkpointing": True}, world_size))
    # Fewer tokens per forward: the same micro-batch sampled together, scored in groups of its rows.
    for checkpointing in [False] if runtime.gradient_checkpointing else [False, True]:
        for budget in (65536, 32768, 16384, 9216, 8192, 4096, 2048, 1024):
            if runtime.max_tokens_per_micro_batch is None or budget < runtime.max_tokens_per_micro_batch:
                change = {"runtime.max_tokens_per_micro_batch": budget}
                if checkpointing:
                    change["runtime.gradient_checkpointing"] = True
                out.append((change, world_size))
    # Fewer prompts per micro-batch, more micro-batches: the same prompts per step.
    step_prompts = config.batch_size * config.grad_accum
    smaller = [
        size for size in range(config.batch_size - 1, 0, -1) if size % world_size == 0 and step_prompts % size == 0
    ]
    for checkpointing in [False] if runtime.gradient_checkpointing else [False, True]:
        for size in smaller:
            change: dict[str, Any] = {"batch_size": size, "grad_accum": step_prompts // size}
            if checkpointing:
                change["runtime.gradient_checkpointing"] = True
            out.append((change, world_size))
    # The state to the host: AdamW's (with fsdp's shards), the teacher's, then both.
    if runtime.strategy == "fsdp":
        optimizer_offload = {} if runtime.offload_params else {"runtime.offload_params": True}
        if optimizer_offload and runtime.offload_optimizer is False:
            optimizer_offload["runtime.offload_optimizer"] = True
    else:
        optimizer_offload = {} if runtime.offload_optimizer else {"runtime.offload_optimizer": True}
    teacher_offload = {} if runtime.offload_teacher else {"runtime.offload_teacher": True}
    for change in (optimizer_offload, teacher_offload, {**optimizer_offload, **teacher_offload}):
        if change:
            out.append((change, world_size))
    # Shard the state over the devices there are, then over more.
    if runtime.strategy != "fsdp" and world_size > 1:
        out.append(({"runtime.strategy": "fsdp"}, world_size))
    for devices in (2, 4, 8, 16, 32, 64):
        if devices > world_size and config.batch_size % devices == 0:
            change = {"runtime.strategy": "fsdp"}
            out.append((change, devices))
            if not runtime.gradient_checkpointing:
                out.append(({**change, "runtime.gradient_checkpointing": True}, devices))
    return out


def suggestions(
    shape: ModelShape,
    config: TrainConfig,
    *,
    world_size: int,
    device_type: str,
    device_memory: int,
    prompt_tokens: int | None = None,
    limit: int = 3,
) -> list[dict[str, Any]]:
    """The smallest changes (in ``_candidates``' order) whose own plan fits, each with its planned total."""
    found: list[dict[str, Any]] = []
    for changes, devices in _candidates(config, world_size):
        try:
            changed = _changed(config, changes)
        except ValueError:
            continue
        plan = plan_memory(
            shape,
            changed,
            world_size=devices,
            device_type=device_type,
            device_memory=device_memory,
            prompt_tokens=prompt_tokens,
            suggest=False,
        )
        if plan.fits and all(entry["total_bytes"] != plan.per_device_bytes["total"] for entry in found):
            entry: dict[str, Any] = {"set": changes, "total_bytes": plan.per_device_bytes["total"]}
            if devices != world_size:
                entry["devices"] = devices
            found.append(entry)
            if len(found) >= limit:
                break
    return found


# ------------------------------------------------------------------------------------------------------ sizes, text
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
_UNITS.update({"g": 1000**3, "gb": 1000**3, "gib": GIB, "t": 1000**4, "tb": 1000**4, "tib": 1024**4})


def parse_size(text: str) -> int:
    """``80GiB``, ``80GB``, ``80G`` (decimal), ``81920MiB`` or a number of bytes."""
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: write e.g. 80GiB, 80GB or 85899345920")
    return int(float(match.group(1)) * _UNITS[unit])


def visible_device_memory() -> tuple[str, int, str]:
    """(device type, bytes, where the figure comes from): the first visible GPU's memory, else the host's RAM."""
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return "cuda", int(properties.total_memory), f"GPU 0 ({properties.name})"
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return "cpu", int(line.split()[1]) * 1024, "no GPU is visible: the host's memory (CPU training)"
    return "cpu", 0, "no GPU is visible and the host's memory is unknown"


def format_table(plan: MemoryPlan, shape: ModelShape | None = None) -> str:
    """A short human table of the plan (the CLI prints it on stderr)."""
    gib = float(GIB)
    lines = []
    if shape is not None:
        lines.append(
            f"model {shape.model_type}: {shape.parameters / 1e9:.3g}B parameters ({shape.vision_parameters / 1e9:.3g}B "
            f"vision), {shape.text.layers} blocks of width {shape.text.hidden}, vocabulary {shape.vocab:,}"
        )
    facts = plan.assumptions
    lines.append(
        f"{facts['world_size']} x {facts['device_type']} ({facts['strategy']}), {facts['rows_per_micro_batch']} rows x "
        f"({facts['prompt_tokens']} prompt + {facts['response_tokens']} response) tokens per micro-batch"
    )
    lines.append(f"| {'term':<15} | {'GiB per device':>14} |")
    for name, value in plan.per_device_bytes.items():
        lines.append(f"| {name:<15} | {value / gib:14.2f} |")
    if plan.host_bytes.get("total"):
        moved = ", ".join(f"{name} {value / gib:.2f}" for name, value in plan.host_bytes.items() if name != "total")
        lines.append(f"on the host instead (GiB per process): {moved}; total {plan.host_bytes['total'] / gib:.2f}")
    lines.append(
        f"activations: {plan.activations['without_checkpointing'] / gib:.2f} GiB without checkpointing, "
        f"{plan.activations['with_checkpointing'] / gib:.2f} GiB with it (peak: {plan.activations['peak_phase']})"
    )
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"{verdict} in {plan.device_memory_bytes / gib:.1f} GiB per device")
    for suggestion in plan.suggestions:
        where = f" on {suggestion['devices']} devices" if "devices" in suggestion else ""
        changes = ", ".join(f"{key}={value}" for key, value in suggestion["set"].items())
        lines.append(f"  fits with {changes}{where}: {suggestion['total_bytes'] / gib:.2f} GiB")
    if not plan.fits and not plan.suggestions:
        lines.append("  no single change of checkpointing, micro-batch, offload or device count makes it fit")
    return "\n".join(lines)
