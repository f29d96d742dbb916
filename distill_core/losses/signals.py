"""Teacher signals as typed values, so a loss does not care whether they came from the cache or a live teacher."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class TopKTargets:
    """The teacher's top-k at each position, taken at the distillation temperature τ.

    ids:          [B, T, k] int64, token ids, most probable first.
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
