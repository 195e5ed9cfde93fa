"""Peak extra memory and time of the divergence loss (forward + backward): chunked vs a naive full-vocab version.

The naive version is what most code does (TRL's generalized JSD): log_softmax of the whole [B, T, V] logits for
both sides, then the mixture and the KLs on full tensors, each kept by autograd until backward. The chunked one
is ``vopd.divergence.token_divergence``. Each variant runs in a fresh subprocess so that its peak is its own: on
CUDA via ``torch.cuda.max_memory_allocated``; on CPU via the process's resident high-water mark (VmHWM), since
tracemalloc does not see torch's allocations (glibc's mmap threshold is pinned low for that pass, see
``_pin_mmap_threshold``). "extra" is the peak above the inputs (student logits, teacher
logits), so it includes the student logits' gradient ([B, T, V] in the logits' dtype), which every variant needs.

    python bench/divergence_memory.py                       # B=4, T=512, V=32000, fp32: well under a minute on CPU
    python bench/divergence_memory.py --vocab 151936 --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "naive full vocab": {"naive": True},
    "chunked full vocab": {"topk": 0},
    "chunked top-100 + tail": {"topk": 100},
}


def naive_generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """TRL-style generalized JSD on the whole tensor: several fp32 [B, T, V] tensors live until backward."""
    student = torch.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)  # (B, T, V)
    mixture = torch.logsumexp(torch.stack([student + math.log1p(-alpha), teacher + math.log(alpha)]), dim=0)
    kl_student = torch.nn.functional.kl_div(mixture, student, reduction="none", log_target=True).sum(-1)
    kl_teacher = torch.nn.functional.kl_div(mixture, teacher, reduction="none", log_target=True).sum(-1)
    return (1 - alpha) * kl_student + alpha * kl_teacher  # (B, T)


def _resident_high_water_mark() -> int:
    """Peak resident bytes of this process so far (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found: CPU memory measurement needs Linux /proc")


def _pin_mmap_threshold(nbytes: int) -> None:
    """Set glibc's mmap threshold (no-op elsewhere).

    glibc raises the threshold after big frees (up to 32 MiB) and then serves chunk-sized blocks from its heap,
    where freed memory stays resident: the high-water mark would count allocator caching, not live tensors. A
    1 MiB threshold during the memory pass maps and unmaps every big block; 32 MiB afterwards restores the fast
    reuse for the timed passes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    """Measure one variant in this process: one pass for memory, then timed passes."""
    from vopd.divergence import token_divergence

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.length, args.vocab)
    student = torch.randn(shape, device=device).to(dtype).requires_grad_(True)
    teacher = torch.randn(shape, device=device).to(dtype)
    options = VARIANTS[args.variant]

    def step() -> float:
        if options.get("naive"):
            values = naive_generalized_jsd(student, teacher, alpha=0.5)
        else:
            values = token_divergence(student, teacher, alpha=0.5, topk=options["topk"], chunk_size=args.chunk_size)
        loss = values.mean()
        loss.backward()
        student.grad = None
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        loss = step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - baseline
    else:
        _pin_mmap_threshold(2**20)
        baseline = _resident_high_water_mark()
        loss = step()
        extra = _resident_high_water_mark() - baseline
        _pin_mmap_threshold(32 * 2**20)

    timings = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return {"extra_mib": extra / 2**20, "seconds": min(timings), "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes after the memory pass (min is shown)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # set for the child process
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    logits_mib = args.batch * args.length * args.vocab * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20
    print(
        f"B={args.batch} T={args.length} V={args.vocab} {args.dtype} on {args.device}, chunk {args.chunk_size} rows; "
        f"one [B, T, V] logits tensor = {logits_mib:.0f} MiB (its gradient is part of every 'extra')"
    )
    print(f"| {'variant':<24} | {'extra peak MiB':>14} | {'x logits':>8} | {'fwd+bwd s':>9} | {'loss':>10} |")
    print(f"|{'-' * 26}|{'-' * 16}:|{'-' * 9}:|{'-' * 10}:|{'-' * 11}:|")
    repo_root = Path(__file__).resolve().parents[1]
    child_env = {**os.environ, "PYTHONPATH": str(repo_root)}
    for variant in VARIANTS:
        child = [sys.executable, str(Path(__file__).resolve()), "--variant", variant]
        for name in ("batch", "length", "vocab", "dtype", "device", "chunk_size", "repeats", "threads"):
            child += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        result = subprocess.run(child, capture_output=True, text=True, cwd=repo_root, env=child_env, check=False)
        if result.returncode != 0:
            print(f"| {variant:<24} | failed: {result.stderr.strip().splitlines()[-1]}")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"| {variant:<24} | {row['extra_mib']:>14.0f} | {row['extra_mib'] / logits_mib:>8.2f} | "
            f"{row['seconds']:>9.2f} | {row['loss']:>10.6f} |"
        )


if __name__ == "__main__":
    main()
