"""Supervised U-Net denoiser: the diffusion UNet backbone trained directly on noisy/clean pairs.

It is the supervised baseline the diffusion model is compared with: same backbone, same
data module and pairs, no diffusion. The network predicts a residual, clean = noisy + f(noisy),
at a fixed time input of 0. Images are in model units [-1, 1].
"""
from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
import torch

from diffusion_modules.diffusion_utils.losses import per_example_loss
from diffusion_modules.unet_arch.unet_rosinality import run_padded
from models.safe_loading import SafeCheckpointLoading
from utils.initialize_configs import instantiate_from_configs
from utils.optim import adamw_warmup_cosine


class SupervisedUNet(SafeCheckpointLoading, pl.LightningModule):
    """U-Net trained with an L1 or L2 loss to map ``x_cond`` (noisy) to ``x_prior`` (clean)."""

    def __init__(self, unet_rosinality_config: Mapping[str, Any], loss_type: str = "l1",
                 learning_rate: float = 2e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.1):
        super().__init__()
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type '{loss_type}' unknown; expected 'l1' or 'l2'")
        self.save_hyperparameters()
        self.unet = instantiate_from_configs(unet_rosinality_config, "model.params.unet_rosinality_config")

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(noisy.shape[0], device=noisy.device, dtype=torch.long)
        return noisy + self.unet(noisy, t)

    def _loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return per_example_loss(self(batch["x_cond"]), batch["x_prior"], self.hparams.loss_type).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x_cond"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["x_cond"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        return adamw_warmup_cosine(self.unet.parameters(), h.learning_rate, h.weight_decay, h.warmup_steps,
                                   h.min_lr_ratio, self.trainer.estimated_stepping_batches)

    @torch.no_grad()
    def denoise(self, noisy: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Clean estimate of ``noisy`` (B, 1, H, W) in [-1, 1]; any H, W (reflect-padded)."""
        if noisy.ndim != 4:
            raise ValueError(f"noisy must be (B, C, H, W), got shape {tuple(noisy.shape)}")
        if not torch.isfinite(noisy).all():
            raise ValueError("noisy input contains NaN or inf values")
        return run_padded(lambda padded: torch.cat([self(chunk) for chunk in padded.split(batch_size)]),
                          noisy.to(self.device, torch.float32), self.unet.size_factor)
