"""Training augmentation (augment.py) and the MR foreground window (utils.intensity)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import ndimage as ndi

from diffusion_modules.diffusion_utils.augment import Augmentation
from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
from diffusion_modules.diffusion_utils.hdf5dataset import HDF5PatchDataset
from diffusion_modules.diffusion_utils.noise import GaussianNoise
from synthetic import make_volume, write_h5
from utils.intensity import mr_foreground, normalize

FULL = {"flips": True, "rescale": [0.5, 2.0], "gamma": [0.7, 1.4], "contrast": [0.9, 1.1], "brightness": [-0.05, 0.05]}


def old_augment_pair(clean, rng):
    """The flips/rot90 of HDF5PatchDataset before augment.py, kept verbatim as the reference."""
    if rng.random() < 0.5:
        clean = clean[:, ::-1]
    if rng.random() < 0.5:
        clean = clean[::-1, :]
    if clean.shape[0] == clean.shape[1]:
        clean = np.rot90(clean, k=int(rng.integers(4)))
    return np.ascontiguousarray(clean)


def lag1_correlation(residuals) -> float:
    """Mean of the horizontal and vertical neighbouring-pixel correlations."""
    r = np.stack(residuals)
    h = np.corrcoef(r[:, :, 1:].ravel(), r[:, :, :-1].ravel())[0, 1]
    v = np.corrcoef(r[:, 1:, :].ravel(), r[:, :-1, :].ravel())[0, 1]
    return float((h + v) / 2)


class PerSliceGaussian:
    """A per-slice noise model (like low-dose CT) that is just Gaussian, for fast tests."""

    per_slice = True

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, clean01, rng):
        return (clean01 + self.sigma * rng.standard_normal(clean01.shape)).astype(np.float32), self.sigma


@pytest.mark.parametrize("per_slice", [False, True])
def test_rescale_keeps_noise_white_at_sigma(tmp_path, per_slice):
    f = write_h5(tmp_path / "flat.h5", np.full((2, 96, 96), 0.5))
    noise = PerSliceGaussian(0.1) if per_slice else GaussianNoise(sigma=0.1)
    ds = HDF5PatchDataset([f], noise=noise, noise_seed=0, augment=FULL)
    residuals = [((ds[i]["x_cond"] - ds[i]["x_prior"])[0] / 2).numpy() for i in range(len(ds))]
    assert np.std(residuals) == pytest.approx(0.1, rel=0.03)
    assert abs(lag1_correlation(residuals)) < 0.05
    # control: the same rescale applied to noise (noise added before it) would colour it
    rng = np.random.default_rng(1)
    for factor in (0.5, 2.0):
        coloured = Augmentation(rescale=[factor, factor])(0.5 + 0.1 * rng.standard_normal((64, 64)), rng)
        assert lag1_correlation([coloured - 0.5]) > 0.25


def test_antialiased_downscale_of_checkerboard_does_not_alias():
    board = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)
    out = Augmentation(rescale=[0.6, 0.6])(board, np.random.default_rng(0))
    assert out.shape == board.shape and out.dtype == np.float32
    assert abs(out.mean() - 0.5) < 0.01 and out.std() < 0.05  # the mean stays, the amplitude drops (from 0.5)
    aliased = ndi.zoom(board, 0.6, order=3, mode="mirror")  # no prefilter: a strong moire pattern
    assert aliased.std() > 0.2


def test_rescale_reads_neighbouring_anatomy_from_the_slice(tmp_path):
    ramp = np.tile(np.linspace(0.0, 1.0, 128), (1, 128, 1))  # value = column / 127
    f = write_h5(tmp_path / "ramp.h5", ramp, size=32, stride=16)
    base = HDF5PatchDataset([f], noise=GaussianNoise(sigma=0.0))
    index = next(i for i in range(len(base)) if tuple(base.meta[0]["origin"][base.rows[i][1]]) == (48, 48))
    patch = (base[index]["x_prior"][0].numpy() + 1) / 2
    shrunk = HDF5PatchDataset([f], noise=GaussianNoise(sigma=0.0), augment={"rescale": [0.5, 0.5]})
    wide = (shrunk[index]["x_prior"][0].numpy() + 1) / 2
    slope = np.diff(patch, axis=1).mean()
    np.testing.assert_allclose(np.diff(wide, axis=1), 2 * slope, atol=1e-3)  # twice the columns per pixel: real content
    assert wide.min() < patch.min() - 0.1 and wide.max() > patch.max() + 0.1  # beyond the patch, no reflection
    assert abs(wide.mean() - patch.mean()) < 1e-3
    zoomed = HDF5PatchDataset([f], noise=GaussianNoise(sigma=0.0), augment={"rescale": [2.0, 2.0]})
    inside = (zoomed[index]["x_prior"][0].numpy() + 1) / 2
    np.testing.assert_allclose(np.diff(inside, axis=1), slope / 2, atol=1e-3)
    assert inside.min() >= patch.min() - 1e-3 and inside.max() <= patch.max() + 1e-3


def test_gamma_contrast_brightness_follow_their_formulas():
    rng = np.random.default_rng(0)
    x = rng.random((32, 32)).astype(np.float32)
    x[0, :2] = 0.0, 1.0
    np.testing.assert_allclose(Augmentation(gamma=[0.8, 0.8])(x, rng), x**0.8, rtol=1e-6)
    np.testing.assert_allclose(Augmentation(contrast=[1.1, 1.1], brightness=[0.05, 0.05])(x, rng),
                               np.clip(1.1 * x + 0.05, 0, 1), atol=1e-6)
    aug = Augmentation(gamma=[0.7, 1.4], contrast=[0.9, 1.1], brightness=[-0.05, 0.05])
    for seed in range(20):
        p = aug.draw(np.random.default_rng(seed), x.shape)
        assert 0.7 <= p["g"] <= 1.4 and 0.9 <= p["a"] <= 1.1 and -0.05 <= p["b"] <= 0.05
        out = aug(x, np.random.default_rng(seed))
        assert out.min() >= 0.0 and out.max() <= 1.0
        np.testing.assert_allclose(out, np.clip(p["a"] * x ** p["g"] + p["b"], 0, 1), atol=1e-6)


def test_same_seed_gives_the_same_augmented_item(tmp_path):
    f = make_volume(tmp_path / "brain_mr.nii.gz", "mr")
    from utils.create_training_images import save_as_hdf5

    h5 = save_as_hdf5(f, "mr", tmp_path, image_size=16, stride=8, progress=False)
    a = HDF5PatchDataset([h5], noise=GaussianNoise(sigma=0.1), noise_seed=4, augment=FULL)
    b = HDF5PatchDataset([h5], noise=GaussianNoise(sigma=0.1), noise_seed=4, augment=FULL, in_memory=True)
    for i in (0, 5, len(a) - 1):
        first, again, other = a[i], a[i], b[i]
        for key in ("x_cond", "x_prior"):
            assert torch.equal(first[key], again[key]) and torch.equal(first[key], other[key])
    x = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    aug = Augmentation.from_config(FULL)
    np.testing.assert_array_equal(aug(x, np.random.default_rng(7)), aug(x, np.random.default_rng(7)))
    assert not np.array_equal(aug(x, np.random.default_rng(7)), aug(x, np.random.default_rng(8)))


def test_booleans_keep_the_old_flips(tmp_path):
    for seed in range(12):
        for shape in ((16, 16), (12, 20)):
            x = np.random.default_rng(seed).random(shape).astype(np.float32)
            r_old, r_new = np.random.default_rng(seed), np.random.default_rng(seed)
            np.testing.assert_array_equal(Augmentation.from_config(True)(x, r_new), old_augment_pair(x, r_old))
            assert r_old.random() == r_new.random()  # the same draws were used
    assert not Augmentation.from_config(False) and not Augmentation.from_config(None)
    f = write_h5(tmp_path / "v.h5", np.random.default_rng(1).random((2, 64, 64)))
    plain = HDF5PatchDataset([f], noise=GaussianNoise(sigma=0.0))
    for noise in (GaussianNoise(sigma=0.1), PerSliceGaussian(0.1)):
        new = HDF5PatchDataset([f], noise=noise, noise_seed=3, augment=True)
        off = HDF5PatchDataset([f], noise=noise, noise_seed=3, augment=False)
        for i in range(0, len(new), 7):
            row = int(new.rows[i][1])
            clean = plain._array(0, "patches")[row].astype(np.float32) / 65535.0
            rng = np.random.default_rng([3, i])
            if getattr(noise, "per_slice", False):  # old: noisy patch, then the same flips on both
                z, (r, c) = int(new.meta[0]["slice_index"][row]), new.meta[0]["origin"][row]
                if new._slice_noise.get((0, z)):
                    rng.integers(1)  # a cached slice: the item's rng picks among the cached realisations
                item = new[i]
                noisy = clean + new._slice_noise[(0, z)][0][0][r : r + 32, c : c + 32]
                state = rng.bit_generator.state
                clean = old_augment_pair(clean, rng)
                rng.bit_generator.state = state
                noisy = old_augment_pair(noisy, rng)
            else:
                item = new[i]
                clean = old_augment_pair(clean, rng)
                noisy, _ = noise(clean, rng)
            np.testing.assert_array_equal(item["x_prior"][0].numpy(), 2 * clean - 1)
            np.testing.assert_array_equal(item["x_cond"][0].numpy(), (2 * np.asarray(noisy, np.float32) - 1))
            assert torch.equal(off[i]["x_prior"], plain[i]["x_prior"])


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"flip": True}, "unknown augment key(s) ['flip']"),
        ({"flips": "yes"}, "augment.flips"),
        ({"rescale": [2.0, 0.5]}, "augment.rescale"),
        ({"rescale": [0.01, 2.0]}, "augment.rescale"),
        ({"gamma": [0.0, 1.0]}, "augment.gamma"),
        ({"contrast": "strong"}, "augment.contrast"),
        ({"contrast": [1.0]}, "augment.contrast"),
        ({"brightness": [-2.0, 0.0]}, "augment.brightness"),
        ({"brightness": [float("nan"), 0.0]}, "augment.brightness"),
        ("yes", "augment='yes'"),
    ],
)
def test_bad_augment_config_raises_naming_the_key(tmp_path, augment, message):
    with pytest.raises(ValueError) as err:
        DenoisingDataModule(volumes=[str(tmp_path / "x_mr.nii.gz")], cache_dir=str(tmp_path), augment=augment)
    assert message in str(err.value)


def test_datamodule_augments_training_only(tmp_path):
    vol = make_volume(tmp_path / "brain_mr.nii.gz", "mr")
    cfg = OmegaConf.create({"augment": FULL})
    dm = DenoisingDataModule(volumes=[str(vol)], cache_dir=str(tmp_path / "c"), image_size=16, stride=8,
                             split={"mode": "slab", "fractions": [0.6, 0.2, 0.2], "gap": 2}, augment=cfg.augment)
    dm.setup()
    assert dm.train_set.augment.config() == FULL
    assert not dm.val_set.augment
    assert DenoisingDataModule(volumes=[str(vol)], augment=True).augment.config() == {"flips": True}


def synthetic_head(background_sigma=0.0, seed=0):
    """(X, Y, Z) MR head in scanner units, a slab cut through it along Z (open at both Z faces):
    bright scalp ring, dark (nonzero) skull, grey/white brain, dark ventricles."""
    yy, xx = np.mgrid[:96, :96] - 47.5
    rad = np.hypot(xx / 40, yy / 44)
    slice_ = np.zeros((96, 96))
    slice_[rad < 1.0] = 700.0  # scalp / fat
    slice_[rad < 0.9] = 40.0  # skull: dark but nonzero
    slice_[rad < 0.8] = 450.0  # grey matter
    slice_[rad < 0.6] = 600.0  # white matter
    slice_[np.hypot(xx / 10, yy / 16) < 1.0] = 120.0  # ventricles
    head = np.repeat(slice_[:, :, None], 12, axis=2)
    if background_sigma:
        rng = np.random.default_rng(seed)
        floor = np.hypot(*(background_sigma * rng.standard_normal((2,) + head.shape)))  # Rician (Rayleigh) floor
        head = np.where(head == 0, floor, head)
    return head.astype(np.float32)


def test_mr_window_does_not_depend_on_a_noisy_background():
    clean, noisy = synthetic_head(), synthetic_head(background_sigma=25.0)
    _, new_clean = normalize(clean, "mr")
    _, new_noisy = normalize(noisy, "mr")
    span = new_clean["high"] - new_clean["low"]
    assert abs(new_noisy["low"] - new_clean["low"]) < 0.01 * span
    assert abs(new_noisy["high"] - new_clean["high"]) < 0.01 * span
    old_clean = np.percentile(clean[clean != 0], (0.5, 99.5))
    old_noisy = np.percentile(noisy[noisy != 0], (0.5, 99.5))
    assert old_clean[0] - old_noisy[0] > 0.04 * span  # the old nonzero rule moves with the background
    # a zero background removes nothing: exactly the old nonzero-voxel window
    assert np.array_equal(mr_foreground(clean), clean != 0)
    assert (new_clean["low"], new_clean["high"]) == tuple(old_clean)
    assert not mr_foreground(noisy)[0, 0, 0] and mr_foreground(noisy)[47, 47, 0]
