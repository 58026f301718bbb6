"""Unseen test volumes (evaluation.test_volumes): loaded with the project's reader and
normalization, refused when they are a training volume, scored in their own section."""
import re
import shutil
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from omegaconf import OmegaConf
from pydicom.data import get_testdata_file

from evaluation.denoisers import NLMDenoiser, NoisyInput
from evaluation.loop import evaluate
from evaluation.reporting import best_methods
from orchestration.evaluation_job import (
    parse_test_volumes,
    refuse_training_volumes,
    run_evaluation,
    training_volume_paths,
    unseen_slices,
    volume_path,
)
from synthetic import make_volume
from test_evaluation import FakeDDPM, make_slice, read_csv

ROOT = Path(__file__).resolve().parents[1]
SLAB_05MM = ROOT / "run_scripts" / "data" / "mr_colin27_t1_0.5mm_test.nii.gz"
BUNDLED = ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml"


def unseen(slices):
    return [{**s, "set": "unseen", "label": "other scanner"} for s in slices]


def test_unseen_slices_get_their_own_section_and_csv_rows(tmp_path):
    same = [make_slice("ct", "ct_head", 10), make_slice("mr", "mr_t1", 5)]
    other = unseen([make_slice("ct", "ct_other", 3, size=48), make_slice("mr", "mr_other", 7, size=40)])
    denoisers = [NoisyInput(), NLMDenoiser()]
    result = evaluate(denoisers, same + other, [0.05, 0.2], tmp_path, n_examples=1, save_predictions=False)
    rows = read_csv(tmp_path / "scores.csv")
    assert {(r["source"], r["set"]) for r in rows} == {
        ("ct_head", "same-subject"), ("mr_t1", "same-subject"), ("ct_other", "unseen"), ("mr_other", "unseen")}
    assert {(e["set"], e["modality"]) for e in result["summary"]} == {
        ("same-subject", "ct"), ("same-subject", "mr"), ("unseen", "ct"), ("unseen", "mr")}
    text = (tmp_path / "results.md").read_text()
    same_part, unseen_part = text.split("## Unseen volumes")
    assert "## Same-subject slabs" in same_part and "### CT (1 slice from ct_head)" in same_part
    assert "ct_other" not in same_part and "ct_head" not in unseen_part
    assert "### CT (1 slice from ct_other)" in unseen_part and "### MR (1 slice from mr_other)" in unseen_part
    assert "- ct_other: CT, 1 slice, other scanner" in unseen_part
    # the winner line is computed from the summary: NLM beats the noisy input everywhere
    for part in (same_part, unseen_part):
        assert part.count("Highest mean body PSNR: sigma 0.05: NLM (") == 2
    entries = [e for e in result["summary"] if e["set"] == "unseen" and e["modality"] == "ct"]
    (_, methods, best), _ = best_methods(entries)
    nlm = next(e for e in entries if e["method"] == "NLM" and e["sigma"] == 0.05)
    assert methods == ["NLM"] and best == nlm["psnr_masked"]
    assert f"sigma 0.05: NLM ({best:.2f} dB)" in unseen_part
    # same-subject noise is what it was without the unseen slices (same positions, same seeds)
    alone = evaluate(denoisers, same, [0.05, 0.2], tmp_path / "alone", n_examples=0, save_predictions=False)
    assert [e["psnr"] for e in alone["summary"]] == [e["psnr"] for e in result["summary"] if e["set"] == "same-subject"]
    assert "No slices of this set were scored: list volumes in `evaluation.test_volumes`." in (
        tmp_path / "alone" / "results.md").read_text()


def test_best_methods_lists_ties_and_skips_nan():
    entries = [{"sigma": 0.1, "method": m, "psnr_masked": v} for m, v in (("a", 30.0), ("b", 30.0), ("c", 20.0))]
    entries.append({"sigma": 0.2, "method": "a", "psnr_masked": float("nan")})
    first, second = best_methods(entries)
    assert first == (0.1, ["a", "b"], 30.0)
    assert second[:2] == (0.2, []) and np.isnan(second[2])


