"""Regression losses shared by the diffusion models and the supervised U-Net."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("l1", "l2", "huber")


def per_example_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Mean ``loss_type`` loss of each example: (B, ...) -> (B,). Huber uses delta 1 (model units)."""
    if loss_type == "l1":
        loss = (pred - target).abs()
    elif loss_type == "l2":
        loss = (pred - target) ** 2
    elif loss_type == "huber":
        loss = F.huber_loss(pred, target, reduction="none", delta=1.0)
    else:
        raise ValueError(f"loss_type '{loss_type}' unknown; expected one of {LOSSES}")
    return loss.mean(dim=tuple(range(1, loss.ndim)))
