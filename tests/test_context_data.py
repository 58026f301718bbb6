"""Neighbouring slices as condition (2.5D, issue 17), data side: k = 0 unchanged, the
channel order and the reflection at the edges, each neighbour's own noise at the centre's
level, one augmentation for the whole stack, the DataModule's ``context_slices``."""
import h5py
import numpy as np
import pytest
import torch

from diffusion_modules.diffusion_utils.context import check_context_slices, context_indices
from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
from diffusion_modules.diffusion_utils.hdf5dataset import HDF5PatchDataset, HDF5SliceDataset
from diffusion_modules.diffusion_utils.noise import GaussianNoise
import synthetic
from synthetic import make_volume

FULL = {"flips": True, "rescale": [0.5, 2.0], "gamma": [0.7, 1.4], "contrast": [0.9, 1.1], "brightness": [-0.05, 0.05]}
N, SIZE, SIDE = 6, 16, 32


def write_h5(path, vol01=None, size=SIZE, stride=8):
    """``synthetic.write_h5`` of a (Z, H, W) [0,1] volume; by default N random 32x32 slices
    drawn with seed 5."""
    vol01 = np.random.default_rng(5).random((N, SIDE, SIDE)) if vol01 is None else vol01
    return synthetic.write_h5(path, vol01, size, stride)


def clean_stack(path, z, r, c, k, size=SIZE):
    """The clean [0,1] stack of slice z at (r, c), read independently of the datasets."""
    with h5py.File(path, "r") as f:
        vol = f["volume"][()].astype(np.float32) / 65535.0
    return np.stack([vol[zz, r : r + size, c : c + size] for zz in context_indices(z, k, vol.shape[0])])


def place(ds, i):
    """(slice, row, col) of patch item i of an HDF5PatchDataset."""
    k, row = ds.rows[i]
    return int(ds.meta[k]["slice_index"][row]), *(int(v) for v in ds.meta[k]["origin"][row])


def to01(x):
    return (x.numpy().astype(np.float64) + 1) / 2


def checksums(item):
    return [float(item["x_cond"].double().sum()), float(item["x_prior"].double().sum()), float(item["sigma"])]


def test_k0_items_are_those_of_the_code_before_context_slices(tmp_path):
    """Sums of x_cond and x_prior and sigma, computed with the code before context_slices existed
    (full augmentation and a sigma range: every draw of the item's generator counts)."""
    path = write_h5(tmp_path / "v.h5")
    noise = GaussianNoise(sigma=[0.05, 0.2])
    train = HDF5PatchDataset([path], noise=noise, augment=FULL)
    val = HDF5PatchDataset([path], noise=noise, noise_seed=3)
    slices = HDF5SliceDataset([path], noise=noise, noise_seed=3)
    before = {
        ("train", (0, 7, 2)): [24.7141552567482, 21.400080263614655, 0.11019603163003922],
        ("train", (5, 7, 2)): [-5.493869423866272, -1.8967390060424805, 0.070484459400177],
        ("train", (17, 7, 2)): [-4.081308126449585, -4.68723064661026, 0.052417270839214325],
        ("train", (40, 7, 2)): [21.62941086292267, 24.62490999698639, 0.14491532742977142],
        ("val", 0): [-13.94760811328888, -14.41238921880722, 0.06284737586975098],
        ("val", 9): [3.101185441017151, 10.69050145149231, 0.19665399193763733],
        ("val", 33): [6.057842314243317, 4.392186939716339, 0.0869380459189415],
        ("slice", 0): [-18.241853713989258, -22.322514414787292, 0.06284737586975098],
        ("slice", 4): [-6.668432772159576, -10.07617175579071, 0.18475811183452606],
    }
    datasets = {"train": train, "val": val, "slice": slices}
    for (name, key), want in before.items():
        item = datasets[name][key]
        assert item["x_cond"].shape[0] == 1 and item["x_prior"].shape[0] == 1
        assert checksums(item) == pytest.approx(want, rel=1e-6, abs=1e-6), (name, key)
    # an explicit context_slices=0 is the default
    zero = HDF5PatchDataset([path], noise=noise, augment=FULL, context_slices=0)
    assert torch.equal(zero[(5, 7, 2)]["x_cond"], train[(5, 7, 2)]["x_cond"])


