"""NIfTI/DICOM -> HDF5 conversion: layout, values, orientation, metadata and bad input."""

import h5py
import nibabel as nib
import numpy as np
import pytest

from utils import create_training_images as cti
from utils.create_training_images import FOREGROUND_THRESHOLD, main, save_as_hdf5
from utils.intensity import normalize, to_physical


def write_nifti(path, data, zooms=(1.0, 1.0, 1.0)):
    """Save data with a diagonal (RAS) affine of the given voxel sizes."""
    affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def ct_phantom(shape=(40, 36, 12)):
    """(X, Y, Z) int16 HU: air with a 0 HU block and a 1000 HU row of pixels; every voxel distinct in z."""
    data = np.full(shape, -1024, dtype=np.int16)
    data[4:30, 6:30, :] = 0
    data[10, 8:20, :] = 1000
    data += np.arange(shape[2], dtype=np.int16)[None, None, :]
    return data


def leftover(folder):
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_values_orientation_and_metadata(tmp_path):
    data = ct_phantom()
    src = write_nifti(tmp_path / "head_ct.nii.gz", data, zooms=(0.5, 0.8, 2.0))
    out = save_as_hdf5(src, "ct", tmp_path / "h5", image_size=16, stride=8, progress=False)
    assert out == tmp_path / "h5" / "ct.h5"
    assert leftover(tmp_path / "h5") == ["ct.h5"]
    with h5py.File(out, "r") as f:
        volume = f["volume"][:]
        assert volume.dtype == np.uint16 and volume.shape == (12, 36, 40)
        # radiological display: row r <- y = ny-1-r, col c <- x = nx-1-c
        display = data[::-1, ::-1, :].transpose(2, 1, 0)
        expected01, _ = normalize(display, "ct")
        np.testing.assert_array_equal(volume, np.round(expected01 * 65535).astype(np.uint16))
        hu = to_physical(volume / 65535.0, {"low": f.attrs["norm_low"], "high": f.attrs["norm_high"]})
        np.testing.assert_allclose(hu, display, atol=0.05)
        patches, index, origin = f["patches"][:], f["slice_index"][:], f["origin"][:]
        assert patches.dtype == np.uint16 and patches.shape[1:] == (16, 16)
        assert index.dtype == np.int32 and origin.dtype == np.int32 and origin.shape == (len(patches), 2)
        for p, z, (r, c) in zip(patches, index, origin):
            np.testing.assert_array_equal(p, volume[z, r : r + 16, c : c + 16])
            assert (p / 65535.0 > FOREGROUND_THRESHOLD).mean() >= 0.1
        assert sorted(set(index.tolist())) == list(range(12))
        a = f.attrs
        assert a["source"] == "head_ct.nii.gz" and a["modality"] == "ct"
        np.testing.assert_allclose(a["spacing"], [0.8, 0.5, 2.0])
        assert (a["norm_low"], a["norm_high"]) == (-1024.0, 3071.0)
        assert (a["image_size"], a["stride"], a["slice_step"], a["format_version"]) == (16, 8, 1, 1)
        assert a["min_foreground"] == pytest.approx(0.1)


def test_background_patches_rejected_and_edges_covered(tmp_path):
    data = np.full((40, 40, 3), -1024, dtype=np.int16)
    data[:8, :8, :] = 40  # tissue only in one corner
    src = write_nifti(tmp_path / "ct.nii", data)
    with h5py.File(save_as_hdf5(src, "ct", tmp_path, image_size=16, stride=16, progress=False), "r") as f:
        origins = {tuple(o) for o in f["origin"][:]}
        # the corner x<8, y<8 lands at the bottom right of the display; the edge patch (24, 24) covers it
        assert origins == {(24, 24)}
        assert len(f["patches"]) == 3


def test_mr_percentile_norm_slice_step_and_seed_call(tmp_path):
    rng = np.random.default_rng(0)
    data = np.zeros((70, 66, 9), dtype=np.float32)
    data[5:65, 5:60, :] = rng.uniform(100, 200, size=(60, 55, 9))
    src = write_nifti(tmp_path / "brain.nii.gz", data)
    path = save_as_hdf5(inputpath=src, datasetname="mr", targetdir=tmp_path / "o", image_size=64, stride=32)
    with h5py.File(path, "r") as f:
        assert f.attrs["modality"] == "mr"
        nz = data[data != 0]
        assert f.attrs["norm_low"] == pytest.approx(np.percentile(nz, 0.5), rel=1e-5)
        assert f.attrs["norm_high"] == pytest.approx(np.percentile(nz, 99.5), rel=1e-5)
        assert f["patches"].shape[1:] == (64, 64)
    path = save_as_hdf5(src, "brain", tmp_path / "o", image_size=16, stride=16, modality="MR", slice_step=4, progress=False)
    with h5py.File(path, "r") as f:
        assert sorted(set(f["slice_index"][:].tolist())) == [0, 4, 8]
        assert f.attrs["slice_step"] == 4


