"""metrics.statistics.paired_comparison against scipy and hand computations: the mean
difference, the percentile bootstrap interval (scipy.stats.bootstrap, coverage), the
Wilcoxon signed-rank p-value (scipy, exact enumeration) and the verdict."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from metrics.statistics import bootstrap_mean_interval, paired_comparison, wilcoxon_p


def scores(n=40, shift=0.3, seed=0):
    rng = np.random.default_rng(seed)
    b = 30 + 2 * rng.standard_normal(n)  # e.g. BM3D PSNR per slice
    return b + shift + 0.8 * rng.standard_normal(n), b


def test_mean_difference_is_exact():
    a = np.array([31.25, 29.5, 30.125, 28.0, 33.375])
    b = np.array([30.0, 30.0, 29.875, 28.5, 32.0])
    r = paired_comparison(a, b)
    assert r["mean_diff"] == (1.25 - 0.5 + 0.25 - 0.5 + 1.375) / 5 == 0.375
    assert r["n"] == 5 and r["mean_a"] == float(np.mean(a)) and r["mean_b"] == float(np.mean(b))
    a, b = scores(1000)
    exact = sum(Fraction(x) - Fraction(y) for x, y in zip(a, b)) / 1000
    diffs = a - b  # each a float; the mean of those is what we sum exactly
    exact_of_diffs = sum(Fraction(x) for x in diffs) / 1000
    assert paired_comparison(a, b, n_boot=10)["mean_diff"] == pytest.approx(float(exact), rel=1e-13)
    assert abs(paired_comparison(a, b, n_boot=10)["mean_diff"] - float(exact_of_diffs)) <= 2 * math.ulp(float(exact))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bootstrap_interval_matches_scipy(seed):
    a, b = scores(40, seed=seed)
    d = a - b
    ours = paired_comparison(a, b, n_boot=20000, seed=seed)
    ref = stats.bootstrap((d,), np.mean, n_resamples=20000, confidence_level=0.95, method="percentile",
                          rng=np.random.default_rng(100 + seed)).confidence_interval
    se = d.std(ddof=1) / math.sqrt(d.size)
    # each end is a Monte-Carlo quantile estimate with sd ~0.02 se at 20000 resamples
    assert abs(ours["ci_low"] - ref.low) < 0.12 * se
    assert abs(ours["ci_high"] - ref.high) < 0.12 * se
    # and both are close to the normal-theory interval mean +- 1.96 se (n = 40, near-Normal data)
    assert abs(ours["ci_low"] - (d.mean() - 1.96 * se)) < 0.2 * se
    # seeded: the same call gives the same interval; another seed another (slightly)
    again = paired_comparison(a, b, n_boot=20000, seed=seed)
    assert (again["ci_low"], again["ci_high"]) == (ours["ci_low"], ours["ci_high"])
    assert paired_comparison(a, b, n_boot=20000, seed=seed + 7)["ci_low"] != ours["ci_low"]


def test_bootstrap_blocks_do_not_change_the_draws(monkeypatch):
    """The resamples are drawn in blocks to bound memory; numpy's bounded integers come from
    the same stream however they are split, so the interval is the same, and large n works."""
    import metrics.statistics as st

    d = scores(50)[0] - scores(50)[1]
    whole = bootstrap_mean_interval(d, 3000, 0.9, seed=4)
    monkeypatch.setattr(st, "_BLOCK_ELEMENTS", 50 * 7)  # blocks of 7 resamples
    assert bootstrap_mean_interval(d, 3000, 0.9, seed=4) == whole
    low, high = bootstrap_mean_interval(np.random.default_rng(0).standard_normal(100000), 50, 0.95)
    assert low < high and abs(low) < 0.02 and abs(high) < 0.02


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(12345)
    true_mean, reps, hits = 0.4, 300, 0
    for i in range(reps):
        d = true_mean + rng.standard_normal(30)
        r = paired_comparison(d, np.zeros(30), n_boot=2000, seed=i)
        hits += r["ci_low"] <= true_mean <= r["ci_high"]
    # the percentile interval undercovers a little at n = 30 (about 93-94 %); 300 repetitions: sd 1.3 %
    assert 0.89 <= hits / reps <= 0.985


def test_wilcoxon_p_equals_scipy_and_exact_enumeration():
    a, b = scores(25, shift=0.5)
    assert paired_comparison(a, b)["p_wilcoxon"] == stats.wilcoxon(a, b).pvalue
    # small known example: d = [1, -2, 3, 4, 5], ranks 1..5, T- = 2
    d = np.array([1.0, -2.0, 3.0, 4.0, 5.0])
    # by hand: P(T- <= 2) = #{subsets of ranks with sum <= 2: {}, {1}, {2}} / 2^5 = 3/32; two-sided 6/32
    assert paired_comparison(d, np.zeros(5))["p_wilcoxon"] == pytest.approx(0.1875, abs=1e-12)
    # by enumeration of all 2^n sign patterns, for several sizes (no ties, no zeros)
    rng = np.random.default_rng(3)
    for n in (3, 6, 9, 12):
        d = rng.permutation(np.arange(1, n + 1)) * rng.choice([-1, 1], n) + 0.1 * rng.standard_normal(n)
        ranks = stats.rankdata(np.abs(d))
        t_plus = ranks[d > 0].sum()
        sums = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=n)])
        exact = min(1.0, 2 * min((sums <= t_plus).mean(), (sums >= t_plus).mean()))
        assert wilcoxon_p(d) == pytest.approx(exact, rel=1e-12, abs=1e-15)
        assert wilcoxon_p(d) == stats.wilcoxon(d).pvalue


def test_degenerate_inputs_give_nan_not_a_crash():
    same = np.array([30.0, 31.0, 29.5])
    r = paired_comparison(same, same)
    assert math.isnan(r["p_wilcoxon"]) and r["mean_diff"] == 0.0
    assert (r["ci_low"], r["ci_high"]) == (0.0, 0.0) and r["verdict"] == "no clear difference"
    one = paired_comparison([31.0], [30.0])
    assert one["n"] == 1 and one["mean_diff"] == 1.0
    assert math.isnan(one["ci_low"]) and math.isnan(one["ci_high"]) and one["verdict"] == "no clear difference"
    assert one["p_wilcoxon"] == stats.wilcoxon([1.0]).pvalue  # n = 1: exact p = 1
    with pytest.raises(ValueError, match="same slices"):
        paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="empty"):
        paired_comparison([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_comparison([1.0, 2.0], [0.0, 0.0], confidence=95)


def test_verdict_needs_an_interval_that_excludes_zero():
    a, b = scores(60, shift=1.0)
    r = paired_comparison(a, b)
    assert r["ci_low"] > 0 and r["verdict"] == "better"
    assert paired_comparison(b, a)["verdict"] == "worse"
    assert paired_comparison(a, b, higher_is_better=False)["verdict"] == "worse"  # e.g. RMSE
    a, b = scores(60, shift=0.0, seed=5)
    r = paired_comparison(a, b)
    assert r["ci_low"] <= 0 <= r["ci_high"] and r["verdict"] == "no clear difference"
