"""Gaussian diffusion math in plain torch: schedule coefficients, forward process,
parameterizations (eps, x0, v), clipping, posterior and min-SNR weights.

No Lightning here: the training loss, ancestral sampling and DDIM all call this one module,
the way a scheduler stands apart from the network and the trainer. Images are in model
units [-1, 1]; timesteps are integers 0..T-1 (t=0 least noisy, alpha_bar_0 = 1 - beta_0).
Coefficients are computed in float64 and stored as float32 buffers (not saved in
checkpoints: they follow from the betas).
"""
from __future__ import annotations

import numpy as np
import torch

PARAMETERIZATIONS = ("eps", "x0", "v")


def extract(buffer: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``buffer[t]`` and shape it (B, 1, ..., 1) to broadcast over an ndim tensor."""
    return buffer.gather(0, t.long()).reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(torch.nn.Module):
    """The forward process q(x_t | x0) of a beta schedule and the maps between network
    outputs and (x0, eps) for one ``parameterization``."""

    def __init__(self, betas: np.ndarray, parameterization: str = "eps"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization '{parameterization}' unknown; expected one of {PARAMETERIZATIONS}")
        self.parameterization = parameterization
        betas = np.asarray(betas, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        # alpha_bar at t = -1 (the clean end of the chain) is 1: index 0 of the *_prev arrays
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        post_var = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    # ------------------------------------------------------------------ coefficients
    def alpha_bar(self, t: int) -> torch.Tensor:
        """alpha_bar_t as a 0-d tensor; 1 for t < 0 (the clean end of the chain)."""
        if t < 0:
            return torch.ones((), device=self.alphas_cumprod.device)
        return self.alphas_cumprod[t]

    def noise_to_timestep(self, sigma: float) -> int:
        """Timestep whose sqrt((1 - a_bar) / a_bar) is closest to ``sigma`` in model units."""
        return int(self.noise_to_timesteps(torch.tensor([float(sigma)]))[0])

    def noise_to_timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """``noise_to_timestep`` for each entry of ``sigma`` (model units): a long tensor of
        its shape; ties go to the smaller timestep."""
        ratio = self.sqrt_recipm1_alphas_cumprod
        sigma = torch.as_tensor(sigma, dtype=ratio.dtype, device=ratio.device)
        return (ratio - sigma.reshape(-1, 1)).abs().argmin(dim=1).reshape(sigma.shape)

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023) of an L2 loss on this parameterization's target:
        min(SNR, gamma) / SNR for eps, / (SNR + 1) for v, min(SNR, gamma) for x0."""
        snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
        clipped = snr.clamp(max=gamma)
        return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.parameterization]

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) noise."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def noise_from_x_t(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise that q_sample(x0, t, noise) turns into x_t: (x_t - sqrt(a_bar) x0) / sqrt(1 - a_bar)."""
        return ((x_t - extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0)
                / extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim))

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(a_bar) eps - sqrt(1 - a_bar) x0."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: eps, x0 or v."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x0
        return self.velocity(x0, noise, t)

    # ------------------------------------------------------------------ network output -> (x0, eps)
    def split_prediction(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor):
        """Turn a network output into (x0, eps) according to the parameterization."""
        sa = extract(self.sqrt_alphas_cumprod, t, x_t.ndim)
        s1 = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        if self.parameterization == "eps":
            return (x_t - s1 * out) / sa, out
        if self.parameterization == "x0":
            return out, (x_t - sa * out) / s1
        return sa * x_t - s1 * out, s1 * x_t + sa * out

    def predict_start(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor, clip: bool):
        """(x0, eps) from a network output; with ``clip`` x0 is clamped to [-1, 1] and eps
        recomputed to match it (diffusers' ``use_clipped_model_output``)."""
        x0, eps = self.split_prediction(x_t, t, out)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = ((x_t - extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x0)
                   / extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim))
        return x0, eps

    # ------------------------------------------------------------------ reverse process
    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
                + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        return (mean, extract(self.posterior_variance, t, x_t.ndim),
                extract(self.posterior_log_variance_clipped, t, x_t.ndim))
