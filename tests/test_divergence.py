"""vopd.divergence against an independent float64 reference written with plain probability-space formulas."""

from __future__ import annotations

import math

import pytest
import torch

from vopd.config import DivergenceConfig
from vopd.divergence import (
    distillation_loss,
    distribution_stats,
    gather_token_logprobs,
    hidden_distillation_loss,
    linear_divergence_loss,
    masked_token_mean,
    per_token_details,
    sampled_token_loss,
    token_divergence,
)

torch.set_num_threads(1)
ALPHAS = [0.0, 0.1, 0.5, 0.9, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# Reference: probabilities (not log-probs), float64, one formula per definition, no code shared with the module.


def reference_divergence(student, teacher, *, alpha, topk, add_tail, temperature=1.0):
    """(..., V) -> (...) in float64; differentiable w.r.t. ``student`` through plain autograd."""
    p_student = torch.softmax(student.double() / temperature, dim=-1)
    p_teacher = torch.softmax(teacher.double().detach() / temperature, dim=-1)
    vocab = student.shape[-1]
    if 0 < topk < vocab:
        ids = p_student.detach().topk(topk, dim=-1).indices
        top_student, top_teacher = p_student.gather(-1, ids), p_teacher.gather(-1, ids)
        if add_tail:
            # Sum of the complement rather than 1 - sum(top-k), which rounds tails below ~1e-16 to 0 or to noise.
            outside = torch.ones_like(p_student, dtype=torch.bool).scatter(-1, ids, False)
            tail_student = torch.where(outside, p_student, 0.0).sum(-1, keepdim=True)
            tail_teacher = torch.where(outside, p_teacher, 0.0).sum(-1, keepdim=True)
            p_student = torch.cat([top_student, tail_student], dim=-1)
            p_teacher = torch.cat([top_teacher, tail_teacher], dim=-1)
        else:
            p_student = top_student / top_student.sum(-1, keepdim=True)
            p_teacher = top_teacher / top_teacher.sum(-1, keepdim=True)

    def kl(p, q):
        ratio = torch.where(p > 0, p / torch.where(p > 0, q, 1.0), 1.0)
        return (p * ratio.log()).sum(-1)

    if alpha == 0:
        return kl(p_teacher, p_student)
    if alpha == 1:
        return kl(p_student, p_teacher)
    mixture = (1 - alpha) * p_student + alpha * p_teacher
    return (1 - alpha) * kl(p_student, mixture) + alpha * kl(p_teacher, mixture)


def random_pair(shape, *, dtype=torch.float64, scale=2.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=generator, dtype=dtype) * scale
    teacher = student + torch.randn(shape, generator=generator, dtype=dtype) * scale
    return student, teacher


# ---------------------------------------------------------------------------------------------------------------
# token_divergence: values and gradients


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("topk", "add_tail"), [(0, True), (5, True), (5, False), (100, True), (100, False)])
def test_matches_reference_value_and_gradient(alpha, topk, add_tail):
    student, teacher = random_pair((2, 3, 1000), seed=int(alpha * 10) + topk)
    student.requires_grad_(True)
    got = token_divergence(student, teacher, alpha=alpha, topk=topk, add_tail=add_tail, temperature=1.3, chunk_size=4)
    (got_grad,) = torch.autograd.grad(got.sum(), student)

    reference_input = student.detach().clone().requires_grad_(True)
    want = reference_divergence(reference_input, teacher, alpha=alpha, topk=topk, add_tail=add_tail, temperature=1.3)
    (want_grad,) = torch.autograd.grad(want.sum(), reference_input)

    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("topk", [0, 100])
def test_large_vocabulary_in_float32(alpha, topk):
    student, teacher = random_pair((2, 2, 50_000), dtype=torch.float32, seed=3)
    got = token_divergence(student, teacher, alpha=alpha, topk=topk, chunk_size=3)
    want = reference_divergence(student, teacher, alpha=alpha, topk=topk, add_tail=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), [(0, True), (3, True), (3, False)])
def test_gradcheck_student(alpha, topk, add_tail):
    student, teacher = random_pair((2, 2, 7), seed=5)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: token_divergence(x, teacher, alpha=alpha, topk=topk, add_tail=add_tail, chunk_size=3), (student,)
    )


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("topk", "add_tail"), [(0, True), (5, True), (5, False)])
def test_zero_when_equal_and_nonnegative(alpha, topk, add_tail):
    student, teacher = random_pair((4, 300), dtype=torch.float32, seed=7)
    same = token_divergence(student, student.clone(), alpha=alpha, topk=topk, add_tail=add_tail)
    torch.testing.assert_close(same, torch.zeros(4), atol=1e-6, rtol=0)
    different = token_divergence(student, teacher, alpha=alpha, topk=topk, add_tail=add_tail)
    assert (different >= 0).all() and (different > 1e-3).all()


