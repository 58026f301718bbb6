"""Schedules, forward process, posterior and the sampler's steps checked against diffusers."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion_modules.diffusion_utils.sampling import ancestral_step, ddim_step, ddim_timesteps, run_chain
from models.ddpm_conditioned import ConditionDDPM
from models.ddpm_st_diffusion import DDPM

UNET = {"target": "diffusion_modules.unet_arch.unet_rosinality.UNet",
        "params": {"in_channel": 1, "channel": 32, "channel_multiplier": [1, 2], "n_res_blocks": 1,
                   "attn_strides": [], "dropout": 0.0}}


def tiny_ddpm(**kw):
    return DDPM(unet_rosinality_config=UNET, **kw)


@pytest.mark.parametrize("ours,theirs", [("linear", "scaled_linear"), ("sqrt_linear", "linear"),
                                         ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("T", [1000, 37])
def test_schedule_and_forward_coefficients_match_diffusers(ours, theirs, T):
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=2e-2, beta_schedule=theirs)
    model = tiny_ddpm(timesteps=T, beta_schedule=ours)
    np.testing.assert_allclose(model.diffusion.betas.numpy(), ref.betas.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.diffusion.alphas_cumprod.numpy(), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, T // 3, T // 2, T - 1])
    torch.testing.assert_close(model.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.diffusion.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_posterior_matches_diffusers_ddpm_step():
    """Ancestral mean and variance equal diffusers' DDPMScheduler.step for an x0 prediction.

    diffusers adds noise inside step(); two calls with known generators give its mean.
    Below t=10 diffusers' float32 1 - alpha_bar loses digits (we compute in float64).
    """
    T = 1000
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=2e-2,
                        prediction_type="sample", clip_sample=False, variance_type="fixed_small")
    model = tiny_ddpm()
    x0, x_t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for t in [10, 100, 500, 999]:
        mean, var, _ = model.diffusion.q_posterior(x0, x_t, torch.full((2,), t))
        ref_var = ref._get_variance(t)
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
        ref_mean = ref.step(x0, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample - ref_var.sqrt() * noise
        torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(var[0, 0, 0, 0], ref_var, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("param,pred_type", [("eps", "epsilon"), ("v", "v_prediction"), ("x0", "sample")])
def test_one_ancestral_step_matches_diffusers(param, pred_type):
    """The whole step, noise included: both draw it with torch.randn from the same generator."""
    T = 1000
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=2e-2,
                        prediction_type=pred_type, clip_sample=False, variance_type="fixed_small")
    model = tiny_ddpm(parameterization=param)
    x_t, out = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for t in [10, 100, 500, 999]:
        ours, ours_x0 = ancestral_step(model.diffusion, out, t, x_t, clip=False,
                                       generator=torch.Generator().manual_seed(3))
        res = ref.step(out, t, x_t, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, res.prev_sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours_x0, res.pred_original_sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("param,pred_type", [("eps", "epsilon"), ("v", "v_prediction"), ("x0", "sample")])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_one_ddim_step_matches_diffusers(param, pred_type, eta, clip):
    """Also the default clipped path: x0 clamped to [-1, 1] and eps recomputed from it, which
    is diffusers' clip_sample with use_clipped_model_output."""
    T, S = 1000, 20
    model = tiny_ddpm(parameterization=param, clip_denoised=clip)
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=2e-2,
                        prediction_type=pred_type, clip_sample=clip, clip_sample_range=1.0, set_alpha_to_one=True)
    ref.set_timesteps(S)
    x_t, out = 1.5 * torch.randn(2, 1, 8, 8), 1.5 * torch.randn(2, 1, 8, 8)  # x0 predictions leave [-1, 1]
    for t in [950, 500, 50, 0]:
        t_prev = t - T // S
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        ours_prev, ours_x0 = ddim_step(model.diffusion, out, t, t_prev, x_t, eta, clip, generator=g1)
        res = ref.step(out, t, x_t, eta=eta, use_clipped_model_output=clip, generator=g2)
        if clip:
            assert res.pred_original_sample.abs().max() == 1.0  # the clamp is active in this case
        torch.testing.assert_close(ours_prev, res.prev_sample, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours_x0, res.pred_original_sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_true_noise_recovers_x0_exactly(param):
    model = tiny_ddpm(parameterization=param)
    x0, noise = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 1, 8, 8)
    t = torch.tensor([3, 400, 999])
    x_t = model.q_sample(x0, t, noise)
    target = {"eps": noise, "x0": x0, "v": model.diffusion.velocity(x0, noise, t)}[param]
    rec_x0, rec_eps = model.diffusion.split_prediction(x_t, t, target)
    torch.testing.assert_close(rec_x0, x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(rec_eps, noise, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("spacing", ["uniform", "quad", "trailing"])
@pytest.mark.parametrize("t_start,steps", [(999, 1), (999, 7), (999, 1000), (116, 117), (116, 5), (10, 3)])
def test_ddim_timesteps_any_count(spacing, t_start, steps):
    ts = ddim_timesteps(steps, t_start, spacing)
    assert len(ts) == steps and ts[0] == t_start
    assert all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0
    if spacing != "trailing":
        assert ts[-1] == 0 or steps == 1


def test_ddim_rejects_impossible_step_count():
    with pytest.raises(ValueError, match="steps must lie in"):
        ddim_timesteps(12, 10)


class GaussianOracle(torch.nn.Module):
    """Exact eps predictor for data x0 ~ N(mu, s^2) per pixel (the toy problem)."""

    def __init__(self, alphas_cumprod, mu, s):
        super().__init__()
        self.register_buffer("ab", alphas_cumprod)
        self.mu, self.s = mu, s
        self.size_factor = 1

    def forward(self, x, t):
        ab = self.ab[t].reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.mu) * (1 - ab).sqrt() / (ab * self.s ** 2 + 1 - ab)


def test_ddim_eta1_full_steps_matches_ddpm_ancestral_in_distribution():
    T, mu, s = 1000, 0.3, 0.2
    model = tiny_ddpm(timesteps=T, clip_denoised=False, use_ema=False)
    model.unet = GaussianOracle(model.diffusion.alphas_cumprod, mu, s)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(3000, 1, 1, 1, generator=g)
    model_fn, d = model.model_fn(), model.diffusion
    ddpm = run_chain(model_fn, d, x_T, sampler="ddpm", clip=False, generator=g).flatten()
    ddim = run_chain(model_fn, d, x_T, steps=T, eta=1.0, clip=False, generator=g).flatten()
    ddim0 = run_chain(model_fn, d, x_T, steps=T, eta=0.0, clip=False).flatten()
    for samples in (ddpm, ddim, ddim0):
        assert abs(samples.mean().item() - mu) < 0.012
        assert abs(samples.std().item() - s) < 0.012
    assert abs(ddpm.std().item() - ddim.std().item()) < 0.012


def test_matched_start_timestep_follows_noise_level():
    model = ConditionDDPM(unet_rosinality_config={**UNET, "params": {**UNET["params"], "in_channel": 2}})
    t = model.start_timestep("auto", sigma=0.1)
    ratio = model.diffusion.sqrt_recipm1_alphas_cumprod
    assert abs(ratio[t].item() - 0.2) <= (ratio[t + 1] - ratio[t - 1]).item()
    assert model.start_timestep("auto", sigma=0.2) > t
    with pytest.raises(ValueError, match="needs the noise level"):
        model.start_timestep("auto", sigma=None)
    with pytest.raises(ValueError, match="t_start=1000"):
        model.start_timestep(1000, None)
