"""NIfTI/DICOM -> HDF5 conversion: layout, values, orientation, metadata and bad input."""

import h5py
import nibabel as nib
import numpy as np
import pytest

from utils import create_training_images as cti
from synthetic import write_dicom_slice
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
        assert (a["image_size"], a["stride"], a["slice_step"], a["format_version"]) == (16, 8, 1, cti.FORMAT_VERSION)
        assert a["plane"] == a["acquisition_plane"] == "axial"  # thickest voxels along z
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


# coronal: rows run inferior, slices are sorted along the normal (posterior), the plane's
# slices run anterior, so the stored order is reversed
@pytest.mark.parametrize("plane, orientation, position, order", [
    ("axial", [1, 0, 0, 0, 1, 0], lambda s: [0, 0, s], [0.0, 2.0, 4.0]),
    ("coronal", [1, 0, 0, 0, 0, -1], lambda s: [0, s, 0], [4.0, 2.0, 0.0]),
])
def test_dicom_series(tmp_path, plane, orientation, position, order):
    from pydicom.uid import generate_uid

    series = generate_uid()
    folder = tmp_path / "series"
    folder.mkdir()
    values = {}
    for i, z in enumerate([4.0, 0.0, 2.0]):  # files out of slice order
        pixels = np.full((20, 24), 1024 + 10 * int(z), dtype=np.int16)
        pixels[2, 3] = 3000  # stored display is the plane's display: the mark stays at (2, 3)
        values[z] = pixels.astype(float) - 1024
        write_dicom_slice(folder / f"im{i}.dcm", series, position(z), orientation, pixels)
    (folder / "notes.txt").write_text("not dicom")
    with pytest.warns(UserWarning, match="skipped 1 non-DICOM file"):
        path = save_as_hdf5(folder, "scan", tmp_path / "o", image_size=16, stride=8, progress=False)
    with h5py.File(path, "r") as f:
        assert f.attrs["modality"] == "ct"  # from the DICOM Modality tag
        np.testing.assert_allclose(f.attrs["spacing"], [0.7, 0.6, 2.0])
        assert f.attrs["plane"] == f.attrs["acquisition_plane"] == plane
        hu = to_physical(f["volume"][:] / 65535.0, {"low": -1024.0, "high": 3071.0})
        np.testing.assert_allclose(hu[:, 0, 0], [values[s][0, 0] for s in order], atol=0.05)
        assert hu.shape == (3, 20, 24) and (hu[:, 2, 3] > 1900).all() and (hu[:, 2:4, 3:5] > 1900).sum() == 3


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


KILLED_CONVERSION = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from utils import create_training_images as cti

def killed(iterable, **kwargs):  # the progress bar: SIGKILL after the first slice is written
    for i, item in enumerate(iterable):
        if i == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        yield item

cti.tqdm = killed
cti.save_as_hdf5(sys.argv[2], "ct", sys.argv[3], image_size=16)
"""


def test_temporary_of_a_killed_conversion_is_removed_by_the_next(tmp_path):
    """SIGKILL in the middle of writing leaves a hidden temporary (named after the dead
    process); the next conversion into that folder removes it, and leaves alone a temporary
    that a running process (here: this one) is writing."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from utils.atomic import temp_prefix

    src = write_nifti(tmp_path / "v.nii.gz", ct_phantom())
    out = tmp_path / "o"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CONVERSION, str(root), str(src), str(out)],
                            stderr=subprocess.PIPE)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    stale = leftover(out)
    assert len(stale) == 1 and stale[0].startswith(temp_prefix(proc.pid)) and stale[0].endswith(".h5"), stale
    assert (out / stale[0]).stat().st_size > 0
    live = out / f"{temp_prefix()}abcdefgh.h5"
    live.write_bytes(b"being written")
    save_as_hdf5(src, "ct", out, image_size=16, progress=False)
    assert leftover(out) == sorted(["ct.h5", live.name])


# ---- planes -------------------------------------------------------------------------
# An (X=20, Y=10, Z=24) RAS volume at 1.2 x 3.0 x 1.5 mm, stored with a non-trivial affine:
# array axis i runs to the patient's left, j inferior, k anterior.
RAS_SHAPE, RAS_MM = (20, 10, 24), (1.2, 3.0, 1.5)
MARK = (16, 7, 5)  # RAS voxel of the bright mark: right, anterior, inferior half


