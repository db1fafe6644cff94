"""Supervised contrastive loss over a set of keys (Khosla et al., 2020; SupCAM's variant).

For an anchor q and its positives K_p (keys with q's label) and negatives K_N (the others):

    denominator="all"        L = -1/|K_p| sum_{p in K_p} log( e^{q.k_p/tau} / sum_{j not excluded} e^{q.k_j/tau} )
    denominator="negatives"  L = -1/|K_p| sum_{p in K_p}
                                   log( e^{q.k_p/tau} / (e^{q.k_p/tau} + sum_{K_N} e^{q.k_i/tau}) )

"all" is SupCon's L_out (pytorch-metric-learning's ``SupConLoss``); "negatives" is SupCAM's
L_SC, where other positives never compete with each other. SimCLR's
NT-Xent is the "all" form with image ids as labels (``nt_xent``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DENOMINATORS = ("all", "negatives")


def supcon(
    anchors: Tensor, keys: Tensor, *, anchor_labels: Tensor, key_labels: Tensor, tau: float = 0.07,
    exclude: Tensor | None = None, denominator: str = "all",
) -> Tensor:
    """Mean supervised contrastive loss of ``anchors`` against ``keys``.

    Args:
        anchors: (B, D) embeddings (normalised here).
        keys: (K, D) embeddings (normalised here); may hold the anchors themselves.
        anchor_labels: (B,) labels of the anchors; key_labels: (K,) labels of the keys.
        tau: temperature.
        exclude: (B, K) bool, pairs that are neither positive nor negative (an anchor
            against itself when ``keys`` holds the anchors), or None.
        denominator: "all" or "negatives" (see the module notes).

    Returns:
        A scalar: the mean over anchors that have at least one positive (0 with a graph
        when none has).

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        >>> y = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> supcon(z, z, anchor_labels=y, key_labels=y, exclude=torch.eye(6, dtype=torch.bool)).item() > 0
        True
    """
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}.")
    logits = F.normalize(anchors, dim=1) @ F.normalize(keys, dim=1).T / tau  # (B, K)
    same = anchor_labels[:, None] == key_labels[None, :]  # (B, K)
    valid = torch.ones_like(same) if exclude is None else ~exclude
    positive, negative = same & valid, ~same & valid
    if denominator == "all":
        log_prob = logits - torch.logsumexp(logits.masked_fill(~valid, float("-inf")), dim=1, keepdim=True)
    else:
        negatives = torch.logsumexp(logits.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)  # (B, 1)
        log_prob = logits - torch.logaddexp(logits, negatives)  # each positive against the negatives alone
    counts = positive.sum(dim=1)  # (B,)
    has = counts > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(dim=1)[has] / counts[has]
    return per_anchor.mean()
