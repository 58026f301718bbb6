"""Build and train a model from a run config: logger, callbacks, checkpoints, saved config."""
from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from utils.atomic import atomic_write, remove_stale_temporaries
from orchestration.callbacks import ImageLogger, NonFiniteGuard, TrainingSpeed, ValidationScores
from orchestration.checkpoints import (CheckpointError, check_hyper_parameters, check_resume_hparams,
                                      checkpoint_model_class, read_checkpoint)
from utils.initialize_configs import ConfigError, instantiate_from_configs, validate_target_config
from orchestration.config_checks import LOGGERS, TRAINER_SPEED
from orchestration.resume import AtomicCheckpointIO, ExactResume
from orchestration.run_info import write_run_info
from utils.optim import FUSED_ADAMW
from utils.paths import check_name, resolve_path


def make_run_dir(cfg: DictConfig) -> Path:
    """A new ``<logging.save_dir>/<logging.name>-<timestamp>[-n]`` folder (save_dir relative
    to the repo root); ``logging.name`` must be a plain name (utils.paths.check_name)."""
    log = cfg.get("logging", {})
    name = check_name(log.get("name", "run"), "logging.name")
    stem = resolve_path(log.get("save_dir", "runs")) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = stem, 0
    while True:
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            if not stem.parent.is_dir():
                raise NotADirectoryError(f"logging.save_dir {stem.parent}: is not a folder") from None
            n += 1
            run_dir = stem.with_name(f"{stem.name}-{n}")
        except OSError as err:  # under a file, not writable
            raise type(err)(f"logging.save_dir {stem.parent}: cannot make the run folder there "
                            f"({err.strerror or err})") from err


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config atomically."""
    atomic_write(path, lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))


def build_logger(cfg: DictConfig, run_dir: Path):
    """The experiment logger of ``logging.logger``, writing into the run folder:
    ``wandb`` (default; ``<run>/wandb/``, offline unless ``logging.wandb_sync``),
    ``tensorboard`` (``<run>/tensorboard/``) or ``csv`` (``<run>/csv/version_0/metrics.csv``)."""
    log = cfg.get("logging", {})
    kind = log.get("logger", "wandb")
    if kind == "wandb":
        return WandbLogger(project=log.get("project", "cdm4mi"), name=run_dir.name, save_dir=str(run_dir),
                           offline=not log.get("wandb_sync", False))
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    if kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv")
    raise ConfigError(f"logging.logger: {kind!r} is not one of {', '.join(LOGGERS)}")


def build_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    """The Lightning trainer of a run config: its ``trainer`` keyword arguments, the logger of
    ``logging``, checkpoints into ``<run_dir>/checkpoints``, and the project's callbacks
    (validation PSNR/SSIM with the config's ``sampling`` section, orchestration/callbacks.py)."""
    log = cfg.get("logging", {})
    sampling = cfg.get("sampling")
    callbacks = [
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                        every_n_train_steps=log.get("checkpoint_every_n_steps", 1000)),
        LearningRateMonitor(logging_interval="step"),
        ImageLogger(every_n_steps=log.get("image_every_n_steps", 0)),
        ValidationScores(OmegaConf.to_container(sampling, resolve=True) if isinstance(sampling, DictConfig)
                         else dict(sampling or {})),
        TrainingSpeed(),
        NonFiniteGuard(),
        ExactResume(),  # random generator states in checkpoints (orchestration/resume.py)
    ]
    trainer_kwargs = OmegaConf.to_container(cfg.get("trainer", {}), resolve=True)
    for key in TRAINER_SPEED:  # the project's own keys (apply_training_speed), not Lightning's
        trainer_kwargs.pop(key, None)
    # every checkpoint goes to a temporary file first, then is renamed (orchestration/resume.py)
    plugins = [AtomicCheckpointIO(), *(trainer_kwargs.pop("plugins", None) or [])]
    try:
        return pl.Trainer(default_root_dir=str(run_dir), logger=build_logger(cfg, run_dir), callbacks=callbacks,
                          plugins=plugins, **trainer_kwargs)
    except (TypeError, ValueError, MisconfigurationException) as err:  # e.g. a GPU accelerator without a GPU
        raise ConfigError(f"trainer: {' '.join(str(err).split())}") from err


def widen_condition_input(weights: dict, model, found_k: int, path: Path) -> dict:
    """``weights`` of a UNet trained with ``found_k`` neighbouring slices, widened for
    ``model``'s larger k: the first convolution gets zero weights for the added condition
    channels. They come last in the input (cat([x_t, z, z-k..z+k]) and the UNet's fold keeps
    each channel's f*f block together), so the widened network ignores the new neighbours
    until training teaches it to use them."""
    conv = model.unet.conv_in.weight
    old = weights.get("conv_in.weight")
    if old is None or old.shape[0] != conv.shape[0] or old.shape[2:] != conv.shape[2:] or old.shape[1] >= conv.shape[1]:
        raise CheckpointError(f"init_from: {path}, a {found_k}-neighbour checkpoint, cannot start a "
                              f"{model.context_slices}-neighbour model: its first convolution does not fit")
    wide = torch.zeros_like(conv, dtype=old.dtype)
    wide[:, :old.shape[1]] = old
    print(f"init_from: {found_k} -> {model.context_slices} neighbouring slices: "
          f"{conv.shape[1] - old.shape[1]} input channels of the first convolution start at zero")
    return {**weights, "conv_in.weight": wide}


