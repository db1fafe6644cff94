"""SupCAM: supervised MoCo with composed clusters and a self-margin (Luo et al., 2023).

Per step, each primary image I_p gives two category-invariant views x_q, x_k; a
candidate I_c from the same batch is composed with it (``sslkit.data.compose``) into
I_g with label y_g, and I_g gives the view x_g. Then

    q = f_q(x_q), k+ = f_k(x_k), k_g = f_k(x_g)       f_q: backbone -> fc (128-d), no projection head
    keys = {k+, k_g of every rank} + queue              each with its label
    L = L_SC(q; keys) + L_SM(q, k+; keys)               supcon(denominator="negatives") + self_margin

f_k is the momentum copy of f_q (m = 0.999); k+ and k_g (with labels) are enqueued
after the optimizer step. ``method.use_self_margin=false`` is the "+SupCon" ablation
and ``method.table=none`` makes x_g a view of the candidate itself (Table 4's no-table).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit import dist
from sslkit.config import Config, ConfigError
from sslkit.data.augment import BatchViews, normalize
from sslkit.data.compose import compose
from sslkit.losses import self_margin, supcon
from sslkit.losses.self_margin import _EDGE  # the clamp of the positive's cosine, for the chance loss
from sslkit.methods.base import StepOutput, register
from sslkit.methods.momentum_contrast import MomentumContrast
from sslkit.models import create_backbone


def partners(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n,) candidate index of each primary: (i + s) mod n with one s ~ U{1..n-1}, never i itself
    (a batch of one composes its only image with itself)."""
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    shift = torch.randint(1, n, (1,), generator=generator, device=device)
    return (torch.arange(n, device=device) + shift) % n