def test_context_indices_order_and_reflection():
    assert context_indices(3, 0, 6) == [3]
    assert context_indices(3, 2, 6) == [3, 1, 2, 4, 5]            # [z, z-2, z-1, z+1, z+2]
    assert context_indices(0, 2, 6) == [0, 2, 1, 1, 2]            # z-1 of slice 0 is slice 1
    assert context_indices(5, 2, 6) == [5, 3, 4, 4, 3]            # z+1 of the last is the one before
    assert context_indices(0, 3, 2) == [0, 1, 0, 1, 1, 0, 1]      # k >= n: reflected again
    assert context_indices(0, 1, 1) == [0, 0, 0]                  # a single slice repeats
    for bad in (-1, 1.5, True, "1", None):
        with pytest.raises(ValueError, match="context_slices must be an integer >= 0"):
            check_context_slices(bad)


@pytest.mark.parametrize("k", [1, 2])
def test_stack_is_the_slice_then_its_reflected_neighbours_without_noise(tmp_path, k):
    path = write_h5(tmp_path / "v.h5")
    ds = HDF5PatchDataset([path], noise=GaussianNoise(sigma=0.0), noise_seed=0, context_slices=k)
    seen = set()
    for i in range(len(ds)):
        z, r, c = place(ds, i)
        item = ds[i]
        assert item["x_cond"].shape == (1 + 2 * k, SIZE, SIZE) and item["x_prior"].shape == (1, SIZE, SIZE)
        assert torch.equal(item["x_cond"][:1], item["x_prior"])                  # the slice itself first
        np.testing.assert_allclose(to01(item["x_cond"]), clean_stack(path, z, r, c, k), atol=1e-6)
        seen.add(z)
    assert seen == set(range(N))
    # slice 0's z-1 channel (channel k: [z, z-k..z-1, ...]) is slice 1's clean content, so is its z+1
    i0 = next(i for i in range(len(ds)) if place(ds, i)[0] == 0)
    _, r, c = place(ds, i0)
    slice1 = clean_stack(path, 1, r, c, 0)[0]
    np.testing.assert_allclose(to01(ds[i0]["x_cond"][k]), slice1, atol=1e-6)
    np.testing.assert_allclose(to01(ds[i0]["x_cond"][k + 1]), slice1, atol=1e-6)
    # whole test slices likewise, clean (noise=None)
    full = HDF5SliceDataset([path], context_slices=k)
    with h5py.File(path, "r") as f:
        vol = f["volume"][()].astype(np.float32) / 65535.0
    last = full[N - 1]["x_cond"]
    np.testing.assert_allclose(to01(last), vol[context_indices(N - 1, k, N)], atol=1e-6)
    np.testing.assert_allclose(to01(last[k + 1]), vol[N - 2], atol=1e-6)       # z+1 of the last slice


def residuals(ds, keys, k):
    """(items, 1 + 2k, S, S) noise of the stacks on the [0,1] scale, and each item's sigma."""
    out, sigmas = [], []
    for key in keys:
        z, r, c = place(ds, key[0] if isinstance(key, tuple) else key)
        item = ds[key]
        out.append(to01(item["x_cond"]) - clean_stack(ds.files[0], z, r, c, k))
        sigmas.append(float(item["sigma"]))
    return np.stack(out), np.array(sigmas)


