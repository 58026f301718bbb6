"""Paired statistics for per-slice scores: is method A better than method B on the same slices?

``paired_comparison(a, b)`` takes two equally long sequences of scores of the same slices
(e.g. the PSNR of a diffusion model and of BM3D) and reports the mean difference a - b, its
percentile bootstrap interval (ours: seeded, vectorised numpy; resampling slices, i.e. the
paired differences), the two-sided Wilcoxon signed-rank p-value (scipy) and a verdict that
says "better" or "worse" only when the interval excludes zero.

Slices of one volume are correlated, so the interval treats them as more independent
evidence than they are; compare across volumes (or report per volume) before leaning on a
small margin.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import wilcoxon

VERDICTS = ("better", "worse", "no clear difference")
#: at most this many indices are drawn at once (memory: 8 bytes each)
_BLOCK_ELEMENTS = 2_000_000


def bootstrap_mean_interval(d: np.ndarray, n_boot: int = 10000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``d`` (1-D): ``n_boot`` resamples with
    replacement from ``np.random.default_rng(seed)``, the (1 - confidence)/2 and
    (1 + confidence)/2 quantiles (linear interpolation) of their means. NaN for fewer than
    two values (one value has no spread to resample)."""
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n_boot, block):
        m = min(block, n_boot - start)
        means[start:start + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the differences ``d`` (scipy's defaults: zero
    differences dropped, exact distribution for small samples without ties); NaN when no
    difference is non-zero (nothing to rank) or scipy cannot compute one."""
    d = np.asarray(d, dtype=np.float64)
    if np.count_nonzero(d) == 0:
        return math.nan
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(wilcoxon(d, alternative="two-sided").pvalue)
    except ValueError:
        return math.nan
    return p


def paired_comparison(a, b, n_boot: int = 10000, confidence: float = 0.95, seed: int = 0, *,
                      higher_is_better: bool = True) -> dict:
    """Compare paired per-slice scores ``a`` (method A) and ``b`` (method B).

    Returns a dict: ``n``; ``mean_a``, ``mean_b``; ``mean_diff`` = mean(a - b) (the
    differences summed with ``math.fsum``); ``ci_low``, ``ci_high`` the percentile bootstrap
    interval of the mean difference at ``confidence`` (NaN for n < 2); ``confidence``,
    ``n_boot``, ``seed``; ``p_wilcoxon`` (two-sided, NaN when every difference is zero);
    ``verdict``: "better" when the interval lies above zero, "worse" below, else "no clear
    difference" (swapped when ``higher_is_better`` is False, e.g. for an RMSE).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D score sequences of the same slices, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("a and b are empty: nothing to compare")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a and b must be finite (a NaN or inf score would hide a failed slice)")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    d = a - b
    n = int(d.size)
    low, high = bootstrap_mean_interval(d, int(n_boot), confidence, seed)
    if low > 0:
        verdict = "better" if higher_is_better else "worse"
    elif high < 0:
        verdict = "worse" if higher_is_better else "better"
    else:  # includes zero, or NaN (n < 2)
        verdict = "no clear difference"
    return {"n": n, "mean_a": math.fsum(a) / n, "mean_b": math.fsum(b) / n, "mean_diff": math.fsum(d) / n,
            "ci_low": low, "ci_high": high, "confidence": confidence, "n_boot": int(n_boot), "seed": seed,
            "p_wilcoxon": wilcoxon_p(d), "verdict": verdict}
