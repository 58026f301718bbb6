"""HDF5 datasets and DenoisingDataModule: values, splits, seeded noise, workers, bad input."""

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule, slab_split
from diffusion_modules.diffusion_utils.hdf5dataset import HDF5PatchDataset, HDF5SliceDataset
from diffusion_modules.diffusion_utils.noise import GaussianNoise
from utils.create_training_images import FORMAT_VERSION, save_as_hdf5
from synthetic import make_volume

GAP = 2
SPLIT = {"mode": "slab", "fractions": [0.6, 0.2, 0.2], "gap": GAP}


@pytest.fixture
def volumes(tmp_path):
    return [make_volume(tmp_path / "head_ct.nii.gz", "ct"), make_volume(tmp_path / "brain_mr.nii.gz", "mr", seed=1)]


def datamodule(volumes, cache, **kw):
    args = dict(volumes=[str(v) if hasattr(v, "suffix") else v for v in volumes], cache_dir=str(cache), image_size=16, stride=8,
                noise={"type": "gaussian", "sigma": 0.1}, split=SPLIT, batch_size=8)
    args.update(kw)
    return DenoisingDataModule(**args)


def test_round_trip_batch_values(tmp_path, volumes):
    dm = datamodule(volumes, tmp_path / "cache", noise={"type": "gaussian", "sigma": 0.0})
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x_cond"].shape == (8, 1, 16, 16) and batch["x_cond"].dtype == torch.float32
    assert batch["sigma"].shape == (8,) and batch["index"].dtype == torch.int64
    assert torch.equal(batch["x_cond"], batch["x_prior"])  # sigma 0: noisy == clean
    ds = dm.train_set
    for x, i in zip(batch["x_prior"], batch["index"]):
        k, row = ds.rows[int(i)]
        with h5py.File(ds.files[k], "r") as f:
            z, (r, c) = f["slice_index"][row], f["origin"][row]
            src = f["volume"][z, r : r + 16, c : c + 16] / 65535.0
        np.testing.assert_allclose(x[0].numpy(), 2 * src - 1, atol=1e-6)
    # known physical values: the MR volume's HDF5 maps back to its voxels within quantization
    mr = nib.load(str(volumes[1])).get_fdata()
    with h5py.File(tmp_path / "cache" / "brain_mr.h5", "r") as f:
        low, high = f.attrs["norm_low"], f.attrs["norm_high"]
        back = low + f["volume"][3] / 65535.0 * (high - low)
    expected = np.clip(mr[::-1, ::-1, 3].T, low, high)
    np.testing.assert_allclose(back, expected, atol=(high - low) / 65535.0)


def test_slab_split_disjoint_with_gap(tmp_path, volumes):
    dm = datamodule(volumes, tmp_path / "cache")
    dm.setup("fit")
    parts = dm.split_slices()
    for f in parts["train"]:
        train, val, test = (set(parts[s][f]) for s in ("train", "val", "test"))
        assert train and val and test and not (train & val or train & test or val & test)
        assert min(val) - max(train) > GAP and min(test) - max(val) > GAP
        assert len(train) + len(val) + len(test) + 2 * GAP == 20
    for name, ds in (("train", dm.train_set), ("val", dm.val_set)):
        for k, row in ds.rows:
            with h5py.File(ds.files[k], "r") as f:
                assert int(f["slice_index"][row]) in parts[name][ds.files[k]]
    assert {(k, z) for k, z in dm.test_set.items} == {
        (dm.test_set.files.index(f), z) for f, zs in parts["test"].items() for z in zs
    }
    assert slab_split(20, [0.7, 0.15, 0.15], 0) == (range(0, 14), range(14, 17), range(17, 20))


def test_volume_split(tmp_path):
    vols = [make_volume(tmp_path / f"v{i}_ct.nii.gz", "ct", n_slices=4, seed=i) for i in range(4)]
    dm = datamodule(vols, tmp_path / "cache", split={"mode": "volume", "fractions": [0.5, 0.25, 0.25]})
    dm.setup()
    parts = dm.split_slices()
    names = {s: sorted(p.name for p in parts[s]) for s in parts}
    assert names == {"train": ["v0_ct.h5", "v1_ct.h5"], "val": ["v2_ct.h5"], "test": ["v3_ct.h5"]}
    assert parts["test"][tmp_path / "cache" / "v3_ct.h5"] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="at least 3 volumes"):
        datamodule(vols[:2], tmp_path / "cache", split={"mode": "volume"}).setup()


