"""ImageMetrics against scikit-image and hand-computed cases; body_mask."""

import re

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from metrics.image_metrics import ImageMetrics, body_mask


@pytest.fixture
def metrics():
    return ImageMetrics()


@pytest.mark.parametrize("data_range, offset", [(1.0, 0.0), (255.0, 0.0), (4095.0, -1024.0)])
def test_unmasked_scores_equal_skimage(metrics, data_range, offset):
    rng = np.random.default_rng(0)
    gt = offset + rng.random((3, 40, 48)) * data_range
    pred = gt + rng.normal(0, 0.05 * data_range, gt.shape)
    out = metrics.image_scores(gt, pred, dynamic_range=data_range)
    for i in range(3):
        assert out["per_image"]["psnr"][i] == pytest.approx(
            peak_signal_noise_ratio(gt[i], pred[i], data_range=data_range), rel=1e-12)
        assert out["per_image"]["ssim"][i] == pytest.approx(
            structural_similarity(gt[i], pred[i], data_range=data_range), rel=1e-12)
        assert out["per_image"]["mae"][i] == pytest.approx(np.mean(np.abs(gt[i] - pred[i])))
    assert out["psnr"] == pytest.approx(np.mean(out["per_image"]["psnr"]))
    assert out["ssim"] == pytest.approx(np.mean(out["per_image"]["ssim"]))


def test_known_mse_gives_psnr_formula(metrics):
    gt = np.full((16, 16), 0.5)
    pred = gt + 0.1  # MSE = 0.01 everywhere
    out = metrics.image_scores(gt, pred)
    assert out["psnr"] == pytest.approx(10 * np.log10(1.0 / 0.01))
    assert out["mae"] == pytest.approx(0.1)
    hu = metrics.image_scores(gt * 4095, pred * 4095, dynamic_range=4095.0)
    assert hu["psnr"] == pytest.approx(20.0)
    assert hu["mae"] == pytest.approx(409.5)


def test_constant_images(metrics):
    gt = np.full((12, 12), 0.3)
    same = metrics.image_scores(gt, gt.copy())
    assert same["psnr"] == float("inf")
    assert same["ssim"] == pytest.approx(1.0)
    assert same["mae"] == 0.0
    other = metrics.image_scores(gt, np.full((12, 12), 0.7))
    assert other["psnr"] == pytest.approx(10 * np.log10(1 / 0.16))
    assert other["mae"] == pytest.approx(0.4)
    # SSIM of two constants: luminance term only, (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    c1 = (0.01 * 1.0) ** 2
    assert other["ssim"] == pytest.approx((2 * 0.3 * 0.7 + c1) / (0.3**2 + 0.7**2 + c1), rel=1e-6)


def test_mask_restricts_region(metrics):
    rng = np.random.default_rng(1)
    gt = rng.random((32, 32))
    pred = gt.copy()
    pred[:, 16:] += 0.2  # error only in the right half
    left = np.zeros((32, 32), bool)
    left[:, :16] = True
    right = ~left
    out_left = metrics.image_scores(gt, pred, mask=left)
    assert out_left["psnr"] == float("inf")
    assert out_left["mae"] == 0.0
    out_right = metrics.image_scores(gt, pred, mask=right)
    assert out_right["psnr"] == pytest.approx(10 * np.log10(1 / 0.04))
    assert out_right["mae"] == pytest.approx(0.2)
    # masked SSIM is the mean of skimage's SSIM map over the mask (outside the 3-px border)
    _, smap = structural_similarity(gt, pred, data_range=1.0, full=True)
    region = np.zeros_like(left)
    region[3:-3, 3:-3] = True
    assert out_right["ssim"] == pytest.approx(smap[right & region].mean())
    assert metrics.image_scores(gt, pred, mask=np.ones((32, 32), bool))["ssim"] == pytest.approx(
        structural_similarity(gt, pred, data_range=1.0))


