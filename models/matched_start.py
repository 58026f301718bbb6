"""Denoising by the reverse chain from a noisy image, shared by the unconditional ``DDPM``
(SDEdit: the prior alone) and ``ConditionDDPM`` (which also feeds the noisy image to the UNet
as its condition): the model-side glue (padding, condition, EMA) around the matched start of
``diffusion_modules.diffusion_utils.sampling``, and the K-sample posterior ensemble.

A noisy image y = x0 + 2 sigma n (model units) scaled by sqrt(a_bar_t) has the marginal of
q(x_t | x0) when sqrt((1 - a_bar_t) / a_bar_t) = 2 sigma; ``start_timestep("auto", sigma)``
picks that t*. For the conditional model the pair (x_t*, y) is not a training pair: x_t*
carries exactly the condition's noise. ``start_noise="independent"`` re-draws it: x_t* =
sqrt(a_bar*) x0_hat + sqrt(1 - a_bar*) eps around the model's first estimate x0_hat (one
extra network evaluation).

With neighbouring slices (``context_slices`` k > 0, ``ConditionDDPM`` only) the noisy input
is the stack (B, channels * (1 + 2k), H, W), the slice itself first: the network's condition
is the whole stack, the matched start and the output are the slice alone (its first
``channels`` channels).
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch

from diffusion_modules.diffusion_utils.inference import optimized_networks
from diffusion_modules.diffusion_utils.sampling import START_NOISES, capped_steps, matched_start, matched_timestep
from diffusion_modules.unet_arch.unet_rosinality import run_padded


def check_stack(noisy: torch.Tensor, context_slices: int, channels: int = 1, name: str = "noisy") -> None:
    """ValueError, naming context_slices and the expected shape, unless ``noisy`` is a
    (B, channels * (1 + 2 context_slices), H, W) stack."""
    want, k = channels * (1 + 2 * context_slices), context_slices
    if noisy.ndim != 4 or noisy.shape[1] != want:
        order = "[z, z-1, z+1]" if k == 1 else f"[z, z-{k}..z-1, z+1..z+{k}]"
        what = "the slice alone" if k == 0 else f"the slice, then its {k} neighbour(s) before and {k} after: {order}"
        raise ValueError(f"{name} must be (B, {want}, H, W) for context_slices={k} ({what}), "
                         f"got shape {tuple(noisy.shape)}")


class MatchedStart:
    """Mixin of ``DDPM``: start timestep, the chain from a noisy image, posterior ensembles.

    Hook: ``chain_condition(noisy)`` is the condition passed to the network along the chain
    (None for the unconditional model; the padded noisy image for ``ConditionDDPM``).
    """

    def chain_condition(self, noisy: torch.Tensor) -> torch.Tensor | None:
        return None

    @property
    def condition_channels(self) -> int:
        """Channels of the noisy input: the slice and its 2 * context_slices neighbours."""
        return self.channels * (1 + 2 * self.context_slices)

    def start_timestep(self, t_start, sigma: float | None) -> int | None:
        """Resolve ``t_start``: None, an int, or "auto" (needs sigma on the [0, 1] scale)."""
        if t_start is None:
            return None
        if t_start == "auto":
            if sigma is None:
                raise ValueError("t_start='auto' needs the noise level sigma (std on the [0, 1] scale)")
            return matched_timestep(self.diffusion, sigma, self.max_train_timestep)
        t_start = int(t_start)
        if not 0 <= t_start < self.num_timesteps:
            raise ValueError(f"t_start={t_start} must lie in [0, {self.num_timesteps - 1}]")
        return t_start

    @staticmethod
    def check_start_noise(start_noise: str, t_start) -> None:
        if start_noise not in START_NOISES:
            raise ValueError(f"start_noise '{start_noise}' unknown; expected one of {START_NOISES}")
        if start_noise == "independent" and t_start is None:
            raise ValueError("start_noise='independent' re-noises the matched start and needs a t_start "
                             "('auto' with sigma, or an int); from pure noise there is no start to re-noise")

    @torch.no_grad()
    def sample_from_noisy(self, noisy: torch.Tensor, sampler: str = "ddim", steps: int | None = None,
                          eta: float | None = None, spacing: str | None = None, t_start=None,
                          sigma: float | None = None, guidance_scale: float = 1.0,
                          generator: torch.Generator | None = None, use_ema: bool = True,
                          start_noise: str = "condition", name: str = "noisy") -> torch.Tensor:
        """One clean estimate per image of ``noisy`` (B, channels, H, W): the chain from pure
        noise at T-1 (``t_start=None``) or from the matched start at ``t_start``. H and W are
        reflect-padded to the UNet's size factor and cropped back. ``name`` names the argument
        in errors."""
        self.check_start_noise(start_noise, t_start)
        check_stack(noisy, self.context_slices, self.channels, name)
        h, w = noisy.shape[-2:]
        if min(h, w) < self.unet.size_factor:
            raise ValueError(f"{name} images must be at least {self.unet.size_factor} x {self.unet.size_factor} "
                             f"pixels (the UNet's size factor), got {h} x {w}")
        t0 = self.start_timestep(t_start, sigma)
        if t0 is not None and t_start == "auto" and float(sigma) == 0:
            warnings.warn("sigma=0: there is no noise to remove; the input is returned unchanged")
            return noisy[:, : self.channels].clone()
        steps = capped_steps(sampler, steps, t0)

        def chain(noisy_p):
            cond, image = self.chain_condition(noisy_p), noisy_p[:, : self.channels]  # the slice itself
            if t0 is None:
                x_T = torch.randn(image.shape, generator=generator, device=noisy.device, dtype=noisy.dtype)
            else:
                with self.ema_scope() if use_ema else nullcontext():
                    x_T = matched_start(self.diffusion, image, t0, start_noise, self.model_fn(cond, guidance_scale),
                                        generator)
            return self.run_sampler(x_T, cond, sampler=sampler, steps=steps, eta=eta, spacing=spacing, t_start=t0,
                                    guidance_scale=guidance_scale, generator=generator, use_ema=use_ema)

        return run_padded(chain, noisy, self.unet.size_factor)

    @staticmethod
    def check_ensemble(n_samples: int, t_start, sampler: str, eta: float | None, steps: int | None,
                       start_noise: str = "condition") -> None:
        """Refuse ``n_samples > 1`` where every sample would be the same: from the matched start
        (its noise being the input's) a DDIM chain with eta 0, or of one step, is deterministic."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if (n_samples > 1 and t_start is not None and start_noise == "condition" and sampler == "ddim"
                and (not eta or steps == 1)):
            raise ValueError(f"n_samples={n_samples} from the matched start with eta={eta or 0} and steps={steps} "
                             f"would draw {n_samples} identical samples (the chain is deterministic: eta 0, or one "
                             "step straight to x0); use eta > 0 and steps >= 2, start_noise='independent', "
                             "or n_samples=1")

    @torch.no_grad()
    def denoise_ensemble(self, noisy: torch.Tensor, n_samples: int, batch_size: int, return_std: bool, draw,
                         inference=None):
        """Mean (and per-pixel std with ``return_std``) of ``n_samples`` estimates per image,
        ``draw(chunk)`` giving one estimate per image of a chunk of ``batch_size`` images, the
        networks run with the ``inference`` options (``diffusion_utils.inference``)."""
        if noisy.ndim != 4:
            raise ValueError(f"noisy must be (B, C, H, W), got shape {tuple(noisy.shape)}")
        if not torch.isfinite(noisy).all():
            raise ValueError("noisy input contains NaN or inf values")
        check_stack(noisy, self.context_slices, self.channels)
        noisy = noisy.to(self.device, torch.float32)
        repeated = noisy.repeat_interleave(n_samples, dim=0)
        with optimized_networks((getattr(self, "unet", None), getattr(self, "unet_ema", None)), inference,
                                self.device):
            samples = torch.cat([draw(chunk) for chunk in repeated.split(batch_size)])
        samples = samples.reshape(noisy.shape[0], n_samples, *samples.shape[1:])
        mean = samples.mean(dim=1)
        if return_std:
            return mean, samples.std(dim=1, unbiased=False)
        return mean
