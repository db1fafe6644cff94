"""SCL's similarity-matrix loss: focal loss along rows and columns.

Two paired batches B1, B2 hold one image per class in the same class order, so row i of
either belongs to class i. With E1, E2 their (P, D) embeddings, L2-normalised, and t a
learnable scale (inverse temperature):

    S11 = E1 E1^T t,  S12 = E1 E2^T t,  S22 = E2 E2^T t
    L_con = sum over S in (S11, S12, S22) of focal(S, i) along rows + focal(S^T, i) along columns
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslkit.losses.focal import focal


def similarity_focal(e1: Tensor, e2: Tensor, *, scale: Tensor | float, gamma: float = 2.0) -> Tensor:
    """L_con of two class-aligned (P, D) embedding sets; ``scale`` may be a learnable scalar tensor."""
    e1, e2 = F.normalize(e1, dim=1), F.normalize(e2, dim=1)
    target = torch.arange(e1.shape[0], device=e1.device)
    total = e1.new_zeros(())
    for sim in (e1 @ e1.T, e1 @ e2.T, e2 @ e2.T):  # (P, P) each
        sim = sim * scale
        total = total + focal(sim, target, gamma=gamma) + focal(sim.T, target, gamma=gamma)
    return total
