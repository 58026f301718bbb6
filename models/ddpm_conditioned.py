"""Conditional DDPM for denoising: the UNet sees cat([x_t, x_cond]).

Batches are dicts with ``x_cond`` (noisy image) and ``x_prior`` (clean image), both in
model units [-1, 1]. With ``context_slices`` k > 0 (2.5D) ``x_cond`` is the noisy stack
(B, 1 + 2k, H, W) of the slice and its k neighbours on each side, the slice first
([z, z-k, ..., z-1, z+1, ..., z+k]); the UNet then sees cat([x_t, stack]) (in_channel 2 + 2k). A noise level ``sigma`` is always the std on the [0, 1] image scale,
i.e. 2*sigma in model units.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from diffusion_modules.diffusion_utils.context import check_context_slices
from diffusion_modules.diffusion_utils.gaussian_diffusion import extract
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

    ``p_matched_start``: fraction of training examples whose x_t is the matched-start pair
    x_t = sqrt(a_bar_t*) x_cond at t* of the example's ``sigma`` (``matched_start_pairs``), so
    that denoising from the matched start (``start_noise="condition"``) is in distribution.

    ``context_slices`` k: the condition is the noisy slice and its k neighbours on each side
    (module docstring; the UNet's ``in_channel`` must be (2 + 2k) * channels). The null
    condition covers the whole stack; the matched start takes the slice alone.
    """

    unet_input_images = 2

    def __init__(self, *args, conditioning_key: str = "concat", p_uncond: float = 0.0,
                 p_matched_start: float = 0.0, context_slices: int = 0, **kwargs):
        if conditioning_key != "concat":
            raise ValueError(f"conditioning_key '{conditioning_key}' unsupported; only 'concat' is implemented")
        for name, p in (("p_uncond", p_uncond), ("p_matched_start", p_matched_start)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        self.context_slices = check_context_slices(context_slices)  # read by check_unet_input
        super().__init__(*args, **kwargs)
        self.p_uncond = p_uncond
        self.p_matched_start = p_matched_start

    def get_condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return batch["x_cond"]

    def chain_condition(self, noisy: torch.Tensor) -> torch.Tensor:
        return noisy

    def setup(self, stage: str) -> None:
        """Refuse to fit on data whose stacks are not this model's (``context_slices``)."""
        check_data = getattr(getattr(self._trainer, "datamodule", None), "check_model", None)
        if check_data is not None:
            check_data(self)

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

    def p_losses(self, x0, cond, t, noise=None, x_t=None):
        if self.training and self.p_uncond > 0:
            drop = (torch.rand(cond.shape[0], device=cond.device) < self.p_uncond).reshape(-1, *([1] * (cond.ndim - 1)))
            cond = torch.where(drop, torch.full_like(cond, NULL_CONDITION), cond)
        return super().p_losses(x0, cond, t, noise, x_t)

    def matched_start_pairs(self, x0, y, sigma, t, generator: torch.Generator | None = None):
        """(t, x_t, noise, picked) for a training batch: each example is picked with probability
        ``p_matched_start`` unless its sigma is 0 or its t* lies above ``max_train_timestep``;
        a picked one gets t = t*(sigma) and x_t = sqrt(a_bar_t*) y, its noise then being
        (x_t - sqrt(a_bar) x0) / sqrt(1 - a_bar), so every parameterization's target matches
        x_t; the others keep t and x_t = q_sample(x0, t, fresh noise). ``y``: the noisy
        condition, whose slice itself (its first ``channels`` channels) makes x_t."""
        y = y[:, : self.channels]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device).reshape(-1).expand(x0.shape[0])
        t_star = self.diffusion.noise_to_timesteps(2 * sigma)
        top = self.num_timesteps - 1 if self.max_train_timestep is None else self.max_train_timestep
        draw = torch.rand(x0.shape[0], generator=generator, device=x0.device)
        picked = (draw < self.p_matched_start) & (sigma > 0) & (t_star <= top)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = torch.where(picked, t_star, t)
        pick = picked.reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = torch.where(pick, extract(self.diffusion.sqrt_alphas_cumprod, t, y.ndim) * y,
                          self.diffusion.q_sample(x0, t, noise))
        noise = torch.where(pick, self.diffusion.noise_from_x_t(x0, x_t, t), noise)
        return t, x_t, noise, picked

    def shared_step(self, batch):
        if not (self.training and self.p_matched_start > 0):
            return super().shared_step(batch)
        if "sigma" not in batch:
            raise ValueError("p_matched_start > 0 needs each example's noise level: batches with a 'sigma' entry")
        x0, cond = batch["x_prior"], batch["x_cond"]
        t, x_t, noise, _ = self.matched_start_pairs(x0, cond, batch["sigma"], self.sample_timesteps(x0.shape[0]))
        return self.p_losses(x0, cond, t, noise, x_t)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond: torch.Tensor | None = None, sampler: str = "ddim", steps: int | None = None,
               eta: float | None = None, spacing: str | None = None, t_start=None, sigma: float | None = None,
               guidance_scale: float = 1.0, generator: torch.Generator | None = None, use_ema: bool = True,
               batch_size: int | None = None, start_noise: str = "condition") -> torch.Tensor:
        """One clean estimate (B, channels, H, W) in [-1, 1] per condition stack (B, channels *
        (1 + 2 context_slices), H, W).

        From pure noise at T-1 by default; with ``t_start`` the chain starts at that timestep
        from the condition scaled by sqrt(alpha_bar) (``"auto"`` matches it to ``sigma``), or
        with ``start_noise="independent"`` from fresh noise around the model's first x0
        estimate there (one more network evaluation; see ``models.matched_start``).
        H and W are padded (reflect) to what the UNet needs and cropped back. Without
        ``cond``, ``batch_size`` unconditional samples (channels x image_size^2) from the
        null condition; only for models trained with ``p_uncond > 0``. See ``run_sampler``
        for sampler, steps, eta and spacing.
        """
        if cond is None:
            if batch_size is None or t_start is not None:
                raise ValueError("sample() needs cond (noisy images), or batch_size alone for unconditional samples")
            self.check_start_noise(start_noise, t_start)
            self.check_guidance(0.0)
            shape = (batch_size, self.channels, self.image_size, self.image_size)
            x_T = torch.randn(shape, generator=generator, device=self.device)
            stack = (batch_size, self.condition_channels, self.image_size, self.image_size)
            return self.run_sampler(x_T, torch.zeros(stack, device=self.device), sampler=sampler, steps=steps,
                                    eta=eta, spacing=spacing, guidance_scale=0.0, generator=generator,
                                    use_ema=use_ema)
        if batch_size is not None:
            raise ValueError("give either cond or batch_size to sample(), not both")
        return self.sample_from_noisy(cond, sampler, steps, eta, spacing, t_start, sigma, guidance_scale, generator,
                                      use_ema, start_noise, name="cond")

    @torch.no_grad()
    def denoise(self, noisy: torch.Tensor, sampler: str = "ddim", steps: int | None = None,
                eta: float | None = None, spacing: str | None = None, n_samples: int = 1,
                guidance_scale: float = 1.0, t_start=None, sigma: float | None = None,
                return_std: bool = False, batch_size: int = 16, generator: torch.Generator | None = None,
                start_noise: str = "condition", inference=None):
        """Posterior mean of ``n_samples`` clean estimates (B, 1, H, W) in [-1, 1] of ``noisy``
        (B, 1 + 2 context_slices, H, W): the slice, then its neighbours (module docstring).

        Samples are drawn ``batch_size`` at a time. With ``return_std`` also returns the
        per-pixel std of the samples (model units; zeros for one sample). ``start_noise``
        "independent" (needs ``t_start``) costs one more network evaluation per sample
        (NFE = steps + 1) and makes samples differ even at eta 0. ``inference``: how the network
        runs (bf16, channels_last, compile; ``diffusion_utils.inference.InferenceOptions``).
        """
        self.check_start_noise(start_noise, t_start)
        self.check_ensemble(n_samples, t_start, sampler, eta, steps, start_noise)

        def draw(chunk):
            return self.sample(chunk, sampler, steps, eta, spacing, t_start, sigma, guidance_scale, generator,
                               start_noise=start_noise)

        return self.denoise_ensemble(noisy, n_samples, batch_size, return_std, draw, inference)

    # ------------------------------------------------------------------ images
    def denoise_matched(self, cond: torch.Tensor, sigmas: torch.Tensor, steps: int, seed: int = 0) -> torch.Tensor:
        """Deterministic DDIM from each image's matched start (one sigma per image, [0, 1] scale)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.cat([self.denoise(c[None], steps=steps, t_start="auto", sigma=float(s), generator=g)
                          for c, s in zip(cond, sigmas)])

    @torch.no_grad()
    def log_images(self, batch, n: int = 4, steps: int = 20):
        """Named rows in [-1, 1]: clean, noisy, denoised from the matched start and from pure noise."""
        x0, cond = batch["x_prior"][:n], batch["x_cond"][:n]
        rows = {"inputs": x0, "conditioning": cond[:, : self.channels]}
        if "sigma" in batch:
            rows["denoised_matched_start"] = self.denoise_matched(cond, batch["sigma"][:n], steps)
        g = torch.Generator(device=self.device).manual_seed(0)
        rows["samples"] = self.denoise(cond, steps=steps, generator=g)
        return rows

