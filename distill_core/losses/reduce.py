"""Reduce per-token losses over the valid tokens."""

from __future__ import annotations

import torch


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_token`` over positions where ``mask`` is true.

    per_token: [B, T] float; mask: [B, T] bool. Returns a float32 scalar; 0 when no position is
    valid, still attached to the graph so backward works (with zero gradients).
    """
    assert per_token.shape == mask.shape, f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must match"
    assert mask.dtype == torch.bool, f"mask must be bool, got {mask.dtype}"
    # where, not multiply: a masked position may hold inf or NaN, and 0·inf is NaN.
    total = torch.where(mask, per_token.float(), 0.0).sum()
    # The count stays a tensor: .item() here would be a CPU-GPU sync point every step.
    return total / mask.sum().clamp(min=1)
