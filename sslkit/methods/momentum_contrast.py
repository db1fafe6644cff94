"""What CCRL and SupCAM share: a query encoder, its momentum copy and a queue of keys.

``MomentumContrast`` holds ``encoder`` (a Sequential whose first part is ``backbone``),
``key_encoder`` (its EMA copy) and ``queue`` (keys with labels). A method's ``forward``
computes keys with ``encode_keys`` (gathered from every rank; with ``shuffle_bn`` the key
encoder sees a share of the batch shuffled across ranks, as in MoCo) and hands them to
``stage``; ``after_optimizer_step`` then updates the copy and enqueues what was staged,
so the queue only ever holds keys of finished steps (with gradient accumulation: every
micro-batch's keys, once per optimizer step). ``embed`` reads either encoder.
One level of sharing, not a hierarchy: the methods keep their own losses and inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit import dist
from sslkit.methods.base import Method
from sslkit.models import KeyQueue, MomentumEncoder


class MomentumContrast(Method):
    momentum_encoder = True

    def __init__(self, encoder: nn.Module, *, queue_size: int, key_dim: int, momentum: float,
                 shuffle_bn: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.key_encoder = MomentumEncoder(encoder)
        self.queue = KeyQueue(queue_size, key_dim)
        self.momentum, self.shuffle_bn = momentum, shuffle_bn
        self._pending: list[tuple[Tensor, Tensor]] = []  # gathered keys + labels waiting for the optimizer step

    @torch.no_grad()
    def encode_keys(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> this rank's keys (B, P) and all ranks' keys (world * B, P) in rank order,
        L2-normalised float32 (also under autocast: they are logits' operands and queue entries)."""
        if self.shuffle_bn:
            share, order = dist.shuffle_across_ranks(images)
            keys = dist.unshuffle_gathered(F.normalize(self.key_encoder(share).float(), dim=1), order)
            return keys[dist.local_slice(images.shape[0])], keys
        local = F.normalize(self.key_encoder(images).float(), dim=1)
        return local, dist.gather_no_grad(local)

    def stage(self, keys: Tensor, labels: Tensor) -> None:
        """Keys (N, D) of all ranks and their (N,) labels, enqueued after the optimizer step."""
        self._pending.append((keys, labels))

    def skip_step(self) -> None:
        """The engine skipped this step's update (a non-finite loss or gradient): its keys never enter the queue."""
        self._pending.clear()

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

    @torch.no_grad()
    def health(self) -> dict[str, float]:
        """``key_distance``: ||theta_k - theta_q|| / ||theta_q|| over the encoder's parameters (0 right
        after a copy; it stays near 0 when the momentum is too high for the key encoder to follow);
        ``queue_filled``: the fraction of the queue holding keys."""
        filled = float(self.queue.filled) / self.queue.size
        return {"health/key_distance": self.key_encoder.distance(self.encoder), "health/queue_filled": filled}

    def encoder_module(self, encoder: str = "momentum") -> nn.Module:
        return self.key_encoder.ema.backbone if encoder == "momentum" else self.encoder.backbone

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def backbone_copies(self) -> list[nn.Module]:
        """The key encoder's backbone starts from the query backbone's first weights (``model.init``)."""
        return [self.key_encoder.ema.backbone]
