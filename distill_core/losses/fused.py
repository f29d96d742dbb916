"""The LM head and the token losses together, chunk by chunk over the rows: no ``[B·T, V]`` tensor.

Unfused, the student's logits ``[B, T, V]`` exist in the model's forward, again as the loss's float32
copy, its log-softmax and its gradient: with V = 50k and more these are the largest tensors of a step.
Here the model runs only its body; the loss takes the final hidden states and the head's weight and, one
chunk of ``chunk_rows`` rows at a time, computes the logits, every per-token loss on them (the same
functions as unfused: ``token_cross_entropy``, ``teacher_divergence``) and the gradient of the weighted
total with respect to that chunk's logits, folds it into the gradients of the hidden states and the
weight, and drops the chunk.

``fused_head_loss`` computes the gradients in its forward pass (as Liger-Kernel's fused linear losses
do): the head then costs three matmuls, as unfused, not the four a recompute in backward needs, and
backward only scales them by the incoming gradient. That needs the loss to be a fixed linear
combination of per-token values (each term a weighted sum over rows, e.g. a masked mean).
``fused_token_ce`` gives per-token cross-entropy with a recompute per chunk in backward, for losses
that are not linear in the per-token values (ranking beams by their summed log-probability).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distill_core.losses.divergence import Tail
from distill_core.losses.registry import DIVERGENCES
from distill_core.losses.sampled import teacher_divergence
from distill_core.losses.sequence import token_cross_entropy
from distill_core.losses.signals import SampledTargets, TopKTargets
from distill_core.losses.uld import uld_distance

Targets = TopKTargets | SampledTargets


@dataclass(frozen=True, eq=False)
class HeadTerm:
    """One per-token loss on the head's rows, and how it enters the total.

    name:        "ce" (cross-entropy of the labels), "uld" (``losses.uld``) or a divergence name (``registry.DIVERGENCES``).
    weight:      the term's weight in the total.
    row_weights: [B, T] float, each position's share of the term's value: ``mask / mask.sum()`` for a
                 masked mean. Positions at 0 add nothing and get no gradient, whatever their loss.
    targets:     the teacher's targets over the same [B, T] positions (divergences only): a top-k, or
                 sampled / hybrid targets (``losses.sampled``).
    temperature: the distillation temperature τ the targets were taken at (divergences only).
    beta:        mixture weight of jsd / skew_kl / skew_reverse_kl.
    """

    name: str
    weight: float
    row_weights: torch.Tensor
    targets: Targets | None = None
    temperature: float = 1.0
    beta: float = 0.5


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    terms: Sequence[HeadTerm],
    *,
    tail: Tail,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_terms weight · Σ_positions row_weight · loss, with the logits ``hidden @ weight.T + bias``
    computed ``chunk_rows`` positions at a time.

    hidden: [B, T, D] float, the final hidden states (the head's input); weight: [V, D]; bias: [V] or None;
    labels: [B, T] int64, the next tokens (read by "ce" terms where their row weight is not 0).
    tail: the divergences' tail mode (``divergence`` module docstring).
    Returns (total: float32 scalar with gradients to hidden, weight and bias; values: float32
    [len(terms)], each term's unweighted value, without gradient). Working memory: one chunk's
    ``[chunk_rows, V]`` tensors (the logits, their loss intermediates and gradient) plus the gradients
    of hidden and weight; nothing of size [B·T, V] is kept for backward. Under autocast the logits
    take the autocast dtype, as the model's own head would.
    """
    assert hidden.dim() == 3, f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}"
    assert weight.dim() == 2 and weight.shape[1] == hidden.shape[2], (
        f"weight must be [V, D] with D = {hidden.shape[2]}, got shape {tuple(weight.shape)}"
    )
    assert bias is None or bias.shape == weight.shape[:1], f"bias must be [V] = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}"
    assert labels.shape == hidden.shape[:2], f"labels {tuple(labels.shape)} must be [B, T] = {tuple(hidden.shape[:2])}"
    assert chunk_rows >= 1, f"chunk_rows must be positive, got {chunk_rows}"
    assert terms, "fused_head_loss needs at least one term"
    for term in terms:
        assert term.name in ("ce", "uld") or term.name in DIVERGENCES, (
            f"unknown loss {term.name!r}; choose 'ce', 'uld' or one of {sorted(DIVERGENCES)}"
        )
        assert term.row_weights.shape == labels.shape, f"row_weights {tuple(term.row_weights.shape)} must be [B, T] = {tuple(labels.shape)}"
        assert term.name == "ce" or term.targets is not None, f"divergence {term.name!r} needs targets"
    return _FusedHeadLoss.apply(hidden, weight, bias, labels, tuple(terms), tail, chunk_rows)


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the total and its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, terms, tail, chunk_rows):
        batch, seq, width = hidden.shape
        n = batch * seq
        h = hidden.reshape(n, width)
        y = labels.reshape(n)
        rows = [t.row_weights.reshape(n).float() for t in terms]
        targets = [_flat_targets(t.targets) for t in terms]
        grad_hidden = torch.empty_like(h)
        # Accumulated in float32 whatever the logits' dtype: it sums B·T / chunk_rows products.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None
        values = torch.zeros(len(terms), dtype=torch.float32, device=hidden.device)
        need_grad = any(ctx.needs_input_grad[:3])
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            hc = h[start:end]
            logits = F.linear(hc, weight, bias)
            with torch.enable_grad():
                logits.requires_grad_(need_grad)
                per_term = _chunk_values(logits, y[start:end], terms, [r[start:end] for r in rows],
                                         [_rows(t, start, end) for t in targets], tail)
                values += torch.stack([v.detach() for v in per_term])
                if not need_grad:  # e.g. under torch.no_grad: values only
                    continue
                (grad_logits,) = torch.autograd.grad(sum(t.weight * v for t, v in zip(terms, per_term)), logits)
            grad_hidden[start:end] = grad_logits @ weight
            if grad_logits.dtype == hc.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), hc)  # in place: no [V, D] temporary per chunk
            else:
                grad_weight += grad_logits.t() @ hc
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden.view(batch, seq, width), grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(values)
        total = sum(t.weight * values[i] for i, t in enumerate(terms))
        return total, values

    @staticmethod
    def backward(ctx, grad_total, grad_values):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        grad_bias = (grad_bias * grad_total).to(bias_dtype) if grad_bias is not None else None
        return grad_hidden * grad_total, (grad_weight * grad_total).to(weight_dtype), grad_bias, None, None, None, None