def init_weights(model, path: str | Path, allow_targets=None) -> None:
    """Start ``model`` from the network weights of the checkpoint ``path`` (a full training
    checkpoint, whose EMA weights are preferred, or an exported inference one).

    Only weights move: optimizer, schedule, step count and EMA count start fresh, and the
    EMA copy starts from the same weights. The checkpoint must hold the same model class
    and UNet shape as ``model``; otherwise a CheckpointError names the file. One exception:
    a checkpoint with fewer neighbouring slices (``context_slices``) than ``model`` starts
    the 2.5D model (widen_condition_input), so its first output equals the narrower model's.
    """
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: checkpoint not found: {path}")
    ckpt = read_checkpoint(path, path)
    check_hyper_parameters(ckpt, path, allow_targets)
    found = checkpoint_model_class(ckpt.get("hyper_parameters") or {})
    if type(model) is not found:
        raise CheckpointError(f"init_from: {path} holds a {found.__name__}, the run trains a {type(model).__name__}")
    state = ckpt.get("state_dict") or {}
    prefix = "unet_ema." if any(k.startswith("unet_ema.") for k in state) else "unet."
    weights = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    found_k = int((ckpt.get("hyper_parameters") or {}).get("context_slices", 0) or 0)
    if found_k < getattr(model, "context_slices", 0):
        weights = widen_condition_input(weights, model, found_k, path)
    try:
        model.unet.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"init_from: {path} does not fit the configured UNet: {str(err)[:300]}") from err
    if getattr(model, "use_ema", False):
        model.unet_ema.load_state_dict(model.unet.state_dict())
    print(f"initialized the network from {path} ({prefix.rstrip('.')} weights)")


def _pinned(make_loader):
    """A data module's loader method whose DataLoaders copy batches from pinned memory."""
    def make():
        loader = make_loader()
        loader.pin_memory = True  # read when an epoch's iterator starts
        return loader
    return make


def apply_training_speed(cfg: DictConfig, model, datamodule, on_cuda: bool) -> dict:
    """The training speed keys of ``trainer`` (``TRAINER_SPEED``), resolved: null ones on
    exactly when training on CUDA. Turns the UNet (and its EMA copy) channels_last, compiles
    the UNet in place (``nn.Module.compile``: the checkpoint's keys stay the same), pins the
    training and validation loaders' memory; fused AdamW is applied by ``train`` around the
    fit (``utils.optim.FUSED_ADAMW``). Returns the resolved values. On CPU with the defaults
    nothing changes."""
    given = cfg.get("trainer", {}) or {}
    speed = {key: given.get(key) for key in TRAINER_SPEED}
    for key in ("fused_adamw", "pin_memory"):
        speed[key] = on_cuda if speed[key] is None else bool(speed[key])
    speed["channels_last"], speed["compile_unet"] = bool(speed["channels_last"]), bool(speed["compile_unet"])
    unet = getattr(model, "unet", None)
    if speed["channels_last"] and unet is not None:
        for net in (unet, getattr(model, "unet_ema", None)):
            if net is not None:
                net.to(memory_format=torch.channels_last)
    if speed["compile_unet"] and unet is not None:
        unet.compile()
    if speed["pin_memory"]:
        for name in ("train_dataloader", "val_dataloader"):
            setattr(datamodule, name, _pinned(getattr(datamodule, name)))
    return speed


class TrainingStarted(Callback):
    """``started`` is True once the fit has taken an optimizer step (counted from where a
    resumed run restarts, whatever the callback order): a run that fails before that has
    nothing worth keeping (orchestration.run_job removes its folder)."""

    def __init__(self):
        self._trainer, self._first_step = None, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._trainer, self._first_step = trainer, trainer.global_step

    @property
    def started(self) -> bool:
        return self._trainer is not None and self._trainer.global_step > self._first_step