def test_seeded_val_and_test_noise_identical_across_datamodules(tmp_path, volumes):
    a = datamodule(volumes, tmp_path / "a", seed=5)
    b = datamodule(volumes, tmp_path / "b", seed=5, batch_size=3)
    for dm in (a, b):
        dm.setup()
    va = torch.cat([x["x_cond"] for x in a.val_dataloader()])
    vb = torch.cat([x["x_cond"] for x in b.val_dataloader()])
    assert torch.equal(va, vb)
    ta, tb = next(iter(a.test_dataloader())), next(iter(b.test_dataloader()))
    assert torch.equal(ta["x_cond"], tb["x_cond"])
    c = datamodule(volumes, tmp_path / "a", seed=6)
    c.setup()
    assert not torch.equal(va, torch.cat([x["x_cond"] for x in c.val_dataloader()]))
    # training noise is fresh at each read
    assert not torch.equal(a.train_set[0]["x_cond"], a.train_set[0]["x_cond"])
    assert torch.equal(a.train_set[0]["x_prior"], a.train_set[0]["x_prior"])


def test_training_noise_follows_the_torch_seed(tmp_path, volumes):
    """Two runs seeded alike draw the same training noise (seed_everything seeds torch, and
    each process's training generator starts from torch's seed); another seed draws other noise."""
    def first_reads(seed):
        torch.manual_seed(seed)
        dm = datamodule(volumes, tmp_path / "c")
        dm.setup()
        return torch.stack([dm.train_set[i]["x_cond"] for i in (0, 1, 0)])

    assert torch.equal(first_reads(3), first_reads(3))
    assert not torch.equal(first_reads(3), first_reads(4))


def test_two_workers_read_same_items_as_zero(tmp_path, volumes):
    files = [save_as_hdf5(v, v.name.split(".")[0], tmp_path / "h5", image_size=16, stride=8,
                          modality="ct" if "ct" in v.name else "mr", progress=False) for v in volumes]
    ds = HDF5PatchDataset(files, noise=GaussianNoise(sigma=[0.05, 0.2]), noise_seed=11)
    _ = ds[0]  # an open handle in the parent must not reach the workers
    single = list(DataLoader(ds, batch_size=16, num_workers=0))
    multi = list(DataLoader(ds, batch_size=16, num_workers=2))
    in_memory = HDF5PatchDataset(files, noise=GaussianNoise(sigma=[0.05, 0.2]), noise_seed=11, in_memory=True)
    memory = list(DataLoader(in_memory, batch_size=16, num_workers=2))
    assert len(single) == len(multi) == len(memory)
    for s, m, n in zip(single, multi, memory):
        for key in ("x_cond", "x_prior", "sigma", "index"):
            assert torch.equal(s[key], m[key]) and torch.equal(s[key], n[key])
    # in_memory maps the file read-only (shared page cache) instead of copying it into each worker
    _ = in_memory[0]
    mapped = [a for a in in_memory._handles.values() if isinstance(a, np.memmap)]
    assert len(mapped) >= 1 and all(not a.flags.writeable for a in mapped)


