"""Conditional DDPM for denoising: the UNet sees cat([x_t, x_cond]).

Batches are dicts with ``x_cond`` (noisy image) and ``x_prior`` (clean image), both in
model units [-1, 1]. A noise level ``sigma`` is always the std on the [0, 1] image scale,
i.e. 2*sigma in model units.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

import torch

from diffusion_modules.unet_arch.unet_rosinality import pad_to_multiple
from models.ddpm_st_diffusion import DDPM

#: The null condition of classifier-free guidance, in model units: a constant image at -4,
#: outside [-1, 1] and beyond any noisy image of the trained noise levels, so no real
#: condition looks like it (a zero image would be a valid mid-grey one).
NULL_CONDITION = -4.0


class ConditionDDPM(DDPM):
    """DDPM conditioned by concatenation (``conditioning_key: concat``, the only one), with
    condition dropout and classifier-free guidance.

    ``p_uncond``: probability that a training example sees the null condition
    (``NULL_CONDITION``). Only a model trained with ``p_uncond > 0`` can be guided:
    ``guidance_scale`` 1 uses the conditional prediction, 0 the unconditional one, s > 1
    extrapolates away from the unconditional one; and only such a model draws unconditional
    samples with ``sample(batch_size=...)``.
    """

    def __init__(self, *args, conditioning_key: str = "concat", p_uncond: float = 0.0,
                 val_denoise_steps: int = 10, **kwargs):
        if conditioning_key != "concat":
            raise ValueError(f"conditioning_key '{conditioning_key}' unsupported; only 'concat' is implemented")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
        super().__init__(*args, **kwargs)
        self.p_uncond = p_uncond
        self.val_denoise_steps = val_denoise_steps

    def get_condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return batch["x_cond"]

    def apply_model(self, x_t, t, cond=None):
        if cond is None:
            raise ValueError("ConditionDDPM needs a condition image (the noisy input)")
        return self.net(torch.cat([x_t, cond], dim=1), t)

    def check_guidance(self, guidance_scale: float) -> None:
        """Refuse guidance on a model that never saw the null condition."""
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        if guidance_scale != 1.0 and self.p_uncond == 0:
            raise ValueError(f"guidance_scale={guidance_scale} needs a model trained with condition dropout "
                             "(p_uncond > 0); this one never saw the null condition: use guidance_scale=1")

    def model_output(self, x_t, t, cond=None, guidance_scale: float = 1.0):
        """Network output, guided: u + s (c - u) from the conditional output c and the
        unconditional u (both in one batched pass). eps, x0 and v are affine in each other
        for fixed x_t, so guiding the raw output is the same as guiding eps."""
        self.check_guidance(guidance_scale)
        if guidance_scale == 1.0:
            return self.apply_model(x_t, t, cond)
        null = torch.full_like(cond, NULL_CONDITION)
        if guidance_scale == 0.0:
            return self.apply_model(x_t, t, null)
        out, out_uncond = self.apply_model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null])).chunk(2)
        return out_uncond + guidance_scale * (out - out_uncond)

    def p_losses(self, x0, cond, t, noise=None):
        if self.training and self.p_uncond > 0:
            drop = (torch.rand(cond.shape[0], device=cond.device) < self.p_uncond).reshape(-1, *([1] * (cond.ndim - 1)))
            cond = torch.where(drop, torch.full_like(cond, NULL_CONDITION), cond)
        return super().p_losses(x0, cond, t, noise)

    # ------------------------------------------------------------------ sampling
    def start_timestep(self, t_start, sigma: float | None) -> int | None:
        """Resolve ``t_start``: None, an int, or "auto" (needs sigma on the [0, 1] scale)."""
        if t_start is None:
            return None
        if t_start == "auto":
            if sigma is None:
                raise ValueError("t_start='auto' needs the noise level sigma (std on the [0, 1] scale)")
            sigma = float(sigma)
            if not math.isfinite(sigma) or sigma < 0:
                raise ValueError(f"sigma must be a finite noise std >= 0 on the [0, 1] scale, got {sigma}")
            t = self.diffusion.noise_to_timestep(2.0 * sigma)
            top = self.num_timesteps - 1 if self.max_train_timestep is None else self.max_train_timestep
            top_sigma = float(self.diffusion.sqrt_recipm1_alphas_cumprod[top]) / 2
            if sigma > top_sigma:
                warnings.warn(f"sigma={sigma:g} lies beyond the largest noise level this model was trained on "
                              f"({top_sigma:.3g} on the [0, 1] scale, t={top}); expect a poor result")
            return min(t, top)
        t_start = int(t_start)
        if not 0 <= t_start < self.num_timesteps:
            raise ValueError(f"t_start={t_start} must lie in [0, {self.num_timesteps - 1}]")
        return t_start

    @torch.no_grad()
    def sample(self, cond: torch.Tensor | None = None, sampler: str = "ddim", steps: int | None = None,
               eta: float | None = None, spacing: str | None = None, t_start=None, sigma: float | None = None,
               guidance_scale: float = 1.0, generator: torch.Generator | None = None, use_ema: bool = True,
               batch_size: int | None = None) -> torch.Tensor:
        """One clean estimate per condition image (B, channels, H, W) in [-1, 1].

        From pure noise at T-1 by default; with ``t_start`` the chain starts at that timestep
        from the condition scaled by sqrt(alpha_bar) (``"auto"`` matches it to ``sigma``).
        H and W are padded (reflect) to what the UNet needs and cropped back. Without
        ``cond``, ``batch_size`` unconditional samples (channels x image_size^2) from the
        null condition; only for models trained with ``p_uncond > 0``. See ``run_sampler``
        for sampler, steps, eta and spacing.
        """
        if cond is None:
            if batch_size is None or t_start is not None:
                raise ValueError("sample() needs cond (noisy images), or batch_size alone for unconditional samples")
            self.check_guidance(0.0)
            shape = (batch_size, self.channels, self.image_size, self.image_size)
            x_T = torch.randn(shape, generator=generator, device=self.device)
            return self.run_sampler(x_T, torch.zeros(shape, device=self.device), sampler=sampler, steps=steps,
                                    eta=eta, spacing=spacing, guidance_scale=0.0, generator=generator,
                                    use_ema=use_ema)
        if batch_size is not None:
            raise ValueError("give either cond or batch_size to sample(), not both")
        if cond.ndim != 4 or cond.shape[1] != self.channels:
            raise ValueError(f"cond must be (B, {self.channels}, H, W), got shape {tuple(cond.shape)}")
        h, w = cond.shape[-2:]
        if min(h, w) < self.unet.size_factor:
            raise ValueError(f"cond images must be at least {self.unet.size_factor} x {self.unet.size_factor} "
                             f"pixels (the UNet's size factor), got {h} x {w}")
        t0 = self.start_timestep(t_start, sigma)
        if t0 is not None and t_start == "auto" and float(sigma) == 0:
            warnings.warn("sigma=0: there is no noise to remove; the input is returned unchanged")
            return cond.clone()
        if t0 is not None and sampler == "ddim" and (50 if steps is None else steps) > t0 + 1:
            if steps is not None:
                warnings.warn(f"steps={steps} capped at {t0 + 1}: a chain starting at t={t0} has no more steps")
            steps = t0 + 1
        cond_p = pad_to_multiple(cond, self.unet.size_factor)
        if t0 is None:
            x_T = torch.randn(cond_p.shape, generator=generator, device=cond.device, dtype=cond.dtype)
        else:
            x_T = self.diffusion.sqrt_alphas_cumprod[t0] * cond_p
        out = self.run_sampler(x_T, cond_p, sampler=sampler, steps=steps, eta=eta, spacing=spacing, t_start=t0,
                               guidance_scale=guidance_scale, generator=generator, use_ema=use_ema)
        return out[..., :h, :w]

    @torch.no_grad()
    def denoise(self, noisy: torch.Tensor, sampler: str = "ddim", steps: int | None = None,
                eta: float | None = None, spacing: str | None = None, n_samples: int = 1,
                guidance_scale: float = 1.0, t_start=None, sigma: float | None = None,
                return_std: bool = False, batch_size: int = 16, generator: torch.Generator | None = None):
        """Posterior mean of ``n_samples`` clean estimates of ``noisy`` (B, 1, H, W) in [-1, 1].

        Samples are drawn ``batch_size`` at a time. With ``return_std`` also returns the
        per-pixel std of the samples (model units; zeros for one sample).
        """
        if noisy.ndim != 4:
            raise ValueError(f"noisy must be (B, C, H, W), got shape {tuple(noisy.shape)}")
        if not torch.isfinite(noisy).all():
            raise ValueError("noisy input contains NaN or inf values")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if n_samples > 1 and t_start is not None and sampler == "ddim" and (not eta or steps == 1):
            raise ValueError(f"n_samples={n_samples} from the matched start with eta={eta or 0} and steps={steps} "
                             f"would draw {n_samples} identical samples (the chain is deterministic: eta 0, or one "
                             "step straight to x0); use eta > 0 and steps >= 2, or n_samples=1")
        noisy = noisy.to(self.device, torch.float32)
        repeated = noisy.repeat_interleave(n_samples, dim=0)
        outs = [self.sample(chunk, sampler, steps, eta, spacing, t_start, sigma, guidance_scale, generator)
                for chunk in repeated.split(batch_size)]
        samples = torch.cat(outs).reshape(noisy.shape[0], n_samples, *noisy.shape[1:])
        mean = samples.mean(dim=1)
        if return_std:
            std = samples.std(dim=1, unbiased=False)
            return mean, std
        return mean

    # ------------------------------------------------------------------ validation and images
    def denoise_matched(self, cond: torch.Tensor, sigmas: torch.Tensor, steps: int, seed: int = 0) -> torch.Tensor:
        """Deterministic DDIM from each image's matched start (one sigma per image, [0, 1] scale)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.cat([self.denoise(c[None], steps=steps, t_start="auto", sigma=float(s), generator=g)
                          for c, s in zip(cond, sigmas)])

    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)
        if batch_idx == 0 and "sigma" in batch:
            n = min(8, batch["x_cond"].shape[0])
            pred = self.denoise_matched(batch["x_cond"][:n], batch["sigma"][:n], self.val_denoise_steps)
            mse = ((pred - batch["x_prior"][:n]) / 2).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-12)
            self.log("val/psnr_ema", (-10 * torch.log10(mse)).mean(), prog_bar=True, batch_size=n)
        return loss

    @torch.no_grad()
    def log_images(self, batch, n: int = 4, steps: int = 20):
        """Named rows in [-1, 1]: clean, noisy, denoised from the matched start and from pure noise."""
        x0, cond = batch["x_prior"][:n], batch["x_cond"][:n]
        rows = {"inputs": x0, "conditioning": cond}
        if "sigma" in batch:
            rows["denoised_matched_start"] = self.denoise_matched(cond, batch["sigma"][:n], steps)
        g = torch.Generator(device=self.device).manual_seed(0)
        rows["samples"] = self.denoise(cond, steps=steps, generator=g)
        return rows
