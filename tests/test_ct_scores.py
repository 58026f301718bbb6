"""CT rows carry scores in the units a radiologist reads: RMSE in HU inside the body and
PSNR / SSIM of the brain window (L 40, W 80 HU); MR rows leave them NaN."""
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from evaluation.loop import CT_WINDOW, ct_scores, evaluate
from evaluation.denoisers import NoisyInput
from metrics.image_metrics import ImageMetrics

NORM = {"low": -1024.0, "high": 3071.0}


def to01(hu):
    return ((np.asarray(hu, dtype=np.float64) - NORM["low"]) / (NORM["high"] - NORM["low"])).astype(np.float32)


def test_known_offset_in_the_window():
    rng = np.random.default_rng(0)
    clean_hu = rng.uniform(10, 50, (32, 32))          # inside the window [0, 80]
    pred_hu = clean_hu + 8.0                          # 8 HU too bright: 0.1 of the window width
    mask = np.ones((32, 32), bool)
    out = ct_scores(ImageMetrics(), to01(clean_hu), to01(pred_hu), mask, NORM)
    assert CT_WINDOW == (40.0, 80.0)
    assert out["rmse_hu_masked"] == pytest.approx(8.0, abs=1e-3)
    assert out["psnr_ct_window"] == pytest.approx(20.0, abs=1e-3)   # 10 log10(1 / 0.1^2)
    clean_w, pred_w = clean_hu / 80, pred_hu / 80
    assert out["ssim_ct_window"] == pytest.approx(structural_similarity(clean_w, pred_w, data_range=1.0), abs=1e-4)


def test_bone_and_air_saturate_the_window():
    clean_hu = np.full((16, 16), 1000.0)              # bone: white in the brain window
    pred_hu = np.full((16, 16), 500.0)                # still above 80 HU: no visible error
    out = ct_scores(ImageMetrics(), to01(clean_hu), to01(pred_hu), np.ones((16, 16), bool), NORM)
    assert out["rmse_hu_masked"] == pytest.approx(500.0, rel=1e-4)
    assert out["psnr_ct_window"] == float("inf")


def test_evaluate_writes_the_columns_for_ct_only(tmp_path):
    rng = np.random.default_rng(1)
    slices = [{"clean": rng.uniform(0.2, 0.8, (24, 24)).astype(np.float32), "source": name, "modality": mod,
               "slice_index": 0, "spacing": (1.0, 1.0, 1.0), "norm": NORM} for name, mod in (("a", "ct"), ("b", "mr"))]
    out = evaluate([NoisyInput()], slices, [0.05], tmp_path, save_predictions=False, n_examples=0)
    rows = {r["modality"]: r for r in out["summary"]}
    assert rows["ct"]["rmse_hu_masked"] == pytest.approx(0.05 * 4095, rel=0.15)
    assert np.isnan(rows["mr"]["rmse_hu_masked"]) and np.isnan(rows["mr"]["psnr_ct_window"])
    assert "psnr_ct_window" in (tmp_path / "scores.csv").read_text().splitlines()[0]
