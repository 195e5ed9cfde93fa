"""How much memory a Vision-OPD run's state needs, by formula and as measured, and how big a model fits where.

The state of a full fine-tune with fp32 master weights is, per trainable parameter: the fp32 weight (4 bytes), its
gradient (4), AdamW's two moments (8) and the EMA teacher's fp32 copy (4) = 20 bytes; a frozen parameter (a frozen
encoder) costs 8, its copies in the student and in the teacher. FSDP divides all of it by the number of GPUs; DDP
divides none of it. With LoRA only the
adapters train (fp32, 20 bytes each) over a base kept in the compute dtype (2 bytes, shared by student and teacher).

This script (1) measures the bytes of every tensor the trainer holds after one step on the tiny 4.6M and 20M
Qwen2-VL models and compares them with the formula, then (2) prints the table of docs/scaling.md: the state per GPU
for real model sizes on 1 to 8 GPUs. Activations come on top; they grow with batch_size x num_rollouts x sequence
length and are what `batch_size`/`grad_accum` trade.

    python bench/memory_model.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

GIB = 1024**3
# Parameter counts of the architectures users train (language model + vision encoder), from their configs.
MODELS = {
    "Qwen2.5-VL-3B": 3.75e9,
    "Qwen3.5-4B": 4.7e9,
    "Qwen2.5-VL-7B": 8.3e9,
    "Qwen3.5-9B": 9.4e9,
    "Qwen3.5-27B": 27.4e9,
}


def formula_bytes(trainable: float, frozen: float, *, lora: bool = False, gpus: int = 1, fsdp: bool = True) -> float:
    """Bytes of training state per GPU (no activations)."""
    # LoRA: adapters pay fp32 weight, grad, two moments and EMA copy; the base is bf16 once (the teacher shares it).
    # Full fine-tune: the same 20 bytes per trainable parameter; a frozen one is held by the student and the teacher.
    total = 20 * trainable + (2 if lora else 8) * frozen
    return total / gpus if fsdp else total


def _tensor_bytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if tensor is None or not torch.is_tensor(tensor) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def measured_state_bytes(trainer) -> int:
    """Every weight, gradient, optimizer moment and teacher tensor the trainer holds (shared storage once)."""
    tensors = list(trainer.student.parameters())
    tensors += [p.grad for p in trainer.student.parameters()]
    for state in trainer.optimizer.state.values():
        tensors += [value for value in state.values() if torch.is_tensor(value) and value.dim() > 0]
    if trainer.teacher.frozen_copy is not None:
        tensors += list(trainer.teacher.frozen_copy.parameters())
    tensors += list(trainer.teacher.shadow.values())
    return _tensor_bytes(tensors)


def measure(size: str, work: Path, freeze_vision_tower: bool) -> dict[str, float]:
    from vopd.config import TrainConfig
    from vopd.synth import SynthConfig, generate_dataset
    from vopd.tiny_models import build_tiny_qwen2vl
    from vopd.trainer import OPDTrainer

    model = build_tiny_qwen2vl(work / f"tiny-{size}", size=size)  # type: ignore[arg-type]
    data = generate_dataset(work / f"data-{size}-{freeze_vision_tower}", SynthConfig(n=4, seed=0))
    config = TrainConfig(
        model=str(model),
        dataset=str(data),
        output=str(work / f"run-{size}-{freeze_vision_tower}"),
        steps=1,
        batch_size=2,
        freeze_vision_tower=freeze_vision_tower,
        collapse_guard={"enabled": False},
        rollout={"num_rollouts": 1, "max_new_tokens": 4},
        runtime={"device": "cpu", "dtype": "float32"},
    )
    trainer = OPDTrainer(config)
    trainer.train_step()
    trainable = sum(p.numel() for p in trainer.student.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in trainer.student.parameters() if not p.requires_grad)
    predicted = formula_bytes(trainable, frozen)
    measured = measured_state_bytes(trainer)
    return {
        "size": size,
        "frozen_encoder": freeze_vision_tower,
        "trainable": trainable,
        "frozen": frozen,
        "predicted_mib": predicted / 2**20,
        "measured_mib": measured / 2**20,
        "ratio": measured / predicted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="vopd-memory-"))
    rows = [measure(size, work, frozen) for size in ("5m", "20m") for frozen in (False, True)]
    print("| model | encoder | trainable | frozen | formula MiB | measured MiB | measured / formula |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| tiny {row['size']} | {'frozen' if row['frozen_encoder'] else 'trained'} | {row['trainable']:,} | "
            f"{row['frozen']:,} | {row['predicted_mib']:.1f} | {row['measured_mib']:.1f} | {row['ratio']:.3f} |"
        )
    print()
    print("| model | params | full FT, 1 GPU | FSDP 2 | FSDP 4 | FSDP 8 | LoRA (r16), 1 GPU |")
    print("|---|---|---|---|---|---|---|")
    for name, params in MODELS.items():
        full = [formula_bytes(params, 0, gpus=gpus) / GIB for gpus in (1, 2, 4, 8)]
        lora = formula_bytes(0.01 * params, params, lora=True) / GIB  # adapters ~1% of the weights at rank 16
        print(
            f"| {name} | {params / 1e9:.1f}B | "
            + " | ".join(f"{value:.0f} GiB" for value in full)
            + f" | {lora:.0f} GiB |"
        )
    worst = max(abs(row["ratio"] - 1) for row in rows)
    print(json.dumps({"max_relative_error": round(worst, 4), "measured": rows}))


if __name__ == "__main__":
    main()
