"""Denoiser interface: baselines improve PSNR, ModelDenoiser scaling, build_denoiser."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from evaluation.denoisers import (
    BM3DDenoiser,
    ModelDenoiser,
    NLMDenoiser,
    NoisyInput,
    SigmaEstimating,
    build_denoiser,
)
from metrics.image_metrics import ImageMetrics


def phantom(size=64):
    """Piecewise-smooth [0,1] test slice: ellipse body, two inserts, a gradient."""
    yy, xx = np.mgrid[:size, :size] / size
    img = np.zeros((size, size), np.float32)
    body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.35) ** 2 < 1
    img[body] = 0.4 + 0.2 * xx[body]
    img[(yy - 0.4) ** 2 + (xx - 0.45) ** 2 < 0.01] = 0.9
    img[(yy - 0.65) ** 2 + (xx - 0.55) ** 2 < 0.005] = 0.15
    return img


def noisy_pair(sigma=0.1, seed=0):
    clean = phantom()
    noisy = (clean + np.random.default_rng(seed).normal(0, sigma, clean.shape)).astype(np.float32)
    return clean, noisy


class FakeDDPM(torch.nn.Module):
    """Identity in model units [-1,1]; records its calls; std = constant 0.2."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def denoise(self, noisy, sampler="ddim", steps=50, eta=0.0, n_samples=1, guidance_scale=1.0,
                t_start=None, sigma=None, return_std=False):
        self.calls.append({"noisy": noisy.clone(), "steps": steps, "n_samples": n_samples,
                           "t_start": t_start, "sigma": sigma, "return_std": return_std})
        if return_std:
            return noisy.clone(), torch.full_like(noisy, 0.2)
        return noisy.clone()


