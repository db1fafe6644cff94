"""NT-Xent, SimCLR's loss (Chen et al., 2020): SupCon with image ids as labels.

Each of the 2N views is an anchor; its positive is the other view of the same image, and
every other view in the batch (gathered from all ranks, with gradients, by the method) is
a negative: L = -log( e^{z_i.z_p/tau} / sum_{j != i} e^{z_i.z_j/tau} ), averaged over 2N.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sslkit.losses.supcon import supcon


def nt_xent(z1: Tensor, z2: Tensor, *, tau: float = 0.5) -> Tensor:
    """Mean NT-Xent of two views (N, D) each (normalised here); row i of both is image i.

    All embeddings equal gives log(2N - 1), the analytic upper limit of a collapsed encoder.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2])  # (2N, D)
    ids = torch.arange(n, device=z.device).repeat(2)  # (2N,)
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    return supcon(z, z, anchor_labels=ids, key_labels=ids, tau=tau, exclude=self_pairs, denominator="all")
