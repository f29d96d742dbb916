import pytest
import torch

from distill_core.losses.divergence import sparse_divergence, topk_targets_from_logits
from distill_core.losses.fused import HeadTerm, fused_head_loss
from distill_core.losses.signals import TopKTargets
from distill_core.losses.uld import uld_distance

NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def _logits(seed, shape=(2, 5, 11)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("name", NAMES)
def test_all_valid_slots_are_exactly_todays_divergence(name):
    s, t = _logits(0), _logits(1)
    targets = topk_targets_from_logits(t, 4, 1.5)
    marked = TopKTargets(targets.ids, targets.logprobs, targets.tail_logprob, torch.ones_like(targets.ids, dtype=torch.bool))
    for tail in ("bucket", "renormalize"):
        assert torch.equal(sparse_divergence(name, s, marked, tail=tail, temperature=1.5),
                           sparse_divergence(name, s, targets, tail=tail, temperature=1.5))


@pytest.mark.parametrize("name", NAMES)
def test_an_invalid_slot_is_the_same_as_no_slot(name):
    s, t = _logits(2), _logits(3)
    targets = topk_targets_from_logits(t, 4, 1.0)
    # drop slot 2: its teacher mass joins the tail; marked invalid, its id repeats slot 0's
    lost = targets.logprobs[..., 2]
    keep = [0, 1, 3]
    short = TopKTargets(targets.ids[..., keep], targets.logprobs[..., keep], torch.logaddexp(targets.tail_logprob, lost))
    ids = targets.ids.clone()
    ids[..., 2] = ids[..., 0]
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[..., 2] = False
    marked = TopKTargets(ids, targets.logprobs.clone(), short.tail_logprob, valid)
    got = sparse_divergence(name, s, marked, tail="bucket", temperature=1.0)
    assert torch.allclose(got, sparse_divergence(name, s, short, tail="bucket", temperature=1.0), atol=1e-6)


def test_uld_is_the_l1_of_sorted_probabilities_and_ignores_which_ids():
    s, t = _logits(4), _logits(5)
    full = topk_targets_from_logits(t, 11, 1.0)  # k = V: the exact sorted L1
    p = torch.softmax(t, -1).sort(-1, descending=True).values
    q = torch.softmax(s, -1).sort(-1, descending=True).values
    assert torch.allclose(uld_distance(s, full, temperature=1.0), (p - q).abs().sum(-1), atol=1e-6)
    # a student with the teacher's distribution over other ids (permuted vocabulary): distance 0
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    top4 = topk_targets_from_logits(t, 4, 1.0)
    assert uld_distance(t[..., perm], top4, temperature=1.0).abs().max() < 1e-6
    assert uld_distance(s, top4, temperature=1.0).min() > 0.01


def test_fused_uld_and_marked_targets_equal_unfused():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    weight = torch.randn(11, 6, requires_grad=True)
    targets = topk_targets_from_logits(_logits(6), 4, 1.0)
    valid = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(1)) > 0.3
    valid[..., 0] = True
    ids = torch.where(valid, targets.ids, targets.ids[..., :1])
    marked = TopKTargets(ids, targets.logprobs.masked_fill(~valid, float("-inf")), targets.tail_logprob, valid)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(2)) > 0.2
    w = mask.float() / mask.sum()
    logits = hidden @ weight.T
    ref = 0.5 * ((uld_distance(logits, targets, temperature=1.0) * w).sum()) + (sparse_divergence("forward_kl", logits, marked, tail="bucket", temperature=1.0) * w).sum()
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    total, _ = fused_head_loss(hidden, weight, None, labels, [HeadTerm("uld", 0.5, w, targets), HeadTerm("forward_kl", 1.0, w, marked)],
                               tail="bucket", chunk_rows=3)
    g = torch.autograd.grad(total, (hidden, weight))
    assert torch.allclose(total, ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_ref))
