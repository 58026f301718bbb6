"""DICOM series in, robustly: unreadable, truncated, duplicated or unevenly spaced slices are
refused with the files named, never skipped silently; a truncated NIfTI file is named too."""
import gzip
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from synthetic import write_dicom_slice
from utils.volume_io import load_volume


def series(folder, zs, uid=None):
    folder.mkdir(exist_ok=True)
    uid = uid or generate_uid()
    for i, z in enumerate(zs):
        pixels = np.full((20, 24), 1024 + 10 * i, dtype=np.int16)
        write_dicom_slice(folder / f"im{i:02d}.dcm", uid, [0, 0, z], pixels=pixels)
    return folder


def test_a_clean_series_loads_with_its_spacing(tmp_path):
    volume, zooms, modality = load_volume(series(tmp_path / "s", [0, 2, 4, 6, 8, 10]))
    assert volume.shape == (24, 20, 6) and modality == "ct"
    np.testing.assert_allclose(zooms, [0.6, 0.7, 2.0])
    np.testing.assert_allclose(volume[0, 0, :], [0, 10, 20, 30, 40, 50])  # HU, sorted by position


def test_a_header_corrupt_file_is_named(tmp_path):
    folder = series(tmp_path / "s", [0, 2, 4, 6, 8, 10])
    bad = folder / "im03.dcm"
    data = bytearray(bad.read_bytes())
    data[140:200] = b"\xff" * 60  # garbage where the first elements' tags and lengths are
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"im03\.dcm: unreadable DICOM slice"):
        load_volume(folder)


def test_a_truncated_slice_is_named(tmp_path):
    folder = series(tmp_path / "s", [0, 2, 4])
    bad = folder / "im01.dcm"
    bad.write_bytes(bad.read_bytes()[:-300])  # pixel data cut short
    with pytest.raises(ValueError, match=r"im01\.dcm: unreadable DICOM slice"):
        load_volume(folder)


def test_a_duplicated_file_is_refused(tmp_path):
    folder = series(tmp_path / "s", [0, 2, 4, 6])
    (folder / "copy_of_im02.dcm").write_bytes((folder / "im02.dcm").read_bytes())
    with pytest.raises(ValueError, match=r"(copy_of_im02\.dcm and im02\.dcm|im02\.dcm and copy_of_im02\.dcm) lie at the same position"):
        load_volume(folder)


def test_a_missing_slice_is_refused_as_uneven_spacing(tmp_path):
    folder = series(tmp_path / "s", [0, 2, 4, 6, 8, 10])
    (folder / "im03.dcm").unlink()  # 4 -> 8 mm: a 4 mm gap in a 2 mm series
    with pytest.raises(ValueError, match=r"uneven slice spacing, 4\.000 mm between im02\.dcm and im04\.dcm .* 2\.000 mm"):
        load_volume(folder)


def test_non_dicom_files_are_skipped_with_a_warning(tmp_path):
    folder = series(tmp_path / "s", [0, 2, 4])
    (folder / "README.txt").write_text("exported by a scanner")
    with pytest.warns(UserWarning, match="skipped 1 non-DICOM file.*README.txt"):
        volume, _, _ = load_volume(folder)
    assert volume.shape[2] == 3


def strip_pixels(path, how="no PixelData"):
    """Rewrite a slice without its pixels: no PixelData element, an empty one, or the file
    meta header alone (preamble, 'DICM', group 0002, no data set)."""
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(str(path))
    if how == "no PixelData":
        del ds.PixelData
    elif how == "empty PixelData":
        ds.PixelData = b""
    else:
        meta, ds = ds.file_meta, Dataset()
        ds.file_meta = meta
    ds.save_as(str(path), enforce_file_format=True)


@pytest.mark.parametrize("how", ["no PixelData", "empty PixelData", "file meta header only"])
@pytest.mark.parametrize("bad", [0, 2, 3], ids=["first", "middle", "last"])
def test_a_slice_without_pixels_is_refused_by_name(tmp_path, bad, how):
    """Before: a pixel-less first or last slice was dropped silently (3 of 4 slices loaded),
    a middle one was reported as uneven spacing between its neighbours."""
    folder = series(tmp_path / "s", [0, 2, 4, 6])
    strip_pixels(folder / f"im{bad:02d}.dcm", how)
    with pytest.raises(ValueError, match=rf"im{bad:02d}\.dcm: (DICOM image without pixel data|unreadable DICOM slice)"):
        load_volume(folder)


def test_a_dicom_file_that_is_not_an_image_is_skipped_but_named(tmp_path):
    """A DICOMDIR and a structured report of another series have no pixels and are no slice:
    skipped with a warning naming them; the series loads whole."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder = series(tmp_path / "s", [0, 2, 4])
    for name, sop_class in (("DICOMDIR", "1.2.840.10008.1.3.10"), ("report.dcm", "1.2.840.10008.5.1.4.1.1.88.33")):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        if name == "report.dcm":
            ds.SOPClassUID, ds.SeriesInstanceUID, ds.Modality = sop_class, generate_uid(), "SR"
        ds.save_as(str(folder / name), enforce_file_format=True)
    assert pydicom.dcmread(str(folder / "DICOMDIR")).file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    with pytest.warns(UserWarning, match=r"skipped 2 DICOM file\(s\) that are not images: DICOMDIR, report\.dcm"):
        volume, _, _ = load_volume(folder)
    assert volume.shape[2] == 3


def test_a_pixel_less_file_of_the_series_is_refused_even_without_image_tags(tmp_path):
    """A file of the series' SeriesInstanceUID with an unknown SOP class and no image tags
    still counts as a slice of the series."""
    import pydicom

    folder = series(tmp_path / "s", [0, 2, 4], uid="1.2.3.4.5")
    ds = pydicom.dcmread(str(folder / "im01.dcm"))
    for key in ("PixelData", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
                "PhotometricInterpretation"):
        delattr(ds, key)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.3.999"
    ds.save_as(str(folder / "im01.dcm"), enforce_file_format=True)
    with pytest.raises(ValueError, match=r"im01\.dcm: DICOM image without pixel data"):
        load_volume(folder)


BUNDLED_CT = Path(__file__).resolve().parents[1] / "run_scripts" / "data" / "ct_cranium.nii.gz"


@pytest.mark.parametrize("kind", ["first half of the .nii.gz", "first half of the .nii", "gzip header only"])
def test_a_truncated_nifti_is_named(tmp_path, kind):
    """The header of a cut file still reads; the voxel data then ends early (EOFError of gzip,
    OSError of nibabel) and the error names the file."""
    data = BUNDLED_CT.read_bytes()
    if kind == "first half of the .nii":
        path, raw = tmp_path / "cut.nii", gzip.decompress(data)
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path = tmp_path / "cut.nii.gz"
        path.write_bytes(data[: len(data) // 2] if kind.startswith("first") else data[:100])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_volume(path)
