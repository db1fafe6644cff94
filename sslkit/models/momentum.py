"""An exponential-moving-average copy of a module (the MoCo key encoder).

theta_k <- m * theta_k + (1 - m) * theta_q, for every parameter; the copy never
receives gradients. Buffers (BatchNorm running statistics) are not averaged: the
key encoder keeps its own, updated by its own forward passes, as in MoCo.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumEncoder(nn.Module):
    """Holds ``ema``, a frozen deep copy of ``online`` at construction time."""

    def __init__(self, online: nn.Module) -> None:
        super().__init__()
        self.ema = copy.deepcopy(online)
        for param in self.ema.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        ema_params = list(self.ema.parameters())
        online_params = [p.detach() for p in online.parameters()]
        if len(ema_params) != len(online_params):
            raise ValueError("MomentumEncoder.update got a module whose parameters do not match the copy.")
        torch._foreach_mul_(ema_params, momentum)
        torch._foreach_add_(ema_params, online_params, alpha=1.0 - momentum)

    @torch.no_grad()
    def distance(self, online: nn.Module) -> float:
        """||theta_ema - theta_online|| / ||theta_online|| over all parameters: 0 right after the copy, near 0
        while the momentum is too high for the copy to follow."""
        pairs = list(zip(online.parameters(), self.ema.parameters()))
        diff = torch.stack([(e.float() - o.float()).pow(2).sum() for o, e in pairs]).sum()
        norm = torch.stack([o.float().pow(2).sum() for o, _ in pairs]).sum()
        return float((diff / norm.clamp_min(1e-12)).sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.ema(x)