def test_k_at_least_vocab_is_full_vocabulary():
    student, teacher = random_pair((3, 20), seed=11)
    full = token_divergence(student, teacher, topk=0)
    for topk, add_tail in [(20, False), (20, True), (50, False)]:
        torch.testing.assert_close(token_divergence(student, teacher, topk=topk, add_tail=add_tail), full)
    # With the tail, V - 1 buckets plus a one-token tail is the same partition as the full vocabulary.
    torch.testing.assert_close(token_divergence(student, teacher, topk=19, add_tail=True), full)
    assert not torch.allclose(token_divergence(student, teacher, topk=19, add_tail=False), full)


def test_tail_bucket_changes_the_result():
    student, teacher = random_pair((3, 50), seed=12)
    with_tail = token_divergence(student, teacher, topk=5, add_tail=True)
    without = token_divergence(student, teacher, topk=5, add_tail=False)
    assert not torch.allclose(with_tail, without)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), [(0, True), (8, True), (8, False), (3, True)])
def test_minus_inf_logits_shared_by_both(alpha, topk, add_tail):
    student, teacher = random_pair((2, 3, 12), seed=13)
    banned = torch.zeros(12, dtype=torch.bool)
    banned[[0, 4, 5, 11]] = True  # 8 finite entries: top-8 is exactly the support, the tail is empty
    student = student.masked_fill(banned, float("-inf")).requires_grad_(True)
    teacher = teacher.masked_fill(banned, float("-inf"))
    got = token_divergence(student, teacher, alpha=alpha, topk=topk, add_tail=add_tail, chunk_size=2)
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()
    assert (grad[..., banned] == 0).all()
    reference_input = student.detach().clone().requires_grad_(True)
    want = reference_divergence(reference_input, teacher, alpha=alpha, topk=topk, add_tail=add_tail)
    (want_grad,) = torch.autograd.grad(want.sum(), reference_input)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)


def test_student_topk_beyond_its_support():
    """k larger than the finite entries: the top-k holds -inf entries, the divergence stays finite."""
    student, teacher = random_pair((2, 10), seed=14)
    student[:, 3:] = float("-inf")
    student.requires_grad_(True)
    for add_tail in (True, False):
        got = token_divergence(student, teacher, alpha=0.5, topk=6, add_tail=add_tail)
        (grad,) = torch.autograd.grad(got.sum(), student)
        assert torch.isfinite(got).all() and torch.isfinite(grad).all()
        reference_input = student.detach().clone().requires_grad_(True)
        want = reference_divergence(reference_input, teacher, alpha=0.5, topk=6, add_tail=add_tail)
        (want_grad,) = torch.autograd.grad(want.sum(), reference_input)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, want_grad)


def test_forward_kl_is_infinite_where_student_excludes_teacher_mass():
    student, teacher = random_pair((1, 6), seed=15)
    student[0, 2] = float("-inf")
    assert torch.isinf(token_divergence(student, teacher, alpha=0.0, topk=0)).all()
    assert torch.isfinite(token_divergence(student, teacher, alpha=0.5, topk=0)).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), [(0, True), (4, True), (4, False)])
