"""Supervised U-Net denoiser: the diffusion UNet backbone trained directly on noisy/clean pairs.

It is the supervised baseline the diffusion model is compared with: same backbone, same
data module and pairs, no diffusion. The network predicts a residual, clean = noisy + f(noisy),
at a fixed time input of 0. Images are in model units [-1, 1]. With ``context_slices`` k > 0
(2.5D, as ``ConditionDDPM``) the input is the noisy stack (B, 1 + 2k, H, W), the slice first
([z, z-k, ..., z-1, z+1, ..., z+k]), and clean slice z = noisy[:, :1] + f(stack).
"""
from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
import torch

from diffusion_modules.diffusion_utils.context import check_context_slices
from diffusion_modules.diffusion_utils.losses import per_example_loss
from diffusion_modules.unet_arch.unet_rosinality import run_padded
from models.ddpm_st_diffusion import unet_in_channels
from models.matched_start import check_stack
from models.safe_loading import SafeCheckpointLoading
from utils.initialize_configs import instantiate_from_configs
from utils.optim import adamw_warmup_cosine


class SupervisedUNet(SafeCheckpointLoading, pl.LightningModule):
    """U-Net trained with an L1 or L2 loss to map ``x_cond`` (noisy) to ``x_prior`` (clean);
    ``context_slices`` k: ``x_cond`` is the stack of the slice and k neighbours on each side
    (the UNet's ``in_channel`` must be 1 + 2k)."""

    def __init__(self, unet_rosinality_config: Mapping[str, Any], loss_type: str = "l1",
                 learning_rate: float = 2e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.1, context_slices: int = 0):
        super().__init__()
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type '{loss_type}' unknown; expected 'l1' or 'l2'")
        self.context_slices = check_context_slices(context_slices)
        self.save_hyperparameters()
        self.unet = instantiate_from_configs(unet_rosinality_config, "model.params.unet_rosinality_config")
        got, want = unet_in_channels(self.unet), 1 + 2 * self.context_slices
        if got is not None and got != want:
            raise ValueError(f"SupervisedUNet's UNet must take the stack of 1 + 2*context_slices slices "
                             f"(context_slices={self.context_slices}: in_channel = {want}), but this one takes "
                             f"{got} input channel(s)")

    def setup(self, stage: str) -> None:
        """Refuse to fit on data whose stacks are not this model's (``context_slices``)."""
        check_data = getattr(getattr(self._trainer, "datamodule", None), "check_model", None)
        if check_data is not None:
            check_data(self)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        """Clean slice = the noisy slice (channel 0 of the stack) + the network's residual."""
        t = torch.zeros(noisy.shape[0], device=noisy.device, dtype=torch.long)
        return noisy[:, :1] + self.unet(noisy, t)

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
        """Clean estimate (B, 1, H, W) in [-1, 1] of ``noisy`` (B, 1 + 2 context_slices, H, W);
        any H, W (reflect-padded)."""
        if noisy.ndim != 4:
            raise ValueError(f"noisy must be (B, C, H, W), got shape {tuple(noisy.shape)}")
        check_stack(noisy, self.context_slices)
        if not torch.isfinite(noisy).all():
            raise ValueError("noisy input contains NaN or inf values")
        return run_padded(lambda padded: torch.cat([self(chunk) for chunk in padded.split(batch_size)]),
                          noisy.to(self.device, torch.float32), self.unet.size_factor)
