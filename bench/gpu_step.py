"""One Vision-OPD step at the paper's real model sizes, on a GPU: time, tokens per second, peak memory, MFU.

Builds the architecture locally with random weights (no download): Qwen3.5-4B's shape (32 layers, hidden 2560, 16 heads
/ 4 KV heads of 256, FFN 9216, vocabulary 248,320, Gated DeltaNet 3 : 1 full attention, as public training scripts give
it, the Gated DeltaNet layers with 16 key / 32 value heads of 128 (transformers' Qwen3.5 defaults); the vision tower is
the family's default encoder, 27 x 1152, since the 4B's own could not be confirmed. Built this way it has 4.65B
parameters, about the release's 4.7B (its file size); the GPU rows in docs/scaling.md were measured before the linear-
attention heads were set here, on a 3.66B build whose Gated DeltaNet layers had the tiny builder's heads) and
Qwen2.5-VL-3B's (36 layers, hidden 2048, 16 / 2 heads, FFN 11008, tied embeddings; vision 32 x 1280: 3.76B parameters).
The tokenizer and processor are the tiny builders' (a small vocabulary inside the real one: only the token ids differ,
not the cost). Training runs as the `paper` recipe does: fp32 master weights, bf16 autocast, EMA teacher, JSD over
top-100 + tail; responses are forced to full length. The loss is scored from the hidden states and the LM heads (the
trainer's default); ``--loss-from hidden,logits`` adds rows scored from full logits, the memory that default saves at a
real vocabulary.

Prints a table and ends with one JSON line. FLOPs per step are estimated as 2 x parameters x tokens for each
forward (generation, teacher, student) plus 4 x parameters x tokens for the student's backward; MFU divides them by
the step time and `--peak-tflops` (989, dense bf16 on H100/H200).

    python bench/gpu_step.py                      # both architectures, full fine-tune and LoRA
    python bench/gpu_step.py --arch qwen3.5-4b --batch 2 --rollouts 4 --new-tokens 256
    python bench/gpu_step.py --smoke              # shrunk shapes on the CPU: checks the script itself
    python bench/gpu_step.py --arch qwen2.5-vl-3b --modes full --loss-from hidden,logits
    python bench/gpu_step.py --engine hf,vllm      # rollouts from generate and from the colocated vLLM engine

With ``--engine vllm`` (the `vllm` extra) the rollouts come from the colocated engine (docs/rollouts.md), forced to
full length too; its weights and KV cache live in vLLM's own memory pool, outside torch's peak, so those rows also
give the device memory in use at the end (``device_used_gib``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REAL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3.5-4b": {
        "text": {
            "hidden_size": 2560,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "intermediate_size": 9216,
            "vocab_size": 248320,
            "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 8,
            # Gated DeltaNet heads: transformers' Qwen3.5 defaults (16 key / 32 value heads of 128).
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
        },
        "vision": {
            "hidden_size": 1152,
            "depth": 27,
            "num_heads": 16,
            "intermediate_size": 4304,
            "out_hidden_size": 2560,
        },
    },
    "qwen2.5-vl-3b": {
        "text": {
            "hidden_size": 2048,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "intermediate_size": 11008,
            "vocab_size": 151936,
            "max_window_layers": 36,
            "tie_word_embeddings": True,
        },
        "vision": {
            "hidden_size": 1280,
            "depth": 32,
            "num_heads": 16,
            "intermediate_size": 3420,
            "out_hidden_size": 2048,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
    },
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {  # the same families, a few layers of small width, for a CPU check
    "qwen3.5-4b": {
        "text": {
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "intermediate_size": 256,
            "vocab_size": 4096,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        },
        "vision": {"hidden_size": 64, "depth": 2, "num_heads": 4, "intermediate_size": 128, "out_hidden_size": 128},
    },
    "qwen2.5-vl-3b": {
        "text": {
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 256,
            "vocab_size": 4096,
            "max_window_layers": 4,
        },
        "vision": {
            "hidden_size": 64,
            "depth": 2,
            "num_heads": 4,
            "intermediate_size": 128,
            "out_hidden_size": 128,
            "fullatt_block_indexes": [1],
        },
    },
}


def build(arch: str, shapes: dict[str, Any], folder: Path, device: torch.device) -> Path:
    """A model folder of the architecture at ``shapes``: the tiny builder's tokenizer and processor, random bf16
    weights of the real size (initialised on the device, so a 4B model is written in seconds)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if arch == "qwen3.5-4b":
        from vopd.tiny_models import build_tiny_qwen35

        build_tiny_qwen35(folder)
    else:
        build_qwen25vl_processor(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    for key, value in shapes["text"].items():
        setattr(config.text_config, key, value)
    config.tie_word_embeddings = getattr(config.text_config, "tie_word_embeddings", False)
    if "layer_types" not in shapes["text"] and getattr(config.text_config, "layer_types", None) is not None:
        config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
    for key, value in shapes["vision"].items():
        setattr(config.vision_config, key, value)
    if arch == "qwen3.5-4b":  # M-RoPE over a quarter of each 256-wide head: 32 frequencies, split as Qwen3.5 does
        rotary = int(config.text_config.head_dim * 0.25) // 2
        config.text_config.rope_parameters["mrope_section"] = [rotary - 2 * (rotary // 3), rotary // 3, rotary // 3]
    else:  # Qwen2.5-VL splits half of each head's frequencies 2 : 3 : 3 over (time, height, width): 16/24/24 at 128
        half = config.text_config.hidden_size // config.text_config.num_attention_heads // 2
        config.text_config.rope_parameters["mrope_section"] = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def build_qwen25vl_processor(folder: Path) -> None:
    """Qwen2.5-VL's config class with the tiny Qwen2-VL tokenizer and processor (the same dialect)."""
    from transformers import Qwen2_5_VLConfig

    from vopd.tiny_models import build_tiny_qwen2vl

    build_tiny_qwen2vl(folder)
    tiny = json.loads((folder / "config.json").read_text())
    config = Qwen2_5_VLConfig(
        text_config=tiny["text_config"],
        vision_config={"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112},
        image_token_id=tiny["image_token_id"],
        video_token_id=tiny["video_token_id"],
        vision_start_token_id=tiny["vision_start_token_id"],
        vision_end_token_id=tiny["vision_end_token_id"],
    )
    config.save_pretrained(folder)
    for stale in folder.glob("model*.safetensors"):
        stale.unlink()


def run(
    arch: str,
    lora: bool,
    loss_from: str,
    args: argparse.Namespace,
    work: Path,
    device: torch.device,
    engine: str = "hf",
) -> dict[str, Any]:
    from vopd.config import TrainConfig
    from vopd.synth import SynthConfig, generate_dataset
    from vopd.trainer import OPDTrainer

    shapes = (SMOKE_SHAPES if args.smoke else REAL_SHAPES)[arch]
    folder = work / arch
    if not (folder / "config.json").exists() or not list(folder.glob("model*.safetensors")):
        folder = build(arch, shapes, folder, device)  # once per architecture: both modes load the same weights
    data = work / f"data-{arch}" / "data.jsonl"
    if not data.exists():
        data = generate_dataset(data.parent, SynthConfig(n=16, seed=0, size=args.image, box_size=args.image // 4))
    config = TrainConfig(
        model=str(folder),
        dataset=str(data),
        output=str(work / f"run-{arch}-{lora}-{loss_from}-{engine}"),
        steps=1000,
        batch_size=args.batch,
        lr=2e-6,
        freeze_vision_tower=lora,
        collapse_guard={"enabled": False},
        rollout={
            "num_rollouts": args.rollouts,
            "max_new_tokens": args.new_tokens,
            "engine": engine,
            "vllm": {"gpu_memory_utilization": args.gpu_memory_utilization},
        },
        lora={"enabled": lora, "rank": 16},
        divergence={"from_hidden_states": loss_from == "hidden"},
        runtime={"device": device.type, "dtype": "bfloat16" if device.type == "cuda" else "float32"},
    )
    trainer = OPDTrainer(config)
    trainer.loaded.eos_token_ids = [trainer.loaded.suppressed_token_ids[0]]  # never sampled: full-length rollouts
    if hasattr(trainer.engine, "sampling_overrides"):
        trainer.engine.sampling_overrides["ignore_eos"] = True  # vLLM stops on the tokenizer's EOS besides ours
    parameters = sum(p.numel() for p in trainer.student.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, metrics = [], {}
    for index in range(args.warmup + args.steps):
        started = time.perf_counter()
        metrics = trainer.train_step()
        trainer.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - started)
    step_time = statistics.median(times)
    rows = args.batch * args.rollouts
    response_tokens = rows * args.new_tokens
    prompt_tokens = rows * _prompt_tokens(trainer)
    # generation ~ one forward over prompt + response; teacher and student forwards likewise; backward = 2 forwards
    flops = 2 * parameters * (prompt_tokens + response_tokens) * 3 + 4 * parameters * (prompt_tokens + response_tokens)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    used = float("nan")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        used = (total - free) / 2**30
    trainer.engine.close()
    del trainer  # the next configuration starts from an empty device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "arch": arch,
        "mode": "lora" if lora else "full",
        "engine": engine,
        "loss_from": loss_from,
        "parameters_b": parameters / 1e9,
        "step_s": step_time,
        "response_tokens_per_s": response_tokens / step_time,
        "peak_gib": peak,
        "device_used_gib": used,
        "mfu": flops / step_time / (args.peak_tflops * 1e12),
        "rollout_s": metrics["rollout_time"],
        "teacher_s": metrics["teacher_time"],
        "student_s": metrics["student_time"],
        "sync_s": metrics.get("rollout/sync_s", 0.0),
        # vllm rows: max |engine - trainer| log-prob over the last step's response tokens (bf16 rounding if synced)
        "logprob_diff_max": metrics.get("rollout/logprob_diff_max"),
    }


def _prompt_tokens(trainer) -> int:
    from vopd.views import student_view

    return int(
        trainer.loaded.encode(trainer._conversations(trainer._samples_for(0)[:1], student_view))["input_ids"].shape[1]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=[*REAL_SHAPES, "both"], default="both")
    parser.add_argument("--modes", default="full,lora", help="full, lora or both (comma-separated)")
    parser.add_argument(
        "--loss-from", default="hidden", help="hidden (the default), logits, or both comma-separated: extra rows"
    )
    parser.add_argument("--batch", type=int, default=2, help="prompts per step")
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--new-tokens", type=int, default=256, help="response length (forced)")
    parser.add_argument("--image", type=int, default=448, help="image side in pixels")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    parser.add_argument("--smoke", action="store_true", help="shrunk shapes on the CPU (checks the script)")
    parser.add_argument("--engine", default="hf", help="rollout engines, comma-separated: hf, vllm (the vllm extra)")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.7, help="vllm rows: the engine's share of the GPU"
    )
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke to check the script on a CPU")
    work = Path(tempfile.mkdtemp(prefix="vopd-gpu-step-"))
    arches = list(REAL_SHAPES) if args.arch == "both" else [args.arch]
    results = []
    for arch in arches:
        for mode in args.modes.split(","):
            for loss_from in args.loss_from.split(","):
                if loss_from not in ("hidden", "logits"):
                    raise SystemExit(f"--loss-from takes hidden and/or logits, not {loss_from!r}")
                for engine in args.engine.split(","):
                    if engine not in ("hf", "vllm"):
                        raise SystemExit(f"--engine takes hf and/or vllm, not {engine!r}")
                    started = time.perf_counter()
                    results.append(run(arch, mode == "lora", loss_from, args, work, device, engine))
                    # each row as soon as it is measured, so a run stopped at its time limit still reports what it has
                    print(f"row: {json.dumps(results[-1])} ({time.perf_counter() - started:.0f} s)", flush=True)
    print(
        f"{args.batch} prompts x {args.rollouts} rollouts x {args.new_tokens} tokens, {args.image} px, "
        f"median of {args.steps} steps after {args.warmup} warm-up, {'CPU smoke' if args.smoke else device}"
    )
    print(
        "| arch | mode | loss from | engine | params (B) | step (s) | response tok/s | peak GiB | device GiB | MFU "
        "| rollout / teacher / student / sync (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['arch']} | {row['mode']} | {row['loss_from']} | {row['engine']} | {row['parameters_b']:.2f} | "
            f"{row['step_s']:.2f} | {row['response_tokens_per_s']:.0f} | {row['peak_gib']:.1f} | "
            f"{row['device_used_gib']:.1f} | {row['mfu']:.3f} | {row['rollout_s']:.2f} / {row['teacher_s']:.2f} / "
            f"{row['student_s']:.2f} / {row['sync_s']:.2f} |"
        )
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
