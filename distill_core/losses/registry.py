"""Divergences by name, each between two distributions on a shared category axis.

Every divergence takes ``log_p`` (teacher) and ``log_q`` (student), log-probabilities of the same
shape ``[..., C]`` that may hold ``-inf``, plus ``beta`` (used by jsd and the skews, ignored by
the others), and returns the sum over the last axis, ``[...]``. Zero-probability categories add
nothing (0·log 0 = 0) and give finite gradients; a category the first argument of a KL has and
the second lacks gives ``+inf``, as the math says (e.g. reverse_kl where the teacher has zero mass).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
DivergenceName = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = Σ a·(log a − log b) over the last axis, with 0·log 0 = 0."""
    a = log_a.exp()
    # Zero the log-ratio itself where a = 0, not just the product: 0·(−inf) would be NaN in the
    # backward pass of the multiplication even when the forward value is masked out.
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1−w)·b), elementwise, for 0 < w < 1."""
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    # logaddexp(−inf, −inf) has a NaN gradient; feed it zeros there and put −inf back after.
    mixed = torch.logaddexp(log_a.masked_fill(both_zero, 0.0) + math.log(w), log_b.masked_fill(both_zero, 0.0) + math.log1p(-w))
    return mixed.masked_fill(both_zero, float("-inf"))


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(p || q): mass-covering; the usual distillation loss."""
    return kl(log_p, log_q)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(q || p): mode-seeking."""
    return kl(log_q, log_p)


def jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD: beta·KL(p || M) + (1−beta)·KL(q || M) with M = beta·p + (1−beta)·q."""
    log_m = log_mixture(log_p, log_q, beta)
    return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


def skew_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(p || beta·p + (1−beta)·q): forward KL that stays finite where q has no mass."""
    return kl(log_p, log_mixture(log_p, log_q, beta))


def skew_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(q || beta·q + (1−beta)·p): reverse KL that stays finite where p has no mass."""
    return kl(log_q, log_mixture(log_q, log_p, beta))


def tvd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Total variation distance 0.5·Σ|p − q|, in [0, 1]."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}

# "ce" is cross-entropy on the data tokens (sequence.token_cross_entropy); the rest compare to the teacher.
LOSS_NAMES: tuple[str, ...] = ("ce", *DIVERGENCES)
