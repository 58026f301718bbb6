"""Convert a CT/MR volume (NIfTI file or DICOM series folder) into HDF5 patch files, one per plane.

Layout of ``<targetdir>/<datasetname>.h5`` (format_version 2; ``<datasetname>_<plane>.h5``
per plane when several planes are asked):
  volume       (Z, H, W) uint16  full slices of one plane, [0,1] * 65535, slice axis first
  patches      (N, S, S) uint16  in-plane patches, same scaling
  slice_index  (N,) int32        slice of each patch in ``volume``
  origin       (N, 2) int32      (row, col) of each patch's top-left pixel
  attrs: source, source_sha256 (utils.volume_io.source_fingerprint of the input: the
  sha256 of its bytes, of a DICOM folder's files), modality, plane, acquisition_plane,
  spacing (row, col, slice mm of this plane), norm_low, norm_high (physical units: HU for
  CT), image_size, stride, slice_step, min_foreground, foreground_threshold, format_version.
Volumes are reoriented to the closest RAS axes (never resampled) and cut in radiological
display: axial (anterior up, patient's right on the image left), coronal (superior up,
patient's right on the image left), sagittal (superior up, anterior on the image left).
planes="acquisition" (default) is the plane across the axis with the thickest voxels
(ties: axial, then coronal).
A pixel is foreground when its normalized value exceeds FOREGROUND_THRESHOLD (0.05, about
-819 HU for CT and 5% of the MR percentile window); patches with a smaller foreground
fraction than min_foreground are rejected.

CLI: python -m utils.create_training_images INPUT [INPUT ...] [--name NAME] --out DIR
         [--image-size 64] [--stride 32] [--modality ct|mr] [--slice-step 1]
         [--planes acquisition | --planes axial coronal sagittal] [--workers N]
Several inputs are converted in parallel processes (``convert_volumes``: one progress bar,
atomic files) and summarized (``dataset_summary``: volumes per modality and subject, voxel
sizes, slices, patches, bytes on disk).
"""

import argparse
import multiprocessing
import numbers
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from utils.atomic import atomic_write, remove_stale_temporaries
from utils.intensity import check_modality, normalize
from utils.paths import check_name
from utils.planes import ACQUISITION, PLANE_AXES, PLANES, acquisition_plane, cut_plane, parse_planes
from utils.volume_io import load_volume, source_fingerprint, source_stem

FORMAT_VERSION = 2  # 2: planes (attrs plane, acquisition_plane; spacing of the plane)
FOREGROUND_THRESHOLD = 0.05
UINT16_SCALE = 65535.0


