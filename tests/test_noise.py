"""Noise models: statistics in [0,1] units, seeding, config errors."""

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from diffusion_modules.diffusion_utils.noise import GaussianNoise, LowDoseCTNoise, RicianNoise, build_noise, noise_at_level


def test_gaussian_std_matches_sigma_and_variance_form():
    clean = np.full((256, 256), 0.5, dtype=np.float32)
    for noise, sigma in [(GaussianNoise(sigma=0.1), 0.1), (GaussianNoise(variance=0.0025), 0.05)]:
        noisy, used = noise(clean, np.random.default_rng(1))
        assert noisy.dtype == np.float32 and used == pytest.approx(sigma)
        assert (noisy - clean).std() == pytest.approx(sigma, rel=0.02)
        assert abs((noisy - clean).mean()) < 0.003
    noisy, _ = GaussianNoise(sigma=0.3)(np.zeros((64, 64)), np.random.default_rng(0))
    assert noisy.min() < -0.3  # not clipped


def test_gaussian_range_and_seeding():
    noise = GaussianNoise(sigma=[0.05, 0.2])
    clean = np.zeros((128, 128), dtype=np.float32)
    used = []
    for seed in range(20):
        noisy, s = noise(clean, np.random.default_rng(seed))
        assert 0.05 <= s <= 0.2
        assert noisy.std() == pytest.approx(s, rel=0.05)
        used.append(s)
    assert max(used) - min(used) > 0.05
    a, sa = noise(clean, np.random.default_rng([7, 3]))
    b, sb = noise(clean, np.random.default_rng([7, 3]))
    assert sa == sb and np.array_equal(a, b)
    lo, hi = GaussianNoise(variance=[0.0025, 0.01]).sigma
    assert (lo, hi) == pytest.approx((0.05, 0.1))


def test_rician_background_and_bright_signal():
    sigma = 0.05
    noisy, used = RicianNoise(sigma)(np.zeros((256, 256)), np.random.default_rng(0))
    assert used == pytest.approx(sigma)
    assert noisy.min() >= 0
    assert noisy.mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.02)
    bright, _ = RicianNoise(sigma)(np.full((256, 256), 0.8), np.random.default_rng(1))
    assert bright.mean() == pytest.approx(math.sqrt(0.8**2 + sigma**2), rel=0.01)
    assert bright.std() == pytest.approx(sigma, rel=0.05)


def test_gaussian_and_rician_draws_are_pinned():
    """float64 normals times sigma, added in float64, cast to float32: the draw the
    evaluation has always scored with (its tables must not change), in this order."""
    clean = np.random.default_rng(5).random((32, 24), dtype=np.float32)
    x = clean.astype(np.float64)
    ref = np.random.default_rng([0, 100000, 3])
    expected = (x + ref.standard_normal(x.shape) * 0.1).astype(np.float32)
    noisy, used = GaussianNoise(0.1)(clean, np.random.default_rng([0, 100000, 3]))
    assert noisy.dtype == np.float32 and np.array_equal(noisy, expected) and used == 0.1
    ref = np.random.default_rng([0, 100000, 3])
    n1 = ref.standard_normal(x.shape) * 0.1
    n2 = ref.standard_normal(x.shape) * 0.1
    expected = np.sqrt((x + n1) ** 2 + n2**2).astype(np.float32)
    noisy, used = RicianNoise(0.1)(clean, np.random.default_rng([0, 100000, 3]))
    assert noisy.dtype == np.float32 and np.array_equal(noisy, expected) and used == 0.1


def test_noise_at_level_names_the_level_parameter():
    assert noise_at_level("gaussian", 0.1).sigma == 0.1
    assert noise_at_level("rician", 0.2).sigma == 0.2
    noise = noise_at_level("lowdose_ct", 2e4, n_angles=30)
    assert (noise.i0, noise.n_angles) == (2e4, 30)
    with pytest.raises(ValueError, match="unknown noise type 'poisson'"):
        noise_at_level("poisson", 0.1)


