"""The base DDPM LightningModule: network, EMA, loss, sampling entry points, optimisation.

The diffusion math (schedule, forward process, parameterizations, posterior) lives in
``diffusion_modules.diffusion_utils.gaussian_diffusion.GaussianDiffusion`` (``self.diffusion``);
the sampler (timesteps, steps, matched start) in ``diffusion_utils.sampling``. Images are in model units [-1, 1]. Timesteps are
integers 0..T-1, where t=0 is the least noisy step.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping

import lightning.pytorch as pl
import numpy as np
import torch

from diffusion_modules.diffusion_utils.beta_schedule import make_beta_schedule
from diffusion_modules.diffusion_utils.gaussian_diffusion import GaussianDiffusion
from diffusion_modules.diffusion_utils.losses import LOSSES, per_example_loss
from diffusion_modules.diffusion_utils.sampling import check_sampler, run_chain
from models.matched_start import MatchedStart
from models.safe_loading import SafeCheckpointLoading
from utils.initialize_configs import instantiate_from_configs
from utils.optim import adamw_warmup_cosine


def unet_in_channels(unet: torch.nn.Module) -> int | None:
    """Image channels a UNet takes: its ``in_channel`` attribute, else those of its ``conv_in``
    (a Conv2d, after a space-to-depth ``fold``); None when it cannot tell."""
    if isinstance(getattr(unet, "in_channel", None), int):
        return unet.in_channel
    conv = getattr(unet, "conv_in", None)
    if isinstance(conv, torch.nn.Conv2d):
        return conv.in_channels // getattr(unet, "fold", 1) ** 2
    return None


class DDPM(SafeCheckpointLoading, MatchedStart, pl.LightningModule):
    """Unconditional DDPM on single-channel images; batches are dicts with ``x_prior``.

    ``image_size`` and ``channels`` give the shape of unconditional samples.
    ``min_snr_gamma`` weights the L2 loss by min(SNR, gamma) expressed for the target
    (Hang et al. 2023); it is derived for L2 only, so other losses refuse it.
    ``max_train_timestep`` limits training to t <= it (denoising never needs larger t).
    ``denoise`` runs it as an SDEdit denoiser: the chain from the noisy image at t*.
    """

    #: images the UNet input concatenates: x_t alone (``ConditionDDPM``: x_t and the condition)
    unet_input_images = 1
    #: neighbouring slices on each side in the condition (``ConditionDDPM``'s option; none here)
    context_slices = 0

    def __init__(self, unet_rosinality_config: Mapping[str, Any], image_size: int = 64, channels: int = 1,
                 timesteps: int = 1000, beta_schedule: str = "linear", linear_start: float = 1e-4,
                 linear_end: float = 2e-2, betas: list[float] | None = None, parameterization: str = "eps",
                 loss_type: str = "l2", min_snr_gamma: float | None = None, max_train_timestep: int | None = None,
                 clip_denoised: bool = True, use_ema: bool = True, ema_decay: float = 0.9999,
                 learning_rate: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.1):
        super().__init__()
        if loss_type not in LOSSES:
            raise ValueError(f"loss_type '{loss_type}' unknown; expected one of {LOSSES}")
        if min_snr_gamma is not None and loss_type != "l2":
            raise ValueError(f"min_snr_gamma is derived for the l2 loss; loss_type '{loss_type}' cannot use it "
                             "(set min_snr_gamma: null or loss_type: l2)")
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or null, got {min_snr_gamma}")
        self.save_hyperparameters()
        self.image_size, self.channels = image_size, channels
        self.loss_type, self.min_snr_gamma, self.clip_denoised = loss_type, min_snr_gamma, clip_denoised
        self.diffusion = GaussianDiffusion(
            make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, betas=betas), parameterization)
        self.unet = instantiate_from_configs(unet_rosinality_config, "model.params.unet_rosinality_config")
        self.check_unet_input()
        self.use_ema, self.ema_decay = use_ema, ema_decay
        if use_ema:
            self.unet_ema = copy.deepcopy(self.unet).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._ema_active = False
        if max_train_timestep is not None and not 0 <= max_train_timestep < self.num_timesteps:
            raise ValueError(f"max_train_timestep={max_train_timestep} must lie in [0, {self.num_timesteps - 1}]")
        self.max_train_timestep = max_train_timestep

    def check_unet_input(self) -> None:
        """Fail at construction, not at sampling, on a UNet of the wrong input width (e.g. an
        unconditional checkpoint loaded with ConditionDDPM, or the other way round)."""
        k = self.context_slices
        got, want = unet_in_channels(self.unet), (self.unet_input_images + 2 * k) * self.channels
        if got is None or got == want:
            return
        what = ("x_t alone (in_channel = channels" if self.unet_input_images == 1
                else "x_t and the condition (in_channel = 2*channels" if k == 0
                else f"x_t and the condition stack of 1 + 2*context_slices slices (context_slices={k}: "
                     "in_channel = (2 + 2*context_slices)*channels")
        stack, hint = got // self.channels - 2, ""
        if got == self.channels:
            hint = "an unconditional DDPM's UNet? load it with DDPM"
        elif self.unet_input_images == 1 and got >= 2 * self.channels:
            hint = "a conditional model's UNet? load it with ConditionDDPM"
        elif got % self.channels == 0 and stack >= 0 and stack % 2 == 0:
            hint = f"a UNet for context_slices={stack // 2}? set context_slices and in_channel to match"
        raise ValueError(f"{type(self).__name__}'s UNet must take {what} = {want}), but this one takes {got} "
                         f"input channel(s){'; ' + hint if hint else ''}")

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    @property
    def parameterization(self) -> str:
        return self.diffusion.parameterization

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) noise (see GaussianDiffusion)."""
        return self.diffusion.q_sample(x0, t, noise)

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
        """(x0, eps) predicted at x_t; x0 clipped to [-1, 1] (eps recomputed) when ``clip``
        (default: the model's ``clip_denoised``)."""
        out = self.model_output(x_t, t, cond, guidance_scale)
        return self.diffusion.predict_start(x_t, t, out, self.clip_denoised if clip is None else clip)

    def model_fn(self, cond: torch.Tensor | None = None, guidance_scale: float = 1.0):
        """The network as the sampler sees it: ``(x_t, t) -> output`` with this condition and
        guidance (the weights in use at call time: the EMA copy inside ``ema_scope()``)."""
        return lambda x_t, t: self.model_output(x_t, t, cond, guidance_scale)

    @torch.no_grad()
    def sample(self, batch_size: int = 16, sampler: str = "ddpm", steps: int | None = None,
               eta: float | None = None, spacing: str | None = None, generator: torch.Generator | None = None,
               use_ema: bool = True) -> torch.Tensor:
        """Unconditional samples (batch_size, channels, image_size, image_size) in [-1, 1]
        (see ``run_sampler`` for sampler, steps, eta and spacing)."""
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        x_T = torch.randn(shape, generator=generator, device=self.device)
        return self.run_sampler(x_T, None, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                                generator=generator, use_ema=use_ema)

    def run_sampler(self, x_T: torch.Tensor, cond: torch.Tensor | None, *, sampler: str = "ddim",
                    steps: int | None = None, eta: float | None = None, spacing: str | None = None,
                    t_start: int | None = None, guidance_scale: float = 1.0,
                    generator: torch.Generator | None = None, use_ema: bool = True) -> torch.Tensor:
        """Run the reverse process from ``x_T`` at ``t_start`` (default T-1) to x_0 with the
        EMA weights (``use_ema``) and the model's ``clip_denoised``; sampler, steps, eta and
        spacing as in ``diffusion_modules.diffusion_utils.sampling.run_chain``."""
        check_sampler(sampler, steps, eta, spacing)
        with self.ema_scope() if use_ema else nullcontext():
            return run_chain(self.model_fn(cond, guidance_scale), self.diffusion, x_T, sampler=sampler, steps=steps,
                             eta=eta, spacing=spacing, t_start=t_start, clip=self.clip_denoised,
                             generator=generator)

    @torch.no_grad()
    def denoise(self, noisy: torch.Tensor, sampler: str = "ddim", steps: int | None = None,
                eta: float | None = None, spacing: str | None = None, n_samples: int = 1,
                guidance_scale: float = 1.0, t_start=None, sigma: float | None = None,
                return_std: bool = False, batch_size: int = 16, generator: torch.Generator | None = None,
                start_noise: str = "condition", inference=None):
        """SDEdit: the posterior mean of ``n_samples`` chains from x_t* = sqrt(a_bar*) noisy at
        ``t_start`` ("auto" with ``sigma`` on the [0, 1] scale, or an int) for ``noisy``
        (B, channels, H, W) in [-1, 1]; the model sees no condition, so only the start carries
        the image. The keywords of ``ConditionDDPM.denoise`` (``SamplingOptions``); there is no
        condition to guide, so ``guidance_scale`` must stay 1."""
        if t_start is None:
            raise ValueError("the unconditional DDPM sees no condition: it denoises only from a start timestep "
                             "(SDEdit); give t_start='auto' with sigma, or an int")
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale}: the unconditional DDPM has no condition to guide; "
                             "use guidance_scale=1")
        self.check_start_noise(start_noise, t_start)
        self.check_ensemble(n_samples, t_start, sampler, eta, steps, start_noise)

        def draw(chunk):
            return self.sample_from_noisy(chunk, sampler, steps, eta, spacing, t_start, sigma, generator=generator,
                                          start_noise=start_noise)

        return self.denoise_ensemble(noisy, n_samples, batch_size, return_std, draw, inference)

    # ------------------------------------------------------------------ training
    def get_condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The conditioning image of a batch (none for the unconditional model)."""
        return None

    def p_losses(self, x0: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor,
                 noise: torch.Tensor | None = None, x_t: torch.Tensor | None = None) -> torch.Tensor:
        """Per-batch diffusion loss at timesteps t (fresh Gaussian noise unless given). A given
        ``x_t`` (with the ``noise`` that q_sample would turn into it) replaces q_sample(x0, t, noise)."""
        if x_t is not None and noise is None:
            raise ValueError("p_losses with x_t needs its noise (GaussianDiffusion.noise_from_x_t) for the target")
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.diffusion.q_sample(x0, t, noise) if x_t is None else x_t
        out = self.apply_model(x_t, t, cond)
        loss = per_example_loss(out, self.diffusion.training_target(x0, noise, t), self.loss_type)
        if self.min_snr_gamma is not None:
            loss = loss * self.diffusion.min_snr_weight(t, self.min_snr_gamma)
        return loss.mean()

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

    def optimizer_step(self, *args, **kwargs):
        """Lightning calls this once per optimizer step (after gradient accumulation, before
        checkpoint callbacks): the EMA follows optimizer steps, not micro-batches."""
        super().optimizer_step(*args, **kwargs)
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

