"""The main job: train the configured model, then evaluate it against the baselines."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from models.ddpm_conditioned import ConditionDDPM
from models.supervised_unet import SupervisedUNet
from utils.checkpoints import load_checkpoint
from utils.initialize_configs import load_config
from utils.paths import resolve_path
from utils.training import make_run_dir, train


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
    if resume is not None and not Path(resume).is_file():
        raise FileNotFoundError(f"checkpoint to resume not found: {resume}")
    run_dir = make_run_dir(cfg)
    model, _, ckpt = train(cfg, run_dir, resume=resume)
    result = {"run_dir": run_dir, "checkpoint": ckpt}
    ev = cfg.get("evaluation")
    if ev is None or not ev.get("enabled", True):
        print(f"run folder: {run_dir}\ncheckpoint: {ckpt}")
        return result
    from metrics.evaluation import run_evaluation

    models = {"unet" if isinstance(model, SupervisedUNet) else "ddpm": model.eval()}
    if ev.get("unet_config") and "unet" not in models:
        models["unet"] = train_unet_baseline(cfg, run_dir)
    if ev.get("unet_ckpt"):
        models["unet"] = load_checkpoint(SupervisedUNet, ev.unet_ckpt)
    if ev.get("pretrained_ddpm"):
        models["ddpm_pretrained"] = load_checkpoint(ConditionDDPM, ev.pretrained_ddpm)
    outputs = run_evaluation(cfg, models, out_dir=run_dir / "evaluation")
    result.update(outputs)
    print(f"run folder:  {run_dir}\ncheckpoint:  {ckpt}\nconfig:      {run_dir / 'config.yaml'}")
    for key in ("results_md", "scores_csv", "plot_png", "examples_png", "predictions_dir"):
        print(f"{key + ':':<13}{outputs[key]}")
    return result
