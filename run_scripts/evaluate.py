r"""Evaluate denoisers on the held-out test slices of a run config.

    python run_scripts/evaluate.py --config run_scripts/configs/ddpm-cond/CFG.yaml \
        --ckpt path/to/ddpm.ckpt [--unet-ckpt path/to/unet.ckpt] [--out DIR] \
        [--model KEY=path/to/other.ckpt ...] \
        [evaluation.sigmas=[0.05,0.1,0.2] evaluation.max_slices_per_source=4 ...]

Builds the data module from the config's ``data`` section, loads the checkpoints (on
CPU, then moved to --device), builds the methods of ``evaluation.methods`` and writes
scores.csv, results.md, psnr_ssim_vs_sigma.png, examples.png and predictions/ into --out.
The shipped models named by evaluation.pretrained_ddpm and evaluation.unet_ckpt are
loaded too (the flags replace them). ``--model KEY=PATH`` loads more checkpoints (a
ConditionDDPM or a SupervisedUNet, as the file says) for methods with ``model: KEY``, so
several checkpoints are scored on the same noise in one table. Methods whose model is missing are skipped.

Exit status 2 with one line on stderr naming the input for a refused input (config key,
checkpoint, --model, a --device this machine lacks, an --out that cannot be written),
all found before the data are read.
"""

from __future__ import annotations

import argparse
from pathlib import Path



def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (data and evaluation sections)")
    parser.add_argument("--ckpt", help="conditional DDPM checkpoint (ConditionDDPM)")
    parser.add_argument("--unet-ckpt", help="supervised U-Net checkpoint (default: evaluation.unet_ckpt)")
    parser.add_argument("--pretrained-ckpt",
                        help="second ConditionDDPM for methods with model: ddpm_pretrained "
                             "(default: evaluation.pretrained_ddpm of the config)")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=PATH",
                        help="another checkpoint (ConditionDDPM or SupervisedUNet) for methods with "
                             "model: KEY (repeatable)")
    parser.add_argument("--out", help="output folder (default outputs/evaluation/<config name>)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cuda if available)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (OmegaConf dotlist)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from orchestration.cli import user_error_boundary

    return user_error_boundary("evaluate.py", lambda: run(args))


def run(args: argparse.Namespace) -> dict:
    from orchestration.evaluation_job import run_evaluation
    from models.ddpm_conditioned import ConditionDDPM
    from models.supervised_unet import SupervisedUNet
    from orchestration.checkpoints import load_checkpoint, pretrained_models
    from orchestration.cli import check_writable_folder, checked_device
    from orchestration.config_checks import check_evaluation_ready, check_run_config
    from utils.initialize_configs import load_config

    device = checked_device(args.device, "--device")
    cfg = load_config(args.config, args.overrides)
    check_run_config(cfg)
    if cfg.get("evaluation") is None:
        raise ValueError(f"{args.config}: the config has no evaluation section (levels and methods to score)")
    check_evaluation_ready(cfg.evaluation)
    allow = cfg.get("allow_targets")
    named = [("ddpm", ConditionDDPM, args.ckpt), ("unet", SupervisedUNet, args.unet_ckpt),
             ("ddpm_pretrained", ConditionDDPM, args.pretrained_ckpt)]
    for spec in args.model:
        key, sep, path = spec.partition("=")
        if not (sep and key and path):
            raise ValueError(f"--model {spec!r}: expected KEY=PATH")
        if key in {k for k, _, p in named if p}:
            raise ValueError(f"--model {spec!r}: the model key {key!r} is already given")
        named.append((key, None, path))
    out_dir = Path(args.out) if args.out else Path("outputs") / "evaluation" / Path(args.config).stem
    check_writable_folder(out_dir, "--out")
    replaced = {"pretrained_ddpm": args.pretrained_ckpt, "unet_ckpt": args.unet_ckpt}  # the flags win
    models = pretrained_models({k: v for k, v in cfg.evaluation.items() if not replaced.get(k)}, allow_targets=allow)
    for key, cls, path in named:
        if path:
            models[key] = load_checkpoint(cls, path, allow_targets=allow)
    result = run_evaluation(cfg, models, out_dir=out_dir, device=device)
    print(f"scores:      {result['scores_csv']}")
    print(f"table:       {result['results_md']}")
    print(f"plot:        {result['plot_png']}")
    print(f"examples:    {result['examples_png']}")
    print(f"predictions: {result['predictions_dir']}")
    return result


if __name__ == "__main__":
    main()