def _chunk_values(logits, labels, terms, rows, targets, tail) -> list[torch.Tensor]:
    """Each term's Σ row_weight · per-token loss over one chunk: logits [c, V], the rest [c] / [c, k]."""
    used = [weights != 0 for weights in rows]
    ce_mask = [u for t, u in zip(terms, used) if t.name == "ce"]
    # One cross-entropy serves every CE term (their masks differ only in their row weights).
    ce = token_cross_entropy(logits[None], labels[None], torch.stack(ce_mask).any(0)[None])[0] if ce_mask else None
    out = []
    for term, weights, mask, target in zip(terms, rows, used, targets):
        if term.name == "ce":
            per_token = ce
        elif term.name == "uld":
            per_token = uld_distance(logits[None], target, temperature=term.temperature)[0]
        else:
            per_token = teacher_divergence(term.name, logits[None], target, tail=tail, temperature=term.temperature, beta=term.beta)[0]
        # where, not multiply: a position outside the mask may hold inf or NaN, and 0·inf is NaN.
        out.append((torch.where(mask, per_token, 0.0) * weights).sum())
    return out


def _tensors(targets: Targets) -> dict[str, torch.Tensor]:
    """The per-position fields of ``targets`` (all but settings such as SampledTargets.head)."""
    return {f.name: getattr(targets, f.name) for f in dataclasses.fields(targets) if isinstance(getattr(targets, f.name), torch.Tensor)}


def _flat_targets(targets: Targets | None) -> Targets | None:
    if targets is None:
        return None
    return dataclasses.replace(targets, **{name: t.flatten(0, 1)[None] for name, t in _tensors(targets).items()})


def _rows(targets: Targets | None, start: int, end: int) -> Targets | None:
    """Positions ``start:end`` of flattened targets, kept as a batch of one ([1, c, ...])."""
    if targets is None:
        return None
    return dataclasses.replace(targets, **{name: t[:, start:end] for name, t in _tensors(targets).items()})


def fused_token_ce(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, mask: torch.Tensor, *, chunk_rows: int
) -> torch.Tensor:
    """``token_cross_entropy(hidden @ weight.T + bias, labels, mask)`` computed ``chunk_rows`` positions at
    a time, each chunk recomputed in backward (activation checkpointing) so no [B·T, V] is kept.

    hidden: [B, T, D]; weight: [V, D]; bias: [V] or None; labels: [B, T] int64; mask: [B, T] bool.
    Returns [B, T] float32, 0 at masked positions.
    """
    assert hidden.dim() == 3, f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}"
    assert labels.shape == hidden.shape[:2] and mask.shape == labels.shape, (
        f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must be [B, T] = {tuple(hidden.shape[:2])}"
    )
    assert chunk_rows >= 1, f"chunk_rows must be positive, got {chunk_rows}"
    batch, seq, width = hidden.shape
    h, y, m = hidden.reshape(-1, width), labels.reshape(-1), mask.reshape(-1)
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out = []
    for start in range(0, batch * seq, chunk_rows):
        args = (h[start : start + chunk_rows], weight, bias, y[start : start + chunk_rows], m[start : start + chunk_rows])
        out.append(checkpoint(_ce_rows, *args, use_reentrant=False) if recompute else _ce_rows(*args))
    return torch.cat(out).view(batch, seq)


def _ce_rows(h, weight, bias, labels, mask) -> torch.Tensor:
    return token_cross_entropy(F.linear(h, weight, bias)[None], labels[None], mask[None])[0]