def check_count(value, name: str) -> int:
    """``value`` as an int when it is an integer >= 1; a ValueError naming ``name`` for
    anything else: 0, negatives, floats (64.5, also 64.0), strings ("64"), booleans."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def plane_file_names(datasetname: str, planes) -> list[str]:
    """HDF5 file names of save_as_hdf5(planes=...): ``<name>.h5`` for one plane (or
    "acquisition"), ``<name>_<plane>.h5`` per plane for several, in the order given."""
    planes = parse_planes(planes)
    if planes == ACQUISITION or len(planes) == 1:
        return [f"{datasetname}.h5"]
    return [f"{datasetname}_{plane}.h5" for plane in planes]


def patch_positions(length: int, size: int, stride: int) -> list[int]:
    """Start positions of patches of `size` along an axis of `length`, `stride` apart,
    plus one flush with the far edge so the whole axis is covered."""
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def foreground_origins(slice01: np.ndarray, size: int, stride: int, min_foreground: float) -> list[tuple[int, int]]:
    """(row, col) origins of the patches of a [0,1] slice whose foreground fraction is >= min_foreground."""
    fg = (slice01 > FOREGROUND_THRESHOLD).astype(np.int64)
    integral = np.pad(fg.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    keep = []
    for r in patch_positions(fg.shape[0], size, stride):
        for c in patch_positions(fg.shape[1], size, stride):
            count = integral[r + size, c + size] - integral[r, c + size] - integral[r + size, c] + integral[r, c]
            if count >= min_foreground * size * size:
                keep.append((r, c))
    return keep


def resolve_modality(modality, datasetname: str, found: str | None) -> str:
    """Modality from the argument, else from the dataset name (ct/mr), else from DICOM."""
    if modality is not None:
        return check_modality(modality)
    if datasetname.lower() in ("ct", "mr"):
        return datasetname.lower()
    if found in ("ct", "mr"):
        return found
    raise ValueError(f"cannot tell the modality of dataset {datasetname!r}: pass modality='ct' or 'mr'")


def save_as_hdf5(
    inputpath,
    datasetname: str,
    targetdir,
    image_size: int = 64,
    stride: int = 32,
    modality: str | None = None,
    slice_step: int = 1,
    min_foreground: float = 0.1,
    progress: bool = True,
    planes="acquisition",
) -> Path | list[Path]:
    """Convert a volume into HDF5 patch files (layout in the module docstring).

    image_size: patch side in pixels; stride: in-plane patch step in pixels; slice_step:
    patch every slice_step-th slice; min_foreground: minimum foreground fraction in [0,1].
    planes: "acquisition" (the plane across the thickest voxel axis) or a plane name
    (axial, coronal, sagittal): writes ``targetdir/<datasetname>.h5`` and returns its Path;
    a list of plane names returns the list of Paths (plane_file_names: ``<datasetname>_<plane>.h5``
    per plane when it holds several). Every plane is checked before any file is written;
    each file is written to a temporary file and renamed when complete, and a failure
    removes the files of this call's other planes. Temporary files that a killed
    conversion left in ``targetdir`` are removed first (``utils.atomic.remove_stale_temporaries``:
    never one that a running process is still writing).
    """
    check_name(datasetname, "datasetname")  # the file name: no '/', '\\', '..', no leading '.'
    targetdir = Path(targetdir)
    if targetdir.exists() and not targetdir.is_dir():
        raise NotADirectoryError(f"target folder {targetdir} is a file")
    image_size, stride = check_count(image_size, "image_size"), check_count(stride, "stride")
    slice_step = check_count(slice_step, "slice_step")
    if isinstance(min_foreground, bool) or not isinstance(min_foreground, numbers.Real) \
            or not 0.0 <= min_foreground <= 1.0:
        raise ValueError(f"min_foreground must lie in [0,1], got {min_foreground}")
    wanted = parse_planes(planes)
    names = plane_file_names(datasetname, wanted)
    fingerprint = source_fingerprint(inputpath) if Path(inputpath).exists() else None  # before reading it
    ras, zooms, found = load_volume(inputpath)
    modality = resolve_modality(modality, datasetname, found)
    acquisition = acquisition_plane(zooms)
    resolved = [acquisition] if wanted == ACQUISITION else list(wanted)
    jobs = []
    for plane, name in zip(resolved, names):
        shape = tuple(ras.shape[a] for a in PLANE_AXES[plane])
        if image_size > min(shape[1:]):
            raise ValueError(
                f"patch size {image_size} is larger than the {shape[1]}x{shape[2]} slices of {inputpath} "
                f"in the {plane} plane (voxels {zooms[0]:g} x {zooms[1]:g} x {zooms[2]:g} mm RAS, "
                f"acquisition plane {acquisition})"
            )
        jobs.append((plane, targetdir / name))
    ras01, norm = normalize(ras, modality)
    del ras
    settings = dict(image_size=image_size, stride=stride, slice_step=slice_step, min_foreground=float(min_foreground))
    cuts = []
    for plane, target in jobs:
        x01, spacing = cut_plane(ras01, zooms, plane)
        slice_ids = range(0, x01.shape[0], slice_step)
        origins = {z: foreground_origins(x01[z], image_size, stride, min_foreground) for z in slice_ids}
        if not any(origins.values()):
            raise ValueError(f"{inputpath} ({plane} plane): no patch has a foreground fraction >= {min_foreground}")
        attrs = dict(source=Path(inputpath).name, source_sha256=fingerprint, modality=modality, plane=plane, acquisition_plane=acquisition,
                     spacing=np.asarray(spacing, dtype=np.float64), norm_low=norm["low"], norm_high=norm["high"],
                     foreground_threshold=FOREGROUND_THRESHOLD, format_version=FORMAT_VERSION, **settings)
        cuts.append((target, x01, origins, attrs))

    targetdir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(targetdir)  # left by a conversion that was killed (utils/atomic.py)
    written = []
    try:
        for target, x01, origins, attrs in cuts:
            desc = f"patching {target.stem}"
            atomic_write(target, lambda tmp: write_plane(tmp, x01, origins, image_size, attrs, desc, progress))
            written.append(target)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written[0] if isinstance(planes, str) else written


def write_plane(tmp: str, x01: np.ndarray, origins: dict, size: int, attrs: dict, desc: str, progress: bool) -> None:
    """Write one plane's HDF5 file: x01 (S, H, W) [0,1] slices, origins {slice: [(row, col)]}."""
    count = sum(len(o) for o in origins.values())
    with h5py.File(tmp, "w") as f:
        volume = np.round(x01 * UINT16_SCALE).astype(np.uint16)
        f.create_dataset("volume", data=volume)
        patches = f.create_dataset("patches", shape=(count, size, size), dtype=np.uint16)
        index = np.empty(count, dtype=np.int32)
        origin = np.empty((count, 2), dtype=np.int32)
        n = 0
        for z in tqdm(origins, desc=desc, unit="slice", disable=not progress):
            rows = origins[z]
            if not rows:
                continue
            patches[n : n + len(rows)] = np.stack([volume[z, r : r + size, c : c + size] for r, c in rows])
            index[n : n + len(rows)] = z
            origin[n : n + len(rows)] = rows
            n += len(rows)
        f.create_dataset("slice_index", data=index)
        f.create_dataset("origin", data=origin)
        f.attrs.update(attrs)


