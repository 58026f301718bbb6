"""Reading CT/MR volumes: NIfTI files and DICOM series folders, as (X, Y, Z) RAS float32
arrays in physical units (HU for CT, scanner units for MR) with (x, y, z) spacing in mm."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

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


def _file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def file_sha256(path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    return _file_sha256(Path(path)).hex()


def source_fingerprint(inputpath) -> str:
    """sha256 (hex) of a volume's content, whatever its files' times: the bytes of a file;
    for a DICOM series folder, every file's path relative to the folder and the sha256 of
    its bytes, in sorted order (a renamed, added, removed or changed file changes it)."""
    path = Path(inputpath)
    if not path.is_dir():
        return hashlib.sha256(_file_sha256(path)).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name + _file_sha256(file))
    return digest.hexdigest()


def voxel_fingerprint(volume: np.ndarray) -> str:
    """sha256 (hex) of a volume's voxels: its shape and its values as C-ordered float32. The
    RAS array of ``load_volume`` gives the same digest for the same voxels in any container
    (.nii, .nii.gz, another data type of the same values, a DICOM series)."""
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    digest = hashlib.sha256(repr(tuple(int(n) for n in volume.shape)).encode())
    digest.update(volume.tobytes())
    return digest.hexdigest()


def load_nifti_image(path: Path):
    """The NIfTI image of a file (a 4-D file with one volume is taken as 3-D); ValueError naming
    the file when it is unreadable, not 3-D or empty."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if len(img.shape) == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
    except Exception as err:
        raise ValueError(f"{path} is not a readable NIfTI image: {err}") from err
    if len(img.shape) != 3:
        raise ValueError(f"{path} has shape {img.shape}: expected a 3-D volume")
    if 0 in img.shape:
        raise ValueError(f"{path} is empty: shape {img.shape}")
    return img


def _is_dicom_file(path: Path) -> bool:
    """True if the file carries the DICOM part-10 preamble ('DICM' at byte 128)."""
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


