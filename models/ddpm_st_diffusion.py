"""The base DDPM LightningModule: schedule, forward process, losses, EMA, optimisation.

Images are in model units [-1, 1]. Timesteps are integers 0..T-1, where t=0 is the least
noisy step (alpha_bar_0 = 1 - beta_0).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from diffusion_modules.diffusion_utils.beta_schedule import make_beta_schedule
from models.ddim import DDIMSampler
from utils.initialize_configs import instantiate_from_configs
from utils.optim import adamw_warmup_cosine

PARAMETERIZATIONS = ("eps", "x0", "v")
LOSSES = ("l1", "l2", "huber")


def extract(buffer: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``buffer[t]`` and shape it (B, 1, ..., 1) to broadcast over an ndim tensor."""
    return buffer.gather(0, t.long()).reshape(-1, *([1] * (ndim - 1)))


class DDPM(pl.LightningModule):
    """Unconditional DDPM on single-channel images; batches are dicts with ``x_prior``."""

    def __init__(self, unet_rosinality_config: Mapping[str, Any], image_size: int = 64, channels: int = 1,
                 timesteps: int = 1000, beta_schedule: str = "linear", linear_start: float = 1e-4,
                 linear_end: float = 2e-2, betas: list[float] | None = None, parameterization: str = "eps",
                 loss_type: str = "l2", min_snr_gamma: float | None = None, max_train_timestep: int | None = None,
                 clip_denoised: bool = True, use_ema: bool = True, ema_decay: float = 0.9999,
                 learning_rate: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.1):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization '{parameterization}' unknown; expected one of {PARAMETERIZATIONS}")
        if loss_type not in LOSSES:
            raise ValueError(f"loss_type '{loss_type}' unknown; expected one of {LOSSES}")
        self.save_hyperparameters()
        self.image_size, self.channels = image_size, channels
        self.parameterization, self.loss_type = parameterization, loss_type
        self.min_snr_gamma, self.clip_denoised = min_snr_gamma, clip_denoised
        self.unet = instantiate_from_configs(unet_rosinality_config, "model.params.unet_rosinality_config")
        self.use_ema, self.ema_decay = use_ema, ema_decay
        if use_ema:
            self.unet_ema = copy.deepcopy(self.unet).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._ema_active = False
        self.register_schedule(make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, betas=betas))
        if max_train_timestep is not None and not 0 <= max_train_timestep < self.num_timesteps:
            raise ValueError(f"max_train_timestep={max_train_timestep} must lie in [0, {self.num_timesteps - 1}]")
        self.max_train_timestep = max_train_timestep

    # ------------------------------------------------------------------ schedule
    def register_schedule(self, betas: np.ndarray) -> None:
        """Register every schedule-derived coefficient as a float32 buffer (computed in float64)."""
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = len(betas)
        post_var = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    def noise_to_timestep(self, sigma: float) -> int:
        """Timestep whose sqrt((1-a_bar)/a_bar) is closest to ``sigma`` given in model units."""
        ratio = (self.sqrt_recipm1_alphas_cumprod).cpu().numpy()
        return int(np.argmin(np.abs(ratio - sigma)))

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) noise."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = extract(self.posterior_mean_coef1, t, x_t.ndim) * x0 + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        return (mean, extract(self.posterior_variance, t, x_t.ndim),
                extract(self.posterior_log_variance_clipped, t, x_t.ndim))

    def get_v(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(a_bar) eps - sqrt(1 - a_bar) x0."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def split_prediction(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor):
        """Turn a network output into (x0, eps) according to the parameterization."""
        sa = extract(self.sqrt_alphas_cumprod, t, x_t.ndim)
        s1 = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        if self.parameterization == "eps":
            eps = out
            x0 = (x_t - s1 * eps) / sa
        elif self.parameterization == "x0":
            x0 = out
            eps = (x_t - sa * x0) / s1
        else:
            x0 = sa * x_t - s1 * out
            eps = s1 * x_t + sa * out
        return x0, eps

    # ------------------------------------------------------------------ network
    @property
    def net(self) -> torch.nn.Module:
        """The UNet in use: the EMA copy inside ``ema_scope()``."""
        return self.unet_ema if self._ema_active else self.unet

    @contextmanager
    def ema_scope(self) -> Iterator[None]:
        """Use the EMA weights inside this block (no-op without EMA)."""
        previous = self._ema_active
        self._ema_active = self.use_ema
        try:
            yield
        finally:
            self._ema_active = previous

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Raw network output for x_t at timesteps t (cond is unused by the base model)."""
        return self.net(x_t, t)

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                     guidance_scale: float = 1.0) -> torch.Tensor:
        """Network output used for sampling; the conditional model adds guidance here."""
        return self.apply_model(x_t, t, cond)

    def predict_start(self, x_t, t, cond=None, guidance_scale: float = 1.0, clip: bool | None = None):
        """(x0, eps) predicted at x_t, x0 optionally clipped to [-1, 1] (eps recomputed to match)."""
        x0, eps = self.split_prediction(x_t, t, self.model_output(x_t, t, cond, guidance_scale))
        if self.clip_denoised if clip is None else clip:
            x0 = x0.clamp(-1, 1)
            eps = (x_t - extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x0) / extract(
                self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        return x0, eps

    # ------------------------------------------------------------------ ancestral sampling
    @torch.no_grad()
    def p_sample(self, x_t, t: int, cond=None, guidance_scale: float = 1.0, clip: bool | None = None,
                 generator: torch.Generator | None = None):
        """One ancestral step x_t -> x_{t-1}; returns (x_prev, x0_pred)."""
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        x0, _ = self.predict_start(x_t, tt, cond, guidance_scale, clip)
        mean, _, log_var = self.q_posterior(x0, x_t, tt)
        if t == 0:
            return mean, x0
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + (0.5 * log_var).exp() * noise, x0

    @torch.no_grad()
    def p_sample_loop(self, x_T: torch.Tensor, cond=None, t_start: int | None = None, guidance_scale: float = 1.0,
                      clip: bool | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Full ancestral sampling from x_T at ``t_start`` (default T-1) down to x_0."""
        t_start = self.num_timesteps - 1 if t_start is None else int(t_start)
        x = x_T
        for t in range(t_start, -1, -1):
            x, _ = self.p_sample(x, t, cond, guidance_scale, clip, generator)
        return x

    @torch.no_grad()
    def sample(self, batch_size: int = 16, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
               generator: torch.Generator | None = None, use_ema: bool = True) -> torch.Tensor:
        """Unconditional samples (batch_size, C, image_size, image_size) in [-1, 1]."""
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        x_T = torch.randn(shape, generator=generator, device=self.device)
        return self._sample_from(x_T, None, sampler, steps, eta, None, 1.0, generator, use_ema)

    def _sample_from(self, x_T, cond, sampler, steps, eta, t_start, guidance_scale, generator, use_ema):
        scope = self.ema_scope() if use_ema else nullcontext()
        with scope:
            if sampler == "ddpm":
                return self.p_sample_loop(x_T, cond, t_start, guidance_scale, generator=generator)
            if sampler == "ddim":
                return DDIMSampler(self).sample(x_T, cond=cond, steps=steps or 50, eta=eta, t_start=t_start,
                                                guidance_scale=guidance_scale, generator=generator)
        raise ValueError(f"sampler '{sampler}' unknown; expected 'ddpm' or 'ddim'")

    # ------------------------------------------------------------------ training
    def get_condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The conditioning image of a batch (none for the unconditional model)."""
        return None

    def p_losses(self, x0: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-batch diffusion loss at timesteps t (fresh Gaussian noise unless given)."""
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = self.apply_model(x_t, t, cond)
        target = {"eps": noise, "x0": x0, "v": self.get_v(x0, noise, t) if self.parameterization == "v" else None}[
            self.parameterization]
        if self.loss_type == "l1":
            loss = (out - target).abs()
        elif self.loss_type == "l2":
            loss = (out - target) ** 2
        else:
            loss = F.huber_loss(out, target, reduction="none", delta=1.0)
        loss = loss.mean(dim=tuple(range(1, loss.ndim)))
        if self.min_snr_gamma is not None:
            loss = loss * self.min_snr_weight(t)
        return loss.mean()

    def min_snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023), expressed for the chosen target."""
        snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.parameterization == "eps":
            return clipped / snr
        if self.parameterization == "v":
            return clipped / (snr + 1)
        return clipped

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform training timesteps in [0, max_train_timestep] (default [0, T-1])."""
        high = self.num_timesteps if self.max_train_timestep is None else self.max_train_timestep + 1
        return torch.randint(0, high, (n,), generator=generator, device=self.device)

    def shared_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x0 = batch["x_prior"]
        return self.p_losses(x0, self.get_condition(batch), self.sample_timesteps(x0.shape[0]))

    def training_step(self, batch, batch_idx):
        loss = self.shared_step(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["x_prior"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        x0 = batch["x_prior"]
        g = torch.Generator(device=self.device).manual_seed(batch_idx)
        t = self.sample_timesteps(x0.shape[0], generator=g)
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        with self.ema_scope():
            loss = self.p_losses(x0, self.get_condition(batch), t, noise)
        self.log("val/loss_ema" if self.use_ema else "val/loss", loss, prog_bar=True, batch_size=x0.shape[0],
                 sync_dist=True)
        return loss

    @torch.no_grad()
    def update_ema(self) -> None:
        """decay = min(ema_decay, (1 + n) / (10 + n)) so early EMA follows the model."""
        n = int(self.ema_updates)
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        ema_params = list(self.unet_ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.unet.parameters()], 1 - decay)
        for b_ema, b in zip(self.unet_ema.buffers(), self.unet.buffers()):
            b_ema.copy_(b)
        self.ema_updates += 1

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.use_ema:
            self.update_ema()

    def configure_optimizers(self):
        h = self.hparams
        return adamw_warmup_cosine(self.unet.parameters(), h.learning_rate, h.weight_decay, h.warmup_steps,
                                   h.min_lr_ratio, self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def log_images(self, batch: Mapping[str, torch.Tensor], n: int = 4, steps: int = 20,
                   diffusion_points: int = 5) -> dict[str, torch.Tensor]:
        """Named image rows in [-1, 1]: inputs, the forward diffusion row and EMA samples."""
        x0 = batch["x_prior"][:n]
        noise = torch.randn_like(x0[:1])
        ts = np.linspace(0, self.num_timesteps - 1, diffusion_points).round().astype(int)
        row = [self.q_sample(x0[:1], torch.tensor([t], device=self.device), noise) for t in ts]
        g = torch.Generator(device=self.device).manual_seed(0)
        samples = self.sample(batch_size=x0.shape[0], sampler="ddim", steps=steps, generator=g)
        return {"inputs": x0, "diffusion_row": torch.cat(row), "samples": samples}