def test_augment_is_a_flip_or_rotation(tmp_path, volumes):
    f = save_as_hdf5(volumes[0], "ct", tmp_path, image_size=16, stride=8, progress=False)
    plain = HDF5PatchDataset([f], noise=GaussianNoise(sigma=0.0))
    aug = HDF5PatchDataset([f], noise=GaussianNoise(sigma=0.0), augment=True)
    seen = set()
    for _ in range(30):
        x, y = plain[3]["x_prior"][0].numpy(), aug[3]["x_prior"][0].numpy()
        variants = [np.rot90(v, k) for v in (x, x[::-1]) for k in range(4)]
        matches = [i for i, v in enumerate(variants) if np.array_equal(v, y)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 2


def test_slice_dataset_and_test_slices(tmp_path, volumes):
    dm = datamodule(volumes, tmp_path / "cache")
    slices = dm.test_slices()
    parts = dm.split_slices()
    expected = sorted((f.stem, z) for f, zs in parts["test"].items() for z in zs)
    assert [(s["source"], s["slice_index"]) for s in slices] == expected
    first = slices[0]
    assert first["clean"].shape == (36, 40) and first["clean"].dtype == np.float32
    assert first["modality"] == "mr" and first["norm"]["modality"] == "mr"
    with h5py.File(tmp_path / "cache" / "brain_mr.h5", "r") as f:
        np.testing.assert_array_equal(first["clean"], f["volume"][first["slice_index"]] / np.float32(65535.0))
    item = dm.test_set[0]
    assert item["x_cond"].shape == (1, 36, 40) and "mask" not in item  # the evaluation computes the body mask
    assert item["source"] in ("brain_mr", "head_ct") and item["spacing"].shape == (3,)
    assert abs(float((item["x_cond"] - item["x_prior"]).std()) / 2 - 0.1) < 0.02
    clean_only = HDF5SliceDataset(list(parts["test"]), parts["test"])
    assert torch.equal(clean_only[0]["x_cond"], clean_only[0]["x_prior"])


def test_lowdose_ct_patches_cached_and_seeded(tmp_path, volumes):
    noise = {"type": "lowdose_ct", "i0": 1e4, "n_angles": 20}
    a = datamodule(volumes[:1], tmp_path / "c", noise=noise, seed=2)
    b = datamodule(volumes[:1], tmp_path / "c", noise=noise, seed=2)
    a.setup(), b.setup()
    assert torch.equal(a.val_set[0]["x_cond"], b.val_set[0]["x_cond"])
    item = a.train_set[0]
    assert item["sigma"] > 0 and not torch.equal(item["x_cond"], item["x_prior"])
    for _ in range(6):
        a.train_set[0]
    assert 1 <= len(a.train_set._slice_noise[(0, int(h5py.File(a.train_set.files[0])["slice_index"][0]))]) <= 4


def test_lowdose_cache_is_a_datamodule_setting(tmp_path, volumes):
    noise = {"type": "lowdose_ct", "i0": 1e4, "n_angles": 20}
    dm = datamodule(volumes[:1], tmp_path / "c", noise=noise, lowdose_cache=1)
    dm.setup()
    assert dm.train_set.lowdose_cache == 1
    first = dm.train_set[0]["x_cond"] - dm.train_set[0]["x_prior"]
    for _ in range(3):  # one realisation per slice: the same noise at every read (no augmentation)
        item = dm.train_set[0]
        assert torch.equal(item["x_cond"] - item["x_prior"], first)
    with pytest.raises(ValueError, match="lowdose_cache must be >= 1"):
        datamodule(volumes[:1], tmp_path / "c", noise=noise, lowdose_cache=0)


def test_prepare_data_idempotent_and_rebuilds_stale(tmp_path, volumes):
    dm = datamodule(volumes, tmp_path / "cache")
    dm.prepare_data()
    target = tmp_path / "cache" / "head_ct.h5"
    mtime = target.stat().st_mtime_ns
    dm.prepare_data()
    assert target.stat().st_mtime_ns == mtime
    datamodule(volumes, tmp_path / "cache", stride=4).prepare_data()
    with h5py.File(target, "r") as f:
        assert f.attrs["stride"] == 4
    # an already-built .h5 can be given directly
    direct = datamodule([target, tmp_path / "cache" / "brain_mr.h5"], tmp_path / "other")
    direct.setup()
    assert len(direct.train_set) > 0 and not (tmp_path / "other").exists()


def test_modality_from_dict_and_name(tmp_path):
    v = make_volume(tmp_path / "subject01.nii.gz", "mr")
    with pytest.raises(ValueError, match="cannot infer the modality of .*subject01"):
        datamodule([v], tmp_path / "cache")
    dm = datamodule([{"path": str(v), "modality": "mr", "name": "s1"}], tmp_path / "cache")
    dm.setup()
    with h5py.File(tmp_path / "cache" / "s1.h5", "r") as f:
        assert f.attrs["modality"] == "mr"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"split": {"mode": "random"}}, ValueError, "unknown split mode 'random'"),
        ({"split": {"fractions": [0.5, 0.5]}}, ValueError, "split fractions"),
        ({"split": {"gap": 9}}, ValueError, "at least 21 slices"),
        ({"split": {"seed": 1}}, ValueError, "unknown split key(s) ['seed']"),
        ({"noise": {"type": "speckle"}}, ValueError, "unknown noise type 'speckle'"),
        ({"noise": {"type": "gaussian", "sigma": -1}}, ValueError, "sigma=-1"),
        ({"volumes": []}, ValueError, "non-empty list"),
        ({"volumes": ["nowhere/missing_ct.nii.gz"]}, FileNotFoundError, "missing_ct.nii.gz"),
        ({"volumes": [{"file": "x_ct.nii"}]}, ValueError, "needs key 'path'"),
    ],
)
def test_bad_datamodule_config(tmp_path, volumes, kwargs, error, message):
    with pytest.raises(error) as err:
        dm = datamodule(kwargs.pop("volumes", volumes), tmp_path / "cache", **kwargs)
        dm.setup()
    assert message in str(err.value)


