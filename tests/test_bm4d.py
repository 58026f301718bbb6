"""BM4D as a reference method: 3-D on the whole noisy volume of a source (a test slab, an
unseen volume), scored on the same slices as every other method, from the same noisy voxels;
the volume context the data module and the unseen volumes give each test slice."""
import csv

import numpy as np
import pytest
from omegaconf import OmegaConf

from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
from diffusion_modules.diffusion_utils.noise import GaussianNoise
from evaluation.denoisers import BM3DDenoiser, BM4DDenoiser, Denoiser, SigmaEstimating, build_denoiser, volume_runs
from evaluation.loop import evaluate, slice_rng
from orchestration.config_checks import check_methods
from orchestration.evaluation_job import parse_test_volumes, unseen_slices
from synthetic import make_volume

BUNDLED = "run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml"


def phantom(n=6, size=40):
    """(n, size, size) [0,1] stack of nearly the same slice (an ellipse with stripes, 0.005
    brighter per slice)."""
    yy, xx = np.mgrid[:size, :size] / size
    sl = np.zeros((size, size), np.float32)
    body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.36) ** 2 < 1
    sl[body] = 0.4 + 0.25 * (np.sin(xx[body] * 18) > 0) + 0.1 * yy[body]
    return np.stack([np.where(body, sl + 0.005 * j, 0).astype(np.float32) for j in range(n)])


def slab_slices(volume, source="ct_slab", first_z=10, scored=(1, 4)):
    """Slice dicts of the scored positions of a slab starting at slice first_z, sharing it."""
    return [{"clean": volume[j], "source": source, "modality": "ct", "slice_index": first_z + j,
             "spacing": (0.9, 0.9, 1.5), "norm": {"modality": "ct", "low": -1024.0, "high": 3071.0},
             "volume": volume, "volume_index": j} for j in scored]


def keyed_noisy_volume(volume, seed, sigma, source, first_z):
    return np.stack([GaussianNoise(sigma)(volume[j], slice_rng(seed, sigma, source, first_z + j))[0]
                     for j in range(len(volume))])


class VolumeRecorder(Denoiser):
    """A 3-D method that records every noisy stack it is given and returns it clipped."""

    volumetric = True

    def __init__(self, max_slices=None):
        self.name, self.stacks, self.max_slices = "volume recorder", [], max_slices

    def denoise_volume(self, noisy01, sigma):
        self.stacks.append((np.array(noisy01), sigma))
        return np.clip(noisy01, 0, 1)


class SliceRecorder(Denoiser):
    def __init__(self):
        self.name, self.seen = "slice recorder", []

    def __call__(self, noisy01, sigma):
        self.seen.append(np.array(noisy01))
        return np.clip(noisy01, 0, 1)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bm4d_uses_the_neighbouring_slices():
    volume = phantom()
    noisy = keyed_noisy_volume(volume, 0, 0.1, "p", 0)
    psnr = lambda pred, clean: -10 * np.log10(np.mean((pred.astype(np.float64) - clean) ** 2))  # noqa: E731
    bm4d = BM4DDenoiser().denoise_volume(noisy, 0.1)
    assert bm4d.shape == volume.shape and bm4d.dtype == np.float32 and 0 <= bm4d.min() and bm4d.max() <= 1
    for j in (1, 3):  # six near copies of one slice: 3-D grouping gains far more than one slice can
        alone = BM3DDenoiser()(noisy[j], 0.1)
        assert psnr(bm4d[j], volume[j]) > psnr(alone, volume[j]) + 5
    one = BM4DDenoiser()(noisy[2], 0.1)  # one slice on its own: a stack of one
    assert one.shape == volume[2].shape and psnr(one, volume[2]) < psnr(bm4d[2], volume[2]) - 5


def test_bm4d_is_scored_on_the_slices_from_the_whole_noisy_volume(tmp_path):
    volume = phantom()
    slices = slab_slices(volume)
    recorder, rec2d = VolumeRecorder(), SliceRecorder()
    evaluate([BM4DDenoiser(), recorder, rec2d], slices, [0.1, 0.2], tmp_path, noise_seed=3,
             save_predictions=False, n_examples=0)
    rows = read_rows(tmp_path / "scores.csv")
    assert len(recorder.stacks) == 2  # the whole volume once per level, not once per scored slice
    for (stack, sigma), level in zip(recorder.stacks, (0.1, 0.2)):
        expected = keyed_noisy_volume(volume, 3, level, "ct_slab", 10)
        np.testing.assert_array_equal(stack, expected)  # every slice, scored or not, with its own keyed noise
        assert sigma == level
    # the 2-D method's noisy slices are the very voxels of the volume the 3-D methods got
    for n, (j, level) in zip(rec2d.seen, [(j, lv) for lv in (0.1, 0.2) for j in (1, 4)]):
        np.testing.assert_array_equal(n, recorder.stacks[(0.1, 0.2).index(level)][0][j])
    # BM4D's rows are its whole-volume output at the scored slices
    pred = BM4DDenoiser().denoise_volume(keyed_noisy_volume(volume, 3, 0.2, "ct_slab", 10), 0.2)
    for j in (1, 4):
        row = next(r for r in rows if r["method"] == "BM4D" and r["sigma"] == "0.2"
                   and r["slice_index"] == str(10 + j))
        mse = np.mean((pred[j].astype(np.float64) - volume[j]) ** 2)
        assert float(row["psnr"]) == pytest.approx(-10 * np.log10(mse), abs=1e-3)
    bm4d_rows = [r for r in rows if r["method"] == "BM4D"]
    assert len(bm4d_rows) == 4 and len({r["seconds"] for r in bm4d_rows if r["sigma"] == "0.1"}) == 1


