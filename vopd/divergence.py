"""Per-token divergences between the student's and the teacher's next-token distributions.

The math first. At each position t of the student's own rollout y (sampled on the full image), S_t = p_student(. |
full image, y_<t) and T_t = p_teacher(. | crop, y_<t) are next-token distributions over the vocabulary, each a
softmax of logits / temperature. Vision-OPD (arXiv 2605.18740) minimises, over every response token of a step,

    loss = (1 / N_tokens) * sum_t D_alpha(S_t, T_t),     gradient through S only (the teacher is a target),

where D_alpha is the generalized Jensen-Shannon divergence below, computed on the student's top-k tokens plus one
tail bucket. The most readable statement of all this is ``reference_divergence`` in tests/test_divergence.py:
probabilities, float64, one formula per definition, no code shared with this module; everything here is tested
against it for values and gradients. Conventions, following TRL's generalized JSD:

* ``0 < alpha < 1``: with the mixture M = (1 - alpha) S + alpha T,
  D = (1 - alpha) KL(S || M) + alpha KL(T || M)  (alpha = 0.5 is the symmetric JSD of the paper).
* ``alpha = 0``: forward KL(T || S); ``alpha = 1``: reverse KL(S || T). These end points are special cases, not
  limits of the mixture formula (which tends to 0 at both ends), exactly as in TRL.
* ``topk > 0``: both distributions are compared on the *student's* top-k tokens (chosen without gradient). With
  ``add_tail`` one more bucket holds the mass outside those k tokens, for each side, so both remain proper
  distributions over k + 1 buckets (the paper's choice). Without the tail, each side's k gathered log-probs are
  renormalised over the k entries: otherwise the "distributions" would not sum to one and KL could go negative.
  ``topk = 0`` or ``topk >= vocab`` means the full vocabulary.

The rest of this module is memory machinery, needed because real vocabularies are large. The logits of a long
rollout are [B, T, V] with V up to ~150k, so one fp32 log-softmax copy of them can
be larger than the model. Every function here walks positions in chunks of ``chunk_size`` rows and works in fp32
(fp64 for fp64 input) per chunk only. A plain autograd graph through the chunks would still keep each chunk's
log-softmax output (saved by its backward) alive until ``backward()``, i.e. a full fp32 copy in total. So the
differentiable entry points run through ``_ChunkedRows``: the forward keeps nothing but references to the inputs
(in top-k mode not even the teacher's: its O(tokens x k) bucket log-probs and the top-k ids are kept instead), and
the backward recomputes one chunk at a time and writes its gradient straight into the logits' gradient, with
closed-form gradients so that a chunk needs only a few [chunk, V] temporaries (autograd through a chunk would keep
~14). Extra memory is thus the gradient itself (which autograd needs anyway) plus a few chunks: 1.3-1.4x the
logits in all at V=32k, 256 rows per chunk, against 12x for the naive version. The default is 256 rows: with
V ~ 150k a [1024, V] fp32 temporary would already be 0.6 GB. ``linear_divergence_loss`` goes one step further and
starts from the hidden states and the LM heads, so that neither side's logits exist at all (``bench/loss_memory.py``
measures both against a naive loss, TRL's and Liger's).

Numerics: entries with zero probability (``-inf`` logits, underflow of near-one-hot rows) contribute 0 to a KL
(0 log 0 = 0) and are guarded with "safe" substitutions so that no NaN appears in values *or* gradients; the tail
bucket is the log-sum-exp of the log-probs outside the top-k (exact even when it holds 1e-30 of the mass, where
``log1p(-exp(logsumexp(top)))`` would round to -inf or to noise); the result is clamped at 0 against rounding.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from vopd.config import DivergenceConfig

NEG_INF = float("-inf")

__all__ = [
    "distillation_loss",
    "distribution_stats",
    "gather_token_logprobs",
    "hidden_distillation_loss",
    "linear_divergence_loss",
    "masked_token_mean",
    "per_token_details",
    "sampled_token_loss",
    "token_divergence",
]


# ----------------------------------------------------------------------------------------------------------------
# Row chunking without copies


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (their exp/log lose too much), fp64 kept so gradcheck sees double precision."""
    return torch.promote_types(dtype, torch.float32)


def _viewable_rows(tensor: Tensor, depth: int) -> bool:
    """Whether ``tensor[i0, ..., i_{depth-1}]`` can be seen as [rows, V] without a copy."""
    sub = tensor[(0,) * depth]
    try:
        sub.view(-1, tensor.shape[-1])
    except RuntimeError:
        return False
    return True


def _row_chunks(big: Sequence[Tensor], chunk_size: int) -> Iterator[tuple[int, int, list[Tensor]]]:
    """Yield ``(start, end, [chunk of each tensor as [end - start, V] views])`` over flattened leading positions.

    ``reshape(-1, V)`` of a slice such as ``logits[:, -R:]`` would silently copy the whole [B, R, V] tensor, so the
    leading dimensions are split at the shallowest depth where every tensor is row-viewable and chunks are taken
    inside each group. ``start``/``end`` index the row-major flattening of the leading dimensions.
    """
    leading = big[0].shape[:-1]
    vocab = big[0].shape[-1]
    if math.prod(leading) == 0:
        return
    depth = next(d for d in range(len(leading) + 1) if all(_viewable_rows(t, d) for t in big))
    group_rows = math.prod(leading[depth:])
    for group, index in enumerate(itertools.product(*(range(n) for n in leading[:depth]))):
        rows = [t[index].view(-1, vocab) for t in big]
        offset = group * group_rows
        for start in range(0, group_rows, chunk_size):
            end = min(start + chunk_size, group_rows)
            yield offset + start, offset + end, [r[start:end] for r in rows]


class _RowOp(Protocol):
    """A per-position quantity of one row of student logits, optionally with teacher logits and row-aligned aux data.

    ``grads`` returns the vector-Jacobian product for one chunk in closed form: recomputing the chunk through
    autograd instead would keep ~14 chunk-sized fp32 intermediates alive during its backward, against ~4 here.
    """

    def values(self, student_rows: Tensor, teacher_rows: Tensor | None, aux_rows: tuple[Tensor, ...]) -> Tensor:
        """(n, V), (n, V) | None, ((n, ...), ...) -> (n,) in the compute dtype."""
        ...

    def grads(
        self, student_rows: Tensor, teacher_rows: Tensor | None, aux_rows: tuple[Tensor, ...], grad_values: Tensor
    ) -> Tensor:
        """d(sum(grad_values * values)) / d student_rows.  # -> (n, V) in the compute dtype"""
        ...