def water_phantom(size=64):
    """[0,1] CT slice (window -1024..3071 HU): a 0 HU disk with a 1000 HU ring in air."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    radius = np.hypot(yy, xx)
    hu = np.full((size, size), -1024.0)
    hu[radius < size * 0.4] = 0.0
    hu[(radius >= size * 0.35) & (radius < size * 0.4)] = 1000.0
    return ((hu + 1024.0) / 4095.0).astype(np.float32), radius < size * 0.3


def test_lowdose_ct_noise_grows_as_photons_fall():
    clean, inside = water_phantom()
    stds = []
    for i0 in (1e6, 1e5, 1e4):
        noisy, used = LowDoseCTNoise(i0, pixel_mm=2.0, n_angles=90)(clean, np.random.default_rng(0))
        delta = noisy - clean
        assert noisy.dtype == np.float32 and noisy.shape == clean.shape
        assert used == pytest.approx(float(delta.std()), rel=1e-5)
        assert abs(delta[inside].mean()) < 0.2 * delta[inside].std()  # no bias, only noise
        stds.append(delta[inside].std())
    assert stds[0] < stds[1] < stds[2]
    # quantum noise: std ~ 1/sqrt(I0), so a 10x dose cut gives about sqrt(10) more noise
    assert 2.0 < stds[1] / stds[0] < 4.5 and 2.0 < stds[2] / stds[1] < 4.5
    a, _ = LowDoseCTNoise(1e5, n_angles=30)(clean, np.random.default_rng(3))
    b, _ = LowDoseCTNoise(1e5, n_angles=30)(clean, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_lowdose_ct_geometry_from_volume_and_non_square():
    clean, _ = water_phantom(48)
    wide = np.pad(clean, ((0, 0), (8, 8)))
    noise = LowDoseCTNoise([1e4, 1e5], n_angles=30).for_volume({"low": -1024.0, "high": 3071.0}, (0.8, 0.8, 2.0))
    assert noise.pixel_mm == 0.8
    noisy, used = noise(wide, np.random.default_rng(0))
    assert noisy.shape == wide.shape and used > 0
    with pytest.raises(ValueError, match="2-D slice"):
        noise(np.zeros((2, 8, 8)), np.random.default_rng(0))


def test_build_noise_configs():
    assert isinstance(build_noise({"type": "gaussian", "sigma": 0.1}), GaussianNoise)
    assert build_noise(OmegaConf.create({"type": "gaussian", "variance": 0.01})).sigma == pytest.approx(0.1)
    assert isinstance(build_noise({"type": "rician", "sigma": [0.02, 0.1]}), RicianNoise)
    noise = build_noise({"type": "lowdose_ct", "i0": 2e4, "pixel_mm": 0.9})
    assert isinstance(noise, LowDoseCTNoise) and noise.i0 == 2e4


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"type": "poisson", "sigma": 0.1}, "unknown noise type 'poisson'"),
        ({"sigma": 0.1}, "unknown noise type None"),
        ({"type": "gaussian", "sigma": -0.1}, "sigma=-0.1"),
        ({"type": "gaussian", "variance": -1}, "variance=-1"),
        ({"type": "gaussian", "sigma": [0.2, 0.1]}, "0 <= lo <= hi"),
        ({"type": "gaussian", "sigma": 0.1, "variance": 0.01}, "exactly one"),
        ({"type": "gaussian"}, "exactly one"),
        ({"type": "rician", "sigma": float("nan")}, "sigma=nan"),
        ({"type": "lowdose_ct", "i0": -5}, "i0=-5"),
        ({"type": "lowdose_ct", "i0": 0}, "i0=0"),
        ({"type": "rician", "level": 0.1}, "bad parameters ['level']"),
    ],
)
def test_build_noise_rejects_bad_config(cfg, message):
    with pytest.raises(ValueError) as err:
        build_noise(cfg)
    assert message in str(err.value)
