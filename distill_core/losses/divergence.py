"""Per-token divergences between the teacher's top-k and the student, plus a dense twin.

All functions return per-token values ``[B, T]`` in float32; reduce them with ``reduce.masked_mean``.
Values are multiplied by τ² (Hinton et al., 2015): softening both distributions by τ shrinks the
gradients by about 1/τ², so the scaling keeps the distillation term's weight comparable across τ.

Tail modes for the sparse loss (the teacher mass outside its top-k):
  bucket:      k + 1 categories, the k ids plus one tail bucket. The teacher's bucket holds
               exp(tail_logprob), the student's its own mass outside the same ids. At k = vocab both
               buckets are empty and the result equals the dense divergence.
  renormalize: both distributions restricted to the k ids and renormalised.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distill_core.losses.registry import DIVERGENCES, Divergence
from distill_core.losses.signals import TopKTargets

Tail = Literal["bucket", "renormalize"]


def topk_targets_from_logits(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopKTargets:
    """The teacher's top-k at temperature τ, from its logits.

    teacher_logits: [B, T, V] any float dtype (computed in float32; no gradient flows back).
    Returns TopKTargets with ids [B, T, k] int64, logprobs [B, T, k] float32 and tail_logprob
    [B, T] float32, where tail_logprob is the log-sum-exp over the ids *not* kept (exact, even when
    the tail is far below float32 epsilon) and ``-inf`` when nothing is left.
    Working memory: one float32 copy of the logits.
    """
    assert teacher_logits.dim() == 3, f"teacher_logits must be [B, T, V], got shape {tuple(teacher_logits.shape)}"
    vocab = teacher_logits.shape[-1]
    assert 1 <= k <= vocab, f"k must be in [1, vocab={vocab}], got {k}"
    assert temperature > 0, f"temperature must be positive, got {temperature}"

    x = teacher_logits.detach().to(torch.float32, copy=True).div_(temperature)
    lse_all = torch.logsumexp(x, dim=-1)
    top, ids = x.topk(k, dim=-1)
    if k == vocab:
        tail = torch.full_like(lse_all, float("-inf"))
    else:
        # Summing the complement directly, rather than log1p(−Σ top-k probs), keeps a small tail
        # exact: 1 − Σ loses everything below float32 epsilon and would report an empty tail.
        tail = torch.logsumexp(x.scatter_(-1, ids, float("-inf")), dim=-1) - lse_all
    return TopKTargets(ids=ids, logprobs=top - lse_all.unsqueeze(-1), tail_logprob=tail)


def _sparse_log_probs(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    tail: Tail,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities on the sparse categories: [..., k+1] (bucket) or [..., k].

    ``valid`` [..., k] bool (or None: all) marks the slots that are categories; an invalid slot
    repeats a valid id, is -inf on both sides, and the student's mass there stays in its tail."""
    # Gather before casting so the student's logits at the ids are never a full-vocabulary copy.
    student_at_ids = student_logits.gather(-1, ids).float() / temperature
    if valid is not None:
        student_at_ids = student_at_ids.masked_fill(~valid, float("-inf"))
        logprobs = logprobs.masked_fill(~valid, float("-inf"))
    if tail == "renormalize":
        return torch.log_softmax(logprobs.float(), dim=-1), torch.log_softmax(student_at_ids, dim=-1)

    lse_ids = torch.logsumexp(student_at_ids, dim=-1)
    if valid is None and ids.shape[-1] == student_logits.shape[-1]:
        # Nothing outside the ids; logsumexp over an all −inf row would give NaN gradients.
        lse_rest = torch.full_like(lse_ids, float("-inf"))
    else:
        lse_rest = _student_tail(student_logits, ids, lse_ids, temperature)
    lse_all = torch.logaddexp(lse_ids, lse_rest)
    log_q = torch.cat([student_at_ids - lse_all.unsqueeze(-1), (lse_rest - lse_all).unsqueeze(-1)], dim=-1)
    log_p = torch.cat([logprobs.float(), tail_logprob.float().unsqueeze(-1)], dim=-1)
    return log_p, log_q


# Below this student tail mass, log(1 − mass at the ids) loses float32 precision: recompute exactly.
_EXACT_TAIL_BELOW = 1e-3