def test_a_slice_without_volume_is_a_volume_of_one(tmp_path):
    s = {k: v for k, v in slab_slices(phantom(), scored=(2,))[0].items() if k not in ("volume", "volume_index")}
    recorder = VolumeRecorder()
    evaluate([recorder], [s], [0.1], tmp_path, noise_seed=1, save_predictions=False, n_examples=0)
    expected = GaussianNoise(0.1)(s["clean"], slice_rng(1, 0.1, "ct_slab", 12))[0]
    np.testing.assert_array_equal(recorder.stacks[0][0], expected[None])


def test_bad_volume_context_is_refused(tmp_path):
    s = slab_slices(phantom())[0]
    with pytest.raises(ValueError, match="volume_index-th slice is the clean slice"):
        evaluate([SliceRecorder()], [{**s, "volume_index": 2}], [0.1], tmp_path, n_examples=0)


def test_bm4d_from_a_config_entry():
    d = build_denoiser({"name": "BM4D lc", "type": "bm4d", "params": {"profile": "lc"}}, {})
    assert isinstance(d, BM4DDenoiser) and d.volumetric and d.profile == "lc" and d.name == "BM4D lc"
    with pytest.raises(ValueError, match="profile must be one of"):
        build_denoiser({"type": "bm4d", "params": {"profile": "fast"}}, {})
    hidden = build_denoiser({"type": "bm4d", "sigma": "estimate"}, {})
    assert isinstance(hidden, SigmaEstimating) and hidden.volumetric
    noisy = keyed_noisy_volume(phantom(), 0, 0.1, "p", 0)
    estimated, known = hidden.denoise_volume(noisy, 0.1), BM4DDenoiser().denoise_volume(noisy, 0.1)
    assert not np.array_equal(estimated, known) and np.abs(estimated - known).mean() < 0.01
    check_methods([{"name": "BM4D", "type": "bm4d", "params": {"profile": "refilter"}}])
    with pytest.raises(Exception, match=r"params\.max_slicez"):
        check_methods([{"name": "BM4D", "type": "bm4d", "params": {"max_slicez": 5}}])


def test_bundled_config_scores_bm4d_after_bm3d():
    methods = OmegaConf.to_container(OmegaConf.load(BUNDLED).evaluation.methods)
    types = [m["type"] for m in methods]
    assert types.index("bm4d") == types.index("bm3d") + 1
    check_methods(methods)


def test_unseen_slices_carry_their_whole_volume(tmp_path):
    path = make_volume(tmp_path / "other_ct.nii.gz", "ct", n_slices=7)
    slices = unseen_slices(parse_test_volumes([{"path": str(path), "modality": "ct", "max_slices": 2}], None))
    assert [s["slice_index"] for s in slices] == [0, 6]
    first, last = slices
    assert first["volume"] is last["volume"] and first["volume"].shape[0] == 7  # all slices, one array
    assert first["volume"].dtype == np.float32
    for s in slices:
        assert s["volume_index"] == s["slice_index"] and np.shares_memory(s["clean"], s["volume"])
        np.testing.assert_array_equal(s["clean"], s["volume"][s["volume_index"]])


def test_test_slices_carry_their_slab(tmp_path):
    volumes = [make_volume(tmp_path / "head_ct.nii.gz", "ct"), make_volume(tmp_path / "brain_mr.nii.gz", "mr", seed=1)]
    dm = DenoisingDataModule(volumes=[str(v) for v in volumes], cache_dir=str(tmp_path / "cache"), image_size=16,
                             stride=8, noise={"type": "gaussian", "sigma": 0.1},
                             split={"mode": "slab", "fractions": [0.6, 0.2, 0.2], "gap": 2})
    slices = dm.test_slices()
    for source in ("head_ct", "brain_mr"):
        mine = [s for s in slices if s["source"] == source]
        zs = [s["slice_index"] for s in mine]
        assert len(mine) >= 2 and zs == list(range(zs[0], zs[0] + len(zs)))  # the contiguous test slab
        assert all(s["volume"] is mine[0]["volume"] for s in mine) and mine[0]["volume"].shape[0] == len(mine)
        for s in mine:
            assert s["volume_index"] == s["slice_index"] - zs[0]
            np.testing.assert_array_equal(s["clean"], s["volume"][s["volume_index"]])
            np.testing.assert_array_equal(s["clean"], dm.test_set.clean_slice(dm.test_set.items.index(
                (dm.test_set.files.index(next(f for f in dm.test_set.files if f.stem == source)), s["slice_index"]))))


