import torch

from distill_core.losses import masked_mean


def test_masked_mean_over_valid_tokens():
    per_token = torch.tensor([[1.0, 2.0, float("inf")], [3.0, float("nan"), 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    torch.testing.assert_close(masked_mean(per_token, mask), torch.tensor(3.0))


def test_masked_mean_all_masked_is_zero_with_graph():
    per_token = torch.tensor([[1.0, float("inf")]], requires_grad=True)
    out = masked_mean(per_token, torch.zeros(1, 2, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(per_token.grad, torch.zeros(1, 2))