def test_source_names_must_differ_between_sets(tmp_path):
    slices = [make_slice("ct", "vol", 1), *unseen([make_slice("ct", "vol", 2)])]
    with pytest.raises(ValueError, match="more than one set"):
        evaluate([NoisyInput()], slices, [0.1], tmp_path)


def test_test_volume_identical_to_a_training_volume_is_refused(tmp_path):
    train = make_volume(tmp_path / "train_ct.nii.gz", "ct")
    copy = tmp_path / "elsewhere" / "renamed.nii.gz"
    copy.parent.mkdir()
    shutil.copyfile(train, copy)
    other = make_volume(tmp_path / "other_ct.nii.gz", "ct", seed=1)
    cfg = OmegaConf.create({"data": {"params": {"volumes": [{"path": str(train), "modality": "ct"}]}}})
    assert training_volume_paths(cfg) == [train]
    refuse_training_volumes(parse_test_volumes([str(other)], 2), [train])  # a different volume passes
    with pytest.raises(ValueError, match=re.escape(f"'renamed' ({copy}) has the content of the training volume {train}")):
        refuse_training_volumes(parse_test_volumes([str(copy)], 2), [train])
    with pytest.raises(ValueError, match=re.escape(f"({train}) is the training volume {train} of the data section (same path)")):
        refuse_training_volumes(parse_test_volumes([{"path": str(train), "name": "t"}], 2), [train])
    # one DICOM file of a training series is refused too
    series = tmp_path / "series"
    series.mkdir()
    shutil.copyfile(get_testdata_file("CT_small.dcm"), series / "slice1.dcm")
    with pytest.raises(ValueError, match=re.escape(f"training volume {series}")):
        refuse_training_volumes(parse_test_volumes(["pydicom:CT_small.dcm"], 1), [series])


@pytest.mark.parametrize("resave", ["as .nii", "as float32 .nii.gz", "with flipped axes"])
def test_a_training_volume_in_another_container_is_refused_naming_both(tmp_path, resave):
    """Before: only file bytes were compared, so the same voxels in a .nii passed as unseen."""
    train = make_volume(tmp_path / "train_ct.nii.gz", "ct")
    img = nib.load(str(train))
    data, affine = np.asarray(img.dataobj), img.affine
    if resave == "as float32 .nii.gz":
        data = data.astype(np.float32)
    elif resave == "with flipped axes":  # stored x-flipped: the same RAS voxels
        data, affine = data[::-1], affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    copy = tmp_path / "elsewhere" / ("copy.nii" if resave == "as .nii" else "copy.nii.gz")
    copy.parent.mkdir()
    nib.save(nib.Nifti1Image(data, affine), str(copy))
    assert copy.read_bytes() != train.read_bytes()
    with pytest.raises(ValueError, match=re.escape(f"'copy' ({copy}) has the voxels of the training volume {train}")):
        refuse_training_volumes(parse_test_volumes([str(copy)], 2), [train])
    other = tmp_path / "other.nii"  # same shape, other voxels: passes
    nib.save(nib.load(str(make_volume(tmp_path / "o_ct.nii.gz", "ct", seed=1))), str(other))
    refuse_training_volumes(parse_test_volumes([str(other)], 2), [train])


