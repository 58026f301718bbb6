"""Save / load: ConditionDDPM and SupervisedUNet checkpoints restore weights (EMA included)
and hparams, load without the training data, on CPU from any map_location spelling, and
sample identically for a fixed generator. Unconditional DDPM.sample works."""
import shutil

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from diffusion_modules.diffusion_utils.sampling import ddim_timesteps
from models.ddpm_conditioned import ConditionDDPM
from models.ddpm_st_diffusion import DDPM
from models.supervised_unet import SupervisedUNet
from synthetic import make_volume

SIZE = 16


def unet_config(in_channel: int) -> dict:
    return {"target": "diffusion_modules.unet_arch.unet_rosinality.UNet",
            "params": {"in_channel": in_channel, "channel": 8, "out_channel": 1, "channel_multiplier": [1, 2],
                       "n_res_blocks": 1, "attn_strides": [2], "attn_heads": 2, "dropout": 0.0}}


def make_datamodule(root):
    from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule

    data = root / "data"
    data.mkdir()
    volumes = [make_volume(data / "head_ct.nii.gz", "ct", n_slices=16),
               make_volume(data / "brain_mr.nii.gz", "mr", n_slices=16, seed=1)]
    return DenoisingDataModule(volumes=volumes, cache_dir=str(data / "cache"), image_size=SIZE, stride=8,
                               noise={"type": "gaussian", "sigma": [0.05, 0.2]},
                               split={"mode": "slab", "fractions": [0.6, 0.2, 0.2], "gap": 1}, batch_size=4)


def fit(model, root, datamodule=None, steps=3):
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
                         default_root_dir=str(root))
    if datamodule is None:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(16, 1, SIZE, SIZE, generator=g) * 2 - 1
        items = [{"x_prior": x[i], "x_cond": (x[i] + 0.2 * torch.randn(x[i].shape, generator=g)).clamp(-1, 1)}
                 for i in range(16)]
        trainer.fit(model, train_dataloaders=DataLoader(items, batch_size=4))
    else:
        trainer.fit(model, datamodule=datamodule)
    return trainer


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sb[k].device.type == "cpu", k
        assert torch.equal(sa[k], sb[k]), k


def data_free(model: torch.nn.Module, data_root) -> None:
    """No attribute anywhere in the module tree holds data; hparams hold no data settings or paths."""
    for module in model.modules():
        for name, value in vars(module).items():
            assert not isinstance(value, (pl.LightningDataModule, Dataset, DataLoader)), (module, name)
    assert getattr(model, "datamodule", None) is None
    text = repr(dict(model.hparams))
    for word in ("volumes", "cache_dir", ".nii", ".h5", str(data_root)):
        assert word not in text, word


