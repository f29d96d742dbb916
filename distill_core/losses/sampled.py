"""Divergences on sampled targets (``topk.strategy`` sampled or hybrid): unbiased estimates from draws.

A divergence that is a teacher expectation, ``Σ_v p(v) g(p(v), q(v))``, is estimated without bias by
``Σ_i mass_i g(p_i, q_i)`` over the stored ids (see :class:`SampledTargets`), and so is its gradient
in the student's logits, since the draws do not depend on the student (Sparse Logit Sampling,
arXiv 2503.16870). Forward KL (g = log p − log q) and skew KL (g = log p − log(βp + (1−β)q)) are such
expectations, with g bounded by the student alone. Reverse KL, JSD, skew reverse KL and TVD weigh
the student's own mass where the teacher's is small; from teacher draws their estimate carries a
q/p factor with unbounded variance, so on ``sampled`` targets they are refused when the config is
parsed, and on ``hybrid`` targets they are taken on the exact head plus one tail bucket (as for a
top-k cache with ``tail: bucket``), the draws unused.
"""

from __future__ import annotations

import functools

import torch

from distill_core.config import SAMPLED_DIVERGENCES
from distill_core.losses.divergence import in_row_chunks, sparse_divergence
from distill_core.losses.registry import log_mixture
from distill_core.losses.signals import SampledTargets, TopKTargets


def _estimate_rows(student_logits, ids, logprobs, mass, *, name: str, temperature: float, beta: float) -> torch.Tensor:
    x = student_logits.float() / temperature
    log_q = x.gather(-1, ids) - torch.logsumexp(x, dim=-1, keepdim=True)
    log_p = logprobs.float()
    kept = mass > 0
    if name == "forward_kl":
        g = log_p - log_q
    else:  # skew_kl
        g = log_p - log_mixture(log_p.masked_fill(~kept, 0.0), log_q, beta)
    return (mass.float() * torch.where(kept, g, 0.0)).sum(-1) * temperature**2


def sampled_divergence(
    name: str,
    student_logits: torch.Tensor,
    targets: SampledTargets,
    *,
    temperature: float,
    beta: float = 0.5,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Divergence ``name`` between the teacher (estimated by ``targets``) and the student, per token, times τ².

    student_logits: [B, T, V] any float dtype, divided by τ here (float32). targets: at τ.
    forward_kl and skew_kl: the unbiased estimate over every stored id (module docstring); any other
    divergence on hybrid targets: the exact head plus a tail bucket. chunk_rows as in ``sparse_divergence``.
    Returns [B, T] float32.
    """
    assert student_logits.dim() == 3, f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}"
    assert targets.ids.shape[:2] == student_logits.shape[:2], (
        f"targets are [B, T, n] = {tuple(targets.ids.shape)} but student_logits are [B, T, V] = {tuple(student_logits.shape)}"
    )
    assert temperature > 0 and 0.0 < beta < 1.0, f"temperature {temperature} must be > 0 and beta {beta} in (0, 1)"
    if name not in SAMPLED_DIVERGENCES:
        assert targets.head > 0, f"{name} has no unbiased estimate from draws alone; the config check refuses it on sampled targets"
        return sparse_divergence(name, student_logits, targets.head_targets(), tail="bucket", temperature=temperature,
                                 beta=beta, chunk_rows=chunk_rows)
    rows = functools.partial(_estimate_rows, name=name, temperature=temperature, beta=beta)
    parts = (student_logits, targets.ids, targets.logprobs, targets.mass)
    if chunk_rows is None:
        return rows(*parts)
    return in_row_chunks(rows, parts, chunk_rows)


def teacher_divergence(
    name: str,
    student_logits: torch.Tensor,
    targets: TopKTargets | SampledTargets,
    *,
    tail: str,
    temperature: float,
    beta: float = 0.5,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Divergence ``name`` to the teacher's cached targets of either kind, per token [B, T] float32."""
    if isinstance(targets, SampledTargets):
        return sampled_divergence(name, student_logits, targets, temperature=temperature, beta=beta, chunk_rows=chunk_rows)
    return sparse_divergence(name, student_logits, targets, tail=tail, temperature=temperature, beta=beta, chunk_rows=chunk_rows)
