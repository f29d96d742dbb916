"""Universal Logit Distillation (Boizard et al., 2024, arXiv 2402.12030): a loss that needs no shared vocabulary.

Sorting both distributions' probabilities in decreasing order and taking the L1 distance between
the sorted vectors is the Wasserstein-1 distance between them under a cost that makes every pair of
distinct tokens equally far apart, with tokens matched by rank, not by id: it asks the student to be
as confident as the teacher, spread the same way, whatever its tokens are. With only the teacher's
top-k, the sorted vectors are compared on the first k ranks and the rest is one bucket on each side:

    uld = Σ_{i<k} |p_(i) − q_(i)| + |p_tail − q_tail|,   q_tail = 1 − Σ_{i<k} q_(i)

(at k = V this is the exact L1 of the sorted vectors). It is paired with an exact-match divergence on
the tokens whose strings coincide (GOLD's hybrid): see :mod:`distill_core.retokenize`.
"""

from __future__ import annotations

import torch

from distill_core.losses.signals import TopKTargets


def uld_distance(student_logits: torch.Tensor, targets: TopKTargets, *, temperature: float) -> torch.Tensor:
    """Per-token ULD between the teacher's sorted top-k and the student's sorted probabilities.

    student_logits: [B, T, V] any float dtype (divided by τ, computed in float32).
    targets: [B, T, k] teacher log-probabilities at τ (ids unused; slots where ``valid`` is false
    count as zero probability) and tail_logprob [B, T]. Returns [B, T] float32 in [0, 2].
    """
    assert student_logits.dim() == 3, f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}"
    assert targets.logprobs.shape[:2] == student_logits.shape[:2], (
        f"targets {tuple(targets.logprobs.shape)} must cover the student's [B, T] = {tuple(student_logits.shape[:2])}"
    )
    assert temperature > 0, f"temperature must be positive, got {temperature}"
    k = min(targets.k, student_logits.shape[-1])
    lps = targets.logprobs.float()
    if targets.valid is not None:
        lps = lps.masked_fill(~targets.valid, float("-inf"))
    p = lps.exp().sort(-1, descending=True).values
    p_rest = p[..., k:].sum(-1) + targets.tail_logprob.float().exp()
    p = p[..., :k]
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    q = log_q.topk(k, dim=-1).values.exp()  # sorted, most probable first
    q_rest = (1.0 - q.sum(-1)).clamp(min=0.0)
    return (p - q).abs().sum(-1) + (p_rest - q_rest).abs()
