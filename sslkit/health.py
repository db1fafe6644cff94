"""Signals that tell early whether a contrastive run is learning or collapsing.

Computed by the engine every ``train.log_every`` steps from the current batch's embeddings
(``StepOutput.views``: this rank's anchors and, for two-view methods, their positives) and
logged under ``health/``:

- ``std``: per-dimension standard deviation of the L2-normalised embeddings, averaged over the
  D dimensions. It is 0 when every sample maps to one point (collapse) and 1/sqrt(D) for
  embeddings spread uniformly over the sphere; ``std_ratio`` = std x sqrt(D) puts that on 0..1.
- ``rankme``: the effective rank of the batch embeddings (Garrido et al., 2023, "RankMe"):
  exp of the entropy of the normalised singular values, between 1 (one direction) and
  min(B, D) (all directions used equally); ``rankme_ratio`` = rankme / min(B, D) puts that on
  0..1, so that a few directions carrying everything (dimensional collapse) shows whatever B and D.
- ``uniformity``: log of the mean of exp(-2 ||z_i - z_j||^2) over pairs i != j (Wang & Isola,
  2020): 0 for a collapsed batch, more negative the more evenly the batch covers the sphere.
- ``alignment``: mean ||z - z+||^2 between the normalised anchors and their positives (0 when
  the two views map to the same point), and ``pos_sim`` / ``neg_sim``: the mean cosine of
  positive pairs and of all other pairs of anchors.

Methods add their own (``Method.health``): a momentum method the relative distance of its key
encoder from the query encoder and the fraction of its queue filled.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def embedding_health(anchors: Tensor, positives: Optional[Tensor] = None) -> dict[str, float]:
    """The ``health/`` signals of (B, D) ``anchors`` and, when given, their (B, D) ``positives``."""
    z = F.normalize(anchors.detach().float(), dim=1)
    n, d = z.shape
    out: dict[str, float] = {}
    if n < 2:
        return out
    std = float(z.std(dim=0).mean())
    sv = torch.linalg.svdvals(z)
    p = sv / sv.sum().clamp_min(1e-12)
    p = p[p > 0]
    rankme = float(torch.exp(-(p * p.log()).sum()))
    sim = z @ z.T  # (B, B) cosines; ||z_i - z_j||^2 = 2 - 2 cos
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    sq = (2 - 2 * sim[off]).clamp_min(0)
    out.update({"health/std": std, "health/std_ratio": std * math.sqrt(d),
                "health/rankme": rankme, "health/rankme_ratio": rankme / min(n, d),
                "health/uniformity": float(torch.logsumexp(-2 * sq, dim=0) - math.log(sq.numel())),
                "health/neg_sim": float(sim[off].mean())})
    if positives is not None:
        zp = F.normalize(positives.detach().float(), dim=1)
        out.update({"health/alignment": float((z - zp).pow(2).sum(dim=1).mean()),
                    "health/pos_sim": float((z * zp).sum(dim=1).mean())})
    return out


__all__ = ["embedding_health"]
