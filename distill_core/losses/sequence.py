"""Token cross-entropy and sequence log-probabilities (for CE training and scoring beam candidates)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_IGNORE = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``labels[b, t]`` under ``logits[b, t]`` (callers shift), per token.

    logits: [B, T, V] any float dtype (computed in float32); labels: [B, T] int64; mask: [B, T] bool.
    Returns [B, T] float32, 0 at masked positions (which also get no gradient).
    """
    assert logits.dim() == 3, f"logits must be [B, T, V], got shape {tuple(logits.shape)}"
    assert labels.shape == logits.shape[:2], f"labels {tuple(labels.shape)} must be [B, T] = {tuple(logits.shape[:2])}"
    assert mask.shape == labels.shape, f"mask {tuple(mask.shape)} must match labels {tuple(labels.shape)}"
    assert mask.dtype == torch.bool, f"mask must be bool, got {mask.dtype}"
    targets = labels.long().masked_fill(~mask, _IGNORE)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=_IGNORE)
    return ce.view(labels.shape)


def sequence_logprob(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(tokens[n, t] | logits[n, t]) over valid positions, and how many there are.

    logits: [N, T, V] any float dtype; tokens: [N, T] int64; mask: [N, T] bool.
    Returns (sum_logprob [N] float32, n_tokens [N] int64).
    """
    per_token = token_cross_entropy(logits, tokens, mask)
    return -per_token.sum(-1), mask.sum(-1)


def length_normalised(sum_logprob: torch.Tensor, n_tokens: torch.Tensor, length_penalty: float = 1.0) -> torch.Tensor:
    """``sum_logprob / n_tokens ** length_penalty``, Hugging Face beam search's convention.

    length_penalty 0 keeps the sum, 1 gives the mean log-probability per token, above 1 favours
    longer candidates. An empty candidate (n_tokens = 0) scores 0. Shapes [N]; returns float32.
    """
    assert sum_logprob.shape == n_tokens.shape, (
        f"sum_logprob {tuple(sum_logprob.shape)} and n_tokens {tuple(n_tokens.shape)} must match"
    )
    return sum_logprob.float() / n_tokens.clamp(min=1).float() ** length_penalty
