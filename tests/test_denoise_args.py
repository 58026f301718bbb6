"""ConditionDDPM.denoise at the edges: no noise, tiny noise, noise beyond the trained range,
bad arguments, and posterior ensembles that would be identical."""
import math

import pytest
import torch

from models.ddpm_conditioned import ConditionDDPM
from synthetic import tiny_model_cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    params = dict(tiny_model_cfg()["params"], timesteps=1000)
    m = ConditionDDPM(**params).eval()
    with torch.no_grad():  # random weights everywhere (the output conv starts at zero)
        for p in m.unet_ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def noisy(size=16):
    return torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_sigma_zero_returns_the_input_unchanged(model):
    x = noisy()
    with pytest.warns(UserWarning, match="no noise to remove"):
        out = model.denoise(x, steps=10, t_start="auto", sigma=0.0)
    assert torch.equal(out, x)


def test_tiny_sigma_runs_with_the_steps_capped(model):
    t = model.start_timestep("auto", 0.005)
    assert t <= 1  # sqrt((1 - a_bar) / a_bar) at t=0 is about 0.01 in model units, i.e. 0.005
    with pytest.warns(UserWarning, match=f"steps=10 capped at {t + 1}"):
        out = model.denoise(noisy(), steps=10, t_start="auto", sigma=0.005)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    assert not torch.equal(out, noisy())


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), float("inf")])
def test_bad_sigma_is_named(model, sigma):
    with pytest.raises(ValueError, match="sigma must be a finite noise std >= 0"):
        model.denoise(noisy(), steps=2, t_start="auto", sigma=sigma)


def test_sigma_beyond_the_trained_range_warns_and_starts_at_the_top(tmp_path):
    params = dict(tiny_model_cfg()["params"], timesteps=1000, max_train_timestep=200)
    m = ConditionDDPM(**params).eval()
    top_sigma = float(m.diffusion.sqrt_recipm1_alphas_cumprod[200]) / 2
    assert m.start_timestep("auto", top_sigma * 0.9) < 200
    with pytest.warns(UserWarning, match="beyond the largest noise level this model was trained on"):
        assert m.start_timestep("auto", top_sigma * 1.5) == 200


def test_images_smaller_than_the_unet_size_factor_are_refused(model):
    with pytest.raises(ValueError, match=r"at least 2 x 2 pixels .* got 1 x 1"):
        model.denoise(torch.zeros(1, 1, 1, 1), steps=1, t_start="auto", sigma=0.1)
    out = model.denoise(torch.zeros(1, 1, 3, 5), steps=1, t_start="auto", sigma=0.1)  # odd sizes are padded
    assert out.shape == (1, 1, 3, 5)


def test_identical_ensembles_are_refused_and_stochastic_ones_differ(model):
    with pytest.raises(ValueError, match="identical samples"):
        model.denoise(noisy(), steps=3, t_start="auto", sigma=0.1, n_samples=4)
    with pytest.raises(ValueError, match="identical samples"):  # one step lands on x0 without noise
        model.denoise(noisy(), steps=1, t_start="auto", sigma=0.1, n_samples=4, eta=1.0)
    mean, std = model.denoise(noisy(), steps=3, t_start="auto", sigma=0.1, n_samples=4, eta=1.0,
                              return_std=True, generator=torch.Generator().manual_seed(0))
    assert std.min() >= 0 and std.mean() > 1e-4
    # from pure noise the samples differ even with eta 0
    _, std0 = model.denoise(noisy(), steps=3, n_samples=2, return_std=True, generator=torch.Generator().manual_seed(0))
    assert std0.mean() > 1e-4


def test_matched_start_timestep_tracks_sigma(model):
    ratio = model.diffusion.sqrt_recipm1_alphas_cumprod
    for sigma in (0.02, 0.05, 0.1, 0.2, 0.3):
        t = model.start_timestep("auto", sigma)
        assert math.isclose(ratio[t].item(), 2 * sigma, rel_tol=0.02)
