"""Loading checkpoints named in configs, and exporting the small EMA-only checkpoint we ship."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from utils.paths import resolve_path

def load_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu"):
    """``cls.load_from_checkpoint`` on a path relative to the repo root, in eval mode."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return cls.load_from_checkpoint(str(path), map_location=map_location).eval()


def export_ema_checkpoint(src: str | Path, dst: str | Path, half: bool = True) -> Path:
    """Write a checkpoint of ``src`` that keeps only the EMA UNet, as the model's UNet.

    The result loads with ``ConditionDDPM.load_from_checkpoint`` (``use_ema`` is set to
    false in its hyper-parameters, the EMA weights becoming the weights); optimizer and
    loop states are dropped and floating tensors stored in float16 when ``half``.
    The file is written atomically.
    """
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict")
    if state is None or not any(k.startswith("unet_ema.") for k in state):
        raise ValueError(f"{src}: no EMA weights (unet_ema.*) in its state_dict")
    ema = {"unet." + k[len("unet_ema."):]: v for k, v in state.items() if k.startswith("unet_ema.")}
    if half:
        ema = {k: v.half() if v.is_floating_point() else v for k, v in ema.items()}
    hparams = dict(ckpt["hyper_parameters"], use_ema=False)
    out = {"state_dict": ema, "hyper_parameters": hparams,
           "pytorch-lightning_version": ckpt.get("pytorch-lightning_version"),
           "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch")}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save(out, tmp)
    os.replace(tmp, dst)
    return dst
