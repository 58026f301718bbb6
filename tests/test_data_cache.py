"""The DataModule's HDF5 cache follows the source's content, not its file times, and an
inconsistent HDF5 file is rebuilt (a cache) or refused naming the file and the field (a
given .h5 file)."""
import os

import h5py
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
from diffusion_modules.diffusion_utils.hdf5dataset import HDF5SliceDataset
from synthetic import make_volume, write_dicom_slice
from utils.create_training_images import save_as_hdf5
from utils.volume_io import source_fingerprint

SPLIT = {"mode": "slab", "fractions": [0.6, 0.2, 0.2], "gap": 2}


def datamodule(volumes, cache, **kw):
    args = dict(volumes=[v if isinstance(v, dict) else str(v) for v in volumes], cache_dir=str(cache), image_size=16, stride=8,
                noise={"type": "gaussian", "sigma": 0.1}, split=SPLIT, batch_size=8)
    return DenoisingDataModule(**{**args, **kw})


def stored(target):
    with h5py.File(target, "r") as f:
        return str(f.attrs["source_sha256"]), f["volume"][()]


def age(path, seconds):
    """Set a file's times ``seconds`` into the past."""
    t = os.stat(path).st_mtime - seconds
    os.utime(path, (t, t))


def test_a_source_replaced_by_an_older_file_is_rebuilt(tmp_path):
    """Before: the cache (newer than the replacement) was reused, holding the old volume."""
    source, cache = make_volume(tmp_path / "head_ct.nii.gz", "ct", seed=0), tmp_path / "cache"
    target = cache / "head_ct.h5"
    datamodule([source], cache).prepare_data()
    digest, volume = stored(target)
    assert digest == source_fingerprint(source)
    make_volume(tmp_path / "other_ct.nii.gz", "ct", seed=1).replace(source)  # other data...
    age(source, 3600)  # ... from an hour before the cache was built
    assert source.stat().st_mtime < target.stat().st_mtime
    datamodule([source], cache).prepare_data()
    new_digest, new_volume = stored(target)
    assert new_digest == source_fingerprint(source) != digest
    assert not np.array_equal(new_volume, volume)
    fresh = save_as_hdf5(source, "ct", tmp_path / "fresh", image_size=16, stride=8, progress=False)
    np.testing.assert_array_equal(new_volume, stored(fresh)[1])  # the cache now holds the new data


def test_the_same_content_touched_is_not_rebuilt(tmp_path):
    source, cache = make_volume(tmp_path / "head_ct.nii.gz", "ct"), tmp_path / "cache"
    target = cache / "head_ct.h5"
    datamodule([source], cache).prepare_data()
    built = target.stat().st_mtime_ns, target.stat().st_ino
    os.utime(source, (target.stat().st_mtime + 60,) * 2)  # newer than the cache, same bytes
    source.write_bytes(source.read_bytes())  # rewritten with the same bytes
    datamodule([source], cache).prepare_data()
    assert (target.stat().st_mtime_ns, target.stat().st_ino) == built


def test_a_dicom_slice_rewritten_with_an_old_time_is_rebuilt(tmp_path):
    folder, cache = tmp_path / "scan_ct", tmp_path / "cache"
    folder.mkdir()
    uid = generate_uid()
    rng = np.random.default_rng(0)
    for i in range(12):
        write_dicom_slice(folder / f"im{i:02d}.dcm", uid, [0, 0, 2.0 * i], pixels=rng.integers(900, 2500, (20, 24)))
    datamodule([{"path": str(folder), "modality": "ct"}], cache).prepare_data()
    digest, volume = stored(cache / "scan_ct.h5")
    ds = pydicom.dcmread(str(folder / "im05.dcm"))
    ds.PixelData = (ds.pixel_array + 100).astype(np.int16).tobytes()
    ds.save_as(str(folder / "im05.dcm"), enforce_file_format=True)
    age(folder / "im05.dcm", 3600)
    age(folder, 3600)
    datamodule([{"path": str(folder), "modality": "ct"}], cache).prepare_data()
    new_digest, new_volume = stored(cache / "scan_ct.h5")
    assert new_digest != digest and not np.array_equal(new_volume, volume)


