"""InfoNCE for momentum contrast, with or without in-batch negatives.

CCRL (Nakhli et al., 2023, eq. 2) and MoCo (He et al., 2020) share one loss:

    L_i = -log  exp(q_i . k_i+ / tau) / sum_j exp(q_i . k_j / tau)

They differ in what the denominator runs over. MoCo v2: the positive key and the Q
queued keys (``in_batch=False``). CCRL: all N keys of the current batch, gathered from
every rank, and the Q queued keys (``in_batch=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(
    query: Tensor, keys: Tensor, *, positive: Tensor, queue: Tensor | None = None,
    tau: float = 0.07, in_batch: bool = True,
) -> Tensor:
    """Mean InfoNCE loss of ``query`` against its positive key and the negatives.

    Args:
        query: (B, D) query embeddings (normalised here).
        keys: (N, D) keys of the current batch, N >= B (all ranks' keys when distributed).
        positive: (B,) long, the row of ``keys`` that is each query's positive.
        queue: (Q, D) queued keys, already L2-normalised, or None.
        tau: temperature.
        in_batch: whether the other keys of the batch are negatives too.

    Returns:
        A scalar tensor.

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        >>> info_nce(q, q, positive=torch.arange(4)).item() > 0
        True
    """
    query = F.normalize(query, dim=1)
    keys = F.normalize(keys, dim=1)
    if in_batch:
        logits = query @ keys.T  # (B, N); the positive of row i sits at column positive[i]
        target = positive
    else:
        logits = (query * keys[positive]).sum(dim=1, keepdim=True)  # (B, 1); the positive is column 0
        target = torch.zeros_like(positive)
    if queue is not None and queue.shape[0] > 0:
        logits = torch.cat([logits, query @ queue.T.to(query.dtype)], dim=1)  # (B, N + Q) or (B, 1 + Q)
    return F.cross_entropy(logits / tau, target)
