import math

import torch
import torch.nn.functional as F

from distill_core.losses import length_normalised, sequence_logprob, token_cross_entropy


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    return logits, labels, mask


def test_token_cross_entropy_matches_f_cross_entropy():
    logits, labels, mask = _case()
    logits.requires_grad_()
    ce = token_cross_entropy(logits, labels, mask)
    expected = F.cross_entropy(logits.detach().transpose(1, 2), labels, reduction="none")
    assert ce.shape == (2, 5) and ce.dtype == torch.float32
    torch.testing.assert_close(ce[mask], expected[mask])
    assert torch.equal(ce[~mask], torch.zeros(2))
    ce.sum().backward()
    assert torch.equal(logits.grad[~mask], torch.zeros(2, 7))


def test_token_cross_entropy_bfloat16_and_masked_garbage_labels():
    logits, labels, mask = _case(1)
    labels = labels.masked_fill(~mask, -1)  # padding labels outside the vocabulary are never read
    ce = token_cross_entropy(logits.to(torch.bfloat16), labels, mask)
    assert ce.dtype == torch.float32 and torch.isfinite(ce).all()


def test_sequence_logprob_and_length_normalised():
    logits, tokens, mask = _case(2)
    total, n = sequence_logprob(logits, tokens, mask)
    manual = (F.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    torch.testing.assert_close(total, manual)
    assert n.tolist() == [3, 5]
    torch.testing.assert_close(length_normalised(total, n, 0.0), total)
    torch.testing.assert_close(length_normalised(total, n), total / torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(length_normalised(torch.tensor([-6.0]), torch.tensor([4]), 2.0), torch.tensor([-6.0 / 16]))
    assert length_normalised(torch.tensor([0.0]), torch.tensor([0])).item() == 0.0


def test_sequence_logprob_fixed_value():
    # Uniform over 4 tokens: each valid token contributes log(1/4).
    total, n = sequence_logprob(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]), torch.tensor([[True, True, False]]))
    torch.testing.assert_close(total, torch.tensor([2 * math.log(0.25)]))
    assert n.tolist() == [2]