def test_near_one_hot(alpha, topk, add_tail):
    student = torch.zeros(3, 64, dtype=torch.float32)
    student[:, 7] = 60.0  # every other token has probability ~e^-60: exp underflows in products, not in logs
    teacher = torch.zeros(3, 64)
    teacher[:, 7] = 55.0
    teacher[1, 7], teacher[1, 9] = 0.0, 80.0  # one position where the teacher is confidently elsewhere
    student.requires_grad_(True)
    got = token_divergence(student, teacher, alpha=alpha, topk=topk, add_tail=add_tail)
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.isfinite(got).all() and torch.isfinite(grad).all() and (got >= 0).all()
    reference_input = student.detach().double().requires_grad_(True)
    want = reference_divergence(reference_input, teacher, alpha=alpha, topk=topk, add_tail=add_tail)
    (want_grad,) = torch.autograd.grad(want.sum(), reference_input)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_tail_is_accurate_when_tiny():
    """A tail of ~1e-20 must not round to zero (1 - sum(top-k) would): the forward KL sees it as log(tail)."""
    student = torch.full((1, 10), -46.0, dtype=torch.float32)
    student[0, 0] = 0.0
    teacher = torch.zeros(1, 10)
    got = token_divergence(student, teacher, alpha=0.0, topk=1, add_tail=True)
    want = reference_divergence(student.double(), teacher.double(), alpha=0.0, topk=1, add_tail=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


def test_exact_one_hot_has_finite_gradient():
    student = torch.full((2, 8), float("-inf"))
    student[:, 1] = 0.0
    teacher = torch.randn(2, 8)
    student.requires_grad_(True)
    for alpha in (0.5, 1.0):
        got = token_divergence(student, teacher, alpha=alpha, topk=3, add_tail=True)
        (grad,) = torch.autograd.grad(got.sum(), student)
        assert torch.isfinite(got).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_gradient_with_a_vanishing_student_tail_in_float32(alpha):
    # The student puts all but exp(-150) of its mass on its top-5 (exp(150) overflows float32) while the teacher keeps
    # real mass in the tail: the tail's share of the gradient must still arrive, finite and exact.
    generator = torch.Generator().manual_seed(21)
    student = torch.randn(3, 400, generator=generator, dtype=torch.float64)
    student[:, :5] += 150.0 + torch.log(torch.tensor(395.0, dtype=torch.float64))
    teacher = torch.randn(3, 400, generator=generator, dtype=torch.float64)
    student32 = student.float().requires_grad_(True)
    got = token_divergence(student32, teacher.float(), alpha=alpha, topk=5, add_tail=True, chunk_size=2)
    (got_grad,) = torch.autograd.grad(got.sum(), student32)
    reference_input = student.clone().requires_grad_(True)
    want = reference_divergence(reference_input, teacher, alpha=alpha, topk=5, add_tail=True)
    (want_grad,) = torch.autograd.grad(want.sum(), reference_input)
    assert torch.isfinite(got_grad).all()
    if alpha == 0.0:  # forward KL pulls the tail towards the teacher's tail mass, whatever the student's
        assert got_grad[:, 5:].abs().max() > 1e-4
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_bf16_input_computes_in_fp32():
    # Values k/16 with k < 256 are exact and distinct in bf16, so the top-k has no ties to break differently.
    generator = torch.Generator().manual_seed(16)
    student32 = torch.stack([torch.randperm(200, generator=generator) for _ in range(6)]).float() / 16
    teacher32 = torch.stack([torch.randperm(200, generator=generator) for _ in range(6)]).float() / 16
    student16 = student32.bfloat16().requires_grad_(True)
    got = token_divergence(student16, teacher32.bfloat16(), topk=5, chunk_size=4)
    (grad16,) = torch.autograd.grad(got.sum(), student16)
    student32.requires_grad_(True)
    want = token_divergence(student32, teacher32, topk=5)
    (grad32,) = torch.autograd.grad(want.sum(), student32)
    assert got.dtype == torch.float32 and grad16.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad16.float(), grad32, rtol=1e-2, atol=1e-4)
    reference = reference_divergence(student32.detach(), teacher32, alpha=0.5, topk=5, add_tail=True)
    torch.testing.assert_close(got.double(), reference, rtol=1e-4, atol=1e-7)


def test_gradient_does_not_reach_teacher():
    student, teacher = random_pair((2, 3, 30), seed=17)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    token_divergence(student, teacher, topk=5).sum().backward()
    assert teacher.grad is None and student.grad is not None
    assert not token_divergence(student.detach(), teacher, topk=5).requires_grad


@pytest.mark.parametrize(("topk", "add_tail"), [(0, True), (4, True), (4, False)])
def test_chunked_equals_unchunked_and_non_contiguous_input(topk, add_tail):
    logits = torch.randn(3, 9, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    teacher = torch.randn(3, 9, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(19))
    # A slice like logits[:, -R:] cannot be flattened without a copy: exercise the per-group walk.
    student = logits.requires_grad_(True)
    sliced_student, sliced_teacher = student[:, 2:8], teacher[:, 1:7]
    results = []
    for chunk_size in (1, 4, 10_000):
        value = token_divergence(sliced_student, sliced_teacher, topk=topk, add_tail=add_tail, chunk_size=chunk_size)
        (grad,) = torch.autograd.grad((value * torch.arange(18.0).view(3, 6)).sum(), student)
        results.append((value, grad))
    contiguous = token_divergence(
        sliced_student.detach().contiguous(), sliced_teacher.contiguous(), topk=topk, add_tail=add_tail
    )
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[0][0], contiguous, rtol=1e-12, atol=1e-14)
    assert (results[0][1][:, :2] == 0).all() and (results[0][1][:, 8:] == 0).all()


