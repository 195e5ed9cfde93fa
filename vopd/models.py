"""Load any image-text-to-text model from a local folder, ready for sampling, scoring and training.

Every model-family quirk of the project lives in this module, so that the trainer, the evaluator and the
inspector can treat Qwen2-VL, LLaVA, Idefics3... alike:

* which sub-module is the vision tower (it is frozen while the language model learns);
* which special tokens must never be sampled (an untrained model that emits ``<|image_pad|>`` makes the next
  forward fail with "Image features and image tokens do not match");
* which processors carry a ``video_processor`` slot that transformers 5 cannot fill without torchvision (we only
  ever feed images, so we load an image-only subclass instead);
* how a chat with images becomes a left-padded batch.

Everything loads with ``local_files_only=True``: the project never downloads weights.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from vopd.config import LoraConfig, RuntimeConfig

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "activation_checkpointing_enabled",
    "apply_lora",
    "enable_activation_checkpointing",
    "encode_prompts",
    "image_only_processor_class",
    "load_model_and_processor",
    "parameter_count",
    "register_image_only_processors",
    "render_prompt",
    "resolve_chat_template_kwargs",
    "resolve_device",
    "resolve_dtype",
    "select_rows",
    "suppressed_token_ids",
    "unwrap_model",
    "vision_tower_module",
    "vision_tower_parameters",
]


class ModelLoadError(ValueError):
    """A folder that cannot be loaded as an image-text-to-text model; the message says what to do."""


@dataclass
class LoadedModel:
    """A model with everything the loops need to sample from it and score it."""

    model: PreTrainedModel  # possibly a peft.PeftModel
    processor: ProcessorMixin  # has .tokenizer and .image_processor
    path: Path
    device: torch.device
    dtype: torch.dtype  # the weights' dtype (training: the master dtype, float32 by default)
    suppressed_token_ids: list[int]  # never to be sampled (image/video/vision special tokens, unused vocab rows)
    eos_token_ids: list[int]
    pad_token_id: int
    compute_dtype: torch.dtype | None = None  # forward/backward dtype; None = the weights' dtype
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to every apply_chat_template

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def mixed_precision(self) -> bool:
        """Weights in one dtype, arithmetic in a lower one (fp32 masters under bf16 autocast)."""
        return self.compute_dtype is not None and self.compute_dtype != self.dtype

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context every forward and backward runs in: autocast to the compute dtype when it differs from the
        weights' (the official run's FSDP mixed precision: fp32 parameters, bf16 arithmetic), else nothing."""
        if not self.mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def encode(self, conversations: list[list[dict[str, Any]]]) -> BatchFeature:
        """``encode_prompts`` with this model's template variables, on its device, pixels in the weights' dtype."""
        batch = encode_prompts(self.processor, conversations, chat_template_kwargs=self.chat_template_kwargs)
        batch = batch.to(self.device)
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch


# --------------------------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(name: str) -> torch.device:
    """Turn a RuntimeConfig device name into a device, failing early when the accelerator is absent.

    "auto" picks CUDA when present and the CPU otherwise; MPS is only used when asked for, because several
    vision-tower kernels are still missing there.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU; use device 'auto' or 'cpu'")
        return torch.device("cuda")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device 'mps' was requested but this torch has no usable MPS backend; use 'cpu'")
        return torch.device("mps")
    raise ValueError(f"unknown device {name!r}: expected one of auto, cpu, cuda, mps")


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU (the paper's setting), float32 elsewhere: CPU half precision is slow and lossy."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of auto, float32, bfloat16, float16")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------------------------
# Processors


@functools.cache
def image_only_processor_class(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of ``processor_class`` without its ``video_processor`` slot.

    transformers 5 loads sub-processors by the names ``get_attributes()`` returns; the video processor of
    Qwen2/2.5/3-VL needs torchvision, which cannot be installed beside our torch. We never feed videos, so we drop
    the slot instead of the whole processor (which would otherwise degrade silently to a bare tokenizer).
    """
    attributes = [name for name in processor_class.get_attributes() if name != "video_processor"]
    if len(attributes) == len(processor_class.get_attributes()):
        return processor_class

    def get_attributes(cls: type) -> list[str]:
        return list(attributes)

    return type(
        f"{processor_class.__name__}ImageOnly",
        (processor_class,),
        {
            "get_attributes": classmethod(get_attributes),
            "__module__": __name__,
            "__doc__": f"{processor_class.__name__} for images only (no video processor, so no torchvision).",
        },
    )


