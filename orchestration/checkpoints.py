"""Loading checkpoints named in configs, and exporting the small EMA-only checkpoint we ship.

Checkpoints are read with ``torch.load(weights_only=True)`` only (tensors and plain data;
a pickle that would run code is refused), and the ``target`` nodes in their
hyper-parameters (the UNet config) are checked against the target allowlist of
``utils.initialize_configs`` before the model is built.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from models.ddpm_conditioned import RETIRED_HPARAMS, ConditionDDPM
from models.ddpm_st_diffusion import DDPM
from models.supervised_unet import SupervisedUNet
from utils.atomic import atomic_write
from utils.initialize_configs import ConfigError, allowed_targets, validate_all_targets
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
    hyper-parameters is not allowed (default allowlist plus ``allow_targets``) or invalid."""
    try:
        validate_all_targets(ckpt.get("hyper_parameters") or {}, "hyper_parameters", allow_targets=allow_targets)
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
    """``cls.load_from_checkpoint`` on a path relative to the repo root, in eval mode.

    The file is read once, with ``weights_only=True``, and the ``target`` nodes of its
    hyper-parameters are checked (default allowlist plus ``allow_targets``) before the
    model is built.
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
    if cls in MODEL_CLASSES and found is not cls:
        raise CheckpointError(f"{path} holds a {found.__name__} checkpoint, not a {cls.__name__}")
    del ckpt
    with allowed_targets(allow_targets):
        model = cls.load_from_checkpoint(io.BytesIO(data), map_location=map_location, weights_only=True)
    return model.eval()


def export_inference_checkpoint(src: str | Path, dst: str | Path, half: bool = True) -> Path:
    """Write the small checkpoint we ship: weights for inference only.

    A model trained with EMA (``unet_ema.*`` in its state dict) keeps only the EMA UNet, as
    the model's UNet, with ``use_ema`` set to false in its hyper-parameters; other models
    (the supervised U-Net) keep their weights. Optimizer and loop states are dropped and
    floating tensors stored in float16 when ``half``; hyper-parameters of earlier versions
    (``RETIRED_HPARAMS``) are dropped. Loads with ``Cls.load_from_checkpoint``. The file is
    written atomically.
    """
    ckpt = read_checkpoint(src, src)
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{src}: not a Lightning checkpoint (no state_dict / hyper_parameters)")
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
    (SupervisedUNet). Unset entries are left out."""
    models = {}
    for key, cls, path in (("ddpm_pretrained", ConditionDDPM, evaluation_cfg.get("pretrained_ddpm")),
                           ("unet", SupervisedUNet, evaluation_cfg.get("unet_ckpt"))):
        if path:
            models[key] = load_checkpoint(cls, path, allow_targets=allow_targets)
    return models
