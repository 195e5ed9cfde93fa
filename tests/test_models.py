"""Loading, prompting, freezing, LoRA and generation through vopd.models, on two tiny architectures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

from vopd.config import LoraConfig, RuntimeConfig
from vopd.models import (
    LoadedModel,
    ModelLoadError,
    encode_prompts,
    load_model_and_processor,
    optimizer_param_groups,
    parameter_count,
    register_image_only_processors,
    repeat_each_row,
    resolve_device,
    resolve_dtype,
    suppressed_token_ids,
    vision_tower_parameters,
)
from vopd.tiny_models import build_tiny_qwen2vl


def chat(image: Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def two_prompts() -> list[list[dict]]:
    """Different image sizes and different question lengths, so that padding and token counts both vary."""
    return [
        chat(Image.new("RGB", (224, 224), "red"), "What colour is the circle?"),
        chat(Image.new("RGB", (448, 448), "blue"), "Which shape is in the top left corner of the red box?"),
    ]


class Temptation(LogitsProcessor):
    """Pushes the given tokens far above all others: unless something suppresses them, they will be sampled."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.token_ids] += 100.0
        return scores


def response_tokens(loaded: LoadedModel, max_new_tokens: int, **generate_kwargs) -> torch.Tensor:
    batch = encode_prompts(loaded.processor, two_prompts())
    with torch.no_grad():
        output = loaded.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=True,
            logits_processor=LogitsProcessorList([Temptation(loaded.suppressed_token_ids)]),
            **generate_kwargs,
        )
    return output[:, batch["input_ids"].shape[1] :]


def lm_loss(loaded: LoadedModel) -> torch.Tensor:
    batch = encode_prompts(loaded.processor, two_prompts())
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return loaded.model(**batch, labels=labels).loss


# ------------------------------------------------------------------------------------------------ loading


def test_folder_loads_through_the_auto_classes(tiny_model_dir: Path) -> None:
    register_image_only_processors()
    register_image_only_processors()  # idempotent
    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, local_files_only=True)

    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert processor.image_processor is not None, "AutoProcessor fell back to a bare tokenizer"
    assert processor.image_processor.merge_size == 2
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    text = model.config.text_config
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.hidden_size // text.num_attention_heads


