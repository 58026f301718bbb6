"""How well ``--sigma auto`` recovers a known noise level: Gaussian and Rician noise added to
the held-out test slices of a config's data, estimated per volume (median over slices of
the wavelet estimate, diffusion_modules/diffusion_utils/noise_level.py) over the whole
slice and over the foreground only (what run_scripts/denoise.py uses for MR). Prints a
markdown table.

    python run_scripts/noise_estimate_accuracy.py [--config run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml]
"""
from __future__ import annotations

import argparse

import numpy as np


from diffusion_modules.diffusion_utils.noise import noise_at_level
from diffusion_modules.diffusion_utils.noise_level import estimate_noise_sigma
from utils.initialize_configs import instantiate_from_configs, load_config

SIGMAS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="run_scripts/configs/ddpm-cond/bundled_ct_mr.yaml")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    datamodule = instantiate_from_configs(cfg.data, "data", allow_targets=cfg.get("allow_targets"))
    by_source = {}
    for s in datamodule.test_slices():
        by_source.setdefault(s["source"], []).append(s["clean"])
    rows = []
    print("| volume | noise | true sigma | whole slice | error | foreground | error |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for source, slices in sorted(by_source.items()):
        for noise_type in ("gaussian", "rician"):
            for sigma in SIGMAS:
                rng = np.random.default_rng([args.seed, int(sigma * 1e6)])
                model = noise_at_level(noise_type, sigma)
                noisy = np.stack([model(clean, rng)[0] for clean in slices])
                whole, fg = estimate_noise_sigma(noisy), estimate_noise_sigma(noisy, foreground=True)
                rows.append({"source": source, "noise": noise_type, "sigma": sigma, "estimate": whole,
                             "estimate_foreground": fg})
                print(f"| {source} ({len(slices)} slices) | {noise_type} | {sigma:g} | {whole:.4f} | "
                      f"{(whole - sigma) / sigma:+.1%} | {fg:.4f} | {(fg - sigma) / sigma:+.1%} |")
    return rows


if __name__ == "__main__":
    main()
