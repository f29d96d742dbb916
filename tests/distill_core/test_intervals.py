import math

import numpy as np
import pytest

from distill_core.errors import ConfigError, DataError
from distill_core.intervals import (
    Interval,
    bootstrap_indices,
    calibration_difference,
    calibration_interval,
    gap_closed,
    paired_comparison,
    percentile_interval,
    perplexity_interval,
    resampled_ece,
    resampled_log_ppl,
)


def test_perplexity_of_two_sequences_has_the_extreme_resamples_as_bounds():
    # Resamples of 2 sequences average 1, 2 or 3 nats/token (p = 1/4, 1/2, 1/4): the 2.5% and 97.5%
    # quantiles of 2000 resamples are the extremes.
    ci = perplexity_interval([1.0, 3.0], [1, 1], seed=0)
    assert ci == Interval(math.exp(2.0), math.exp(1.0), math.exp(3.0))


def test_perplexity_is_a_ratio_of_sums_over_sequences_of_different_lengths():
    # sequences: 2 nats over 1 token, 4 nats over 3 tokens; resamples give 2, 6/4 or 4/3 nats/token
    ci = perplexity_interval([2.0, 4.0], [1, 3])
    assert ci.estimate == pytest.approx(math.exp(6 / 4))
    assert (ci.low, ci.high) == pytest.approx((math.exp(4 / 3), math.exp(2.0)))


def test_one_sequence_or_equal_sequences_give_a_zero_width_interval():
    assert perplexity_interval([3.0], [2]) == Interval(math.exp(1.5), math.exp(1.5), math.exp(1.5))
    ci = perplexity_interval([2.0] * 5, [4] * 5)
    assert ci.low == ci.high == ci.estimate == pytest.approx(math.exp(0.5))


def test_interval_contains_the_estimate_and_narrows_with_more_sequences():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 500):
        nll = rng.gamma(4.0, 8.0, size=n)
        ci = perplexity_interval(nll, np.full(n, 16))
        assert ci.low < ci.estimate < ci.high
        assert ci.estimate == pytest.approx(math.exp(nll.sum() / (16 * n)))
        widths.append(math.log(ci.high) - math.log(ci.low))
    assert widths[1] < widths[0] / 3  # about 1/sqrt(25)


def test_identical_models_differ_by_exactly_zero():
    nll = np.random.default_rng(2).gamma(4.0, 8.0, size=30)
    result = paired_comparison(nll, nll.copy(), np.full(30, 16))
    assert result.log_ratio == Interval(0.0, 0.0, 0.0)
    assert result.ratio == Interval(1.0, 1.0, 1.0)
    assert not result.significant


def test_a_model_better_by_one_nat_per_token_on_every_sequence():
    tokens = np.array([1, 2, 3, 4])
    nll_b = np.array([5.0, 9.0, 20.0, 13.0])
    result = paired_comparison(nll_b - tokens, nll_b, tokens)  # a: 1 nat less on every token
    assert result.log_ratio.estimate == pytest.approx(-1.0)
    assert (result.log_ratio.low, result.log_ratio.high) == pytest.approx((-1.0, -1.0))
    assert result.ratio.estimate == pytest.approx(math.exp(-1.0))
    assert result.significant


def test_pairing_removes_the_spread_both_models_share():
    # Sequences differ a lot in difficulty; a is slightly better on each. Unpaired intervals of the
    # two perplexities overlap, the paired interval of their ratio excludes 1.
    rng = np.random.default_rng(3)
    tokens = np.full(40, 32)
    hard = rng.gamma(2.0, 40.0, size=40)
    nll_a, nll_b = hard + rng.normal(-3.0, 0.5, size=40), hard
    ci_a, ci_b = perplexity_interval(nll_a, tokens), perplexity_interval(nll_b, tokens)
    assert ci_a.high > ci_b.low  # overlapping marginal intervals
    result = paired_comparison(nll_a, nll_b, tokens)
    assert result.significant and result.ratio.high < 1.0
    assert result.ratio.low < result.ratio.estimate < result.ratio.high


