"""SimCLR (Chen et al., 2020) as SSCL uses it (Jain & Lynn, 2025).

Both views are random-resized crops (``data.views.recipe: local_local``); one encoder,
backbone -> projection head (``method.projection``: ``mlp`` = MLPHead(F, projector[0],
projector[1]); ``linear`` = one nn.Linear(F, projector[1]), SSCL's linear head); loss
NT-Xent over the 2N views of the whole global batch, tau = ``method.tau`` (SSCL: 0.7).
No momentum encoder, no queue: ``after_optimizer_step`` does nothing.

Across ranks: each rank gathers z1 and z2 from every rank WITH gradients
(``dist.gather_with_grad``), so every rank computes the same global loss L over all
2 x world x B views. all_gather's backward sums the gradient that every rank's copy of
L sends to each slice, so rank r's own embeddings receive world x dL/dz_r (every rank
holds the same L); DDP then averages parameter gradients over the ranks, dividing by
world: sum_r dL/dz_r dz_r/dtheta = dL/dtheta, the gradient one process gets on the whole
batch (tests/methods/test_simclr.py checks this on two gloo processes).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit import dist
from sslkit.config import Config
from sslkit.losses import nt_xent
from sslkit.methods.base import Method, StepOutput, TwoViewInputs, register
from sslkit.models import MLPHead, create_backbone


class SimCLR(Method):
    worker_views = True

    def __init__(self, *, backbone: nn.Module, projector: nn.Module, tau: float,
                 inputs: TwoViewInputs | None = None) -> None:
        super().__init__()
        self.inputs = inputs
        self.encoder = nn.Sequential(OrderedDict(backbone=backbone, projector=projector))
        self.tau = tau
        self._views = 0  # views the last forward's loss saw, all ranks': 2 x world x B

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """uint8 ``image`` -> ``query`` and ``key`` views (both cropped under local_local)."""
        return self.inputs(batch, generator) if self.inputs is not None else batch

    def forward(self, batch: dict[str, Tensor]) -> StepOutput:
        z1 = self.encoder(batch["query"]).float()  # (B, P)
        z2 = self.encoder(batch["key"]).float()  # (B, P)
        # (world * B, P) each, rank order; row i of both is the same image on every rank.
        # float32 similarities even under bf16/fp16 autocast: a bf16 logit keeps 3 digits.
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1_all, z2_all = dist.gather_with_grad(z1), dist.gather_with_grad(z2)
            loss = nt_xent(z1_all, z2_all, tau=self.tau)
        self._views = z1_all.shape[0] + z2_all.shape[0]
        with torch.no_grad():
            pos_sim = F.cosine_similarity(z1, z2, dim=1).mean()
        return StepOutput(loss, {"loss": loss.detach(), "pos_sim": pos_sim}, views=(z1.detach(), z2.detach()))

    def chance_loss(self) -> Optional[float]:
        """NT-Xent with all 2N views equal: each view's positive is one of the 2N - 1 others, all at the
        same logit, so every term is log(2N - 1)."""
        return math.log(self._views - 1) if self._views > 1 else None

    def after_optimizer_step(self, step: int) -> None:
        """Nothing to update outside the optimizer."""

    @torch.no_grad()
    def embed(self, images: Tensor, *, encoder: str = "query", features: str = "backbone") -> Tensor:
        """(N, C, H, W) -> (N, D): backbone features, or the projection head's with ``features="projector"``.
        There is one encoder, so ``encoder`` is ignored."""
        return self.encoder.backbone(images) if features == "backbone" else self.encoder(images)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone


@register("simclr", SimCLR)
def build_simclr(cfg: Config) -> SimCLR:
    m = cfg.model
    backbone = create_backbone(m.backbone, in_chans=m.in_chans, **m.backbone_kwargs)
    hidden, out = m.projector
    if cfg.method.projection == "linear":
        projector: nn.Module = nn.Linear(backbone.num_features, out)
    else:
        projector = MLPHead(backbone.num_features, hidden, out, norm=m.head_norm)
    return SimCLR(backbone=backbone, projector=projector, tau=cfg.method.tau, inputs=TwoViewInputs(cfg))
