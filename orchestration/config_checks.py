"""Every key of a run config checked against what reads it, before anything is written.

``model`` and ``data`` are checked by their targets' signatures (utils.initialize_configs);
this module checks the other sections: ``trainer`` against ``lightning.Trainer``,
``sampling`` as ``SamplingOptions``, ``logging`` and ``evaluation`` against the
keys the orchestration reads, each ``evaluation.methods`` entry against what builds the
method (``check_methods``), the DenoisingDataModule's sizes against 1. A misspelt key names
the close matches; a value of the wrong type names the key and the expected type. Names that become file or folder names
(``logging.name``, the ``name`` of a volume in ``data.params.volumes`` or
``evaluation.test_volumes``) are checked by ``utils.paths.check_name``.
"""
from __future__ import annotations

import difflib
import inspect

import lightning.pytorch as pl
from omegaconf import OmegaConf

from diffusion_modules.diffusion_utils.noise import NOISE_TYPES
from diffusion_modules.diffusion_utils.sampling import SamplingOptions
from evaluation.denoisers import DENOISER_TYPES, METHOD_SETS, BM3DDenoiser, BM4DDenoiser, NLMDenoiser, NoisyInput
from models.supervised_unet import SupervisedUNet
from utils.config_keys import NUMBER, check_keys
from utils.initialize_configs import ConfigError
from utils.paths import check_name

PATH = str  # a file path in a config (relative to the repository root)
#: key -> accepted types (None: null allowed) of the sections the orchestration reads itself
LOGGING = {"save_dir": (PATH,), "name": (str,), "logger": (str,), "wandb_sync": (bool,), "project": (str,),
           "checkpoint_every_n_steps": (int,), "image_every_n_steps": (int,)}
#: the experiment loggers ``logging.logger`` may name (orchestration.training.build_logger)
LOGGERS = ("wandb", "tensorboard", "csv")
EVALUATION = {"enabled": (bool,), "sigmas": (list,), "levels": (list,), "noise_seed": (int,), "noise_type": (str,),
              "noise_params": (dict, None), "max_slices_per_source": (int, None), "n_examples": (int,),
              "save_predictions": (bool,), "unet_config": (PATH, None), "unet_ckpt": (PATH, None),
              "pretrained_ddpm": (PATH, None), "methods": (list,), "test_volumes": (list, None)}
#: lightning.Trainer arguments whose values are plain numbers or flags
TRAINER_TYPES = {"max_steps": (int,), "max_epochs": (int, None), "min_steps": (int, None),
                 "log_every_n_steps": (int, None), "check_val_every_n_epoch": (int, None),
                 "val_check_interval": (*NUMBER, None), "limit_val_batches": (*NUMBER, None),
                 "limit_train_batches": (*NUMBER, None), "num_sanity_val_steps": (int, None),
                 "accumulate_grad_batches": (int,), "gradient_clip_val": (*NUMBER, None),
                 "enable_progress_bar": (bool, None), "enable_checkpointing": (bool, None),
                 "deterministic": (bool, str, None), "num_nodes": (int,)}
#: the project's training speed keys of ``trainer`` (orchestration.training.apply_training_speed;
#: removed before lightning.Trainer): null = automatic (on when training on CUDA)
TRAINER_SPEED = {"fused_adamw": (bool, None), "pin_memory": (bool, None), "channels_last": (bool,),
                 "compile_unet": (bool,)}


#: keys of an ``evaluation.methods`` entry (evaluation.denoisers.build_denoiser) and their types
METHOD = {"name": (str,), "type": (str,), "model": (str,), "params": (dict, None), "sigma": (str,),
          "sets": (list, None)}
#: the model keys the main job can load: its own model, the U-Net baseline, the shipped DDPM
MAIN_JOB_MODEL_KEYS = ("ddpm", "unet", "ddpm_pretrained")
#: the DataModule whose size parameters are range-checked (patch side, stride, step, batch)
DATA_MODULE = "diffusion_modules.diffusion_utils.datamodule.DenoisingDataModule"
POSITIVE_DATA_PARAMS = ("image_size", "stride", "slice_step", "batch_size")


def _parameters(func, *skip: str) -> set:
    return set(inspect.signature(func).parameters) - {"self", *skip}


def _method_params() -> dict:
    """type -> the ``params`` a method of that type takes: the constructor's arguments of the
    baselines, the U-Net's ``denoise()``'s (a ddpm method's are ``SamplingOptions``)."""
    return {"noisy": _parameters(NoisyInput.__init__, "name"), "nlm": _parameters(NLMDenoiser.__init__, "name"),
            "bm3d": _parameters(BM3DDenoiser.__init__, "name"), "bm4d": _parameters(BM4DDenoiser.__init__, "name"),
            "unet": _parameters(SupervisedUNet.denoise, "noisy")}


def _check_volume_names(plain: dict) -> None:
    """The ``name`` of each mapping in ``data.params.volumes`` and ``evaluation.test_volumes``."""
    data = plain.get("data") if isinstance(plain.get("data"), dict) else {}
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    evaluation = plain.get("evaluation") or {}
    for key, entries in (("data.params.volumes", params.get("volumes")),
                         ("evaluation.test_volumes", evaluation.get("test_volumes"))):
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(entry, dict) and entry.get("name") not in (None, ""):
                check_name(entry["name"], f"{key}[{i}].name")