#: attributes of the DICOM image pixel and image plane modules: a file with one is an image
IMAGE_ATTRIBUTES = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")
PIXEL_KEYS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def is_image_without_pixels(ds, series_uids: set[str]) -> bool:
    """Whether a DICOM dataset that has no pixel data is an image (a slice that must not be
    left out): its SOP class is an image storage class or unknown, it has an image attribute
    (IMAGE_ATTRIBUTES) or it belongs to one of ``series_uids`` (the image slices' series).
    False only for files that are clearly not images: a DICOMDIR, or a document (structured
    report, presentation state...) of another series without image attributes."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    uid = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    name = UID(str(uid)).name if uid else ""
    if "DirectoryRecordSequence" in ds or name == "Media Storage Directory Storage":  # a DICOMDIR
        return False
    if not uid or "Image Storage" in name or any(key in ds for key in IMAGE_ATTRIBUTES):
        return True
    return str(ds.get("SeriesInstanceUID", "")) in series_uids


def read_dicom_slices(folder: Path) -> list:
    """The image datasets of a DICOM series folder, each with its pixels decoded.

    Files without a DICOM preamble (notes, DICOMDIR-less exports) and DICOM files that are
    clearly not images (a DICOMDIR, a report of another series: ``is_image_without_pixels``)
    are skipped with a warning naming them; a DICOM file that cannot be read or decoded
    (corrupt header, truncated pixel data) and an image file without pixel data (header
    only) are errors naming the file, never skipped: a slice is never lost silently.
    """
    import warnings

    import pydicom

    slices, skipped, no_pixels = [], [], []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            is_dicom = _is_dicom_file(file)
        except OSError as err:
            raise ValueError(f"{file}: cannot be read ({err})") from err
        if not is_dicom:
            skipped.append(file.name)
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = pydicom.dcmread(str(file))
            has_pixels = any(key in ds for key in PIXEL_KEYS)
            if has_pixels:
                ds.decoded = ds.pixel_array.astype(np.float32)
            elif caught:  # pydicom read past a corrupt header leniently and lost the pixels
                raise ValueError(str(caught[0].message))
        except Exception as err:  # corrupt header, truncated or undecodable pixel data
            raise ValueError(f"{file}: unreadable DICOM slice ({type(err).__name__}: {err})") from err
        (slices if has_pixels else no_pixels).append(ds)
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in slices}
    for ds in no_pixels:
        if is_image_without_pixels(ds, series):
            raise ValueError(f"{ds.filename}: DICOM image without pixel data (header only): a slice of the "
                             f"series cannot be left out; restore its pixels or remove the file from {folder}")
    not_images = [Path(ds.filename).name for ds in no_pixels]
    for names, what in ((skipped, "non-DICOM file(s)"), (not_images, "DICOM file(s) that are not images")):
        if names:
            warnings.warn(f"{folder}: skipped {len(names)} {what}: {', '.join(names[:5])}"
                          + (" ..." if len(names) > 5 else ""))
    if not slices:
        raise ValueError(f"{folder} contains no DICOM image")
    return slices


def check_slice_positions(files: list[str], positions: np.ndarray, folder: Path) -> float:
    """The slice spacing (mm) of sorted slice positions; a ValueError naming the files of
    duplicated positions or of a gap that differs from the others by more than 1%."""
    if len(positions) < 2:
        return 0.0
    steps = np.diff(positions)
    duplicated = np.flatnonzero(np.abs(steps) < 1e-3)
    if duplicated.size:
        i = int(duplicated[0])
        raise ValueError(f"{folder}: slices {files[i]} and {files[i + 1]} lie at the same position "
                         f"({positions[i]:.3f} mm along the normal): a duplicated file?")
    spacing = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - spacing) > 0.01 * spacing)
    if uneven.size:
        i = int(uneven[0])
        raise ValueError(f"{folder}: uneven slice spacing, {steps[i]:.3f} mm between {files[i]} and "
                         f"{files[i + 1]} where the series has {spacing:.3f} mm (a missing or extra slice?)")
    return spacing


def dicom_series_image(folder: Path):
    """A DICOM series folder as a NIfTI image (array axes slice, row, col; RAS affine from
    ImageOrientationPatient, ImagePositionPatient and the spacings) and the DICOM Modality tag
    (lower case, or None). Slices are sorted along the slice normal and rescaled with
    RescaleSlope/RescaleIntercept (HU for CT). A series with unreadable, duplicated or
    unevenly spaced slices is refused, naming the files."""
    img, modality, _ = read_dicom_series(folder)
    return img, modality


def read_dicom_series(folder: Path):
    """``dicom_series_image`` and the series' files in the order of the image's first array
    axis: slice ``i`` of the image (rows, columns) is the pixel array of ``files[i]``."""
    import nibabel as nib

    slices = read_dicom_slices(folder)
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in slices}
    if len(series) > 1:
        raise ValueError(f"{folder} holds {len(series)} DICOM series: give a folder with one series")
    orientation = np.array(getattr(slices[0], "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [float(np.dot(normal, getattr(ds, "ImagePositionPatient", [0, 0, i]))) for i, ds in enumerate(slices)]
    order = np.argsort(positions)
    slices = [slices[i] for i in order]
    positions = np.asarray(positions)[order]
    shapes = {ds.decoded.shape for ds in slices}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: DICOM slices have different shapes {sorted(shapes)}")
    slice_mm = check_slice_positions([Path(ds.filename).name for ds in slices], positions, folder)
    volume = np.stack([ds.decoded * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
                       for ds in slices])
    row_mm, col_mm = (float(v) for v in getattr(slices[0], "PixelSpacing", [1.0, 1.0]))
    if len(slices) == 1:
        slice_mm = float(getattr(slices[0], "SliceThickness", 1.0))
    slice_mm = slice_mm if slice_mm > 0 else 1.0
    # array axes (slice, row, col) step along the normal, the column cosine (down a column) and
    # the row cosine, in patient LPS mm; RAS flips x and y
    affine = np.eye(4)
    affine[:3, :3] = np.stack([normal * slice_mm, orientation[3:] * row_mm, orientation[:3] * col_mm], axis=1)
    affine[:3, 3] = getattr(slices[0], "ImagePositionPatient", [0.0, 0.0, 0.0])
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    modality = str(getattr(slices[0], "Modality", "")).lower() or None
    return nib.Nifti1Image(volume.astype(np.float32), affine), modality, [Path(ds.filename) for ds in slices]


def read_image(inputpath):
    """A NIfTI file or DICOM series folder as (NIfTI image in its stored layout, modality found
    in the file: the DICOM Modality tag, else None)."""
    path = Path(inputpath)
    if not path.exists():
        raise FileNotFoundError(f"input path does not exist: {path}")
    if path.is_dir():
        return dicom_series_image(path)
    if is_nifti(path):
        return load_nifti_image(path), None
    raise ValueError(f"{path} is not an image: expected a .nii/.nii.gz file or a DICOM series folder")


def ras_array(img, name) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An image reoriented to the closest RAS axes (permuted/flipped, never resampled):
    (X, Y, Z) float32 physical values and (x, y, z) mm; ValueError naming ``name`` for NaN/inf
    voxels or voxel data that cannot be read (a truncated or corrupt .nii/.nii.gz: the header
    reads, the data ends early)."""
    import nibabel as nib

    canonical = nib.as_closest_canonical(img)
    try:
        volume = np.asarray(canonical.dataobj, dtype=np.float32)
    except Exception as err:  # EOFError / zlib.error / OSError of a truncated gzip, short data of a .nii
        raise ValueError(f"{name}: cannot read the voxel data, the file is truncated or corrupt "
                         f"({type(err).__name__}: {err})") from err
    if not np.isfinite(volume).all():
        raise ValueError(f"{name} has {int((~np.isfinite(volume)).sum())} NaN or inf voxels")
    return volume, tuple(float(z) for z in canonical.header.get_zooms()[:3])


def from_ras_array(img, ras_values: np.ndarray) -> np.ndarray:
    """Inverse of ``ras_array``: (X, Y, Z) RAS values back to the array layout of ``img``
    (its stored axes and directions; for a DICOM series: slice, row, column)."""
    import nibabel as nib

    ras_ornt = nib.orientations.io_orientation(nib.as_closest_canonical(img).affine)
    back = nib.orientations.ornt_transform(ras_ornt, nib.orientations.io_orientation(img.affine))
    return nib.orientations.apply_orientation(np.asarray(ras_values), back)


def load_volume(inputpath) -> tuple[np.ndarray, tuple[float, float, float], str | None]:
    """Load a NIfTI file or DICOM series folder: the (X, Y, Z) RAS float32 physical values,
    their (x, y, z) spacing in mm and the modality found in the file (DICOM only, else None)."""
    img, found = read_image(inputpath)
    volume, spacing = ras_array(img, inputpath)
    return volume, spacing, found
