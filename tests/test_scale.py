"""Conversion at scale and the loaders' memory (issue 19, items 3-5): parallel conversion
with one progress bar and nothing half-written, the dataset summary, the loader memory
estimate and its refusal, benchmark.py --data, and the scale script on a dozen tiny volumes."""
import csv
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from diffusion_modules.diffusion_utils import loader_check
from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
from synthetic import load_script, make_volume
from utils.create_training_images import convert_volumes, main as convert_main
from utils.volume_io import load_volume

ROOT = Path(__file__).resolve().parents[1]


def jobs_for(paths, out):
    return [dict(inputpath=p, datasetname=Path(p).name.split(".")[0], targetdir=out, image_size=16, stride=8,
                 modality="ct", progress=False) for p in paths]


def test_convert_volumes_in_processes_keeps_order_and_leaves_nothing_half_written(tmp_path):
    paths = [make_volume(tmp_path / f"v{i}_ct.nii.gz", "ct", n_slices=3, seed=i) for i in range(4)]
    out = tmp_path / "out"
    results = convert_volumes(jobs_for(paths, out), workers=2, progress=False)
    assert results == [out / f"v{i}_ct.h5" for i in range(4)]
    for i, path in enumerate(results):
        with h5py.File(path, "r") as f:
            assert f["volume"].shape == (3, 36, 40) and f.attrs["source"] == f"v{i}_ct.nii.gz"
    bad = tmp_path / "nan_ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 36, 3), np.nan, np.float32), np.eye(4)), str(bad))
    with pytest.raises(ValueError, match=r"nan_ct\.nii\.gz has 4320 NaN or inf voxels"):
        convert_volumes(jobs_for([paths[0], bad, paths[1], paths[2]], tmp_path / "out2"), workers=2, progress=False)
    assert not (tmp_path / "out2" / "nan_ct.h5").exists() and not list((tmp_path / "out2").glob(".tmp-*"))
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        convert_volumes(jobs_for(paths, out), workers=0)


def test_cli_converts_several_inputs_and_prints_the_summary(tmp_path, capsys):
    a = make_volume(tmp_path / "a_ct.nii.gz", "ct", n_slices=3, seed=1)
    b = make_volume(tmp_path / "b_ct.nii.gz", "ct", n_slices=5, seed=2)
    convert_main([str(a), str(b), "--out", str(tmp_path / "h5"), "--modality", "ct", "--image-size", "16",
                  "--stride", "8", "--workers", "2"])
    text = capsys.readouterr().out
    with h5py.File(tmp_path / "h5" / "a_ct.h5", "r") as f:
        n_a = f["patches"].shape[0]
    with h5py.File(tmp_path / "h5" / "b_ct.h5", "r") as f:
        n_b = f["patches"].shape[0]
    assert f"dataset: 2 volumes of 2 subjects (1-1 per subject, median 1), 8 slices, {n_a + n_b} patches" in text
    assert "ct: 2 volumes, 2 subjects, voxels 1 x 1 x 1 to 1 x 1 x 1 mm" in text
    with pytest.raises(SystemExit):
        convert_main([str(a), str(b), "--out", str(tmp_path / "h5"), "--name", "x"])


def small_module(tmp_path, **kwargs) -> DenoisingDataModule:
    vols = [make_volume(tmp_path / "head_ct.nii.gz", "ct", n_slices=12), make_volume(tmp_path / "brain_mr.nii.gz", "mr", 12, 1)]
    kwargs.setdefault("split", {"gap": 1})
    return DenoisingDataModule(vols, cache_dir=tmp_path / "cache", image_size=16, stride=8, batch_size=8, **kwargs)


def sizes(tmp_path) -> dict:
    out = {}
    for name in ("head_ct", "brain_mr"):
        with h5py.File(tmp_path / "cache" / f"{name}.h5", "r") as f:
            out[name] = (f["patches"].size * 2, f["volume"].size * 2)
    return out


def test_the_memory_estimate_counts_each_process_copy(tmp_path):
    dm = small_module(tmp_path, in_memory=True, num_workers=3)
    dm.prepare_data()
    parts, b = dm.split_slices(), sizes(tmp_path)
    patches = b["head_ct"][0] + b["brain_mr"][0]
    est = loader_check.estimate_loader_memory(dm, parts)
    assert est["processes"] == (3, 3) and est["train_process"] == est["val_process"] == patches  # slab: both sets hold every file
    assert est["total"] == 6 * patches
    assert loader_check.estimate_loader_memory(dm, parts, devices=2)["total"] == 12 * patches
    dm.num_workers = 0  # the main process holds both
    assert loader_check.estimate_loader_memory(dm, parts)["total"] == 2 * patches
    rescale = small_module(tmp_path, in_memory=True, num_workers=1, augment={"rescale": [0.5, 2.0]})
    whole = patches + b["head_ct"][1] + b["brain_mr"][1]
    assert loader_check.estimate_loader_memory(rescale, parts)["total"] == 2 * whole
    assert loader_check.estimate_loader_memory(small_module(tmp_path, num_workers=4), parts)["total"] == 0
    lowdose = small_module(tmp_path, num_workers=2, noise={"type": "lowdose_ct", "i0": 1e5}, lowdose_cache=3)
    n_train = sum(len(s) for s in parts["train"].values())
    n_val = sum(len(s) for s in parts["val"].values())
    assert loader_check.estimate_loader_memory(lowdose, parts)["total"] == 2 * (n_train * 3 + n_val) * 36 * 40 * 4


