r"""Scale test of the data pipeline (issue 19): a few hundred realistic volumes, converted,
split by subject, one training epoch; time and memory printed.

    python run_scripts/scale_test.py [--volumes 200] [--subjects 70] [--out DIR] [--keep]
        [--convert-workers N] [--loader-workers 2] [--batch-size 64] [--probe] [--tiny]

Builds ``--volumes`` synthetic-but-realistic volumes from the bundled scans (CT Cranium,
MR Colin27) in a temporary folder (``--out`` keeps them there): each is a random crop (70-100 %
of the field of view, 20-40 of the 48 slices) resampled to other voxel sizes (in-plane 0.6-1.1x
the pixels, slices 0.5-1x: thicker), with other intensities (CT: HU x 0.95-1.05 + -20..20 HU
and 0-10 HU of noise; MR: scanner units x 0.5-4, a smooth bias field of +-15 %, Rician noise),
a quarter stored with a flipped x axis (the loader reorients to RAS), every tenth CT (third with
--tiny) as a DICOM series folder, the rest as .nii.gz; about three volumes per subject (a subject's
volumes are mostly one modality, some both), distinct subject ids, listed in a manifest.
Then the DenoisingDataModule converts them (``--convert-workers`` processes), splits them
by subject (seeded; split.csv written beside the manifest), and one epoch of the training
loader with the full augmentation (flips, rescale 0.5-2, gamma, contrast, brightness) is
read with ``--loader-workers`` workers. ``--probe`` also reads 50 batches per worker count
(1, 2) with and without ``in_memory`` to show patches/s per worker and the memory of the
process tree. ``--tiny``: small volumes and patches (the test suite's version).
"""
from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from utils.create_training_images import convert_volumes
from utils.paths import REPO_ROOT
from utils.process_memory import GIB, MemorySampler, peak_rss_bytes

SOURCES = {"ct": REPO_ROOT / "run_scripts/data/ct_cranium.nii.gz", "mr": REPO_ROOT / "run_scripts/data/mr_colin27_t1.nii.gz"}
FULL_AUGMENT = {"flips": True, "rescale": [0.5, 2.0], "gamma": [0.7, 1.4], "contrast": [0.9, 1.1],
                "brightness": [-0.05, 0.05]}


def plan(n_volumes: int, n_subjects: int, seed: int, dicom_every: int = 10) -> list[dict]:
    """One entry per volume: name, subject, modality, its own seed, DICOM or NIfTI."""
    if not 1 <= n_subjects <= n_volumes:
        raise ValueError(f"--subjects must lie in 1..--volumes ({n_volumes}), got {n_subjects}")
    rng = np.random.default_rng(seed)
    subject = np.concatenate([np.arange(n_subjects), rng.integers(0, n_subjects, n_volumes - n_subjects)])
    primary = rng.choice(["ct", "mr"], n_subjects)
    out, n_ct = [], 0
    for i, s in enumerate(subject):
        modality = primary[s] if rng.random() > 0.3 else {"ct": "mr", "mr": "ct"}[primary[s]]
        n_ct += modality == "ct"
        out.append({"name": f"vol{i:04d}_{modality}", "subject": f"sub-{int(s):04d}", "modality": str(modality),
                    "seed": int(rng.integers(2**31)), "dicom": modality == "ct" and n_ct % dicom_every == 0})
    return out