def test_trailing_singleton_4d_is_accepted(tmp_path):
    src = write_nifti(tmp_path / "x.nii.gz", ct_phantom()[..., None])
    with h5py.File(save_as_hdf5(src, "ct", tmp_path, image_size=16, progress=False), "r") as f:
        assert f["volume"].shape == (12, 36, 40)


def test_dicom_series(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    series = generate_uid()
    folder = tmp_path / "series"
    folder.mkdir()
    values = {}
    for i, z in enumerate([4.0, 0.0, 2.0]):  # files out of slice order
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, series
        ds.Modality = "CT"
        ds.Rows, ds.Columns = 20, 24
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelSpacing = [0.7, 0.6]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, z]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        pixels = np.full((20, 24), 1024 + 10 * int(z), dtype=np.int16)
        values[z] = pixels.astype(float) - 1024
        ds.PixelData = pixels.tobytes()
        ds.save_as(str(folder / f"im{i}.dcm"), enforce_file_format=True)
    (folder / "notes.txt").write_text("not dicom")
    path = save_as_hdf5(folder, "scan", tmp_path / "o", image_size=16, stride=8, progress=False)
    with h5py.File(path, "r") as f:
        assert f.attrs["modality"] == "ct"  # from the DICOM Modality tag
        np.testing.assert_allclose(f.attrs["spacing"], [0.7, 0.6, 2.0])
        hu = to_physical(f["volume"][:] / 65535.0, {"low": -1024.0, "high": 3071.0})
        np.testing.assert_allclose(hu[:, 0, 0], [values[0.0][0, 0], values[2.0][0, 0], values[4.0][0, 0]], atol=0.05)


def test_cli(tmp_path, capsys):
    src = write_nifti(tmp_path / "v.nii.gz", ct_phantom())
    main([str(src), "--name", "vol", "--out", str(tmp_path / "cli"), "--image-size", "16", "--stride", "8", "--modality", "ct", "--slice-step", "2"])
    with h5py.File(tmp_path / "cli" / "vol.h5", "r") as f:
        assert f.attrs["slice_step"] == 2 and f.attrs["image_size"] == 16
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.nii.gz", "does not exist"),
        (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "not an image"),
        (lambda d: (d / "broken.nii.gz").write_bytes(b"garbage") and d / "broken.nii.gz", "not a readable NIfTI"),
        (lambda d: write_nifti(d / "flat.nii.gz", np.zeros((40, 40), np.int16)), "expected a 3-D volume"),
        (lambda d: write_nifti(d / "4d.nii.gz", np.zeros((40, 40, 4, 2), np.int16)), "expected a 3-D volume"),
        (lambda d: write_nifti(d / "empty.nii.gz", np.zeros((40, 40, 0), np.int16)), "empty"),
        (lambda d: write_nifti(d / "nan.nii.gz", np.where(np.arange(40 * 40 * 2).reshape(40, 40, 2) == 5, np.nan, 0).astype(np.float32)), "NaN or inf"),
        (lambda d: write_nifti(d / "inf.nii.gz", np.where(np.arange(40 * 40 * 2).reshape(40, 40, 2) == 5, np.inf, 0).astype(np.float32)), "NaN or inf"),
        (lambda d: write_nifti(d / "small.nii.gz", np.zeros((40, 12, 3), np.int16)), "larger than"),
        (lambda d: write_nifti(d / "air.nii.gz", np.full((40, 40, 3), -1024, np.int16)), "no patch"),
        (lambda d: d, "no DICOM image"),
    ],
)
def test_bad_input_raises_and_leaves_nothing(tmp_path, make, message):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = make(src_dir)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        save_as_hdf5(src, "ct", out, image_size=16, progress=False)
    assert message in str(err.value)
    assert leftover(out) == []


def test_bad_target_and_modality(tmp_path):
    src = write_nifti(tmp_path / "v.nii.gz", ct_phantom())
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile"):
        save_as_hdf5(src, "ct", tmp_path / "afile", image_size=16)
    with pytest.raises(ValueError, match="modality of dataset 'brain'"):
        save_as_hdf5(src, "brain", tmp_path / "o", image_size=16)
    with pytest.raises(ValueError, match="unknown modality 'pet'"):
        save_as_hdf5(src, "x", tmp_path / "o", image_size=16, modality="pet")
    with pytest.raises(ValueError, match="min_foreground"):
        save_as_hdf5(src, "ct", tmp_path / "o", image_size=16, min_foreground=1.5)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    src = write_nifti(tmp_path / "v.nii.gz", ct_phantom())
    out = tmp_path / "o"

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cti, "tqdm", broken)
    with pytest.raises(KeyboardInterrupt):
        save_as_hdf5(src, "ct", out, image_size=16)
    assert leftover(out) == []