class _ChunkedRows(torch.autograd.Function):
    """Apply a row-wise op chunk by chunk, differentiable w.r.t. the student rows only.

    Each output value depends on one row of the student logits only, so a chunk's gradient is that chunk's
    vector-Jacobian product: the backward recomputes chunk by chunk (nothing but the inputs is saved) and writes
    into the gradient tensor, which is what keeps the memory O(chunk x V) on top of the gradient itself.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        op: _RowOp,
        chunk_size: int,
        student: Tensor,
        teacher: Tensor | None,
        *aux: Tensor,
    ) -> Tensor:
        leading = student.shape[:-1]
        values = torch.empty(math.prod(leading), dtype=_compute_dtype(student.dtype), device=student.device)
        big = [student] if teacher is None else [student, teacher]
        for start, end, rows in _row_chunks(big, chunk_size):
            teacher_rows = rows[1] if teacher is not None else None
            values[start:end] = op.values(rows[0], teacher_rows, tuple(a[start:end] for a in aux))
        ctx.op = op
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(student, teacher, *aux)
        return values.view(leading)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        student, teacher, *aux = ctx.saved_tensors
        grad_student = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        grad_rows = grad_student.view(-1, student.shape[-1])  # (N, V), contiguous by construction
        grad_flat = grad_values.reshape(-1).to(_compute_dtype(student.dtype))  # (N,)
        big = [student] if teacher is None else [student, teacher]
        for start, end, rows in _row_chunks(big, ctx.chunk_size):
            teacher_rows = rows[1] if teacher is not None else None
            aux_rows = tuple(a[start:end] for a in aux)
            grad_rows[start:end] = ctx.op.grads(rows[0], teacher_rows, aux_rows, grad_flat[start:end])
        return (None, None, grad_student, None, *(None for _ in aux))


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")


def _check_divergence_settings(alpha: float, topk: int, temperature: float, chunk_size: int) -> None:
    """The settings shared by the logits and the hidden-state forms of the divergence."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {alpha}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0 (0 = full vocabulary), got {topk}")
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)


def _check_heads(hidden_size: int, student_weight: Tensor, teacher_size: int, teacher_weight: Tensor) -> None:
    """Both LM heads (V, H) share the vocabulary and fit their sides' hidden sizes."""
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"both LM heads must share the vocabulary, got {student_weight.shape[0]} and {teacher_weight.shape[0]} rows"
        )
    if student_weight.shape[1] != hidden_size or teacher_weight.shape[1] != teacher_size:
        raise ValueError("each LM head must be (V, H) with the H of its hidden states")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() < 1 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape [..., vocab], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; align the last R response positions "
            "of both (teacher and student prompts differ in length) before calling"
        )


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """Log-probabilities of one chunk in the compute dtype.  # (n, V) -> (n, V)"""
    scaled = logits.to(_compute_dtype(logits.dtype))
    if temperature != 1.0:
        scaled = scaled / temperature
    return torch.log_softmax(scaled, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Divergences on log-probability buckets (pure functions on [n, m] log-probs that each sum to one)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P || Q) over the last dimension, with 0 log 0 = 0.

    -inf is replaced *before* the arithmetic rather than only masked after it, so that the function also stays
    NaN-free under autograd (both branches of a ``torch.where`` are differentiated there).
    """
    support = logp != NEG_INF  # NaN stays in the support so that it propagates instead of hiding
    logp_safe = torch.where(support, logp, 0.0)
    logq_safe = torch.where(support, logq, 0.0)
    terms = torch.where(support, logp_safe.exp() * (logp_safe - logq_safe), 0.0)
    return terms.sum(-1)


def _mixture_logprobs(student: Tensor, teacher: Tensor, alpha: float) -> Tensor:
    """log((1 - alpha) S + alpha T), computed with logaddexp; entries where both are 0 are never read."""
    both_empty = (student == NEG_INF) & (teacher == NEG_INF)
    # logaddexp(-inf, -inf) is NaN (and has a NaN gradient): give those unused entries a finite dummy instead.
    mixture = student.masked_fill(both_empty, 0.0).add_(math.log1p(-alpha))
    weighted_teacher = teacher.masked_fill(both_empty, 0.0).add_(math.log(alpha))
    return torch.logaddexp(mixture, weighted_teacher, out=mixture)  # in place: one [n, m] temporary less


def _divergence_from_logprobs(student: Tensor, teacher: Tensor, alpha: float) -> Tensor:
    """Generalized JSD / KL between two bucket distributions given as log-probs.  # (n, m), (n, m) -> (n,)"""
    if alpha == 0.0:
        divergence = _kl(teacher, student)
    elif alpha == 1.0:
        divergence = _kl(student, teacher)
    else:
        mixture = _mixture_logprobs(student, teacher, alpha)
        divergence = (1.0 - alpha) * _kl(student, mixture) + alpha * _kl(teacher, mixture)
    # A divergence is >= 0; rounding of distributions that agree can give -1e-8. The gradient there is ~0 anyway.
    return divergence.clamp_min(0.0)


def _tempered_copy(logits: Tensor, temperature: float) -> Tensor:
    """A chunk's logits / temperature as a new tensor in the compute dtype, for the in-place functions below."""
    scaled = logits.to(_compute_dtype(logits.dtype), copy=True)
    return scaled if temperature == 1.0 else scaled.div_(temperature)