_IMAGE_ONLY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe")


@functools.cache
def register_image_only_processors() -> None:
    """Make ``AutoProcessor`` return an image-only processor for the Qwen2/2.5/3-VL and Qwen3.5 families.

    Idempotent (cached). ``load_model_and_processor`` does not depend on it, but anyone else calling
    ``AutoProcessor.from_pretrained`` on such a folder does: without it they get a bare tokenizer.
    """
    for model_type in _IMAGE_ONLY_FAMILIES:
        try:
            config_class = CONFIG_MAPPING[model_type]
            processor_class = PROCESSOR_MAPPING[config_class]
        except (KeyError, ValueError):  # a transformers release without this family
            continue
        AutoProcessor.register(config_class, image_only_processor_class(processor_class), exist_ok=True)


def _load_processor(folder: Path, config: PretrainedConfig) -> ProcessorMixin:
    """The model family decides the processor class (image-only where needed); AutoProcessor for the rest."""
    register_image_only_processors()
    try:
        processor_class = PROCESSOR_MAPPING[type(config)]
    except KeyError:
        processor_class = None
    try:
        if processor_class is not None:
            processor = image_only_processor_class(processor_class).from_pretrained(folder, local_files_only=True)
        else:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{folder}: cannot load the processor ({error})") from error
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ModelLoadError(
            f"{folder}: the processor loaded as {type(processor).__name__}, which lacks an image processor or a "
            "tokenizer. The folder needs preprocessor_config.json (or processor_config.json) and tokenizer files "
            "next to the weights; save them with processor.save_pretrained(folder)."
        )
    # Batches are always left-padded: prompts then end at the same column, so rollouts append in lockstep.
    processor.tokenizer.padding_side = "left"
    return processor


# --------------------------------------------------------------------------------------------------------------
# Special tokens


# Added tokens whose text names a modality are placeholders or delimiters for pixels, never words.
_VISION_TOKEN_PATTERN = re.compile(r"image|video|vision|img|audio|<row_\d+_col_\d+>|fake_token", re.IGNORECASE)
# Processor/tokenizer attributes that name such tokens in one family or another.
_VISION_TOKEN_ATTRIBUTES = (
    "image_token",
    "video_token",
    "vision_start_token",
    "vision_end_token",
    "boi_token",
    "eoi_token",
    "fake_image_token",
    "global_image_token",
    "image_start_token",
    "image_end_token",
)
_VISION_CONFIG_KEY = re.compile(r"(image|video|vision|boi|eoi|audio).*_token_(id|index)$")


def suppressed_token_ids(processor: ProcessorMixin, config: PretrainedConfig) -> list[int]:
    """Token ids a policy must never sample: image/video/vision specials and embedding rows without a token.

    Three sources, because families spread this knowledge around: the config's ``*_token_id`` fields for
    modalities, the processor's ``image_token`` style attributes, and the tokenizer's added tokens whose text
    names a modality. Rows of the embedding past the tokenizer's length (padding to a multiple of 64 or 128 in
    real checkpoints) decode to nothing and are suppressed too.
    """
    tokenizer = processor.tokenizer
    ids: set[int] = set()
    for key, value in config.to_dict().items():
        if _VISION_CONFIG_KEY.match(key) and isinstance(value, int) and value >= 0:
            ids.add(value)
    vocabulary = tokenizer.get_vocab()  # built afresh on every call: 150k entries in real checkpoints
    for owner in (processor, tokenizer):
        for attribute in _VISION_TOKEN_ATTRIBUTES:
            token = getattr(owner, attribute, None)
            if isinstance(token, str) and token in vocabulary:
                ids.add(vocabulary[token])
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if _VISION_TOKEN_PATTERN.search(str(added)):
            ids.add(int(token_id))
    vocab_rows = config.get_text_config().vocab_size
    ids.update(range(len(tokenizer), vocab_rows))
    return sorted(token_id for token_id in ids if token_id < vocab_rows)