def test_batch_equals_per_image_and_shapes(metrics):
    rng = np.random.default_rng(2)
    gt = rng.random((4, 1, 24, 24))
    pred = np.clip(gt + rng.normal(0, 0.1, gt.shape), 0, 1)
    mask = np.zeros((24, 24), bool)
    mask[4:20, 4:20] = True
    batch = metrics.image_scores(gt, pred, mask=mask)
    batch3 = metrics.image_scores(gt[:, 0], pred[:, 0], mask=np.broadcast_to(mask, (4, 24, 24)))
    for i in range(4):
        single = metrics.image_scores(gt[i, 0], pred[i, 0], mask=mask)
        for key in ("psnr", "ssim", "mae"):
            assert batch["per_image"][key][i] == pytest.approx(single[key])
            assert batch3["per_image"][key][i] == pytest.approx(single[key])
    assert batch["psnr"] == pytest.approx(np.mean(batch["per_image"]["psnr"]))


def test_torch_and_numpy_inputs_agree(metrics):
    rng = np.random.default_rng(3)
    gt = rng.random((2, 1, 20, 20)).astype(np.float32)
    pred = (gt + rng.normal(0, 0.05, gt.shape)).astype(np.float32)
    mask = gt > 0.3
    a = metrics.image_scores(gt, pred, mask=mask)
    b = metrics.image_scores(torch.from_numpy(gt), torch.from_numpy(pred), mask=torch.from_numpy(mask))
    for key in ("psnr", "ssim", "mae"):
        assert a[key] == pytest.approx(b[key], rel=1e-12)


def test_stateless_dynamic_range(metrics):
    gt = np.full((10, 10), 0.5)
    pred = gt + 0.1
    first = metrics.image_scores(gt, pred)["psnr"]
    metrics.image_scores(gt * 100, pred * 100, dynamic_range=100.0)
    assert metrics.image_scores(gt, pred)["psnr"] == first


@pytest.mark.parametrize(
    "gt, pred, mask, match",
    [
        (np.zeros((10, 10)), np.zeros((10, 12)), None, "shape mismatch"),
        (np.zeros((10, 10)), np.zeros((10, 10)), np.zeros((10, 10), bool), "mask of image 0 is empty"),
        (np.full((10, 10), np.nan), np.zeros((10, 10)), None, "gt contains NaN"),
        (np.zeros((10, 10)), np.full((10, 10), np.inf), None, "pred contains NaN or inf"),
        (np.zeros((10, 10)), np.zeros((10, 10)), np.ones((9, 10), bool), "mask shape"),
        (np.zeros((2, 3, 10, 10)), np.zeros((2, 3, 10, 10)), None, r"\(B,1,H,W\)"),
    ],
)
def test_bad_input_raises(metrics, gt, pred, mask, match):
    with pytest.raises(ValueError, match=match):
        metrics.image_scores(gt, pred, mask=mask)


def test_bad_dynamic_range_raises(metrics):
    with pytest.raises(ValueError, match="dynamic_range"):
        metrics.image_scores(np.zeros((10, 10)), np.zeros((10, 10)), dynamic_range=0)


def test_body_mask_largest_component_with_holes_filled():
    img = np.zeros((64, 64), np.float32)
    yy, xx = np.mgrid[:64, :64]
    head = (yy - 32) ** 2 + (xx - 30) ** 2 < 20**2
    img[head] = 0.6
    img[(yy - 32) ** 2 + (xx - 30) ** 2 < 6**2] = 0.0  # dark hole inside (ventricle, air)
    img[2:5, 58:62] = 0.9  # small bright object outside (table, label)
    mask = body_mask(img)
    assert mask.dtype == bool
    assert mask[32, 30]  # hole filled
    assert not mask[3, 60]  # small component dropped
    assert not mask[0, 0]
    assert np.array_equal(mask, head)
    assert not body_mask(np.zeros((16, 16))).any()
    with pytest.raises(ValueError, match="one \\(H,W\\) slice"):
        body_mask(np.zeros((2, 16, 16)))


@pytest.mark.parametrize("shape", [(0, 10, 10), (0, 1, 10, 10), (2, 0, 10)])
def test_an_empty_batch_raises_naming_its_shape(metrics, shape):
    """No image to score: a ValueError with the shape, not a NaN mean (issue 16)."""
    for gt in (np.zeros(shape), torch.zeros(shape)):
        with pytest.raises(ValueError, match=r"empty batch: gt and pred of shape " + re.escape(str(shape))):
            metrics.image_scores(gt, gt)