def marked_volume(path):
    """CT NIfTI of a 0 HU body with a 1000 HU voxel at RAS MARK; returns (path, RAS HU array)."""
    ras = np.zeros(RAS_SHAPE, dtype=np.int16)
    ras[MARK] = 1000
    nx, _, nz = RAS_SHAPE
    data = ras[::-1, :, ::-1].transpose(0, 2, 1)  # data[i, j, k] = ras[nx-1-i, k, nz-1-j]
    affine = np.array([[-1.2, 0, 0, 30.0], [0, 0, 3.0, -12.0], [0, -1.5, 0, 40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
    return path, ras


# (slice, row, col) of RAS voxel (x, y, z) in each plane, written out per convention
DISPLAY = {
    "axial": lambda x, y, z, n: (z, n[1] - 1 - y, n[0] - 1 - x),      # anterior up, right on the left
    "coronal": lambda x, y, z, n: (y, n[2] - 1 - z, n[0] - 1 - x),    # superior up, right on the left
    "sagittal": lambda x, y, z, n: (x, n[2] - 1 - z, n[1] - 1 - y),   # superior up, anterior on the left
}
SPACING = {"axial": (3.0, 1.2, 1.5), "coronal": (1.5, 1.2, 3.0), "sagittal": (1.5, 3.0, 1.2)}


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_plane_orientation_marks_and_spacing(tmp_path, plane):
    src, ras = marked_volume(tmp_path / "marked.nii.gz")
    path = save_as_hdf5(src, "ct", tmp_path / "o", image_size=8, stride=4, planes=plane, progress=False)
    assert path == tmp_path / "o" / "ct.h5"
    with h5py.File(path, "r") as f:
        volume = to_physical(f["volume"][:] / 65535.0, {"low": -1024.0, "high": 3071.0})
        s, r, c = DISPLAY[plane](*MARK, RAS_SHAPE)
        assert np.unravel_index(volume.argmax(), volume.shape) == (s, r, c)
        shape = volume.shape
        # every voxel, not just the mark: (slice, row, col) -> RAS index
        index = np.indices(shape)
        x, y, z = {"axial": (shape[2] - 1 - index[2], shape[1] - 1 - index[1], index[0]),
                   "coronal": (shape[2] - 1 - index[2], index[0], shape[1] - 1 - index[1]),
                   "sagittal": (index[0], shape[2] - 1 - index[2], shape[1] - 1 - index[1])}[plane]
        np.testing.assert_allclose(volume, ras[x, y, z], atol=0.05)
        np.testing.assert_allclose(f.attrs["spacing"], SPACING[plane])
        assert f.attrs["plane"] == plane and f.attrs["acquisition_plane"] == "coronal"
        patches, index, origin = f["patches"][:], f["slice_index"][:], f["origin"][:]
        for p, k, (pr, pc) in zip(patches, index, origin):
            np.testing.assert_array_equal(p, f["volume"][k, pr : pr + 8, pc : pc + 8])
    # in words: the mark is right, anterior and inferior of the centre
    h, w = shape[1:]
    if plane == "axial":
        assert r < h / 2 and c < w / 2  # anterior up, patient's right on the image left
    elif plane == "coronal":
        assert r > h / 2 and c < w / 2  # inferior down, patient's right on the image left
    else:
        assert r > h / 2 and c < w / 2  # inferior down, anterior on the image left


def test_acquisition_plane_from_spacing(tmp_path):
    assert cti.acquisition_plane((1.0, 1.0, 3.0)) == "axial"
    assert cti.acquisition_plane((1.0, 3.0, 1.0)) == "coronal"
    assert cti.acquisition_plane((3.0, 1.0, 1.0)) == "sagittal"
    assert cti.acquisition_plane((1.0, 1.0, 1.0)) == "axial"  # ties: axial
    assert cti.acquisition_plane((2.0, 1.0, 2.0)) == "axial"
    assert cti.acquisition_plane((2.0, 2.0, 1.0)) == "coronal"  # then coronal
    src, _ = marked_volume(tmp_path / "marked.nii.gz")  # thickest voxels along y (3 mm)
    with h5py.File(save_as_hdf5(src, "ct", tmp_path / "o", image_size=8, progress=False), "r") as f:
        assert f.attrs["plane"] == "coronal" and f["volume"].shape == (10, 24, 20)


def test_coronal_scan_converts_in_its_acquisition_plane(tmp_path):
    """128 x 128 x 62 voxels at 2 x 2 x 3 mm acquired coronally: the axial slices are 62x128."""
    data = np.full((128, 128, 62), -1024, dtype=np.int16)
    data[10:118, 10:118, :] = 40
    affine = np.array([[-2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]])  # k: anterior
    src = tmp_path / "coronal_scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(src))
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="patch size 64 is larger than the 62x128 slices"):
        save_as_hdf5(src, "ct", out, image_size=64, planes="axial", progress=False)
    path = save_as_hdf5(src, "ct", out, image_size=64, stride=32, progress=False)
    with h5py.File(path, "r") as f:
        assert f.attrs["plane"] == "coronal" and f["volume"].shape == (62, 128, 128)
        assert f["patches"].shape[1:] == (64, 64) and len(f["patches"]) > 0
        np.testing.assert_allclose(f.attrs["spacing"], [2.0, 2.0, 3.0])


def test_several_planes_one_file_each(tmp_path, capsys):
    src, ras = marked_volume(tmp_path / "marked.nii.gz")
    paths = save_as_hdf5(src, "vol", tmp_path / "o", image_size=8, stride=4, modality="ct",
                         planes=["sagittal", "axial"], progress=False)
    assert paths == [tmp_path / "o" / "vol_sagittal.h5", tmp_path / "o" / "vol_axial.h5"]
    assert leftover(tmp_path / "o") == ["vol_axial.h5", "vol_sagittal.h5"]
    for path, plane in zip(paths, ["sagittal", "axial"]):
        with h5py.File(path, "r") as f:
            assert f.attrs["plane"] == plane and f.attrs["source"] == "marked.nii.gz"
            np.testing.assert_allclose(f.attrs["spacing"], SPACING[plane])
            volume = f["volume"][:]
            assert np.unravel_index(volume.argmax(), volume.shape) == DISPLAY[plane](*MARK, RAS_SHAPE)
    assert save_as_hdf5(src, "one", tmp_path / "o", image_size=8, modality="ct", planes=["axial"], progress=False) == [
        tmp_path / "o" / "one.h5"]
    assert cti.plane_file_names("v", "acquisition") == ["v.h5"]
    assert cti.plane_file_names("v", ("axial", "coronal")) == ["v_axial.h5", "v_coronal.h5"]
    main([str(src), "--name", "cli", "--out", str(tmp_path / "cli"), "--image-size", "8", "--modality", "ct",
          "--planes", "axial", "coronal"])
    assert leftover(tmp_path / "cli") == ["cli_axial.h5", "cli_coronal.h5"]
    assert "coronal volume (10, 24, 20)" in capsys.readouterr().out


@pytest.mark.parametrize("planes, named", [
    ("front", "unknown plane 'front'"),
    (["axial", "bogus"], "unknown plane 'bogus' in planes ['axial', 'bogus']"),
    ([], "empty list"),
    (["axial", "axial"], "planes ['axial', 'axial'] repeats a plane"),
    (5, "planes 5 is not a plane name"),
    (["acquisition"], "unknown plane 'acquisition' in planes ['acquisition']"),  # only alone, as a string
])
def test_bad_planes_raise_naming_value_and_allowed(tmp_path, planes, named):
    src, _ = marked_volume(tmp_path / "marked.nii.gz")
    with pytest.raises(ValueError) as err:
        save_as_hdf5(src, "ct", tmp_path / "o", image_size=8, planes=planes, progress=False)
    message = str(err.value)
    assert named in message and "allowed: axial, coronal, sagittal" in message and "string 'acquisition'" in message
    assert not (tmp_path / "o").exists()


def test_planes_all_checked_before_writing(tmp_path):
    src, _ = marked_volume(tmp_path / "marked.nii.gz")  # sagittal slices are 24x10
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(ValueError, match="larger than the 24x10 slices .* in the sagittal plane"):
        save_as_hdf5(src, "ct", out, image_size=16, planes=["coronal", "sagittal"], progress=False)
    assert leftover(out) == []


def test_failed_plane_removes_the_planes_already_written(tmp_path, monkeypatch):
    src, _ = marked_volume(tmp_path / "marked.nii.gz")
    out = tmp_path / "o"
    calls = []

    def second_fails(iterable, **kwargs):
        calls.append(kwargs["desc"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return iterable

    monkeypatch.setattr(cti, "tqdm", second_fails)
    with pytest.raises(KeyboardInterrupt):
        save_as_hdf5(src, "ct", out, image_size=8, planes=["axial", "coronal"])
    assert calls == ["patching ct_axial", "patching ct_coronal"] and leftover(out) == []