def _eos_and_pad(model: PreTrainedModel, tokenizer: Any) -> tuple[list[int], int]:
    """Every id that ends a turn (chat models stop on ``<|im_end|>`` and on ``<|endoftext|>``) and the pad id."""
    eos: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config.get_text_config(), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for token_id in [value] if isinstance(value, int) else (value or []):
            if token_id not in eos:
                eos.append(int(token_id))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(int(tokenizer.eos_token_id))
    if not eos:
        raise ModelLoadError("the model defines no end-of-sequence token (eos_token_id): generation could not stop")
    pad = tokenizer.pad_token_id
    if pad is None:
        generation_pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        pad = generation_pad if isinstance(generation_pad, int) else eos[0]
    return eos, int(pad)


# --------------------------------------------------------------------------------------------------------------
# Vision tower and LoRA


# Attribute names under which families keep their vision encoder (Qwen2/2.5/3-VL, LLaVA*, Idefics3/SmolVLM,
# InternVL, MiniCPM-V...). The shallowest match wins, so a CLIP wrapper's inner `vision_model` is not mistaken.
_VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder", "vpm")


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a DDP and a peft wrapper (the model itself otherwise). Under FSDP2 this is the
    sharded root: ``fully_shard`` changes the module's class in place rather than wrapping it."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if isinstance(model, PeftModel) else model  # type: ignore[return-value]


def _vision_tower_name(model: nn.Module) -> str:
    candidates = [
        name
        for name, _ in unwrap_model(model).named_modules()
        if name and name.rsplit(".", 1)[-1] in _VISION_TOWER_NAMES
    ]
    if not candidates:
        raise ValueError(
            f"cannot find the vision tower of {type(unwrap_model(model)).__name__}: none of its sub-modules is "
            f"named {', '.join(_VISION_TOWER_NAMES)}; add the family's name to vopd.models._VISION_TOWER_NAMES"
        )
    return min(candidates, key=lambda name: name.count("."))


def vision_tower_module(model: nn.Module) -> nn.Module:
    """The vision encoder sub-module (for Qwen2-VL this includes its patch merger, which lives inside it)."""
    base = unwrap_model(model)
    return base.get_submodule(_vision_tower_name(base))


