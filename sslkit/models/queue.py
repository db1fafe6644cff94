"""A FIFO ring buffer of past keys and their labels, saved with the model.

``keys`` (Q, D), ``labels`` (Q,), ``ptr`` and ``filled`` are *persistent* buffers, so
``state_dict`` (and therefore every checkpoint) carries the queue. ``push`` accepts any
batch size: a batch that does not divide Q wraps around the end, and a batch larger
than Q keeps its last Q keys. Only filled slots are handed out as negatives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KeyQueue(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"Queue size must be positive, got {size} (method.queue_size).")
        self.size = size
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: Tensor, labels: Tensor | None = None) -> None:
        """Enqueue (N, D) keys (and (N,) labels, -1 when unknown), oldest first out."""
        if labels is None:
            labels = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        keys, labels = keys[-self.size:], labels[-self.size:]
        n = keys.shape[0]
        slots = (self.ptr + torch.arange(n, device=keys.device)) % self.size  # (N,) wraps around
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.labels[slots] = labels.to(self.labels.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def current(self) -> tuple[Tensor, Tensor]:
        """The filled part of the queue: keys (F, D) and labels (F,), F <= Q."""
        n = int(self.filled)
        return self.keys[:n], self.labels[:n]
