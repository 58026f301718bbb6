"""The main job: train the configured model, then evaluate it against the baselines."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from models.supervised_unet import SupervisedUNet
from orchestration.checkpoints import pretrained_models, read_checkpoint
from orchestration.config_checks import check_run_config
from orchestration.evaluation_job import checked_test_volumes, run_evaluation
from orchestration.training import make_run_dir, train
from utils.initialize_configs import load_config
from utils.paths import resolve_path


def train_unet_baseline(cfg: DictConfig, run_dir: Path) -> SupervisedUNet:
    """Train the supervised U-Net of ``evaluation.unet_config`` on this run's data and seed."""
    ucfg = load_config(resolve_path(cfg.evaluation.unet_config))
    ucfg.data, ucfg.seed = cfg.data, cfg.seed
    ucfg.logging = OmegaConf.merge(cfg.get("logging", {}), {"name": "unet"})
    unet_dir = run_dir / "unet"
    unet_dir.mkdir()
    model, _, _ = train(ucfg, unet_dir)
    return model.eval()


def run_job(cfg: DictConfig, resume: str | Path | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` (continuing ``resume`` if given); evaluate when
    ``evaluation.enabled``. Returns the paths written."""
    check_run_config(cfg)  # every key, before anything is written
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"checkpoint to resume not found: {resume}")
    if resume is not None:
        read_checkpoint(resume, resume)  # an empty or truncated file: a CheckpointError naming it, no run folder
    if cfg.get("init_from") and not resolve_path(cfg.init_from).is_file():
        raise FileNotFoundError(f"init_from: checkpoint not found: {resolve_path(cfg.init_from)}")
    ev = cfg.get("evaluation")
    evaluate = ev is not None and ev.get("enabled", True)
    models = pretrained_models(ev, cfg.get("allow_targets")) if evaluate else {}  # a missing checkpoint fails before training
    if evaluate:
        checked_test_volumes(cfg)  # a test volume that is also a training volume fails before training
    run_dir = make_run_dir(cfg)
    model, _, ckpt = train(cfg, run_dir, resume=resume)
    result = {"run_dir": run_dir, "checkpoint": ckpt}
    if not evaluate:
        print(f"run folder: {run_dir}\ncheckpoint: {ckpt}")
        return result
    models["unet" if isinstance(model, SupervisedUNet) else "ddpm"] = model.eval()
    if ev.get("unet_config") and not isinstance(model, SupervisedUNet):
        models["unet"] = train_unet_baseline(cfg, run_dir)
    outputs = run_evaluation(cfg, models, out_dir=run_dir / "evaluation")
    result.update(outputs)
    print(f"run folder:  {run_dir}\ncheckpoint:  {ckpt}\nconfig:      {run_dir / 'config.yaml'}")
    for key in ("results_md", "scores_csv", "plot_png", "examples_png", "predictions_dir"):
        print(f"{key + ':':<13}{outputs[key]}")
    return result