@pytest.mark.parametrize("topk", [0, 7])
def test_autograd_keeps_no_vocabulary_sized_copy(topk):
    """Between forward and backward only the inputs themselves and O(tokens x k) ids may be kept alive."""
    student, teacher = random_pair((3, 8, 500), dtype=torch.float32, seed=27)
    student.requires_grad_(True)
    teacher_storage = teacher.untyped_storage().data_ptr()
    input_storages = {student.untyped_storage().data_ptr(), teacher_storage}
    extra_saved, teacher_saved = [], []

    def pack(saved):
        if saved.untyped_storage().data_ptr() not in input_storages:
            extra_saved.append(saved.numel())
        teacher_saved.append(saved.untyped_storage().data_ptr() == teacher_storage)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        loss = token_divergence(student[:, 1:], teacher[:, 1:], topk=topk, chunk_size=4).mean()
    loss.backward()
    tokens = 3 * 7
    assert sum(extra_saved) <= tokens * (2 * topk + 1)  # top-k ids + teacher buckets (k + 1)
    # With top-k the teacher logits are summarised by their buckets, so the caller may free them before backward.
    assert any(teacher_saved) == (topk == 0)
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_bad_input_is_refused_with_a_clear_message():
    student, teacher = random_pair((2, 5), seed=20)
    with pytest.raises(ValueError, match="same shape"):
        token_divergence(student, teacher[:, :4])
    with pytest.raises(ValueError, match="alpha"):
        token_divergence(student, teacher, alpha=1.5)
    with pytest.raises(ValueError, match="topk"):
        token_divergence(student, teacher, topk=-1)
    with pytest.raises(ValueError, match="temperature"):
        token_divergence(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="token ids"):
        gather_token_logprobs(student, torch.tensor([0, 5]))


# ---------------------------------------------------------------------------------------------------------------
# Token log-probs, masking, sampled-token loss


def test_gather_token_logprobs_value_and_gradient():
    logits = torch.randn(2, 5, 30, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 30, (2, 5))
    got = gather_token_logprobs(logits, ids, temperature=0.7, chunk_size=3)
    want = torch.log_softmax(logits.detach() / 0.7, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda x: gather_token_logprobs(x, ids, temperature=0.7, chunk_size=3), (logits,))


def test_masked_token_mean():
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    mean = masked_token_mean(values, mask)
    assert mean.item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    mean.backward()
    assert torch.equal(values.grad, mask.float() / 4)
    empty = masked_token_mean(values, torch.zeros_like(mask))
    assert empty.item() == 0.0


