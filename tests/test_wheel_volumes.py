"""The volumes of issue 17's item 3 (run_scripts/data/README.md, "Volumes from Python
wheels") and the through-plane spacing volumes: what they hold, that the test volumes
never reach training, and that thick slices are the mean of the thin ones they cover."""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from orchestration.evaluation_job import parse_test_volumes, refuse_training_volumes, training_volume_paths, unseen_slices
from utils.initialize_configs import load_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "run_scripts" / "data"
RECIPE = ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_mni_augment_context.yaml"
EVAL = ROOT / "run_scripts" / "configs" / "eval" / "context_unseen.yaml"


@pytest.fixture()
def spacing_builder(monkeypatch):
    monkeypatch.syspath_prepend(str(DATA))
    sys.modules.pop("build_spacing_test", None)
    import build_spacing_test
    return build_spacing_test


def test_mni_training_slab_sits_a_slice_below_the_colin27_slab():
    mni, colin = nib.load(DATA / "mr_mni152_t1.nii.gz"), nib.load(DATA / "mr_colin27_t1.nii.gz")
    assert mni.shape == (153, 189, 48) and mni.get_data_dtype() == np.uint8
    assert mni.header.get_zooms() == pytest.approx((1.0, 1.0, 1.0))
    for k in (0, 47):  # world z -16..31 mm against Colin27's -15..32 mm
        assert (mni.affine @ [0, 0, k, 1])[2] == pytest.approx((colin.affine @ [0, 0, k, 1])[2] - 1.0)
    assert (mni.affine @ [0, 0, 0, 1])[2] == pytest.approx(-16.0)
    data = np.asarray(mni.dataobj)
    assert data[:4].max() == 0 and data[-4:].max() == 0  # the 4-voxel margin around the brain
    assert data.max() > 200 and (data > 0).mean() > 0.3


def test_dipy_test_volumes_load_as_unseen_mr_with_their_voxel_sizes():
    tests = parse_test_volumes([
        {"path": str(DATA / "mr_dipy_b0_test.nii.gz"), "modality": "mr", "max_slices": None},
        {"path": str(DATA / "mr_dipy_t1_coronal_test.nii.gz"), "modality": "mr"}], 2)
    slices = unseen_slices(tests)
    b0 = [s for s in slices if s["source"] == "mr_dipy_b0_test"]
    coronal = [s for s in slices if s["source"] == "mr_dipy_t1_coronal_test"]
    assert len(b0) == 24 and len(coronal) == 1
    assert sorted(round(float(v), 3) for v in b0[0]["spacing"]) == [4.0, 4.0, 5.0]
    assert coronal[0]["clean"].shape == (256, 256)
    for s in b0 + coronal:
        assert s["modality"] == "mr" and 0.0 <= s["clean"].min() and s["clean"].max() <= 1.0
    # the coronal slice as dipy ships it, turned upright: the [0,1] values survive the window
    raw = np.asarray(nib.load(DATA / "mr_dipy_t1_coronal_test.nii.gz").dataobj)
    assert raw.dtype == np.float32 and raw.min() == 0.0 and raw.max() <= 1.0


def test_recipe_trains_on_three_volumes_and_no_test_volume_is_one_of_them():
    cfg = load_config(RECIPE, [])
    names = [v["name"] for v in cfg.data.params.volumes]
    assert names == ["mr_colin27_t1", "ct_cranium", "mr_mni152_t1"]
    assert cfg.model.params.context_slices == cfg.data.params.context_slices == 1
    assert cfg.model.params.unet_rosinality_config.params.in_channel == 4
    ev = OmegaConf.load(EVAL).evaluation
    tests = parse_test_volumes(ev.test_volumes, ev.max_slices_per_source)
    bundled = [t for t in tests if "cache" not in str(t["path"])]
    assert {t["name"] for t in bundled} >= {"mr_dipy_b0", "mr_dipy_t1_coronal", "mr_colin27_t1_0.5mm"}
    refuse_training_volumes([t for t in bundled if t["path"].is_file()], training_volume_paths(cfg))


def test_thick_slices_are_means_of_consecutive_thin_ones(spacing_builder):
    thin = np.random.default_rng(0).normal(size=(3, 4, 7))
    thick = spacing_builder.thick_slices(thin, 3)
    assert thick.shape == (3, 4, 2)  # the 7th slice, a remainder, is dropped
    np.testing.assert_allclose(thick[:, :, 1], thin[:, :, 3:6].mean(axis=2))


def test_thick_volume_keeps_world_position_and_spacing(spacing_builder, tmp_path):
    affine = np.diag([0.9, 0.9, 1.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, -30.0]
    thin = np.arange(4 * 5 * 12, dtype=np.int16).reshape(4, 5, 12)
    nib.save(nib.Nifti1Image(thin, affine), tmp_path / "thin.nii.gz")
    spacing_builder.write_thick(tmp_path / "thin.nii.gz", (2, 11), {"1.5mm": 1, "4.5mm": 3}, "v", tmp_path)
    same = nib.load(tmp_path / "v_1.5mm.nii.gz")
    np.testing.assert_array_equal(np.asarray(same.dataobj), thin[:, :, 2:11])
    thick = nib.load(tmp_path / "v_4.5mm.nii.gz")
    assert thick.shape == (4, 5, 3) and thick.header.get_zooms() == pytest.approx((0.9, 0.9, 4.5))
    np.testing.assert_allclose(np.asarray(thick.dataobj)[:, :, 0], thin[:, :, 2:5].mean(axis=2))
    # a thick slice's centre is the centre of the thin slices it averages
    centre = np.mean([(affine @ [0, 0, k, 1])[2] for k in (5, 6, 7)])
    assert (thick.affine @ [0, 0, 1, 1])[2] == pytest.approx(centre)
