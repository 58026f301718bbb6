"""A DICOM series in, a DICOM series out (denoise.py --output-dicom, denoise_volume(output_dicom=)):
every output file is its input slice with the denoised pixels at the same (row, col), stored
like the input, new UIDs and the original geometry; refusals come before any work and a
failed write leaves nothing behind."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import utils.dicom_writer as dicom_writer
from models.ddpm_conditioned import ConditionDDPM
from orchestration.volume_denoiser import denoise_volume
from synthetic import load_script, write_dicom_slice
from utils.dicom_writer import DESCRIPTION_SUFFIX, stored_pixels
from utils.volume_io import load_volume, read_image

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "pretrained" / "cdm4mi_bundled_ct_mr.ckpt"
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
            "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
            "StudyInstanceUID", "FrameOfReferenceUID", "InstanceNumber")
#: name -> (ImageOrientationPatient, position of slice i in LPS mm): files im0..im3
LAYOUTS = {
    "axial": ((1, 0, 0, 0, 1, 0), lambda i: [-10.0, 20.0, 5.0 + 3.0 * i]),
    # row direction right-to-left: the slice normal points down, so the sort reverses the files
    "flipped_rows": ((-1, 0, 0, 0, 1, 0), lambda i: [10.0, 20.0, 5.0 + 3.0 * i]),
    "reversed_files": ((1, 0, 0, 0, 1, 0), lambda i: [-10.0, 20.0, 50.0 - 3.0 * i]),
    "coronal": ((1, 0, 0, 0, 0, -1), lambda i: [-10.0, 20.0 + 3.0 * i, 40.0]),
}


@pytest.fixture(scope="module")
def model():
    return ConditionDDPM.load_from_checkpoint(str(CKPT), map_location="cpu").eval()


def write_series(folder, layout="axial", n=4, seed=0):
    """A CT series of ``n`` 20 x 24 slices with distinct random pixels (HU -1024..1475)."""
    folder.mkdir()
    orientation, position = LAYOUTS[layout]
    uid, study, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = write_dicom_slice(folder / f"im{i}.dcm", uid, position(i), orientation=orientation,
                                 pixels=rng.integers(0, 2500, size=(20, 24)))
        ds = pydicom.dcmread(str(path))
        ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.InstanceNumber = study, frame, i + 1
        ds.SliceThickness, ds.SeriesNumber, ds.SeriesDescription = 3.0, 7, "head plain"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.save_as(str(path), enforce_file_format=True)
    return folder


def pairs(src, out):
    """(input dataset, output dataset) per input file, matched by file name."""
    names = sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names  # one output file per input slice
    return [(pydicom.dcmread(str(src / n)), pydicom.dcmread(str(out / n))) for n in names]


def leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_identity_gives_back_every_file_pixel_for_pixel_with_new_uids(model, tmp_path, layout):
    src = write_series(tmp_path / "series", layout)
    out = tmp_path / "den"
    if layout == "axial":
        out.mkdir()  # an existing empty folder is fine
    with pytest.warns(UserWarning, match="no noise to remove"):  # sigma 0 returns the input unchanged
        info = denoise_volume(model, src, tmp_path / "den.nii.gz", output_dicom=out, sigma=0.0, progress=False)
    assert info["output_dicom"] == out
    series_uids, sop_uids = set(), set()
    for a, b in pairs(src, out):
        np.testing.assert_array_equal(b.pixel_array, a.pixel_array)
        assert b.pixel_array.dtype == a.pixel_array.dtype
        for tag in GEOMETRY:
            assert b.get(tag) == a.get(tag), tag
        assert b.SOPInstanceUID != a.SOPInstanceUID
        assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
        assert b.SOPClassUID == a.SOPClassUID and b.file_meta.MediaStorageSOPClassUID == a.SOPClassUID
        assert b.SeriesInstanceUID != a.SeriesInstanceUID
        assert b.SeriesDescription == "head plain" + DESCRIPTION_SUFFIX and b.SeriesNumber == 1007
        assert list(b.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert "CDM4MI" in b.DerivationDescription and f"t*={info['t_star']}" in b.DerivationDescription
        assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
        series_uids.add(b.SeriesInstanceUID)
        sop_uids.add(b.SOPInstanceUID)
    assert len(series_uids) == 1 and len(sop_uids) == 4
    # read back: the same RAS volume, spacing and affine as the input series
    vol_in, zooms_in, _ = load_volume(src)
    vol_out, zooms_out, modality = load_volume(out)
    np.testing.assert_array_equal(vol_out, vol_in)
    assert zooms_out == zooms_in and modality == "ct"
    affine = lambda folder: nib.as_closest_canonical(read_image(folder)[0]).affine
    np.testing.assert_allclose(affine(out), affine(src), atol=1e-9)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("layout", ["flipped_rows", "coronal"])
def test_a_voxel_change_lands_at_the_same_row_and_col_of_the_same_file(model, tmp_path, monkeypatch, layout):
    """A stand-in model adds 100 HU wherever the input is above 0 HU: the output files differ
    from the inputs by exactly that, pixel for pixel."""
    def shifted(noisy, **kw):  # model units: [-1, 1] is HU -1024..3071
        hu = (noisy.double() + 1) / 2 * 4095 - 1024
        return torch.where(hu > 0.5, noisy + 2 * 100 / 4095, noisy), torch.zeros_like(noisy)

    monkeypatch.setattr(model, "denoise", shifted)
    src = write_series(tmp_path / "series", layout, seed=1)
    denoise_volume(model, src, tmp_path / "den.nii.gz", output_dicom=tmp_path / "den", sigma=0.05, progress=False)
    changed = 0
    for a, b in pairs(src, tmp_path / "den"):
        expected = np.where(a.pixel_array > 1024, a.pixel_array + 100, a.pixel_array)
        np.testing.assert_array_equal(b.pixel_array, expected)
        changed += int((a.pixel_array > 1024).sum())
    assert 0 < changed < 4 * 20 * 24


def test_a_compressed_nested_series_comes_back_uncompressed_at_the_same_paths(model, tmp_path):
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    src = write_series(tmp_path / "series")
    (src / "sub").mkdir()
    for name in ("im1.dcm", "im3.dcm"):
        ds = pydicom.dcmread(str(src / name))
        ds.compress(RLELossless)
        ds.save_as(str(src / "sub" / name), enforce_file_format=True)
        (src / name).unlink()
    with pytest.warns(UserWarning, match="no noise to remove"):
        denoise_volume(model, src, tmp_path / "den.nii.gz", output_dicom=tmp_path / "den", sigma=0.0, progress=False)
    for name in ("im0.dcm", "im2.dcm", "sub/im1.dcm", "sub/im3.dcm"):
        a, b = pydicom.dcmread(str(src / name)), pydicom.dcmread(str(tmp_path / "den" / name))
        np.testing.assert_array_equal(b.pixel_array, a.pixel_array)
        assert b.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_stored_pixels_invert_the_rescale_and_clip_to_bits_stored():
    ds = Dataset()
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, 12, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2.5, -1000
    raw = np.array([[0, 1, 2047, 4095]], dtype=np.uint16)
    values = (raw * 2.5 - 1000).astype(np.float32)
    back = stored_pixels(values, ds)
    assert back.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(back, raw)
    np.testing.assert_array_equal(stored_pixels(np.array([-5000.0, 1e6, -998.8]), ds), [0, 4095, 0])
    ds.PixelRepresentation = 1
    np.testing.assert_array_equal(stored_pixels(np.array([-1e6, 1e6]), ds), [-2048, 2047])


def test_output_dicom_is_refused_for_a_nifti_input_and_an_existing_folder(model, tmp_path):
    nii = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 4), np.float32), np.eye(4)), str(nii))
    with pytest.raises(ValueError, match="needs a DICOM series folder as input"):
        denoise_volume(model, nii, tmp_path / "o.nii.gz", output_dicom=tmp_path / "den", modality="ct", sigma=0.0)
    src = write_series(tmp_path / "series")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"{full} exists and is not empty"):
        denoise_volume(model, src, tmp_path / "o.nii.gz", output_dicom=full, sigma=0.0)
    with pytest.raises(ValueError, match="inside the input series folder"):
        denoise_volume(model, src, tmp_path / "o.nii.gz", output_dicom=src / "den", sigma=0.0)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "full", "series"]  # no output at all
    # the command line refuses before it reads the checkpoint (a missing one here)
    script = load_script("denoise.py")
    with pytest.raises(SystemExit, match="needs a DICOM series folder as input"):
        script.main(["--ckpt", str(tmp_path / "none.ckpt"), "--input", str(nii), "--output",
                     str(tmp_path / "o.nii.gz"), "--output-dicom", str(tmp_path / "den")])
    with pytest.raises(SystemExit, match="is not empty"):
        script.main(["--ckpt", str(tmp_path / "none.ckpt"), "--input", str(src), "--output",
                     str(tmp_path / "o.nii.gz"), "--output-dicom", str(full)])


def test_a_failed_write_leaves_no_folder_and_no_temporary(model, tmp_path, monkeypatch):
    src = write_series(tmp_path / "series")
    derive, calls = dicom_writer.derive, []

    def failing(ds, *args):
        calls.append(ds.filename)
        if len(calls) == 3:
            raise OSError("disk full")
        return derive(ds, *args)

    monkeypatch.setattr(dicom_writer, "derive", failing)
    with pytest.warns(UserWarning, match="no noise to remove"), pytest.raises(OSError, match="disk full"):
        denoise_volume(model, src, tmp_path / "den.nii.gz", output_dicom=tmp_path / "den", sigma=0.0, progress=False)
    assert not (tmp_path / "den").exists() and leftovers(tmp_path) == []


def test_cli_writes_the_series_and_says_where(tmp_path, capsys):
    src = write_series(tmp_path / "series")
    script = load_script("denoise.py")
    with pytest.warns(UserWarning, match="no noise to remove"):
        info = script.main(["--ckpt", str(CKPT), "--input", str(src), "--output", str(tmp_path / "den.nii.gz"),
                            "--output-dicom", str(tmp_path / "den"), "--sigma", "0"])
    assert f"DICOM series: {tmp_path / 'den'}" in capsys.readouterr().out
    assert len(list(info["output_dicom"].iterdir())) == 4


@pytest.mark.parametrize("bad", ["im0.dcm", "im1.dcm", "im3.dcm"], ids=["first", "middle", "last"])
def test_a_slice_without_pixels_is_refused_before_any_output(model, tmp_path, bad):
    """Before: a pixel-less first or last slice vanished from both outputs (3 of 4 slices in
    the NIfTI and the DICOM series), a middle one was called uneven spacing."""
    src = write_series(tmp_path / "series")
    ds = pydicom.dcmread(str(src / bad))
    del ds.PixelData
    ds.save_as(str(src / bad), enforce_file_format=True)
    with pytest.raises(ValueError, match=rf"{bad.replace('.', '[.]')}: DICOM image without pixel data"):
        denoise_volume(model, src, tmp_path / "den.nii.gz", output_dicom=tmp_path / "den", sigma=0.0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]  # neither the NIfTI nor the series
