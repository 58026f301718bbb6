"""Convert a CT/MR volume (NIfTI file or DICOM series folder) into an HDF5 patch file.

Layout of ``<targetdir>/<datasetname>.h5`` (format_version 1):
  volume       (Z, H, W) uint16  full axial slices, [0,1] * 65535, slice axis first
  patches      (N, S, S) uint16  in-plane patches, same scaling
  slice_index  (N,) int32        slice of each patch in ``volume``
  origin       (N, 2) int32      (row, col) of each patch's top-left pixel
  attrs: source, modality, spacing (row, col, slice mm), norm_low, norm_high (physical
  units: HU for CT), image_size, stride, slice_step, min_foreground, foreground_threshold,
  format_version.
Slices are shown in radiological display: anterior up, patient's right on the image left.
A pixel is foreground when its normalized value exceeds FOREGROUND_THRESHOLD (0.05, about
-819 HU for CT and 5% of the MR percentile window); patches with a smaller foreground
fraction than min_foreground are rejected.

CLI: python -m utils.create_training_images INPUT --name NAME --out DIR
         [--image-size 64] [--stride 32] [--modality ct|mr] [--slice-step 1]
"""

import argparse
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from utils.atomic import atomic_write
from utils.intensity import check_modality, normalize

FORMAT_VERSION = 1
FOREGROUND_THRESHOLD = 0.05
UINT16_SCALE = 65535.0
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    """True if the file name ends in .nii or .nii.gz."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def source_stem(path: Path) -> str:
    """File name without .nii/.nii.gz/.h5 (folder name for DICOM series)."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".h5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI volume as (Z, H, W) float32 physical values and (row, col, slice) mm spacing.

    The image is reoriented to the closest RAS orientation (axes permuted/flipped, never
    resampled); slices are taken along the superior axis and shown radiologically.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as err:
        raise ValueError(f"{path} is not a readable NIfTI image: {err}") from err
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise ValueError(f"{path} has shape {img.shape}: expected a 3-D volume")
    if 0 in img.shape:
        raise ValueError(f"{path} is empty: shape {img.shape}")
    img = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    zx, zy, zz = (float(z) for z in img.header.get_zooms()[:3])
    volume = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    return volume, (zy, zx, zz)


