"""Optimiser and learning-rate schedule from ``OptimConfig``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import numpy as np
import torch
from timm.models import group_parameters
from torch import nn

from sslkit.config import ConfigError, OptimConfig
from sslkit.schedules import warmup_constant, warmup_cosine, warmup_step


def build_optimizer(cfg: OptimConfig, *, model: nn.Module) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the trainable parameters; biases and norm weights get no weight decay.

    Each group carries ``lr_scale`` (``set_lr`` multiplies the scheduled rate by it) and ``decay``
    (whether ``set_weight_decay`` applies to it): with ``layer_decay`` < 1 the backbone's layers, as
    its timm ``group_matcher`` orders them, get lr x layer_decay^(depth below the top), and a ViT's
    patch embedding gets ``patch_embed_lr_mult`` besides."""
    scales = lr_scales(cfg, model)
    groups: dict[tuple[float, bool], dict] = {}
    for param in model.parameters():
        if param.requires_grad:
            decay, scale = param.ndim > 1, scales.get(id(param), 1.0)
            group = groups.setdefault((scale, decay), {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                                                       "lr_scale": scale, "decay": decay})
            group["params"].append(param)
    ordered: Iterable[dict] = [groups[key] for key in sorted(groups, key=lambda k: (not k[1], -k[0]))]
    if cfg.name == "adam":
        return torch.optim.Adam(ordered, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.name == "adamw":
        return torch.optim.AdamW(ordered, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.SGD(ordered, lr=cfg.lr, momentum=cfg.momentum)


def lr_scales(cfg: OptimConfig, model: nn.Module) -> dict[int, float]:
    """{id(parameter): lr multiplier} of the backbone's parameters (``model.backbone``) that are not at 1."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or (cfg.layer_decay == 1.0 and cfg.patch_embed_lr_mult == 1.0):
        return {}
    if cfg.layer_decay != 1.0 and not hasattr(backbone, "group_matcher"):
        raise ConfigError(f"Config key 'optim.layer_decay' is {cfg.layer_decay}, but the backbone "
                          f"{type(backbone).__name__} does not say how its layers are ordered (no timm group_matcher); "
                          "set optim.layer_decay=1.0 or use a timm ViT or ResNet.")
    layers = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True) \
        if cfg.layer_decay != 1.0 else {}
    top = max(layers.values(), default=-1) + 1  # the heads' level: the last block is one below, at layer_decay^1
    scales = {}
    for name, param in backbone.named_parameters():
        level = top if name.startswith(("norm.", "fc_norm.", "head")) else layers.get(name, top)  # as DINOv2 numbers
        scale = cfg.layer_decay ** (top - level)
        if name.startswith("patch_embed."):
            scale *= cfg.patch_embed_lr_mult
        if scale != 1.0:
            scales[id(param)] = scale
    return scales


def build_lr_schedule(cfg: OptimConfig, *, total_steps: int, steps_per_epoch: int | None = None) -> np.ndarray:
    """Learning rate per optimizer step. ``steps_per_epoch``: step milestones are epochs (else steps)."""
    if cfg.schedule == "step":
        per = steps_per_epoch or 1
        return warmup_step(base=cfg.lr, total_steps=total_steps, milestones=[round(m * per) for m in cfg.milestones],
                           gamma=cfg.gamma, warmup_steps=cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return warmup_cosine(base=cfg.lr, total_steps=total_steps, warmup_steps=cfg.warmup_steps, final=cfg.min_lr)
    return warmup_constant(base=cfg.lr, total_steps=total_steps, warmup_steps=cfg.warmup_steps)


def build_wd_schedule(cfg: OptimConfig, *, total_steps: int) -> Optional[np.ndarray]:
    """Weight decay per optimizer step, cosine from ``weight_decay`` to ``weight_decay_end``; None: constant."""
    if cfg.weight_decay_end is None:
        return None
    return warmup_cosine(base=cfg.weight_decay, total_steps=total_steps, final=cfg.weight_decay_end)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        if group.get("decay", True):
            group["weight_decay"] = weight_decay