def vision_tower_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the vision encoder."""
    return list(vision_tower_module(model).parameters())


# The keys processors put raw pixels under (the ones generate() looks for too).
PIXEL_KEYS = ("pixel_values", "pixel_values_images", "image_patches")


def image_features_refusal(model: nn.Module) -> str | None:
    """Why the image features of ``model`` cannot be computed once per view and handed to every forward of a step
    (None when they can): the model must take them precomputed (``mm_encoder_outputs``), and no weight they depend on
    (vision tower, projector: everything outside the language model and its head) may train, or the student's
    forward would need them with their gradient."""
    base = unwrap_model(model)
    forward_takes = "mm_encoder_outputs" in inspect.signature(base.forward).parameters
    if getattr(base, "get_image_features", None) is None or not forward_takes:
        return f"{type(base).__name__} does not take precomputed image features"
    language = {id(parameter) for parameter in base.get_decoder().parameters()}
    language |= {id(parameter) for parameter in base.get_output_embeddings().parameters()}
    trained = [
        name for name, parameter in base.named_parameters() if parameter.requires_grad and id(parameter) not in language
    ]
    if trained:
        return f"the image features depend on trained weights ({trained[0]} and {len(trained) - 1} more)"
    return None


@torch.no_grad()
def with_image_features(model: nn.Module, prompts: BatchFeature) -> BatchFeature:
    """``prompts`` with their images already through the vision encoder: ``mm_encoder_outputs`` in place of the pixels.

    Every forward given these (``generate``, the teacher's, the student's) skips the encoder. Only for a model that
    ``image_features_refusal`` accepts: its features are then the same in every forward, and a teacher whose trained
    weights differ from the student's (EMA, fixed) still has the same encoder. The call is the one ``generate`` makes
    (``get_image_features`` with the keys its signature names); the other keys, the grid sizes the 3-D positions are
    computed from included, stay.
    """
    pixel_key = next((key for key in PIXEL_KEYS if key in prompts), None)
    if pixel_key is None:
        return prompts
    encoder = unwrap_model(model).get_image_features
    arguments = {name: prompts[name] for name in inspect.signature(encoder).parameters if name in prompts}
    features = encoder(**arguments, return_dict=True)
    encoded = BatchFeature({key: value for key, value in prompts.items() if key != pixel_key})
    encoded["mm_encoder_outputs"] = {"image": features}
    return encoded


def optimizer_param_groups(model: nn.Module, lr: float, vision_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW parameter groups: the trainable language-model tensors at ``lr``, a trainable vision tower at
    ``lr * vision_lr_scale``. A shared encoder trained at the language model's rate forgets the view it is not
    trained on (the crop, in Vision-OPD: docs/reproduction.md); a smaller rate lets it adapt to the full image."""
    vision = {id(parameter) for parameter in vision_tower_parameters(model)}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    language = [parameter for parameter in trainable if id(parameter) not in vision]
    encoder = [parameter for parameter in trainable if id(parameter) in vision]
    groups = [{"params": language, "lr": lr}, {"params": encoder, "lr": lr * vision_lr_scale}]
    return [group for group in groups if group["params"]]


def apply_lora(model: PreTrainedModel, lora: LoraConfig, *, include_vision_tower: bool = False) -> PeftModel:
    """Wrap ``model`` with LoRA adapters on the language model's projections; only the adapters train.

    Target names are matched against the last component of each module name and then passed to peft as full
    names: CLIP-style vision towers also call their projections ``q_proj``, and the paper trains the language
    model, so the vision tower is left out unless ``include_vision_tower``.
    """
    excluded = "" if include_vision_tower else _vision_tower_name(model) + "."
    wanted = set(lora.target_modules)
    targets = sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in wanted
        and not (excluded and name.startswith(excluded))
    )
    if not targets:
        raise ValueError(
            f"LoRA target_modules {lora.target_modules} match no linear layer of {type(model).__name__}'s "
            "language model; list its projection names (e.g. q_proj, v_proj)"
        )
    peft_config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none"
    )
    return get_peft_model(model, peft_config)


# --------------------------------------------------------------------------------------------------------------
# Loading


def _check_model_folder(folder: Path) -> None:
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist (models are loaded from local folders only)")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file; give the folder that holds config.json and the weights")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a Hugging Face model folder: config.json is missing. Point to a folder written by "
            "save_pretrained (vopd.tiny_models.build_tiny_qwen2vl writes a tiny one)."
        )