def test_load_for_sampling_is_frozen_in_eval_mode_with_safe_generation_defaults(tiny_model_dir: Path) -> None:
    loaded = load_model_and_processor(tiny_model_dir, RuntimeConfig(device="cpu"))
    tokenizer = loaded.tokenizer

    assert loaded.processor.image_processor is not None
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    assert not loaded.model.use_kernels  # nothing fetched from the Hub, no re-kernelizing on every train()/eval()
    expected = {
        tokenizer.convert_tokens_to_ids(token)
        for token in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
    }
    assert set(loaded.suppressed_token_ids) == expected
    assert set(loaded.eos_token_ids) == {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert loaded.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert loaded.model.generation_config.suppress_tokens == loaded.suppressed_token_ids
    assert tokenizer.padding_side == "left"


def test_suppressed_ids_cover_embedding_rows_without_a_token(tiny_model_dir: Path) -> None:
    loaded = load_model_and_processor(tiny_model_dir)
    config = loaded.model.config
    vocab_rows = len(loaded.tokenizer)
    config.text_config.vocab_size = vocab_rows + 3  # as in real checkpoints padded to a multiple of 64

    suppressed = suppressed_token_ids(loaded.processor, config)

    assert {vocab_rows, vocab_rows + 1, vocab_rows + 2} <= set(suppressed)
    assert set(loaded.suppressed_token_ids) <= set(suppressed)


def bad_folder(kind: str, tmp_path: Path, model_dir: Path) -> Path:
    if kind == "missing":
        return tmp_path / "missing"
    if kind == "file":
        return model_dir / "config.json"
    if kind == "weights-without-processor":
        for name in ("config.json", "model.safetensors"):
            shutil.copy(model_dir / name, tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "config.json is missing"),
        ("file", "is a file"),
        ("weights-without-processor", "cannot load the processor"),
    ],
)
def test_bad_folder_gives_a_clear_error(tmp_path: Path, tiny_model_dir: Path, kind: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model_and_processor(bad_folder(kind, tmp_path, tiny_model_dir))


def test_device_and_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", cpu)


# ------------------------------------------------------------------------------------------------ prompts


def test_encode_prompts_left_pads_images_of_different_sizes(tiny_model_dir: Path) -> None:
    loaded = load_model_and_processor(tiny_model_dir)
    image_token = loaded.model.config.image_token_id

    batch = encode_prompts(loaded.processor, two_prompts())

    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (B, T)
    assert (input_ids == image_token).sum(dim=1).tolist() == [64, 256]  # one token per 28 x 28 px
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16], [1, 32, 32]]
    assert batch["pixel_values"].shape[0] == 16 * 16 + 32 * 32  # (patches, C * temporal * 14 * 14)
    assert attention_mask[:, -1].tolist() == [1, 1]  # prompts end in the same column
    padding = int((attention_mask[0] == 0).sum())
    assert padding > 0 and attention_mask[0, :padding].eq(0).all() and attention_mask[0, padding:].eq(1).all()
    assert input_ids[0, :padding].eq(loaded.pad_token_id).all()
    assert attention_mask[1].eq(1).all()
    assert loaded.tokenizer.decode(input_ids[1]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def assert_repeating_rows_equals_encoding_them_all(processor, conversations: list[list[dict]]) -> None:
    """Each conversation encoded once and its rows repeated three times is the encoding of the repeated list, key by
    key and value by value (padding included: the longest prompt is the same either way)."""
    repeated = repeat_each_row(encode_prompts(processor, conversations), 3)
    expected = encode_prompts(processor, [conversation for conversation in conversations for _ in range(3)])
    assert repeated is not None and set(repeated) == set(expected)
    for key, value in expected.items():
        assert torch.equal(repeated[key], value), key


@pytest.mark.parametrize("family", ["qwen2-vl", "llava"])
def test_repeating_encoded_rows_equals_encoding_the_repeated_conversations(
    family: str, tiny_model_dir: Path, tiny_llava_dir: Path
) -> None:
    loaded = load_model_and_processor(tiny_model_dir if family == "qwen2-vl" else tiny_llava_dir)
    assert_repeating_rows_equals_encoding_them_all(loaded.processor, two_prompts())
    batch = encode_prompts(loaded.processor, two_prompts())
    assert repeat_each_row(batch, 1) is batch
    if family == "qwen2-vl":  # a row with two images: its patches do not split by row, so the caller encodes all
        images = [{"type": "image", "image": Image.new("RGB", (56, 56), colour)} for colour in ("red", "blue")]
        two_images = [{"role": "user", "content": [*images, {"type": "text", "text": "Which one is red?"}]}]
        assert repeat_each_row(encode_prompts(loaded.processor, [two_images, two_prompts()[0]]), 2) is None


def test_encode_prompts_without_generation_prompt_and_bad_images(tiny_model_dir: Path) -> None:
    loaded = load_model_and_processor(tiny_model_dir)
    conversation = chat(Image.new("RGB", (56, 56)), "Hi")

    without = encode_prompts(loaded.processor, [conversation], add_generation_prompt=False)
    with_prompt = encode_prompts(loaded.processor, [conversation])
    assert with_prompt["input_ids"].shape[1] > without["input_ids"].shape[1]

    with pytest.raises(TypeError, match="PIL.Image"):
        encode_prompts(loaded.processor, [chat("picture.png", "Hi")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        encode_prompts(loaded.processor, [])


def test_generate_never_emits_suppressed_tokens(tiny_model_dir: Path) -> None:
    loaded = load_model_and_processor(tiny_model_dir)
    suppressed = torch.tensor(loaded.suppressed_token_ids)

    # Control: with suppression switched off the temptation wins (one step, so no forward ever sees them).
    tempted = response_tokens(loaded, 1, suppress_tokens=None)
    assert torch.isin(tempted, suppressed).all()

    # The loaded generation defaults alone keep every tempting token out, step after step.
    responses = response_tokens(loaded, 12)
    assert responses.shape == (2, 12)
    assert not torch.isin(responses, suppressed).any()


# ------------------------------------------------------------------------------------------------ training


def test_forward_backward_reaches_only_trainable_parameters(tiny_model_dir: Path) -> None:
    loaded = load_model_and_processor(tiny_model_dir, trainable=True, freeze_vision_tower=True)
    vision = {id(parameter) for parameter in vision_tower_parameters(loaded.model)}
    assert loaded.model.training
    assert vision and len(vision) == len(list(loaded.model.model.visual.parameters()))

    lm_loss(loaded).backward()

    for name, parameter in loaded.model.named_parameters():
        in_vision = id(parameter) in vision
        assert parameter.requires_grad is not in_vision, name
        if in_vision:
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_unfrozen_vision_tower_gets_gradients(tiny_model_dir: Path) -> None:
    loaded = load_model_and_processor(tiny_model_dir, trainable=True, freeze_vision_tower=False)
    lm_loss(loaded).backward()
    vision = vision_tower_parameters(loaded.model)
    assert all(parameter.requires_grad for parameter in vision)
    assert sum(parameter.grad.abs().sum() for parameter in vision if parameter.grad is not None) > 0


def test_vision_lr_scale_shrinks_only_the_encoder_update(tiny_model_dir: Path) -> None:
    """One AdamW step moves each element by about lr (the first step is lr * g/|g|), so the encoder's update must
    shrink by the scale while the language model's stays as it is."""

    def one_step(scale: float) -> tuple[dict[str, torch.Tensor], set[str]]:
        torch.manual_seed(0)
        loaded = load_model_and_processor(tiny_model_dir, trainable=True, freeze_vision_tower=False)
        vision_ids = {id(parameter) for parameter in vision_tower_parameters(loaded.model)}
        named = dict(loaded.model.named_parameters())
        before = {name: parameter.detach().clone() for name, parameter in named.items()}
        optimizer = torch.optim.AdamW(optimizer_param_groups(loaded.model, 1e-3, scale), weight_decay=0.0)
        lm_loss(loaded).backward()
        optimizer.step()
        moved = {name: (parameter.detach() - before[name]).abs().mean() for name, parameter in named.items()}
        return moved, {name for name, parameter in named.items() if id(parameter) in vision_ids}

    full, vision = one_step(1.0)
    scaled, _ = one_step(0.25)
    assert vision and any(full[name] > 1e-6 for name in vision)
    for name, moved in full.items():
        if moved < 1e-6:  # no gradient from this loss (e.g. embeddings of unused tokens)
            continue
        expected = 0.25 if name in vision else 1.0
        assert float(scaled[name] / moved) == pytest.approx(expected, rel=0.05), name


def test_frozen_encoder_gives_one_parameter_group(tiny_model_dir: Path) -> None:
    loaded = load_model_and_processor(tiny_model_dir, trainable=True, freeze_vision_tower=True)
    groups = optimizer_param_groups(loaded.model, 1e-4, 0.1)
    assert [group["lr"] for group in groups] == [1e-4]
    assert sum(len(group["params"]) for group in groups) == sum(p.requires_grad for p in loaded.model.parameters())


def test_lora_trains_only_the_adapter_and_can_be_disabled(tiny_model_dir: Path) -> None:
    base = load_model_and_processor(tiny_model_dir)
    loaded = load_model_and_processor(tiny_model_dir, lora=LoraConfig(enabled=True, rank=4), trainable=True)
    model = loaded.model
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert not any(".visual." in name for name in trainable)
    assert parameter_count(model, trainable_only=True) < parameter_count(model) / 10

    lm_loss(loaded).backward()
    assert all(parameter.grad is not None for name, parameter in model.named_parameters() if name in trainable)
    assert all(parameter.grad is None for name, parameter in model.named_parameters() if name not in trainable)

    # A non-zero adapter changes the output; disable_adapter() gives back exactly the base model.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.5)
    model.eval()
    batch = encode_prompts(loaded.processor, two_prompts())
    with torch.no_grad():
        reference = base.model(**batch).logits
        adapted = model(**batch).logits
        with model.disable_adapter():
            disabled = model(**batch).logits
    assert not torch.allclose(adapted, reference, atol=1e-3)
    torch.testing.assert_close(disabled, reference)


def test_saved_lora_adapter_folder_loads_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model_and_processor(tiny_model_dir, lora=LoraConfig(enabled=True, rank=4), trainable=True)
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.5)
    loaded.model.save_pretrained(tmp_path / "adapter")
    loaded.model.eval()

    again = load_model_and_processor(tmp_path / "adapter")

    batch = encode_prompts(again.processor, two_prompts())
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, loaded.model(**batch).logits)
    assert again.path == (tmp_path / "adapter").resolve()


# ------------------------------------------------------------------------------------------------ LLaVA


def test_llava_goes_through_the_same_functions(tiny_llava_dir: Path) -> None:
    loaded = load_model_and_processor(tiny_llava_dir)
    tokenizer = loaded.tokenizer
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert loaded.suppressed_token_ids == [tokenizer.convert_tokens_to_ids("<image>")]

    batch = encode_prompts(loaded.processor, two_prompts())
    assert (batch["input_ids"] == loaded.model.config.image_token_id).sum(dim=1).tolist() == [64, 64]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].eq(1).all()

    responses = response_tokens(loaded, 6)
    assert responses.shape == (2, 6)
    assert not torch.isin(responses, torch.tensor(loaded.suppressed_token_ids)).any()