def test_each_neighbour_has_its_own_noise_at_the_centre_level(tmp_path):
    path = write_h5(tmp_path / "v.h5")
    k = 1
    train = HDF5PatchDataset([path], noise=GaussianNoise(sigma=[0.05, 0.2]), context_slices=k)
    keys = [(i, 0, epoch) for epoch in range(3) for i in range(len(train))]
    res, sigmas = residuals(train, keys, k)
    flat = res.reshape(len(keys), 1 + 2 * k, -1)
    # independent: the noise of any two channels is uncorrelated (about 41 k pixel pairs each)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert abs(np.corrcoef(flat[:, a].ravel(), flat[:, b].ravel())[0, 1]) < 0.02, (a, b)
        assert not np.allclose(flat[:, a], flat[:, b])
    # the same level: every channel's std is the item's sigma (one draw of the range per stack)
    ratio = flat.std(axis=2) / sigmas[:, None]
    assert np.abs(ratio - 1).max() < 0.25 and abs(ratio.mean() - 1) < 0.01
    # fresh per (seed, epoch, item), yet the same on every read with that key
    assert torch.equal(train[(3, 0, 1)]["x_cond"], train[(3, 0, 1)]["x_cond"])
    assert not torch.equal(train[(3, 0, 1)]["x_cond"][1:], train[(3, 0, 2)]["x_cond"][1:])
    # validation: fixed by the noise seed, independent across channels
    val = HDF5PatchDataset([path], noise=GaussianNoise(sigma=0.1), noise_seed=7, context_slices=k)
    again = HDF5PatchDataset([path], noise=GaussianNoise(sigma=0.1), noise_seed=7, context_slices=k)
    assert all(torch.equal(val[i]["x_cond"], again[i]["x_cond"]) for i in range(len(val)))
    res, _ = residuals(val, range(len(val)), k)
    flat = res.transpose(1, 0, 2, 3).reshape(1 + 2 * k, -1)
    assert np.abs(np.corrcoef(flat) - np.eye(1 + 2 * k)).max() < 0.03
    assert flat.std(axis=1) == pytest.approx([0.1] * 3, rel=0.03)
    # the centre of a k = 1 item is the k = 0 item: the neighbours draw after it
    single = HDF5PatchDataset([path], noise=GaussianNoise(sigma=0.1), noise_seed=7)
    assert torch.equal(val[4]["x_cond"][:1], single[4]["x_cond"])


def test_reflected_duplicates_get_independent_noise(tmp_path):
    """At slice 0 the z-1 and z+1 channels show the same slice (1) but not the same noise."""
    path = write_h5(tmp_path / "v.h5")
    ds = HDF5PatchDataset([path], noise=GaussianNoise(sigma=0.1), noise_seed=0, context_slices=1)
    edge = [i for i in range(len(ds)) if place(ds, i)[0] == 0]
    res, _ = residuals(ds, edge, 1)
    assert np.allclose(clean_stack(path, 0, 0, 0, 1)[1], clean_stack(path, 0, 0, 0, 1)[2])
    assert abs(np.corrcoef(res[:, 1].ravel(), res[:, 2].ravel())[0, 1]) < 0.1


class PerSliceGaussian:
    """A per-slice noise model (like low-dose CT) that is just Gaussian, for fast tests."""

    per_slice = True

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, clean01, rng):
        return clean01 + self.sigma * rng.standard_normal(clean01.shape).astype(np.float32), self.sigma


def test_per_slice_noise_neighbours_are_own_realisations(tmp_path):
    path = write_h5(tmp_path / "v.h5")
    for seed, draw in ((0, None), (None, (0, 1))):
        ds = HDF5PatchDataset([path], noise=PerSliceGaussian(0.1), noise_seed=seed, context_slices=1)
        keys = range(len(ds)) if draw is None else [(i, *draw) for i in range(len(ds))]
        res, _ = residuals(ds, keys, 1)
        flat = res.transpose(1, 0, 2, 3).reshape(3, -1)
        assert np.abs(np.corrcoef(flat) - np.eye(3)).max() < 0.05
        edge = [key for key in keys if place(ds, key if draw is None else key[0])[0] == 0]
        res, _ = residuals(ds, edge, 1)                   # z-1 and z+1 both slice 1: still two realisations
        assert not np.allclose(res[:, 1], res[:, 2])
    # k = 0 with per-slice noise draws as before: the centre of the stack is the single slice
    one = HDF5PatchDataset([path], noise=PerSliceGaussian(0.1), noise_seed=0)
    assert torch.equal(one[9]["x_cond"], ds.__class__([path], noise=PerSliceGaussian(0.1), noise_seed=0,
                                                       context_slices=1)[9]["x_cond"][:1])