def test_a_configuration_that_would_not_fit_is_refused_with_the_estimate(tmp_path, monkeypatch):
    dm = small_module(tmp_path, in_memory=True, num_workers=2)
    dm.prepare_data()
    patches = sum(p for p, _ in sizes(tmp_path).values())
    with pytest.raises(ValueError, match=r"would hold about 0\.0 GiB \(train: 2 process\(es\) x .*num_workers=2\), "
                                         r"more than 90% of the 0\.0 GiB of memory available: set in_memory: false"):
        loader_check.check_loader_memory(dm, dm.split_slices(), available=4 * patches)
    assert loader_check.check_loader_memory(dm, dm.split_slices(), available=5 * patches)["total"] == 4 * patches
    monkeypatch.setattr(loader_check, "available_bytes", lambda: 2 * patches)
    with pytest.raises(ValueError, match="would hold about"):
        dm.setup()
    small_module(tmp_path, in_memory=False, num_workers=2).setup()  # one HDF5 read per item: nothing held


def test_measure_loader_reads_one_epoch_and_benchmark_data_prints_a_row_per_worker_count(tmp_path, capsys):
    dm = small_module(tmp_path)
    dm.setup()
    r = loader_check.measure_loader(dm, 0)
    assert r["patches"] == len(dm.train_set) and r["batches"] == -(-len(dm.train_set) // 8)
    assert r["per_worker"] == r["patches_per_s"] > 0 and r["peak"]["processes"] >= 1 and r["peak"]["pss"] > 0
    two = loader_check.measure_loader(dm, 2, max_batches=3)
    assert two["batches"] == 4 and two["per_worker"] == pytest.approx(two["patches_per_s"] / 2)
    assert two["peak"]["processes"] >= 3  # the main process and its two workers
    bench = load_script("benchmark.py")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
model: {{target: models.ddpm_conditioned.ConditionDDPM, params: {{}}}}
data:
  target: diffusion_modules.diffusion_utils.datamodule.DenoisingDataModule
  params: {{volumes: ["{tmp_path / 'head_ct.nii.gz'}"], cache_dir: "{tmp_path / 'cache3'}", image_size: 16, stride: 8,
            batch_size: 8, split: {{gap: 1}}}}
""")
    bench.main(["--config", str(cfg), "--data", "--data-workers", "0", "1", "--steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert "augmentation full" in out and len(rows) == 2 and all(float(r.split("|")[2]) > 0 for r in rows)


def test_a_synthetic_dicom_series_reads_back_as_its_volume(tmp_path):
    scale = load_script("scale_test.py")
    rng = np.random.default_rng(0)
    volume = rng.integers(-1024, 2000, size=(12, 10, 4)).astype(np.int16)
    scale.write_dicom(tmp_path / "s", volume, (0.8, 0.7, 2.5), "s")
    ras, zooms, modality = load_volume(tmp_path / "s")
    np.testing.assert_array_equal(ras, volume.astype(np.float32))
    assert zooms == pytest.approx((0.8, 0.7, 2.5)) and modality == "ct"


def test_the_scale_script_on_a_dozen_tiny_volumes(tmp_path, capsys):
    scale = load_script("scale_test.py")
    argv = ["--tiny", "--volumes", "12", "--subjects", "4", "--out", str(tmp_path), "--synth-workers", "1",
            "--convert-workers", "2", "--loader-workers", "0", "--batch-size", "16"]
    r = scale.main(argv)
    s = r["summary"]
    assert (s["volumes"], s["subjects"], s["volumes_per_subject"][0] >= 1) == (12, 4, True)
    with open(tmp_path / "volumes" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and len({r["subject"] for r in rows}) == 4 and any(r["path"].endswith(".nii.gz") for r in rows)
    assert any(not r["path"].endswith(".nii.gz") for r in rows)  # a DICOM series folder among them
    with open(tmp_path / "split.csv", newline="") as f:
        split = list(csv.DictReader(f))
    parts = {}
    for row in split:
        parts.setdefault(row["subject"], set()).add(row["split"])
    assert all(len(p) == 1 for p in parts.values()) and set().union(*parts.values()) == {"train", "val", "test"}
    cached = sorted((tmp_path / "cache").glob("*.h5"))
    assert len(cached) == 12 and s["bytes"] == sum(p.stat().st_size for p in cached)
    assert r["epoch"]["patches"] == r["train_patches"] > 0  # one whole epoch
    text = capsys.readouterr().out
    assert "volumes: 12 of 4 subjects" in text and "patches/s" in text and "converted 12 of 12 volumes" in text
    times = [p.stat().st_mtime_ns for p in cached]
    again = scale.main(argv)  # the same volumes again: every cache file is current, nothing converted
    assert [p.stat().st_mtime_ns for p in cached] == times and again["summary"] == s
    assert "converted" not in capsys.readouterr().out