def test_split_without_patches_is_reported(tmp_path):
    data = np.full((40, 36, 20), -1024, dtype=np.int16)
    data[4:36, 4:32, :6] = 40  # tissue only in the lowest slices: the val slab is all air
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "low_ct.nii.gz"))
    with pytest.raises(ValueError, match="the val split has no patch"):
        datamodule([tmp_path / "low_ct.nii.gz"], tmp_path / "cache").setup()


def test_hdf5_without_expected_dataset(tmp_path):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("volume", data=np.zeros((2, 4, 4), np.uint16))
    with pytest.raises(ValueError, match=r"lacks the dataset\(s\) \['patches', 'slice_index', 'origin'\]"):
        HDF5PatchDataset([bad], noise=GaussianNoise(sigma=0.1))
    text = tmp_path / "fake.h5"
    text.write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        HDF5SliceDataset([text])


# ---- planes -------------------------------------------------------------------------
def z_coded_ct(path, shape=(24, 20, 40), zooms=(1.0, 1.0, 2.0)):
    """CT NIfTI, RAS axes, thickest voxels along z (acquisition plane axial); every voxel's
    HU is 100 + 20 * (its z index), so any pixel tells which axial slice it came from."""
    data = (100 + 20 * np.arange(shape[2], dtype=np.int16))[None, None, :] + np.zeros(shape, np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))
    return path


def z_of(x):
    """Axial slice indices (set) of model-unit pixels of z_coded_ct."""
    hu = -1024 + (np.asarray(x, dtype=np.float64) + 1) / 2 * 4095
    return set(np.round((hu - 100) / 20).astype(int).ravel().tolist())


def test_planes_slab_split_keeps_other_planes_inside_train_slab(tmp_path):
    vol = z_coded_ct(tmp_path / "head_ct.nii.gz")
    dm = datamodule([vol], tmp_path / "cache", planes=["coronal", "axial", "sagittal"],
                    noise={"type": "gaussian", "sigma": 0.0})
    dm.setup()
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["head_ct_axial.h5", "head_ct_coronal.h5", "head_ct_sagittal.h5"]
    parts = dm.split_slices()
    # the acquisition plane (axial) is slab-split; the others only train
    assert set(parts["val"]) == set(parts["test"]) == {cache / "head_ct_axial.h5"}
    assert set(parts["train"]) == {cache / f"head_ct_{p}.h5" for p in ("axial", "coronal", "sagittal")}
    batch = next(iter(dm.train_dataloader()))
    assert batch["x_prior"].shape == (8, 1, 16, 16)
    train_z, planes_seen = set(), set()
    for i in range(len(dm.train_set)):
        train_z |= z_of(dm.train_set[i]["x_prior"])
        planes_seen.add(dm.train_set.files[int(dm.train_set.rows[i][0])].stem)
    assert planes_seen == {"head_ct_axial", "head_ct_coronal", "head_ct_sagittal"}
    val_z = set().union(*(z_of(dm.val_set[i]["x_prior"]) for i in range(len(dm.val_set))))
    test_z = set().union(*(z_of(s["clean"] * 2 - 1) for s in dm.test_slices()))
    assert train_z and val_z and test_z
    assert max(train_z) + GAP < min(val_z) and max(val_z) + GAP < min(test_z)  # no pixel in two splits
    assert train_z <= set(parts["train"][cache / "head_ct_axial.h5"])
    assert {s["source"] for s in dm.test_slices()} == {"head_ct_axial"}