def test_pydicom_slices_load_in_hu_with_their_modality():
    assert volume_path("pydicom:CT_small.dcm") == Path(get_testdata_file("CT_small.dcm", download=False))
    with pytest.raises(FileNotFoundError, match="no test file"):
        volume_path("pydicom:not_a_test_file.dcm")
    ct, mr = unseen_slices(parse_test_volumes(["pydicom:CT_small.dcm", "pydicom:MR_small.dcm"], 2))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert ct["modality"] == "ct" and ct["norm"] == {"modality": "ct", "low": -1024.0, "high": 3071.0}
    assert ct["source"] == "CT_small" and ct["set"] == "unseen" and ct["slice_index"] == 0
    np.testing.assert_allclose(-1024 + ct["clean"].astype(np.float64) * 4095, hu, atol=2e-3)  # HU, not raw
    assert ct["spacing"][:2] == pytest.approx([float(v) for v in ds.PixelSpacing])
    assert mr["modality"] == "mr" and mr["clean"].shape == (64, 64)
    assert mr["clean"].min() == 0 and mr["clean"].max() == 1  # the MR percentile window


def test_the_05mm_slab_loads_with_05mm_spacing():
    tests = parse_test_volumes([{"path": str(SLAB_05MM), "modality": "mr", "label": "resolution shift"}], 2)
    slices = unseen_slices(tests)
    assert [s["slice_index"] for s in slices] == [0, 10]  # evenly spaced: first and last of 11
    for s in slices:
        assert s["spacing"] == pytest.approx((0.5, 0.5, 0.5)) and s["clean"].shape == (338, 279)
        assert s["label"] == "resolution shift" and s["clean"].dtype == np.float32
    assert nib.load(SLAB_05MM).header.get_zooms() == pytest.approx((0.5, 0.5, 0.5))
    one = unseen_slices(parse_test_volumes([{"path": str(SLAB_05MM), "modality": "mr", "max_slices": 1}], 2))
    assert [s["slice_index"] for s in one] == [0]


def test_bundled_config_test_volumes_are_not_its_training_volumes():
    cfg = OmegaConf.load(BUNDLED)
    tests = parse_test_volumes(cfg.evaluation.test_volumes, cfg.evaluation.max_slices_per_source)
    assert [t["name"] for t in tests] == ["pydicom_ct_small", "pydicom_mr_small", "mr_colin27_t1_0.5mm",
                                          "mr_dipy_b0", "mr_dipy_t1_coronal"]
    assert all(t["path"].is_file() for t in tests)
    refuse_training_volumes(tests, training_volume_paths(cfg))


@pytest.mark.parametrize("entry, match", [
    ({"path": "x.nii.gz", "slices": 2}, "allows only"),
    ({"path": "x.nii.gz", "plane": "oblique"}, "plane 'oblique'"),
    ({"path": "x.nii.gz", "modality": "pet"}, "unknown modality"),
    (3, "must be a path or a mapping"),
])
def test_bad_test_volume_entries(entry, match):
    with pytest.raises(ValueError, match=match):
        parse_test_volumes([entry], 2)


def test_test_volume_names_are_unique():
    with pytest.raises(ValueError, match="unique"):
        parse_test_volumes(["a/x.nii.gz", "b/x.nii.gz"], 2)


class TinyData:
    """A data module with one same-subject slab; its volumes are the training volumes."""

    def __init__(self, volumes, modality="mr"):
        self.volumes, self.modality = volumes, modality

    def prepare_data(self):
        pass

    def setup(self, stage=None):
        pass

    def test_slices(self):
        return [make_slice(self.modality, f"{self.modality}_train", z, size=40) for z in (30, 31, 32)]


@pytest.fixture
def tiny_data(monkeypatch):
    module = types.ModuleType("fake_unseen_data")
    module.TinyData = TinyData
    monkeypatch.setitem(sys.modules, "fake_unseen_data", module)
    return "fake_unseen_data.TinyData"


def unseen_config(target, train, test_volumes, noise_type="gaussian"):
    return OmegaConf.create({
        "allow_targets": ["fake_unseen_data"],
        "data": {"target": target, "params": {"volumes": [{"path": str(train), "modality": "mr"}]}},
        "evaluation": {
            "sigmas": [0.1], "noise_seed": 1, "max_slices_per_source": 2, "n_examples": 1,
            "noise_type": noise_type, "test_volumes": test_volumes,
            "methods": [{"name": "noisy input", "type": "noisy"},
                        {"name": "DDPM mean of 2", "type": "ddpm", "params": {"n_samples": 2}}],
        },
    })


