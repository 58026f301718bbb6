"""How a conditional DDPM's result depends on the number of network calls (NFE), the start of
the reverse process and the number of averaged samples K, and how well the spread of the
samples tracks the real error. Prints markdown tables (body PSNR in dB on the [0,1] scale).

    python run_scripts/sampling_study.py [--ckpt pretrained/cdm4mi_bundled_ct_mr.ckpt] \
        [--config run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml] [--sigma 0.1] [--slices 2] \
        [--nfe 1 2 5 10 20 50] [--k 1 2 4 8 16] [--k-steps 5] [--ancestral-slices 1]

Held-out test slices of the config's data (``--slices`` per volume, evenly spaced), Gaussian
noise seeded as the evaluation seeds it. Rows: DDIM (eta 0) from the matched start t* and
from pure noise at each NFE (capped at t*+1 from t*), ancestral DDPM from t* (t*+1 NFE) and
from pure noise (T NFE, on ``--ancestral-slices`` slices per volume: the slowest row);
the mean of K samples (eta 1, ``--k-steps`` steps each, from t*); for the largest K the
correlation of the per-pixel std with the absolute error and the fraction of body pixels
whose error lies within 2 std.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics.evaluation import noise_rng  # noqa: E402
from metrics.image_metrics import ImageMetrics, body_mask  # noqa: E402
from models.ddpm_conditioned import ConditionDDPM  # noqa: E402
from orchestration.checkpoints import load_checkpoint  # noqa: E402
from orchestration.evaluation_job import limit_slices  # noqa: E402
from utils.initialize_configs import instantiate_from_configs, load_config  # noqa: E402


def psnr(clean, pred, mask) -> float:
    return ImageMetrics().image_scores(clean, np.clip(pred, 0, 1), mask=mask)["psnr"]


def run(model, clean, noisy, sigma, **kw):
    """(mean, std) on the [0,1] scale of model.denoise on one slice."""
    x = torch.from_numpy(2.0 * noisy - 1.0)[None, None]
    mean, std = model.denoise(x, sigma=sigma, return_std=True, generator=torch.Generator().manual_seed(0), **kw)
    return (mean[0, 0].double().numpy() + 1) / 2, std[0, 0].double().numpy() / 2


def study_slice(model, clean, noisy, sigma, args, ancestral_from_noise: bool) -> dict:
    mask = body_mask(clean)
    t_star = model.start_timestep("auto", sigma)
    out = {}
    for nfe in args.nfe:
        if nfe <= t_star + 1:
            out[("DDIM eta 0 from t*", nfe)] = psnr(clean, run(model, clean, noisy, sigma, steps=nfe, t_start="auto")[0], mask)
        out[("DDIM eta 0 from pure noise", nfe)] = psnr(clean, run(model, clean, noisy, sigma, steps=nfe)[0], mask)
    out[("ancestral DDPM from t*", t_star + 1)] = psnr(
        clean, run(model, clean, noisy, sigma, sampler="ddpm", t_start="auto")[0], mask)
    if ancestral_from_noise:
        out[("ancestral DDPM from pure noise", model.num_timesteps)] = psnr(
            clean, run(model, clean, noisy, sigma, sampler="ddpm")[0], mask)
    for k in args.k:
        mean, std = run(model, clean, noisy, sigma, steps=args.k_steps, t_start="auto", eta=1.0, n_samples=k)
        out[(f"mean of K, eta 1, {args.k_steps} steps", k)] = psnr(clean, mean, mask)
    err = np.abs(np.clip(mean, 0, 1) - clean)[mask]
    spread = std[mask]
    out["calibration"] = (float(np.corrcoef(spread, err)[0, 1]), float(np.mean(err <= 2 * spread)))
    return out


def table(rows: list[dict], modality: str, key_name: str, keys) -> str:
    lines = [f"| {modality} | {key_name} | body PSNR (dB), mean over slices | slices |", "| --- | --- | --- | --- |"]
    for key in keys:
        vals = [r[key] for r in rows if key in r]
        if vals:
            lines.append(f"| {key[0]} | {key[1]} | {np.mean(vals):.2f} | {len(vals)} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="pretrained/cdm4mi_bundled_ct_mr.ckpt")
    parser.add_argument("--config", default="run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml")
    parser.add_argument("--sigma", type=float, default=0.1, help="Gaussian noise std on the [0,1] scale")
    parser.add_argument("--slices", type=int, default=2, help="test slices per volume")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--k-steps", type=int, default=5)
    parser.add_argument("--ancestral-slices", type=int, default=1, help="slices per volume for the T-step row")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (as evaluation.noise_seed)")
    args = parser.parse_args(argv)
    model = load_checkpoint(ConditionDDPM, args.ckpt)
    cfg = load_config(args.config)
    datamodule = instantiate_from_configs(cfg.data, "data", allow_targets=cfg.get("allow_targets"))
    slices = limit_slices(datamodule.test_slices(), args.slices)
    results, seen = {}, {}
    for i, s in enumerate(slices):
        clean = s["clean"].astype(np.float64)
        noisy = (clean + args.sigma * noise_rng(args.seed, args.sigma, i).standard_normal(clean.shape)).astype(np.float32)
        seen[s["source"]] = seen.get(s["source"], 0) + 1
        row = study_slice(model, clean, noisy, args.sigma, args, seen[s["source"]] <= args.ancestral_slices)
        results.setdefault(s["modality"], []).append(row)
    print(f"sigma {args.sigma:g} on the [0,1] scale, t* = {model.start_timestep('auto', args.sigma)}, "
          f"checkpoint {args.ckpt}")
    for modality, rows in results.items():
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "calibration"))
        print()
        print(table(rows, modality.upper(), "NFE or K", keys))
        corr, within = np.mean([r["calibration"] for r in rows], axis=0)
        print(f"\n{modality.upper()} std map at K={max(args.k)}: correlation with |error| {corr:.2f}, "
              f"body pixels with |error| <= 2 std: {within:.1%}")
    return results


if __name__ == "__main__":
    main()
