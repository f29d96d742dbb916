"""Ranking losses for distilled beam search: the student learns to order the teacher's N candidates per prompt.

Scores are per-candidate sequence scores (e.g. ``sequence.length_normalised``); ``valid`` marks real
candidates, the rest are padding whose scores may be anything (including -inf or NaN) and get no gradient.
"""

from __future__ import annotations

import torch

from distill_core.losses.registry import kl


def _check(student_scores: torch.Tensor, teacher_scores: torch.Tensor, valid: torch.Tensor) -> None:
    assert student_scores.dim() == 2, f"student_scores must be [P, N], got shape {tuple(student_scores.shape)}"
    assert teacher_scores.shape == student_scores.shape, (
        f"teacher_scores {tuple(teacher_scores.shape)} must match student_scores {tuple(student_scores.shape)}"
    )
    assert valid.shape == student_scores.shape, f"valid {tuple(valid.shape)} must match scores {tuple(student_scores.shape)}"
    assert valid.dtype == torch.bool, f"valid must be bool, got {valid.dtype}"


def listwise_loss(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, valid: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(softmax(teacher/τ) || softmax(student/τ)) over each prompt's valid candidates.

    student_scores, teacher_scores: [P, N] float; valid: [P, N] bool. Returns [P] float32; 0 for
    prompts with fewer than two valid candidates. Not scaled by τ² (unlike the token divergences).
    Invariant to adding a constant to a prompt's student scores.
    """
    _check(student_scores, teacher_scores, valid)
    assert temperature > 0, f"temperature must be positive, got {temperature}"
    ranked = valid.sum(-1) >= 2

    def log_probs(scores: torch.Tensor) -> torch.Tensor:
        masked = torch.where(valid, scores.float() / temperature, float("-inf"))
        # A prompt with no valid candidate would be an all -inf row, NaN through log_softmax; give
        # such rows (and single-candidate rows) constant zeros and drop them below.
        return torch.log_softmax(torch.where(ranked.unsqueeze(-1), masked, 0.0), dim=-1)

    return torch.where(ranked, kl(log_probs(teacher_scores), log_probs(student_scores)), 0.0)


def pairwise_margin_loss(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, valid: torch.Tensor, margin: float
) -> torch.Tensor:
    """Mean over ordered pairs (i, j) with teacher_i > teacher_j of relu(margin − (student_i − student_j)).

    student_scores, teacher_scores: [P, N] float; valid: [P, N] bool. Pairs need both candidates
    valid; ties in the teacher's score make no pair. Returns [P] float32; 0 for prompts without pairs.
    """
    _check(student_scores, teacher_scores, valid)
    s = torch.where(valid, student_scores.float(), 0.0)
    t = teacher_scores.float()
    pairs = (t.unsqueeze(-1) > t.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)  # [P, N, N], i better than j
    hinge = torch.relu(margin - (s.unsqueeze(-1) - s.unsqueeze(-2)))
    return torch.where(pairs, hinge, 0.0).sum((-2, -1)) / pairs.sum((-2, -1)).clamp(min=1)