@pytest.fixture(scope="module")
def trained_ddpm(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    torch.manual_seed(0)
    model = ConditionDDPM(unet_rosinality_config=unet_config(2), image_size=SIZE, timesteps=50,
                          parameterization="v", min_snr_gamma=5.0, ema_decay=0.9, learning_rate=1e-3)
    datamodule = make_datamodule(root)
    trainer = fit(model, root, datamodule)
    path = root / "ddpm.ckpt"
    trainer.save_checkpoint(path)
    shutil.rmtree(root / "data")  # loading must not need the training data
    return model.eval(), path, root


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_condition_ddpm_round_trip(trained_ddpm, map_location):
    model, path, root = trained_ddpm
    assert not (root / "data").exists()
    loaded = ConditionDDPM.load_from_checkpoint(str(path), map_location=map_location).eval()
    assert loaded.device.type == "cpu"
    assert_same_state(model, loaded)
    assert any(k.startswith("unet_ema.") for k in loaded.state_dict())
    assert int(loaded.ema_updates) == int(model.ema_updates) == 3
    # the EMA copy really is a different set of weights, and it came back
    assert any(not torch.equal(p, q) for p, q in zip(loaded.unet.parameters(), loaded.unet_ema.parameters()))
    assert dict(loaded.hparams) == dict(model.hparams)
    assert (loaded.parameterization, loaded.num_timesteps, loaded.p_uncond) == ("v", 50, 0.0)
    torch.testing.assert_close(loaded.diffusion.alphas_cumprod, model.diffusion.alphas_cumprod, rtol=0, atol=0)
    data_free(loaded, root / "data")

    noisy = (torch.rand(2, 1, 20, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    for kw in ({"t_start": "auto", "sigma": 0.1, "steps": 3},
               {"steps": 4, "eta": 1.0},  # from pure noise, stochastic steps
               {"steps": 3, "n_samples": 2, "return_std": True}):
        outs = [m.denoise(noisy, generator=torch.Generator().manual_seed(7), **kw) for m in (model, loaded)]
        if kw.get("return_std"):
            (m0, s0), (m1, s1) = outs
            assert torch.equal(s0, s1) and s0.abs().sum() > 0
            outs = [m0, m1]
        assert outs[0].shape == noisy.shape
        assert torch.equal(outs[0], outs[1]), kw
    ancestral = [m.sample(noisy[:1, :, :16, :16], sampler="ddpm", generator=torch.Generator().manual_seed(3))
                 for m in (model, loaded)]
    assert torch.equal(ancestral[0], ancestral[1])
    other_seed = model.sample(noisy[:1, :, :16, :16], sampler="ddpm", generator=torch.Generator().manual_seed(4))
    assert not torch.equal(ancestral[0], other_seed)  # the generator drives the ancestral noise


def test_checkpoint_file_holds_no_data_object(trained_ddpm):
    _, path, _ = trained_ddpm
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    assert "unet_rosinality_config" in ckpt["hyper_parameters"]
    assert not any(isinstance(v, (pl.LightningDataModule, Dataset, DataLoader)) for v in ckpt.values())
    assert all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())
    # no data paths either (they made the file unloadable with torch.load's weights_only)
    assert "datamodule_hyper_parameters" not in ckpt
    torch.load(str(path), map_location="cpu", weights_only=True)


def test_checkpoint_of_an_earlier_version_loads_without_its_retired_hyper_parameters(trained_ddpm, tmp_path):
    """``val_denoise_steps`` is gone from ConditionDDPM (validation scores are a callback now):
    the model refuses it, yet a checkpoint that saved it loads, by path, from a file object
    and through orchestration.checkpoints.load_checkpoint, with the same weights; an export
    drops it."""
    import io

    from orchestration.checkpoints import export_inference_checkpoint, load_checkpoint

    model, path, _ = trained_ddpm
    with pytest.raises(TypeError, match="val_denoise_steps"):
        ConditionDDPM(unet_rosinality_config=unet_config(2), image_size=SIZE, timesteps=50, val_denoise_steps=2)
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["val_denoise_steps"] = 2
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    buffer = io.BytesIO(old.read_bytes())
    for loaded in (ConditionDDPM.load_from_checkpoint(str(old), map_location="cpu"),
                   ConditionDDPM.load_from_checkpoint(buffer, map_location="cpu"),
                   load_checkpoint(ConditionDDPM, old)):
        assert_same_state(model, loaded)
        assert dict(loaded.hparams) == dict(model.hparams) and "val_denoise_steps" not in loaded.hparams
    exported = export_inference_checkpoint(old, tmp_path / "small.ckpt")
    assert "val_denoise_steps" not in torch.load(str(exported), weights_only=True)["hyper_parameters"]
    # a checkpoint without retired keys is passed on untouched (the file object rewound)
    buffer = io.BytesIO(path.read_bytes())
    assert_same_state(model, ConditionDDPM.load_from_checkpoint(buffer, map_location="cpu"))


def test_the_shipped_checkpoint_of_an_earlier_version_loads(tmp_path):
    """The shipped checkpoint with the retired ``val_denoise_steps: 5`` of earlier versions added back."""
    from orchestration.checkpoints import load_checkpoint
    from utils.paths import REPO_ROOT

    ckpt = torch.load(str(REPO_ROOT / "pretrained" / "cdm4mi_bundled_ct_mr.ckpt"), weights_only=True)
    ckpt["hyper_parameters"]["val_denoise_steps"] = 5
    shipped = tmp_path / "earlier.ckpt"
    torch.save(ckpt, shipped)
    direct = ConditionDDPM.load_from_checkpoint(str(shipped), map_location="cpu").eval()
    checked = load_checkpoint(ConditionDDPM, shipped)
    assert_same_state(direct, checked)
    stack = 1 + 2 * direct.context_slices  # the slice and its neighbours for a 2.5D model
    noisy = torch.rand(1, stack, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(direct.denoise(noisy, steps=2, t_start="auto", sigma=0.1),
                       checked.denoise(noisy, steps=2, t_start="auto", sigma=0.1))


def test_checkpoint_saved_from_cuda_loads_on_cpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to save a checkpoint whose tensors live on cuda")
    torch.manual_seed(0)
    model = ConditionDDPM(unet_rosinality_config=unet_config(2), image_size=SIZE, timesteps=50).cuda()
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="gpu", devices=1, default_root_dir=str(tmp_path))
    x = torch.rand(8, 1, SIZE, SIZE) * 2 - 1
    trainer.fit(model, train_dataloaders=DataLoader([{"x_prior": v, "x_cond": v} for v in x], batch_size=4))
    trainer.save_checkpoint(tmp_path / "gpu.ckpt")
    saved = torch.load(str(tmp_path / "gpu.ckpt"), weights_only=False)
    assert next(iter(saved["state_dict"].values())).is_cuda
    model = model.cpu().eval()
    for loc in ("cpu", torch.device("cpu"), {"cuda:0": "cpu"}):
        loaded = ConditionDDPM.load_from_checkpoint(str(tmp_path / "gpu.ckpt"), map_location=loc).eval()
        assert_same_state(model, loaded)
        cond = x[:2].cpu()
        outs = [m.denoise(cond, steps=3, t_start="auto", sigma=0.1, generator=torch.Generator().manual_seed(0))
                for m in (model, loaded)]
        assert torch.equal(outs[0], outs[1])


def test_supervised_unet_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SupervisedUNet(unet_rosinality_config=unet_config(1), loss_type="l2", learning_rate=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    datamodule = make_datamodule(tmp_path)
    trainer = fit(model, tmp_path, datamodule, steps=3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    trainer.save_checkpoint(tmp_path / "unet.ckpt")
    shutil.rmtree(tmp_path / "data")
    model.eval()
    noisy = torch.rand(2, 1, 18, 21, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for loc in ("cpu", torch.device("cpu")):
        loaded = SupervisedUNet.load_from_checkpoint(str(tmp_path / "unet.ckpt"), map_location=loc).eval()
        assert_same_state(model, loaded)
        assert dict(loaded.hparams) == dict(model.hparams)
        data_free(loaded, tmp_path / "data")
        out = loaded.denoise(noisy)
        assert out.shape == noisy.shape
        assert torch.equal(out, model.denoise(noisy))
        assert not torch.equal(out, noisy)  # the trained residual is not zero any more


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 5)])
def test_unconditional_ddpm_sample(sampler, steps):
    torch.manual_seed(0)
    model = DDPM(unet_rosinality_config=unet_config(1), image_size=SIZE, timesteps=40).eval()
    with torch.no_grad():  # random weights everywhere (the output conv starts at zero)
        for p in model.unet_ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = model.sample(batch_size=4, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 1, SIZE, SIZE)
    assert out.std() > 0 and torch.isfinite(out).all()
    again = model.sample(batch_size=4, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    other = model.sample(batch_size=4, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(out, other)
    assert model.sample(batch_size=2).shape == (2, 1, SIZE, SIZE)  # the default (ancestral) path


@pytest.mark.parametrize("kw, match", [
    ({"sampler": "ddpm", "steps": 10}, "takes no steps"),
    ({"sampler": "ddpm", "eta": 1.0}, "takes no eta"),
    ({"sampler": "ddpm", "spacing": "quad"}, "takes no spacing"),
    ({"sampler": "ddim", "steps": 0}, "steps must lie in"),
    ({"sampler": "ddim", "eta": 1.5}, "eta must lie in"),
    ({"sampler": "ddim", "eta": float("nan")}, "eta must lie in"),
    ({"sampler": "ddim", "steps": 4, "spacing": "log"}, "spacing 'log' unknown"),
    ({"sampler": "euler"}, "sampler 'euler' unknown"),
])
def test_sampling_arguments_that_would_be_ignored_or_are_out_of_range_raise(kw, match):
    model = DDPM(unet_rosinality_config=unet_config(1), image_size=SIZE, timesteps=40).eval()
    with pytest.raises(ValueError, match=match):
        model.sample(batch_size=1, **kw)


def test_ddim_spacing_reaches_the_sampler(monkeypatch):
    model = DDPM(unet_rosinality_config=unet_config(1), image_size=SIZE, timesteps=40).eval()
    seen = []
    monkeypatch.setattr(model, "model_output", lambda x, t, c, g: seen.append(int(t[0])) or torch.zeros_like(x))
    model.sample(batch_size=1, sampler="ddim", steps=4, spacing="quad")
    assert seen == ddim_timesteps(4, 39, "quad") and seen != ddim_timesteps(4, 39, "uniform")
