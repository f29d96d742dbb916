"""Confidence intervals for perplexity and for comparisons of models scored on the same sequences.

Everything here is a percentile bootstrap over validation sequences. A sequence is the unit that is
resampled (tokens inside one sequence are not independent), so each model is described by two
per-sequence arrays: ``nll`` (float, the summed negative log-likelihood of the sequence's predicted
tokens, in nats) and ``tokens`` (int, how many tokens were predicted). Perplexity is the ratio of
sums ``exp(sum(nll) / sum(tokens))``, recomputed on every resample.

Comparisons are paired: both models are summed over the *same* resampled sequences, so the
sequence-to-sequence spread that both models share (some texts are simply harder) cancels out.
They are made in log space, ``log ppl_a - log ppl_b`` (the difference in mean NLL per token, nats),
whose exponential is the perplexity ratio ``ppl_a / ppl_b``.

The resampled sequence indices depend only on (number of sequences, resamples, seed), so every call
with the same seed on the same sequences draws the same resamples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distill_core.errors import ConfigError, DataError

LEVEL = 0.95
RESAMPLES = 2000
# Resamples are drawn and summed in chunks of about this many (resample, sequence) cells: bounded
# memory for long validation sets, still one vectorised gather per chunk.
_CHUNK_CELLS = 1 << 20


@dataclass(frozen=True)
class Interval:
    """A point estimate with the bounds of its confidence interval (low <= high)."""

    estimate: float
    low: float
    high: float

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval."""
        return value < self.low or value > self.high

    def map(self, fn) -> "Interval":
        """The interval of ``fn(x)`` for an increasing ``fn`` (percentile intervals carry over)."""
        return Interval(fn(self.estimate), fn(self.low), fn(self.high))


@dataclass(frozen=True)
class PairedComparison:
    """Model a against model b on the same sequences.

    ``log_ratio``: log ppl_a - log ppl_b (difference in mean NLL per token, nats); negative means
    a is better."""

    log_ratio: Interval

    @property
    def ratio(self) -> Interval:
        """ppl_a / ppl_b with its interval."""
        return self.log_ratio.map(math.exp)

    @property
    def significant(self) -> bool:
        """Whether the interval of the log ratio excludes 0 (the perplexities differ)."""
        return self.log_ratio.excludes(0.0)


def bootstrap_indices(n: int, *, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """int64 [resamples, n]: for each resample, ``n`` sequence indices drawn with replacement."""
    _check_resamples(resamples)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    return np.concatenate([rng.integers(0, n, size=(min(chunk, resamples - start), n))
                           for start in range(0, resamples, chunk)])


def resampled_log_ppl(nll, tokens, *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(estimate float64 [m], resampled float64 [resamples, m]) of log perplexity.

    ``nll``: float [m, n] (m models on the same n sequences) or [n]; ``tokens``: int [n], shared by
    the models. Column j of ``resampled`` is model j on the same resamples as every other column."""
    nll, tokens = _check(nll, tokens)
    idx = bootstrap_indices(nll.shape[1], resamples=resamples, seed=seed)
    estimate = nll.sum(1) / tokens.sum()
    chunk = max(1, _CHUNK_CELLS // nll.shape[1])
    resampled = np.concatenate([
        nll[:, rows].sum(-1).T / tokens[rows].sum(-1)[:, None]
        for rows in (idx[start:start + chunk] for start in range(0, resamples, chunk))
    ])
    return estimate, resampled


def percentile_interval(estimate: float, resampled: np.ndarray, level: float = LEVEL) -> Interval:
    """The central ``level`` interval of the resampled values [resamples], around ``estimate``."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must be between 0 and 1 (e.g. 0.95), got {level}.")
    low, high = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(low), float(high))


