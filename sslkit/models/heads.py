"""MLP heads: projector and predictor (Linear -> BN -> ReLU -> Linear)."""

from __future__ import annotations

from torch import Tensor, nn


class MLPHead(nn.Module):
    """(B, in_dim) -> (B, out_dim) through one hidden layer; ``norm=False`` drops the BatchNorm."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, norm: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=not norm),
            nn.BatchNorm1d(hidden_dim) if norm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