def test_run_evaluation_writes_both_sections(tmp_path, tiny_data):
    train = make_volume(tmp_path / "train_mr.nii.gz", "mr")
    test_ct = make_volume(tmp_path / "test_ct.nii.gz", "ct", n_slices=9, seed=3)
    cfg = unseen_config(tiny_data, train, [
        {"path": str(test_ct), "name": "ct_elsewhere", "label": "other subject", "max_slices": 3},
        "pydicom:MR_small.dcm",
    ])
    result = run_evaluation(cfg, {"ddpm": FakeDDPM()}, out_dir=tmp_path / "out", device="cpu")
    rows = read_csv(result["scores_csv"])
    unseen_rows = [r for r in rows if r["set"] == "unseen"]
    assert {(r["source"], int(r["slice_index"])) for r in unseen_rows} == {
        ("ct_elsewhere", 0), ("ct_elsewhere", 4), ("ct_elsewhere", 8), ("MR_small", 0)}
    assert {r["source"] for r in rows if r["set"] == "same-subject"} == {"mr_train"}
    assert len(rows) == (2 + 4) * 2  # slices (2 same-subject, 4 unseen) x methods
    text = result["results_md"].read_text()
    assert text.index("## Same-subject slabs") < text.index("## Unseen volumes")
    unseen_part = text.split("## Unseen volumes")[1]
    assert "### CT (3 slices from ct_elsewhere)" in unseen_part and "### MR (1 slice from MR_small)" in unseen_part
    assert "- ct_elsewhere: CT, 3 slices, other subject" in unseen_part
    assert unseen_part.count("Highest mean body PSNR: sigma 0.1: ") == 2
    assert (tmp_path / "out" / "predictions" / "noisy_input" / "sigma_0.1" / "ct_elsewhere.nii.gz").is_file()
    # the training volume itself as a test volume: refused before anything is scored
    with pytest.raises(ValueError, match=f"training volume {train}"):
        run_evaluation(unseen_config(tiny_data, train, [str(train)]), {"ddpm": FakeDDPM()},
                       out_dir=tmp_path / "refused", device="cpu")
    assert not (tmp_path / "refused").exists()


def test_lowdose_ct_skips_mr_test_volumes(tmp_path, tiny_data):
    train = make_volume(tmp_path / "train_mr.nii.gz", "mr")
    test_ct = make_volume(tmp_path / "test_ct.nii.gz", "ct", n_slices=4, seed=3)
    cfg = unseen_config(tiny_data, train, [str(test_ct), "pydicom:MR_small.dcm"], noise_type="lowdose_ct")
    cfg.evaluation.sigmas = [1e5]
    cfg.evaluation.noise_params = {"n_angles": 12}
    cfg.evaluation.methods = [{"name": "noisy input", "type": "noisy"}]
    cfg.data.params.modality = "ct"  # lowdose_ct needs CT same-subject slices too
    with pytest.warns(UserWarning, match=r"skipping the test volume\(s\) \['MR_small'\]"):
        result = run_evaluation(cfg, {}, out_dir=tmp_path / "out", device="cpu")
    assert {r["source"] for r in read_csv(result["scores_csv"])} == {"ct_train", "test_ct"}


def test_main_job_refuses_a_training_volume_as_test_volume_before_training(tmp_path):
    from orchestration.run_job import run_job
    from utils.initialize_configs import load_config

    cfg = load_config(ROOT / "run_scripts" / "configs" / "ddpm-cond" / "bundled_ct_mr.yaml",
                      ["evaluation.test_volumes=[run_scripts/data/ct_cranium.nii.gz]",
                       f"logging.save_dir={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match="ct_cranium"):
        run_job(cfg)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
