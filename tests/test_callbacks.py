"""ImageLogger sends the named rows of log_images() to the experiment logger, in [0, 1]."""
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from models.ddpm_conditioned import ConditionDDPM
from orchestration.callbacks import ImageLogger

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
