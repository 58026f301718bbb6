"""The noise-level estimate of ``--sigma auto``: equal to scikit-image's estimate_sigma on
the whole slice, and, over the foreground, close to the true sigma of Rician noise where
the whole-slice estimate is biased low by the Rayleigh background."""
import numpy as np
import pytest
from skimage.restoration import estimate_sigma

from diffusion_modules.diffusion_utils.noise import noise_at_level
from diffusion_modules.diffusion_utils.noise_level import estimate_noise_sigma, wavelet_sigma


def phantom(n=256):
    """A head-like disc of smooth intensity 0.5-0.8 on a zero background (half the slice)."""
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    disc = x ** 2 + y ** 2 < 0.55
    return np.where(disc, 0.65 + 0.15 * np.cos(3 * x) * np.sin(2 * y), 0.0)


def test_whole_slice_estimate_is_scikit_images():
    rng = np.random.default_rng(0)
    for sigma in (0.02, 0.1, 0.3):
        noisy = phantom() + rng.normal(0, sigma, (256, 256))
        assert wavelet_sigma(noisy) == pytest.approx(estimate_sigma(noisy), rel=1e-9)


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.2])
def test_foreground_estimate_recovers_rician_sigma(sigma):
    rng = np.random.default_rng(1)
    clean = phantom()
    noisy = np.stack([noise_at_level("rician", sigma)(clean, rng)[0] for _ in range(4)])
    whole, fg = estimate_noise_sigma(noisy), estimate_noise_sigma(noisy, foreground=True)
    assert whole < 0.9 * sigma                       # the Rayleigh background pulls the whole-slice estimate down
    assert fg == pytest.approx(sigma, rel=0.06)


def test_gaussian_noise_is_estimated_alike_with_and_without_foreground():
    rng = np.random.default_rng(2)
    noisy = phantom() + rng.normal(0, 0.1, (256, 256))
    assert wavelet_sigma(noisy, foreground=True) == pytest.approx(0.1, rel=0.06)
    assert wavelet_sigma(noisy) == pytest.approx(0.1, rel=0.06)


def test_without_foreground_falls_back_to_the_whole_slice():
    noisy = np.random.default_rng(3).normal(0, 0.1, (64, 64))   # pure noise: no coefficient above 4 sigma
    assert wavelet_sigma(noisy, foreground=True) == wavelet_sigma(noisy)


def test_a_noiseless_slice_has_sigma_zero():
    assert wavelet_sigma(np.zeros((32, 32))) == 0.0


def test_bad_images_name_the_problem():
    with pytest.raises(ValueError, match="NaN or inf"):
        wavelet_sigma(np.full((16, 16), np.nan))
    with pytest.raises(ValueError, match="2-D image of at least 4 x 4"):
        wavelet_sigma(np.zeros((2, 16)))
