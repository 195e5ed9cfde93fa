"""Tiny random-weight vision-language models, built offline, for the tests, the tiny world and the demo.

Three families go through the same loading, prompting, LoRA and generation code as real checkpoints:

* **Qwen2-VL** (``build_tiny_qwen2vl``, 4.6M or 20M parameters): the tiny world's base (``vopd.tiny`` pretrains it),
  with a byte-level BPE tokenizer trained here on the benchmark's words and Qwen2-VL's own chat template;
* **LLaVA** (``build_tiny_llava``): a second set of conventions (a fixed image size, a CLIP tower whose projections
  share names with the language model's, ``image_token_index``);
* **Qwen3.5** (``build_tiny_qwen35``), the paper's own architecture: a hybrid language model (three Gated DeltaNet
  linear-attention layers to every full-attention layer, interleaved M-RoPE over a quarter of each head) behind its
  own vision tower (16 px patches, 2x2 merge). Its quirks differ from Qwen2-VL's in ways that matter to the loop:
  the linear-attention layers keep a recurrent state in the cache rather than keys and values, the prompt carries
  ``mm_token_type_ids`` for the 3-D positions, and the chat template opens a ``<think>`` block after the assistant
  header. A folder written here has the real model class, the real processor class (image-only: no torchvision),
  Qwen3.5's special tokens at Qwen's relative positions and a template with Qwen3.5's thinking switch.

Same arguments, same files: weights come from the seed and the BPE merges from the corpus only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX as QWEN3_5_PRETOKENIZE_REGEX

from vopd.config import PAPER_HINT
from vopd.models import image_only_processor_class

__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN3_5_CHAT_TEMPLATE",
    "QWEN3_5_SPECIAL_TOKENS",
    "QWEN3_5_TEXT_TOKENS",
    "TINY_QWEN3_5_MAX_PIXELS",
    "TINY_QWEN3_5_MIN_PIXELS",
    "TINY_MAX_PIXELS",
    "TINY_MIN_PIXELS",
    "build_tiny_llava",
    "build_tiny_qwen2vl",
    "build_tiny_qwen35",
    "default_tokenizer_corpus",
]

# ------------------------------------------------------------------------------------------------------------
# Qwen2-VL and LLaVA


_COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "cyan")
_SHAPES = ("circle", "square", "triangle", "star", "rectangle", "diamond", "hexagon", "cross", "ring", "dot")
_PLACES = ("top left", "top right", "bottom left", "bottom right", "centre", "left", "right", "top", "bottom")


def default_tokenizer_corpus() -> Iterator[str]:
    """A small, deterministic English corpus in the style of the synthetic fine-detail benchmark.

    Colours, shapes, boxes, places, digits, multiple-choice options and "Answer: X" lines, so that the tiny
    tokenizer's merges cover the words the benchmark and the chat template actually use.
    """
    letters = "ABCD"
    yield PAPER_HINT
    yield "You are a helpful assistant."
    yield "Answer with the option's letter from the given choices directly."
    for round_index, (color, shape, place) in enumerate(itertools.product(_COLORS, _SHAPES, _PLACES)):
        options = [_COLORS[(_COLORS.index(color) + shift * 5) % len(_COLORS)] for shift in range(4)]
        answer = letters[round_index % 4]
        options[round_index % 4], options[0] = options[0], options[round_index % 4]
        yield f"What colour is the {shape} inside the red box?"
        yield "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options, strict=True))
        yield f"Answer: {answer}"
        yield f"The {color} {shape} is in the {place} of the image."
        yield f"Which shape is in the {place} corner of the box? The answer is {answer}."
        yield f"How many {shape}s are there? There are {round_index % 10} {shape}s, {round_index % 7} {color} ones."
        yield f"The box [{round_index % 97}, {round_index % 53}, {round_index % 89 + 10}, {round_index % 61 + 10}]"


# Qwen2-VL-Instruct's own chat template: the tiny model speaks the same dialect as the real one.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-VL's special tokens, in Qwen's order (they follow the ordinary vocabulary there too).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# A LLaVA-1.5-style "USER: <image>\n... ASSISTANT:" dialect.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set prefix = '' %}{% else %}"
    "{% set prefix = message['role'] | upper ~ ': ' %}{% endif %}{{ prefix }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
LLAVA_SPECIAL_TOKENS = ("</s>", "<pad>", "<image>")


def _train_tokenizer(
    corpus: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str],
    *,
    eos_token: str,
    pad_token: str,
    chat_template: str,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus`` (deterministic), with the special tokens appended after the merges.

    Byte-level means any text (any language, any symbol) still encodes: unseen words fall back to bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(special_tokens) + 1:
        raise ValueError(f"vocab_size must exceed the 256 byte tokens plus {len(special_tokens)} special tokens")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.add_special_tokens(list(special_tokens))  # ids in the given order, right after the merges
    eos_and_pad = {eos_token, pad_token}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=[token for token in special_tokens if token not in eos_and_pad],
        chat_template=chat_template,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


@dataclass(frozen=True)
class _TinyQwen2VLShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_embed: int
    vision_depth: int
    vision_heads: int
    # Rotary frequencies split over (time, height, width); must sum to head_dim / 2 (Qwen: [16, 24, 24] for 128).
    mrope_section: tuple[int, int, int] = (8, 12, 12)


_QWEN2VL_SIZES: dict[str, _TinyQwen2VLShape] = {
    "5m": _TinyQwen2VLShape(
        hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vision_embed=128, vision_depth=4, vision_heads=4
    ),
    "20m": _TinyQwen2VLShape(
        hidden=512, layers=6, heads=8, kv_heads=4, intermediate=1280, vision_embed=192, vision_depth=4, vision_heads=4
    ),
}

# Small pixel budget for tiny models: 224 px -> 64 image tokens, at most 256 tokens (448 x 448 px).
TINY_MIN_PIXELS = 4 * 28 * 28
TINY_MAX_PIXELS = 256 * 28 * 28


def _seeded_init(model_class: type[PreTrainedModel], config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """Initialise under a private RNG state so building a model never shifts the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def build_tiny_qwen2vl(
    output_dir: str | Path,
    *,
    size: Literal["5m", "20m"] = "5m",
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
) -> Path:
    """Write a random-weight Qwen2-VL (model, tokenizer, image processor, chat template) to ``output_dir``.

    The folder is a standard Hugging Face one: ``load_model_and_processor`` (or AutoModelForImageTextToText plus
    AutoProcessor after ``register_image_only_processors()``) loads it offline. Same arguments, same files:
    weights come from ``seed`` and the BPE merges from ``corpus`` only. The model's vocabulary is exactly the
    tokenizer's (``vocab_size`` is an upper bound a small corpus may not reach). Parameter counts: about 4.6M
    for "5m" and 20M for "20m".
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    if size not in _QWEN2VL_SIZES:
        raise ValueError(f"unknown tiny size {size!r}: expected one of {', '.join(_QWEN2VL_SIZES)}")
    shape = _QWEN2VL_SIZES[size]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(
        default_tokenizer_corpus() if corpus is None else corpus,
        vocab_size,
        QWEN2_VL_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    token_id = tokenizer.convert_tokens_to_ids
    endoftext, im_end = token_id("<|endoftext|>"), token_id("<|im_end|>")
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "max_position_embeddings": 4096,
            "max_window_layers": shape.layers,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": list(shape.mrope_section),
            },
            "bos_token_id": endoftext,
            "eos_token_id": im_end,
            "pad_token_id": endoftext,
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": shape.vision_depth,
            "embed_dim": shape.vision_embed,
            "num_heads": shape.vision_heads,
            "hidden_size": shape.hidden,  # the patch merger's output width = the language model's width
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = _seeded_init(Qwen2VLForConditionalGeneration, config, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = image_only_processor_class(Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def build_tiny_llava(output_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a random-weight LLaVA (CLIP vision tower, Llama text model, 112 px images -> 64 image tokens).

    A second architecture with different conventions (a fixed image size, ``image_token_index``, a separate
    projector, a CLIP tower whose projections share names with the language model's) that must go through the
    same loading, prompting, LoRA and generation code as Qwen2-VL.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(
        default_tokenizer_corpus(),
        384,
        LLAVA_SPECIAL_TOKENS,
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    eos, pad = tokenizer.convert_tokens_to_ids("</s>"), tokenizer.convert_tokens_to_ids("<pad>")
    image_side, patch = 112, 14
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_side,
            patch_size=patch,
            projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=pad,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_side // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = _seeded_init(LlavaForConditionalGeneration, config, seed)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    image_processor = CLIPImageProcessorPil(
        size={"height": image_side, "width": image_side},
        crop_size={"height": image_side, "width": image_side},
        do_center_crop=False,  # a centre crop would cut evidence boxes near the border out of the image
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


# ------------------------------------------------------------------------------------------------------------
# Qwen3.5

# Qwen3.5's chat template, reduced to what a vision-language chat needs (no tools): no default system turn,
# images as <|vision_start|><|image_pad|><|vision_end|>, message text trimmed, earlier assistant turns without their
# reasoning, and the generation prompt's thinking switch. As in the real template, thinking is on unless the caller
# passes enable_thinking=False: the prompt then ends inside an opened "<think>\n" block; with thinking off it ends
# after an empty, closed one ("<think>\n\n</think>\n\n"), so the first sampled token already belongs to the answer.
QWEN3_5_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- macro render_content(content, do_vision_count) %}"
    "{%- if content is string %}{{- content }}"
    "{%- elif content is iterable and content is not mapping %}{%- for item in content %}"
    "{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}"
    "{%- if do_vision_count %}{%- set image_count.value = image_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'video' in item or item.type == 'video' %}"
    "{%- if do_vision_count %}{%- set video_count.value = video_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item.text }}"
    "{%- else %}{{- raise_exception('Unexpected item type in content.') }}{%- endif %}"
    "{%- endfor %}"
    "{%- elif content is none or content is undefined %}{{- '' }}"
    "{%- else %}{{- raise_exception('Unexpected content type.') }}{%- endif %}"
    "{%- endmacro %}"
    "{%- if not messages %}{{- raise_exception('No messages provided.') }}{%- endif %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + render_content(messages[0].content, false)|trim + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(searching=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- if ns.searching and message.role == 'user' %}{%- set ns.searching = false %}"
    "{%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = render_content(message.content, true)|trim %}"
    "{%- if message.role == 'system' %}"
    "{%- if not loop.first %}{{- raise_exception('System message must be at the beginning.') }}{%- endif %}"
    "{%- elif message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content|trim + '\\n</think>\\n\\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- raise_exception('Unexpected message role.') }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Qwen3.5's special tokens are Qwen2-VL's, in the same order (ids 248044-248057 in the real vocabulary, right after
# the merges).
QWEN3_5_SPECIAL_TOKENS = QWEN2_VL_SPECIAL_TOKENS

# The added tokens that follow them (248058-248069). Qwen marks these not special: decoding with
# skip_special_tokens keeps "<think>...</think>" and tool calls in the text, as it does for the real model.
QWEN3_5_TEXT_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# Qwen3.5's vision tower takes 16 px patches merged 2x2: one image token covers 32 x 32 px. As small a pixel budget
# as the tiny Qwen2-VL's: 4 to 256 image tokens (at most 512 x 512 px).
_QWEN3_5_PATCH = 16
_QWEN3_5_MERGE = 2
TINY_QWEN3_5_MIN_PIXELS = 4 * (_QWEN3_5_PATCH * _QWEN3_5_MERGE) ** 2
TINY_QWEN3_5_MAX_PIXELS = 256 * (_QWEN3_5_PATCH * _QWEN3_5_MERGE) ** 2


def build_tiny_qwen35(
    output_dir: str | Path,
    *,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden: int = 64,
    vision_hidden: int = 32,
    vllm_shape: bool = False,
) -> Path:
    """Write a random-weight Qwen3.5 (model, tokenizer, image processor, chat template) to ``output_dir``.

    Shrunk from Qwen3.5-4B's shape but with its structure: four decoder layers of which the last is full attention
    and the rest Gated DeltaNet (Qwen3.5's 3:1 pattern), gated full attention with partial interleaved M-RoPE,
    tied embeddings, and a two-block vision tower whose merger outputs the language model's width. About 0.3M
    parameters with the defaults. The folder loads offline through ``vopd.models.load_model_and_processor`` (or
    AutoModelForImageTextToText plus AutoProcessor after ``register_image_only_processors()``). Same arguments, same
    files: the weights come from ``seed`` only, the BPE merges from ``corpus`` only.

    ``vllm_shape``: a shape vLLM's CPU backend runs (its attention takes head dims 32, 64, 80... only, and its Gated
    DeltaNet kernel wants a key/value head dim of 128 in bf16): full-attention heads of 64 rotating a quarter (Qwen3.5's
    own factor), linear-attention heads of 128, weights saved in bf16.
    """
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    if hidden % 16 or vision_hidden % 16:
        raise ValueError("hidden and vision_hidden must be multiples of 16 (the head widths)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(
        default_tokenizer_corpus() if corpus is None else corpus,
        vocab_size,
        QWEN3_5_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_5_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in QWEN3_5_TEXT_TOKENS])
    # transformers loads any qwen3_5 folder's tokenizer as Qwen3_5Tokenizer, which rebuilds Qwen's NFC normaliser and
    # pre-tokenizer (single digits, letters with their leading space); use them from the start so that the
    # tokenizer written here and the one read back split text identically.
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_5_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    token_id = tokenizer.convert_tokens_to_ids
    endoftext, im_end = token_id("<|endoftext|>"), token_id("<|im_end|>")

    head_dim = 64 if vllm_shape else 16
    linear_head_dim = 128 if vllm_shape else head_dim
    # Qwen3.5 rotates a quarter of each 256-wide head (32 frequencies, split (11, 11, 10) over time, height, width).
    # A quarter of a 16-wide head would leave 2 frequencies, too few for three axes: rotate half (4, split (2, 1, 1)).
    # A quarter of a 64-wide head leaves 8 frequencies, split (3, 3, 2).
    rotary_factor, mrope_section = (0.25, [3, 3, 2]) if vllm_shape else (0.5, [2, 1, 1])
    config = Qwen3_5Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 4,
            "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            "num_attention_heads": max(1, hidden // head_dim),
            "num_key_value_heads": max(1, hidden // head_dim // 2),
            "head_dim": head_dim,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": linear_head_dim,
            "linear_value_head_dim": linear_head_dim,
            "linear_num_key_heads": max(1, hidden // linear_head_dim // 2),
            "linear_num_value_heads": max(1, hidden // linear_head_dim),
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10_000_000.0,
                "partial_rotary_factor": rotary_factor,
                "mrope_section": mrope_section,
                "mrope_interleaved": True,
            },
            "bos_token_id": None,
            "eos_token_id": im_end,
            "pad_token_id": endoftext,
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": 2,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": vision_hidden // 16,
            "patch_size": _QWEN3_5_PATCH,
            "spatial_merge_size": _QWEN3_5_MERGE,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,  # the patch merger's output width = the language model's width
            "num_position_embeddings": 256,  # a 16 x 16 learned grid, resampled to each image's grid
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    model = _seeded_init(Qwen3_5ForConditionalGeneration, config, seed)
    # Qwen3.5's own generation defaults, sampling settings included: the loop must not depend on them.
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
        do_sample=True,
        temperature=0.6,
        top_k=20,
        top_p=0.95,
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=TINY_QWEN3_5_MIN_PIXELS,
        max_pixels=TINY_QWEN3_5_MAX_PIXELS,
        patch_size=_QWEN3_5_PATCH,
        merge_size=_QWEN3_5_MERGE,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = image_only_processor_class(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN3_5_CHAT_TEMPLATE
    )
    if vllm_shape:
        model.to(torch.bfloat16)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