def test_a_cache_without_a_fingerprint_is_rebuilt(tmp_path):
    """A cache of the earlier code (no source_sha256 attribute) is not trusted."""
    source, cache = make_volume(tmp_path / "head_ct.nii.gz", "ct"), tmp_path / "cache"
    target = cache / "head_ct.h5"
    datamodule([source], cache).prepare_data()
    with h5py.File(target, "r+") as f:
        del f.attrs["source_sha256"]
    datamodule([source], cache).prepare_data()
    assert stored(target)[0] == source_fingerprint(source)


def corrupt(target, field):
    """Make an HDF5 patch file disagree with itself in one field."""
    with h5py.File(target, "r+") as f:
        if field == "slice_index":
            f["slice_index"][0] = f["volume"].shape[0]  # past the last slice
        elif field == "origin":
            f["origin"][0] = (f["volume"].shape[1] - 4, 0)  # the patch leaves the slice
        elif field == "image_size":  # the attribute says 16, the patches are 12 x 12
            patches = f["patches"][:, :12, :12]
            del f["patches"]
            f.create_dataset("patches", data=patches)
        else:  # a patch shifted by one row against its origin: a wrong origin the range check misses
            z, (r, c) = f["slice_index"][0], f["origin"][0]
            f["patches"][0] = f["volume"][z, r + 1 : r + 17, c : c + 16]


FIELDS = ["slice_index", "origin", "image_size", "patches"]


@pytest.mark.parametrize("field", FIELDS)
def test_an_inconsistent_cache_is_rebuilt_with_a_warning(tmp_path, field):
    source, cache = make_volume(tmp_path / "head_ct.nii.gz", "ct"), tmp_path / "cache"
    target = cache / "head_ct.h5"
    datamodule([source], cache).prepare_data()
    with h5py.File(target, "r") as f:
        good = {k: f[k][()] for k in ("patches", "slice_index", "origin")}
    corrupt(target, field)
    with pytest.warns(UserWarning, match=rf"rebuilding the cache {target}: .*field '{field}'"):
        datamodule([source], cache).prepare_data()
    with h5py.File(target, "r") as f:
        for k, v in good.items():
            np.testing.assert_array_equal(f[k][()], v)
        assert f.attrs["image_size"] == 16


@pytest.mark.parametrize("field", FIELDS)
def test_an_inconsistent_given_h5_is_refused_naming_file_and_field(tmp_path, field):
    """Before: a wrong slice_index or origin read other pixels or failed deep in numpy."""
    source = make_volume(tmp_path / "head_ct.nii.gz", "ct")
    given = save_as_hdf5(source, "head_ct", tmp_path / "h5", image_size=16, stride=8, modality="ct", progress=False)
    corrupt(given, field)
    with pytest.raises(ValueError, match=rf"{given}: inconsistent field '{field}'"):
        datamodule([given], tmp_path / "cache").setup()
    with pytest.raises(ValueError, match=rf"{given}: inconsistent field '{field}'"):
        HDF5SliceDataset([given])


def test_a_given_h5_of_another_patch_size_is_refused(tmp_path):
    source = make_volume(tmp_path / "head_ct.nii.gz", "ct")
    given = save_as_hdf5(source, "head_ct", tmp_path / "h5", image_size=16, stride=8, modality="ct", progress=False)
    with pytest.raises(ValueError, match=rf"{given}: field 'image_size' \(its patches\) is 16, the data "
                                         r"config's image_size is 32"):
        datamodule([given], tmp_path / "cache", image_size=32).prepare_data()
    datamodule([given], tmp_path / "cache").setup()  # the matching size is used as it is


def test_a_changed_setting_rebuilds_the_cache(tmp_path):
    """A config change is a rebuild, not an error: the cache follows the config."""
    source, cache = make_volume(tmp_path / "head_ct.nii.gz", "ct"), tmp_path / "cache"
    datamodule([source], cache).prepare_data()
    datamodule([source], cache, image_size=12, slice_step=2).prepare_data()
    with h5py.File(cache / "head_ct.h5", "r") as f:
        assert f["patches"].shape[1:] == (12, 12) and f.attrs["slice_step"] == 2
        assert set(np.unique(f["slice_index"][()]) % 2) == {0}