class CompositeInputs:
    """SupCAM's ``prepare``: uint8 ``image`` + ``label`` -> ``query``, ``key`` (views of the primary),
    ``composite`` (a view of I_g), ``composite_label`` and ``composed`` (1.0 where I_g is a composite,
    0.0 where the candidate came back). Every view is a RandomResizedCrop branch of ``data.views``
    (the paper: crop + horizontal flip); ``data.views.recipe`` and ``local`` are not used."""

    def __init__(self, cfg: Config) -> None:
        m = cfg.method
        self.views = BatchViews(cfg.data.views, channels=cfg.data.channels)
        self.options = dict(roles=list(m.roles), table=m.table, p_cap=m.p_cap, tries=m.tries, combine=m.combine,
                            background=m.background, threshold=m.threshold, composite=dict(m.composite) or None)
        self.labels_field, self.shards = cfg.data.labels, cfg.data.shards

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        if "image" not in batch:  # inputs made already (tests, fixed batches)
            return batch
        images, labels = batch.pop("image"), batch["label"]
        self._check(labels)
        device = generator.device if generator is not None else images.device
        candidates = partners(images.shape[0], generator, device).to(images.device)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        composites, composite_labels, composed = self.compose(images, labels, candidates, np.random.default_rng(seed))
        x, g = self.views.unit(images), self.views.unit(composites)
        batch["query"] = normalize(self.views.branch(x, local=True, generator=generator))  # (B, C, H, W)
        batch["key"] = normalize(self.views.branch(x, local=True, generator=generator))  # the key view
        batch["composite"] = normalize(self.views.branch(g, local=True, generator=generator))
        batch["composite_label"], batch["composed"] = composite_labels, composed
        return batch

    def compose(self, images: Tensor, labels: Tensor, candidates: Tensor, rng: np.random.Generator
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Algorithm 1 per (primary i, candidate candidates[i]) on the CPU: (B, C, H, W) uint8 I_g,
        (B,) long y_g and (B,) float composed, on the images' device."""
        arr = images.detach().cpu().numpy().transpose(0, 2, 3, 1)  # (B, H, W, C)
        hw = arr[..., 0] if arr.shape[-1] == 1 else arr  # compose takes (H, W) or (H, W, C)
        ys, cand = labels.tolist(), candidates.tolist()
        out, out_labels, flags = [], [], []
        for i, j in enumerate(cand):
            image, label, info = compose(hw[i], hw[j], label_p=ys[i], label_c=ys[j], rng=rng, **self.options)
            out.append(image.reshape(arr.shape[1:]))
            out_labels.append(label)
            flags.append(info.composed)
        composites = torch.from_numpy(np.stack(out).transpose(0, 3, 1, 2).copy()).to(images.device)
        return (composites, torch.tensor(out_labels, dtype=torch.long, device=images.device),
                torch.tensor(flags, dtype=torch.float32, device=images.device))

    def _check(self, labels: Tensor) -> None:
        roles = self.options["roles"]
        if bool((labels < 0).any()):
            raise ValueError(f"SupCAM is supervised but {int((labels < 0).sum())} samples of this batch have no "
                             f"label: point data.shards ('{self.shards}') at labelled shards and data.labels "
                             f"('{self.labels_field}') at the field that holds the class.")
        if bool((labels >= len(roles)).any()):
            raise ValueError(f"A batch holds label {int(labels.max())} but method.roles {roles} names the cluster "
                             f"type of only {len(roles)} classes; give one role per class of data.shards.")


class SupCAM(MomentumContrast):
    @classmethod
    def check_config(cls, cfg: Config) -> None:
        roles = cfg.method.roles
        unknown = sorted(set(roles) - {"I", "T", "O", "TO"})
        if unknown:
            raise ConfigError(f"Config key 'method.roles' holds {unknown}; each class's role is one of I, T, O, TO.")
        for role, label in cfg.method.composite.items():
            if role not in ("T", "O", "TO") or not 0 <= label < len(roles):
                raise ConfigError(f"Config key 'method.composite' maps '{role}' to {label}; map T, O or TO to a "
                                  f"class index below {len(roles)} (the length of method.roles).")

    def __init__(self, *, encoder: nn.Module, queue_size: int, key_dim: int, tau: float, momentum: float,
                 margin: float, use_self_margin: bool, inputs: CompositeInputs | None = None,
                 shuffle_bn: bool = False) -> None:
        super().__init__(encoder, queue_size=queue_size, key_dim=key_dim, momentum=momentum,  # encoder: backbone, fc
                         shuffle_bn=shuffle_bn)
        self.inputs = inputs
        self.tau, self.margin, self.use_self_margin = tau, margin, use_self_margin
        self._negatives: Optional[Tensor] = None  # (B,) keys of another label for each query of the last forward

    def prepare(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """uint8 ``image`` + ``label`` -> ``query``, ``key``, ``composite``, ``composite_label``."""
        return self.inputs(batch, generator) if self.inputs is not None else batch

    def forward(self, batch: dict[str, Tensor]) -> StepOutput:
        labels, composite_labels = batch["label"], batch["composite_label"]  # (B,), (B,)
        q = F.normalize(self.encoder(batch["query"]).float(), dim=1)  # (B, D)
        k_pos, all_pos = self.encode_keys(batch["key"])  # (B, D), (world * B, D)
        _, all_g = self.encode_keys(batch["composite"])  # (world * B, D)
        fresh = torch.cat([all_pos, all_g])  # (2 * world * B, D)
        fresh_labels = torch.cat([dist.gather_no_grad(labels), dist.gather_no_grad(composite_labels)])
        queued, queued_labels = self.queue.current()  # (F, D), (F,)
        keys = torch.cat([fresh, queued])  # (K, D), K = 2 * world * B + F
        key_labels = torch.cat([fresh_labels, queued_labels])  # (K,)
        negatives = key_labels[None, :] != labels[:, None]  # (B, K)
        self._negatives = negatives.sum(dim=1)
        with torch.autocast(device_type=q.device.type, enabled=False):  # float32 logits under bf16/fp16
            l_sc = supcon(q, keys, anchor_labels=labels, key_labels=key_labels, tau=self.tau,
                          denominator="negatives")
            l_sm = torch.zeros((), device=q.device)
            if self.use_self_margin:
                l_sm = self_margin(q, k_pos, keys, negatives=negatives, margin=self.margin, tau=self.tau)
        loss = l_sc + l_sm
        self.stage(fresh, fresh_labels)
        logs = {"loss": loss.detach(), "l_sc": l_sc.detach(), "l_sm": l_sm.detach(),
                "pos_sim": (q.detach() * k_pos).sum(dim=1).mean(), "queue_filled": self.queue.filled.float()}
        if "composed" in batch:
            logs["composed"] = batch["composed"].float().mean()
        return StepOutput(loss, logs, views=(q.detach(), k_pos))

    def chance_loss(self) -> Optional[float]:
        """Both terms with every embedding equal, all logits 1/tau but the margin's. Query i, with n_i keys of
        another label, always has a positive (its own key): L_SC gives each positive -log(e^(1/tau) /
        (e^(1/tau) + n_i e^(1/tau))) = log(1 + n_i); L_SM lowers the positive's logit to cos(theta_0 + m) / tau
        (theta_0 = acos(1 - edge), the clamp's angle), giving log(1 + n_i e^((1 - cos(theta_0 + m)) / tau)).
        The chance loss is the mean over this rank's queries of their sum: it depends on the labels."""
        if self._negatives is None:
            return None
        n = self._negatives.double().cpu()
        chance = torch.log1p(n).mean()
        if self.use_self_margin:
            angle = min(math.acos(1.0 - _EDGE) + self.margin, math.pi)
            chance = chance + torch.log1p(n * math.exp((1.0 - math.cos(angle)) / self.tau)).mean()
        return float(chance)


@register("supcam", SupCAM)
def build_supcam(cfg: Config) -> SupCAM:
    m = cfg.model
    backbone = create_backbone(m.backbone, in_chans=m.in_chans, **m.backbone_kwargs)
    encoder = nn.Sequential(OrderedDict(backbone=backbone, fc=nn.Linear(backbone.num_features, m.embed_dim)))
    return SupCAM(encoder=encoder, queue_size=cfg.method.queue_size, key_dim=m.embed_dim, tau=cfg.method.tau,
                  momentum=cfg.method.momentum, margin=cfg.method.margin,
                  use_self_margin=cfg.method.use_self_margin, inputs=CompositeInputs(cfg),
                  shuffle_bn=cfg.method.shuffle_bn)