@pytest.mark.parametrize("augment", [FULL, True])
def test_augmentation_acts_on_the_whole_stack(tmp_path, augment):
    """Slices identical along z: every channel of an augmented noise-free stack equals the
    augmented clean slice, whatever flips, voxel-size rescale and intensity were drawn."""
    base = np.random.default_rng(2).random((SIDE, SIDE))
    path = write_h5(tmp_path / "same.h5", np.repeat(base[None], N, axis=0))
    ds = HDF5PatchDataset([path], noise=GaussianNoise(sigma=0.0), augment=augment, context_slices=2)
    changed = 0
    for i in range(len(ds)):
        item = ds[(i, 0, 0)]
        assert torch.equal(item["x_cond"], item["x_prior"].expand(5, -1, -1))
        z, r, c = place(ds, i)
        changed += not np.allclose(to01(item["x_prior"][0]), clean_stack(path, z, r, c, 0)[0], atol=1e-6)
    assert changed > len(ds) // 2                          # the augmentation did act
    # slices that differ: channel j is the augmentation of its own slice, with the centre's draw
    path = write_h5(tmp_path / "v.h5")
    ds = HDF5PatchDataset([path], noise=GaussianNoise(sigma=0.0), augment=augment, context_slices=1)
    item, (z, r, c) = ds[(11, 0, 0)], place(ds, 11)
    rng = np.random.default_rng([0x7472, 0, 0, 11])
    p = ds.augment.draw(rng, (SIZE, SIZE))
    for j, zz in enumerate(context_indices(z, 1, N)):
        want = ds.augment.apply(clean_stack(path, zz, r, c, 0)[0], p, ds._reader(0, zz, r, c))
        np.testing.assert_allclose(to01(item["x_cond"][j]), want, atol=1e-6)


@pytest.fixture
def volumes(tmp_path):
    return [str(make_volume(tmp_path / "head_ct.nii.gz", "ct")), str(make_volume(tmp_path / "brain_mr.nii.gz", "mr", seed=1))]


def datamodule(volumes, tmp_path, **kw):
    args = dict(volumes=volumes, cache_dir=str(tmp_path / "cache"), image_size=16, stride=8,
                noise={"type": "gaussian", "sigma": 0.1}, split={"mode": "slab", "fractions": [0.6, 0.2, 0.2], "gap": 2},
                batch_size=4)
    args.update(kw)
    return DenoisingDataModule(**args)


def test_datamodule_passes_context_slices_to_every_split(tmp_path, volumes):
    dm = datamodule(volumes, tmp_path, context_slices=1)
    dm.setup()
    assert dm.train_set.context_slices == dm.val_set.context_slices == dm.test_set.context_slices == 1
    for loader, size in ((dm.train_dataloader(), 16), (dm.val_dataloader(), 16), (dm.test_dataloader(), None)):
        batch = next(iter(loader))
        assert batch["x_cond"].shape[1] == 3 and batch["x_prior"].shape[1] == 1
        assert size is None or batch["x_cond"].shape[-2:] == (size, size)
    plain = datamodule(volumes, tmp_path)
    plain.setup()
    assert plain.context_slices == 0 and next(iter(plain.val_dataloader()))["x_cond"].shape[1] == 1
    # the val centre is the k = 0 val item (same seed), the neighbours come on top
    assert torch.equal(dm.val_set[0]["x_cond"][:1], plain.val_set[0]["x_cond"])


def test_datamodule_refuses_bad_context_and_a_model_of_other_stacks(tmp_path, volumes):
    with pytest.raises(ValueError, match="context_slices must be an integer >= 0"):
        datamodule(volumes, tmp_path, context_slices=-1)
    with pytest.raises(ValueError, match=r"context_slices=3 reads 3 slice\(s\) beyond each slab, but the slab "
                                         r"split's gap is 2.*split.gap >= 3"):
        datamodule(volumes, tmp_path, context_slices=3)
    dm = datamodule(volumes, tmp_path, context_slices=2)
    dm.check_model(type("M", (), {"context_slices": 2})())
    with pytest.raises(ValueError, match=r"the model's context_slices is 0 but the data's \(data.params."
                                         r"context_slices\) is 2: the model takes a stack of 1 slice\(s\), the data "
                                         r"gives 5"):
        dm.check_model(object())