def test_the_study_takes_bm4d_as_a_reference():
    from evaluation.study_tables import comparisons
    from orchestration.study import expand_strategies

    methods, info = expand_strategies([{"name": "BM4D", "type": "bm4d", "params": {"profile": "np"}},
                                       {"name": "2.5D", "type": "ddpm", "nfe": [10]}], {"eta": 1.0})
    assert methods[0] == {"name": "BM4D", "type": "bm4d", "params": {"profile": "np"}}
    check_methods(methods)  # what run_study's check_run_config asks of them
    rows = [{"noise_type": "gaussian", "set": "unseen", "sigma": 0.1, "method": m, "source": "v",
             "slice_index": z, "psnr_masked": base + z * 0.1}
            for z in range(6) for m, base in (("BM4D", 30.0), ("2.5D | NFE 10", 31.0))]
    (c,) = comparisons(rows, info, ["BM4D"], n_boot=200)
    assert (c["method"], c["reference"], c["n"]) == ("2.5D | NFE 10", "BM4D", 6)
    assert c["mean_diff"] == pytest.approx(1.0)


def test_volume_runs_cover_the_scored_slices():
    assert volume_runs([0, 5], 6, None) == [range(6)]
    assert volume_runs([0], 11, 5) == [range(0, 5)]  # the unseen Colin27 slab: first slice scored
    assert volume_runs([10], 11, 5) == [range(6, 11)]
    assert volume_runs([0, 5], 6, 5) == [range(0, 6)]  # overlapping windows merge
    assert volume_runs([40, 2, 47], 100, 5) == [range(0, 5), range(38, 43), range(45, 50)]
    assert volume_runs([40, 44], 100, 5) == [range(38, 47)]
    assert volume_runs([3], 4, 5) == [range(4)]


def test_max_slices_gives_a_3d_method_the_slices_around_the_scored_ones(tmp_path):
    volume = phantom(n=11)
    recorder = VolumeRecorder(max_slices=5)
    evaluate([recorder], slab_slices(volume, first_z=0, scored=(0, 9)), [0.1], tmp_path, noise_seed=2,
             save_predictions=False, n_examples=0)
    (first, _), (second, _) = recorder.stacks
    np.testing.assert_array_equal(first, keyed_noisy_volume(volume, 2, 0.1, "ct_slab", 0)[0:5])
    np.testing.assert_array_equal(second, keyed_noisy_volume(volume, 2, 0.1, "ct_slab", 0)[6:11])
    rows = read_rows(tmp_path / "scores.csv")
    assert [r["slice_index"] for r in rows] == ["0", "9"]
    d = build_denoiser({"type": "bm4d", "params": {"max_slices": 5}}, {})
    assert d.max_slices == 5
    with pytest.raises(ValueError, match="max_slices must be an integer >= 1"):
        BM4DDenoiser(max_slices=0)


def test_a_method_may_be_scored_on_one_set_only(tmp_path):
    same = slab_slices(phantom(), scored=(2,))
    unseen = [{**s, "source": "other", "set": "unseen"} for s in slab_slices(phantom(), scored=(3,))]
    only_unseen = build_denoiser({"name": "rec", "type": "noisy", "sets": ["unseen"]}, {})
    result = evaluate([only_unseen, SliceRecorder()], same + unseen, [0.1], tmp_path, save_predictions=False,
                      n_examples=1)
    assert result["examples_png"].exists()  # its column stays empty on the same-subject example
    rows = read_rows(tmp_path / "scores.csv")
    assert sorted((r["method"], r["set"]) for r in rows) == [
        ("rec", "unseen"), ("slice recorder", "same-subject"), ("slice recorder", "unseen")]
    with pytest.raises(ValueError, match="sets must be a non-empty list"):
        build_denoiser({"type": "noisy", "sets": ["unsen"]}, {})
    check_methods([{"name": "BM4D", "type": "bm4d", "sets": ["unseen"], "params": {"max_slices": 5}}])
    with pytest.raises(Exception, match=r"sets\[0\]: 'unsen' is not one of"):
        check_methods([{"name": "BM4D", "type": "bm4d", "sets": ["unsen"]}])