def default_workers(n_jobs: int) -> int:
    """Processes for n_jobs conversions: one per job, at most the CPU count and 8 (each holds a
    volume, about 3 x its float32 size, in memory)."""
    return max(1, min(int(n_jobs), os.cpu_count() or 1, 8))


def convert_volumes(jobs: list[dict], workers: int | None = None, progress: bool = True,
                    task=save_as_hdf5, desc: str = "converting") -> list:
    """``task(**job)`` for every job (default ``save_as_hdf5`` keyword dicts) in ``workers``
    processes (None: ``default_workers``; 1: in this process), with one progress bar over
    the volumes; returns the results in job order. Each file is written atomically by its
    task, so a kill leaves complete files and temporaries that the next conversion removes.
    On a failure the jobs not started are cancelled, the running ones finish, and the first
    error is raised (the task's own error, which names the volume)."""
    workers = default_workers(len(jobs)) if workers is None else check_count(workers, "workers")
    bar = tqdm(total=len(jobs), desc=desc, unit="volume", disable=not progress or not jobs)
    try:
        if workers == 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                results.append(task(**job))
                bar.update()
            return results
        # spawn: a fresh interpreter per worker, safe beside torch's and h5py's threads
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(task, **job) for job in jobs]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                bar.update(len(done))
                failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
                if failed:
                    for f in pending:
                        f.cancel()
                    raise failed[0].exception()
            return [f.result() for f in futures]
    finally:
        bar.close()


