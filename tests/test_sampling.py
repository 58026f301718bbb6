"""The sampling module (diffusion_modules.diffusion_utils.sampling): plain functions of a
``model_fn(x, t)``, and the LightningModules' denoise() wired through them."""
import dataclasses
import inspect
import warnings

import numpy as np
import pytest
import torch

from diffusion_modules.diffusion_utils.beta_schedule import make_beta_schedule
from diffusion_modules.diffusion_utils.gaussian_diffusion import GaussianDiffusion
from diffusion_modules.diffusion_utils.sampling import (SamplingOptions, capped_steps, ddim_step, ddim_timesteps,
                                                        matched_start, matched_timestep, run_chain)
from models.ddpm_conditioned import ConditionDDPM
from models.ddpm_st_diffusion import DDPM
from utils.initialize_configs import ConfigError

UNET = {"target": "diffusion_modules.unet_arch.unet_rosinality.UNet",
        "params": {"in_channel": 2, "channel": 16, "channel_multiplier": [1, 2], "n_res_blocks": 1,
                   "attn_strides": [], "dropout": 0.0}}


def diffusion(T=100):
    return GaussianDiffusion(make_beta_schedule("linear", T, 1e-4, 2e-2), "eps")


def recording_fn(seen, scale=0.1):
    def model_fn(x, t):
        seen.append(int(t[0]))
        return scale * x
    return model_fn


@pytest.mark.parametrize("spacing", ["uniform", "quad", "trailing"])
def test_ddim_chain_visits_its_timesteps_and_is_the_composition_of_its_steps(spacing):
    d, seen = diffusion(), []
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = run_chain(recording_fn(seen), d, x_T, steps=6, t_start=60, spacing=spacing, clip=True)
    ts = ddim_timesteps(6, 60, spacing)
    assert seen == ts
    x = x_T
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        x, _ = ddim_step(d, 0.1 * x, t, t_prev, x, 0.0, True)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_ancestral_chain_visits_every_timestep_down_to_zero():
    seen = []
    run_chain(recording_fn(seen), diffusion(), torch.randn(1, 1, 4, 4), sampler="ddpm", t_start=12)
    assert seen == list(range(12, -1, -1))


@pytest.mark.parametrize("kw,match", [({"sampler": "ddpm", "steps": 3}, "takes no steps"),
                                      ({"sampler": "euler"}, "sampler 'euler' unknown"),
                                      ({"eta": 1.5}, "eta must lie in"), ({"steps": 0}, "steps must lie in")])
def test_chain_refuses_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        run_chain(recording_fn([]), diffusion(), torch.randn(1, 1, 4, 4), **kw)


def test_matched_timestep_matches_the_noise_level_and_warns_beyond_the_trained_range():
    d = diffusion(1000)
    ratio = d.sqrt_recipm1_alphas_cumprod.numpy()
    for sigma in (0.02, 0.1, 0.3):
        t = matched_timestep(d, sigma)
        assert t == int(np.argmin(np.abs(ratio - 2 * sigma)))
    with pytest.warns(UserWarning, match="beyond the largest noise level"):
        assert matched_timestep(d, 0.3, top=50) == 50
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite noise std"):
            matched_timestep(d, bad)


def test_steps_are_capped_at_the_start_timestep():
    assert capped_steps("ddim", None, 9) == 10  # the default 50 needs no warning
    with pytest.warns(UserWarning, match="steps=20 capped at 10"):
        assert capped_steps("ddim", 20, 9) == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert capped_steps("ddim", 5, 9) == 5
        assert capped_steps("ddim", 20, None) == 20
        assert capped_steps("ddpm", None, 9) is None


def test_matched_start_condition_and_independent_noise():
    d, y = diffusion(), torch.rand(3, 1, 4, 4) * 2 - 1
    torch.testing.assert_close(matched_start(d, y, 30), d.sqrt_alphas_cumprod[30] * y)
    x0_fn = lambda x, t: torch.zeros_like(x)  # eps = 0: x0_hat = x / sqrt(a_bar), then clipped
    start = matched_start(d, y, 30, "independent", x0_fn, torch.Generator().manual_seed(0))
    x0_hat = (d.sqrt_alphas_cumprod[30] * y / d.sqrt_alphas_cumprod[30]).clamp(-1, 1)
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(start, d.sqrt_alphas_cumprod[30] * x0_hat + d.sqrt_one_minus_alphas_cumprod[30] * eps)
    with pytest.raises(ValueError, match="start_noise 'fresh' unknown"):
        matched_start(d, y, 30, "fresh")


