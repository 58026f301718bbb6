"""2.5D models in the evaluation and in denoise.py: a model with ``context_slices`` k gets the
noisy slice and its k noisy neighbours on each side ([z, z-k..z-1, z+1..z+k], reflected at
the volume's ends); the noise of every slice is keyed by (seed, level, source, slice index),
so a neighbour carries exactly the noise it has when it is scored itself."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_modules.diffusion_utils.noise import GaussianNoise
from evaluation.denoisers import Denoiser, ModelDenoiser
from evaluation.loop import evaluate, slice_rng
from models.ddpm_conditioned import ConditionDDPM
from orchestration.volume_denoiser import denoise_slices, denoise_volume

CKPT = Path(__file__).resolve().parents[1] / "pretrained" / "cdm4mi_bundled_ct_mr.ckpt"


class FakeContextModel(torch.nn.Module):
    """A model with ``context_slices`` that records its inputs and returns the first channel."""

    def __init__(self, k):
        super().__init__()
        self.context_slices, self.inputs = k, []

    def denoise(self, noisy, **kw):
        self.inputs.append(noisy.clone())
        return (noisy[:, :1].clone(), torch.zeros_like(noisy[:, :1])) if kw.get("return_std") else noisy[:, :1].clone()


class Fake2D(torch.nn.Module):
    """A model without ``context_slices`` (today's 2-D models)."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def denoise(self, noisy, **kw):
        self.inputs.append(noisy.clone())
        return noisy.clone()


class SliceRecorder(Denoiser):
    def __init__(self):
        self.name, self.seen = "slice recorder", {}

    def __call__(self, noisy01, sigma):
        self.seen.setdefault(sigma, []).append(np.array(noisy01))
        return np.clip(noisy01, 0, 1)


def slab(n=5, size=24):
    """(n, size, size) stack whose slices differ (slice j brighter by 0.05 j)."""
    yy, xx = np.mgrid[:size, :size] / size
    body = ((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.35) ** 2 < 1
    return np.stack([np.where(body, 0.3 + 0.05 * j + 0.2 * yy, 0.0) for j in range(n)]).astype(np.float32)


def slices_of(volume, positions, source="mr_slab", first_z=20):
    return [{"clean": volume[j], "source": source, "modality": "mr", "slice_index": first_z + j,
             "spacing": (1.0, 1.0, 1.0), "norm": {"modality": "mr", "low": 0.0, "high": 200.0},
             "volume": volume, "volume_index": j} for j in positions]


def keyed(volume, j, seed=5, sigma=0.1, source="mr_slab", first_z=20):
    return GaussianNoise(sigma)(volume[j], slice_rng(seed, sigma, source, first_z + j))[0]


def test_model_denoiser_gives_a_2p5d_model_its_stack_and_a_2d_model_one_slice():
    stack = np.random.default_rng(0).uniform(0, 1, (3, 16, 16)).astype(np.float32)
    model = FakeContextModel(1)
    d = ModelDenoiser(model, "k1")
    assert d.context_slices == 1
    pred = d(stack, 0.1)
    assert model.inputs[0].shape == (1, 3, 16, 16)
    np.testing.assert_allclose(model.inputs[0][0].numpy(), stack * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(pred, stack[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(3,H,W\) stack"):
        d(stack[0], 0.1)
    flat = Fake2D()
    d2 = ModelDenoiser(flat, "k0")
    assert d2.context_slices == 0
    d2(stack[0], 0.1)
    assert flat.inputs[0].shape == (1, 1, 16, 16)  # called exactly as before


def test_neighbours_are_the_noisy_slices_as_scored_and_reflected(tmp_path):
    volume = slab()
    model, rec = FakeContextModel(1), SliceRecorder()
    evaluate([rec, ModelDenoiser(model, "k1")], slices_of(volume, range(5)), [0.1], tmp_path, noise_seed=5,
             save_predictions=False, n_examples=0)
    scored = rec.seen[0.1]  # the noisy slices a 2-D method scored, positions 0..4
    for j in range(5):
        np.testing.assert_array_equal(scored[j], keyed(volume, j))
    order = {0: (0, 1, 1), 1: (1, 0, 2), 2: (2, 1, 3), 3: (3, 2, 4), 4: (4, 3, 3)}  # [z, z-1, z+1], reflected
    for j, got in enumerate(model.inputs):
        got01 = (got[0].numpy() + 1) / 2
        for channel, pos in enumerate(order[j]):
            np.testing.assert_allclose(got01[channel], scored[pos], atol=1e-6)


def test_unscored_neighbours_come_from_the_volume_with_their_own_noise(tmp_path):
    volume = slab()
    model = FakeContextModel(2)
    evaluate([ModelDenoiser(model, "k2")], slices_of(volume, [1]), [0.1], tmp_path, noise_seed=5,
             save_predictions=False, n_examples=0)
    got01 = (model.inputs[0][0].numpy() + 1) / 2
    assert got01.shape == (5, 24, 24)
    for channel, pos in enumerate((1, 1, 0, 2, 3)):  # [z, z-2, z-1, z+1, z+2] of position 1: z-2 reflects to 1
        np.testing.assert_allclose(got01[channel], keyed(volume, pos), atol=1e-6)


def test_a_slices_noise_does_not_depend_on_the_list(tmp_path):
    volume = slab()
    alone, crowd = SliceRecorder(), SliceRecorder()
    evaluate([alone], slices_of(volume, [3]), [0.1], tmp_path / "a", noise_seed=5, save_predictions=False,
             n_examples=0)
    other = slices_of(slab(3), [0, 2], source="ct_other")
    evaluate([crowd], other + slices_of(volume, [0, 3]), [0.1], tmp_path / "b", noise_seed=5,
             save_predictions=False, n_examples=0)
    np.testing.assert_array_equal(alone.seen[0.1][0], crowd.seen[0.1][3])


def test_each_slice_has_its_own_noise():
    volume = np.full((4, 64, 64), 0.5, np.float32)  # identical clean slices
    noise = [keyed(volume, j) - 0.5 for j in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert abs(np.corrcoef(noise[a].ravel(), noise[b].ravel())[0, 1]) < 0.05
    assert not np.array_equal(keyed(volume, 0, source="a"), keyed(volume, 0, source="b"))


def coded(n=3, h=40, w=36):
    """A stack whose every voxel tells its (slice, row, col)."""
    z, r, c = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    return ((z * h * w + r * w + c) / (n * h * w)).astype(np.float32), (n, h, w)


def decode(values01, shape):
    n, h, w = shape
    code = np.rint(values01.astype(np.float64) * n * h * w).astype(int)
    return code // (h * w), (code // w) % h, code % w


def test_denoise_slices_gives_a_k1_model_its_neighbours_in_order_tile_by_tile():
    slices01, shape = coded()
    model = FakeContextModel(1)
    mean, _ = denoise_slices(model, slices01, 0.1, tile=24, overlap=4, batch_size=3, progress=False)
    np.testing.assert_allclose(mean, slices01, atol=1e-6)  # the first channel is the slice itself
    reflected = {0: (1, 1), 1: (0, 2), 2: (1, 1)}
    tiles = 0
    for batch in model.inputs:
        assert batch.shape[1:] == (3, 24, 24)
        for stack in (batch.numpy() + 1) / 2:
            z, r, c = decode(stack, shape)
            z0 = z[0, 0, 0]
            assert (z[0] == z0).all()
            assert (z[1] == reflected[z0][0]).all() and (z[2] == reflected[z0][1]).all()
            for ch in (1, 2):  # the neighbours' tiles are cut at the centre's rows and columns
                assert np.array_equal(r[ch], r[0]) and np.array_equal(c[ch], c[0])
            tiles += 1
    assert tiles == 3 * 2 * 2  # 3 slices, 2 x 2 tiles each


def test_denoise_volume_runs_a_k1_checkpoint_with_its_neighbours(tmp_path):
    import nibabel as nib

    model = ConditionDDPM.load_from_checkpoint(str(CKPT), map_location="cpu").eval()
    model.context_slices = 1
    seen = []

    def denoise(noisy, **kw):
        seen.append(noisy.clone())
        return noisy[:, :1].clone(), torch.zeros_like(noisy[:, :1])

    model.denoise = denoise
    rng = np.random.default_rng(0)
    vol = np.where(np.arange(32)[:, None, None] > 4, 40.0, -1000.0) + rng.normal(0, 60, (32, 30, 4))
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([0.9, 0.9, 3.0, 1.0])), str(path))
    with pytest.warns(UserWarning, match="1-1.5 mm apart in training; these axial slices are 3 mm apart"):
        info = denoise_volume(model, path, tmp_path / "out.nii.gz", modality="ct", sigma=0.02, progress=False)
    assert info["context_slices"] == 1 and info["plane"] == "axial" and info["slices"] == 4
    assert info["slice_spacing"] == pytest.approx(3.0) and "--plane" in info["context_warning"]
    stacks = torch.cat(seen)
    assert stacks.shape[1] == 3 and stacks.shape[0] == 4  # each axial slice with z-1 and z+1
    centre = stacks[:, 0]
    np.testing.assert_array_equal(stacks[0, 1].numpy(), centre[1].numpy())  # slice 0: z-1 reflects to 1
    np.testing.assert_array_equal(stacks[1, 1].numpy(), centre[0].numpy())
    np.testing.assert_array_equal(stacks[1, 2].numpy(), centre[2].numpy())
    np.testing.assert_array_equal(stacks[3, 2].numpy(), centre[2].numpy())  # last slice: z+1 reflects to 2


def test_no_thick_slice_note_at_2_mm_or_for_a_single_slice_model(tmp_path):
    """The note on neighbours further apart than in training: above 2 mm, 2.5D models only."""
    import nibabel as nib

    vol = np.where(np.arange(32)[:, None, None] > 4, 40.0, -1000.0) + np.random.default_rng(1).normal(0, 60, (32, 30, 4))
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([0.9, 0.9, 2.0, 1.0])), str(path))
    thick = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([0.9, 0.9, 5.0, 1.0])), str(thick))
    for k, source, expect in ((1, path, None), (0, thick, None)):
        model = ConditionDDPM.load_from_checkpoint(str(CKPT), map_location="cpu").eval()
        model.context_slices = k
        model.denoise = lambda noisy, **kw: (noisy[:, :1].clone(), torch.zeros_like(noisy[:, :1]))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no note, no other warning
            info = denoise_volume(model, source, tmp_path / f"out{k}.nii.gz", modality="ct", sigma=0.02,
                                  progress=False)
        assert info["context_warning"] is expect
