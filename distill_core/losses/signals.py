"""Teacher signals as typed values, so a loss does not care whether they came from the cache or a live teacher."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class TopKTargets:
    """The teacher's top-k at each position, taken at the distillation temperature τ.

    ids:          [B, T, k] int64, token ids (most probable first from a live teacher; ascending from the cache).
    logprobs:     [B, T, k] float, ``log_softmax(teacher_logits / τ)`` gathered at ``ids``.
    tail_logprob: [B, T]    float, log of the teacher mass outside ``ids``; ``-inf`` when nothing is
                  left (k = vocab, or the teacher gives the rest zero probability).
    valid:        [B, T, k] bool or None (all valid). Across tokenizers some slots hold no category:
                  their logprob is ``-inf``, their id repeats a valid id of the row, and the student's
                  mass there is counted in the tail (``tail_logprob`` holds the teacher's).

    The targets carry no gradient, and do not record τ: the cache manifest does, and the caller
    passes the same τ to the loss.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    valid: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert self.ids.dim() == 3, f"TopKTargets.ids must be [B, T, k], got shape {tuple(self.ids.shape)}"
        assert self.ids.dtype == torch.int64, f"TopKTargets.ids must be int64 (gather needs it), got {self.ids.dtype}"
        assert self.logprobs.shape == self.ids.shape, (
            f"TopKTargets.logprobs {tuple(self.logprobs.shape)} must match ids {tuple(self.ids.shape)}"
        )
        assert self.tail_logprob.shape == self.ids.shape[:2], (
            f"TopKTargets.tail_logprob {tuple(self.tail_logprob.shape)} must be [B, T] = {tuple(self.ids.shape[:2])}"
        )
        assert self.valid is None or (self.valid.shape == self.ids.shape and self.valid.dtype == torch.bool), (
            f"TopKTargets.valid must be bool like ids {tuple(self.ids.shape)}"
        )

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TopKTargets":
        return TopKTargets(
            ids=self.ids.to(device, non_blocking=non_blocking),
            logprobs=self.logprobs.to(device, non_blocking=non_blocking),
            tail_logprob=self.tail_logprob.to(device, non_blocking=non_blocking),
            valid=self.valid.to(device, non_blocking=non_blocking) if self.valid is not None else None,
        )

    def rows(self, index) -> "TopKTargets":
        """The targets of rows ``index`` (anything that indexes the leading dimension)."""
        return TopKTargets(self.ids[index], self.logprobs[index], self.tail_logprob[index],
                           self.valid[index] if self.valid is not None else None)


@dataclass(frozen=True, eq=False)
class SampledTargets:
    """The teacher's distribution estimated from draws (``sampled``), or its top-k plus draws from the tail (``hybrid``).

    ids:          [B, T, n] int64; per position the ``head`` exact ids first (the top-k; none for
                  sampled), then the unique drawn ids, then padding (mass 0).
    logprobs:     [B, T, n] float, the teacher's ``log_softmax(logits / τ)`` at ``ids``.
    mass:         [B, T, n] float, the estimate's probability at each id: exactly p for head ids; for a
                  drawn id, count/m times p_τ/p_c (the importance ratio between τ and the capture
                  temperature c; 1 when they agree), times the tail mass at c for hybrid, whose draws
                  come from the teacher outside its top-k. Sums of ``mass · f(id)`` are unbiased
                  estimates of ``Σ_v p_τ(v) f(v)`` over the vocabulary.
    tail_logprob: [B, T] float, log teacher mass at τ outside the head (0 for sampled: all of it).
    head:         ids per position taken exactly.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    mass: torch.Tensor
    tail_logprob: torch.Tensor
    head: int

    def __post_init__(self) -> None:
        assert self.ids.dim() == 3 and self.ids.dtype == torch.int64, (
            f"SampledTargets.ids must be int64 [B, T, n], got {self.ids.dtype} {tuple(self.ids.shape)}"
        )
        assert self.logprobs.shape == self.ids.shape and self.mass.shape == self.ids.shape, (
            f"SampledTargets.logprobs {tuple(self.logprobs.shape)} and mass {tuple(self.mass.shape)} must match ids {tuple(self.ids.shape)}"
        )
        assert self.tail_logprob.shape == self.ids.shape[:2], (
            f"SampledTargets.tail_logprob {tuple(self.tail_logprob.shape)} must be [B, T] = {tuple(self.ids.shape[:2])}"
        )
        assert 0 <= self.head <= self.ids.shape[-1], f"head {self.head} must be in [0, {self.ids.shape[-1]}]"

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def head_targets(self) -> TopKTargets:
        """The exact head as top-k targets (hybrid), for divergences taken on the head plus a tail bucket."""
        h = self.head
        return TopKTargets(self.ids[..., :h], self.logprobs[..., :h], self.tail_logprob)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SampledTargets":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return SampledTargets(move(self.ids), move(self.logprobs), move(self.mass), move(self.tail_logprob), self.head)

    def rows(self, index) -> "SampledTargets":
        """The targets of the batch rows ``index`` (a slice or index tensor over B)."""
        return SampledTargets(self.ids[index], self.logprobs[index], self.mass[index], self.tail_logprob[index], self.head)
