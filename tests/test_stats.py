"""metrics.py's paired statistics, checked against hand computations on small tables."""
import math

import pytest
import torch

from metrics import (
    BOOTSTRAP_BLOCK,
    binomial_two_sided_p,
    bootstrap_interval,
    mcnemar_p,
    paired_bootstrap,
    sign_test_p,
)


def hand_quantile(sorted_values, q):
    """Linear interpolation between order statistics (numpy.percentile's default), by hand."""
    pos = q * (len(sorted_values) - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + frac * (sorted_values[hi] - sorted_values[lo])


def test_bootstrap_interval_by_hand():
    """Five resamples of three values: the documented draws, their means and the percentiles, by hand."""
    values, R = [0.0, 1.0, 3.0], 5
    rows = torch.randint(0, 3, (R, 3), generator=torch.Generator().manual_seed(7)).tolist()  # the documented draws
    means = sorted(sum(values[i] for i in row) / 3 for row in rows)
    result = bootstrap_interval(values, n_resamples=R, seed=7, confidence=0.8)
    assert result["mean"] == 4 / 3 and result["n"] == 3
    assert result["interval"] == pytest.approx([hand_quantile(means, 0.1), hand_quantile(means, 0.9)], abs=1e-12)


def test_exactly_known_intervals():
    # every resample of identical values has the same mean: a zero-width interval
    assert bootstrap_interval([0.25] * 7, n_resamples=50)["interval"] == [0.25, 0.25]
    # two values 0, 1: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% points are the extremes (far beyond sampling noise with 2,000 resamples)
    assert bootstrap_interval([0.0, 1.0], n_resamples=2000)["interval"] == [0.0, 1.0]


def test_paired_bootstrap_keeps_pairs_together():
    a = [0.1, 0.9, 0.4, 0.7, 0.2, 0.8]
    b = [x + 0.05 for x in a]  # b beats a by exactly 0.05 on every question
    result = paired_bootstrap(a, b, n_resamples=300, seed=3)
    assert result["mean_diff"] == pytest.approx(0.05) and result["mean_b"] - result["mean_a"] == pytest.approx(0.05)
    assert result["interval_diff"] == pytest.approx([0.05, 0.05])  # paired: no spread at all
    low, high = result["interval_a"]
    assert high - low > 0.2  # while each side alone varies a lot
    assert result["interval_b"] == pytest.approx([low + 0.05, high + 0.05])  # same resamples for both sides


def test_bootstrap_is_deterministic_given_the_seed():
    a = [float(i % 3) for i in range(40)]
    b = [float(i % 5) for i in range(40)]
    assert paired_bootstrap(a, b, n_resamples=BOOTSTRAP_BLOCK + 7, seed=1) == \
        paired_bootstrap(a, b, n_resamples=BOOTSTRAP_BLOCK + 7, seed=1)
    assert paired_bootstrap(a, b, n_resamples=200, seed=1) != paired_bootstrap(a, b, n_resamples=200, seed=2)


def test_sign_test_by_hand():
    a = [0.0] * 12
    b = [1.0] * 7 + [-1.0] * 2 + [0.0] * 3  # 7 wins, 2 losses, 3 ties (dropped): n = 9, k = 2
    expected = 2 * (math.comb(9, 0) + math.comb(9, 1) + math.comb(9, 2)) / 2 ** 9  # 92 / 512
    assert sign_test_p(a, b) == expected == 0.1796875
    assert sign_test_p(b, a) == expected  # two-sided: symmetric
    assert sign_test_p([1.0, 2.0], [1.0, 2.0]) == 1.0  # all tied
    assert binomial_two_sided_p(3, 6) == 1.0  # a balanced count: capped at 1
    assert binomial_two_sided_p(0, 2000) == 2 / 2 ** 2000  # exact for large n (no float overflow)


def test_mcnemar_by_hand():
    a = [1, 1, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [1, 0, 1, 1, 1, 1, 1, 1, 0, 0]  # discordant: b right a wrong 5 times, a right b wrong 2 times
    expected = 2 * sum(math.comb(7, i) for i in range(3)) / 2 ** 7  # 58 / 128
    assert mcnemar_p(a, b) == expected
    assert mcnemar_p([True, False], [True, False]) == 1.0  # no discordant pairs
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_p([0.5, 1], [1, 0])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one entry per question"):
        paired_bootstrap([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="finite"):
        sign_test_p([float("nan")], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0, 2.0], confidence=95)