def transform(volume: np.ndarray, zooms, modality: str, rng: np.random.Generator, tiny: bool):
    """A cropped, resampled, intensity-changed copy of a (X, Y, Z) volume: (array, zooms). The
    slices stay thicker than the in-plane pixels, so the acquisition plane stays axial."""
    nx, ny, nz = volume.shape
    if tiny:  # about 40 x 40 pixels around the middle of the head
        f = rng.uniform(0.8, 1.0)
        cx = cy = min(int(44 / f), nx, ny)
        x0, y0 = (int(n // 2 - cx // 2 + rng.integers(-8, 9)) for n in (nx, ny))
        x0, y0 = min(max(x0, 0), nx - cx), min(max(y0, 0), ny - cy)
        slices = int(rng.integers(10, 15))
    else:
        f = rng.uniform(0.6, 1.1)
        cx, cy = (int(n * rng.uniform(0.7, 1.0)) for n in (nx, ny))
        x0, y0 = rng.integers(0, nx - cx + 1), rng.integers(0, ny - cy + 1)
        slices = int(rng.integers(20, 41))
    z0 = rng.integers(0, nz - slices + 1)
    crop = volume[x0 : x0 + cx, y0 : y0 + cy, z0 : z0 + slices].astype(np.float32)
    fz = rng.uniform(0.5, 1.0) * min(1.0, f * float(zooms[2]) / max(zooms[:2]) / 1.05)
    out = ndimage.zoom(crop, (f, f, fz), order=1)
    new_zooms = tuple(float(z) * s / n for z, s, n in zip(zooms, crop.shape, out.shape))
    if modality == "ct":
        out = out * rng.uniform(0.95, 1.05) + rng.uniform(-20, 20) + rng.normal(0, rng.uniform(0, 10), out.shape)
        return np.clip(np.round(out), -1024, 3071).astype(np.int16), new_zooms
    gx, gy = (np.cos(np.linspace(0, np.pi * rng.uniform(0.5, 2), n) + rng.uniform(0, 6)) for n in out.shape[:2])
    bias = 1 + 0.15 * np.outer(gx, gy)[:, :, None]
    scaled = out * bias * rng.uniform(0.5, 4.0)
    sigma = rng.uniform(0.5, 3.0)
    noisy = np.hypot(scaled + rng.normal(0, sigma, out.shape), rng.normal(0, sigma, out.shape))
    return np.clip(np.round(noisy), 0, 65535).astype(np.uint16), new_zooms


def write_dicom(folder: Path, volume: np.ndarray, zooms, name: str) -> None:
    """A CT (X, Y, Z) RAS volume in HU as an axial DICOM series (LPS; rows run posterior)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, study = generate_uid(entropy_srcs=[name, "series"]), generate_uid(entropy_srcs=[name, "study"])
    for z in range(volume.shape[2]):
        pixels = (volume[::-1, ::-1, z].T.astype(np.int32) + 1024).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name, str(z)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality, ds.PatientID = series, study, "CT", name
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelSpacing = [zooms[1], zooms[0]]
        ds.SliceThickness = zooms[2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        # RAS x = -LPS x, y = -LPS y; pixel (0, 0) is RAS voxel (X-1, Y-1)
        ds.ImagePositionPatient = [-(volume.shape[0] - 1) * zooms[0], -(volume.shape[1] - 1) * zooms[1], z * zooms[2]]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = pixels.tobytes()
        ds.save_as(str(folder / f"{z:04d}.dcm"), enforce_file_format=True)


def make_one(root: str, name: str, modality: str, seed: int, dicom: bool, tiny: bool) -> str:
    """Write one synthetic volume under root (kept if it is there already); its path relative to root."""
    if (Path(root) / name).is_dir() or (Path(root) / f"{name}.nii.gz").is_file():
        return name if dicom else f"{name}.nii.gz"
    img = nib.load(str(SOURCES[modality]))
    volume, zooms = transform(np.asanyarray(img.dataobj), img.header.get_zooms()[:3], modality,
                              np.random.default_rng(seed), tiny)
    if dicom:
        write_dicom(Path(root) / name, volume, zooms, name)
        return name
    affine = np.diag([*zooms, 1.0])
    if seed % 4 == 0:  # stored with x running right to left
        volume, affine[0, 0], affine[0, 3] = volume[::-1], -zooms[0], (volume.shape[0] - 1) * zooms[0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume), affine), str(Path(root) / f"{name}.nii.gz"))
    return f"{name}.nii.gz"


def build_dataset(root: Path, n_volumes: int, n_subjects: int, seed: int = 0, tiny: bool = False,
                  workers: int | None = 1) -> Path:
    """Write the volumes and ``root/manifest.csv`` (path, modality, subject, name)."""
    root.mkdir(parents=True, exist_ok=True)
    entries = plan(n_volumes, n_subjects, seed, dicom_every=3 if tiny else 10)
    jobs = [dict(root=str(root), name=e["name"], modality=e["modality"], seed=e["seed"], dicom=e["dicom"], tiny=tiny)
            for e in entries]
    paths = convert_volumes(jobs, workers, progress=n_volumes > 20, task=make_one, desc="synthesizing")
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "modality", "subject", "name"])
        writer.writerows([p, e["modality"], e["subject"], e["name"]] for p, e in zip(paths, entries))
    return root / "manifest.csv"


def gib(n) -> str:
    return f"{n / GIB:.2f} GiB"


def run(args) -> dict:
    # here, not at the top: the synthesizing processes import this script and need no torch
    from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
    from diffusion_modules.diffusion_utils.loader_check import measure_loader

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cdm4mi_scale_"))
    result = {"out": out}
    try:
        start = time.perf_counter()
        manifest = build_dataset(out / "volumes", args.volumes, args.subjects, args.seed, args.tiny, args.synth_workers)
        result["synth_s"] = time.perf_counter() - start
        size = 16 if args.tiny else 64
        dm = DenoisingDataModule(str(manifest), cache_dir=out / "cache", image_size=size, stride=size // 2,
                                 split={"mode": "subject"}, batch_size=args.batch_size, augment=FULL_AUGMENT,
                                 noise={"type": "gaussian", "sigma": [0.01, 0.3]}, seed=args.seed,
                                 convert_workers=args.convert_workers)
        dm.write_split(out / "split.csv")
        with MemorySampler() as memory:
            start = time.perf_counter()
            dm.prepare_data()
            result["convert_s"] = time.perf_counter() - start
        result["convert_peak"] = memory.peak
        start = time.perf_counter()
        dm.setup()
        result["setup_s"] = time.perf_counter() - start
        result["summary"] = dm.summary()
        result["train_patches"] = len(dm.train_set)
        result["epoch"] = measure_loader(dm, args.loader_workers)
        probes = []
        if args.probe:
            for in_memory in (False, True):
                dm.in_memory = dm.train_set.in_memory = in_memory
                for workers in (1, 2):
                    probes.append({"in_memory": in_memory, **measure_loader(dm, workers, max_batches=50)})
        result["probes"] = probes
        result["peak_rss"] = peak_rss_bytes()
        report(result, args)
        return result
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(out, ignore_errors=True)


def report(r: dict, args) -> None:
    s, e = r["summary"], r["epoch"]
    print(f"\nvolumes: {s['volumes']} of {s['subjects']} subjects; synthesized in {r['synth_s']:.1f} s")
    print(f"conversion: {r['convert_s']:.1f} s ({args.convert_workers or 'auto'} processes), "
          f"{s['volumes'] / r['convert_s']:.2f} volumes/s; setup (split, datasets, RAM check) {r['setup_s']:.1f} s")
    if r["convert_peak"]:
        print(f"conversion peak memory of the process tree: RSS {gib(r['convert_peak']['rss'])}, "
              f"PSS {gib(r['convert_peak']['pss'])} ({r['convert_peak']['processes']} processes)")
    print(f"one epoch, {r['train_patches']} training patches, batch {args.batch_size}, full augmentation, "
          f"{e['workers']} loader workers: {e['seconds'] + e['startup_s']:.1f} s ({e['startup_s']:.1f} s to the first "
          f"batch), {e['patches_per_s']:.0f} patches/s, {e['per_worker']:.0f} per worker")
    if e["peak"]:
        print(f"epoch peak memory of the process tree: RSS {gib(e['peak']['rss'])}, PSS {gib(e['peak']['pss'])} "
              f"({e['peak']['processes']} processes)")
    main_rss, child_rss = r["peak_rss"]
    print(f"peak RSS (getrusage): main process {gib(main_rss)}, largest child {gib(child_rss)}")
    if r["probes"]:
        print("\n| in_memory | workers | patches/s | per worker | tree RSS | tree PSS |\n| --- | --- | --- | --- | --- | --- |")
        for p in r["probes"]:
            peak = p["peak"] or {"rss": float("nan"), "pss": float("nan")}
            print(f"| {p['in_memory']} | {p['workers']} | {p['patches_per_s']:.0f} | {p['per_worker']:.0f} | "
                  f"{gib(peak['rss'])} | {gib(peak['pss'])} |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=200)
    parser.add_argument("--subjects", type=int, default=70)
    parser.add_argument("--out", help="folder for the volumes and the cache, kept; volumes already there are reused "
                                      "(default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synth-workers", type=int, default=None, help="processes writing the volumes")
    parser.add_argument("--convert-workers", type=int, default=None, help="conversion processes (default: auto)")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers of the epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probe", action="store_true", help="also 50 batches per worker count 1, 2, in_memory off/on")
    parser.add_argument("--tiny", action="store_true", help="small volumes (40 x 40 pixels, 6-8 slices), 16-pixel patches")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
