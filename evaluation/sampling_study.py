"""How a conditional DDPM's result depends on the number of network calls (NFE), the start
of the reverse process and the number of averaged samples K, and how well the spread of the
samples tracks the real error (``run_scripts/sampling_study.py``). Body PSNR in dB on the
[0,1] scale."""
from __future__ import annotations

import numpy as np
import torch

from metrics.image_metrics import ImageMetrics, body_mask
from utils.intensity import from_model_units, to_model_units


def psnr(clean, pred, mask) -> float:
    return ImageMetrics().image_scores(clean, np.clip(pred, 0, 1), mask=mask)["psnr"]


def denoise01(model, noisy, sigma, **kw):
    """(mean, std) on the [0,1] scale of ``model.denoise`` on one [0,1] slice (H, W), or on
    a 2.5D model's (1+2k, H, W) stack of the slice and its neighbours, seed 0."""
    x = to_model_units(torch.from_numpy(np.asarray(noisy, dtype=np.float32)))
    x = x[None, None] if x.ndim == 2 else x[None]
    mean, std = model.denoise(x, sigma=sigma, return_std=True, generator=torch.Generator().manual_seed(0), **kw)
    return from_model_units(mean[0, 0].double().numpy()), std[0, 0].double().numpy() / 2


def study_slice(model, clean, noisy, sigma, nfe, k, k_steps: int, ancestral_from_noise: bool) -> dict:
    """{(row, NFE or K): body PSNR} of one slice, plus "calibration": (correlation of the
    per-pixel std with |error|, fraction of body pixels within 2 std) at the largest K.
    ``noisy``: the noisy slice (H, W), or its (1+2k, H, W) context stack (k = 0: one slice).

    Rows: DDIM (eta 0) from the matched start t* (each NFE up to t*+1) and from pure noise,
    ancestral DDPM from t* (t*+1 NFE) and, with ``ancestral_from_noise``, from pure noise
    (T NFE), the mean of K samples (eta 1, ``k_steps`` steps each, from t*)."""
    mask = body_mask(clean)
    t_star = model.start_timestep("auto", sigma)
    out = {}
    for n in nfe:
        if n <= t_star + 1:
            out[("DDIM eta 0 from t*", n)] = psnr(clean, denoise01(model, noisy, sigma, steps=n, t_start="auto")[0],
                                                  mask)
        out[("DDIM eta 0 from pure noise", n)] = psnr(clean, denoise01(model, noisy, sigma, steps=n)[0], mask)
    out[("ancestral DDPM from t*", t_star + 1)] = psnr(
        clean, denoise01(model, noisy, sigma, sampler="ddpm", t_start="auto")[0], mask)
    if ancestral_from_noise:
        out[("ancestral DDPM from pure noise", model.num_timesteps)] = psnr(
            clean, denoise01(model, noisy, sigma, sampler="ddpm")[0], mask)
    for kk in k:
        mean, std = denoise01(model, noisy, sigma, steps=k_steps, t_start="auto", eta=1.0, n_samples=kk)
        out[(f"mean of K, eta 1, {k_steps} steps", kk)] = psnr(clean, mean, mask)
    err = np.abs(np.clip(mean, 0, 1) - clean)[mask]
    spread = std[mask]
    out["calibration"] = (float(np.corrcoef(spread, err)[0, 1]), float(np.mean(err <= 2 * spread)))
    return out


def table(rows: list[dict], modality: str, key_name: str, keys) -> str:
    """Markdown: each row key's PSNR averaged over the slices that have it."""
    lines = [f"| {modality} | {key_name} | body PSNR (dB), mean over slices | slices |", "| --- | --- | --- | --- |"]
    for key in keys:
        vals = [r[key] for r in rows if key in r]
        if vals:
            lines.append(f"| {key[0]} | {key[1]} | {np.mean(vals):.2f} | {len(vals)} |")
    return "\n".join(lines)


def report(results: dict, k_max: int) -> str:
    """The study's tables per modality and the std map's calibration at K = ``k_max``."""
    parts = []
    for modality, rows in results.items():
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "calibration"))
        corr, within = np.mean([r["calibration"] for r in rows], axis=0)
        parts += ["", table(rows, modality.upper(), "NFE or K", keys), "",
                  f"{modality.upper()} std map at K={k_max}: correlation with |error| {corr:.2f}, "
                  f"body pixels with |error| <= 2 std: {within:.1%}"]
    return "\n".join(parts)
