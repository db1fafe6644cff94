"""Optimiser and learning-rate schedule from ``OptimConfig``."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from sslkit.config import OptimConfig
from sslkit.schedules import warmup_constant, warmup_cosine, warmup_step


def build_optimizer(cfg: OptimConfig, *, model: nn.Module) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the trainable parameters; biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups: Iterable[dict] = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def build_lr_schedule(cfg: OptimConfig, *, total_steps: int, steps_per_epoch: int | None = None) -> np.ndarray:
    """Learning rate per optimizer step. ``steps_per_epoch``: step milestones are epochs (else steps)."""
    if cfg.schedule == "step":
        per = steps_per_epoch or 1
        return warmup_step(base=cfg.lr, total_steps=total_steps, milestones=[round(m * per) for m in cfg.milestones],
                           gamma=cfg.gamma, warmup_steps=cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return warmup_cosine(base=cfg.lr, total_steps=total_steps, warmup_steps=cfg.warmup_steps, final=cfg.min_lr)
    return warmup_constant(base=cfg.lr, total_steps=total_steps, warmup_steps=cfg.warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
