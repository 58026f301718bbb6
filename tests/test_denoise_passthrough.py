"""denoise.py keeps every intensity the model does not denoise (issue 16): voxels outside the
intensity window pass through, a noise-free or constant scan comes back unchanged.

Before the fix the output was the model's [0,1] output mapped back: MR background 0 came
back as the window's low end (11 scanner units on the bundled T1), voxels above the window
were clipped to its top, and a scan without measurable noise still went through the model
at t* = 0 (bundled CT: up to 117 HU changed)."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from diffusion_modules.diffusion_utils.noise_level import negligible_sigma
from models.ddpm_conditioned import ConditionDDPM
from orchestration.checkpoints import load_checkpoint
from orchestration.volume_denoiser import EDGE_BAND_SIGMAS, denoise_volume
from utils.intensity import intensity_window, window_weight
from synthetic import load_script

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "pretrained" / "cdm4mi_bundled_ct_mr.ckpt"
DATA = ROOT / "run_scripts" / "data"


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(ConditionDDPM, CKPT)


def smooth_head(modality, shape=(48, 40, 4)):
    """A noise-free head: smooth tissue in an ellipse, MR on a zero background with two
    voxels per slice far above the window, CT in air with a -3024 HU padding row and 6000 HU metal."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    inside = x ** 2 / 0.8 + y ** 2 / 0.6 < 0.64
    tissue = 0.55 + 0.25 * np.cos(2 * x) * np.sin(1.5 * y)
    if modality == "mr":
        sl = np.where(inside, 400 * tissue, 0.0)
        sl[20, 18:20] = 900.0
    else:
        sl = np.where(inside, -1024 + 4095 * 0.3 * tissue, -1000.0)
        sl[20, 18:20] = 6000.0
        sl[:2] = -3024.0
    return np.repeat(sl[..., None], shape[2], axis=2).astype(np.float32)


def run(model, tmp_path, volume, name="in.nii.gz", **kw):
    src = tmp_path / name
    nib.save(nib.Nifti1Image(volume, np.diag([0.9, 0.9, 2.5, 1.0])), str(src))
    info = denoise_volume(model, src, tmp_path / ("out_" + name), progress=False, **kw)
    return info, nib.load(str(info["output"])).get_fdata(dtype=np.float32)


