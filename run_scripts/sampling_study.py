"""How a conditional DDPM's result depends on the number of network calls (NFE), the start of
the reverse process and the number of averaged samples K, and how well the spread of the
samples tracks the real error. Prints markdown tables (body PSNR in dB on the [0,1] scale).

    python run_scripts/sampling_study.py [--ckpt pretrained/cdm4mi_bundled_ct_mr.ckpt] \
        [--config run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml] [--sigma 0.1] [--slices 2] \
        [--nfe 1 2 5 10 20 50] [--k 1 2 4 8 16] [--k-steps 5] [--ancestral-slices 1]

Held-out test slices of the config's data (``--slices`` per volume, evenly spaced), Gaussian
noise seeded as the evaluation seeds it; a 2.5D checkpoint gets the slice's noisy
neighbours as the evaluation gives them. Rows: DDIM (eta 0) from the matched start t* and
from pure noise at each NFE (capped at t*+1 from t*), ancestral DDPM from t* (t*+1 NFE) and
from pure noise (T NFE, on ``--ancestral-slices`` slices per volume: the slowest row);
the mean of K samples (eta 1, ``--k-steps`` steps each, from t*); for the largest K the
correlation of the per-pixel std with the absolute error and the fraction of body pixels
whose error lies within 2 std.
"""
from __future__ import annotations

import argparse

import numpy as np

from diffusion_modules.diffusion_utils.noise import GaussianNoise
from evaluation.loop import NoisySlices
from evaluation.sampling_study import report, study_slice
from models.ddpm_conditioned import ConditionDDPM
from orchestration.checkpoints import load_checkpoint
from orchestration.cli import user_error_boundary
from orchestration.evaluation_job import limit_slices
from utils.initialize_configs import instantiate_from_configs, load_config


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
    return user_error_boundary("sampling_study.py", lambda: run(args))


def run(args: argparse.Namespace) -> dict:
    model = load_checkpoint(ConditionDDPM, args.ckpt)
    cfg = load_config(args.config)
    datamodule = instantiate_from_configs(cfg.data, "data", allow_targets=cfg.get("allow_targets"))
    slices = limit_slices(datamodule.test_slices(), args.slices)
    noise = GaussianNoise(sigma=args.sigma)
    results, seen = {}, {}
    noisy_slices = NoisySlices(noise, args.seed, args.sigma)  # the evaluation's noise, neighbours included
    for s in slices:
        clean = s["clean"].astype(np.float64)
        noisy = noisy_slices.context(s, model.context_slices)  # (1+2k, H, W), the slice first
        seen[s["source"]] = seen.get(s["source"], 0) + 1
        row = study_slice(model, clean, noisy, args.sigma, args.nfe, args.k, args.k_steps,
                          seen[s["source"]] <= args.ancestral_slices)
        results.setdefault(s["modality"], []).append(row)
    print(f"sigma {args.sigma:g} on the [0,1] scale, t* = {model.start_timestep('auto', args.sigma)}, "
          f"checkpoint {args.ckpt}")
    print(report(results, max(args.k)))
    return results


if __name__ == "__main__":
    main()
