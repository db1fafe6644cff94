"""Focal loss (Lin et al., 2017): cross-entropy that down-weights examples already right.

    FL(p_t) = -(1 - p_t)^gamma log p_t,   p_t the softmax probability of the target class.

gamma = 0 is cross-entropy. SCL uses it for classification and
along the rows and columns of similarity matrices (``similarity_focal``); gamma 2 unless set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def focal(logits: Tensor, target: Tensor, *, gamma: float = 2.0) -> Tensor:
    """Mean focal loss of (N, C) ``logits`` against (N,) long ``target``."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}.")
    log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]  # (N,) log p_t
    weight = (1.0 - log_p.exp()).pow(gamma) if gamma > 0 else torch.ones_like(log_p)
    return -(weight * log_p).mean()
