r"""The conditioning / guidance study of docs/STUDY.md: which strategy at which noise level.

    python run_scripts/study.py --config run_scripts/configs/study/reduced_cpu.yaml \
        [--out docs/results/study_cpu] [--device cpu|cuda] [key=value ...]
    python run_scripts/study.py --config run_scripts/configs/study/full_gpu.yaml --estimate

Trains (or loads) the models the study config names, scores every strategy at every
NFE, K and guidance scale on every noise type (same-subject test slabs and the unseen
test volumes), compares each per slice with the references (mean difference, 95 %
bootstrap interval, Wilcoxon p) and writes study.md, comparisons.csv, per-noise-type
scores.csv and the figures into --out. See orchestration/study.py for the config keys.
A refused input (study config, a --device this machine lacks, an --out that cannot be
written) is one line on stderr naming it and exit status 2, before any model is trained.
``--estimate`` prints the predicted time of the config on one H100/H200-class GPU and the
figures it rests on (orchestration/study_estimate.py), and runs nothing.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path



def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="study config YAML (run_scripts/configs/study/)")
    parser.add_argument("--out", help="output folder (default outputs/study/<config name>)")
    parser.add_argument("--device", help="cpu, cuda ... (default cuda if available)")
    parser.add_argument("--estimate", action="store_true", help="print the predicted GPU time and run nothing")
    parser.add_argument("overrides", nargs="*", help="study config overrides key=value (OmegaConf dotlist)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from orchestration.cli import user_error_boundary

    return user_error_boundary("study.py", lambda: run(args))


def run(args: argparse.Namespace) -> dict:
    from orchestration.cli import check_writable_folder, checked_device
    from orchestration.study import load_study_config, run_study

    if args.estimate:
        from orchestration.study_estimate import estimate

        result = estimate(load_study_config(args.config, args.overrides))
        print(f"# Estimate: {args.config}\n\n" + "\n".join(result["lines"]))
        return result
    device = checked_device(args.device, "--device")
    study = load_study_config(args.config, args.overrides)
    out_dir = check_writable_folder(Path(args.out) if args.out else Path("outputs") / "study" / Path(args.config).stem,
                                    "--out")
    start = time.time()
    paths = run_study(study, out_dir, device=device)
    print(f"study finished in {time.time() - start:.0f} s")
    for key, path in paths.items():
        print(f"{key + ':':<20}{path}")
    return paths


if __name__ == "__main__":
    main()