def _split_top_and_rest_(
    logits: Tensor, topk_ids: Tensor, rest_max: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k + tail bucket log-probs of one chunk's tempered logits (or log-probs), overwriting them.

    Returns (buckets (n, k + 1), ``rest`` (n, V), ``rest_sum`` (n,)): ``rest`` is exp(logit - m) outside the top-k
    and 0 inside, written over ``logits``, with m the largest logit outside; ``rest_sum`` its row sums. Why in place:
    every entry of the chunk is touched by one scatter, one subtraction, one exp and one sum, with no [n, V] copy (a
    log-softmax, a masked copy and a log-sum-exp made four), and ``rest`` is what the gradient outside the top-k is
    made of (``_DivergenceOp._grads_top_and_tail_``). Shifting by the largest logit *outside* keeps the tail exact
    when it holds 1e-30 of the mass, where 1 - sum(top-k) would round to 0 or noise. ``rest_max`` is that largest
    logit when the caller has it (the student's (k+1)-th largest, from the top-k it took anyway); -inf (nothing
    outside has mass) gives a -inf tail.  # (n, V), (n, k) -> (n, k + 1), (n, V), (n,)
    """
    top = logits.gather(-1, topk_ids)  # (n, k)
    rest = logits.scatter_(-1, topk_ids, NEG_INF)
    if rest_max is None:
        rest_max = rest.amax(-1)  # (n,)
    shift = torch.where(rest_max.isfinite(), rest_max, 0.0)  # (NaN stays in the rest and propagates)
    rest_sum = rest.sub_(shift[:, None]).exp_().sum(-1)  # (n,), >= 1 whenever anything outside has mass
    # Relative to the row's largest logit, as a log-softmax computes, so that large logits keep their precision.
    top_max = top.amax(-1, keepdim=True)  # (n, 1)
    top = top - top_max
    log_rest = (shift - top_max[:, 0]) + rest_sum.log()  # (n,): log of the unnormalised mass outside
    log_norm = torch.logaddexp(top.logsumexp(-1), log_rest)  # (n,): the log-softmax's normaliser
    return torch.cat([top, log_rest[:, None]], dim=-1).sub_(log_norm[:, None]), rest, rest_sum


def _bucket_logprobs(logits: Tensor, topk_ids: Tensor | None, temperature: float, add_tail: bool) -> Tensor:
    """The distribution compared by the divergence, as log-probs.  # (n, V) -> (n, V) | (n, k) | (n, k + 1)"""
    if topk_ids is not None and add_tail:
        return _split_top_and_rest_(_tempered_copy(logits, temperature), topk_ids)[0]
    return _bucket_logprobs_from(_log_softmax(logits, temperature), topk_ids)


def _bucket_logprobs_from(logprobs: Tensor, topk_ids: Tensor | None) -> Tensor:
    """Buckets without a tail from full-vocabulary log-probs: the k entries renormalised, or the full vocabulary as
    is.  # (n, V) -> (n, k) | (n, V)"""
    if topk_ids is None:
        return logprobs
    top = logprobs.gather(-1, topk_ids)  # (n, k)
    norm = top.logsumexp(-1, keepdim=True)  # (n, 1)
    # A teacher with no mass at all on the student's top-k cannot be renormalised: leave it at -inf (zero mass).
    return top - norm.masked_fill(norm == NEG_INF, 0.0)


def _divergence_bucket_grad(student: Tensor, teacher: Tensor, alpha: float) -> Tensor:
    """dD/d(student bucket log-probs), in closed form.  # (n, m), (n, m) -> (n, m)

    With p = exp(student), q = exp(teacher): reverse KL gives p (log p - log q + 1); forward KL gives -q; the
    mixture form gives (1 - alpha) p (log p - log M), because the terms from M's own dependence on p sum to
    (1 - alpha) p (1 - M / M) = 0. Zero-probability buckets get 0 rather than 0 * inf.
    """
    if alpha == 0.0:
        return -teacher.exp()
    if alpha == 1.0:
        other, scale = teacher - 1.0, 1.0
    else:
        other, scale = _mixture_logprobs(student, teacher, alpha), 1.0 - alpha
    outside = student == NEG_INF
    student_safe = student.masked_fill(outside, 0.0)
    difference = other.masked_fill_(outside, 0.0).neg_().add_(student_safe)  # log p - other, 0 off the support
    return student_safe.exp_().mul_(difference).mul_(scale)  # in place: at most 3 [n, m] temporaries here


@dataclass(frozen=True)
class _DivergenceOp:
    """``token_divergence`` on one chunk.

    Full vocabulary: the teacher rows are given. Top-k: ``aux`` = (student top-k ids (n, k), teacher bucket
    log-probs (n, m)), both computed once up front, so the teacher's [N, V] logits need not outlive the forward.
    """

    alpha: float
    add_tail: bool
    temperature: float

    def _teacher_buckets(self, teacher_rows: Tensor | None, aux: tuple[Tensor, ...]) -> Tensor:
        if aux:
            return aux[1]
        assert teacher_rows is not None
        return _log_softmax(teacher_rows, self.temperature)

    def values(self, student_rows: Tensor, teacher_rows: Tensor | None, aux: tuple[Tensor, ...]) -> Tensor:
        topk_ids = aux[0] if aux else None
        student = _bucket_logprobs(student_rows, topk_ids, self.temperature, self.add_tail)
        return _divergence_from_logprobs(student, self._teacher_buckets(teacher_rows, aux), self.alpha)

    def grads(
        self, student_rows: Tensor, teacher_rows: Tensor | None, aux: tuple[Tensor, ...], grad_values: Tensor
    ) -> Tensor:
        """Chain rule by hand: buckets -> student log-probs -> log-softmax -> logits / temperature.

        The clamp at 0 in ``values`` only hides rounding, so its (zero-measure) effect on the gradient is ignored.
        """
        topk_ids = aux[0] if aux else None
        teacher = self._teacher_buckets(teacher_rows, aux)  # (n, m)
        if topk_ids is not None and self.add_tail:
            student, rest, rest_sum = _split_top_and_rest_(_tempered_copy(student_rows, self.temperature), topk_ids)
            return self._grads_top_and_tail_(student, rest, rest_sum, teacher, topk_ids, grad_values)
        logprobs = _log_softmax(student_rows, self.temperature)  # (n, V)
        student = _bucket_logprobs_from(logprobs, topk_ids)  # (n, m)
        return self.grads_from(logprobs, student, teacher, topk_ids, grad_values)

    def values_and_grads_from(
        self, logprobs: Tensor, teacher: Tensor, topk_ids: Tensor | None, grad_values: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """``values`` and (unless ``grad_values`` is None) ``grads`` of one chunk without a tail bucket, from the
        student's log-probs (n, V), which the gradient consumes, and the teacher's buckets (n, m)."""
        student = _bucket_logprobs_from(logprobs, topk_ids)  # (n, m)
        values = _divergence_from_logprobs(student, teacher, self.alpha)  # (n,)
        if grad_values is None:
            return values, None
        return values, self.grads_from(logprobs, student, teacher, topk_ids, grad_values)

    def top_and_tail_values_and_grads_(
        self,
        student: Tensor,
        teacher: Tensor,
        topk_ids: Tensor,
        student_rest_max: Tensor | None,
        grad_values: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``values`` and (unless ``grad_values`` is None) ``grads`` of one chunk with the tail bucket, from both
        sides' tempered logits or log-probs (n, V), which it overwrites (the gradient is written over the student's):
        the fused LM-head loss's one pass. ``student_rest_max``: the student's largest logit outside ``topk_ids``."""
        student_buckets, rest, rest_sum = _split_top_and_rest_(student, topk_ids, student_rest_max)
        teacher_buckets = _split_top_and_rest_(teacher, topk_ids)[0]
        values = _divergence_from_logprobs(student_buckets, teacher_buckets, self.alpha)  # (n,)
        if grad_values is None:
            return values, None
        grads = self._grads_top_and_tail_(student_buckets, rest, rest_sum, teacher_buckets, topk_ids, grad_values)
        return values, grads

    def grads_from(
        self, logprobs: Tensor, student: Tensor, teacher: Tensor, topk_ids: Tensor | None, grad_values: Tensor
    ) -> Tensor:
        """``grads`` without a tail bucket from the chunk's student log-probs (n, V) and both sides' buckets (n, m);
        consumes ``logprobs``."""
        grad_buckets = _divergence_bucket_grad(student, teacher, self.alpha).mul_(grad_values[:, None])  # (n, m)
        del teacher
        if topk_ids is None:
            grad_logprobs = grad_buckets  # (n, V)
        else:
            # Renormalisation over the k entries: d b_j / d s_i = [i == j] - exp(b_i).
            grad_top = grad_buckets - student.exp() * grad_buckets.sum(-1, keepdim=True)  # (n, k)
            grad_logprobs = torch.zeros_like(logprobs).scatter_(-1, topk_ids, grad_top)  # (n, V)
        # Through the log-softmax: d s_j / d z_i = [i == j] - p_i; then z = logits / temperature.
        row_sums = grad_logprobs.sum(-1, keepdim=True)  # (n, 1)
        grad_logits = grad_logprobs.sub_(logprobs.exp_().mul_(row_sums))
        return grad_logits if self.temperature == 1.0 else grad_logits.div_(self.temperature)

    def _grads_top_and_tail_(
        self,
        student: Tensor,
        rest: Tensor,
        rest_sum: Tensor,
        teacher: Tensor,
        topk_ids: Tensor,
        grad_values: Tensor,
    ) -> Tensor:
        """The gradient w.r.t. the logits for the top-k + tail buckets, written over ``rest`` (one scale and a scatter).

        ``student`` and ``teacher`` are the buckets (n, k + 1); ``rest`` and ``rest_sum`` come from
        ``_split_top_and_rest_``. With g the bucket gradients and t the tail's log-mass, the chain rule through the
        tail and the log-softmax gives dz_i = g_i - p_i S inside the top-k and dz_i = r_i g_tail - p_i S outside,
        where S = g_tail + sum(g_top) is the sum over the vocabulary of d/d logprob and r_i = exp(logprob_i - t)
        = rest_i / rest_sum (a ratio <= 1: never exp(-t), which overflows for a tiny tail). As p_i = r_i exp(t), the
        outside entries are rest_i (g_tail - exp(t) S) / rest_sum; the k inside entries are written over them.
        """
        grad_buckets = _divergence_bucket_grad(student, teacher, self.alpha).mul_(grad_values[:, None])  # (n, k + 1)
        k = topk_ids.shape[-1]
        has_tail = rest_sum > 0  # (n,)
        grad_tail = torch.where(has_tail, grad_buckets[:, k], 0.0)
        grad_top = grad_buckets[:, :k]  # (n, k)
        row_sums = grad_tail + grad_top.sum(-1)  # (n,)
        outside = torch.where(has_tail, (grad_tail - student[:, k].exp() * row_sums) / rest_sum, 0.0)  # (n,)
        inside = grad_top - student[:, :k].exp() * row_sums[:, None]  # (n, k)
        if self.temperature != 1.0:
            outside, inside = outside / self.temperature, inside / self.temperature
        return rest.mul_(outside[:, None]).scatter_(-1, topk_ids, inside)


@torch.no_grad()
def _topk_buckets(
    student_logits: Tensor, teacher_logits: Tensor, k: int, temperature: float, add_tail: bool, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """The student's top-k ids (N, k) and the teacher's bucket log-probs on them (N, k [+ 1]); no gradient.

    Top-k of the raw logits equals top-k of the tempered log-probs (a per-row increasing map), so no float copy is
    needed to choose them. Fixing the ids once makes the backward compare the very same buckets, and keeping only
    the teacher's O(tokens x k) buckets lets the caller free the teacher logits before ``backward()``.
    """
    total = math.prod(student_logits.shape[:-1])
    device = student_logits.device
    topk_ids = torch.empty(total, k, dtype=torch.long, device=device)
    width = k + 1 if add_tail else k
    teacher_buckets = torch.empty(total, width, dtype=_compute_dtype(teacher_logits.dtype), device=device)
    for start, end, (student_rows, teacher_rows) in _row_chunks([student_logits, teacher_logits], chunk_size):
        ids = student_rows.topk(k, dim=-1).indices  # (n, k)
        topk_ids[start:end] = ids
        teacher_buckets[start:end] = _bucket_logprobs(teacher_rows, ids, temperature, add_tail)
    return topk_ids, teacher_buckets


# ----------------------------------------------------------------------------------------------------------------
# Public API


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.5,
    topk: int = 100,
    add_tail: bool = True,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> Tensor:
    """Per-position divergence between student and teacher.  # (..., V), (..., V) -> (...)

    Unreduced and differentiable w.r.t. the student only (the teacher is detached here: it is a target, never
    trained through this loss). Values are in fp32 (fp64 for fp64 input) whatever the logits' dtype. With
    ``alpha = 0`` a teacher with mass where the student has a -inf logit gives +inf, which is the true KL.
    """
    _check_divergence_settings(alpha, topk, temperature, chunk_size)
    _check_pair(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]
    op = _DivergenceOp(alpha=float(alpha), add_tail=add_tail, temperature=float(temperature))
    teacher_logits = teacher_logits.detach()
    if topk == 0 or topk >= vocab:
        return _ChunkedRows.apply(op, chunk_size, student_logits, teacher_logits)
    aux = _topk_buckets(student_logits, teacher_logits, topk, float(temperature), add_tail, chunk_size)
    return _ChunkedRows.apply(op, chunk_size, student_logits, None, *aux)


@dataclass
class _HeadLossExtras:
    """What the trainer's loss needs besides the divergence, read from the same chunks of logits in the same pass.

    ``sampled_ids`` (N,) with ``behaviour_logprobs`` (N,) and ``is_clip``: each row's weight is multiplied by the
    detached importance weight min(p_S(y) / p_behaviour(y), is_clip) (as in ``distillation_loss``). ``stats_mask``
    (N,) with ``stats_k``: ``distribution_stats``'s sums over the masked rows are added into ``stats_totals`` (6,).
    """

    stats_mask: Tensor
    stats_k: int
    stats_totals: Tensor
    sampled_ids: Tensor | None = None
    behaviour_logprobs: Tensor | None = None
    is_clip: float | None = None
    sampled_logprobs: Tensor | None = None  # (N,) filled with the student's log-prob of each sampled token, if given

    def importance(self, student: Tensor, start: int, end: int) -> Tensor | None:
        """min(p_S(y) / p_behaviour(y), is_clip) of one chunk's rows from the student's log-probs (n, V), or None
        without behaviour log-probs. Records the sampled tokens' log-probs where asked to."""
        if self.sampled_ids is None:
            return None
        current = student.gather(-1, self.sampled_ids[start:end, None]).squeeze(-1)  # (n,)
        if self.sampled_logprobs is not None:
            self.sampled_logprobs[start:end] = current.detach()
        if self.behaviour_logprobs is None or self.is_clip is None:
            return None
        return _clipped_importance_weight(current, self.behaviour_logprobs[start:end], self.is_clip)

    def add_stats(self, student: Tensor, teacher: Tensor, start: int, end: int, student_ids: Tensor | None) -> None:
        """Adds the chunk's metric sums, from both sides' log-probs (n, V) and the student's top-k ids if known."""
        k = min(self.stats_k or student.shape[-1], student.shape[-1])
        rows = _stats_rows(student, teacher, k, student_ids)  # (n, 6)
        self.stats_totals += torch.where(self.stats_mask[start:end, None], rows, 0.0).sum(0).double()


_PROJECTION_BLOCK = 2048


def _log_softmax_(logits: Tensor) -> Tensor:
    """The log-softmax over the last dimension, written over ``logits`` on the CPU, where that is exact and about a
    third of the time of filling a fresh [chunk, V] tensor (whose pages are new each chunk); a new tensor elsewhere."""
    if logits.device.type == "cpu":
        return torch.log_softmax(logits, dim=-1, out=logits)
    return torch.log_softmax(logits, dim=-1)


def _project(hidden: Tensor, head: Tensor, out: Tensor) -> Tensor:
    """``hidden @ head.T`` written into ``out``.  # (n, H), (V, H), (n, V) -> (n, V)

    Why not one matmul on the CPU: for a chunk of ~128 rows the wide, short (n, V) product is BLAS's worst shape
    there; ``head @ hidden.T`` in vocabulary blocks, each block transposed into place while it is still in cache,
    runs 1.3-1.4x faster on the machines measured at hidden size 1536 (``bench/loss_memory.py``), about even at 256.
    Other devices take one matmul.
    """
    vocab = head.shape[0]
    if out.device.type != "cpu" or vocab <= _PROJECTION_BLOCK:  # (a small head gains nothing from blocks)
        return torch.mm(hidden, head.t(), out=out)
    block = torch.empty(_PROJECTION_BLOCK, hidden.shape[0], dtype=out.dtype, device=out.device)
    hidden_t = hidden.t()
    for start in range(0, vocab, _PROJECTION_BLOCK):
        end = min(start + _PROJECTION_BLOCK, vocab)
        torch.mm(head[start:end], hidden_t, out=block[: end - start])
        out[:, start:end].copy_(block[: end - start].t())
    return out


class _FusedLinearDivergence(torch.autograd.Function):
    """``sum_r row_weights[r] * D(student_r, teacher_r)`` from hidden states and LM heads, rows in chunks.

    Neither side's [N, V] logits ever exist: each chunk projects its rows through both heads, and because the loss is
    a *known* weighted sum of the per-row divergences (the token-mean weights are fixed before the forward), the
    chunk's gradient is finished in the forward too (closed form, as in ``_DivergenceOp.grads``) and folded into
    the hidden states' and the head's gradients at once. The backward only scales them by the incoming scalar, so
    each projection runs once: 4 matmuls in all against 5 for a recomputing backward (TRL's kernel does 8).
    ``extras`` (the trainer's importance weights and metrics) are read from the same chunks.

    The projections run in ``matmul_dtype`` (default: the hidden states' dtype), as autocast would run the LM head:
    fp32 master weights are used in bf16 then; each gradient comes back in its own input's dtype.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        op: _DivergenceOp,
        chunk_size: int,
        topk: int,
        extras: _HeadLossExtras | None,
        matmul_dtype: torch.dtype | None,
        row_weights: Tensor,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
    ) -> tuple[Tensor, Tensor]:
        rows_total = student_hidden.shape[0]
        vocab = student_weight.shape[0]
        compute = _compute_dtype(student_hidden.dtype)
        values = torch.empty(rows_total, dtype=compute, device=student_hidden.device)
        needs_hidden, needs_weight = ctx.needs_input_grad[6], ctx.needs_input_grad[7]
        grad_hidden = torch.zeros_like(student_hidden, dtype=compute) if needs_hidden else None
        grad_weight = torch.zeros_like(student_weight, dtype=compute) if needs_weight else None
        matmul = matmul_dtype or student_hidden.dtype
        student_head = student_weight.to(matmul)  # (V, H), the weight itself when the dtypes agree
        teacher_head = teacher_weight.to(matmul_dtype or teacher_hidden.dtype)
        full_vocabulary = topk == 0 or topk >= vocab
        with_tail = op.add_tail and not full_vocabulary
        loss = torch.zeros((), dtype=compute, device=student_hidden.device)
        # One [chunk, V] buffer per side, filled by each chunk's projection and reused: no fresh pages per chunk.
        buffer_rows = min(chunk_size, rows_total)
        device = student_hidden.device
        student_buffer = torch.empty(buffer_rows, vocab, dtype=student_head.dtype, device=device)
        teacher_buffer = torch.empty(buffer_rows, vocab, dtype=teacher_head.dtype, device=device)
        for start in range(0, rows_total, chunk_size):
            end = min(start + chunk_size, rows_total)
            hidden = student_hidden[start:end].to(matmul)  # (n, H)
            student = _project(hidden, student_head, student_buffer[: end - start]).to(compute)  # (n, V)
            teacher = _project(
                teacher_hidden[start:end].to(teacher_head.dtype), teacher_head, teacher_buffer[: end - start]
            )
            teacher = teacher.to(compute)
            if op.temperature != 1.0:
                student, teacher = student.div_(op.temperature), teacher.div_(op.temperature)
            if extras is not None or not with_tail:
                # One log-softmax per side serves the metrics, the importance weight, the top-k and the divergence.
                student, teacher = _log_softmax_(student), _log_softmax_(teacher)
            # With the tail, one more than k: the (k+1)-th largest is the largest outside the top-k, which the split
            # needs. Ranking the logits ranks the log-probs.
            ranked = None if full_vocabulary else student.topk(topk + with_tail, dim=-1)
            ids = None if ranked is None else ranked.indices[:, :topk]  # (n, k)
            weights = row_weights[start:end]
            if extras is not None:
                extras.add_stats(student, teacher, start, end, ids)
                importance = extras.importance(student, start, end)
                if importance is not None:
                    weights = torch.where(weights != 0, weights * importance, 0.0)
            wanted = (grad_hidden is not None or grad_weight is not None) and bool((weights != 0).any())
            if with_tail:
                assert ranked is not None and ids is not None
                chunk_values, grad_rows = op.top_and_tail_values_and_grads_(
                    student, teacher, ids, ranked.values[:, topk], weights if wanted else None
                )
            else:
                teacher = _bucket_logprobs_from(teacher, ids)  # (n, m): all the divergence needs of it
                chunk_values, grad_rows = op.values_and_grads_from(student, teacher, ids, weights if wanted else None)
            values[start:end] = chunk_values
            # Rows outside the loss may hold inf/NaN divergences (padding): select them away, never multiply by 0.
            loss += torch.where(weights != 0, chunk_values * weights, 0.0).sum()
            if grad_rows is None:
                continue
            outside_loss = (weights == 0).nonzero().squeeze(-1)
            if outside_loss.numel():
                grad_rows.index_fill_(0, outside_loss, 0.0)
            grad_rows = grad_rows.to(student_head.dtype)
            del student, teacher
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_rows @ student_head
            if grad_weight is not None:
                grad_weight.addmm_(grad_rows.t().to(compute), hidden.to(compute))
        # Kept on ctx rather than saved for backward: the backward hands them over as the only reference, so autograd
        # can take the head-sized gradient as the parameter's .grad instead of copying it.
        ctx.grads = (
            None if grad_hidden is None else grad_hidden.to(student_hidden.dtype),
            None if grad_weight is None else grad_weight.to(student_weight.dtype),
        )
        ctx.mark_non_differentiable(values)
        return loss, values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_values: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = (None, None)
        if bool((grad_loss != 1).any()):  # (a plain loss.backward() passes 1: no copy of the head-sized gradient)
            grad_hidden, grad_weight = (
                None if grad is None else grad * grad_loss.to(grad.dtype) for grad in (grad_hidden, grad_weight)
            )
        return (None, None, None, None, None, None, grad_hidden, grad_weight, None, None)


def linear_divergence_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    row_weights: Tensor,
    *,
    alpha: float = 0.5,
    topk: int = 100,
    add_tail: bool = True,
    temperature: float = 1.0,
    chunk_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """``token_divergence`` of the logits ``hidden @ weight.T``, weighted and summed, without building the logits.

    ``student_hidden`` (N, H) and ``teacher_hidden`` (N, H_t) are the final hidden states at the response positions
    (the LM head's inputs), ``student_weight`` (V, H) and ``teacher_weight`` (V, H_t) the two LM heads. Returns
    (scalar ``sum_r row_weights[r] * D_r``, per-row divergences (N,) detached). ``row_weights`` (N,) holds each
    row's weight in the loss, e.g. ``mask / normalizer`` for the token-mean: rows with weight 0 get no gradient and
    their (possibly inf or NaN, for padding) divergence is not added. Gradients reach the student's hidden states and
    head (both optional), never the teacher's.

    Why: with V ~ 150k the two [N, V] logits of a long rollout, their gradient and a log-softmax copy dwarf the
    model's activations. Here the extra memory is the head's gradient (which training needs anyway) plus a few
    [chunk_size, V] fp32 temporaries: ``bench/loss_memory.py`` measures it against a naive loss, TRL's and Liger's.
    The values equal ``token_divergence(hidden @ weight.T, ...)`` up to the matmuls' rounding.
    """
    _check_divergence_settings(alpha, topk, temperature, chunk_size)
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            "student_hidden and teacher_hidden must be (N, H) with the same N rows, got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    _check_heads(student_hidden.shape[-1], student_weight, teacher_hidden.shape[-1], teacher_weight)
    if row_weights.shape != student_hidden.shape[:1]:
        raise ValueError(f"row_weights must have shape ({student_hidden.shape[0]},), got {tuple(row_weights.shape)}")
    op = _DivergenceOp(alpha=float(alpha), add_tail=add_tail, temperature=float(temperature))
    return _FusedLinearDivergence.apply(
        op,
        chunk_size,
        topk,
        None,
        None,
        row_weights.detach().to(_compute_dtype(student_hidden.dtype)),
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
    )


def hidden_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    response_mask: Tensor,
    config: DivergenceConfig,
    *,
    response_ids: Tensor | None = None,
    behaviour_logprobs: Tensor | None = None,
    normalizer: float | None = None,
    stats_topk: int = 100,
    chunk_size: int = 128,
    matmul_dtype: torch.dtype | None = None,
    sampled_logprobs_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """``distillation_loss`` and ``distribution_stats`` of the logits ``hidden @ weight.T``, never building them.

    ``student_hidden`` (B, R, H) and ``teacher_hidden`` (B, R, H_t) are the final hidden states at the positions that
    predict the response tokens, ``student_weight`` (V, H) and ``teacher_weight`` (V, H_t) the LM heads; the other
    arguments mean what they mean for ``distillation_loss``. Returns (scalar loss, per-token divergence (B, R)
    detached and 0 off the mask, the metrics of ``distribution_stats`` with ``topk=stats_topk``), all from one pass
    over [chunk_size, V] blocks of both sides' logits (``full_logits`` mode only). ``matmul_dtype`` is the dtype
    of the head projections (the trainer passes its autocast dtype: the logits path runs the LM head under autocast
    too); by default each side's hidden-state dtype. The divergence itself is computed in fp32 (fp64 for fp64).
    ``sampled_logprobs_out`` (B, R), when given with ``response_ids``, receives the student's log-prob of each sampled
    token at ``config.temperature`` from the same pass (the trainer compares them with a rollout engine's).

    Why: the trainer's logits path holds both sides' (B, R, V) logits plus the student's gradient of them; with V ~
    150k and long rollouts that is gigabytes per micro-batch. Here it is a few [chunk_size, V] temporaries and the
    head's gradient, which training needs anyway. Values equal the logits path's up to the matmuls' rounding.
    """
    if config.mode != "full_logits":
        raise ValueError(f"hidden_distillation_loss computes the full_logits mode only, not {config.mode!r}")
    if student_hidden.dim() != 3 or student_hidden.shape[:2] != response_mask.shape:
        raise ValueError(
            f"student_hidden must be (B, R, H) with (B, R) = the mask's {tuple(response_mask.shape)}, "
            f"got {tuple(student_hidden.shape)}"
        )
    if teacher_hidden.dim() != 3 or teacher_hidden.shape[:2] != response_mask.shape:
        raise ValueError(f"teacher_hidden must be (B, R, H_t), got {tuple(teacher_hidden.shape)}")
    weighted = behaviour_logprobs is not None and config.is_clip is not None
    if weighted and response_ids is None:
        raise ValueError("response_ids (the sampled tokens) are required for importance weighting")
    if sampled_logprobs_out is not None and (response_ids is None or sampled_logprobs_out.shape != response_mask.shape):
        raise ValueError(f"sampled_logprobs_out needs response_ids and the shape {tuple(response_mask.shape)}")
    if weighted and behaviour_logprobs.shape != response_mask.shape:
        raise ValueError(
            f"behaviour_logprobs must have shape {tuple(response_mask.shape)}, got {tuple(behaviour_logprobs.shape)}"
        )
    if stats_topk < 0:
        raise ValueError(f"stats_topk must be >= 0 (0 = full vocabulary), got {stats_topk}")
    keep = response_mask.reshape(-1).bool()
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be a positive token count, got {normalizer}")
    denominator = float(normalizer) if normalizer is not None else float(max(int(keep.sum()), 1))
    compute = _compute_dtype(student_hidden.dtype)
    totals = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=student_hidden.device)
    extras = _HeadLossExtras(
        stats_mask=keep,
        stats_k=stats_topk,
        stats_totals=totals,
        sampled_ids=response_ids.reshape(-1) if weighted or sampled_logprobs_out is not None else None,
        behaviour_logprobs=behaviour_logprobs.reshape(-1).detach().to(compute) if weighted else None,
        is_clip=config.is_clip if weighted else None,
        sampled_logprobs=torch.zeros(keep.shape[0], dtype=compute, device=keep.device)
        if sampled_logprobs_out is not None
        else None,
    )
    _check_divergence_settings(config.alpha, config.topk, config.temperature, chunk_size)
    hidden_size, teacher_size = student_hidden.shape[-1], teacher_hidden.shape[-1]
    _check_heads(hidden_size, student_weight, teacher_size, teacher_weight)
    op = _DivergenceOp(alpha=float(config.alpha), add_tail=config.add_tail, temperature=float(config.temperature))
    row_weights = keep.to(compute) / denominator  # (in the compute dtype: 1 / denominator in fp32 would round)
    loss, values = _FusedLinearDivergence.apply(
        op,
        chunk_size,
        config.topk,
        extras,
        matmul_dtype,
        row_weights,
        student_hidden.reshape(-1, hidden_size),
        student_weight,
        teacher_hidden.detach().reshape(-1, teacher_size),
        teacher_weight.detach(),
    )
    per_token = torch.where(keep, values, 0.0).view(response_mask.shape)
    if sampled_logprobs_out is not None:
        assert extras.sampled_logprobs is not None
        sampled_logprobs_out.copy_(extras.sampled_logprobs.view(response_mask.shape))
    return loss, per_token, _stats_means(totals, int(keep.sum()))


@dataclass(frozen=True)
class _TokenLogprobOp:
    """``gather_token_logprobs`` on one chunk; ``aux`` = (token ids (n,),)."""

    temperature: float

    def values(self, logit_rows: Tensor, _unused: Tensor | None, aux: tuple[Tensor, ...]) -> Tensor:
        (token_ids,) = aux
        scaled = logit_rows.to(_compute_dtype(logit_rows.dtype)) / self.temperature  # (n, V)
        return scaled.gather(-1, token_ids[:, None]).squeeze(-1) - scaled.logsumexp(-1)  # (n,)

    def grads(self, logit_rows: Tensor, _unused: Tensor | None, aux: tuple[Tensor, ...], grad_values: Tensor) -> Tensor:
        """d log softmax(z / t)[y] / dz = (onehot(y) - softmax(z / t)) / t."""
        (token_ids,) = aux
        probs = _log_softmax(logit_rows, self.temperature).exp_()  # (n, V)
        grad = probs.mul_(-grad_values[:, None])
        grad.scatter_add_(-1, token_ids[:, None], grad_values[:, None].to(grad.dtype))
        return grad.div_(self.temperature)


def gather_token_logprobs(
    logits: Tensor, token_ids: Tensor, *, temperature: float = 1.0, chunk_size: int = 256
) -> Tensor:
    """log p(token) at each position, chunked so no full log-softmax copy is made.  # (..., V), (...) -> (...)"""
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    if logits.dim() < 1 or token_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_ids must have the logits' leading shape {tuple(logits.shape[:-1])}, got {tuple(token_ids.shape)}"
        )
    if token_ids.is_floating_point() or token_ids.is_complex():
        raise ValueError(f"token_ids must be integer token ids, got dtype {token_ids.dtype}")
    flat_ids = token_ids.reshape(-1).long()
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= logits.shape[-1]):
        raise ValueError(
            f"token ids must lie in [0, {logits.shape[-1]}), got [{int(flat_ids.min())}, {int(flat_ids.max())}]"
        )
    return _ChunkedRows.apply(_TokenLogprobOp(float(temperature)), chunk_size, logits, None, flat_ids)


def masked_token_mean(values: Tensor, mask: Tensor, normalizer: float | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set (token-mean); 0 when no position is.

    ``normalizer`` replaces the count of masked positions as the denominator: a step split into micro-batches (or
    ranks) passes the number of response tokens in the *whole* step, so that the summed micro-batch losses are the
    token-mean over every token of the step, whatever the split. Masked-out values may be NaN or inf (padding
    rows): they are selected away, not multiplied by zero.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values and mask must have the same shape, got {tuple(values.shape)} and {tuple(mask.shape)}")
    keep = mask.bool()
    total = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    if normalizer is not None:
        if not normalizer > 0:
            raise ValueError(f"normalizer must be a positive token count, got {normalizer}")
        return total / normalizer
    return total / keep.sum().clamp_min(1).to(values.dtype)


def _clipped_importance_weight(current_logprobs: Tensor, behaviour_logprobs: Tensor, is_clip: float) -> Tensor:
    """min(p_current / p_behaviour, is_clip), detached: a sampling correction, not part of the objective."""
    if current_logprobs.shape != behaviour_logprobs.shape:
        raise ValueError(
            f"behaviour_logprobs must have shape {tuple(current_logprobs.shape)}, got {tuple(behaviour_logprobs.shape)}"
        )
    log_ratio = current_logprobs.detach() - behaviour_logprobs.detach().to(current_logprobs.dtype)
    return log_ratio.exp().clamp_max(is_clip)


def sampled_token_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    behaviour_logprobs: Tensor | None = None,
    is_clip: float | None = 2.0,
    normalizer: float | None = None,
) -> Tensor:
    """Policy-gradient loss with the per-token advantage A = log p_T(y) - log p_S(y) (stop-gradient).

    The token-mean of -A * log p_S(y): its gradient is the single-sample estimate of the reverse-KL gradient,
    using only the sampled tokens' log-probs (no V-sized teacher/student comparison). When ``behaviour_logprobs``
    (the log-probs of the policy that sampled y, at the same temperature) is given and ``is_clip`` is not None,
    each token is weighted by the detached, clipped importance ratio min(p_S / p_behaviour, is_clip) (truncated
    importance sampling); ``is_clip=None`` disables the weight, as in ``distillation_loss``. All inputs (...).
    """
    if not (student_logprobs.shape == teacher_logprobs.shape == mask.shape):
        raise ValueError(
            "student_logprobs, teacher_logprobs and mask must have the same shape, got "
            f"{tuple(student_logprobs.shape)}, {tuple(teacher_logprobs.shape)}, {tuple(mask.shape)}"
        )
    keep = mask.bool()
    # Zero the advantage off the mask *before* multiplying: -inf log-probs on padding would make 0 * inf = NaN grads.
    advantage = torch.where(keep, teacher_logprobs.detach() - student_logprobs.detach(), 0.0)
    per_token = -advantage * student_logprobs
    if behaviour_logprobs is not None and is_clip is not None:
        weight = _clipped_importance_weight(student_logprobs, behaviour_logprobs, is_clip)
        per_token = per_token * torch.where(keep, weight, 0.0)
    return masked_token_mean(per_token, keep, normalizer)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    response_mask: Tensor,
    config: DivergenceConfig,
    *,
    response_ids: Tensor | None = None,
    behaviour_logprobs: Tensor | None = None,
    chunk_size: int = 256,
    normalizer: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The Vision-OPD loss over response positions, dispatched on ``config.mode``.

    Inputs: logits (B, R, V) of both models on the *same* response positions, ``response_mask`` (B, R), the sampled
    ``response_ids`` (B, R) (needed by sampled_token mode and by importance weighting) and, for tokens sampled by
    an older policy, their ``behaviour_logprobs`` (B, R) at ``config.temperature``. ``chunk_size`` is passed on
    (positions per chunk; lower it for very large vocabularies). ``normalizer``, when given, is the denominator of
    the token-mean instead of this call's own token count (see ``masked_token_mean``).

    Returns (scalar loss, per-token divergence (B, R) detached for metrics, 0 off the mask). In sampled_token mode
    the per-token value is the reverse-KL single-sample estimate log p_S(y) - log p_T(y).

    Importance weighting in full_logits mode: the objective is an expectation over the *current* student's
    rollouts. When rollouts are reused (gradient accumulation, several epochs per batch) they come from an older
    policy, so each token's divergence is weighted by min(p_S(y) / p_behaviour(y), is_clip): a detached
    per-token correction of the visited-prefix distribution (truncated importance sampling), clipped so a few
    tokens that became much likelier cannot dominate the batch. It is detached because it corrects *where* we
    measure the divergence, not *what* we minimise.
    """
    _check_pair(student_logits, teacher_logits)
    if response_mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"response_mask must have shape {tuple(student_logits.shape[:-1])} (the logits' leading dims), "
            f"got {tuple(response_mask.shape)}"
        )
    keep = response_mask.bool()
    needs_ids = config.mode == "sampled_token" or (behaviour_logprobs is not None and config.is_clip is not None)
    if needs_ids and response_ids is None:
        raise ValueError(
            "response_ids (the sampled tokens) are required in sampled_token mode and for importance weighting "
            "with behaviour_logprobs"
        )

    if config.mode == "sampled_token":
        assert response_ids is not None
        student_logprobs = gather_token_logprobs(
            student_logits, response_ids, temperature=config.temperature, chunk_size=chunk_size
        )
        with torch.no_grad():
            teacher_logprobs = gather_token_logprobs(
                teacher_logits.detach(), response_ids, temperature=config.temperature, chunk_size=chunk_size
            )
        loss = sampled_token_loss(
            student_logprobs,
            teacher_logprobs,
            keep,
            behaviour_logprobs=behaviour_logprobs,
            is_clip=config.is_clip,
            normalizer=normalizer,
        )
        per_token = torch.where(keep, student_logprobs.detach() - teacher_logprobs, 0.0)
        return loss, per_token

    divergence = token_divergence(
        student_logits,
        teacher_logits,
        alpha=config.alpha,
        topk=config.topk,
        add_tail=config.add_tail,
        temperature=config.temperature,
        chunk_size=chunk_size,
    )
    weighted = divergence
    if behaviour_logprobs is not None and config.is_clip is not None:
        assert response_ids is not None
        with torch.no_grad():
            current_logprobs = gather_token_logprobs(
                student_logits.detach(), response_ids, temperature=config.temperature, chunk_size=chunk_size
            )
        weight = _clipped_importance_weight(current_logprobs, behaviour_logprobs, config.is_clip)
        weighted = divergence * torch.where(keep, weight, 0.0)
    loss = masked_token_mean(weighted, keep, normalizer)
    return loss, torch.where(keep, divergence.detach(), 0.0)


def _entropy(logprobs: Tensor) -> Tensor:
    """Shannon entropy in nats with 0 log 0 = 0.  # (n, V) -> (n,)"""
    if bool((logprobs.amin(-1) == NEG_INF).any()):  # some entry has no mass: 0 log 0 must be 0, not 0 * -inf = NaN
        return -torch.where(logprobs != NEG_INF, logprobs.exp() * logprobs, 0.0).sum(-1)
    return -logprobs.exp().mul_(logprobs).sum(-1)  # the usual case: one [n, V] temporary instead of four


@torch.no_grad()
def distribution_stats(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    topk: int = 100,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Means over the masked positions of how the two distributions relate (for the trainer's metrics).

    student_topk_mass: student mass on its own top-k (how much the top-k divergence sees); teacher_topk_mass: the
    teacher's mass on the student's top-k; topk_overlap: |top-k(S) ∩ top-k(T)| / k; argmax_agreement; entropies in
    nats. ``topk = 0`` or ``>= vocab`` means the full vocabulary (masses and overlap are then 1). All 0 without
    any masked position.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(student_logits.shape[:-1])}, got {tuple(mask.shape)}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0 (0 = full vocabulary), got {topk}")
    vocab = student_logits.shape[-1]
    k = vocab if topk == 0 else min(topk, vocab)
    keep = mask.reshape(-1).bool()
    totals = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=student_logits.device)
    for start, end, (student_rows, teacher_rows) in _row_chunks([student_logits, teacher_logits], chunk_size):
        student, teacher = _log_softmax(student_rows, temperature), _log_softmax(teacher_rows.detach(), temperature)
        rows = _stats_rows(student, teacher, k)  # (n, 6)
        totals += torch.where(keep[start:end, None], rows, 0.0).sum(0).double()
    return _stats_means(totals, int(keep.sum()))


STAT_NAMES = (
    "student_topk_mass",
    "teacher_topk_mass",
    "topk_overlap",
    "argmax_agreement",
    "student_entropy",
    "teacher_entropy",
)


def _stats_rows(student: Tensor, teacher: Tensor, k: int, student_ids: Tensor | None = None) -> Tensor:
    """``distribution_stats``'s figures for each row of one chunk, in ``STAT_NAMES`` order, from both sides'
    log-probs (left as they are); ``student_ids``: the student's top-k when the caller has it.  # (n, V) -> (n, 6)"""
    agreement = (student.argmax(-1) == teacher.argmax(-1)).to(student.dtype)  # (n,)
    if k >= student.shape[-1]:  # full vocabulary: nothing outside the "top-k", skip sorting V entries per row
        ones = torch.ones_like(agreement)
        student_mass, teacher_mass, overlap = ones, ones, ones
    else:
        if student_ids is None or student_ids.shape[-1] != k:
            student_ids = student.topk(k, dim=-1).indices  # (n, k)
        teacher_ids = teacher.topk(k, dim=-1).indices  # (n, k)
        student_mass = student.gather(-1, student_ids).exp().sum(-1)
        teacher_mass = teacher.gather(-1, student_ids).exp().sum(-1)
        # The teacher's top-k ids found among the student's, by binary search in each row (no (n, V) mask).
        sorted_ids = student_ids.sort(dim=-1).values  # (n, k)
        places = torch.searchsorted(sorted_ids, teacher_ids).clamp_(max=k - 1)  # (n, k)
        overlap = (sorted_ids.gather(-1, places) == teacher_ids).sum(-1).to(student.dtype) / k
    return torch.stack([student_mass, teacher_mass, overlap, agreement, _entropy(student), _entropy(teacher)], dim=-1)


def _stats_means(totals: Tensor, kept_rows: int) -> dict[str, float]:
    means = totals / max(kept_rows, 1)
    return {name: float(value) for name, value in zip(STAT_NAMES, means, strict=True)}


@torch.no_grad()
def per_token_details(
    student_logits: Tensor, teacher_logits: Tensor, *, k: int = 10, temperature: float = 1.0, chunk_size: int = 256
) -> dict[str, Tensor]:
    """Per-position top-k of each side and summary numbers, for the inspector.  # (T, V), (T, V) -> {...}

    Keys (shapes for [T, V] input; any [..., V] works and keeps the leading shape):
    student_topk_ids / student_topk_probs (T, k), teacher_topk_ids / teacher_topk_probs (T, k),
    teacher_probs_at_student_topk (T, k), student_entropy / teacher_entropy (T,) in nats, argmax_agreement (T,) bool,
    student_tail_mass (T,): student mass outside its top-k; teacher_tail_mass (T,): teacher mass outside the
    *student's* top-k, i.e. the teacher's tail bucket in the top-k divergence.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    leading = student_logits.shape[:-1]
    k = min(k, student_logits.shape[-1])
    total = math.prod(leading)
    device = student_logits.device
    out_dtype = _compute_dtype(student_logits.dtype)
    details = {
        "student_topk_ids": torch.empty(total, k, dtype=torch.long, device=device),
        "student_topk_probs": torch.empty(total, k, dtype=out_dtype, device=device),
        "teacher_topk_ids": torch.empty(total, k, dtype=torch.long, device=device),
        "teacher_topk_probs": torch.empty(total, k, dtype=out_dtype, device=device),
        "teacher_probs_at_student_topk": torch.empty(total, k, dtype=out_dtype, device=device),
        "student_entropy": torch.empty(total, dtype=out_dtype, device=device),
        "teacher_entropy": torch.empty(total, dtype=out_dtype, device=device),
        "argmax_agreement": torch.empty(total, dtype=torch.bool, device=device),
        "student_tail_mass": torch.empty(total, dtype=out_dtype, device=device),
        "teacher_tail_mass": torch.empty(total, dtype=out_dtype, device=device),
    }
    for start, end, (student_rows, teacher_rows) in _row_chunks([student_logits, teacher_logits], chunk_size):
        student = _log_softmax(student_rows, temperature)  # (n, V)
        teacher = _log_softmax(teacher_rows, temperature)  # (n, V)
        student_top = student.topk(k, dim=-1)
        teacher_top = teacher.topk(k, dim=-1)
        rows = slice(start, end)
        details["student_topk_ids"][rows] = student_top.indices
        details["student_topk_probs"][rows] = student_top.values.exp()
        details["teacher_topk_ids"][rows] = teacher_top.indices
        details["teacher_topk_probs"][rows] = teacher_top.values.exp()
        details["teacher_probs_at_student_topk"][rows] = teacher.gather(-1, student_top.indices).exp()
        details["student_entropy"][rows] = _entropy(student)
        details["teacher_entropy"][rows] = _entropy(teacher)
        details["argmax_agreement"][rows] = student_top.indices[:, 0] == teacher_top.indices[:, 0]
        # Last: the split overwrites the log-probs it reads.
        details["student_tail_mass"][rows] = _split_top_and_rest_(student, student_top.indices)[0][:, k].exp()
        details["teacher_tail_mass"][rows] = _split_top_and_rest_(teacher, student_top.indices)[0][:, k].exp()
    return {name: value.view(*leading, *value.shape[1:]) for name, value in details.items()}