def test_mixed_differences_are_not_significant():
    tokens = np.ones(4, dtype=int)
    result = paired_comparison([1.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0], tokens)
    assert result.log_ratio.estimate == 0.0
    assert result.log_ratio.low < 0.0 < result.log_ratio.high and not result.significant


def test_gap_closed_is_the_share_of_the_log_perplexity_gap():
    tokens = np.array([1, 1])
    teacher, baseline, student = np.array([0.0, 0.0]), np.array([2.0, 2.0]), np.array([1.0, 1.0])
    assert gap_closed(student, baseline, teacher, tokens) == Interval(0.5, 0.5, 0.5)
    assert gap_closed(teacher, baseline, teacher, tokens) == Interval(1.0, 1.0, 1.0)
    assert gap_closed(baseline, baseline, teacher, tokens) == Interval(0.0, 0.0, 0.0)


def test_gap_closed_interval_comes_from_the_same_resamples():
    rng = np.random.default_rng(4)
    tokens = np.full(50, 16)
    teacher = rng.gamma(4.0, 8.0, size=50)
    baseline = teacher + 16 * rng.uniform(0.5, 1.5, size=50)
    student = teacher + 0.25 * (baseline - teacher) + rng.normal(0, 1.0, size=50)
    ci = gap_closed(student, baseline, teacher, tokens)
    expected = (baseline.sum() - student.sum()) / (baseline.sum() - teacher.sum())
    assert ci.estimate == pytest.approx(expected)
    assert ci.low < ci.estimate < ci.high and ci.low > 0.6 and ci.high < 0.9
    # recomputed from the shared resamples by hand
    _, r = resampled_log_ppl(np.stack([student, baseline, teacher]), tokens)
    share = (r[:, 1] - r[:, 0]) / (r[:, 1] - r[:, 2])
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(share, [0.025, 0.975])))


def test_gap_closed_is_undefined_when_the_teacher_is_not_clearly_better():
    tokens = np.ones(4, dtype=int)
    assert gap_closed([1.0] * 4, [2.0] * 4, [2.0] * 4, tokens) is None  # teacher = baseline
    assert gap_closed([1.0] * 4, [2.0, 2.0, 2.0, 2.0], [1.0, 3.0, 1.0, 3.0], tokens) is None  # mixed
    # ahead on average (1.625 < 2 nats) but behind in about a quarter of the resamples
    assert gap_closed([1.8] * 4, [2.0] * 4, [1.0, 3.0, 1.0, 1.5], tokens) is None
    # ahead in all but 5 of 2000 resamples: defined, those 5 counted as unbounded on each side
    teacher = 2.0 + np.random.default_rng(20).normal(-0.25, 0.35, size=12)
    student, baseline = np.full(12, 1.8), np.full(12, 2.0)
    ci = gap_closed(student, baseline, teacher, tokens := np.ones(12, dtype=int))
    _, r = resampled_log_ppl(np.stack([student, baseline, teacher]), tokens)
    gap, share = r[:, 1] - r[:, 2], (r[:, 1] - r[:, 0]) / (r[:, 1] - r[:, 2])
    assert (gap <= 0).sum() == 5
    assert ci.low == pytest.approx(np.quantile(np.where(gap > 0, share, -np.inf), 0.025), rel=1e-12)
    assert ci.high == pytest.approx(np.quantile(np.where(gap > 0, share, np.inf), 0.975), rel=1e-12)
    assert ci.low < ci.estimate < ci.high


def test_vectorised_resamples_match_a_loop_over_the_indices():
    rng = np.random.default_rng(5)
    nll, tokens = rng.gamma(4.0, 8.0, size=(2, 7)), rng.integers(1, 9, size=7)
    estimate, resampled = resampled_log_ppl(nll, tokens, resamples=300, seed=9)
    idx = bootstrap_indices(7, resamples=300, seed=9)
    loop = np.array([[row[i].sum() / tokens[i].sum() for row in nll] for i in idx])
    np.testing.assert_allclose(resampled, loop, rtol=1e-12)
    np.testing.assert_allclose(estimate, nll.sum(1) / tokens.sum())


