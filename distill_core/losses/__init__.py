"""Loss functions for distillation: pure functions over tensors, no Prefect."""

from distill_core.losses.divergence import dense_divergence, sparse_divergence, topk_targets_from_logits
from distill_core.losses.ranking import listwise_loss, pairwise_margin_loss
from distill_core.losses.reduce import masked_mean
from distill_core.losses.registry import DIVERGENCES, LOSS_NAMES
from distill_core.losses.sequence import length_normalised, sequence_logprob, token_cross_entropy
from distill_core.losses.signals import TopKTargets

__all__ = [
    "DIVERGENCES",
    "LOSS_NAMES",
    "TopKTargets",
    "dense_divergence",
    "length_normalised",
    "listwise_loss",
    "masked_mean",
    "pairwise_margin_loss",
    "sequence_logprob",
    "sparse_divergence",
    "token_cross_entropy",
    "topk_targets_from_logits",
]
