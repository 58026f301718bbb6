"""AdamW with linear warm-up and cosine decay, shared by every LightningModule here.

The fused AdamW kernel (one kernel for all parameters) is used when every parameter is on a
CUDA device, unless ``fused`` says otherwise: the argument, else the ``FUSED_ADAMW`` context
variable that ``orchestration.training`` sets from ``trainer.fused_adamw`` around the fit
(None: that automatic choice). On CPU the default stays torch's plain AdamW.
"""
from __future__ import annotations

import contextvars
import math
from typing import Iterable

import torch


#: fused AdamW for the optimizers built in this context: True, False or None (automatic)
FUSED_ADAMW: contextvars.ContextVar[bool | None] = contextvars.ContextVar("cdm4mi_fused_adamw", default=None)


def use_fused(params: list[torch.nn.Parameter], fused: bool | None = None) -> bool:
    """``fused``, else ``FUSED_ADAMW``, else True exactly when all ``params`` are on CUDA."""
    if fused is None:
        fused = FUSED_ADAMW.get()
    if fused is None:
        return bool(params) and all(p.device.type == "cuda" for p in params)
    return bool(fused)


def adamw_warmup_cosine(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, warmup_steps: int,
                        min_lr_ratio: float, total_steps: int, fused: bool | None = None) -> dict:
    """Lightning ``configure_optimizers`` dict: lr rises linearly for ``warmup_steps`` optimizer
    steps, then follows a cosine down to ``min_lr_ratio * lr`` at ``total_steps``; fused AdamW
    as ``use_fused`` decides."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if use_fused(params, fused)
                                                                          else {}))
    total_steps = max(1, int(total_steps))

    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
