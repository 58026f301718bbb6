"""Noise schedules beta_1..beta_T for DDPMs.

Names follow latent-diffusion; their diffusers equivalents are given for reference:

- ``linear``: linear in sqrt(beta) from ``linear_start`` to ``linear_end`` (diffusers
  ``scaled_linear``); the reference experiment uses 1e-4 .. 2e-2.
- ``sqrt_linear``: linear in beta (diffusers ``linear``).
- ``sqrt``: sqrt of a linear ramp.
- ``cosine``: Nichol & Dhariwal's cosine alpha_bar with offset ``cosine_s``, betas capped
  at 0.999 (diffusers ``squaredcos_cap_v2``).
- explicit: pass ``betas`` (any sequence in (0, 1)).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SCHEDULES = ("linear", "sqrt_linear", "sqrt", "cosine")


def make_beta_schedule(schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3,
                       betas: Sequence[float] | None = None) -> np.ndarray:
    """Return betas as a float64 array of length ``timesteps``."""
    if betas is not None:
        out = np.asarray(betas, dtype=np.float64)
        if out.ndim != 1 or len(out) == 0:
            raise ValueError(f"explicit betas must be a non-empty 1-D sequence, got shape {out.shape}")
        if not np.all((out > 0) & (out < 1)):
            raise ValueError("explicit betas must all lie in (0, 1)")
        return out
    if int(timesteps) != timesteps or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps}")
    if schedule == "linear":
        out = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    elif schedule == "sqrt_linear":
        out = np.linspace(linear_start, linear_end, timesteps, dtype=np.float64)
    elif schedule == "sqrt":
        out = np.linspace(linear_start, linear_end, timesteps, dtype=np.float64) ** 0.5
    elif schedule == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        out = np.array([min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
                        for i in range(timesteps)], dtype=np.float64)
    else:
        raise ValueError(f"unknown beta schedule '{schedule}'; expected one of {SCHEDULES} or explicit betas")
    return out