class ConstantUNet(torch.nn.Module):
    """Returns a constant in model units; takes no keyword arguments, like the U-Net."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def denoise(self, noisy):
        return torch.full_like(noisy, self.value)


@pytest.mark.parametrize("cls", [NLMDenoiser, BM3DDenoiser])
@pytest.mark.parametrize("known_sigma", [True, False])
def test_classical_denoisers_improve_psnr(cls, known_sigma):
    clean, noisy = noisy_pair(0.1)
    metrics = ImageMetrics()
    before = metrics.image_scores(clean, noisy)["psnr"]
    pred = cls()(noisy, 0.1 if known_sigma else None)
    assert pred.shape == clean.shape and pred.dtype == np.float32
    assert pred.min() >= 0.0 and pred.max() <= 1.0
    after = metrics.image_scores(clean, pred)["psnr"]
    assert after > before + 4.0, (cls.__name__, before, after)


def test_noisy_input_is_unclipped_identity():
    _, noisy = noisy_pair(0.1)
    out = NoisyInput()(noisy, 0.1)
    assert np.array_equal(out, noisy)
    assert out.min() < 0.0  # not clipped, so its PSNR is the noise level
    assert out is not noisy


def test_model_denoiser_identity_returns_input_in_01():
    _, noisy = noisy_pair(0.05)
    model = FakeDDPM()
    den = ModelDenoiser(model, "ddpm", steps=10)
    pred = den(noisy, 0.05)
    np.testing.assert_allclose(pred, np.clip(noisy, 0, 1), atol=1e-6)
    seen = model.calls[-1]
    assert seen["noisy"].shape == (1, 1, 64, 64) and seen["noisy"].dtype == torch.float32
    np.testing.assert_allclose(seen["noisy"][0, 0].numpy(), 2 * noisy - 1, atol=1e-6)
    assert seen["steps"] == 10 and seen["sigma"] is None and not seen["return_std"]
    assert not model.training


@pytest.mark.parametrize("value, expected", [(-1.0, 0.0), (0.0, 0.5), (1.0, 1.0), (3.0, 1.0), (-0.5, 0.25)])
def test_model_denoiser_maps_model_units_back(value, expected):
    den = ModelDenoiser(ConstantUNet(value), "unet")
    pred = den(np.zeros((8, 8), np.float32), 0.1)
    np.testing.assert_allclose(pred, expected)


def test_model_denoiser_passes_sigma_only_for_auto_start():
    clean, noisy = noisy_pair(0.1)
    model = FakeDDPM()
    ModelDenoiser(model, "auto", t_start="auto")(noisy, 0.1)
    assert model.calls[-1]["sigma"] == pytest.approx(0.1)
    ModelDenoiser(model, "auto", t_start="auto")(noisy, None)
    assert model.calls[-1]["sigma"] == pytest.approx(0.1, rel=0.15)  # estimated
    ModelDenoiser(model, "fixed", t_start=100)(noisy, 0.1)
    assert model.calls[-1]["sigma"] is None and model.calls[-1]["t_start"] == 100


def test_model_denoiser_std_map():
    _, noisy = noisy_pair(0.1)
    model = FakeDDPM()
    mean4 = ModelDenoiser(model, "mean of 4", n_samples=4)
    pred, std = mean4.denoise_with_std(noisy, 0.1)
    assert model.calls[-1]["return_std"] and model.calls[-1]["n_samples"] == 4
    np.testing.assert_allclose(std, 0.1)  # 0.2 in [-1,1] units is 0.1 on [0,1]
    np.testing.assert_allclose(pred, np.clip(noisy, 0, 1), atol=1e-6)
    one = ModelDenoiser(model, "one sample", n_samples=1)
    assert one.denoise_with_std(noisy, 0.1)[1] is None
    assert ModelDenoiser(ConstantUNet(0.0), "unet").denoise_with_std(noisy, 0.1)[1] is None


def test_model_denoiser_rejects_unknown_kwargs_and_bad_models():
    with pytest.raises(TypeError, match="steps"):
        ModelDenoiser(ConstantUNet(0.0), "unet", steps=5)
    with pytest.raises(TypeError, match="no callable denoise"):
        ModelDenoiser(torch.nn.Identity(), "plain")
    with pytest.raises(ValueError, match="shape"):
        ModelDenoiser(FakeDDPM(), "x")(np.zeros((2, 8, 8), np.float32), 0.1)


def test_build_denoiser_from_config():
    ddpm, unet = FakeDDPM(), ConstantUNet(0.0)
    models = {"ddpm": ddpm, "unet": unet}
    cfg = OmegaConf.create([
        {"name": "noisy input", "type": "noisy"},
        {"name": "NLM", "type": "nlm", "params": {"patch_size": 3}},
        {"name": "BM3D", "type": "bm3d"},
        {"name": "U-Net", "type": "unet"},
        {"name": "DDPM mean of 4", "type": "ddpm", "params": {"steps": 10, "n_samples": 4, "t_start": "auto"}},
        {"name": "NLM blind", "type": "nlm", "sigma": "estimate"},
    ])
    built = [build_denoiser(entry, models) for entry in cfg]
    assert [d.name for d in built] == ["noisy input", "NLM", "BM3D", "U-Net", "DDPM mean of 4", "NLM blind"]
    assert isinstance(built[0], NoisyInput)
    assert isinstance(built[1], NLMDenoiser) and built[1].patch_size == 3
    assert isinstance(built[2], BM3DDenoiser)
    assert built[3].model is unet and built[4].model is ddpm
    assert built[4].denoise_kw == {"steps": 10, "n_samples": 4, "t_start": "auto"}
    assert isinstance(built[5], SigmaEstimating)


def test_sigma_estimating_hides_true_sigma():
    _, noisy = noisy_pair(0.1)
    model = FakeDDPM()
    den = build_denoiser({"name": "blind", "type": "ddpm", "params": {"t_start": "auto"},
                          "sigma": "estimate"}, {"ddpm": model})
    den(noisy, 0.5)  # the true sigma given here is ignored
    assert model.calls[-1]["sigma"] == pytest.approx(0.1, rel=0.15)


@pytest.mark.parametrize(
    "entry, models, match",
    [
        ({"name": "x", "type": "wiener"}, {}, "type must be one of"),
        ({"name": "DDPM", "type": "ddpm"}, {}, "needs the 'ddpm' model"),
        ({"name": "NLM", "type": "nlm", "params": {"h": 3}}, {}, "bad params"),
        ({"name": "U", "type": "unet", "params": {"steps": 3}}, {"unet": ConstantUNet(0.0)}, "bad params"),
        ({"name": "NLM", "type": "nlm", "sigmas": 3}, {}, "unknown keys"),
        ({"name": "NLM", "type": "nlm", "sigma": "oracle"}, {}, "known' or 'estimate"),
    ],
)
def test_build_denoiser_errors(entry, models, match):
    with pytest.raises(ValueError, match=match):
        build_denoiser(entry, models)
