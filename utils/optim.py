"""AdamW with linear warm-up and cosine decay, shared by every LightningModule here."""
from __future__ import annotations

import math
from typing import Iterable

import torch


def adamw_warmup_cosine(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, warmup_steps: int,
                        min_lr_ratio: float, total_steps: int) -> dict:
    """Lightning ``configure_optimizers`` dict: lr rises linearly for ``warmup_steps`` optimizer
    steps, then follows a cosine down to ``min_lr_ratio * lr`` at ``total_steps``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total_steps = max(1, int(total_steps))

    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
