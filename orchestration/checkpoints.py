"""Loading checkpoints named in configs, and exporting the small EMA-only checkpoint we ship.

Checkpoints are read with ``torch.load(weights_only=True)`` only (tensors and plain data;
a pickle that would run code is refused), and the ``target`` nodes in their
hyper-parameters (the UNet config) are checked against the default target allowlist of
``utils.initialize_configs`` before the model is built: a run config's ``allow_targets``
does not reach a checkpoint (a run's own model is built from its config, not from a
checkpoint's hyper-parameters). A run resumed from a checkpoint must keep every model
hyper-parameter its weights depend on (``check_resume_hparams``).
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from models.ddpm_conditioned import ConditionDDPM
from models.ddpm_st_diffusion import DDPM
from models.safe_loading import RETIRED_HPARAMS
from models.supervised_unet import SupervisedUNet
from utils.atomic import atomic_write
from utils.initialize_configs import (ConfigError, _accepted_parameters, check_no_resolvers, checkpoint_targets,
                                      validate_all_targets)
from utils.paths import resolve_path


class CheckpointError(ValueError):
    """A checkpoint file cannot be read safely; the message names the file."""


def read_checkpoint(source, name: str | Path, map_location="cpu") -> dict:
    """``torch.load(source, weights_only=True)``; any failure (unreadable, empty, truncated,
    or a pickle holding objects other than tensors and plain data) is a CheckpointError
    naming ``name``."""
    try:
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # UnpicklingError, EOFError of an empty file, RuntimeError of a truncated zip, ...
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch's weights-only message names the refused global on a later line
        detail = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "empty or truncated file")
        raise CheckpointError(f"{name}: cannot be read as a checkpoint with torch.load(weights_only=True) "
                              f"(unreadable, empty, truncated, or holding objects other than tensors and plain "
                              f"data; refusing to unpickle it): {type(err).__name__}: {detail[:300]}") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{name}: not a Lightning checkpoint (a {type(ckpt).__name__}, expected a dict)")
    return ckpt


def check_hyper_parameters(ckpt: dict, name: str | Path, allow_targets=None) -> None:
    """ConfigError naming the file and the config path if a ``target`` in the checkpoint's
    hyper-parameters is not allowed by the default allowlist or is invalid, or a string there
    calls a resolver (``${oc.env:...}``). ``allow_targets`` (a run config's) is ignored: it
    does not reach checkpoints; the argument stays for the callers that pass it."""
    try:
        with checkpoint_targets():
            hparams = ckpt.get("hyper_parameters") or {}
            check_no_resolvers(hparams, "hyper_parameters")
            validate_all_targets(hparams, "hyper_parameters")
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from err


#: The LightningModules of this project whose checkpoints load_checkpoint tells apart.
MODEL_CLASSES = (ConditionDDPM, DDPM, SupervisedUNet)


def checkpoint_model_class(hparams: dict) -> type:
    """Which of MODEL_CLASSES saved these hyper-parameters: only a ConditionDDPM has
    ``conditioning_key``, only the diffusion models have ``timesteps``."""
    if "conditioning_key" in hparams:
        return ConditionDDPM
    return DDPM if "timesteps" in hparams else SupervisedUNet


def load_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu", allow_targets=None):
    """``cls.load_from_checkpoint`` on a path relative to the repo root, in eval mode
    (``cls`` None: the model class the checkpoint names).

    The file is read once, with ``weights_only=True``, and the ``target`` nodes of its
    hyper-parameters are checked against the default allowlist before the model is built
    (``allow_targets``, a run config's, is ignored: see check_hyper_parameters).
    """
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from err
    ckpt = read_checkpoint(io.BytesIO(data), path)
    check_hyper_parameters(ckpt, path, allow_targets)
    found = checkpoint_model_class(ckpt.get("hyper_parameters") or {})
    cls = found if cls is None else cls
    if cls in MODEL_CLASSES and found is not cls:
        raise CheckpointError(f"{path} holds a {found.__name__} checkpoint, not a {cls.__name__}")
    del ckpt
    with checkpoint_targets():
        model = cls.load_from_checkpoint(io.BytesIO(data), map_location=map_location, weights_only=True)
    return model.eval()


def export_inference_checkpoint(src: str | Path, dst: str | Path, half: bool = True) -> Path:
    """Write the small checkpoint we ship: weights for inference only.

    A model trained with EMA (``unet_ema.*`` in its state dict) keeps only the EMA UNet, as
    the model's UNet, with ``use_ema`` set to false in its hyper-parameters; other models
    (the supervised U-Net) keep their weights. Optimizer and loop states are dropped and
    floating tensors stored in float16 when ``half``; hyper-parameters of earlier versions
    (``RETIRED_HPARAMS``) are dropped. Loads with ``Cls.load_from_checkpoint``. The file is
    written atomically. Refused, before anything is written: an output that is the input
    file (it would replace the training checkpoint), and hyper-parameters that the default
    target allowlist refuses (check_hyper_parameters), which the exported file would carry on.
    """
    src_path, dst_path = Path(src), Path(dst)
    if src_path.resolve() == dst_path.resolve() or (src_path.exists() and dst_path.exists()
                                                    and os.path.samefile(src_path, dst_path)):
        raise ValueError(f"{dst}: is the input checkpoint {src} itself; writing the export there would replace the "
                         "training checkpoint: name another output file")
    ckpt = read_checkpoint(src, src)
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{src}: not a Lightning checkpoint (no state_dict / hyper_parameters)")
    check_hyper_parameters(ckpt, src)
    state = ckpt["state_dict"]
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k not in RETIRED_HPARAMS}
    if any(k.startswith("unet_ema.") for k in state):
        state = {"unet." + k[len("unet_ema."):]: v for k, v in state.items() if k.startswith("unet_ema.")}
        hparams["use_ema"] = False
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    out = {"state_dict": state, "hyper_parameters": hparams,
           "pytorch-lightning_version": ckpt.get("pytorch-lightning_version"),
           "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch")}
    return atomic_write(dst, lambda tmp: torch.save(out, tmp))


def pretrained_models(evaluation_cfg, allow_targets=None) -> dict:
    """The shipped models an ``evaluation`` config section names, by method model key:
    ``pretrained_ddpm`` -> "ddpm_pretrained" (ConditionDDPM), ``unet_ckpt`` -> "unet"
    (SupervisedUNet). Unset entries are left out. ``allow_targets`` is ignored (load_checkpoint)."""
    models = {}
    for key, cls, path in (("ddpm_pretrained", ConditionDDPM, evaluation_cfg.get("pretrained_ddpm")),
                           ("unet", SupervisedUNet, evaluation_cfg.get("unet_ckpt"))):
        if path:
            models[key] = load_checkpoint(cls, path, allow_targets=allow_targets)
    return models


#: Model hyper-parameters (paths under ``model.params``) a resumed run may change:
#: optimisation and training-objective settings, the UNet's dropout and gradient
#: checkpointing, and ``clip_denoised`` (a sampling default). The weights neither depend on
#: them nor change meaning with them. Every other one must match the checkpoint's: the model
#: class, the rest of the UNet config, channels, image_size, timesteps, beta_schedule,
#: linear_start / linear_end, betas, parameterization, use_ema, conditioning_key.
RESUME_MAY_DIFFER = frozenset({"learning_rate", "weight_decay", "warmup_steps", "min_lr_ratio", "ema_decay",
                               "loss_type", "min_snr_gamma", "max_train_timestep", "p_uncond", "p_matched_start",
                               "clip_denoised", "unet_rosinality_config.params.dropout",
                               "unet_rosinality_config.params.use_checkpoint"})


def _plain(value: Any) -> Any:
    """Mappings as dicts and sequences as lists (AttributeDict, tuples, OmegaConf nodes)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _defaults(obj: Any) -> dict:
    named, _ = _accepted_parameters(obj) if obj is not None else (None, True)
    return {name: p.default for name, p in (named or {}).items() if p.default is not p.empty}


def _loaded_target(name: Any) -> Any:
    """The object a target string names if its module is imported already (nothing is imported)."""
    module, _, attr = str(name).rpartition(".")
    return getattr(sys.modules.get(module), attr, None)


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors of other shapes
        return False


def _differences(ours: Any, theirs: Any, path: str) -> list[str]:
    """``path: checkpoint X, config Y`` for each leaf that differs; a nested target node of the
    same target on both sides is compared with its class's defaults filled in."""
    if path.partition(".params.")[2] in RESUME_MAY_DIFFER:
        return []
    if not (isinstance(ours, dict) and isinstance(theirs, dict)):
        return [] if _same(ours, theirs) else [f"{path}: checkpoint {_short(theirs)}, config {_short(ours)}"]
    if ours.get("target") == theirs.get("target") and all(isinstance(d.get("params"), dict) for d in (ours, theirs)):
        defaults = _plain(_defaults(_loaded_target(ours["target"])))
        ours = {**ours, "params": {**defaults, **ours["params"]}}
        theirs = {**theirs, "params": {**defaults, **theirs["params"]}}
    return [d for key in sorted(set(ours) | set(theirs))
            for d in _differences(ours.get(key, _ABSENT), theirs.get(key, _ABSENT), f"{path}.{key}")]


def resume_mismatches(model, hparams: Mapping) -> list[str]:
    """What ``model`` (built from the run config) and a checkpoint's ``hparams`` differ in,
    among what the weights depend on (everything but RESUME_MAY_DIFFER), as config paths
    with both values (a default left out on one side counts as written); [] if the
    checkpoint can continue the run."""
    theirs = {k: v for k, v in _plain(hparams).items() if k not in RETIRED_HPARAMS}
    own = next((c for c in type(model).__mro__ if c in MODEL_CLASSES), None)
    found = checkpoint_model_class(theirs)
    if own is not None and own is not found:
        return [f"model.target: checkpoint holds a {found.__name__}, config builds a {type(model).__name__}"]
    defaults = _plain(_defaults(type(model)))
    ours, theirs = {**defaults, **_plain(getattr(model, "hparams", {}))}, {**defaults, **theirs}
    return _differences(ours, theirs, "model.params")


def check_resume_hparams(model, ckpt: Mapping, name: str | Path) -> None:
    """CheckpointError naming ``name`` and every differing key with both values, unless the
    checkpoint's model hyper-parameters match ``model``'s in all that its weights depend on."""
    wrong = resume_mismatches(model, ckpt.get("hyper_parameters") or {})
    if wrong:
        raise CheckpointError(f"{name}: cannot resume this run from it: the configured model differs from the "
                              f"checkpoint's in what its weights depend on: {'; '.join(wrong)} (only "
                              f"{', '.join(sorted(RESUME_MAY_DIFFER))} may change on resume)")
