"""The main job: train the configured model, then evaluate it against the baselines."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffusion_modules.diffusion_utils.manifest import expand_volumes
from models.supervised_unet import SupervisedUNet
from orchestration.checkpoints import pretrained_models, read_checkpoint
from orchestration.cli import USER_ERRORS
from orchestration.config_checks import MAIN_JOB_MODEL_KEYS, check_evaluation_ready, check_run_config
from orchestration.evaluation_job import checked_test_volumes, run_evaluation
from orchestration.training import TrainingStarted, build_run, make_run_dir, train
from utils.initialize_configs import ConfigError, load_config, validate_target_config
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


def remove_run_dir(run_dir: Path, save_dir_existed: bool) -> None:
    """Remove the folder of a run that failed before its first trained batch, and the
    ``logging.save_dir`` made for it when it is empty now."""
    shutil.rmtree(run_dir, ignore_errors=True)
    if run_dir.exists():
        print(f"could not remove the run folder {run_dir} of the failed run", file=sys.stderr)
    elif not save_dir_existed:
        try:
            run_dir.parent.rmdir()
        except OSError:
            pass


def check_training_volumes(cfg: DictConfig) -> None:
    """FileNotFoundError naming the entry of ``data.params.volumes`` whose file is missing, a
    ValueError naming the glob or manifest rows that are wrong (manifest.expand_volumes)."""
    volumes = ((cfg.get("data") or {}).get("params") or {}).get("volumes") or []
    if volumes:
        expand_volumes(volumes, must_exist=True)


def prepare_job(cfg: DictConfig, resume: str | Path | None = None) -> dict:
    """Everything the job checks and builds before it makes the run folder, so that a bad
    input writes nothing: every config key (evaluation methods included), the ``resume`` and
    ``init_from`` checkpoints against the model built from the config, the data module
    built and its volume files present, the U-Net baseline's config, the shipped models and
    the test volumes of the evaluation. Returns ``built`` (model, datamodule), ``evaluate``,
    the loaded ``models`` and the checked test volumes ``tests``."""
    check_run_config(cfg)  # every key, before anything is written
    ckpt = None
    if resume is not None:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"checkpoint to resume not found: {resume}")
        ckpt = read_checkpoint(resume, resume)  # an empty or truncated file: a CheckpointError naming it
    if cfg.get("init_from") and not resolve_path(cfg.init_from).is_file():
        raise FileNotFoundError(f"init_from: checkpoint not found: {resolve_path(cfg.init_from)}")
    check_training_volumes(cfg)
    ev = cfg.get("evaluation")
    evaluate = ev is not None and ev.get("enabled", True)
    models, tests = {}, None
    if evaluate:
        check_evaluation_ready(ev, model_keys=MAIN_JOB_MODEL_KEYS)
        models = pretrained_models(ev, cfg.get("allow_targets"))  # a missing checkpoint fails before training
        tests = checked_test_volumes(cfg)  # a test volume that is also a training volume fails before training
    # Last, so that nothing draws from the random generators between the seeding and the model's
    # initialisation in build_run and the training (loading the shipped models above does): the
    # run trains exactly as train(cfg) alone would. The model of another width than init_from's /
    # resume's is refused here.
    built = build_run(cfg, resume, ckpt)
    if evaluate and ev.get("unet_config") and not isinstance(built[0], SupervisedUNet):
        ucfg = load_config(resolve_path(ev.unet_config))
        check_run_config(ucfg)
        validate_target_config(ucfg.model, "model", allow_targets=cfg.get("allow_targets"))
        unet_k = (ucfg.model.get("params") or {}).get("context_slices", 0)
        data_k = (cfg.data.get("params") or {}).get("context_slices", 0)
        if unet_k != data_k:  # the baseline trains on this run's data after the DDPM: refuse it now
            raise ConfigError(f"evaluation.unet_config {ev.unet_config}: its model's context_slices is {unet_k}, "
                              f"this run's data.params.context_slices is {data_k}; use a U-Net config of the same "
                              "stacks (e.g. configs/unet/bundled_ct_mr_unet_context.yaml for 1)")
    return {"built": built, "evaluate": evaluate, "models": models, "tests": tests}


def run_job(cfg: DictConfig, resume: str | Path | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` (continuing ``resume`` if given); evaluate when
    ``evaluation.enabled``. Returns the paths written.

    A bad input is refused before the run folder is made (``prepare_job``); one found
    later (a volume that cannot be converted, a batch size the loader refuses), but before
    the first trained batch, removes the run folder again. A run that trained a batch keeps
    its folder whatever happens."""
    job = prepare_job(cfg, resume)
    ev, evaluate, models = cfg.get("evaluation"), job["evaluate"], job["models"]
    save_dir_existed = resolve_path(cfg.get("logging", {}).get("save_dir", "runs")).is_dir()
    run_dir = make_run_dir(cfg)
    started = TrainingStarted()
    try:
        model, _, ckpt = train(cfg, run_dir, resume=resume, built=job["built"], callbacks=[started])
    except USER_ERRORS:
        if not started.started:
            remove_run_dir(run_dir, save_dir_existed)
        raise
    result = {"run_dir": run_dir, "checkpoint": ckpt}
    if not evaluate:
        print(f"run folder: {run_dir}\ncheckpoint: {ckpt}")
        return result
    models["unet" if isinstance(model, SupervisedUNet) else "ddpm"] = model.eval()
    if ev.get("unet_config") and not isinstance(model, SupervisedUNet):
        models["unet"] = train_unet_baseline(cfg, run_dir)
    outputs = run_evaluation(cfg, models, out_dir=run_dir / "evaluation", tests=job["tests"])
    result.update(outputs)
    print(f"run folder:  {run_dir}\ncheckpoint:  {ckpt}\nconfig:      {run_dir / 'config.yaml'}")
    for key in ("results_md", "scores_csv", "plot_png", "examples_png", "predictions_dir"):
        print(f"{key + ':':<13}{outputs[key]}")
    return result
