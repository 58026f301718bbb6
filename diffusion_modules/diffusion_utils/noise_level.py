"""Estimating the noise level of a noisy image (``denoise.py --sigma auto``).

The estimate is Donoho's: the median absolute value of the finest diagonal wavelet
coefficients (one level of a 2-D ``db2`` transform; coefficients exactly 0 left out)
divided by 0.6745, the std of white Gaussian noise; without a foreground it equals
scikit-image's ``estimate_sigma``.

MR magnitude images carry Rician noise: where the signal is zero it is Rayleigh-shaped
with a std of only 0.655 sigma, so the whole-slice estimate comes out low (by 9-30 % on
the bundled volumes, docs/RESULTS.md). With ``foreground=True`` only the coefficients
whose local mean (the approximation coefficient / 2) exceeds 4 times the whole-slice
estimate count, where Rician noise is close to Gaussian with std sigma.

A sigma below :func:`negligible_sigma` (half the noise level of a model's smallest
timestep) is no measurable noise for that model: ``denoise.py`` treats it as 0.
"""
from __future__ import annotations

import numpy as np

#: median |N(0, 1)| (scipy.stats.norm.ppf(0.75)): turns a median absolute deviation into a std
MAD_TO_STD = 0.6744897501960817
#: fewest foreground coefficients for the foreground estimate; fewer: whole slice
MIN_FOREGROUND = 64
#: sigma below this fraction of the noise level of a model's smallest timestep counts as 0
NEGLIGIBLE_FRACTION = 0.5


def negligible_sigma(diffusion) -> float:
    """The sigma ([0,1] scale) below which a model has no measurable noise to remove:
    NEGLIGIBLE_FRACTION of the noise of its smallest timestep t=0, sqrt((1 - a_bar_0) / a_bar_0)
    in model units ([-1, 1], twice the [0,1] scale). ``diffusion``: the model's GaussianDiffusion
    (anything with ``sqrt_recipm1_alphas_cumprod``). Shipped model: 0.5 * 0.0100 / 2 = 0.0025."""
    return NEGLIGIBLE_FRACTION * float(diffusion.sqrt_recipm1_alphas_cumprod[0]) / 2.0


def wavelet_sigma(image01: np.ndarray, foreground: bool = False) -> float:
    """Noise std of a 2-D image on its own scale ([0,1] images: the [0,1] scale)."""
    import pywt

    image = np.asarray(image01, dtype=np.float64)
    if image.ndim != 2 or min(image.shape) < 4:
        raise ValueError(f"noise estimate needs a 2-D image of at least 4 x 4 pixels, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("noise estimate: the image contains NaN or inf values")
    approx, (_, _, diagonal) = pywt.dwt2(image, "db2")
    counted = diagonal != 0  # exactly zero: a region without noise (e.g. zero-filled background)
    if not counted.any():
        return 0.0
    sigma = float(np.median(np.abs(diagonal[counted])) / MAD_TO_STD)
    if not foreground:
        return sigma
    inside = (approx / 2.0 > 4.0 * sigma) & counted
    if inside.sum() < MIN_FOREGROUND:
        return sigma
    return float(np.median(np.abs(diagonal[inside])) / MAD_TO_STD)


def estimate_noise_sigma(slices01: np.ndarray, foreground: bool = False, max_slices: int = 32) -> float:
    """Noise std of a stack of 2-D slices (S, H, W) or one slice (H, W): the median of
    ``wavelet_sigma`` over up to ``max_slices`` evenly spaced slices (robust to a few
    odd slices). ``foreground=True`` for MR magnitude (Rician) images."""
    slices01 = np.asarray(slices01)
    if slices01.ndim == 2:
        return wavelet_sigma(slices01, foreground)
    picks = np.unique(np.linspace(0, len(slices01) - 1, min(max_slices, len(slices01))).round().astype(int))
    return float(np.median([wavelet_sigma(slices01[i], foreground) for i in picks]))