def test_llava_lora_and_freezing_leave_the_clip_tower_alone(tiny_llava_dir: Path) -> None:
    """CLIP names its projections q_proj/k_proj/v_proj too: LoRA must still adapt only the language model."""
    loaded = load_model_and_processor(tiny_llava_dir, lora=LoraConfig(enabled=True, rank=2), trainable=True)
    adapted = {name for name, _ in loaded.model.named_modules() if name.endswith(".lora_A")}
    assert adapted and all(".language_model." in name for name in adapted)

    full = load_model_and_processor(tiny_llava_dir, trainable=True)
    frozen = {id(parameter) for parameter in vision_tower_parameters(full.model)}
    assert frozen == {id(parameter) for parameter in full.model.model.vision_tower.parameters()}
    assert all(parameter.requires_grad is (id(parameter) not in frozen) for parameter in full.model.parameters())


# ------------------------------------------------------------------------------------------------ building


def test_build_is_deterministic(tmp_path: Path) -> None:
    first = build_tiny_qwen2vl(tmp_path / "a", seed=3)
    second = build_tiny_qwen2vl(tmp_path / "b", seed=3)
    other = build_tiny_qwen2vl(tmp_path / "c", seed=4)
    before = torch.random.get_rng_state()
    build_tiny_qwen2vl(tmp_path / "d", seed=5)

    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    assert torch.equal(torch.random.get_rng_state(), before), "building must not move the caller's RNG"