def test_window_weight_is_one_inside_and_ramps_to_zero_outside():
    x = np.array([-1.0, -0.04, -0.03, -0.02, 0.0, 0.5, 1.0, 1.01, 1.02, 1.03, 1.04, 5.0])
    np.testing.assert_allclose(window_weight(x, 0.02, 0.04), [0, 0, 0.5, 1, 1, 1, 1, 1, 1, 0.5, 0, 0], atol=1e-5)
    np.testing.assert_array_equal(window_weight(x, 0.0, 0.0), [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="inner <= outer"):
        window_weight(x, 0.05, 0.01)


def test_the_negligible_sigma_is_half_the_noise_of_the_smallest_timestep(model):
    # beta_0 = 1e-4: sqrt((1 - a_bar_0) / a_bar_0) = 0.0100 in model units, 0.0050 on [0, 1]
    assert negligible_sigma(model.diffusion) == pytest.approx(0.0025, rel=1e-3)


@pytest.mark.parametrize("modality", ["mr", "ct"])
def test_a_noise_free_scan_comes_back_bit_identical(model, tmp_path, modality):
    vol = smooth_head(modality)
    with pytest.warns(UserWarning, match="no noise to remove"):
        info, out = run(model, tmp_path, vol, modality=modality)  # sigma auto
    assert info["sigma01"] < 1e-5 and info["t_star"] is None and "none measurable" in info["unchanged"]
    np.testing.assert_array_equal(out, vol)


@pytest.mark.parametrize("value", [40.0, 100.0, 0.0])
def test_a_constant_volume_with_sigma_auto_comes_back_unchanged(model, tmp_path, value):
    """Before: 40 HU went through the model (an estimate of about 1e-17 gave t* = 0); a
    constant MR volume was refused (empty window)."""
    vol = np.full((24, 20, 3), value, dtype=np.float32)
    for modality in ("ct", "mr"):
        with pytest.warns(UserWarning, match="no noise to remove"):
            info, out = run(model, tmp_path, vol, name=f"{modality}.nii.gz", modality=modality)
        np.testing.assert_array_equal(out, vol)
        assert info["t_star"] is None


def test_a_tiny_given_sigma_is_sigma_zero(model, tmp_path):
    vol = smooth_head("ct") + np.float32(7.0)
    with pytest.warns(UserWarning, match=r"sigma 0.002 is below 0.0025"):
        info, out = run(model, tmp_path, vol, modality="ct", sigma=0.002)
    np.testing.assert_array_equal(out, vol)
    info, out = run(model, tmp_path, vol, name="b.nii.gz", modality="ct", sigma=0.004, steps=2)
    assert info["t_star"] == 0 and info["unchanged"] is None and not np.array_equal(out, vol)


def bundled_t1(slices=slice(20, 26)):
    img = nib.load(str(DATA / "mr_colin27_t1.nii.gz"))
    return np.asarray(img.dataobj[:, :, slices], dtype=np.float32)


@pytest.mark.parametrize("modality", ["mr", "ct"])
def test_intensities_outside_the_window_pass_through_when_the_model_runs(model, tmp_path, modality):
    """Noise of sigma 0.03 on the bundled T1's nonzero voxels (MR) or on a smooth CT head:
    the model runs (t* > 0) and denoises the window, MR background zeros stay exactly 0,
    voxels more than 4 sigma outside the window keep their input value exactly (MR: the
    brightest, up to 1.3 x the window's top; CT: -3024 HU padding, 6000 HU metal)."""
    clean = bundled_t1(slice(22, 26)) if modality == "mr" else smooth_head("ct", shape=(64, 56, 4))
    low, high = intensity_window(clean, modality)
    sigma = 0.03
    rng = np.random.default_rng(0)
    noisy = clean + np.where(clean != 0, rng.normal(0, sigma * (high - low), clean.shape), 0).astype(np.float32)
    extreme = (clean == 6000) | (clean == -3024)
    noisy[extreme] = clean[extreme]
    info, out = run(model, tmp_path, noisy, modality=modality, steps=4)
    assert info["t_star"] > 0 and info["sigma01"] == pytest.approx(sigma, rel=0.2)
    low, high = info["window"]  # MR: the noisy scan's percentiles
    x01 = (noisy - low) / (high - low)
    far = (x01 < -EDGE_BAND_SIGMAS[1] * info["sigma01"]) | (x01 > 1 + EDGE_BAND_SIGMAS[1] * info["sigma01"])
    assert far.sum() >= extreme.sum() and (x01 > 1 + EDGE_BAND_SIGMAS[1] * info["sigma01"]).sum() >= 8
    np.testing.assert_array_equal(out[far], noisy[far])
    if modality == "mr":
        zeros = noisy == 0
        assert zeros.mean() > 0.2 and np.all(out[zeros] == 0)
    window = (clean >= low) & (clean <= high) & (clean != 0) & (np.abs(clean + 1000) > 1)
    rmse = lambda a: float(np.sqrt(np.mean((a[window] - clean[window]) ** 2)))
    assert rmse(out) < 0.7 * rmse(noisy), (rmse(out), rmse(noisy))


def test_bundled_ct_comes_back_bit_identical_and_prints_why(tmp_path, capsys):
    """The bundled CT carries 5-8 HU of its own noise, sigma 0.0009 on the [0,1] scale:
    below the model's 0.0025, so the whole scan is written unchanged. Before: up to 117 HU
    changed (t* = 0, every voxel through the model and clipped to -1024..3071)."""
    script = load_script("denoise.py")
    with pytest.warns(UserWarning, match="no noise to remove"):
        info = script.main(["--ckpt", str(CKPT), "--input", str(DATA / "ct_cranium.nii.gz"),
                            "--output", str(tmp_path / "ct.nii.gz")])
    printed = capsys.readouterr().out
    assert "not denoised: no noise to remove: sigma 0.000" in printed and "written unchanged" in printed
    vol = nib.load(str(DATA / "ct_cranium.nii.gz")).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(nib.load(str(info["output"])).get_fdata(dtype=np.float32), vol)


def test_bundled_mr_keeps_its_background_and_its_brightest_voxels(model, tmp_path):
    """Six slices of the bundled T1: its estimate (0.0086, 1.2 units) is measurable, so the
    window is denoised at t* = 2; background 0 stays 0 and voxels above the window keep
    their value. Before: 0 came back as 11 units and the maximum 190 as 156."""
    vol = bundled_t1()
    info, out = run(model, tmp_path, vol, modality="mr")
    low, high = info["window"]
    assert info["t_star"] == 2 and info["sigma01"] == pytest.approx(0.0086, rel=0.1)
    zeros = vol == 0
    assert zeros.mean() > 0.2 and np.all(out[zeros] == 0)
    above = vol > high + EDGE_BAND_SIGMAS[1] * info["sigma01"] * (high - low)
    assert above.sum() > 100 and vol.max() == 187
    np.testing.assert_array_equal(out[above], vol[above])
    # inside the window the model removes what it measures as noise: a small change
    assert np.abs(out - vol).mean() < 0.01 * vol.mean() and np.abs(out - vol).max() < 8