def perplexity_interval(nll, tokens, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """Perplexity exp(sum nll / sum tokens) of one model with its bootstrap interval.

    ``nll``: float [n] summed NLL per sequence; ``tokens``: int [n] predicted tokens per sequence."""
    estimate, resampled = resampled_log_ppl(_rows(nll), tokens, resamples=resamples, seed=seed)
    return percentile_interval(estimate[0], resampled[:, 0], level).map(math.exp)


def paired_comparison(nll_a, nll_b, tokens, *, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> PairedComparison:
    """Model a against model b, both scored on the same n sequences (paired bootstrap).

    ``nll_a``, ``nll_b``: float [n] summed NLL per sequence, in the same sequence order;
    ``tokens``: int [n] predicted tokens per sequence (the same for both: same sequences)."""
    estimate, resampled = resampled_log_ppl(_rows(nll_a, nll_b), tokens, resamples=resamples, seed=seed)
    diff = resampled[:, 0] - resampled[:, 1]
    return PairedComparison(percentile_interval(estimate[0] - estimate[1], diff, level))


def gap_closed(nll_student, nll_baseline, nll_teacher, tokens, *, resamples: int = RESAMPLES, seed: int = 0,
               level: float = LEVEL) -> Interval | None:
    """Share of the baseline-to-teacher gap that the student closes, in log perplexity:

        (log ppl_baseline - log ppl_student) / (log ppl_baseline - log ppl_teacher)

    i.e. of the cross-entropy (nats per token) the teacher is ahead of the CE-only baseline, the part
    distillation recovers: 1 = the student matches the teacher, 0 = no better than the baseline,
    negative = worse than the baseline, above 1 = better than the teacher. Log space, because mean NLL
    is what training lowers and a gap in it means the same at any perplexity.

    All three arrays: float [n] over the same sequences; ``tokens`` int [n]. The interval comes from
    the same resamples for all three models. A resample where the teacher is not ahead of the baseline
    has no share (it is unbounded): it counts as -inf for the lower bound and +inf for the upper one.
    None when the teacher is not clearly better than the baseline (so many resamples have no positive
    gap that a bound is infinite): the share is then undefined."""
    estimate, resampled = resampled_log_ppl(_rows(nll_student, nll_baseline, nll_teacher), tokens,
                                            resamples=resamples, seed=seed)
    closed, gap = resampled[:, 1] - resampled[:, 0], resampled[:, 1] - resampled[:, 2]
    if estimate[1] - estimate[2] <= 0.0:
        return None
    point = (estimate[1] - estimate[0]) / (estimate[1] - estimate[2])
    with np.errstate(divide="ignore", invalid="ignore"):
        share = closed / gap
        low = percentile_interval(point, np.where(gap > 0.0, share, -np.inf), level).low
        high = percentile_interval(point, np.where(gap > 0.0, share, np.inf), level).high
    return Interval(float(point), low, high) if math.isfinite(low) and math.isfinite(high) else None


def resampled_ece(stats, *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(estimate float64 [m], resampled float64 [resamples, m]) of expected calibration error.

    ``stats``: float [m, n, 3, bins] (m models on the same n sequences), each sequence's calibration sums
    (per bin: count, summed confidence, number correct; see ``evaluate.calibration_bins``). A resample
    sums its sequences' bins and takes the ECE of the sums, on the same resamples as
    :func:`resampled_log_ppl` with the same seed."""
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim != 4 or stats.shape[1] == 0 or stats.shape[2] != 3 or np.any(stats[:, :, 0].sum(-1) < 1):
        raise DataError(
            f"calibration sums of shape {stats.shape} must be [models, n >= 1 sequences, 3, bins] with at least one "
            "position per sequence: score every model on the same validation sequences."
        )
    m, n = stats.shape[:2]
    flat = stats.reshape(m, n, -1)
    idx = bootstrap_indices(n, resamples=resamples, seed=seed)
    chunk = max(1, _CHUNK_CELLS // (m * n * flat.shape[2]))
    resampled = np.concatenate([
        _ece(flat[:, rows].sum(2).reshape(m, len(rows), 3, -1)).T
        for rows in (idx[start:start + chunk] for start in range(0, resamples, chunk))
    ])
    return _ece(stats.sum(1)), resampled


def calibration_interval(stats, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """One model's ECE with its bootstrap interval; ``stats`` float [n, 3, bins] per sequence."""
    estimate, resampled = resampled_ece(np.asarray(stats)[None], resamples=resamples, seed=seed)
    return percentile_interval(estimate[0], resampled[:, 0], level)


def calibration_difference(stats_a, stats_b, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """ECE of model a minus model b (below 0: a is better calibrated), paired over the same n sequences;
    each ``stats`` float [n, 3, bins] in the same sequence order."""
    estimate, resampled = resampled_ece(np.stack([np.asarray(stats_a, np.float64), np.asarray(stats_b, np.float64)]),
                                        resamples=resamples, seed=seed)
    return percentile_interval(estimate[0] - estimate[1], resampled[:, 0] - resampled[:, 1], level)


def _ece(sums: np.ndarray) -> np.ndarray:
    """ECE from calibration sums [..., 3, bins]: Σ_b |Σ confidence − Σ correct| / Σ count, shape [...]."""
    return np.abs(sums[..., 1, :] - sums[..., 2, :]).sum(-1) / sums[..., 0, :].sum(-1)


def _rows(*per_sequence) -> np.ndarray:
    """float64 [m, n] from m per-sequence arrays [n] of the same length."""
    rows = [np.asarray(values, dtype=np.float64) for values in per_sequence]
    if any(r.ndim != 1 or len(r) != len(rows[0]) for r in rows):
        raise DataError(
            f"per-sequence NLL arrays of shapes {[r.shape for r in rows]} must all cover the same n >= 1 sequences; "
            "score every model on the same validation sequences and pass one NLL sum per sequence."
        )
    return np.stack(rows)


def _check(nll, tokens) -> tuple[np.ndarray, np.ndarray]:
    nll = np.atleast_2d(np.asarray(nll, dtype=np.float64))
    tokens = np.asarray(tokens)
    if nll.ndim != 2 or tokens.ndim != 1 or nll.shape[1] != len(tokens) or len(tokens) == 0:
        raise DataError(
            f"per-sequence NLL {nll.shape} and token counts {tokens.shape} must cover the same n >= 1 sequences; "
            "score every model on the same validation sequences and pass one NLL sum and one token count per sequence."
        )
    if not np.all(np.isfinite(nll)):
        raise DataError("per-sequence NLL must be finite; a model produced inf/NaN logits on some validation sequence.")
    if not np.issubdtype(tokens.dtype, np.integer) or np.any(tokens < 1):
        raise DataError(f"token counts must be integers >= 1 per sequence, got {tokens[:8]}...; drop empty sequences.")
    return nll, tokens.astype(np.int64)


def _check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise ConfigError(f"bootstrap resamples must be >= 1 (e.g. {RESAMPLES}), got {resamples}.")
