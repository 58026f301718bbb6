"""Loading checkpoints named in configs, and exporting the small EMA-only checkpoint we ship."""
from __future__ import annotations

from pathlib import Path

import torch

from utils.atomic import atomic_write
from utils.paths import resolve_path

def load_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu"):
    """``cls.load_from_checkpoint`` on a path relative to the repo root, in eval mode."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return cls.load_from_checkpoint(str(path), map_location=map_location).eval()


def export_inference_checkpoint(src: str | Path, dst: str | Path, half: bool = True) -> Path:
    """Write the small checkpoint we ship: weights for inference only.

    A model trained with EMA (``unet_ema.*`` in its state dict) keeps only the EMA UNet, as
    the model's UNet, with ``use_ema`` set to false in its hyper-parameters; other models
    (the supervised U-Net) keep their weights. Optimizer and loop states are dropped and
    floating tensors stored in float16 when ``half``. Loads with ``Cls.load_from_checkpoint``.
    The file is written atomically.
    """
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{src}: not a Lightning checkpoint (no state_dict / hyper_parameters)")
    state, hparams = ckpt["state_dict"], dict(ckpt["hyper_parameters"])
    if any(k.startswith("unet_ema.") for k in state):
        state = {"unet." + k[len("unet_ema."):]: v for k, v in state.items() if k.startswith("unet_ema.")}
        hparams["use_ema"] = False
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    out = {"state_dict": state, "hyper_parameters": hparams,
           "pytorch-lightning_version": ckpt.get("pytorch-lightning_version"),
           "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch")}
    return atomic_write(dst, lambda tmp: torch.save(out, tmp))


def pretrained_models(evaluation_cfg) -> dict:
    """The shipped models an ``evaluation`` config section names, by method model key:
    ``pretrained_ddpm`` -> "ddpm_pretrained" (ConditionDDPM), ``unet_ckpt`` -> "unet"
    (SupervisedUNet). Unset entries are left out."""
    from models.ddpm_conditioned import ConditionDDPM
    from models.supervised_unet import SupervisedUNet

    models = {}
    for key, cls, path in (("ddpm_pretrained", ConditionDDPM, evaluation_cfg.get("pretrained_ddpm")),
                           ("unet", SupervisedUNet, evaluation_cfg.get("unet_ckpt"))):
        if path:
            models[key] = load_checkpoint(cls, path)
    return models
