"""SCL: supervised contrastive learning over similarity matrices (Chang et al.).

Any timm backbone -> linear embedding E (D = 1024 in the paper) -> linear classifier.
A batch holds one or more groups of 2P images laid out by class-balanced batching
(``data.balanced``: P classes, 2 per class): B1 = group[:P], B2 = group[P:], row i of
both the same class. Per group, with E1, E2 the (P, D) embeddings of B1, B2:

    L_con = focal along rows and columns of S11, S12, S22 (S_ij = norm(E_i) norm(E_j)^T t)
    L_cls = focal(cls(E1), y1) + focal(cls(E2), y2)
    L     = con_weight * L_con + cls_weight * L_cls

and the step's loss is the mean over groups. The scale t (an inverse temperature) is
learnt; it is stored as log t, as CLIP stores its logit scale, so it stays positive
whatever the optimiser does. No cross-rank communication: each rank's groups are
complete, and DDP's gradient average over ranks is the mean over all groups.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from sslkit.config import Config, ConfigError
from sslkit.data.augment import BatchViews, normalize
from sslkit.losses import focal, similarity_focal
from sslkit.methods.base import Method, StepOutput, register
from sslkit.models import create_backbone


class SCL(Method):
    has_classifier = True
    needs_class_count = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        balanced = cfg.data.balanced
        if balanced.classes < 1 or balanced.per_class != 2:
            raise ConfigError(f"Method 'scl' pairs two batches of P classes: set data.balanced.classes=P (> 0) and "
                              f"data.balanced.per_class=2 (got {balanced.classes} and {balanced.per_class}).")
        if cfg.method.scale_init <= 0:
            raise ConfigError(f"Config key 'method.scale_init' must be positive, got {cfg.method.scale_init}.")

    def __init__(
        self, *, backbone: nn.Module, embed_dim: int, num_classes: int, classes_per_group: int,
        scale_init: float, gamma: float, con_weight: float, cls_weight: float, views: BatchViews | None = None,
    ) -> None:
        super().__init__()
        self.views = views
        embedding = nn.Linear(backbone.num_features, embed_dim)  # E, before L2 normalisation
        self.encoder = nn.Sequential(OrderedDict(backbone=backbone, embedding=embedding))
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale_init)))  # t = exp(log t) > 0
        self.classes_per_group, self.num_classes = classes_per_group, num_classes
        self.gamma, self.con_weight, self.cls_weight = gamma, con_weight, cls_weight

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """uint8 ``image`` -> one augmented, normalised ``view`` (rotation, flips, contrast); ``label`` kept."""
        if "image" in batch and self.views is not None:
            x = self.views.unit(batch.pop("image"))
            batch["view"] = normalize(self.views.branch(x, local=False, generator=generator))
        return batch

    def _groups(self, labels: Tensor) -> Tensor:
        """(B,) labels -> (G, 2, P), checking the layout that class-balanced batching makes."""
        p = self.classes_per_group
        fix = (f"SCL needs class-balanced batches of {p} classes x 2 (B1 then B2, same class order); "
               f"set data.balanced.classes={p} and data.balanced.per_class=2")
        if labels.ndim != 1 or labels.shape[0] == 0 or labels.shape[0] % (2 * p):
            raise ValueError(f"{fix}: got a batch of {tuple(labels.shape)} labels, not a multiple of {2 * p}.")
        groups = labels.view(-1, 2, p)
        if not torch.equal(groups[:, 0], groups[:, 1]):
            raise ValueError(f"{fix}: the two blocks of a group hold different class sequences.")
        if (groups[:, 0].sort(dim=1).values.diff(dim=1) == 0).any():
            raise ValueError(f"{fix}: a block holds one class twice.")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"Labels must lie in [0, {self.num_classes}) for method.num_classes={self.num_classes}; "
                             f"got {labels.min().item()}..{labels.max().item()} (set method.num_classes).")
        return groups

    def forward(self, batch: dict[str, Tensor]) -> StepOutput:
        labels = batch["label"]
        groups = self._groups(labels)  # (G, 2, P)
        e = self.encoder(batch["view"])  # (B, D): one pass over B1 and B2 of every group
        logits = self.classifier(e)  # (B, C)
        up = torch.promote_types(e.dtype, torch.float32)  # the losses in float32 (or float64), even under autocast
        e, logits = e.to(up).view(*groups.shape, -1), logits.to(up).view(*groups.shape, -1)  # (G, 2, P, .)
        t = self.scale
        l_con, l_cls = [], []
        with torch.autocast(device_type=e.device.type, enabled=False):
            for g in range(groups.shape[0]):
                l_con.append(similarity_focal(e[g, 0], e[g, 1], scale=t, gamma=self.gamma))
                l_cls.append(focal(logits[g, 0], groups[g, 0], gamma=self.gamma)
                             + focal(logits[g, 1], groups[g, 1], gamma=self.gamma))
        l_con, l_cls = torch.stack(l_con).mean(), torch.stack(l_cls).mean()
        loss = self.con_weight * l_con + self.cls_weight * l_cls
        with torch.no_grad():
            acc = (logits.argmax(-1) == groups).float().mean()
        d = e.shape[-1]  # anchors: the B1 blocks; positives: the B2 blocks (same classes, other samples)
        return StepOutput(loss, {"loss": loss.detach(), "l_con": l_con.detach(), "l_cls": l_cls.detach(),
                                 "t": t.detach(), "acc": acc},
                          views=(e[:, 0].reshape(-1, d).detach(), e[:, 1].reshape(-1, d).detach()))

    def after_optimizer_step(self, step: int) -> None:
        """Nothing to do: no momentum encoder, no queue."""

    @torch.no_grad()
    def embed(self, images: Tensor, *, encoder: str = "query", features: str = "backbone") -> Tensor:
        """(N, C, H, W) -> (N, D): pooled backbone features, or the embedding E (``projector``)."""
        x = self.encoder.backbone(images)
        return x if features == "backbone" else self.encoder.embedding(x)

    def classifier_net(self) -> nn.Module:
        """images -> logits: backbone -> embedding E -> classification head."""
        return nn.Sequential(self.encoder, self.classifier)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone


@register("scl", SCL)
def build_scl(cfg: Config) -> SCL:
    SCL.check_config(cfg)  # also here: tests and scripts build without loading a config
    balanced, method = cfg.data.balanced, cfg.method
    if method.num_classes < 1:
        raise ConfigError("Method 'scl' needs the classifier's size: set method.num_classes (the engine fills it "
                          "in from the shards' manifest when it names the classes).")
    m = cfg.model
    backbone = create_backbone(m.backbone, in_chans=m.in_chans, **m.backbone_kwargs)
    return SCL(
        backbone=backbone, embed_dim=m.embed_dim, num_classes=method.num_classes,
        classes_per_group=balanced.classes, scale_init=method.scale_init, gamma=method.gamma,
        con_weight=method.con_weight, cls_weight=method.cls_weight,
        views=BatchViews(cfg.data.views, channels=cfg.data.channels),
    )
