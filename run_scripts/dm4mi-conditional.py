"""Train a model from a YAML config, then evaluate it on the held-out test slices.

    python run_scripts/dm4mi-conditional.py --config run_scripts/configs/ddpm-cond/demo.yaml [key=value ...]

Overrides use OmegaConf's dotlist syntax (``trainer.max_steps=100``). The resolved config,
``run_info.yaml`` (git commit), checkpoints, the logger's files (``logging.logger``: wandb,
offline unless ``logging.wandb_sync=true``, tensorboard or csv) and the evaluation table
and figures go to ``<logging.save_dir>/<logging.name>-<timestamp>/``.

Exit status: 0 done; 2 a refused input (config key or value, missing or unreadable
volume or checkpoint, a checkpoint of another model), one line on stderr naming it, and no
run folder unless training had started; 1 training stopped on a NaN/inf loss or gradient
(the run folder and its checkpoints stay); any other failure is a bug with a traceback.
"""
from __future__ import annotations

import argparse
import sys


from utils.initialize_configs import load_config
from orchestration.cli import user_error_boundary
from orchestration.run_job import run_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--resume", help="checkpoint of an interrupted run to continue (optimizer, schedule, EMA)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    return user_error_boundary("dm4mi-conditional.py", lambda: run(args))


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # run_job checks it before anything is written
    try:
        run_job(cfg, resume=args.resume)
    except FloatingPointError as err:  # NaN/inf loss or gradient (orchestration.callbacks.NonFiniteGuard)
        raise SystemExit(f"training stopped: {err}") from err
    return 0


if __name__ == "__main__":
    sys.exit(main())