def test_resamples_are_deterministic_and_chunking_does_not_change_them(monkeypatch):
    a = bootstrap_indices(50, resamples=100, seed=3)
    assert np.array_equal(a, bootstrap_indices(50, resamples=100, seed=3))
    assert not np.array_equal(a, bootstrap_indices(50, resamples=100, seed=4))
    nll, tokens = np.random.default_rng(6).gamma(4.0, 8.0, size=50), np.full(50, 8)
    one_chunk = resampled_log_ppl(nll, tokens, resamples=100, seed=3)[1]
    import distill_core.intervals as intervals

    monkeypatch.setattr(intervals, "_CHUNK_CELLS", 50 * 7)  # 7 resamples per chunk when summing
    np.testing.assert_allclose(resampled_log_ppl(nll, tokens, resamples=100, seed=3)[1], one_chunk, rtol=1e-12)


def test_bad_inputs_are_refused_with_the_fix():
    with pytest.raises(DataError, match="same n >= 1 sequences"):
        paired_comparison([1.0, 2.0], [1.0], [1, 1])
    with pytest.raises(DataError, match="same n >= 1 sequences"):
        perplexity_interval([], [])
    with pytest.raises(DataError, match="finite"):
        perplexity_interval([1.0, float("inf")], [1, 1])
    with pytest.raises(DataError, match="integers >= 1"):
        perplexity_interval([1.0, 2.0], [1, 0])
    with pytest.raises(ConfigError, match="resamples must be >= 1"):
        perplexity_interval([1.0], [1], resamples=0)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        percentile_interval(0.0, np.zeros(3), level=95)


def _bins(count, confidence, correct):
    """Calibration sums [3, bins] of one sequence from per-bin lists."""
    return np.array([count, confidence, correct], dtype=np.float64)


def test_ece_interval_is_the_ece_of_the_summed_bins_and_bounded_by_the_extreme_resamples():
    # sequence 0: perfectly calibrated (ECE 0); sequence 1: 2 positions at 0.9 confidence, both wrong (ECE 0.9)
    stats = np.stack([_bins([2, 0], [1.0, 0.0], [1, 0]), _bins([0, 2], [0.0, 1.8], [0, 0])])
    ci = calibration_interval(stats, resamples=400, seed=0)
    assert ci.estimate == pytest.approx(1.8 / 4)  # |1 − 1| + |1.8 − 0| over 4 positions
    assert (ci.low, ci.high) == (pytest.approx(0.0), pytest.approx(0.9))  # resamples of {0, 0} and {1, 1}
    same = calibration_difference(stats, stats, resamples=400, seed=0)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)


def test_ece_difference_is_paired_and_on_the_resamples_of_the_perplexity():
    rng = np.random.default_rng(0)
    count = rng.integers(5, 20, size=(30, 4)).astype(np.float64)
    conf = count * rng.uniform(0.3, 0.9, size=(30, 4))
    a = np.stack([count, conf, np.round(conf)], 1)  # nearly calibrated
    b = np.stack([count, conf, np.round(conf * 0.5)], 1)  # over-confident on every sequence
    diff = calibration_difference(a, b, resamples=500, seed=3)
    assert diff.high < 0  # a is better calibrated on every resample
    estimate, resampled = resampled_ece(np.stack([a, b]), resamples=500, seed=3)
    idx = bootstrap_indices(30, resamples=500, seed=3)
    again = np.abs(a[idx].sum(1)[:, 1] - a[idx].sum(1)[:, 2]).sum(-1) / a[idx].sum(1)[:, 0].sum(-1)
    np.testing.assert_allclose(resampled[:, 0], again)
    assert diff.estimate == pytest.approx(estimate[0] - estimate[1])
    with pytest.raises(DataError, match="must be \\[models, n >= 1 sequences, 3, bins\\]"):
        calibration_interval(np.zeros((3, 4)))
