"""CCRL: momentum contrast for cell crops (Nakhli et al., 2023).

Query side: backbone -> projector (512-128-64) -> predictor (64-32-64).
Key side:   momentum copy of backbone + projector (no predictor), m = 0.999.
Loss:       InfoNCE over the batch's keys from all ranks (in-batch negatives) and a
            queue of past keys. With ``in_batch_negatives=False`` and no predictor this
            is MoCo v2.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit import dist
from sslkit.config import Config, ConfigError
from sslkit.losses import info_nce
from sslkit.methods.base import StepOutput, TwoViewInputs, register
from sslkit.methods.momentum_contrast import MomentumContrast
from sslkit.models import MLPHead, create_backbone


class CCRL(MomentumContrast):
    worker_views = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.method.use_predictor and cfg.model.predictor[1] != cfg.model.projector[1]:
            raise ConfigError(f"Config key 'model.predictor' must end at the projector's size "
                              f"{cfg.model.projector[1]}, got {cfg.model.predictor[1]}.")

    def __init__(
        self, *, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None,
        queue_size: int, key_dim: int, tau: float, momentum: float, in_batch_negatives: bool,
        inputs: TwoViewInputs | None = None, shuffle_bn: bool = False,
    ) -> None:
        super().__init__(nn.Sequential(OrderedDict(backbone=backbone, projector=projector)),
                         queue_size=queue_size, key_dim=key_dim, momentum=momentum, shuffle_bn=shuffle_bn)
        self.inputs = inputs
        self.predictor = predictor
        self.tau, self.in_batch_negatives = tau, in_batch_negatives
        self._candidates = 0  # keys each query of the last forward was scored against: its positive + negatives

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """uint8 ``image`` -> ``query`` and ``key`` views (local-global by default)."""
        return self.inputs(batch, generator) if self.inputs is not None else batch

    def forward(self, batch: dict[str, Tensor]) -> StepOutput:
        q = self.encoder(batch["query"])  # (B, P)
        if self.predictor is not None:
            q = self.predictor(q)  # (B, P)
        q = q.float()
        k, keys = self.encode_keys(batch["key"])  # (B, P) this rank's; (world * B, P) all ranks', rank order
        labels = batch.get("label")
        labels = torch.full((k.shape[0],), -1, dtype=torch.long, device=k.device) if labels is None else labels
        positive = torch.arange(k.shape[0], device=k.device) + dist.rank() * k.shape[0]  # (B,)
        queued, _ = self.queue.current()  # (F, P), F <= Q
        with torch.autocast(device_type=q.device.type, enabled=False):  # float32 logits under bf16/fp16
            loss = info_nce(q, keys, positive=positive, queue=queued, tau=self.tau,
                            in_batch=self.in_batch_negatives)
        self._candidates = (keys.shape[0] if self.in_batch_negatives else 1) + queued.shape[0]
        self.stage(keys, dist.gather_no_grad(labels))
        with torch.no_grad():
            pos_sim = (F.normalize(q.float(), dim=1) * k).sum(dim=1).mean()
        return StepOutput(loss, {"loss": loss.detach(), "pos_sim": pos_sim, "queue_filled": self.queue.filled.float()},
                          views=(q.detach(), k))

    def chance_loss(self) -> Optional[float]:
        """InfoNCE with every key equal to the query: the positive is one of K equal logits, so the loss
        is log K, K = the batch's keys from all ranks (or the positive alone without in-batch negatives)
        + the queued keys at that step. Once the queue is full: log(world x B + queue_size)."""
        return math.log(self._candidates) if self._candidates else None


@register("ccrl", CCRL)
def build_ccrl(cfg: Config) -> CCRL:
    m = cfg.model
    backbone = create_backbone(m.backbone, in_chans=m.in_chans, **m.backbone_kwargs)
    hidden, out = m.projector
    projector = MLPHead(backbone.num_features, hidden, out, norm=m.head_norm)
    predictor = MLPHead(out, m.predictor[0], m.predictor[1], norm=m.head_norm) if cfg.method.use_predictor else None
    return CCRL(
        backbone=backbone, projector=projector, predictor=predictor, queue_size=cfg.method.queue_size,
        key_dim=out, tau=cfg.method.tau, momentum=cfg.method.momentum,
        in_batch_negatives=cfg.method.in_batch_negatives, inputs=TwoViewInputs(cfg), shuffle_bn=cfg.method.shuffle_bn,
    )
