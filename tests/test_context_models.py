"""Neighbouring slices as condition (2.5D, issue 17), model side: ``context_slices`` k on
ConditionDDPM and SupervisedUNet. k = 0 gives the numbers of the code before the option; with
k = 1 the UNet takes cat([x_t, stack of 3]) (the U-Net the stack), the matched start and
the output are the slice alone, the null condition covers the stack, a k = 1 model trains a
few steps and denoises (B, 3, H, W) into (B, 1, H, W), and wrong widths are refused."""
import lightning.pytorch as pl
import pytest
import torch

from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
from diffusion_modules.diffusion_utils.sampling import run_chain
from models.ddpm_conditioned import NULL_CONDITION, ConditionDDPM
from models.supervised_unet import SupervisedUNet
from synthetic import UNET, make_volume


def unet(in_channel):
    return {"target": UNET, "params": {"in_channel": in_channel, "channel": 8, "channel_multiplier": [1, 2],
                                       "n_res_blocks": 1, "attn_strides": [], "dropout": 0.0}}


def perturbed(model, g):
    """Non-zero weights everywhere (the UNet's last convs start at zero), EMA = the model."""
    for p in model.unet.parameters():
        p.data += 0.05 * torch.randn(p.shape, generator=g)
    if getattr(model, "use_ema", False):
        model.unet_ema.load_state_dict(model.unet.state_dict())
    return model


def ddpm(k=0, **kw):
    torch.manual_seed(0)
    args = dict(unet_rosinality_config=unet(2 + 2 * k), image_size=16, timesteps=50, parameterization="v",
                context_slices=k)
    return ConditionDDPM(**{**args, **kw})


def test_k0_numbers_are_those_of_the_code_before_context_slices():
    """Loss (with matched-start pairs), denoised sum and U-Net output sum computed with the
    code before context_slices existed, same seeds."""
    g = torch.Generator().manual_seed(1)
    model = perturbed(ddpm(p_matched_start=0.5), g)
    x0 = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    y = x0 + 0.2 * torch.randn(3, 1, 16, 16, generator=g)
    torch.manual_seed(4)
    model.train()
    loss = model.shared_step({"x_prior": x0, "x_cond": y, "sigma": torch.full((3,), 0.1)})
    assert loss.item() == pytest.approx(1.041512370109558, rel=1e-5)
    model.eval()
    out = model.denoise(y, steps=3, eta=1.0, t_start="auto", sigma=0.1, n_samples=2,
                        generator=torch.Generator().manual_seed(2))
    assert out.double().sum().item() == pytest.approx(1.1280190655961633, abs=1e-4)
    torch.manual_seed(0)
    sup = perturbed(SupervisedUNet(unet_rosinality_config=unet(1)), g)
    assert sup.denoise(y).double().sum().item() == pytest.approx(-47.156152453273535, rel=1e-5)
    assert model.context_slices == sup.context_slices == 0
    assert model.hparams.context_slices == sup.hparams.context_slices == 0


def test_k0_denoise_is_the_plain_chain_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    model = perturbed(ddpm(), g).eval()
    y = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    out = model.denoise(y, steps=4, eta=1.0, t_start=20, generator=torch.Generator().manual_seed(5))
    start = model.diffusion.sqrt_alphas_cumprod[20] * y
    with model.ema_scope():
        want = run_chain(lambda x, t: model.unet_ema(torch.cat([x, y], 1), t), model.diffusion, start, sampler="ddim",
                         steps=4, eta=1.0, t_start=20, clip=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, want)
    sup = perturbed(SupervisedUNet(unet_rosinality_config=unet(1)), g)
    assert torch.equal(sup(y), y + sup.unet(y, torch.zeros(2, dtype=torch.long)))


def test_width_and_shape_errors_name_context_slices():
    with pytest.raises(ValueError, match=r"must take x_t and the condition stack of 1 \+ 2\*context_slices slices "
                                         r"\(context_slices=1: in_channel = \(2 \+ 2\*context_slices\)\*channels = "
                                         r"4\), but this one takes 2 input channel\(s\); a UNet for context_slices=0"):
        ConditionDDPM(unet_rosinality_config=unet(2), image_size=16, timesteps=50, context_slices=1)
    with pytest.raises(ValueError, match=r"in_channel = 2\*channels = 2\), but this one takes 4 .*context_slices=1\?"):
        ConditionDDPM(unet_rosinality_config=unet(4), image_size=16, timesteps=50)
    with pytest.raises(ValueError, match=r"SupervisedUNet's UNet must take the stack .*context_slices=1: "
                                         r"in_channel = 3\), but this one takes 1"):
        SupervisedUNet(unet_rosinality_config=unet(1), context_slices=1)
    for bad in (-1, 0.5, True):
        with pytest.raises(ValueError, match="context_slices must be an integer >= 0"):
            ConditionDDPM(unet_rosinality_config=unet(2), image_size=16, timesteps=50, context_slices=bad)
    model, sup = ddpm(1).eval(), SupervisedUNet(unet_rosinality_config=unet(3), context_slices=1)
    single = torch.zeros(2, 1, 16, 16)
    message = r"noisy must be \(B, 3, H, W\) for context_slices=1 \(the slice, then its 1 neighbour\(s\) before " \
              r"and 1 after: \[z, z-1, z\+1\]\), got shape \(2, 1, 16, 16\)"
    for call in (lambda: model.denoise(single, steps=2, t_start="auto", sigma=0.1), lambda: sup.denoise(single)):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match=r"cond must be \(B, 3, H, W\) for context_slices=1"):
        model.sample(single, steps=2)
    with pytest.raises(ValueError, match=r"must be \(B, 1, H, W\) for context_slices=0 \(the slice alone\)"):
        ddpm().denoise(torch.zeros(1, 3, 16, 16), steps=2, t_start="auto", sigma=0.1)


def test_k1_conditions_on_the_stack_and_starts_from_the_slice(monkeypatch):
    g = torch.Generator().manual_seed(7)
    model = perturbed(ddpm(1, p_uncond=0.5), g).eval()
    stack = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    out, std = model.denoise(stack, steps=3, eta=1.0, t_start="auto", sigma=0.1, n_samples=2, return_std=True,
                             generator=torch.Generator().manual_seed(0))
    assert out.shape == std.shape == (2, 1, 16, 16) and std.mean() > 0
    assert model.sample(stack[:, :, :10, :12], steps=2).shape == (2, 1, 10, 12)   # padded and cropped back
    with pytest.warns(UserWarning, match="no noise"):
        assert torch.equal(model.denoise(stack, steps=2, t_start="auto", sigma=0.0), stack[:, :1])
    # the start is sqrt(a_bar*) times the slice alone; the network's condition is the stack
    seen = {}

    def run_sampler(x_T, cond, **kw):
        seen.update(x_T=x_T, cond=cond, t=kw["t_start"])
        return x_T

    monkeypatch.setattr(model, "run_sampler", run_sampler)
    model.denoise(stack, steps=2, t_start="auto", sigma=0.1)
    assert torch.equal(seen["x_T"], model.diffusion.sqrt_alphas_cumprod[seen["t"]] * stack[:, :1])
    assert torch.equal(seen["cond"], stack)
    monkeypatch.undo()
    # the null condition of guidance (and of condition dropout) covers the whole stack
    inputs = []
    model.unet_ema.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    model.denoise(stack, steps=1, t_start=5, guidance_scale=0.0)
    assert inputs[0].shape == (2, 4, 16, 16) and (inputs[0][:, 1:] == NULL_CONDITION).all()
    model.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    model.train()
    model.p_uncond = 1.0
    model.p_losses(stack[:, :1], stack, torch.tensor([3, 4]))
    assert (inputs[-1][:, 1:] == NULL_CONDITION).all()
    # matched-start training pairs: x_t* from the slice alone
    model.p_matched_start = 1.0
    t, x_t, _, picked = model.matched_start_pairs(stack[:, :1], stack, torch.full((2,), 0.1), torch.tensor([1, 2]))
    assert picked.all() and x_t.shape == (2, 1, 16, 16)
    assert torch.equal(x_t, model.diffusion.sqrt_alphas_cumprod[t[0]] * stack[:, :1])


def test_supervised_unet_k1_adds_its_residual_to_the_slice():
    g = torch.Generator().manual_seed(8)
    sup = perturbed(SupervisedUNet(unet_rosinality_config=unet(3), context_slices=1), g)
    stack = torch.rand(2, 3, 12, 20, generator=g) * 2 - 1
    out = sup.denoise(stack)
    assert out.shape == (2, 1, 12, 20)
    for p in sup.unet.parameters():   # no residual: the slice itself, whatever its neighbours
        p.data.zero_()
    assert torch.equal(sup.denoise(stack), stack[:, :1])


@pytest.fixture
def data(tmp_path):
    vols = [str(make_volume(tmp_path / "head_ct.nii.gz", "ct")), str(make_volume(tmp_path / "brain_mr.nii.gz", "mr"))]

    def build(k):
        return DenoisingDataModule(volumes=vols, cache_dir=str(tmp_path / "cache"), image_size=16, stride=8,
                                   noise={"type": "gaussian", "sigma": [0.05, 0.2]}, batch_size=4, context_slices=k,
                                   split={"mode": "slab", "fractions": [0.6, 0.2, 0.2], "gap": 2}, augment=True)
    return build


def fit(model, datamodule, steps=3):
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, val_check_interval=steps,
                         num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(model, datamodule=datamodule)
    return trainer


def test_k1_models_train_a_few_steps_and_denoise_stacks(tmp_path, data):
    dm = data(1)
    for model in (ddpm(1, learning_rate=1e-3), SupervisedUNet(unet_rosinality_config=unet(3), context_slices=1)):
        before = [p.detach().clone() for p in model.unet.parameters()]
        trainer = fit(model, dm)
        assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["val/loss" if isinstance(
            model, SupervisedUNet) else "val/loss_ema"])
        assert any(not torch.equal(a, b) for a, b in zip(before, model.unet.parameters()))
        batch = next(iter(dm.val_dataloader()))
        assert batch["x_cond"].shape == (4, 3, 16, 16)
        kw = {} if isinstance(model, SupervisedUNet) else dict(steps=2, t_start="auto", sigma=0.1)
        assert model.eval().denoise(batch["x_cond"], **kw).shape == (4, 1, 16, 16)
        path = tmp_path / f"{type(model).__name__}.ckpt"
        trainer.save_checkpoint(path)
        loaded = type(model).load_from_checkpoint(path, map_location="cpu")
        assert loaded.context_slices == 1 and loaded.hparams.context_slices == 1


def test_fit_refuses_data_of_other_stacks(data):
    with pytest.raises(ValueError, match=r"the model's context_slices is 1 but the data's \(data.params."
                                         r"context_slices\) is 0"):
        fit(ddpm(1), data(0), steps=1)
    with pytest.raises(ValueError, match=r"the model's context_slices is 0 but the data's .* is 1"):
        fit(SupervisedUNet(unet_rosinality_config=unet(1)), data(1), steps=1)