def file_summary(path) -> dict:
    """modality, plane, spacing (row, col, slice mm), slices, rows, cols, patches and bytes of
    one HDF5 patch file (attributes and shapes only, no pixels read)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        slices, rows, cols = f["volume"].shape
        return {"modality": str(f.attrs["modality"]), "plane": str(f.attrs["plane"]),
                "spacing": tuple(float(s) for s in f.attrs["spacing"]), "slices": int(slices), "rows": int(rows),
                "cols": int(cols), "patches": int(f["patches"].shape[0]), "bytes": path.stat().st_size}


def dataset_summary(volumes: list[dict]) -> dict:
    """Figures of a converted dataset: ``volumes`` is a list of {name, subject, files (HDF5
    paths)}. Returns volumes and subjects per modality, volumes per subject (min, median,
    max), spacing ranges (row, col, slice mm: min and max per modality), slices, patches and
    bytes on disk per modality and in total."""
    per = {}
    for v in volumes:
        info = [file_summary(f) for f in v["files"]]
        m = info[0]["modality"]
        d = per.setdefault(m, {"volumes": 0, "subjects": {}, "spacing": [], "slices": 0, "patches": 0, "bytes": 0})
        d["volumes"] += 1
        d["subjects"][v["subject"]] = d["subjects"].get(v["subject"], 0) + 1
        for i in info:
            d["spacing"].append(i["spacing"])
            d["slices"] += i["slices"]
            d["patches"] += i["patches"]
            d["bytes"] += i["bytes"]
    subjects = {}
    for d in per.values():
        for s, n in d["subjects"].items():
            subjects[s] = subjects.get(s, 0) + n
    counts = sorted(subjects.values()) or [0]
    out = {"volumes": sum(d["volumes"] for d in per.values()), "subjects": len(subjects),
           "volumes_per_subject": (counts[0], float(np.median(counts)), counts[-1]),
           "slices": sum(d["slices"] for d in per.values()), "patches": sum(d["patches"] for d in per.values()),
           "bytes": sum(d["bytes"] for d in per.values()), "modalities": {}}
    for m, d in sorted(per.items()):
        spacing = np.asarray(d["spacing"], dtype=float)
        out["modalities"][m] = {"volumes": d["volumes"], "subjects": len(d["subjects"]), "slices": d["slices"],
                                "patches": d["patches"], "bytes": d["bytes"],
                                "spacing_min": tuple(spacing.min(0)), "spacing_max": tuple(spacing.max(0))}
    return out


def format_summary(summary: dict) -> str:
    """The summary as a few lines of text."""
    lo, med, hi = summary["volumes_per_subject"]
    lines = [f"dataset: {summary['volumes']} volumes of {summary['subjects']} subjects ({lo}-{hi} per subject, "
             f"median {med:g}), {summary['slices']} slices, {summary['patches']} patches, "
             f"{summary['bytes'] / 2**20:.1f} MiB of HDF5"]
    for m, d in summary["modalities"].items():
        mm = lambda t: " x ".join(f"{x:.3g}" for x in t)
        lines.append(f"  {m}: {d['volumes']} volumes, {d['subjects']} subjects, voxels {mm(d['spacing_min'])} to "
                     f"{mm(d['spacing_max'])} mm (row x col x slice), {d['slices']} slices, {d['patches']} patches, "
                     f"{d['bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert NIfTI volumes or DICOM series folders into HDF5 patch files.")
    parser.add_argument("input", nargs="+", help=".nii/.nii.gz file(s) or DICOM series folder(s)")
    parser.add_argument("--name", help="dataset name (one input): the file is OUT/NAME.h5 (OUT/NAME_PLANE.h5 for "
                                       "several planes); default, and always with several inputs: each input's stem")
    parser.add_argument("--out", required=True, help="target folder")
    parser.add_argument("--image-size", type=int, default=64, help="patch side in pixels")
    parser.add_argument("--stride", type=int, default=32, help="in-plane patch step in pixels")
    parser.add_argument("--modality", choices=("ct", "mr"), default=None, help="default: from --name or DICOM")
    parser.add_argument("--slice-step", type=int, default=1, help="patch every n-th slice")
    parser.add_argument("--min-foreground", type=float, default=0.1, help="minimum foreground fraction of a patch")
    parser.add_argument("--planes", nargs="+", default=[ACQUISITION],
                        help=f"'{ACQUISITION}' (default: across the thickest voxels) or one or more of {', '.join(PLANES)}")
    parser.add_argument("--workers", type=int, default=None, help="processes for several inputs (default: one per "
                                                                   "input, at most the CPU count and 8)")
    args = parser.parse_args(argv)
    if args.name and len(args.input) > 1:
        parser.error("--name names one input; with several inputs each file is named after its input")
    jobs = [dict(inputpath=src, datasetname=args.name or source_stem(Path(src)), targetdir=args.out,
                 image_size=args.image_size, stride=args.stride, modality=args.modality, slice_step=args.slice_step,
                 min_foreground=args.min_foreground, progress=len(args.input) == 1,
                 planes=args.planes[0] if len(args.planes) == 1 else args.planes) for src in args.input]
    results = convert_volumes(jobs, args.workers, progress=len(jobs) > 1)
    volumes = []
    for job, paths in zip(jobs, results):
        paths = paths if isinstance(paths, list) else [paths]
        volumes.append({"name": job["datasetname"], "subject": job["datasetname"], "files": paths})
        for path in paths:
            with h5py.File(path, "r") as f:
                print(f"wrote {path}: {f.attrs['plane']} volume {f['volume'].shape}, {f['patches'].shape[0]} patches")
    if len(volumes) > 1:
        print(format_summary(dataset_summary(volumes)))


if __name__ == "__main__":
    main()