def test_condition_ddpm_denoise_is_the_chain_of_the_ema_network_from_the_matched_start():
    """An independent walk through the module's primitives, with the EMA UNet called directly
    on cat([x_t, y]), gives denoise()'s output to the last bit."""
    torch.manual_seed(0)
    model = ConditionDDPM(unet_rosinality_config=UNET, timesteps=200).eval()
    for p in model.unet_ema.parameters():  # EMA weights differ from the live ones
        p.data.add_(0.05 * torch.randn_like(p))
    y = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = model.denoise(y, steps=4, eta=1.0, t_start="auto", sigma=0.1, generator=torch.Generator().manual_seed(2))
    d, g = model.diffusion, torch.Generator().manual_seed(2)
    t_star = matched_timestep(d, 0.1)
    x = d.sqrt_alphas_cumprod[t_star] * y
    ts = ddim_timesteps(4, t_star)
    with torch.no_grad():
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            out = model.unet_ema(torch.cat([x, y], dim=1), torch.full((2,), t))
            x, _ = ddim_step(d, out, t, t_prev, x, 1.0, True, g)
    torch.testing.assert_close(got, x, rtol=0, atol=0)


def test_sampling_options_from_a_config_section():
    opts = SamplingOptions.from_mapping({"sampler": "ddim", "steps": 10, "eta": 0, "t_start": "auto"})
    assert (opts.steps, opts.eta, opts.t_start, opts.n_samples) == (10, 0, "auto", 1)
    more = opts.updated({"steps": 5, "eta": 1.0, "n_samples": 4}, "evaluation.methods.6.params")
    assert (more.steps, more.eta, more.n_samples, more.t_start) == (5, 1.0, 4, "auto") and opts.steps == 10
    for section, match in [({"stepz": 3}, r"sampling.stepz: unknown key; did you mean 'steps'"),
                           ({"steps": "ten"}, r"sampling.steps: expected int or null, got 'ten'"),
                           ({"eta": True}, r"sampling.eta: expected int or float or null"),
                           ({"eta": 2.0}, r"sampling: eta must lie in \[0, 1\]"),
                           ({"t_start": "matched"}, r"sampling: t_start must be null, an int or 'auto'"),
                           ({"n_samples": 0}, r"sampling: n_samples must be >= 1"),
                           ({"sampler": "ddpm", "steps": 4}, r"sampling: sampler='ddpm' runs every timestep"),
                           ({"spacing": "log"}, r"sampling: spacing 'log' unknown"),
                           ({"start_noise": "fresh"}, r"sampling: start_noise 'fresh' unknown")]:
        with pytest.raises(ConfigError, match=match):
            SamplingOptions.from_mapping(section)


def test_both_diffusion_models_take_every_sampling_option():
    """One typed object for both: no caller filters keywords by signature."""
    names = {f.name for f in dataclasses.fields(SamplingOptions)}
    for cls in (DDPM, ConditionDDPM):
        params = set(inspect.signature(cls.denoise).parameters) - {"self", "noisy", "sigma", "return_std", "generator"}
        assert params == names, cls.__name__
        defaults = {k: p.default for k, p in inspect.signature(cls.denoise).parameters.items() if k in names}
        assert defaults == SamplingOptions().as_kwargs(), cls.__name__  # passing every option changes nothing
    uncond = DDPM(unet_rosinality_config={**UNET, "params": {**UNET["params"], "in_channel": 1}}, timesteps=100)
    y = torch.rand(1, 1, 8, 8) * 2 - 1
    opts = SamplingOptions(steps=2, t_start="auto")
    assert uncond.denoise(y, **opts.as_kwargs(), sigma=0.1).shape == y.shape
    with pytest.raises(ValueError, match="no condition to guide"):
        uncond.denoise(y, **SamplingOptions(t_start="auto", guidance_scale=2.0).as_kwargs(), sigma=0.1)
