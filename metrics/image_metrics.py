"""Image quality metrics (PSNR, SSIM, MAE) per 2-D image, optionally inside a mask.

Images are compared in whatever units they are given in; ``dynamic_range`` is the
peak-to-peak range of those units (1.0 for [0,1] data, e.g. 4095.0 for a CT HU window
of [-1024, 3071]). Nothing is kept between calls.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

import torch

METRIC_NAMES = ("psnr", "ssim", "mae")


def _to_numpy(x, what: str) -> np.ndarray:
    """Converts a numpy array or torch tensor to a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _as_batch(arr: np.ndarray, what: str) -> np.ndarray:
    """(H,W) -> (1,H,W); (B,H,W) kept; (B,1,H,W) -> (B,H,W)."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return arr
    if arr.ndim == 4 and arr.shape[1] == 1:
        return arr[:, 0]
    raise ValueError(
        f"{what} must have shape (H,W), (B,H,W) or (B,1,H,W), got {tuple(arr.shape)}"
    )


class ImageMetrics:
    """Stateless PSNR / SSIM / MAE scorer.

    ``image_scores`` scores each 2-D image of a batch on its own and averages:
    - PSNR = 10 log10(R^2 / MSE) in dB, R = dynamic_range. Identical images give
      ``inf`` (MSE = 0), and so does a mean over a batch containing such a pair.
    - SSIM: scikit-image ``structural_similarity`` (7x7 uniform window, data_range=R).
      Without a mask it is skimage's value (mean of the SSIM map away from a border of
      (win_size - 1) // 2 = 3 pixels). With a mask it is the mean of the same SSIM map
      over the masked pixels outside that border, so an all-true mask equals the
      unmasked value.
    - MAE = mean |gt - pred| in the image units, over the masked pixels if a mask is given.
    Without a mask, PSNR and SSIM equal skimage's ``peak_signal_noise_ratio`` and
    ``structural_similarity`` with ``data_range=R``.
    """

    def __init__(self, win_size: int = 7):
        if win_size < 3 or win_size % 2 == 0:
            raise ValueError(f"win_size must be an odd integer >= 3, got {win_size}")
        self.win_size = win_size

    def image_scores(self, gt, pred, mask=None, dynamic_range: float | None = None) -> dict:
        """Scores ``pred`` against ``gt``.

        gt, pred: numpy arrays or torch tensors of shape (H,W), (B,H,W) or (B,1,H,W).
        mask: bool array/tensor of the same shape, or (H,W) applied to every image;
            True marks the pixels to score.
        dynamic_range: peak-to-peak range R of the units (default 1.0, for [0,1] data;
            physical units such as HU need it given explicitly).
        Returns {"psnr", "ssim", "mae"} (means over images, floats) and
        "per_image": {"psnr": [...], "ssim": [...], "mae": [...]}.
        Raises ValueError on shape mismatch, an empty batch (no image, or images of no
        pixel), NaN/inf values, an empty mask or a non-positive dynamic range.
        """
        gt_b = _as_batch(_to_numpy(gt, "gt"), "gt")
        pred_b = _as_batch(_to_numpy(pred, "pred"), "pred")
        if gt_b.shape != pred_b.shape:
            raise ValueError(
                f"shape mismatch: gt {tuple(np.shape(gt))} vs pred {tuple(np.shape(pred))}"
            )
        if gt_b.size == 0:  # the mean over no image would be NaN
            raise ValueError(f"empty batch: gt and pred of shape {tuple(np.shape(gt))} hold no pixel to score")
        for what, arr in (("gt", gt_b), ("pred", pred_b)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{what} contains NaN or inf values")
        data_range = 1.0 if dynamic_range is None else float(dynamic_range)
        if not np.isfinite(data_range) or data_range <= 0:
            raise ValueError(f"dynamic_range must be a positive number, got {dynamic_range}")
        masks = self._batch_mask(mask, gt_b.shape)

        per_image = {name: [] for name in METRIC_NAMES}
        for i in range(gt_b.shape[0]):
            m = None if masks is None else masks[i]
            scores = self._score_one(gt_b[i], pred_b[i], m, data_range, i)
            for name in METRIC_NAMES:
                per_image[name].append(scores[name])
        result = {name: float(np.mean(per_image[name])) for name in METRIC_NAMES}
        result["per_image"] = per_image
        return result

    def _batch_mask(self, mask, batch_shape):
        if mask is None:
            return None
        m = _to_numpy(mask, "mask")
        if m.dtype != bool:
            if not np.all(np.isin(m, (0, 1))):
                raise ValueError("mask must be boolean (or contain only 0 and 1)")
            m = m.astype(bool)
        if m.ndim == 2:
            if m.shape != batch_shape[1:]:
                raise ValueError(
                    f"mask shape {m.shape} does not match image shape {batch_shape[1:]}"
                )
            return np.broadcast_to(m, batch_shape)
        m = _as_batch(m, "mask")
        if m.shape != batch_shape:
            raise ValueError(f"mask shape {m.shape} does not match images {batch_shape}")
        return m

    def _score_one(self, gt, pred, mask, data_range, index) -> dict:
        diff = gt - pred
        _, ssim_map = structural_similarity(
            gt, pred, win_size=self.win_size, data_range=data_range, full=True
        )
        pad = (self.win_size - 1) // 2
        interior = np.zeros(gt.shape, dtype=bool)
        interior[pad : gt.shape[0] - pad, pad : gt.shape[1] - pad] = True
        if mask is None:
            mask = np.ones(gt.shape, dtype=bool)
        elif not mask.any():
            raise ValueError(f"mask of image {index} is empty: no pixel to score")
        ssim_region = mask & interior
        if not ssim_region.any():
            raise ValueError(
                f"mask of image {index} lies entirely within the {pad}-pixel border "
                "where SSIM is not defined"
            )
        mse = float(np.mean(diff[mask] ** 2))
        psnr = float("inf") if mse == 0.0 else float(10.0 * np.log10(data_range**2 / mse))
        return {
            "psnr": psnr,
            "ssim": float(np.mean(ssim_map[ssim_region], dtype=np.float64)),
            "mae": float(np.mean(np.abs(diff[mask]))),
        }


def body_mask(clean01, threshold: float = 0.1) -> np.ndarray:
    """Foreground (body) mask of one clean slice in [0,1].

    Steps: threshold (``> threshold`` in [0,1] units; 0.1 is above air for the
    default CT window (-1024 HU -> 0, fat about 0.22) and above the zeroed or dark
    background of MR), keep the largest connected component (drops the table, labels,
    stray pixels), fill its holes (dark structures inside the body, e.g. ventricles
    or sinuses, stay in). Returns a bool (H,W) array; all False if nothing exceeds
    the threshold.
    """
    img = _to_numpy(clean01, "clean01")
    if img.ndim != 2:
        raise ValueError(f"body_mask expects one (H,W) slice, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise ValueError("clean01 contains NaN or inf values")
    labels, n = ndimage.label(img > threshold)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