def load_dicom_series(folder: Path) -> tuple[np.ndarray, tuple[float, float, float], str | None]:
    """Read a DICOM series folder: (Z, H, W) float32 physical values, (row, col, slice) mm spacing
    and the DICOM Modality tag (lower case, or None). Slices are sorted along the slice normal
    and rescaled with RescaleSlope/RescaleIntercept (HU for CT)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(file))
        except (InvalidDicomError, OSError):
            continue
        if "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise ValueError(f"{folder} contains no DICOM image")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in slices}
    if len(series) > 1:
        raise ValueError(f"{folder} holds {len(series)} DICOM series: give a folder with one series")
    orientation = np.array(getattr(slices[0], "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [float(np.dot(normal, getattr(ds, "ImagePositionPatient", [0, 0, i]))) for i, ds in enumerate(slices)]
    order = np.argsort(positions)
    slices = [slices[i] for i in order]
    positions = np.asarray(positions)[order]
    shapes = {ds.pixel_array.shape for ds in slices}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: DICOM slices have different shapes {sorted(shapes)}")
    volume = np.stack(
        [ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0)) for ds in slices]
    )
    row_mm, col_mm = (float(v) for v in getattr(slices[0], "PixelSpacing", [1.0, 1.0]))
    if len(slices) > 1:
        slice_mm = float(np.median(np.diff(positions)))
    else:
        slice_mm = float(getattr(slices[0], "SliceThickness", 1.0))
    modality = str(getattr(slices[0], "Modality", "")).lower() or None
    return volume, (row_mm, col_mm, slice_mm), modality


def load_volume(inputpath) -> tuple[np.ndarray, tuple[float, float, float], str | None]:
    """Load a NIfTI file or DICOM series folder; validate shape and values.

    Returns (Z, H, W) float32 physical values, (row, col, slice) spacing in mm and the
    modality found in the file (DICOM only, else None).
    """
    path = Path(inputpath)
    if not path.exists():
        raise FileNotFoundError(f"input path does not exist: {path}")
    if path.is_dir():
        volume, spacing, found = load_dicom_series(path)
    elif is_nifti(path):
        volume, spacing = load_nifti(path)
        found = None
    else:
        raise ValueError(f"{path} is not an image: expected a .nii/.nii.gz file or a DICOM series folder")
    if volume.ndim != 3:
        raise ValueError(f"{path} has shape {volume.shape}: expected a 3-D volume")
    if volume.size == 0:
        raise ValueError(f"{path} is empty: shape {volume.shape}")
    if not np.isfinite(volume).all():
        bad = int((~np.isfinite(volume)).sum())
        raise ValueError(f"{path} has {bad} NaN or inf voxels")
    return volume, spacing, found


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
) -> Path:
    """Convert a volume into ``targetdir/<datasetname>.h5`` (layout in the module docstring).

    image_size: patch side in pixels; stride: in-plane patch step in pixels; slice_step:
    patch every slice_step-th slice; min_foreground: minimum foreground fraction in [0,1].
    The file is written to a temporary file in targetdir and renamed when complete.
    """
    targetdir = Path(targetdir)
    if targetdir.exists() and not targetdir.is_dir():
        raise NotADirectoryError(f"target folder {targetdir} is a file")
    if image_size < 1 or stride < 1 or slice_step < 1:
        raise ValueError(f"image_size ({image_size}), stride ({stride}) and slice_step ({slice_step}) must be >= 1")
    if not 0.0 <= min_foreground <= 1.0:
        raise ValueError(f"min_foreground must lie in [0,1], got {min_foreground}")
    volume, spacing, found = load_volume(inputpath)
    modality = resolve_modality(modality, datasetname, found)
    if image_size > min(volume.shape[1:]):
        raise ValueError(f"patch size {image_size} is larger than the {volume.shape[1]}x{volume.shape[2]} slices of {inputpath}")
    x01, norm = normalize(volume, modality)
    del volume
    slice_ids = range(0, x01.shape[0], slice_step)
    origins = {z: foreground_origins(x01[z], image_size, stride, min_foreground) for z in slice_ids}
    count = sum(len(o) for o in origins.values())
    if count == 0:
        raise ValueError(f"{inputpath}: no patch has a foreground fraction >= {min_foreground}")

    targetdir.mkdir(parents=True, exist_ok=True)
    target = targetdir / f"{datasetname}.h5"

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("volume", data=np.round(x01 * UINT16_SCALE).astype(np.uint16))
            patches = f.create_dataset("patches", shape=(count, image_size, image_size), dtype=np.uint16)
            index = np.empty(count, dtype=np.int32)
            origin = np.empty((count, 2), dtype=np.int32)
            n = 0
            for z in tqdm(slice_ids, desc=f"patching {datasetname}", unit="slice", disable=not progress):
                rows = origins[z]
                if not rows:
                    continue
                block = np.stack([x01[z, r : r + image_size, c : c + image_size] for r, c in rows])
                patches[n : n + len(rows)] = np.round(block * UINT16_SCALE).astype(np.uint16)
                index[n : n + len(rows)] = z
                origin[n : n + len(rows)] = rows
                n += len(rows)
            f.create_dataset("slice_index", data=index)
            f.create_dataset("origin", data=origin)
            f.attrs.update(
                source=Path(inputpath).name,
                modality=modality,
                spacing=np.asarray(spacing, dtype=np.float64),
                norm_low=norm["low"],
                norm_high=norm["high"],
                image_size=image_size,
                stride=stride,
                slice_step=slice_step,
                min_foreground=float(min_foreground),
                foreground_threshold=FOREGROUND_THRESHOLD,
                format_version=FORMAT_VERSION,
            )

    atomic_write(target, write)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert a NIfTI volume or DICOM series folder into an HDF5 patch file.")
    parser.add_argument("input", help=".nii/.nii.gz file or DICOM series folder")
    parser.add_argument("--name", required=True, help="dataset name: the file is OUT/NAME.h5")
    parser.add_argument("--out", required=True, help="target folder")
    parser.add_argument("--image-size", type=int, default=64, help="patch side in pixels")
    parser.add_argument("--stride", type=int, default=32, help="in-plane patch step in pixels")
    parser.add_argument("--modality", choices=("ct", "mr"), default=None, help="default: from --name or DICOM")
    parser.add_argument("--slice-step", type=int, default=1, help="patch every n-th slice")
    parser.add_argument("--min-foreground", type=float, default=0.1, help="minimum foreground fraction of a patch")
    args = parser.parse_args(argv)
    path = save_as_hdf5(
        args.input,
        args.name,
        args.out,
        image_size=args.image_size,
        stride=args.stride,
        modality=args.modality,
        slice_step=args.slice_step,
        min_foreground=args.min_foreground,
    )
    with h5py.File(path, "r") as f:
        print(f"wrote {path}: volume {f['volume'].shape}, {f['patches'].shape[0]} patches")


if __name__ == "__main__":
    main()
