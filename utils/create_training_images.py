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

CLI: python -m utils.create_training_images INPUT --name NAME --out DIR
         [--image-size 64] [--stride 32] [--modality ct|mr] [--slice-step 1]
         [--planes acquisition | --planes axial coronal sagittal]
"""

import argparse
import numbers
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from utils.atomic import atomic_write, remove_stale_temporaries
from utils.intensity import check_modality, normalize
from utils.paths import check_name
from utils.planes import ACQUISITION, PLANE_AXES, PLANES, acquisition_plane, cut_plane, parse_planes
from utils.volume_io import load_volume, source_fingerprint

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert a NIfTI volume or DICOM series folder into HDF5 patch files.")
    parser.add_argument("input", help=".nii/.nii.gz file or DICOM series folder")
    parser.add_argument("--name", required=True, help="dataset name: the file is OUT/NAME.h5 (OUT/NAME_PLANE.h5 for several planes)")
    parser.add_argument("--out", required=True, help="target folder")
    parser.add_argument("--image-size", type=int, default=64, help="patch side in pixels")
    parser.add_argument("--stride", type=int, default=32, help="in-plane patch step in pixels")
    parser.add_argument("--modality", choices=("ct", "mr"), default=None, help="default: from --name or DICOM")
    parser.add_argument("--slice-step", type=int, default=1, help="patch every n-th slice")
    parser.add_argument("--min-foreground", type=float, default=0.1, help="minimum foreground fraction of a patch")
    parser.add_argument("--planes", nargs="+", default=[ACQUISITION],
                        help=f"'{ACQUISITION}' (default: across the thickest voxels) or one or more of {', '.join(PLANES)}")
    args = parser.parse_args(argv)
    paths = save_as_hdf5(
        args.input,
        args.name,
        args.out,
        image_size=args.image_size,
        stride=args.stride,
        modality=args.modality,
        slice_step=args.slice_step,
        min_foreground=args.min_foreground,
        planes=args.planes[0] if len(args.planes) == 1 else args.planes,
    )
    for path in paths if isinstance(paths, list) else [paths]:
        with h5py.File(path, "r") as f:
            print(f"wrote {path}: {f.attrs['plane']} volume {f['volume'].shape}, {f['patches'].shape[0]} patches")


if __name__ == "__main__":
    main()
