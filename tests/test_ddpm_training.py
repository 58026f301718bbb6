"""DDPM / ConditionDDPM training: every loss and parameterization learns, min-SNR weights,
EMA (hand-computed update, Lightning hook, ema_scope), condition dropout and guidance."""
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from models.ddpm_conditioned import NULL_CONDITION, ConditionDDPM

T = 100
SIZE = 16


def unet_config(in_channel=2, channel=8):
    return {"target": "diffusion_modules.unet_arch.unet_rosinality.UNet",
            "params": {"in_channel": in_channel, "channel": channel, "out_channel": 1,
                       "channel_multiplier": [1, 2], "n_res_blocks": 1, "attn_strides": [],
                       "dropout": 0.0, "use_affine_time": True}}


def make_model(**kw) -> ConditionDDPM:
    args = dict(unet_rosinality_config=unet_config(), image_size=SIZE, timesteps=T, learning_rate=2e-3,
                ema_decay=0.99)
    args.update(kw)
    return ConditionDDPM(**args)


def blobs(n: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images in [-1, 1]: sums of 3 Gaussian blobs, shape (n, 1, SIZE, SIZE)."""
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    centres = torch.rand(n, 3, 2, generator=generator) * SIZE
    widths = 2.0 + 3.0 * torch.rand(n, 3, generator=generator)
    heights = 0.5 + torch.rand(n, 3, generator=generator)
    d2 = (yy[None, None] - centres[..., 0, None, None]) ** 2 + (xx[None, None] - centres[..., 1, None, None]) ** 2
    img = (heights[..., None, None] * torch.exp(-d2 / (2 * widths[..., None, None] ** 2))).sum(1, keepdim=True)
    img = img / img.amax(dim=(2, 3), keepdim=True)
    return 2 * img - 1


def denoising_batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x_prior = blobs(n, g)
    x_cond = (x_prior + 0.2 * torch.randn(x_prior.shape, generator=g)).clamp(-1, 1)
    return {"x_prior": x_prior, "x_cond": x_cond}


def fixed_eval_loss(model, batch, t, noise) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model.p_losses(batch["x_prior"], batch["x_cond"], t, noise).item()
    model.train(was_training)
    return loss


def train_manually(model, steps: int, batch_size: int = 16, n_eval: int = 20):
    """Plain AdamW loop over shared_step + update_ema; returns fixed-batch losses per step."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=model.hparams.learning_rate, foreach=True)
    eval_batch = denoising_batch(32, seed=1234)
    g = torch.Generator().manual_seed(99)
    t = torch.linspace(0, T - 1, 32).round().long()
    noise = torch.randn(eval_batch["x_prior"].shape, generator=g)
    losses = {}
    model.train()
    for step in range(steps):
        if step < n_eval or step >= steps - n_eval:
            losses[step] = fixed_eval_loss(model, eval_batch, t, noise)
        loss = model.shared_step(denoising_batch(batch_size, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_ema()
    first = sum(losses[s] for s in range(n_eval)) / n_eval
    last = sum(losses[s] for s in range(steps - n_eval, steps)) / n_eval
    return first, last


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l1", "l2", "huber"])
def test_every_loss_and_parameterization_trains(loss_type, parameterization):
    torch.manual_seed(0)
    model = make_model(parameterization=parameterization, loss_type=loss_type)
    first, last = train_manually(model, steps=200, batch_size=8)
    assert math.isfinite(first) and math.isfinite(last)
    assert last < 0.7 * first, f"{loss_type}/{parameterization}: fixed-batch loss {first:.4f} -> {last:.4f}"
    assert int(model.ema_updates) == 200


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_weighting_trains(parameterization):
    torch.manual_seed(0)
    model = make_model(parameterization=parameterization, loss_type="l2", min_snr_gamma=5.0)
    first, last = train_manually(model, steps=80, batch_size=8)
    assert last < 0.7 * first, f"min-SNR {parameterization}: {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_weights_follow_the_formulas(parameterization):
    gamma = 5.0
    model = make_model(parameterization=parameterization, min_snr_gamma=gamma)
    t = torch.arange(T)
    a = model.diffusion.alphas_cumprod.double()
    snr = a / (1 - a)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    expected = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[parameterization]
    torch.testing.assert_close(model.diffusion.min_snr_weight(t, gamma).double(), expected, rtol=1e-5, atol=1e-6)
    # both sides of the clip occur in this schedule (T=100: SNR from ~1e4 down to ~0.5)
    assert (snr > gamma).any() and (snr < gamma).any()
    if parameterization == "eps":
        assert torch.allclose(model.diffusion.min_snr_weight(t[snr < gamma], gamma), torch.ones(int((snr < gamma).sum())))


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l1", "l2", "huber"])
def test_p_losses_numbers(monkeypatch, loss_type, parameterization):
    """p_losses = mean over the batch of (min-SNR weight x per-image mean of the elementwise loss);
    min-SNR (derived for L2) only with l2."""
    gamma = 2.0 if loss_type == "l2" else None
    model = make_model(parameterization=parameterization, loss_type=loss_type, min_snr_gamma=gamma).eval()
    g = torch.Generator().manual_seed(3)
    x0, cond = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.rand(4, 1, 8, 8, generator=g)
    noise, out = torch.randn(4, 1, 8, 8, generator=g), 2 * torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    seen = {}

    def fake_apply(x_t, tt, c):
        seen["x_t"], seen["cond"] = x_t, c
        return out

    monkeypatch.setattr(model, "apply_model", fake_apply)
    loss = model.p_losses(x0, cond, t, noise)
    a = model.diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert seen["cond"] is cond
    target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[parameterization]
    diff = out - target
    elem = {"l1": diff.abs(), "l2": diff ** 2,
            "huber": torch.where(diff.abs() < 1, 0.5 * diff ** 2, diff.abs() - 0.5)}[loss_type]
    snr = (a / (1 - a)).flatten()
    weight = {"eps": snr.clamp(max=2.0) / snr, "x0": snr.clamp(max=2.0),
              "v": snr.clamp(max=2.0) / (snr + 1)}[parameterization] if gamma else torch.ones(4)
    assert gamma is None or not torch.allclose(weight, torch.ones(4))
    expected = (elem.mean(dim=(1, 2, 3)) * weight).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["l1", "huber"])
def test_min_snr_is_refused_for_losses_it_was_not_derived_for(loss_type):
    with pytest.raises(ValueError, match="min_snr_gamma is derived for the l2 loss"):
        make_model(loss_type=loss_type, min_snr_gamma=5.0)


def test_update_ema_matches_a_hand_computation():
    model = make_model(ema_decay=0.9)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p))
    for n, decay in ((0, 0.1), (3, 4 / 13), (1000, 0.9)):  # decay = min(ema_decay, (1+n)/(10+n))
        model.ema_updates.fill_(n)
        ema_before = [p.clone() for p in model.unet_ema.parameters()]
        params = [p.clone() for p in model.unet.parameters()]
        model.update_ema()
        assert int(model.ema_updates) == n + 1
        for e0, p, e1 in zip(ema_before, params, model.unet_ema.parameters()):
            torch.testing.assert_close(e1, decay * e0 + (1 - decay) * p, rtol=1e-6, atol=1e-6)
        # the model's own weights are untouched and EMA weights never get gradients
        assert all(torch.equal(p, q) for p, q in zip(params, model.unet.parameters()))
        assert not any(p.requires_grad for p in model.unet_ema.parameters())


def test_ema_scope_switches_the_network_and_restores_it():
    model = make_model()
    assert model.net is model.unet
    with model.ema_scope():
        assert model.net is model.unet_ema
        with model.ema_scope():
            assert model.net is model.unet_ema
        assert model.net is model.unet_ema
    assert model.net is model.unet
    with pytest.raises(RuntimeError):
        with model.ema_scope():
            raise RuntimeError("inside")
    assert model.net is model.unet
    plain = make_model(use_ema=False)
    assert not hasattr(plain, "unet_ema")
    with plain.ema_scope():
        assert plain.net is plain.unet


def test_sampling_uses_the_ema_weights():
    torch.manual_seed(0)
    model = make_model(parameterization="v").eval()
    with torch.no_grad():
        for p in model.unet_ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond = denoising_batch(2, seed=5)["x_cond"]
    run = lambda m, use_ema: m.sample(cond, steps=3, generator=torch.Generator().manual_seed(0), use_ema=use_ema)
    with_ema, without = run(model, True), run(model, False)
    assert not torch.allclose(with_ema, without)
    twin = make_model(parameterization="v", use_ema=False).eval()
    twin.unet.load_state_dict(model.unet_ema.state_dict())
    torch.testing.assert_close(run(twin, False), with_ema)


def test_trainer_updates_ema_after_every_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = make_model(ema_decay=0.999, warmup_steps=2)
    initial_unet = [p.detach().clone() for p in model.unet.parameters()]
    initial_ema = [p.detach().clone() for p in model.unet_ema.parameters()]
    batches = [{k: v[i] for k, v in denoising_batch(32, seed=7).items()} for i in range(32)]
    loader = DataLoader(batches, batch_size=8, shuffle=True)
    trainer = pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=loader)
    assert trainer.global_step == 6
    assert int(model.ema_updates) == 6
    moved = lambda a, b: max((x - y).abs().max().item() for x, y in zip(a, b))
    assert moved(initial_ema, model.unet_ema.parameters()) > 1e-4
    assert moved(initial_unet, model.unet.parameters()) > 1e-4
    # after 6 updates with decay (1+n)/(10+n) the EMA lags the weights: not equal to them
    assert moved(model.unet.parameters(), model.unet_ema.parameters()) > 1e-6