def _unknown_value(key: str, value, known) -> ConfigError:
    close = difflib.get_close_matches(str(value), list(known), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return ConfigError(f"{key}: {value!r} is not one of {', '.join(known)}{hint}")


def check_methods(methods, sampling=None) -> None:
    """ConfigError naming the entry of ``evaluation.methods`` with an unknown key, type,
    ``sigma`` mode or ``params`` key (what evaluation.denoisers.build_denoiser and the model's
    ``denoise`` would refuse only after training), or a repeated method name; a ddpm method's
    params are checked as the ``SamplingOptions`` they make with the run's ``sampling``."""
    if methods is None:
        return
    accepted, names = _method_params(), []
    base = SamplingOptions.from_mapping(sampling)
    for i, entry in enumerate(methods):
        where = f"evaluation.methods[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {', '.join(METHOD)}, got {entry!r}")
        check_keys(entry, METHOD, METHOD, where)
        kind = entry.get("type")
        if kind not in DENOISER_TYPES:
            raise _unknown_value(f"{where}.type", kind, DENOISER_TYPES)
        if entry.get("sigma", "known") not in ("known", "estimate"):
            raise _unknown_value(f"{where}.sigma", entry["sigma"], ("known", "estimate"))
        for j, value in enumerate(entry.get("sets") or []):
            if value not in METHOD_SETS:
                raise _unknown_value(f"{where}.sets[{j}]", value, METHOD_SETS)
        if kind == "ddpm":
            base.updated(entry.get("params"), f"{where}.params")
        else:
            check_keys(entry.get("params") or {}, accepted[kind], {}, f"{where}.params")
        names.append(str(entry.get("name") or kind))
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"evaluation.methods: method names must be unique (they name files), repeated: {repeated}")


def check_evaluation_ready(ev, model_keys=None) -> None:
    """After ``check_run_config`` (which checks each method): ConfigError unless the
    ``evaluation`` section can be run: noise levels (``levels``,
    else ``sigmas``: a non-empty list of numbers >= 0) and a non-empty ``methods`` list;
    with ``model_keys``, every method's ``model`` must be one of them (the main job can load
    no other, so a misspelt key would silently skip the method)."""
    plain = OmegaConf.to_container(ev, resolve=True) if not isinstance(ev, dict) else ev
    key = "levels" if plain.get("levels") is not None else "sigmas"
    levels = plain.get(key)
    if levels is None:
        raise ConfigError("evaluation.sigmas: required (the noise levels to score; or evaluation.levels)")
    if not isinstance(levels, list) or not levels or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in levels):
        raise ConfigError(f"evaluation.{key}: expected a non-empty list of numbers >= 0, got {levels!r}")
    methods = plain.get("methods")
    if not methods:
        raise ConfigError("evaluation.methods: required, a non-empty list of methods to score")
    for i, entry in enumerate(methods):
        if model_keys is not None and entry.get("type") in ("ddpm", "unet"):
            if entry.get("model", entry["type"]) not in model_keys:
                raise _unknown_value(f"evaluation.methods[{i}].model", entry.get("model"), model_keys)


def _check_data_params(plain: dict) -> None:
    """Sizes of the DenoisingDataModule below 1 (a stride or batch of 0), by key."""
    data = plain.get("data") if isinstance(plain.get("data"), dict) else {}
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    if data.get("target") != DATA_MODULE:
        return
    for key in POSITIVE_DATA_PARAMS:
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ConfigError(f"data.params.{key}: must be >= 1, got {value}")
    workers = params.get("num_workers")
    if isinstance(workers, int) and workers < 0:
        raise ConfigError(f"data.params.num_workers: must be >= 0, got {workers}")


def check_run_config(cfg) -> None:
    """ConfigError naming the first unknown key or wrongly typed value in the trainer,
    sampling, logging and evaluation sections of a run config (``evaluation.methods``
    entries included, ``check_methods``), an unknown ``logging.logger`` or
    ``evaluation.noise_type``, a data module size below 1, or a run / volume name that is
    not a plain file name."""
    plain = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    for name in ("trainer", "sampling", "logging", "evaluation"):
        section = plain.get(name)
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(section).__name__}")
    trainer_args = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "logger", "callbacks",
                                                                              "default_root_dir"}
    check_keys(plain.get("trainer") or {}, trainer_args | set(TRAINER_SPEED), {**TRAINER_TYPES, **TRAINER_SPEED},
               "trainer")
    SamplingOptions.from_mapping(plain.get("sampling"), "sampling")
    log = plain.get("logging") or {}
    if "wandb" in log:  # the key of earlier versions: say what replaced it
        raise ConfigError("logging.wandb: replaced by logging.logger: wandb | tensorboard | csv "
                          "(logging.wandb: false is now logging.logger: csv)")
    check_keys(log, LOGGING, LOGGING, "logging")
    if log.get("logger", "wandb") not in LOGGERS:
        raise ConfigError(f"logging.logger: {log['logger']!r} is not one of {', '.join(LOGGERS)}")
    check_name(log.get("name", "run"), "logging.name")
    evaluation = plain.get("evaluation") or {}
    check_keys(evaluation, EVALUATION, EVALUATION, "evaluation")
    if evaluation.get("noise_type", "gaussian") not in NOISE_TYPES:
        raise _unknown_value("evaluation.noise_type", evaluation["noise_type"], tuple(NOISE_TYPES))
    check_methods(evaluation.get("methods"), plain.get("sampling"))
    _check_volume_names(plain)
    _check_data_params(plain)
    if not isinstance(plain.get("seed", 0), int) or isinstance(plain.get("seed", 0), bool):
        raise ConfigError(f"seed: expected int, got {plain.get('seed')!r}")