def check_resume_checkpoint(model, ckpt: dict, path: str | Path) -> None:
    """CheckpointError naming ``path`` unless the training checkpoint ``ckpt`` can continue
    ``model``: a full training checkpoint (optimizer and loop states, not an exported one)
    of the same model class, with the hyper-parameters its weights depend on
    (``check_resume_hparams``) and weights of the model's names and shapes."""
    if not {"optimizer_states", "loops"} <= set(ckpt):
        raise CheckpointError(f"--resume {path}: not a training checkpoint (no optimizer or loop state, e.g. an "
                              "exported one); start from its weights with init_from instead")
    found = checkpoint_model_class(ckpt.get("hyper_parameters") or {})
    if type(model) is not found:
        raise CheckpointError(f"--resume {path} holds a {found.__name__}, the run trains a {type(model).__name__}")
    check_resume_hparams(model, ckpt, f"--resume {path}")  # what Lightning's restore would refuse, now
    theirs = {k: tuple(v.shape) for k, v in (ckpt.get("state_dict") or {}).items() if hasattr(v, "shape")}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k} {theirs[k]} (configured {ours[k]})" for k in ours if k in theirs and theirs[k] != ours[k]]
    wrong += [f"{k} missing" for k in ours if k not in theirs] + [f"{k} not in the model" for k in theirs if k not in ours]
    if wrong:
        raise CheckpointError(f"--resume {path} does not fit the configured model ({len(wrong)} weight(s) differ: "
                              f"{'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})")


def _instantiate(node, section: str, allow):
    """``instantiate_from_configs``; a value its target's constructor refuses (a ValueError
    that does not name its key yet) is a ConfigError prefixed with ``<section>.params``."""
    try:
        return instantiate_from_configs(node, section, allow_targets=allow)
    except ValueError as err:
        if str(err).startswith(f"{section}."):
            raise
        raise ConfigError(f"{section}.params: {err}") from err


def build_run(cfg: DictConfig, resume: str | Path | None = None, ckpt: dict | None = None):
    """The (model, datamodule) ``train`` fits, built from the config's targets (checked
    against the allowlist first) after seeding with ``seed``: the model starts from
    ``init_from``'s weights, or is checked against the ``resume`` checkpoint (``ckpt``: its
    contents if already read). Writes nothing, so the main job builds them before it makes
    the run folder; every refusal is a ConfigError / CheckpointError / FileNotFoundError."""
    allow = cfg.get("allow_targets")  # extra target prefixes the run config permits
    validate_target_config(cfg.model, "model", allow_targets=allow)
    validate_target_config(cfg.data, "data", allow_targets=allow)
    seed = int(cfg.get("seed", 0))
    pl.seed_everything(seed, workers=True)
    datamodule = _instantiate(cfg.data, "data", allow)
    if hasattr(datamodule, "train_seed"):  # training order, noise and augmentation follow `seed`
        datamodule.train_seed = seed
    model = _instantiate(cfg.model, "model", allow)
    check_model = getattr(datamodule, "check_model", None)  # the stacks the model takes are the data's
    if check_model is not None:
        try:
            check_model(model)
        except ValueError as err:
            raise ConfigError(f"model.params.context_slices: {err}") from err
    if resume:
        check_resume_checkpoint(model, ckpt if ckpt is not None else read_checkpoint(resume, resume), resume)
    elif cfg.get("init_from"):
        init_weights(model, cfg.init_from, allow)
    return model, datamodule


def train(cfg: DictConfig, run_dir: Path, resume: str | Path | None = None, built=None, callbacks=()):
    """Fit ``cfg.model`` on ``cfg.data``, continuing from the checkpoint ``resume`` if given
    (weights, EMA, optimizer, schedule, step count, data position and random generator
    states: the run ends as an uninterrupted one would, orchestration/resume.py); returns
    (model with final weights, datamodule, last checkpoint). ``built``: the (model,
    datamodule) of ``build_run(cfg, resume)`` if already made; ``callbacks``: more trainer
    callbacks (e.g. a TrainingStarted)."""
    model, datamodule = built if built is not None else build_run(cfg, resume)
    if resume:  # temporaries of the killed run beside its checkpoint (utils/atomic.py)
        remove_stale_temporaries(Path(resume).parent)
    save_config(cfg, run_dir / "config.yaml")
    getattr(datamodule, "write_split", lambda path: None)(run_dir / "split.csv")  # <run>/split.csv: each volume's split
    run_info = write_run_info(run_dir)  # git commit (dirty or not) and versions: <run>/run_info.yaml
    trainer = build_trainer(cfg, run_dir)
    trainer.callbacks.extend(callbacks)
    speed = apply_training_speed(cfg, model, datamodule, trainer.strategy.root_device.type == "cuda")
    # the whole resolved run config and the run info (git commit) go to the logger (the
    # DataModule saves no hparams of its own, so checkpoints carry no data paths)
    trainer.logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "run_info": run_info})
    start = time.time()
    fused = FUSED_ADAMW.set(speed["fused_adamw"])  # read by configure_optimizers (utils/optim.py)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(ckpt)
    finally:
        FUSED_ADAMW.reset(fused)
        if isinstance(trainer.logger, WandbLogger):  # else a later run of this process (the U-Net
            trainer.logger.experiment.finish()     # baseline) would log into this wandb run
    print(f"trained {trainer.global_step} steps in {time.time() - start:.0f} s; checkpoint: {ckpt}")
    return model, datamodule, ckpt
