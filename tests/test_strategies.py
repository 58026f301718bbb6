"""Denoising strategies checked against their definitions (issue 10):

3. matched start with independent noise: x_t* ~ q(x_t | x0_hat), independent of the
   condition's noise, one extra network evaluation;
4. training with matched-start pairs (``p_matched_start``): the selected examples' pairs are
   exactly (sqrt(a_bar_t*) y, t*), the target follows from x_t and x0, p=0 changes nothing;
6. the unconditional DDPM as an SDEdit denoiser (``DDPM.denoise``);
and a ConditionDDPM whose UNet cannot take the condition fails at construction.
"""
import lightning
import numpy as np
import pytest
import torch

from evaluation.denoisers import ModelDenoiser
from diffusion_modules.diffusion_utils.sampling import ddim_timesteps
from models.ddpm_conditioned import NULL_CONDITION, ConditionDDPM
from models.ddpm_st_diffusion import DDPM
from synthetic import tiny_model_cfg

T = 1000


def unet(in_channel):
    cfg = tiny_model_cfg()["params"]["unet_rosinality_config"]
    return {**cfg, "params": {**cfg["params"], "in_channel": in_channel}}


def cond_model(**kw):
    torch.manual_seed(0)
    return ConditionDDPM(**{**tiny_model_cfg()["params"], "timesteps": T, **kw})


def uncond_model(**kw):
    torch.manual_seed(0)
    return DDPM(unet_rosinality_config=unet(1), image_size=16, timesteps=T, **kw)


def randomize(model):
    with torch.no_grad():  # random weights everywhere (the output conv starts at zero)
        for p in model.unet_ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def gaussian_batch(n, size, sigma, seed=0):
    """(x0, y = x0 + 2 sigma n, n) in model units, x0 smooth-ish in [-0.8, 0.8]."""
    g = torch.Generator().manual_seed(seed)
    x0 = 0.8 * torch.tanh(torch.randn(n, 1, size, size, generator=g))
    noise = torch.randn(n, 1, size, size, generator=g)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return x0, x0 + 2 * sigma * noise, noise


def corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---------------------------------------------------------------- strategy 3
@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_independent_start_is_a_sample_of_q_around_x0_hat(monkeypatch, guidance_scale):
    model = cond_model(parameterization="x0", p_uncond=0.1).eval()
    sigma = 0.1
    t_star = model.start_timestep("auto", sigma)
    sa, s1 = model.diffusion.sqrt_alphas_cumprod[t_star], model.diffusion.sqrt_one_minus_alphas_cumprod[t_star]
    x0, y, cond_noise = gaussian_batch(8, 32, sigma)
    out_c = 1.4 * torch.tanh(torch.randn_like(x0))  # beyond [-1, 1] in places: x0_hat is clipped
    out_u = torch.zeros_like(x0)
    calls = []

    def stub(x_t, t, c):  # x0 parameterization: the output is x0; the null condition gets out_u
        calls.append((x_t.clone(), t.clone(), c.clone()))
        is_null = (c.flatten(1) == NULL_CONDITION).all(dim=1).reshape(-1, 1, 1, 1)
        half = x_t.shape[0] // 2 if guidance_scale != 1 else x_t.shape[0]
        return torch.where(is_null, out_u.repeat(x_t.shape[0] // half, 1, 1, 1),
                           out_c.repeat(x_t.shape[0] // half, 1, 1, 1))

    starts = []
    monkeypatch.setattr(model, "apply_model", stub)
    monkeypatch.setattr(model, "run_sampler", lambda x_T, cond, **kw: starts.append(x_T) or x_T)
    model.sample(y, t_start="auto", sigma=sigma, guidance_scale=guidance_scale, start_noise="independent",
                 generator=torch.Generator().manual_seed(1))
    # the first estimate: one (guided) network pass at (sqrt(a_bar*) y, t*) with y as the condition
    assert len(calls) == 1
    x_in, t_in, c_in = calls[0]
    assert torch.equal(x_in[:8], sa * y) and torch.all(t_in == t_star) and torch.equal(c_in[:8], y)
    x0_hat = (out_u + guidance_scale * (out_c - out_u)).clamp(-1, 1)
    resid = starts[0] - sa * x0_hat
    # x_t* | x0_hat ~ N(sqrt(a_bar*) x0_hat, (1 - a_bar*) I): 8192 pixels, so 5 % on the std is ~6 sd
    assert abs(resid.mean().item()) < 0.05 * s1
    assert abs(resid.std().item() / s1.item() - 1) < 0.05
    assert abs(corr(resid, cond_noise)) < 0.05  # independent of the condition's noise
    # today's start: the noise of x_t* is the condition's noise exactly
    model.sample(y, t_start="auto", sigma=sigma, guidance_scale=guidance_scale)
    assert torch.equal(starts[1], sa * y)
    assert corr(starts[1] - sa * x0, cond_noise) > 0.999


def test_independent_start_costs_one_network_evaluation():
    model = randomize(cond_model()).eval()
    calls = []
    model.unet_ema.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    y = gaussian_batch(2, 16, 0.1)[1]
    for steps in (1, 2, 5):
        for start_noise, nfe in (("condition", steps), ("independent", steps + 1)):
            calls.clear()
            out = model.denoise(y, steps=steps, t_start="auto", sigma=0.1, start_noise=start_noise,
                                generator=torch.Generator().manual_seed(0))
            assert len(calls) == nfe and out.shape == y.shape and torch.isfinite(out).all()


def test_independent_start_arguments():
    model = randomize(cond_model()).eval()
    y = gaussian_batch(2, 16, 0.1)[1]
    with pytest.raises(ValueError, match="needs a t_start"):
        model.denoise(y, steps=2, start_noise="independent")
    with pytest.raises(ValueError, match="needs a t_start"):
        model.sample(y, steps=2, start_noise="independent")
    with pytest.raises(ValueError, match="start_noise 'fresh' unknown"):
        model.denoise(y, steps=2, t_start="auto", sigma=0.1, start_noise="fresh")
    # the default is today's start, bit for bit
    run = lambda **kw: model.denoise(y, steps=3, t_start="auto", sigma=0.1, **kw)
    assert torch.equal(run(), run(start_noise="condition"))
    assert not torch.allclose(run(), run(start_noise="independent", generator=torch.Generator().manual_seed(0)))
    # eta 0 ensembles: identical from today's start (refused), different with independent noise
    with pytest.raises(ValueError, match="identical samples"):
        run(n_samples=3)
    for steps in (1, 3):
        _, std = model.denoise(y, steps=steps, t_start="auto", sigma=0.1, n_samples=3, return_std=True,
                               start_noise="independent", generator=torch.Generator().manual_seed(0))
        assert std.mean() > 1e-4
    # reproducible for a fixed generator
    a, b = (run(start_noise="independent", generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- strategy 4
def capture_training_inputs(model, monkeypatch, output=None):
    seen = {}

    def stub(x_t, t, c):
        seen.update(x_t=x_t.clone(), t=t.clone(), cond=c.clone())
        return torch.zeros_like(x_t) if output is None else output(x_t, t)

    monkeypatch.setattr(model, "apply_model", stub)
    return seen


def test_selected_training_pairs_are_the_matched_start_pairs(monkeypatch):
    model = cond_model(p_matched_start=1.0, max_train_timestep=300).train()
    top_sigma = float(model.diffusion.sqrt_recipm1_alphas_cumprod[300]) / 2
    sigma = torch.tensor([0.02, 0.05, 0.1, 0.0, 0.2, 1.5 * top_sigma])
    x0, y, _ = gaussian_batch(6, 8, sigma)
    seen = capture_training_inputs(model, monkeypatch)
    torch.manual_seed(0)
    model.shared_step({"x_prior": x0, "x_cond": y, "sigma": sigma})
    for i, s in enumerate(sigma.tolist()):
        t_star = model.diffusion.noise_to_timestep(2 * s)
        matched = 0 < s <= top_sigma
        if matched:  # exactly the start of ConditionDDPM.sample(y, t_start="auto", sigma=s)
            assert int(seen["t"][i]) == t_star == model.start_timestep("auto", s)
            assert torch.equal(seen["x_t"][i], model.diffusion.sqrt_alphas_cumprod[t_star] * y[i])
        else:  # sigma 0, or t* beyond max_train_timestep: a normal pair
            assert int(seen["t"][i]) <= 300
            assert not torch.allclose(seen["x_t"][i], model.diffusion.sqrt_alphas_cumprod[seen["t"][i]] * y[i])
        assert torch.equal(seen["cond"][i], y[i])
    # the fraction follows p_matched_start; eval mode (validation) never uses matched pairs
    half = cond_model(p_matched_start=0.5).train()
    sig = torch.full((400,), 0.1)
    x0, y, _ = gaussian_batch(400, 2, sig)
    torch.manual_seed(0)
    t, x_t, noise, picked = half.matched_start_pairs(x0, y, sig, half.sample_timesteps(400))
    assert 0.4 < picked.float().mean() < 0.6
    assert torch.all(t[picked] == half.start_timestep("auto", 0.1))
    half.eval()
    seen = capture_training_inputs(half, monkeypatch)
    half.shared_step({"x_prior": x0, "x_cond": y, "sigma": sig})
    assert (seen["t"] != half.start_timestep("auto", 0.1)).float().mean() > 0.9
    with pytest.raises(ValueError, match="'sigma' entry"):
        half.train().shared_step({"x_prior": x0, "x_cond": y})
    with pytest.raises(ValueError, match="p_matched_start must lie in"):
        cond_model(p_matched_start=1.5)


def test_p_zero_reproduces_todays_loss_exactly():
    x0, y, _ = gaussian_batch(8, 16, 0.1)
    batch = {"x_prior": x0, "x_cond": y, "sigma": torch.full((8,), 0.1)}
    model = randomize(cond_model(p_matched_start=0.0, p_uncond=0.2)).train()
    torch.manual_seed(3)
    loss = model.shared_step(batch)
    torch.manual_seed(3)  # today's step spelt out: timesteps, condition dropout, fresh noise, loss
    t = torch.randint(0, T, (8,))
    expected = model.p_losses(x0, y, t)
    assert torch.equal(loss, expected)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_matched_pair_targets_are_consistent(monkeypatch, parameterization):
    """The target follows from (x_t, x0): a network that outputs the exact target for each x_t
    has zero loss, and for y = x0 + 2 sigma n the eps target is n * 2 sigma / r(t*)."""
    model = cond_model(p_matched_start=1.0, parameterization=parameterization).train()
    sigma = torch.tensor([0.03, 0.1, 0.2, 0.25])
    x0, y, n = gaussian_batch(4, 8, sigma)
    d = model.diffusion

    def exact_target(x_t, t):
        sa, s1 = d.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1), d.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x_t - sa * x0) / s1
        return {"eps": eps, "x0": x0, "v": sa * eps - s1 * x0}[parameterization]

    seen = capture_training_inputs(model, monkeypatch, exact_target)
    loss = model.shared_step({"x_prior": x0, "x_cond": y, "sigma": sigma})
    assert loss.item() < 1e-10
    t_star = d.noise_to_timesteps(2 * sigma)
    assert torch.equal(seen["t"], t_star)
    t, x_t, noise, picked = model.matched_start_pairs(x0, y, sigma, torch.zeros(4, dtype=torch.long))
    assert picked.all()
    ratio = d.sqrt_recipm1_alphas_cumprod[t_star].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noise, n * 2 * sigma.reshape(-1, 1, 1, 1) / ratio, rtol=1e-4, atol=1e-5)
    assert ((2 * sigma.reshape(-1, 1, 1, 1) / ratio - 1).abs() < 0.02).all()  # t* matches sigma: eps ~ n


def test_vectorised_noise_to_timestep_matches_the_scalar_one():
    d = cond_model().diffusion
    ratio = d.sqrt_recipm1_alphas_cumprod.numpy()
    sigmas = np.concatenate([[0.0, 1e-4], np.linspace(0.005, 0.6, 60), [5.0, 500.0]])
    vec = d.noise_to_timesteps(torch.tensor(2 * sigmas, dtype=torch.float32))
    for s, t in zip(sigmas, vec.tolist()):
        assert t == d.noise_to_timestep(2 * s) == int(np.argmin(np.abs(ratio - np.float32(2 * s))))


# ---------------------------------------------------------------- strategy 6
def test_unconditional_ddpm_denoises_from_the_matched_start(monkeypatch):
    model = uncond_model().eval()
    sigma = 0.1
    t_star = model.start_timestep("auto", sigma)
    ratio = model.diffusion.sqrt_recipm1_alphas_cumprod
    assert abs(ratio[t_star].item() / (2 * sigma) - 1) < 0.02  # t* matches sigma
    x0, y, _ = gaussian_batch(2, 12, sigma)  # 12 x 12: padded to the UNet's size factor and back
    seen = []

    def stub(x_t, t, cond, guidance_scale):  # an eps network that sees no condition
        assert cond is None
        seen.append((x_t.clone(), int(t[0])))
        return 0.3 * x_t

    monkeypatch.setattr(model, "model_output", stub)
    out = model.denoise(y, steps=4, t_start="auto", sigma=sigma)
    # the chain by hand: DDIM, eta 0, clipped x0, from sqrt(a_bar*) y at t*
    a = model.diffusion.alphas_cumprod.double()
    ts = ddim_timesteps(4, t_star, "uniform")
    x = model.diffusion.sqrt_alphas_cumprod[t_star].double() * y.double()
    for i, t in enumerate(ts):
        a_prev = a[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x0_pred = ((x - (1 - a[t]).sqrt() * 0.3 * x) / a[t].sqrt()).clamp(-1, 1)
        eps = (x - a[t].sqrt() * x0_pred) / (1 - a[t]).sqrt()
        x = a_prev.sqrt() * x0_pred + (1 - a_prev).sqrt() * eps
    assert [t for _, t in seen] == ts and ts[0] == t_star
    assert torch.equal(seen[0][0], model.diffusion.sqrt_alphas_cumprod[t_star] * y)
    torch.testing.assert_close(out.double(), x, rtol=1e-5, atol=1e-5)


def test_unconditional_denoise_arguments():
    model = randomize(uncond_model()).eval()
    y = gaussian_batch(2, 16, 0.1)[1]
    with pytest.raises(ValueError, match="sees no condition"):
        model.denoise(y, steps=2)
    assert model.denoise(y, steps=2, t_start=50).shape == y.shape
    assert model.denoise(y[:, :, :10, :7], steps=2, t_start="auto", sigma=0.1).shape == (2, 1, 10, 7)
    with pytest.raises(ValueError, match="identical samples"):
        model.denoise(y, steps=3, t_start="auto", sigma=0.1, n_samples=2)
    mean, std = model.denoise(y, steps=3, eta=1.0, t_start="auto", sigma=0.1, n_samples=2, return_std=True,
                              generator=torch.Generator().manual_seed(0))
    assert mean.shape == y.shape and std.mean() > 1e-4
    with pytest.warns(UserWarning, match="no noise to remove"):
        assert torch.equal(model.denoise(y, steps=2, t_start="auto", sigma=0.0), y)
    # the evaluation's model wrapper drives it like the conditional model (sigma passed for "auto")
    den = ModelDenoiser(model, "sdedit", steps=2, t_start="auto")
    clean01 = ((y[0, 0] + 1) / 2).clamp(0, 1).numpy()
    assert den(clean01, 0.1).shape == clean01.shape


# ---------------------------------------------------------------- UNet input width
def test_condition_ddpm_refuses_a_unet_without_the_condition_channel(tmp_path):
    with pytest.raises(ValueError, match=r"must take x_t and the condition \(in_channel = 2\*channels = 2\), "
                                         r"but this one takes 1 input channel.*load it with DDPM"):
        ConditionDDPM(unet_rosinality_config=unet(1), image_size=16, timesteps=50)
    with pytest.raises(ValueError, match=r"must take x_t alone \(in_channel = channels = 1\), but this one "
                                         r"takes 2 .*load it with ConditionDDPM"):
        DDPM(unet_rosinality_config=unet(2), image_size=16, timesteps=50)
    # an unconditional checkpoint loaded as a ConditionDDPM fails when it is built, not at sampling
    ddpm = DDPM(unet_rosinality_config=unet(1), image_size=16, timesteps=50)
    path = tmp_path / "uncond.ckpt"
    torch.save({"state_dict": ddpm.state_dict(), "hyper_parameters": dict(ddpm.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    with pytest.raises(ValueError, match="must take x_t and the condition"):
        ConditionDDPM.load_from_checkpoint(path, map_location="cpu")
    assert isinstance(DDPM.load_from_checkpoint(path, map_location="cpu"), DDPM)
