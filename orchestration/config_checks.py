"""Every key of a run config checked against what reads it, before anything is written.

``model`` and ``data`` are checked by their targets' signatures (utils.initialize_configs);
this module checks the other sections: ``trainer`` against ``lightning.Trainer``,
``sampling`` against ``ConditionDDPM.denoise``, ``logging`` and ``evaluation`` against the
keys the orchestration reads. A misspelt key names the close matches; a value of the wrong
type names the key and the expected type. Names that become file or folder names
(``logging.name``, the ``name`` of a volume in ``data.params.volumes`` or
``evaluation.test_volumes``) are checked by ``utils.paths.check_name``.
"""
from __future__ import annotations

import difflib
import inspect

import lightning.pytorch as pl
from omegaconf import OmegaConf

from models.ddpm_conditioned import ConditionDDPM
from utils.initialize_configs import ConfigError
from utils.paths import check_name

PATH = str  # a file path in a config (relative to the repository root)
NUMBER = (int, float)
#: key -> accepted types (None: null allowed) of the sections the orchestration reads itself
LOGGING = {"save_dir": (PATH,), "name": (str,), "logger": (str,), "wandb_sync": (bool,), "project": (str,),
           "checkpoint_every_n_steps": (int,), "image_every_n_steps": (int,)}
#: the experiment loggers ``logging.logger`` may name (orchestration.training.build_logger)
LOGGERS = ("wandb", "tensorboard", "csv")
EVALUATION = {"enabled": (bool,), "sigmas": (list,), "levels": (list,), "noise_seed": (int,), "noise_type": (str,),
              "noise_params": (dict, None), "max_slices_per_source": (int, None), "n_examples": (int,),
              "save_predictions": (bool,), "unet_config": (PATH, None), "unet_ckpt": (PATH, None),
              "pretrained_ddpm": (PATH, None), "methods": (list,), "test_volumes": (list, None)}
#: types of the ConditionDDPM.denoise arguments a sampling section may set
SAMPLING_TYPES = {"sampler": (str,), "steps": (int, None), "eta": (*NUMBER, None), "spacing": (str, None),
                  "n_samples": (int,), "guidance_scale": NUMBER, "t_start": (int, str, None),
                  "sigma": (*NUMBER, None), "return_std": (bool,), "batch_size": (int,)}
#: lightning.Trainer arguments whose values are plain numbers or flags
TRAINER_TYPES = {"max_steps": (int,), "max_epochs": (int, None), "min_steps": (int, None),
                 "log_every_n_steps": (int, None), "check_val_every_n_epoch": (int, None),
                 "val_check_interval": (*NUMBER, None), "limit_val_batches": (*NUMBER, None),
                 "limit_train_batches": (*NUMBER, None), "num_sanity_val_steps": (int, None),
                 "accumulate_grad_batches": (int,), "gradient_clip_val": (*NUMBER, None),
                 "enable_progress_bar": (bool, None), "enable_checkpointing": (bool, None),
                 "deterministic": (bool, str, None), "num_nodes": (int,)}


def _type_name(types) -> str:
    return " or ".join("null" if t is None else t.__name__ for t in types)


def _check_keys(section: dict, allowed, types: dict, path: str) -> None:
    for key, value in section.items():
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{path}.{key}: unknown key{hint} (known: {', '.join(sorted(allowed))})")
        accepted = types.get(key)
        if accepted is None:
            continue
        ok = (value is None and None in accepted) or any(
            t is not None and isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
            for t in accepted)
        if not ok:
            raise ConfigError(f"{path}.{key}: expected {_type_name(accepted)}, got {value!r} "
                              f"({type(value).__name__})")


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


def check_run_config(cfg) -> None:
    """ConfigError naming the first unknown key or wrongly typed value in the trainer,
    sampling, logging and evaluation sections of a run config, an unknown
    ``logging.logger``, or a run / volume name that is not a plain file name."""
    plain = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    for name in ("trainer", "sampling", "logging", "evaluation"):
        section = plain.get(name)
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(section).__name__}")
    trainer_args = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "logger", "callbacks",
                                                                              "default_root_dir"}
    _check_keys(plain.get("trainer") or {}, trainer_args, TRAINER_TYPES, "trainer")
    denoise_args = set(inspect.signature(ConditionDDPM.denoise).parameters) - {"self", "noisy", "generator"}
    _check_keys(plain.get("sampling") or {}, denoise_args, SAMPLING_TYPES, "sampling")
    log = plain.get("logging") or {}
    if "wandb" in log:  # the key of earlier versions: say what replaced it
        raise ConfigError("logging.wandb: replaced by logging.logger: wandb | tensorboard | csv "
                          "(logging.wandb: false is now logging.logger: csv)")
    _check_keys(log, LOGGING, LOGGING, "logging")
    if log.get("logger", "wandb") not in LOGGERS:
        raise ConfigError(f"logging.logger: {log['logger']!r} is not one of {', '.join(LOGGERS)}")
    check_name(log.get("name", "run"), "logging.name")
    _check_keys(plain.get("evaluation") or {}, EVALUATION, EVALUATION, "evaluation")
    _check_volume_names(plain)
    if not isinstance(plain.get("seed", 0), int) or isinstance(plain.get("seed", 0), bool):
        raise ConfigError(f"seed: expected int, got {plain.get('seed')!r}")
