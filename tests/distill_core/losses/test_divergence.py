import math
import typing

import pytest
import torch
import torch.nn.functional as F

from distill_core.config import LossName
from distill_core.losses import (
    DIVERGENCES,
    LOSS_NAMES,
    TopKTargets,
    dense_divergence,
    sparse_divergence,
    topk_targets_from_logits,
)

NAMES = sorted(DIVERGENCES)
TAILS = ["bucket", "renormalize"]
NEG_INF = float("-inf")


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# -- fixed values ----------------------------------------------------------------------------------
# Teacher p = [.5, .25, .125, .125], student q = [.4, .3, .2, .1], k = 2 (ids 0 and 1).
P = torch.tensor([0.5, 0.25, 0.125, 0.125])
Q = torch.tensor([0.4, 0.3, 0.2, 0.1])
HAND_TARGETS = TopKTargets(
    ids=torch.tensor([[[0, 1]]]),
    logprobs=torch.tensor([[[math.log(0.5), math.log(0.25)]]]),
    tail_logprob=torch.tensor([[math.log(0.25)]]),
)
# bucket: categories {0, 1, tail}: p = [.5, .25, .25], q = [.4, .3, .3]
#   .5·ln(.5/.4) + .25·ln(.25/.3) + .25·ln(.25/.3)
FKL_BUCKET = 0.020410997260127586
# renormalize: p = [2/3, 1/3], q = [4/7, 3/7]: 2/3·ln(7/6) + 1/3·ln(7/9)
FKL_RENORMALIZE = 0.018995643791203554
# dense: .5·ln(.5/.4) + .25·ln(.25/.3) + .125·ln(.125/.2) + .125·ln(.125/.1)
FKL_DENSE = 0.035133876717175515


def test_forward_kl_fixed_values():
    student = Q.log().view(1, 1, 4)
    bucket = sparse_divergence("forward_kl", student, HAND_TARGETS, tail="bucket", temperature=1.0)
    renorm = sparse_divergence("forward_kl", student, HAND_TARGETS, tail="renormalize", temperature=1.0)
    dense = dense_divergence("forward_kl", student, P.log().view(1, 1, 4), temperature=1.0)
    assert bucket.shape == (1, 1) and bucket.dtype == torch.float32
    torch.testing.assert_close(bucket, torch.tensor([[FKL_BUCKET]]))
    torch.testing.assert_close(renorm, torch.tensor([[FKL_RENORMALIZE]]))
    torch.testing.assert_close(dense, torch.tensor([[FKL_DENSE]]))


def test_topk_targets_from_hand_logits():
    got = topk_targets_from_logits(P.log().view(1, 1, 4), k=2, temperature=1.0)
    assert got.ids.tolist() == HAND_TARGETS.ids.tolist()
    torch.testing.assert_close(got.logprobs, HAND_TARGETS.logprobs)
    torch.testing.assert_close(got.tail_logprob, HAND_TARGETS.tail_logprob)


# -- parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("name", NAMES)
def test_sparse_at_full_vocab_equals_dense(name, tail):
    student, teacher = _logits(2, 5, 11, seed=1), _logits(2, 5, 11, seed=2)
    targets = topk_targets_from_logits(teacher, k=11, temperature=2.0)
    assert torch.isneginf(targets.tail_logprob).all()
    sparse = sparse_divergence(name, student, targets, tail=tail, temperature=2.0, beta=0.3)
    dense = dense_divergence(name, student, teacher, temperature=2.0, beta=0.3)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_chunked_equals_unchunked(name, tail):
    teacher = _logits(3, 7, 50, seed=3)
    targets = topk_targets_from_logits(teacher, k=8, temperature=1.5)
    grads = []
    values = []
    for chunk_rows in (None, 4):
        student = _logits(3, 7, 50, seed=4).requires_grad_()
        out = sparse_divergence(name, student, targets, tail=tail, temperature=1.5, chunk_rows=chunk_rows)
        out.sum().backward()
        values.append(out.detach())
        grads.append(student.grad)
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_dense_forward_kl_matches_kl_div():
    student, teacher = _logits(2, 4, 13, seed=5), _logits(2, 4, 13, seed=6)
    expected = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="none").sum(-1)
    torch.testing.assert_close(dense_divergence("forward_kl", student, teacher, temperature=1.0), expected)