def _student_tail(student_logits: torch.Tensor, ids: torch.Tensor, lse_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log Σ exp(logits/τ) over the ids *not* in ``ids``: [..., k] ids → [...] float32.

    Fast path: log(Z − Z_ids) from one logsumexp over the vocabulary (no masked copy). Where the
    tail is under 1e-3 of the mass that difference cancels, so those rows alone are recomputed as a
    logsumexp over the logits with the ids masked out (one full-vocabulary copy of those rows)."""
    x = student_logits.float()
    if temperature != 1.0:
        x = x / temperature
    lse_all = torch.logsumexp(x, dim=-1)
    gap = (lse_ids - lse_all).clamp(max=0.0)  # log of the mass at the ids, ≤ 0
    exact = gap > math.log1p(-_EXACT_TAIL_BELOW)
    lse_rest = lse_all + torch.log(-torch.expm1(gap.clamp(max=math.log1p(-_EXACT_TAIL_BELOW))))
    if exact.any():
        rows = x[exact].scatter(-1, ids[exact], float("-inf"))
        lse_rest = lse_rest.masked_scatter(exact, torch.logsumexp(rows, dim=-1))
    return lse_rest


def _sparse_rows(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    divergence: Divergence,
    tail: Tail,
    temperature: float,
    beta: float,
) -> torch.Tensor:
    log_p, log_q = _sparse_log_probs(student_logits, ids, logprobs, tail_logprob, tail, temperature, valid)
    return divergence(log_p, log_q, beta) * temperature**2


def _check_common(name: str, temperature: float, beta: float) -> Divergence:
    assert name in DIVERGENCES, f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}"
    assert temperature > 0, f"temperature must be positive, got {temperature}"
    assert 0.0 < beta < 1.0, f"beta must be in (0, 1), got {beta}"
    return DIVERGENCES[name]


def sparse_divergence(
    name: str,
    student_logits: torch.Tensor,
    targets: TopKTargets,
    *,
    tail: Tail,
    temperature: float,
    beta: float = 0.5,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Divergence ``name`` between the teacher's top-k and the student, per token, times τ².

    student_logits: [B, T, V] any float dtype, finite; divided by τ here (computed in float32).
    targets: the teacher's top-k, already at τ (see ``topk_targets_from_logits``).
    tail: "bucket" or "renormalize" (module docstring).
    beta: mixture weight of jsd / skew_kl / skew_reverse_kl, in (0, 1).
    chunk_rows: process this many of the B·T rows at a time, each under activation checkpointing
        when a gradient is needed, so the bucket mode's full-vocabulary float32 copy exists for one
        chunk at a time (recomputed in backward) instead of for the whole batch.
    Returns [B, T] float32.
    """
    divergence = _check_common(name, temperature, beta)
    assert tail in ("bucket", "renormalize"), f"tail must be 'bucket' or 'renormalize', got {tail!r}"
    assert student_logits.dim() == 3, f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}"
    assert student_logits.is_floating_point(), f"student_logits must be floating point, got {student_logits.dtype}"
    batch, seq, vocab = student_logits.shape
    assert targets.ids.shape[:2] == (batch, seq), (
        f"targets are [B, T, k] = {tuple(targets.ids.shape)} but student_logits are [B, T, V] = {tuple(student_logits.shape)}"
    )
    assert targets.k <= vocab, f"targets keep k = {targets.k} ids but the student vocabulary has only {vocab}"

    rows = functools.partial(_sparse_rows, divergence=divergence, tail=tail, temperature=temperature, beta=beta)
    parts = (student_logits, targets.ids, targets.logprobs, targets.tail_logprob)
    if targets.valid is not None:
        parts = (*parts, targets.valid)
    if chunk_rows is None:
        return rows(*parts)

    return in_row_chunks(rows, parts, chunk_rows)


def in_row_chunks(rows, parts: tuple[torch.Tensor, ...], chunk_rows: int) -> torch.Tensor:
    """``rows(*parts)`` [B, T] computed ``chunk_rows`` of the B·T positions at a time, each chunk
    recomputed in backward (activation checkpointing) when the first part (the student's logits
    [B, T, V]) needs a gradient; every part is [B, T, ...] and ``rows`` maps [n, ...] parts to [n]."""
    assert chunk_rows >= 1, f"chunk_rows must be positive, got {chunk_rows}"
    batch, seq = parts[0].shape[:2]
    flat = [p.reshape(batch * seq, *p.shape[2:]) for p in parts]
    recompute = torch.is_grad_enabled() and parts[0].requires_grad
    out = []
    for start in range(0, batch * seq, chunk_rows):
        chunk = [p[start : start + chunk_rows] for p in flat]
        out.append(checkpoint(rows, *chunk, use_reentrant=False) if recompute else rows(*chunk))
    return torch.cat(out).view(batch, seq)


def dense_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    beta: float = 0.5,
) -> torch.Tensor:
    """Divergence ``name`` over the full vocabulary, per token, times τ²: the reference for the sparse loss.

    student_logits, teacher_logits: [B, T, V] any float dtype (both divided by τ, computed in float32).
    Returns [B, T] float32.
    """
    divergence = _check_common(name, temperature, beta)
    assert student_logits.dim() == 3, f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}"
    assert teacher_logits.shape == student_logits.shape, (
        f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits {tuple(student_logits.shape)}"
    )
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return divergence(log_p, log_q, beta) * temperature**2