def load_model_and_processor(
    path: str | Path,
    runtime: RuntimeConfig | None = None,
    *,
    lora: LoraConfig | None = None,
    freeze_vision_tower: bool = True,
    trainable: bool = False,
) -> LoadedModel:
    """Load a model and its processor from a local folder, ready for sampling (default) or for training.

    ``path`` is either a full model folder or a peft adapter folder (adapter_config.json) whose base model is a
    local folder; an adapter folder's processor files win over the base's. With ``trainable`` the model is in
    train mode, the vision tower frozen when ``freeze_vision_tower``, and with an enabled ``lora`` only fresh
    adapters train (an adapter folder keeps training its own adapter). Without it every parameter is frozen and
    the model is in eval mode. Generation defaults are set so that a plain ``generate()`` never samples the
    suppressed tokens and stops on every end-of-turn token.
    """
    runtime = runtime or RuntimeConfig()
    # Absolute, so that name_or_path (which peft writes into saved adapters) stays valid from any directory.
    folder = Path(path).expanduser().resolve()
    adapter_folder: Path | None = None
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        adapter_folder = folder
        base_name = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_name:
            raise ModelLoadError(f"{folder}: adapter_config.json names no base_model_name_or_path")
        folder = Path(base_name).expanduser()
        if not folder.is_absolute() and not folder.exists():
            folder = adapter_folder / folder
        folder = folder.resolve()
    _check_model_folder(folder)

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder}: config.json is not a model config transformers knows ({error})") from error
    processor_folder = adapter_folder if adapter_folder and _has_processor_files(adapter_folder) else folder
    processor = _load_processor(processor_folder, config)
    if runtime.chat_template:
        _replace_chat_template(processor, Path(runtime.chat_template))
    template_kwargs = resolve_chat_template_kwargs(processor, runtime.chat_template_kwargs)

    device = resolve_device(runtime.device)
    compute_dtype = resolve_dtype(runtime.dtype, device)
    # Training keeps full-model weights (and so the optimizer state and the EMA teacher) in fp32 and computes under
    # autocast. With LoRA only the adapters train: peft keeps them in fp32 over a base in the compute dtype.
    full_training = trainable and adapter_folder is None and not (lora is not None and lora.enabled)
    dtype = torch.float32 if full_training and runtime.master_dtype == "float32" else compute_dtype
    try:
        # No Hub kernels: transformers would otherwise fetch replacement layers from the Hub (workers have no Hub
        # access, and a run must not change with what the Hub serves) and re-kernelize the whole model on every
        # train()/eval(), which the sampling does twice a step.
        model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=dtype, local_files_only=True, use_kernels=False
        )
    except ValueError as error:
        raise ModelLoadError(
            f"{folder}: a {config.model_type!r} model is not an image-text-to-text model transformers can load "
            f"with AutoModelForImageTextToText ({error})"
        ) from error
    model.to(device)

    suppressed = suppressed_token_ids(processor, model.config)
    eos_ids, pad_id = _eos_and_pad(model, processor.tokenizer)
    model.generation_config.suppress_tokens = suppressed or None
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = pad_id

    if adapter_folder is not None:
        model = PeftModel.from_pretrained(model, adapter_folder, is_trainable=trainable)
    elif trainable and lora is not None and lora.enabled:
        model = apply_lora(model, lora, include_vision_tower=not freeze_vision_tower)

    if trainable and runtime.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    else:
        model.train()
        if not isinstance(model, PeftModel):  # peft already froze everything but the adapters
            model.requires_grad_(True)
            if freeze_vision_tower:
                for parameter in vision_tower_parameters(model):
                    parameter.requires_grad_(False)

    return LoadedModel(
        model=model,
        processor=processor,
        path=adapter_folder or folder,
        device=device,
        dtype=dtype,
        suppressed_token_ids=suppressed,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        compute_dtype=compute_dtype,
        chat_template_kwargs=template_kwargs,
    )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every transformer block of ``model`` (a transformers model, or peft's wrapper of one): the block keeps
    its input alone and runs again in the backward, under torch's non-reentrant checkpoint.

    This is the model's own switch (``activation_checkpointing_enable``, which transformers 5 renamed from
    ``gradient_checkpointing_enable`` and which the old name still reaches), so every family that marks its blocks
    as checkpointable is covered, the vision blocks included. Non-reentrant, because it works with frozen inputs and
    with DDP's and FSDP2's hooks (the block's ``forward`` is wrapped, its hooks stay outside the recompute), and its
    gradients equal a plain backward's. transformers also makes the input embeddings' output require a gradient
    (``enable_input_require_grads``) for text models and peft: needed by the reentrant variant with a frozen
    embedding (LoRA), harmless here. A checkpointed block in training mode drops the KV cache of a forward with
    gradient (it would be written twice, once more by the recompute), so ``vopd.rollout.PromptPass`` cannot serve;
    ``generate`` runs in evaluation mode and keeps its cache.
    """
    base = unwrap_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(base).__name__} does not support activation checkpointing: set runtime.gradient_checkpointing false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the rename
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def activation_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether any block of ``model`` is checkpointed (``enable_activation_checkpointing``)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in unwrap_model(model).modules())


def _replace_chat_template(processor: ProcessorMixin, path: Path) -> None:
    """Use the Jinja template in ``path`` for both the processor and its tokenizer (checkpoints then carry it)."""
    try:
        template = path.expanduser().read_text(encoding="utf-8")
    except OSError as error:
        raise ModelLoadError(f"cannot read the chat template file {path}: {error.strerror or error}") from error
    if not template.strip():
        raise ModelLoadError(f"the chat template file {path} is empty")
    processor.chat_template = template
    processor.tokenizer.chat_template = template


def resolve_chat_template_kwargs(processor: ProcessorMixin, requested: dict[str, Any] | None) -> dict[str, Any]:
    """The template variables both views are rendered with.

    ``None`` means the official run's choice: templates that know ``enable_thinking`` (Qwen3, Qwen3.5) think by
    default, which would spend the response budget on reasoning and train a different policy, so they get the
    non-thinking prompt (an empty think block) unless the user asks otherwise.
    """
    if requested is not None:
        return dict(requested)
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    return {"enable_thinking": False} if "enable_thinking" in str(template or "") else {}


def _has_processor_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))


# --------------------------------------------------------------------------------------------------------------
# Prompts


def _images_in_order(conversation: Sequence[dict[str, Any]], index: int) -> list[Image.Image]:
    images: list[Image.Image] = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str):
            continue
        for item in content or []:
            if item.get("type") != "image":
                continue
            image = item.get("image")
            if not isinstance(image, Image.Image):
                raise TypeError(
                    f"conversation {index}: an image item must carry a PIL.Image under 'image', got "
                    f"{type(image).__name__}"
                )
            images.append(image)
    return images


def render_prompt(
    processor: ProcessorMixin,
    conversation: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    index: int = 0,
) -> tuple[str, list[Image.Image]]:
    """One chat as the template renders it (image placeholders not yet expanded) and its images in order: what
    ``encode_prompts`` feeds the processor, and what a rollout engine with its own processor (vLLM) is given, so that
    both expand the same text into the same token ids."""
    if not conversation:
        raise ValueError(f"conversation {index} is empty")
    images = _images_in_order(conversation, index)
    text = processor.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
    )
    return text, images


def encode_prompts(
    processor: ProcessorMixin,
    conversations: list[list[dict[str, Any]]],
    *,
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> BatchFeature:
    """Tokenize a batch of chats with their images into one left-padded model input.

    Returns what the family's forward takes: ``input_ids`` and ``attention_mask`` (B, T), ``pixel_values``, and
    family extras such as Qwen2-VL's ``image_grid_thw`` (N_images, 3) and ``mm_token_type_ids`` (B, T). Images
    may differ in size from row to row: each one expands to as many placeholder tokens as its size needs.
    """
    if not conversations:
        raise ValueError("encode_prompts needs at least one conversation")
    texts: list[str] = []
    images: list[Image.Image] = []
    for index, conversation in enumerate(conversations):
        text, conversation_images = render_prompt(
            processor,
            conversation,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
            index=index,
        )
        images.extend(conversation_images)
        texts.append(text)
    return processor(
        text=texts,
        images=images or None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )


def repeat_each_row(batch: BatchFeature, repeats: int) -> BatchFeature | None:
    """``batch`` with each row repeated ``repeats`` times in place (row 0, row 0, ..., row 1, ...): what encoding
    each conversation ``repeats`` times would give, without the processor's and the vision encoder's work on the
    repeated images (a step's rollouts repeat their prompt, eight per prompt in the paper). None for a layout this
    does not know, where the caller encodes every row instead (the layouts of ``select_rows``).
    """
    if repeats == 1:
        return batch
    rows = batch["input_ids"].shape[0]
    return select_rows(batch, [row for row in range(rows) for _ in range(repeats)])


def select_rows(batch: BatchFeature, rows: Sequence[int]) -> BatchFeature | None:
    """The rows ``rows`` of an encoded ``batch`` (in that order, repeats allowed), images and image features included:
    what encoding those rows' conversations would give, but for prompt padding that all of them share (which changes
    nothing: it is masked). None for a layout this does not know, where the caller encodes the rows instead.

    Known layouts, with one image per row: tensors whose first dimension is the row (token ids and masks, LLaVA's
    and Idefics3's pixels), the Qwen-VL families' flattened patches (``pixel_values`` rows grouped by image, each
    image's count the product of its ``image_grid_thw`` row), and image features from ``with_image_features`` whose
    pooled output is per image (``_select_image_features``).
    """
    count = batch["input_ids"].shape[0]
    index = torch.tensor(list(rows), dtype=torch.long, device=batch["input_ids"].device)
    grid = batch.get("image_grid_thw")
    selected: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "mm_encoder_outputs" and set(value) == {"image"}:
            features = _select_image_features(value["image"], count, rows)
            if features is None:
                return None
            selected[key] = {"image": features}
        elif not isinstance(value, torch.Tensor) or value.ndim == 0:
            return None
        elif key == "pixel_values" and grid is not None:
            if grid.shape[0] != count:  # several images (or none) in some row: their patches do not split by row
                return None
            blocks = value.split(grid.prod(dim=-1).tolist())  # one block of patches per image, so per row
            selected[key] = torch.cat([blocks[row] for row in rows])
        elif value.shape[0] == count:
            selected[key] = value.index_select(0, index)
        else:
            return None
    return BatchFeature(selected)


# What an encoder's output may carry beside the pooled features, which the language model's forward never reads.
_ENCODER_INTERNALS = ("last_hidden_state", "hidden_states", "attentions")


def _select_image_features(features: Any, count: int, rows: Sequence[int]) -> Any | None:
    """``get_image_features``' output for one image per row, with the pooled features of ``rows``: a tuple of
    per-image tensors (the Qwen-VL families, which concatenate it) or a tensor whose first dimension is the image
    (LLaVA). The encoder's internals are dropped, so that a forward reading them fails instead of reading the
    unselected ones; None for anything else the forward would read (Qwen3-VL's deepstack features, concatenated over
    all images, do not split by image)."""
    pooled = getattr(features, "pooler_output", None)
    if isinstance(pooled, tuple | list) and len(pooled) == count:
        pooled = tuple(pooled[row] for row in rows)
    elif isinstance(pooled, torch.Tensor) and pooled.ndim > 0 and pooled.shape[0] == count:
        pooled = pooled.index_select(0, torch.tensor(list(rows), dtype=torch.long, device=pooled.device))
    else:
        return None
    if any(value is not None for key, value in features.items() if key not in (*_ENCODER_INTERNALS, "pooler_output")):
        return None
    return type(features)(pooler_output=pooled)


def parameter_count(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) in seen or (trainable_only and not parameter.requires_grad):
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total
