"""DDIM sampling (Song et al. 2021) for any DDPM of this project, conditional or not.

Works with eps, x0 and v parameterizations, any number of steps from 1 to t_start+1,
``eta`` between 0 (deterministic) and 1 (ancestral-like), classifier-free guidance and a
start from a given x_t at a given timestep (the matched start used for denoising).
"""
from __future__ import annotations

import numpy as np
import torch

SPACINGS = ("uniform", "quad", "trailing")


def ddim_timesteps(steps: int, t_start: int, spacing: str = "uniform") -> list[int]:
    """Strictly decreasing timesteps, the first being ``t_start``.

    ``uniform`` spreads them evenly down to 0, ``quad`` packs them quadratically near 0,
    ``trailing`` takes every (t_start+1)/steps-th step counted from t_start (it ends
    above 0 unless steps = t_start+1).
    """
    if not 1 <= steps <= t_start + 1:
        raise ValueError(f"steps must lie in [1, {t_start + 1}] when starting at t={t_start}, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing '{spacing}' unknown; expected one of {SPACINGS}")
    if steps == 1:
        return [t_start]
    if spacing == "uniform":
        ts = np.round(np.linspace(t_start, 0, steps)).astype(int)
    elif spacing == "quad":
        ts = np.round(t_start * np.linspace(1, 0, steps) ** 2).astype(int)
    else:
        ts = t_start - np.floor(np.arange(steps) * (t_start + 1) / steps).astype(int)
    # Rounding can collide at dense ends: push each step strictly below its predecessor,
    # then keep every step at least as high as the number of steps still to come.
    ts = list(ts)
    for i in range(1, steps):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    for i in range(steps - 1, -1, -1):
        ts[i] = max(ts[i], steps - 1 - i, ts[i + 1] + 1 if i + 1 < steps else 0)
    return [int(t) for t in ts]


class DDIMSampler:
    """DDIM sampler for a :class:`models.ddpm_st_diffusion.DDPM` (or subclass): the network
    comes from ``model.model_output``, the math from ``model.diffusion``."""

    def __init__(self, model):
        self.model = model
        self.diffusion = model.diffusion

    def step(self, model_output: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor, eta: float = 0.0,
             clip: bool | None = None, generator: torch.Generator | None = None):
        """One DDIM update x_t -> x_{t_prev}; returns (x_prev, x0_pred) like diffusers' step().

        ``clip`` (default: the model's ``clip_denoised``) clamps x0 to [-1, 1] and recomputes
        eps from it; t_prev = -1 is the clean end of the chain (alpha_bar = 1).
        """
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        x0, eps = self.diffusion.predict_start(x_t, tt, model_output,
                                               self.model.clip_denoised if clip is None else clip)
        a_t, a_prev = self.diffusion.alpha_bar(t), self.diffusion.alpha_bar(t_prev)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return x_prev, x0

    @torch.no_grad()
    def sample(self, x_T: torch.Tensor, cond: torch.Tensor | None = None, steps: int = 50, eta: float = 0.0,
               t_start: int | None = None, spacing: str = "uniform", guidance_scale: float = 1.0,
               clip: bool | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the chain from ``x_T`` at ``t_start`` (default T-1) and return x_0 in [-1, 1]."""
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: ancestral-like), got {eta}")
        t_start = self.diffusion.num_timesteps - 1 if t_start is None else int(t_start)
        ts = ddim_timesteps(steps, t_start, spacing)
        x = x_T
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            out = self.model.model_output(x, tt, cond, guidance_scale)
            x, _ = self.step(out, t, t_prev, x, eta, clip, generator)
        return x
