"""Writing a processed volume as a new DICOM series beside the series it came from.

Each output file is a copy of one input slice's dataset with new pixels stored like the
input's (RescaleSlope/RescaleIntercept inverted, rounded, clipped to BitsStored; the same
BitsAllocated and PixelRepresentation), a new SeriesInstanceUID for the whole series, a
new SOPInstanceUID per file, the series marked as derived (ImageType DERIVED\\SECONDARY,
DerivationDescription, SourceImageSequence pointing at the input slice) and the geometry
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness), study and
frame of reference untouched. Compressed inputs are written uncompressed (Explicit VR
Little Endian).

The folder is written atomically: into a temporary sibling folder (named like
``utils.atomic``'s temporaries), renamed into place when every file is written; on an error
the temporary folder is removed, so the target either holds the whole series or does not
exist. An existing non-empty target is refused.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from utils.atomic import atomic_write, temp_prefix

DESCRIPTION_SUFFIX = " denoised (CDM4MI)"
#: added to the input's SeriesNumber (modulo SERIES_NUMBER_RANGE) for the output series
SERIES_NUMBER_OFFSET = 1000
SERIES_NUMBER_RANGE = 100_000
#: transfer syntaxes kept as they are; any other (compressed, deflated, big endian) becomes
#: Explicit VR Little Endian
_NATIVE_LITTLE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
#: value lengths of the VR LO (SeriesDescription) and ST (DerivationDescription)
_LO_MAX, _ST_MAX = 64, 1024


def check_output_folder(folder) -> Path:
    """``folder`` as a Path if a series can be written there (it does not exist or is an
    empty folder); a ValueError naming it otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"DICOM output {folder} exists and is not a folder: give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"DICOM output folder {folder} exists and is not empty: give a new or empty folder")
    return folder


def _stored_range(ds) -> tuple[np.dtype, int, int]:
    """The little-endian pixel dtype of a slice (BitsAllocated, PixelRepresentation) and
    the range of its BitsStored."""
    bits = int(ds.BitsAllocated)
    if bits not in (8, 16, 32):
        raise ValueError(f"{ds.filename}: BitsAllocated {bits} is not supported for DICOM output (8, 16 or 32)")
    stored = int(getattr(ds, "BitsStored", bits))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    if signed:
        return dtype, -(1 << (stored - 1)), (1 << (stored - 1)) - 1
    return dtype, 0, (1 << stored) - 1


def check_writable(files) -> None:
    """A ValueError naming the first slice that cannot be written back (several frames or
    samples per pixel, an unsupported BitsAllocated, a zero RescaleSlope). Reads headers only."""
    import pydicom

    for file in files:
        ds = pydicom.dcmread(str(file), stop_before_pixels=True)
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1 or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
            raise ValueError(f"{file}: only single-frame grayscale slices can be written as a DICOM series")
        if float(getattr(ds, "RescaleSlope", 1)) == 0:
            raise ValueError(f"{file}: RescaleSlope is 0, the stored values cannot be recovered")
        _stored_range(ds)


def stored_pixels(values: np.ndarray, ds) -> np.ndarray:
    """Physical values (HU for CT) of one slice as the stored pixel values of ``ds``:
    (values - RescaleIntercept) / RescaleSlope, rounded and clipped to BitsStored, in the
    slice's BitsAllocated/PixelRepresentation dtype (little endian)."""
    slope = float(getattr(ds, "RescaleSlope", 1))
    intercept = float(getattr(ds, "RescaleIntercept", 0))
    dtype, low, high = _stored_range(ds)
    raw = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope)
    return np.clip(raw, low, high).astype(dtype)


def derive(ds, values: np.ndarray, series_uid: str, series_number: int, derivation: str):
    """Turn ``ds`` (one input slice, read from its file) into the output slice in place."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    if values.shape != (int(ds.Rows), int(ds.Columns)):
        raise ValueError(f"{ds.filename}: {ds.Rows} x {ds.Columns} pixels, the volume has {values.shape}")
    pixels = stored_pixels(values, ds)
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.SourceImageSequence = [source]
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    old = str(getattr(ds, "SeriesDescription", "") or "")
    ds.SeriesDescription = (old[: _LO_MAX - len(DESCRIPTION_SUFFIX)] + DESCRIPTION_SUFFIX).strip()
    ds.ImageType = ["DERIVED", "SECONDARY", *list(getattr(ds, "ImageType", []))[2:]]
    ds.DerivationDescription = derivation[:_ST_MAX]
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):  # no longer true
        if keyword in ds:
            delattr(ds, keyword)
    if "PixelData" in ds:
        del ds.PixelData  # may be encapsulated (compressed): replaced, not overwritten
    ds.add_new(0x7FE00010, "OW" if pixels.dtype.itemsize > 1 else "OB", pixels.tobytes())
    meta = ds.file_meta
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if str(meta.TransferSyntaxUID) not in _NATIVE_LITTLE:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if int(pydicom.__version__.split(".")[0]) < 3:  # pydicom 3 encodes as the file meta says
            ds.is_implicit_VR, ds.is_little_endian = False, True
    return ds


def _save(ds, path: str) -> None:
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)


def write_dicom_series(folder, volume: np.ndarray, files, root, derivation: str) -> Path:
    """Write ``volume`` (S, rows, columns) of physical values as a new series into ``folder``:
    slice ``i`` becomes a copy of ``files[i]`` (at the same path relative to ``root``, the
    input series folder) with the new pixels, UIDs and derivation (see the module docstring)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder = check_output_folder(folder)
    files = [Path(f) for f in files]
    if volume.ndim != 3 or volume.shape[0] != len(files):
        raise ValueError(f"a volume of shape {volume.shape} cannot be written as {len(files)} DICOM slices")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=temp_prefix(), suffix=f"-{folder.name}"))
    try:
        series_uid = generate_uid()
        series_number = None
        for values, file in zip(volume, files):
            ds = pydicom.dcmread(str(file))
            if series_number is None:
                old = getattr(ds, "SeriesNumber", None)
                old = 0 if old in (None, "") else int(old)
                series_number = (old + SERIES_NUMBER_OFFSET) % SERIES_NUMBER_RANGE
            derive(ds, values, series_uid, series_number, derivation)
            atomic_write(tmp / file.relative_to(root), lambda path: _save(ds, path))
        check_output_folder(folder)  # filled by someone else meanwhile?
        if folder.is_dir():
            folder.rmdir()
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