@pytest.mark.parametrize("with_behaviour", [False, True])
def test_sampled_token_gradient_is_minus_advantage_times_grad_logp(with_behaviour):
    generator = torch.Generator().manual_seed(21)
    student_logits = torch.randn(2, 4, 11, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher_logits = torch.randn(2, 4, 11, dtype=torch.float64, generator=generator)
    ids = torch.randint(0, 11, (2, 4), generator=generator)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    temperature = 0.8
    student_lp = gather_token_logprobs(student_logits, ids, temperature=temperature)
    teacher_lp = gather_token_logprobs(teacher_logits, ids, temperature=temperature)
    behaviour = student_lp.detach() + torch.tensor([[0.5, -2.0, 0.1, 0.0], [-0.3, 3.0, 0.0, 0.0]], dtype=torch.float64)
    loss = sampled_token_loss(
        student_lp, teacher_lp, mask, behaviour_logprobs=behaviour if with_behaviour else None, is_clip=2.0
    )
    loss.backward()

    # Analytic: d log softmax(z/t)[y] / dz = (onehot(y) - softmax(z/t)) / t.
    probs = torch.softmax(student_logits.detach() / temperature, dim=-1)
    grad_logp = (torch.nn.functional.one_hot(ids, 11).double() - probs) / temperature
    advantage = teacher_lp.detach() - student_lp.detach()
    weight = (student_lp.detach() - behaviour).exp().clamp(max=2.0) if with_behaviour else torch.ones(2, 4)
    expected = -(advantage * weight * mask)[..., None] * grad_logp / mask.sum()
    torch.testing.assert_close(student_logits.grad, expected)
    assert loss.item() == pytest.approx(float((-(advantage * weight) * student_lp.detach())[mask].mean()))


def test_sampled_token_loss_ignores_padding_minus_inf():
    student_lp = torch.tensor([-1.0, float("-inf")], requires_grad=True)
    teacher_lp = torch.tensor([-0.5, -3.0])
    loss = sampled_token_loss(student_lp, teacher_lp, torch.tensor([True, False]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student_lp.grad).all()
    assert student_lp.grad.tolist() == [-0.5, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# distillation_loss dispatch


def _batch(seed=22):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 5, 40, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 5, 40, dtype=torch.float64, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    ids = torch.randint(0, 40, (2, 5), generator=generator)
    return student, teacher, mask, ids


def test_distillation_loss_full_logits():
    student, teacher, mask, _ = _batch()
    config = DivergenceConfig(alpha=0.3, topk=6, add_tail=True, temperature=1.2)
    loss, per_token = distillation_loss(student, teacher, mask, config)
    want = reference_divergence(student.detach(), teacher, alpha=0.3, topk=6, add_tail=True, temperature=1.2)
    torch.testing.assert_close(loss, want[mask].mean())
    torch.testing.assert_close(per_token, torch.where(mask, want, 0.0))
    assert not per_token.requires_grad and loss.requires_grad


def test_distillation_loss_importance_weight_in_full_logits_mode():
    student, teacher, mask, ids = _batch(23)
    config = DivergenceConfig(alpha=0.5, topk=0, is_clip=1.5)
    current = torch.log_softmax(student.detach(), -1).gather(-1, ids[..., None]).squeeze(-1)
    behaviour = current + torch.linspace(-2, 2, 10, dtype=torch.float64).view(2, 5)
    loss, per_token = distillation_loss(student, teacher, mask, config, response_ids=ids, behaviour_logprobs=behaviour)
    weight = (current - behaviour).exp().clamp(max=1.5)
    want = reference_divergence(student.detach(), teacher, alpha=0.5, topk=0, add_tail=True)
    torch.testing.assert_close(loss, (want * weight)[mask].mean())
    torch.testing.assert_close(per_token, torch.where(mask, want, 0.0))  # metrics stay unweighted
    unweighted, _ = distillation_loss(
        student, teacher, mask, config.model_copy(update={"is_clip": None}), behaviour_logprobs=behaviour
    )
    torch.testing.assert_close(unweighted, want[mask].mean())
    with pytest.raises(ValueError, match="response_ids"):
        distillation_loss(student, teacher, mask, config, behaviour_logprobs=behaviour)


def test_distillation_loss_sampled_token():
    student, teacher, mask, ids = _batch(24)
    config = DivergenceConfig(mode="sampled_token", temperature=0.9)
    loss, per_token = distillation_loss(student, teacher, mask, config, response_ids=ids)
    student_lp = torch.log_softmax(student.detach() / 0.9, -1).gather(-1, ids[..., None]).squeeze(-1)
    teacher_lp = torch.log_softmax(teacher / 0.9, -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(per_token, torch.where(mask, student_lp - teacher_lp, 0.0))
    torch.testing.assert_close(loss, (-(teacher_lp - student_lp) * student_lp)[mask].mean())
    loss.backward()
    assert student.grad is not None and (student.grad[~mask] == 0).all()
    with pytest.raises(ValueError, match="response_ids"):
        distillation_loss(student, teacher, mask, config)
    with pytest.raises(ValueError, match="response_mask"):
        distillation_loss(student, teacher, mask[:, :3], config, response_ids=ids)


# ---------------------------------------------------------------------------------------------------------------
# Metrics for the trainer and the inspector


def test_distribution_stats_against_reference():
    student, teacher = random_pair((2, 4, 50), dtype=torch.float32, seed=25)
    teacher[0, 0] = student[0, 0] * 3  # same argmax and ranking at one position
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    stats = distribution_stats(student, teacher, mask, topk=5, temperature=1.1, chunk_size=3)

    p_s = torch.softmax(student.double()[mask] / 1.1, -1)
    p_t = torch.softmax(teacher.double()[mask] / 1.1, -1)
    top_s, top_t = p_s.topk(5).indices, p_t.topk(5).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top_s, top_t, strict=True)]
    want = {
        "student_topk_mass": p_s.gather(-1, top_s).sum(-1).mean(),
        "teacher_topk_mass": p_t.gather(-1, top_s).sum(-1).mean(),
        "topk_overlap": sum(overlap) / len(overlap),
        "argmax_agreement": (p_s.argmax(-1) == p_t.argmax(-1)).double().mean(),
        "student_entropy": -(p_s * p_s.log()).sum(-1).mean(),
        "teacher_entropy": -(p_t * p_t.log()).sum(-1).mean(),
    }
    assert set(stats) == set(want)
    for name, value in want.items():
        assert stats[name] == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    assert 0 < stats["argmax_agreement"] < 1 and 0 < stats["topk_overlap"] < 1

    full = distribution_stats(student, teacher, mask, topk=0)
    assert full["student_topk_mass"] == full["teacher_topk_mass"] == full["topk_overlap"] == 1.0
    assert all(value == 0.0 for value in distribution_stats(student, teacher, torch.zeros_like(mask)).values())


def test_per_token_details():
    student, teacher = random_pair((6, 30), dtype=torch.float32, seed=26)
    student[2] = float("-inf")
    student[2, 4] = 0.0  # one-hot position: zero entropy, empty tail
    details = per_token_details(student, teacher, k=4, temperature=1.0, chunk_size=4)
    p_s, p_t = torch.softmax(student, -1), torch.softmax(teacher, -1)
    top_s, top_t = p_s.topk(4), p_t.topk(4)
    torch.testing.assert_close(details["student_topk_probs"], top_s.values)
    torch.testing.assert_close(details["teacher_topk_probs"], top_t.values)
    assert torch.equal(details["student_topk_ids"][[0, 1, 3, 4, 5]], top_s.indices[[0, 1, 3, 4, 5]])
    assert torch.equal(details["teacher_topk_ids"], top_t.indices)
    torch.testing.assert_close(details["teacher_probs_at_student_topk"], p_t.gather(-1, details["student_topk_ids"]))
    torch.testing.assert_close(details["student_tail_mass"], 1 - top_s.values.sum(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        details["teacher_tail_mass"], 1 - details["teacher_probs_at_student_topk"].sum(-1), atol=1e-6, rtol=0
    )
    assert torch.equal(details["argmax_agreement"], p_s.argmax(-1) == p_t.argmax(-1))
    entropy = -torch.where(p_s > 0, p_s * p_s.log(), 0.0).sum(-1)
    torch.testing.assert_close(details["student_entropy"], entropy)
    assert details["student_entropy"][2] == 0 and details["student_tail_mass"][2] == 0
    assert details["student_topk_ids"].shape == (6, 4) and details["student_entropy"].shape == (6,)


def test_divergence_is_log2_bounded_jsd_for_disjoint_distributions():
    """A sanity anchor independent of any reference: disjoint one-hots have JSD = log 2 at alpha = 0.5."""
    student = torch.tensor([[0.0, float("-inf")]])
    teacher = torch.tensor([[float("-inf"), 0.0]])
    assert token_divergence(student, teacher, alpha=0.5, topk=0).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("mode", ["full_logits", "sampled_token"])
def test_micro_batch_losses_with_the_step_normalizer_sum_to_the_whole_token_mean(mode):
    """Two micro-batches with different token counts: their losses, each divided by the step's token count, add up
    to the token-mean over the whole step (a per-micro-batch mean would weight the short batch's tokens more)."""
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(4, 5, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, 11, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, 11, (4, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    config = DivergenceConfig(mode=mode, topk=4)
    whole, _ = distillation_loss(student, teacher, mask, config, response_ids=ids)
    (whole_grad,) = torch.autograd.grad(whole, student)
    tokens = float(mask.sum())
    parts = [
        distillation_loss(student[rows], teacher[rows], mask[rows], config, response_ids=ids[rows], normalizer=tokens)[
            0
        ]
        for rows in (slice(0, 2), slice(2, 4))
    ]
    (split_grad,) = torch.autograd.grad(sum(parts), student)
    torch.testing.assert_close(sum(parts), whole)
    torch.testing.assert_close(split_grad, whole_grad)
    mean_of_means = (
        sum(
            distillation_loss(student[r], teacher[r], mask[r], config, response_ids=ids[r])[0]
            for r in (slice(0, 2), slice(2, 4))
        )
        / 2
    )
    assert not torch.isclose(mean_of_means, whole)
    with pytest.raises(ValueError, match="positive token count"):
        distillation_loss(student, teacher, mask, config, response_ids=ids, normalizer=0.0)


# ---------------------------------------------------------------------------------------------------------------
# linear_divergence_loss: the same loss from hidden states and LM heads, never building the logits


def _hidden_pair(rows=23, hidden=6, vocab=40, dtype=torch.float64, seed=5):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(rows, hidden, generator=generator, dtype=dtype, requires_grad=True)
    student_head = torch.randn(vocab, hidden, generator=generator, dtype=dtype, requires_grad=True)
    teacher_hidden = student_hidden.detach() + torch.randn(rows, hidden, generator=generator, dtype=dtype)
    teacher_head = torch.randn(vocab, hidden, generator=generator, dtype=dtype)
    return student_hidden, student_head, teacher_hidden, teacher_head


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), [(0, True), (7, True), (7, False)])
def test_linear_loss_equals_the_loss_on_projected_logits(alpha, topk, add_tail):
    """Same values, loss and gradients (hidden states and head) as token_divergence on hidden @ head.T, over chunks
    that do not divide the rows, with padding rows left out of the token-mean."""
    student_hidden, student_head, teacher_hidden, teacher_head = _hidden_pair()
    mask = torch.ones(23, dtype=torch.bool)
    mask[[3, 10, 22]] = False
    options = {"alpha": alpha, "topk": topk, "add_tail": add_tail, "temperature": 1.3}
    loss, values = linear_divergence_loss(
        student_hidden, student_head, teacher_hidden, teacher_head, mask.double() / mask.sum(), chunk_size=5, **options
    )
    expected_values = token_divergence(student_hidden @ student_head.T, teacher_hidden @ teacher_head.T, **options)
    expected = masked_token_mean(expected_values, mask)
    torch.testing.assert_close(values, expected_values.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
    grads = torch.autograd.grad(loss * 3.0, [student_hidden, student_head])  # the incoming gradient is applied
    expected_grads = torch.autograd.grad(expected * 3.0, [student_hidden, student_head])
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-10)
    assert not values.requires_grad


def test_linear_loss_projects_in_vocabulary_blocks_with_a_ragged_last_one(monkeypatch):
    """The CPU projection in blocks of the vocabulary (shrunk here to 16, so 40 = 16 + 16 + 8) gives the same loss
    and gradients as the logits path, and the same logits as hidden @ head.T up to rounding."""
    import vopd.divergence as divergence

    monkeypatch.setattr(divergence, "_PROJECTION_BLOCK", 16)
    student_hidden, student_head, teacher_hidden, teacher_head = _hidden_pair()
    out = torch.empty(23, 40, dtype=torch.float64)
    projected = divergence._project(student_hidden.detach(), student_head.detach(), out)
    torch.testing.assert_close(projected, (student_hidden @ student_head.T).detach(), atol=1e-12, rtol=1e-12)
    weights = torch.full((23,), 1 / 23, dtype=torch.float64)
    loss, _ = linear_divergence_loss(student_hidden, student_head, teacher_hidden, teacher_head, weights, topk=7)
    expected = token_divergence(student_hidden @ student_head.T, teacher_hidden @ teacher_head.T, topk=7).mean()
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
    grads = torch.autograd.grad(loss, [student_hidden, student_head])
    expected_grads = torch.autograd.grad(expected, [student_hidden, student_head])
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-10)


def test_linear_loss_in_float32_matches_the_reference_and_ignores_padding_rows():
    """fp32 as the trainer runs it, against the float64 reference; a padding row whose teacher has no mass where
    the student has all of it (an infinite forward KL) gets weight 0 and changes neither the loss nor a gradient."""
    student_hidden, student_head, teacher_hidden, teacher_head = (t.detach().float() for t in _hidden_pair(vocab=300))
    student_hidden.requires_grad_(True)
    student_head.requires_grad_(True)
    weights = torch.full((23,), 1 / 22)
    weights[0] = 0.0
    teacher_hidden[0] = 1e4 * teacher_head[0] / teacher_head[0].norm()  # one-hot teacher
    loss, values = linear_divergence_loss(
        student_hidden, student_head, teacher_hidden, teacher_head, weights, alpha=0.0, topk=100
    )
    reference = reference_divergence(
        student_hidden @ student_head.T, teacher_hidden @ teacher_head.T, alpha=0.0, topk=100, add_tail=True
    )
    torch.testing.assert_close(values[1:].double(), reference[1:].detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss.double(), reference[1:].mean().detach(), atol=1e-5, rtol=1e-4)
    loss.backward()
    assert torch.isfinite(student_hidden.grad).all() and torch.isfinite(student_head.grad).all()
    assert student_hidden.grad[0].abs().max() == 0


def test_linear_loss_refuses_mismatched_shapes():
    student_hidden, student_head, teacher_hidden, teacher_head = _hidden_pair()
    weights = torch.ones(23)
    with pytest.raises(ValueError, match="same N rows"):
        linear_divergence_loss(student_hidden, student_head, teacher_hidden[:5], teacher_head, weights)
    with pytest.raises(ValueError, match="share the vocabulary"):
        linear_divergence_loss(student_hidden, student_head, teacher_hidden, teacher_head[:5], weights)
    with pytest.raises(ValueError, match="row_weights"):
        linear_divergence_loss(student_hidden, student_head, teacher_hidden, teacher_head, weights[:3])


@pytest.mark.parametrize(("topk", "add_tail", "stats_topk"), [(0, True, 0), (7, True, 9), (7, False, 100)])
@pytest.mark.parametrize("importance", [False, True])
def test_loss_from_hidden_states_equals_the_trainers_logits_path(topk, add_tail, stats_topk, importance):
    """The trainer's two calls on logits (distillation_loss, then distribution_stats) against one pass from the hidden
    states: same loss, per-token divergence, metrics and gradients, with padding rows, a step normalizer, and
    importance weights that clip some rows and not others."""
    student_hidden, student_head, teacher_hidden, teacher_head = _hidden_pair(rows=24)
    shape = (4, 6)
    student_hidden3, teacher_hidden3 = student_hidden.view(*shape, -1), teacher_hidden.view(*shape, -1)
    mask = torch.ones(shape, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    config = DivergenceConfig(alpha=0.5, topk=topk, add_tail=add_tail, temperature=1.3, is_clip=1.5)
    response_ids = torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(1))
    behaviour = None
    if importance:  # around the current log-probs, so that some ratios exceed the clip and some do not
        current = gather_token_logprobs(
            (student_hidden3 @ student_head.T).detach(), response_ids, temperature=config.temperature
        )
        behaviour = current + torch.linspace(-1.0, 1.0, 24, dtype=current.dtype).view(shape)
    student_logits = student_hidden3 @ student_head.T
    teacher_logits = teacher_hidden3 @ teacher_head.T
    expected_loss, expected_per_token = distillation_loss(
        student_logits,
        teacher_logits,
        mask,
        config,
        response_ids=response_ids,
        behaviour_logprobs=behaviour,
        normalizer=30.0,
        chunk_size=5,
    )
    expected_stats = distribution_stats(
        student_logits.detach(), teacher_logits, mask, topk=stats_topk, temperature=config.temperature
    )
    loss, per_token, stats = hidden_distillation_loss(
        student_hidden3,
        student_head,
        teacher_hidden3,
        teacher_head,
        mask,
        config,
        response_ids=response_ids,
        behaviour_logprobs=behaviour,
        normalizer=30.0,
        stats_topk=stats_topk,
        chunk_size=5,
    )
    torch.testing.assert_close(loss, expected_loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(per_token, expected_per_token, atol=1e-12, rtol=1e-10)
    assert stats.keys() == expected_stats.keys()
    for name, value in stats.items():
        assert value == pytest.approx(expected_stats[name], abs=1e-12), name
    grads = torch.autograd.grad(loss, [student_hidden, student_head])
    expected_grads = torch.autograd.grad(expected_loss, [student_hidden, student_head])
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-10)
    assert per_token[~mask].abs().max() == 0 and not per_token.requires_grad


def test_loss_from_hidden_states_uses_an_fp32_head_at_the_activations_dtype():
    """bf16 activations with fp32 master weights (autocast on a GPU): the head is used in bf16 as autocast's LM head
    would be, the head's gradient comes back in fp32 and the hidden states' in bf16, close to the float64 values."""
    student_hidden, student_head, teacher_hidden, teacher_head = _hidden_pair(rows=24, hidden=16, vocab=64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    config = DivergenceConfig(topk=10)
    hidden = student_hidden.detach().bfloat16().view(4, 6, -1).requires_grad_(True)
    head = student_head.detach().float().requires_grad_(True)
    loss, _, _ = hidden_distillation_loss(
        hidden, head, teacher_hidden.bfloat16().view(4, 6, -1), teacher_head.float(), mask, config
    )
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16 and head.grad.dtype == torch.float32
    expected, _ = distillation_loss(
        (student_hidden @ student_head.T).view(4, 6, -1), (teacher_hidden @ teacher_head.T).view(4, 6, -1), mask, config
    )
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=0.05)
    # fp32 activations with the projections asked in bf16 (the trainer's autocast dtype): gradients stay fp32.
    hidden32 = student_hidden.detach().float().view(4, 6, -1).requires_grad_(True)
    loss16, _, _ = hidden_distillation_loss(
        hidden32,
        head,
        teacher_hidden.float().view(4, 6, -1),
        teacher_head.float(),
        mask,
        config,
        matmul_dtype=torch.bfloat16,
    )
    loss16.backward()
    assert hidden32.grad.dtype == torch.float32 and head.grad.dtype == torch.float32
    assert float(loss16.detach()) == pytest.approx(float(expected.detach()), rel=0.05)


def test_loss_from_hidden_states_refuses_what_it_cannot_compute():
    student_hidden, student_head, teacher_hidden, teacher_head = _hidden_pair(rows=24)
    hidden, teacher = student_hidden.view(4, 6, -1), teacher_hidden.view(4, 6, -1)
    mask = torch.ones(4, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="full_logits mode only"):
        hidden_distillation_loss(
            hidden, student_head, teacher, teacher_head, mask, DivergenceConfig(mode="sampled_token")
        )
    with pytest.raises(ValueError, match="response_ids"):
        hidden_distillation_loss(
            hidden, student_head, teacher, teacher_head, mask, DivergenceConfig(), behaviour_logprobs=torch.zeros(4, 6)
        )
    with pytest.raises(ValueError, match="student_hidden must be"):
        hidden_distillation_loss(hidden[:, :3], student_head, teacher, teacher_head, mask, DivergenceConfig())
    with pytest.raises(ValueError, match="share the vocabulary"):
        hidden_distillation_loss(hidden, student_head, teacher, teacher_head[:5], mask, DivergenceConfig())
