"""Peak memory and time of the distillation loss, LM head projection included, against the kernels users would pick.

At the paper's scale the loss's inputs are the final hidden states of both models at the response positions and their
LM heads (Qwen2.5-VL-3B/7B class: hidden 1536, vocabulary 151,936; 4 rollouts x 1024 response tokens). Each method
runs forward + backward from there, the gradient reaching the student's hidden states and LM head:

* ``ours, top-100 + tail``: ``vopd.divergence.linear_divergence_loss``, the paper's loss: JSD(0.5) on the student's
  top-100 tokens plus a tail bucket, hidden states projected in chunks (no [N, V] logits for either side).
* ``ours, full vocabulary``: the same function with ``topk=0`` (the JSD the three peers below compute).
* ``naive fp32 full-vocab JSD``: project both sides to [N, V] logits and compute the JSD on whole tensors (TRL's
  classic ``generalized_jsd_loss``). It needs about 10 [N, V] fp32 tensors (~25 GB here), more than this machine
  can spare, so by default it runs at two smaller token counts and its memory and time are extrapolated linearly
  (both are linear in the tokens: every tensor but the head's gradient is [N, ...]); ``--naive-full`` runs it.
* ``TRL ChunkedDivergenceFunction``: ``trl/kernels/chunked_divergence.py`` (DistillationTrainer's loss; plain-torch
  tiles on CPU).
* ``TRL SDFT top-k loss``: ``trl.experimental.sdft``'s ``compute_topk_self_distillation_loss`` (top-100 + tail, the
  same math as ours) on full logits.
* ``Liger LigerFusedLinearJSDLoss``: ``liger_kernel.chunked_loss`` (full vocabulary, runs on CPU without Triton;
  ``compiled=False``: torch.compile would spend minutes compiling).

Each method runs in a fresh subprocess, so its peak is its own: the peak is ``resource.getrusage(RUSAGE_SELF)
.ru_maxrss`` after one forward + backward minus the resident size just before it (inputs allocated); it includes the
gradients of the hidden states and of the head ([V, H] fp32, 0.9 GB, which every method needs). glibc's mmap
threshold is pinned low so that freed blocks leave the process rather than being counted as live. Time is the wall
time of that one pass (``--repeats`` adds timed passes; the minimum is shown). The loss is the token-mean; values
must agree between methods computing the same math (``max_abs_diff``: the largest difference to the first of each
group that ran, ours when it did). Prints a table and ends with one JSON line (``memory_ratio_vs_naive`` = naive
peak / our top-k peak; goal at least 10).

By default it runs ours, the naive loss and TRL's SDFT loss (the peer with our math, and the fastest): about 3
minutes on 2 idle cores. TRL's chunked kernel and Liger's loss take minutes each at this shape (TRL's projects each
side four times: 2.5 to 3.5 minutes alone), which would take the run past five; ``--all`` adds them (8 to 11
minutes, depending on the machine's day), ``--tokens 256`` runs all of them in about 3 (there the naive loss, whose
peak scales with the tokens while ours carries the head's fixed 0.9 GB gradient, is only about 7x ours). On a
shared machine, run them a few at a time with ``--methods``.

    python bench/loss_memory.py                 # the paper's shape: ours, naive, TRL SDFT
    python bench/loss_memory.py --all           # and TRL's chunked kernel and Liger's loss
    python bench/loss_memory.py --quick         # vocab 32,000, 4 x 128 tokens, hidden 256: seconds (also a test)
    python bench/loss_memory.py --methods ours trl-chunked --tokens 512
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

METHODS = {
    "ours": "ours, top-100 + tail",
    "ours-full": "ours, full vocabulary",
    "naive": "naive fp32 full-vocab JSD",
    "trl-chunked": "TRL ChunkedDivergenceFunction",
    "trl-sdft": "TRL SDFT top-k loss (100 + tail)",
    "liger": "Liger LigerFusedLinearJSDLoss",
}
# The default fits in five minutes at the paper's shape on two cores; --all adds the two slow full-vocabulary peers.
DEFAULT_METHODS = ("ours", "naive", "trl-sdft")
ALL_METHODS = ("ours", "naive", "trl-chunked", "trl-sdft", "liger")  # ours-full: naive/TRL/Liger's math, 1 more minute
# Which methods compute the same number (compared with the first of each group).
GROUPS = {"ours": ("ours", "trl-sdft"), "ours-full": ("ours-full", "naive", "trl-chunked", "liger")}
ALPHA = 0.5
TOPK = 100


def naive_generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalized JSD on whole [N, V] tensors, as most code writes it; every intermediate lives until backward."""
    student = torch.log_softmax(student_logits.float(), dim=-1)  # (N, V)
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)  # (N, V)
    mixture = torch.logsumexp(
        torch.stack([student + torch.log1p(torch.tensor(-alpha)), teacher + torch.log(torch.tensor(alpha))]), dim=0
    )
    kl_student = torch.nn.functional.kl_div(mixture, student, reduction="none", log_target=True).sum(-1)
    kl_teacher = torch.nn.functional.kl_div(mixture, teacher, reduction="none", log_target=True).sum(-1)
    return (1 - alpha) * kl_student + alpha * kl_teacher  # (N,)