def test_ema_follows_optimizer_steps_under_gradient_accumulation(tmp_path):
    """4 optimizer steps of 3 accumulated micro-batches each: 4 EMA updates, not 12."""
    torch.manual_seed(0)
    model = make_model()
    batches = [{k: v[i] for k, v in denoising_batch(32, seed=7).items()} for i in range(32)]
    trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=2))
    assert trainer.global_step == 4 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 12
    assert int(model.ema_updates) == 4


def test_condition_dropout(monkeypatch):
    captured = []

    def fake_apply(x_t, t, cond):
        captured.append(cond.clone())
        return torch.zeros_like(x_t)

    batch = {"x_prior": torch.rand(400, 1, 2, 2) * 2 - 1, "x_cond": torch.rand(400, 1, 2, 2) + 0.5}
    always = make_model(p_uncond=1.0)
    monkeypatch.setattr(always, "apply_model", fake_apply)
    always.train()
    always.shared_step(batch)
    assert torch.all(captured[-1] == NULL_CONDITION)  # a constant image outside [-1, 1]
    assert NULL_CONDITION < -1 - 1.0
    always.eval()  # no dropout outside training
    always.shared_step(batch)
    assert torch.equal(captured[-1], batch["x_cond"])

    torch.manual_seed(0)
    half = make_model(p_uncond=0.5).train()
    monkeypatch.setattr(half, "apply_model", fake_apply)
    half.shared_step(batch)
    cond = captured[-1]
    dropped = (cond.flatten(1) == NULL_CONDITION).all(dim=1)
    assert 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(cond[~dropped], batch["x_cond"][~dropped])  # the rest is untouched

    never = make_model(p_uncond=0.0).train()
    monkeypatch.setattr(never, "apply_model", fake_apply)
    never.shared_step(batch)
    assert torch.equal(captured[-1], batch["x_cond"])
    with pytest.raises(ValueError, match="p_uncond"):
        make_model(p_uncond=1.5)


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_guidance_combines_conditional_and_unconditional_outputs(scale):
    torch.manual_seed(0)
    model = make_model(p_uncond=0.1).eval()
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_t, cond = torch.randn(2, 1, SIZE, SIZE), torch.randn(2, 1, SIZE, SIZE)
    t = torch.tensor([10, 80])
    calls = []
    with torch.no_grad():
        out_c = model.apply_model(x_t, t, cond)
        out_u = model.apply_model(x_t, t, torch.full_like(cond, NULL_CONDITION))
        model.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
        guided = model.model_output(x_t, t, cond, guidance_scale=scale)
    assert not torch.allclose(out_c, out_u)
    torch.testing.assert_close(guided, out_u + scale * (out_c - out_u), rtol=1e-5, atol=1e-5)
    assert calls == ([4] if scale not in (0.0, 1.0) else [2])  # one batched pass for both outputs


@pytest.mark.parametrize("scale", [0.0, 2.0, float("nan")])
def test_guidance_is_refused_without_condition_dropout(scale):
    model = make_model(p_uncond=0.0).eval()
    cond = torch.rand(1, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="guidance_scale"):
        model.sample(cond, steps=2, guidance_scale=scale)
    with pytest.raises(ValueError, match="p_uncond > 0"):
        model.sample(batch_size=2, steps=2)  # unconditional samples need the null condition too


def test_unconditional_samples_from_the_null_condition():
    model = make_model(p_uncond=0.2).eval()
    out = model.sample(batch_size=3, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, SIZE, SIZE) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not both"):
        model.sample(torch.rand(1, 1, SIZE, SIZE), batch_size=3)