def test_planes_volume_split_keeps_a_volume_in_one_split(tmp_path):
    vols = [make_volume(tmp_path / f"v{i}_ct.nii.gz", "ct", seed=i) for i in range(4)]
    dm = datamodule(vols, tmp_path / "cache", planes=["axial", "sagittal"],
                    split={"mode": "volume", "fractions": [0.5, 0.25, 0.25]})
    dm.setup()
    parts = dm.split_slices()
    names = {s: sorted(p.name for p in parts[s]) for s in parts}
    assert names == {"train": ["v0_ct_axial.h5", "v0_ct_sagittal.h5", "v1_ct_axial.h5", "v1_ct_sagittal.h5"],
                     "val": ["v2_ct_axial.h5", "v2_ct_sagittal.h5"], "test": ["v3_ct_axial.h5", "v3_ct_sagittal.h5"]}
    assert next(iter(dm.train_dataloader()))["x_prior"].shape == (8, 1, 16, 16)
    shapes = {s["source"]: s["clean"].shape for s in dm.test_slices()}
    assert shapes == {"v3_ct_axial": (36, 40), "v3_ct_sagittal": (20, 36)}
    with h5py.File(tmp_path / "cache" / "v3_ct_sagittal.h5", "r") as f:
        assert f.attrs["plane"] == "sagittal" and f.attrs["acquisition_plane"] == "axial"


def test_cache_rebuilt_when_planes_or_format_change(tmp_path):
    vol = z_coded_ct(tmp_path / "head_ct.nii.gz", zooms=(1.0, 2.0, 1.0))  # acquisition plane coronal
    target = tmp_path / "cache" / "head_ct.h5"
    datamodule([vol], tmp_path / "cache").prepare_data()
    with h5py.File(target, "r") as f:
        assert f.attrs["plane"] == "coronal" and f["volume"].shape == (20, 40, 24)
    mtime = target.stat().st_mtime_ns
    datamodule([vol], tmp_path / "cache", planes="coronal").prepare_data()  # the same file: kept
    assert target.stat().st_mtime_ns == mtime
    datamodule([vol], tmp_path / "cache", planes="sagittal").prepare_data()
    with h5py.File(target, "r+") as f:
        assert f.attrs["plane"] == "sagittal"
        f.attrs["format_version"] = 1  # a cache from before planes
    datamodule([vol], tmp_path / "cache", planes="sagittal").prepare_data()
    with h5py.File(target, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
    datamodule([vol], tmp_path / "cache").prepare_data()
    with h5py.File(target, "r") as f:
        assert f.attrs["plane"] == "coronal"


@pytest.mark.parametrize("planes, message", [
    ("oblique", "unknown plane 'oblique'"),
    (["axial", "transverse"], "unknown plane 'transverse' in planes ['axial', 'transverse']"),
])
def test_bad_planes_in_datamodule(tmp_path, volumes, planes, message):
    with pytest.raises(ValueError) as err:
        datamodule(volumes, tmp_path / "cache", planes=planes)
    assert message in str(err.value) and "allowed: axial, coronal, sagittal" in str(err.value)
    clash = [volumes[0], tmp_path / "cache" / "head_ct_axial.h5"]  # a built file would overwrite it
    with pytest.raises(ValueError, match="same HDF5 file"):
        datamodule(clash, tmp_path / "cache", planes=["axial", "coronal"])


def test_planes_slab_split_refuses_rescale_augmentation(tmp_path):
    vol = z_coded_ct(tmp_path / "head_ct.nii.gz")
    with pytest.raises(ValueError, match="across the train slab"):
        datamodule([vol], tmp_path / "cache", planes=["axial", "coronal"], augment={"rescale": [0.5, 2.0]})
    dm = datamodule([vol], tmp_path / "cache", planes=["axial", "coronal"], augment={"flips": True})
    dm.setup()
    assert len(dm.train_set) > 0