def _pin_mmap_threshold(nbytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD (no-op elsewhere): big blocks are mapped and unmapped, never kept in the heap.

    Without it glibc raises the threshold after big frees and serves later chunk-sized blocks from its heap, where
    freed memory stays resident, so the high-water mark would count allocator caching rather than live tensors.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, nbytes)


def _resident_bytes() -> int:
    """Current resident size (Linux /proc), the baseline the high-water mark is compared with."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found: the CPU memory measurement needs Linux /proc")


def _loss_fn(method: str, hidden: int) -> Any:
    """(student_hidden, student_weight, teacher_hidden, teacher_weight) -> scalar token-mean loss."""
    if method in ("ours", "ours-full"):
        from vopd.divergence import linear_divergence_loss

        topk = TOPK if method == "ours" else 0

        def ours(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
            weights = torch.full((hs.shape[0],), 1.0 / hs.shape[0])
            loss, _ = linear_divergence_loss(hs, ws, ht, wt, weights, alpha=ALPHA, topk=topk)
            return loss

        return ours
    if method == "naive":
        return lambda hs, ws, ht, wt: naive_generalized_jsd(hs @ ws.t(), (ht @ wt.t()).detach(), ALPHA).mean()
    if method == "trl-chunked":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def trl_chunked(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
            per_token, _entropy = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, ALPHA)
            return per_token.mean()

        return trl_chunked
    if method == "trl-sdft":
        from trl.experimental.sdft.loss_utils import compute_topk_self_distillation_loss

        def sdft(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = ht @ wt.t()
            per_token = compute_topk_self_distillation_loss(
                hs @ ws.t(),
                teacher_logits,
                distillation_topk=TOPK,
                distillation_alpha=ALPHA,
                distillation_add_tail=True,
            )
            return per_token.mean()

        return sdft
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=ALPHA, compiled=False)

        def liger_loss(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
            labels = torch.zeros(hs.shape[0], dtype=torch.long)  # only the hard (CE) loss reads them; weight 0
            return liger(hs, ws, ht, wt, labels)

        return liger_loss
    raise ValueError(f"unknown method {method!r}")


def run_method(args: argparse.Namespace) -> dict[str, float]:
    """One method in this (fresh) process: one measured pass for memory and time, then ``--repeats`` timed passes."""
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = args.batch * args.tokens
    # Hidden states of unit scale and a head of std 1/sqrt(H) give logits of unit scale, as trained models have.
    student_hidden = torch.randn(rows, args.hidden, generator=generator).requires_grad_(True)
    teacher_hidden = (student_hidden.detach() + 0.5 * torch.randn(rows, args.hidden, generator=generator)).contiguous()
    student_weight = (torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden**0.5).requires_grad_(True)
    teacher_weight = (
        student_weight.detach() + 0.02 * torch.randn(args.vocab, args.hidden, generator=generator)
    ).contiguous()
    loss_fn = _loss_fn(args.method, args.hidden)

    def step() -> float:
        loss = loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight)
        loss.backward()
        value = float(loss.detach())
        student_hidden.grad = None
        student_weight.grad = None
        return value

    _pin_mmap_threshold(2**20)
    baseline = _resident_bytes()
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        seconds = min(seconds, time.perf_counter() - start)
    return {"extra_mib": max(peak - baseline, 0) / 2**20, "seconds": seconds, "loss": loss, "rows": rows}


def _child(args: argparse.Namespace, method: str, tokens: int) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--method", method, "--tokens", str(tokens)]
    for name in ("batch", "vocab", "hidden", "repeats", "threads"):
        command += [f"--{name}", str(getattr(args, name))]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        return {"error": lines[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _naive_fits(args: argparse.Namespace, tokens: int) -> bool:
    """About 12 live [N, V] fp32 tensors: run it whole when that fits in 4 GiB."""
    return 12 * args.batch * tokens * args.vocab * 4 < 4 * 2**30


def _naive_token_counts(args: argparse.Namespace) -> list[int]:
    """The largest halving of the tokens that fits, and its half: the naive loss's extrapolation points.

    They must be large: below a few hundred rows the [N, V] tensors are smaller than the head's gradient, which then
    sets the peak on its own, and a line through two such points falls far short (at 4 x 16 and 4 x 32 tokens the
    peaks differ by 37 MiB where the [N, V] tensors differ by 445)."""
    tokens = args.tokens
    while tokens > 2 and not _naive_fits(args, tokens):
        tokens //= 2
    return [max(1, tokens // 2), tokens]


def measure(args: argparse.Namespace) -> Iterator[tuple[str, dict[str, Any]]]:
    """(method, row) as each child process finishes, so a long run shows its rows as it goes."""
    for method in args.methods:
        if method == "naive" and not (args.naive_full or _naive_fits(args, args.tokens)):
            small = _naive_token_counts(args)
            first, second = (_child(args, method, tokens) for tokens in small)
            if "error" in first or "error" in second:
                yield method, first if "error" in first else second
                continue
            scale = (args.tokens - small[0]) / (small[1] - small[0])
            yield (
                method,
                {
                    "extra_mib": first["extra_mib"] + scale * (second["extra_mib"] - first["extra_mib"]),
                    "seconds": first["seconds"] + scale * (second["seconds"] - first["seconds"]),
                    "loss": None,  # a loss over other tokens: not comparable
                    "note": f"extrapolated from {small[0]} and {small[1]} tokens per sequence",
                },
            )
            continue
        yield method, _child(args, method, args.tokens)


def report(args: argparse.Namespace, measured: Iterator[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    logits_mib = args.batch * args.tokens * args.vocab * 4 / 2**20
    head_mib = args.vocab * args.hidden * 4 / 2**20
    print(
        f"N = {args.batch} x {args.tokens} response tokens, V = {args.vocab}, H = {args.hidden}, fp32, "
        f"{args.threads} threads, forward + backward with the LM head; one [N, V] fp32 logits = {logits_mib:.0f} MiB, "
        f"the head's gradient = {head_mib:.0f} MiB (in every peak)"
    )
    print(f"| {'method':<34} | {'peak extra MiB':>14} | {'fwd+bwd s':>9} | {'loss':>12} |", flush=True)
    print(f"|{'-' * 36}|{'-' * 15}:|{'-' * 10}:|{'-' * 13}:|", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for method, row in measured:
        rows[method] = row
        if "error" in row:
            print(f"| {METHODS[method]:<34} | failed: {row['error']}", flush=True)
            continue
        loss = "-" if row.get("loss") is None else f"{row['loss']:.6f}"
        note = f" ({row['note']})" if row.get("note") else ""
        print(
            f"| {METHODS[method] + note:<34} | {row['extra_mib']:>14.0f} | {row['seconds']:>9.2f} | {loss:>12} |",
            flush=True,
        )
    naive = rows.get("naive", {}).get("extra_mib")
    if naive:
        ratios = ", ".join(f"{m} {naive / r['extra_mib']:.1f}x" for m, r in rows.items() if r.get("extra_mib"))
        print(f"naive peak / peak: {ratios}")
    differences = []
    for members in GROUPS.values():
        values = [rows[m]["loss"] for m in members if rows.get(m, {}).get("loss") is not None]
        differences += [abs(value - values[0]) for value in values[1:]]  # against the first one that ran (ours)
    headline: dict[str, Any] = {
        "shape": {"batch": args.batch, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden},
        "peak_extra_mib": {m: round(r["extra_mib"]) for m, r in rows.items() if "extra_mib" in r},
        "seconds": {m: round(r["seconds"], 2) for m, r in rows.items() if "seconds" in r},
        "max_abs_diff": max(differences) if differences else None,
    }
    ours = rows.get("ours", {}).get("extra_mib")
    if naive and ours:
        headline["memory_ratio_vs_naive"] = round(naive / ours, 1)
    print(json.dumps(headline))
    return headline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="sequences")
    parser.add_argument("--tokens", type=int, default=1024, help="response tokens per sequence")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=0, help="extra timed passes (the minimum is shown)")
    parser.add_argument("--threads", type=int, default=2)
    which = parser.add_mutually_exclusive_group()  # --all with --methods would silently drop one of them
    which.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    which.add_argument("--all", action="store_true", help=f"every method but ours-full: {', '.join(ALL_METHODS)}")
    parser.add_argument("--naive-full", action="store_true", help="run the naive loss at full size (~25 GB)")
    parser.add_argument("--quick", action="store_true", help="vocab 32,000, 4 x 128 tokens, hidden 256")
    parser.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args)))
        return
    if args.all:
        args.methods = list(ALL_METHODS)
    if args.quick:
        args.vocab, args.tokens, args.hidden = 32_000, 128, 256
    report(args, measure(args))


if __name__ == "__main__":
    main()