# -- properties ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_identical_inputs_give_zero(name):
    logits = _logits(2, 3, 17, seed=7)
    zero = torch.zeros(2, 3)
    torch.testing.assert_close(dense_divergence(name, logits, logits, temperature=1.7), zero, atol=1e-6, rtol=0)
    targets = topk_targets_from_logits(logits, k=5, temperature=1.7)
    for tail in TAILS:
        got = sparse_divergence(name, logits, targets, tail=tail, temperature=1.7)
        torch.testing.assert_close(got, zero, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_temperature_squared_scaling(name):
    tau = 3.0
    student, teacher = _logits(2, 3, 19, seed=8), _logits(2, 3, 19, seed=9)
    dense = dense_divergence(name, student, teacher, temperature=tau)
    torch.testing.assert_close(dense, tau**2 * dense_divergence(name, student / tau, teacher / tau, temperature=1.0))
    targets = topk_targets_from_logits(teacher, k=6, temperature=tau)
    targets_at_1 = topk_targets_from_logits(teacher / tau, k=6, temperature=1.0)
    for tail in TAILS:
        sparse = sparse_divergence(name, student, targets, tail=tail, temperature=tau)
        unscaled = sparse_divergence(name, student / tau, targets_at_1, tail=tail, temperature=1.0)
        torch.testing.assert_close(sparse, tau**2 * unscaled)


def test_symmetries():
    a, b = _logits(2, 4, 9, seed=10), _logits(2, 4, 9, seed=11)

    def d(name, s, t, beta=0.5):
        return dense_divergence(name, s, t, temperature=1.0, beta=beta)

    torch.testing.assert_close(d("reverse_kl", a, b), d("forward_kl", b, a))
    torch.testing.assert_close(d("skew_reverse_kl", a, b, 0.2), d("skew_kl", b, a, 0.2))
    torch.testing.assert_close(d("jsd", a, b), d("jsd", b, a))
    torch.testing.assert_close(d("jsd", a, b, 0.2), d("jsd", b, a, 0.8))
    assert (d("jsd", a, b) <= math.log(2) + 1e-6).all()
    assert (d("skew_kl", a, b, 0.25) <= math.log(4) + 1e-6).all()  # KL(p || βp + ...) ≤ −log β
    tv = d("tvd", a, b)
    torch.testing.assert_close(tv, d("tvd", b, a))
    assert ((tv >= 0) & (tv <= 1)).all()
    for name in NAMES:
        assert (d(name, a, b) >= 0).all(), name


# -- zero probabilities ----------------------------------------------------------------------------
def _masked_teacher():
    """Teacher with only 4 of 12 tokens possible: top-6 keeps two -inf ids and an empty tail."""
    teacher = _logits(2, 3, 12, seed=12)
    teacher[..., 4:] = NEG_INF
    return teacher


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("name", NAMES)
def test_zero_probability_gives_finite_values_and_gradients(name, tail):
    teacher = _masked_teacher()
    cases = [
        (teacher, 6),   # -inf teacher logprobs among the ids, zero teacher tail
        (teacher, 12),  # k = vocab: both tails empty
        (_logits(2, 3, 12, seed=13), 12),
    ]
    for teacher_logits, k in cases:
        targets = topk_targets_from_logits(teacher_logits, k=k, temperature=1.0)
        student = _logits(2, 3, 12, seed=14).requires_grad_()
        out = sparse_divergence(name, student, targets, tail=tail, temperature=1.0)
        infinite_by_math = name == "reverse_kl" and torch.isneginf(targets.logprobs).any()
        if infinite_by_math:  # the student has mass where the teacher has none: KL(q || p) = inf
            assert torch.isposinf(out).all()
            continue
        out.sum().backward()
        assert torch.isfinite(out).all(), (name, tail, k)
        assert torch.isfinite(student.grad).all(), (name, tail, k)
        dense = dense_divergence(name, student.detach(), teacher_logits, temperature=1.0)
        if k == 12:
            torch.testing.assert_close(out.detach(), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_dense_gradient_finite_with_masked_teacher(name):
    student = _logits(2, 3, 12, seed=15).requires_grad_()
    out = dense_divergence(name, student, _masked_teacher(), temperature=1.0)
    if name == "reverse_kl":  # the student has mass on tokens the teacher rules out
        assert torch.isposinf(out).all()
        return
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(student.grad).all()


# -- top-k targets ---------------------------------------------------------------------------------
def test_topk_targets_mass_sums_to_one():
    teacher = _logits(3, 5, 40, seed=16)
    for k, tau in [(1, 1.0), (8, 2.0), (39, 0.5), (40, 1.0)]:
        t = topk_targets_from_logits(teacher.to(torch.bfloat16), k=k, temperature=tau)
        assert t.ids.shape == (3, 5, k) and t.ids.dtype == torch.int64
        assert t.logprobs.dtype == torch.float32 and t.tail_logprob.shape == (3, 5)
        total = t.logprobs.exp().sum(-1) + t.tail_logprob.exp()
        torch.testing.assert_close(total, torch.ones(3, 5))
        assert (t.logprobs[..., :-1] >= t.logprobs[..., 1:]).all()  # most probable first
        expected = F.log_softmax(teacher.to(torch.bfloat16).float() / tau, -1).gather(-1, t.ids)
        torch.testing.assert_close(t.logprobs, expected)
    assert torch.isneginf(t.tail_logprob).all()


def test_tiny_tail_is_kept():
    # Top-1 holds all but ~e^-30 of the mass: 1 − Σ top-k rounds to 0 in float32, the tail must not.
    teacher = torch.tensor([[[30.0, 0.0, 0.0]]])
    t = topk_targets_from_logits(teacher, k=1, temperature=1.0)
    torch.testing.assert_close(t.tail_logprob, torch.tensor([[math.log(2) - 30.0]]))


# -- types and checks ------------------------------------------------------------------------------
def test_bfloat16_student_computes_in_float32():
    teacher = _logits(1, 4, 20, seed=17)
    student = _logits(1, 4, 20, seed=18)
    targets = topk_targets_from_logits(teacher, k=20, temperature=1.0)
    low = sparse_divergence("forward_kl", student.to(torch.bfloat16), targets, tail="bucket", temperature=1.0)
    assert low.dtype == torch.float32
    ref = dense_divergence("forward_kl", student.to(torch.bfloat16).float(), teacher, temperature=1.0)
    torch.testing.assert_close(low, ref, atol=1e-5, rtol=1e-5)


def test_shape_and_name_checks():
    targets = topk_targets_from_logits(_logits(2, 3, 10), k=4, temperature=1.0)
    with pytest.raises(AssertionError, match="targets are"):
        sparse_divergence("forward_kl", _logits(2, 5, 10), targets, tail="bucket", temperature=1.0)
    with pytest.raises(AssertionError, match="unknown divergence"):
        sparse_divergence("kl", _logits(2, 3, 10), targets, tail="bucket", temperature=1.0)
    with pytest.raises(AssertionError, match="must match"):
        TopKTargets(ids=targets.ids, logprobs=targets.logprobs[..., :2], tail_logprob=targets.tail_logprob)


def test_targets_to_device():
    targets = topk_targets_from_logits(_logits(1, 2, 6), k=3, temperature=1.0)
    moved = targets.to("cpu")
    assert isinstance(moved, TopKTargets) and moved.k == 3
    assert torch.equal(moved.ids, targets.ids)


def test_loss_names_match_config():
    from distill_core.config import DIVERGENCE_NAMES

    assert set(DIVERGENCE_NAMES) == set(DIVERGENCES)
    assert set(LOSS_NAMES) <= set(typing.get_args(LossName))
