"""Tiny random-weight builds of the paper's own architecture, Qwen3.5, for offline tests and demos.

The paper distils Qwen3.5-4B: a hybrid language model (three Gated DeltaNet linear-attention layers to every
full-attention layer, interleaved M-RoPE over a quarter of each head) behind its own vision tower (16 px patches,
2x2 merge). Its quirks differ from Qwen2-VL's in ways that matter to the loop: the linear-attention layers keep a
recurrent state in the cache rather than keys and values, the prompt carries ``mm_token_type_ids`` for the 3-D
positions, and the chat template opens a ``<think>`` block after the assistant header. A folder written here has
the real model class, the real processor class (image-only: no torchvision), Qwen3.5's special tokens at Qwen's
relative positions and a template with Qwen3.5's thinking switch, so the whole loop can run on it on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from transformers import GenerationConfig
from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX as QWEN3_5_PRETOKENIZE_REGEX

from vopd.models import _image_only_processor_class, _seeded_init, _train_tokenizer, default_tokenizer_corpus

__all__ = [
    "QWEN3_5_CHAT_TEMPLATE",
    "QWEN3_5_SPECIAL_TOKENS",
    "QWEN3_5_TEXT_TOKENS",
    "TINY_QWEN3_5_MAX_PIXELS",
    "TINY_QWEN3_5_MIN_PIXELS",
    "build_tiny_qwen35",
]

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

# Qwen3.5's special tokens in Qwen's order (ids 248044-248057 in the real vocabulary, right after the merges).
QWEN3_5_SPECIAL_TOKENS = (
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
) -> Path:
    """Write a random-weight Qwen3.5 (model, tokenizer, image processor, chat template) to ``output_dir``.

    Shrunk from Qwen3.5-4B's shape but with its structure: four decoder layers of which the last is full attention
    and the rest Gated DeltaNet (Qwen3.5's 3:1 pattern), gated full attention with partial interleaved M-RoPE,
    tied embeddings, and a two-block vision tower whose merger outputs the language model's width. About 0.3M
    parameters with the defaults. The folder loads offline through ``vopd.models.load_model_and_processor`` (or
    AutoModelForImageTextToText plus AutoProcessor after ``register_image_only_processors()``). Same arguments, same
    files: the weights come from ``seed`` only, the BPE merges from ``corpus`` only.
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

    head_dim = 16
    # Qwen3.5 rotates a quarter of each 256-wide head (32 frequencies, split (11, 11, 10) over time, height, width).
    # A quarter of a 16-wide head would leave 2 frequencies, too few for three axes: rotate half (4, split (2, 1, 1)).
    config = Qwen3_5Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 4,
            "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            "num_attention_heads": hidden // head_dim,
            "num_key_value_heads": max(1, hidden // head_dim // 2),
            "head_dim": head_dim,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": head_dim,
            "linear_value_head_dim": head_dim,
            "linear_num_key_heads": max(1, hidden // head_dim // 2),
            "linear_num_value_heads": hidden // head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10_000_000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],
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
    processor = _image_only_processor_class(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN3_5_CHAT_TEMPLATE
    )
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
