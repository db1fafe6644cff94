"""What CCRL and SupCAM share: a query encoder, its momentum copy and a queue of keys.

``MomentumContrast`` holds ``encoder`` (a Sequential whose first part is ``backbone``),
``key_encoder`` (its EMA copy) and ``queue`` (keys with labels). A method's ``forward``
computes keys with ``key_encoder``, gathers them from every rank and hands them to
``stage``; ``after_optimizer_step`` then updates the copy and enqueues what was staged,
so the queue only ever holds keys of finished steps. ``embed`` reads either encoder.
One level of sharing, not a hierarchy: the methods keep their own losses and inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sslkit.models import KeyQueue, MomentumEncoder


class MomentumContrast(nn.Module):
    def __init__(self, encoder: nn.Module, *, queue_size: int, key_dim: int, momentum: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.key_encoder = MomentumEncoder(encoder)
        self.queue = KeyQueue(queue_size, key_dim)
        self.momentum = momentum
        self._pending: list[tuple[Tensor, Tensor]] = []  # gathered keys + labels waiting for the optimizer step

    def stage(self, keys: Tensor, labels: Tensor) -> None:
        """Keys (N, D) of all ranks and their (N,) labels, enqueued after the optimizer step."""
        self._pending.append((keys, labels))

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q, then enqueue the staged keys (all ranks')."""
        self.key_encoder.update(self.encoder, self.momentum)
        for keys, labels in self._pending:
            self.queue.push(keys, labels)
        self._pending.clear()

    @torch.no_grad()
    def embed(self, images: Tensor, *, encoder: str = "momentum", features: str = "backbone") -> Tensor:
        """(N, C, H, W) -> (N, D) from the momentum (default) or query encoder: pooled backbone
        features, or the encoder's head output with ``features="projector"``."""
        net = self.key_encoder.ema if encoder == "momentum" else self.encoder
        return net.backbone(images) if features == "backbone" else net(images)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone
