"""SupCAM's self-margin loss: an additive angular margin on the fresh positive only.

    L_SM = -log( e^{cos(theta_+ + m)/tau} / (e^{cos(theta_+ + m)/tau} + sum_{K_N} e^{cos(theta_i)/tau}) )

theta_+ is the angle between the query and its own positive key k+;
the negatives K_N are the keys with another label. At m = 0 it is InfoNCE of the query
against k+ and the negatives. theta_+ + m is capped at pi, where cos stops decreasing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_EDGE = 1e-7  # acos has an infinite slope at +-1


def self_margin(
    query: Tensor, positive: Tensor, keys: Tensor, *, negatives: Tensor, margin: float = 0.2, tau: float = 0.07,
) -> Tensor:
    """Mean self-margin loss.

    Args:
        query: (B, D) query embeddings; positive: (B, D) each query's own positive key.
        keys: (K, D) candidate negatives (the batch's keys and the queue).
        negatives: (B, K) bool, which keys are negatives of each query (another label).
        margin: additive angular margin m, radians.
        tau: temperature.
    """
    query, positive, keys = F.normalize(query, dim=1), F.normalize(positive, dim=1), F.normalize(keys, dim=1)
    cos_pos = (query * positive).sum(dim=1).clamp(-1.0 + _EDGE, 1.0 - _EDGE)  # (B,)
    angle = torch.clamp(torch.acos(cos_pos) + margin, max=math.pi)
    pos_logit = (torch.cos(angle) / tau)[:, None]  # (B, 1)
    neg_logits = (query @ keys.T / tau).masked_fill(~negatives, float("-inf"))  # (B, K)
    logits = torch.cat([pos_logit, neg_logits], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos_logit[:, 0]).mean()