def test_custom_corpus_and_larger_size(tmp_path: Path) -> None:
    corpus = ["a zebra and another zebra"] * 50
    folder = build_tiny_qwen2vl(tmp_path / "big", size="20m", corpus=corpus, vocab_size=300)
    loaded = load_model_and_processor(folder)
    assert len(loaded.tokenizer) <= 300
    assert loaded.model.config.text_config.vocab_size == len(loaded.tokenizer)
    assert loaded.tokenizer.tokenize(" zebra") == ["Ġzebra"]  # merges learned from this corpus
    assert 15e6 < parameter_count(loaded.model) < 25e6
    with pytest.raises(ValueError, match="unknown tiny size"):
        build_tiny_qwen2vl(tmp_path / "bad", size="1b")  # type: ignore[arg-type]


def test_a_custom_chat_template_file_and_the_thinking_switch(tiny_model_dir, tmp_path) -> None:
    """runtime.chat_template replaces the model's template; templates that know enable_thinking get the
    non-thinking prompt by default (the official run's), and an explicit runtime.chat_template_kwargs wins."""
    from vopd.config import RuntimeConfig
    from vopd.models import ModelLoadError
    from vopd.tiny_models import QWEN2_VL_CHAT_TEMPLATE

    switch = (
        "{% if add_generation_prompt %}{% if enable_thinking is defined and not enable_thinking %}"
        "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}"
    )
    template = tmp_path / "template.jinja"
    template.write_text(QWEN2_VL_CHAT_TEMPLATE + switch)
    conversation = [[{"role": "user", "content": [{"type": "text", "text": "Which colour?"}]}]]

    def rendered(runtime: RuntimeConfig) -> str:
        loaded = load_model_and_processor(tiny_model_dir, runtime)
        return loaded.tokenizer.decode(loaded.encode(conversation)["input_ids"][0])

    default = RuntimeConfig(device="cpu", chat_template=str(template))
    assert rendered(default).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = default.model_copy(update={"chat_template_kwargs": {"enable_thinking": True}})
    assert rendered(thinking).endswith("<|im_start|>assistant\n<think>\n")
    plain = load_model_and_processor(tiny_model_dir, RuntimeConfig(device="cpu"))
    assert plain.chat_template_kwargs == {}  # the model's own template has no switch
    with pytest.raises(ModelLoadError, match="cannot read the chat template file"):
        load_model_and_processor(tiny_model_dir, RuntimeConfig(device="cpu", chat_template=str(tmp_path / "none")))
