"""ImageLogger sends the named rows of log_images() to the experiment logger, in [0, 1];
ValidationScores logs val/psnr and val/ssim of the model's denoise() with the run config's
sampling on a fixed validation batch."""
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from diffusion_modules.diffusion_utils.sampling import SamplingOptions
from metrics.image_metrics import ImageMetrics
from models.ddpm_conditioned import ConditionDDPM
from models.ddpm_st_diffusion import DDPM
from models.supervised_unet import SupervisedUNet
from orchestration.callbacks import ImageLogger, ValidationScores

UNET = {"target": "diffusion_modules.unet_arch.unet_rosinality.UNet",
        "params": {"in_channel": 2, "channel": 8, "channel_multiplier": [1, 2], "n_res_blocks": 1,
                   "attn_strides": [], "dropout": 0.0}}


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.images = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_image(self, key, images, step=None):
        self.images.append((key, images, step))


def test_image_logger_logs_named_rows_every_n_steps(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    items = [{"x_prior": x[i], "x_cond": x[i] + 0.2 * torch.randn(x[i].shape, generator=g),
              "sigma": torch.tensor(0.1)} for i in range(8)]
    model = ConditionDDPM(unet_rosinality_config=UNET, timesteps=50)
    logger = RecordingLogger()
    trainer = pl.Trainer(max_steps=4, logger=logger, callbacks=[ImageLogger(every_n_steps=2, n=2, steps=2)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=DataLoader(items, batch_size=4))
    keys = [k for k, _, _ in logger.images]
    rows = ["inputs", "conditioning", "denoised_matched_start", "samples"]
    assert keys == [f"images/{r}" for r in rows] * 2
    assert sorted({s for _, _, s in logger.images}) == [2, 4]
    for _, images, _ in logger.images:
        strip = images[0]
        assert strip.shape == (1, 16, 32)  # two 16x16 images side by side
        assert strip.min() >= 0 and strip.max() <= 1
    assert model.training  # the callback restores train mode


# ----------------------------------------------------------------------------- ValidationScores
SAMPLING = {"sampler": "ddim", "steps": 3, "eta": 1.0, "t_start": "auto", "guidance_scale": 1.0}
SIGMAS = [0.05, 0.1, 0.2, 0.15, 0.1, 0.05]  # t* = 12, 21, 35, 29, ... of T=50: >= steps - 1


def validation_items(n=6, size=16):
    """Validation items as the data module gives them: clean and noisy in [-1, 1], sigma."""
    g = torch.Generator().manual_seed(0)
    clean = (torch.rand(n, 1, size, size, generator=g) * 0.6 + 0.2).cumsum(-1) / size * 2 - 1  # smooth ramps
    return [{"x_prior": clean[i], "x_cond": clean[i] + 2 * SIGMAS[i % 6] * torch.randn(clean[i].shape, generator=g),
             "sigma": torch.tensor(SIGMAS[i % 6])} for i in range(n)]


def conditional_model():
    """A tiny ConditionDDPM whose EMA weights differ from its online weights."""
    torch.manual_seed(0)
    model = ConditionDDPM(unet_rosinality_config=UNET, timesteps=50)
    with torch.no_grad():
        for p in model.unet_ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def validate(model, callback, loader):
    trainer = pl.Trainer(logger=False, callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    trainer.validate(model, dataloaders=loader, verbose=False)
    return trainer


def by_hand(model, items, sampling, seed=0):
    """ImageMetrics of model.denoise image by image, one seeded generator for all."""
    g = torch.Generator().manual_seed(seed)
    preds = [model.denoise(item["x_cond"][None], **sampling, sigma=float(item["sigma"]), generator=g)
             for item in items]
    clean01 = (torch.stack([item["x_prior"] for item in items]) + 1) / 2
    return ImageMetrics().image_scores(clean01, ((torch.cat(preds) + 1) / 2).clamp(0, 1), dynamic_range=1.0)


def test_validation_scores_are_image_metrics_of_denoise_with_the_sampling_section():
    items, model = validation_items(), conditional_model()
    callback = ValidationScores(SAMPLING, n_images=3)
    trainer = validate(model, callback, DataLoader(items, batch_size=4))
    expected = by_hand(model, items[:3], SAMPLING)  # the first 3 images of the first batch
    assert callback.scores(model) == {"psnr": expected["psnr"], "ssim": expected["ssim"]}
    for name in ("psnr", "ssim"):  # logged as Lightning's float32 tensors
        assert trainer.callback_metrics[f"val/{name}"].item() == torch.tensor(expected[name]).item()
    assert 0 < expected["ssim"] < 1 and expected["psnr"] > 0
    # EMA weights: the online weights score differently
    online = conditional_model()
    online.unet_ema.load_state_dict(online.unet.state_dict())
    assert by_hand(online, items[:3], SAMPLING)["psnr"] != expected["psnr"]
    # the validation loss stays the model's; its own PSNR is gone
    assert set(trainer.callback_metrics) == {"val/loss_ema", "val/psnr", "val/ssim"}


def test_validation_scores_are_reproducible_and_keep_their_first_batch():
    items, model = validation_items(), conditional_model()
    callback = ValidationScores(SAMPLING, n_images=4)
    values = []
    for seed, loader in ((1, DataLoader(items, batch_size=4)), (2, DataLoader(items[::-1], batch_size=4))):
        torch.manual_seed(seed)  # the global generator plays no part
        trainer = validate(model, callback, loader)
        values.append({k: trainer.callback_metrics[k].item() for k in ("val/psnr", "val/ssim")})
    assert values[0] == values[1]  # eta 1: only the callback's seeded generator drives the steps
    assert torch.equal(callback.batch["x_cond"], torch.stack([item["x_cond"] for item in items[:4]]))
    fresh = ValidationScores(SAMPLING, n_images=4, seed=1)
    validate(model, fresh, DataLoader(items, batch_size=4))
    assert fresh.scores(model)["psnr"] != callback.scores(model)["psnr"]  # the seed matters at eta 1


@pytest.mark.parametrize("steps", [2, 5])
def test_validation_scores_use_the_sampling_steps_and_the_ema_network(steps):
    items, model = validation_items(), conditional_model()
    callback = ValidationScores({**SAMPLING, "steps": steps}, n_images=3)
    validate(model, callback, DataLoader(items, batch_size=4))
    calls = {"unet": 0, "unet_ema": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    callback.scores(model)
    assert calls == {"unet": 0, "unet_ema": 3 * steps}


def test_validation_scores_only_on_global_rank_zero(monkeypatch):
    items, model = validation_items(), conditional_model()
    batch = {k: torch.stack([item[k] for item in items[:4]]) for k in items[0]}
    logged = []
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: logged.append((args, kwargs)))
    callback = ValidationScores(SAMPLING)
    callback.on_validation_batch_end(SimpleNamespace(is_global_zero=False), model, None, batch, 0)
    callback.on_validation_epoch_end(SimpleNamespace(is_global_zero=False), model)
    assert callback.batch is None and logged == []
    rank0 = SimpleNamespace(is_global_zero=True)
    callback.on_validation_batch_end(rank0, model, None, batch, 1)  # not the first batch
    assert callback.batch is None
    callback.on_validation_batch_end(rank0, model, None, batch, 0)
    callback.on_validation_epoch_end(rank0, model)
    assert [args[0] for args, _ in logged] == ["val/psnr", "val/ssim"]
    assert all(kwargs["rank_zero_only"] and not kwargs.get("sync_dist") for _, kwargs in logged)


def test_validation_scores_of_the_supervised_unet_and_none_for_an_unconditional_ddpm():
    items = validation_items()
    unet_cfg = {**UNET, "params": {**UNET["params"], "in_channel": 1}}
    torch.manual_seed(0)
    unet = SupervisedUNet(unet_rosinality_config=unet_cfg).eval()
    trainer = validate(unet, ValidationScores(SAMPLING, n_images=3), DataLoader(items, batch_size=4))
    pred = torch.cat([unet.denoise(item["x_cond"][None]) for item in items[:3]])
    clean01 = (torch.stack([item["x_prior"] for item in items[:3]]) + 1) / 2
    expected = ImageMetrics().image_scores(clean01, ((pred + 1) / 2).clamp(0, 1), dynamic_range=1.0)
    for name in ("psnr", "ssim"):
        assert trainer.callback_metrics[f"val/{name}"].item() == torch.tensor(expected[name]).item()
    ddpm = DDPM(unet_rosinality_config=unet_cfg, timesteps=50).eval()
    trainer = validate(ddpm, ValidationScores(SAMPLING), DataLoader(items, batch_size=4))
    assert set(trainer.callback_metrics) == {"val/loss_ema"}


def test_build_trainer_scores_with_the_run_configs_sampling_section(tmp_path):
    from orchestration.training import build_trainer

    cfg = OmegaConf.create({"sampling": SAMPLING, "logging": {"logger": "csv"},
                            "trainer": {"accelerator": "cpu", "enable_progress_bar": False}})
    found = [c for c in build_trainer(cfg, tmp_path).callbacks if isinstance(c, ValidationScores)]
    assert len(found) == 1 and found[0].options == SamplingOptions(**SAMPLING) and found[0].n_images == 8
    cfg = OmegaConf.create({"logging": {"logger": "csv"}, "trainer": {"accelerator": "cpu"}})
    found = [c for c in build_trainer(cfg, tmp_path).callbacks if isinstance(c, ValidationScores)]
    assert len(found) == 1 and found[0].options == SamplingOptions()  # no section: denoise()'s own defaults


class RecordingScores(ValidationScores):
    """Leaves a file per scoring, named by the process's global rank."""

    def __init__(self, sampling, folder):
        super().__init__(sampling, n_images=2)
        self.folder = folder

    def scores(self, pl_module):
        out = super().scores(pl_module)
        (self.folder / f"rank{pl_module.global_rank}-step{pl_module.global_step}").write_text(repr(out))
        return out


def test_validation_scores_under_ddp_are_computed_and_logged_by_rank_zero_alone(tmp_path):
    """Two gloo processes: rank 0 scores at each validation, rank 1 never, nobody waits."""
    items = validation_items(8)
    torch.manual_seed(0)
    model = ConditionDDPM(unet_rosinality_config=UNET, timesteps=50)
    trainer = pl.Trainer(max_steps=2, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0,
                         accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         callbacks=[RecordingScores({**SAMPLING, "steps": 2}, tmp_path)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=DataLoader(items, batch_size=2), val_dataloaders=DataLoader(items, batch_size=2))
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0-step1", "rank0-step2"]
    assert {"val/psnr", "val/ssim", "val/loss_ema"} <= set(trainer.callback_metrics)  # rank 0's, sent back
