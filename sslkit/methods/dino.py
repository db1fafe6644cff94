"""DINO: self-distillation with no labels, with iBOT's masked patch distillation and DINOv2's KoLeo.

A student (backbone -> DINO head) and its teacher, an EMA copy of the student (momentum on a
cosine schedule from ``method.teacher_momentum[0]`` to ``[1]``, no gradient). Every image gives
two global views and ``data.views.local_crops`` local ones (``BatchViews.multi_crop``); the
teacher sees the global views only. Its K prototype scores are centred (an EMA of their mean over
every rank's batch) and sharpened by a temperature warmed up from ``teacher_temp[0]`` to ``[1]``,
or balanced by Sinkhorn-Knopp (``method.centering=sinkhorn_knopp``); the loss is the cross-entropy
between each teacher global view and each student view of another view.

With ``method.ibot`` (ViT backbones) a share of the student's global views has blocks of patch
tokens replaced by a learned mask token, and the student's patch outputs at the masked places
learn the teacher's outputs for the unmasked tokens there (a patch centre of their own).
``method.koleo_weight`` adds the KoLeo regulariser, which spreads the student's class tokens.

The DINO head: an MLP (GELU) down to a bottleneck, L2-normalised, then a last linear layer over
K prototypes whose weight rows are L2-normalised (``norm_last_layer``: at unit norm; otherwise
with a learned norm), frozen for the first ``method.freeze_last_layer_epochs``.

Evaluation, export and fine-tuning use the teacher's backbone by default (``eval.encoder``):
its class token for a ViT (``eval.features=patches``: the mean of its patch tokens instead).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import VisionTransformer, model_entrypoint
from torch import Tensor, nn

from sslkit.config import Config, ConfigError
from sslkit.data.augment import MEAN, STD, BatchViews
from sslkit.data.masks import block_masks
from sslkit.losses.dino import batch_center, dino_loss, ema_center, koleo_loss, sinkhorn_knopp, teacher_probs
from sslkit.methods.base import Exported, Method, StepOutput, register
from sslkit.models import MomentumEncoder, create_backbone

ENTROPY_ROWS = 64  # teacher rows the logged teacher_entropy is averaged over (evenly spaced over both views)


class DINOHead(nn.Module):
    """(N, in_dim) -> (N, K): MLP to a bottleneck, L2-normalised, then the weight-normalised last layer."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden: int = 2048, bottleneck: int = 256, layers: int = 3,
                 norm_last_layer: bool = True, batch_norm: bool = False) -> None:
        """``batch_norm``: BatchNorm after each hidden layer (DINO's option for convolutional backbones)."""
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mlp.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                mlp += [nn.BatchNorm1d(b), nn.GELU()] if batch_norm else [nn.GELU()]
        self.mlp = nn.Sequential(*mlp)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_weight = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.last_weight, std=0.02)
        # the norm of each prototype's weight row: fixed at 1, or learned (weight normalisation's g)
        self.last_norm = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))

    def bottleneck(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        weight = F.normalize(self.last_weight, dim=1)
        if self.last_norm is not None:
            weight = weight * self.last_norm
        return F.linear(self.bottleneck(x), weight)

    def last_layer(self) -> list[nn.Parameter]:
        return [self.last_weight] + ([self.last_norm] if self.last_norm is not None else [])


def _no_drop_path(module: nn.Module) -> None:
    """Replace every stochastic-depth layer of ``module`` by the identity (the teacher runs without it)."""
    for name, child in module.named_children():
        if isinstance(child, DropPath):
            setattr(module, name, nn.Identity())
        else:
            _no_drop_path(child)


def vit_tokens(vit: VisionTransformer, x: Tensor, mask: Optional[Tensor] = None,
               mask_token: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """A timm ViT's (B, D) class token and (B, P, D) patch tokens after its final norm; where ``mask`` (B, P)
    is true, the patch embedding is replaced by ``mask_token`` (D,) before the position embedding."""
    tokens = vit.patch_embed(x)  # (B, P, D), or (B, H, W, D) with dynamic_img_size
    if mask is not None:
        where = mask.view(*tokens.shape[:-1], 1)
        tokens = torch.where(where, mask_token.to(tokens.dtype), tokens)
    tokens = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))))
    return tokens[:, 0], tokens[:, vit.num_prefix_tokens:]


def cosine_ramp(start: float, end: float, steps: int) -> np.ndarray:
    """(steps,) values from ``start`` to ``end`` along half a cosine (the teacher momentum)."""
    progress = np.arange(steps) / max(steps - 1, 1)
    return end - (end - start) * (np.cos(np.pi * progress) + 1) / 2


class DINO(Method):
    momentum_encoder = True  # the teacher: embed(encoder="momentum") and export read it

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m = cfg.method
        if cfg.data.views.backend != "tensor":
            raise ConfigError("Method 'dino' makes its multi-crop views on the training device; set "
                              "data.views.backend=tensor.")
        for key in ("teacher_momentum", "teacher_temp", "mask_ratio"):
            value = getattr(m, key)
            if len(value) != 2 or value[0] > value[1]:
                raise ConfigError(f"Config key 'method.{key}' must be [start, end] with start <= end, got {value}.")

    def __init__(self, cfg: Config, *, backbone: nn.Module, head: DINOHead, patch_head: Optional[DINOHead]) -> None:
        super().__init__()
        m = cfg.method
        self.is_vit = isinstance(backbone, VisionTransformer)
        if m.ibot and not self.is_vit:
            raise ConfigError(f"Config key 'method.ibot' is true, but model.backbone '{cfg.model.backbone}' is not a "
                              "timm VisionTransformer (iBOT masks patch tokens); set method.ibot=false.")
        parts = {"backbone": backbone, "head": head, **({"patch_head": patch_head} if patch_head else {})}
        self.student = nn.ModuleDict(parts)
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim)) if m.ibot else None
        self.teacher = MomentumEncoder(self.student)
        _no_drop_path(self.teacher.ema)
        self.register_buffer("center", torch.zeros(1, m.prototypes))
        self.register_buffer("patch_center", torch.zeros(1, m.prototypes))
        self.register_buffer("progress", torch.zeros((), dtype=torch.long))  # optimizer steps done or skipped
        self.m, self.views = m, BatchViews(cfg.data.views, channels=cfg.data.channels)
        self.grid = tuple(backbone.patch_embed.grid_size) if self.is_vit else None
        self._staged: list[tuple[str, Tensor]] = []
        self.set_run_length(cfg.train.max_steps, max(1, cfg.train.max_steps // max(cfg.train.epochs, 1)))

    def set_run_length(self, total_steps: int, steps_per_epoch: int) -> None:
        """The schedules over the run: teacher momentum (cosine), teacher temperature (linear warm-up, then
        constant) and the steps during which the head's last layer is frozen."""
        m, total = self.m, max(int(total_steps), 1)
        self.momentums = cosine_ramp(*m.teacher_momentum, total)
        warmup = min(round(m.teacher_temp_warmup_epochs * steps_per_epoch), total)
        self.teacher_temps = np.concatenate([np.linspace(*m.teacher_temp, warmup),
                                             np.full(total - warmup, m.teacher_temp[1])])
        self.freeze_steps = round(m.freeze_last_layer_epochs * steps_per_epoch)

    def _at(self, schedule: np.ndarray) -> float:
        return float(schedule[min(int(self.progress), len(schedule) - 1)])

    # -- inputs

    def prepare(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """uint8 ``image`` -> ``globals`` (2 views) and ``locals`` (multi-crop), and with iBOT ``mask``
        (2B, P) for the concatenated global views, every draw from ``generator``."""
        batch["globals"], batch["locals"] = self.views.multi_crop(batch.pop("image"), generator=generator)
        if self.mask_token is not None:
            n = 2 * batch["globals"][0].shape[0]
            masks = block_masks(n, self.grid, ratio=tuple(self.m.mask_ratio), share=self.m.mask_share,
                                generator=_cpu_generator(generator))
            batch["mask"] = masks.to(batch["globals"][0].device)
        return batch

    # -- the step

    def _encode(self, net: nn.ModuleDict, x: Tensor, mask: Optional[Tensor] = None
                ) -> tuple[Tensor, Optional[Tensor]]:
        if self.is_vit:
            return vit_tokens(net["backbone"], x, mask, self.mask_token)
        return net["backbone"](x), None

    def forward(self, batch: dict[str, Any]) -> StepOutput:
        globals_, locals_, mask = batch["globals"], batch["locals"], batch.get("mask")
        teacher = self.teacher.ema
        with torch.no_grad():
            t_cls, t_patch = self._encode(teacher, torch.cat(globals_))
            t_probs = self._teacher_probs(teacher["head"](t_cls), "center")
        s_cls, s_patch = self._encode(self.student, torch.cat(globals_), mask)
        tokens = [s_cls, self._encode(self.student, torch.cat(locals_))[0]] if locals_ else [s_cls]
        b = globals_[0].shape[0]
        student = self.student["head"](torch.cat(tokens)).view(2 + len(locals_), b, -1)  # one head pass, every view
        with torch.autocast(device_type=s_cls.device.type, enabled=False):
            distill = dino_loss(student, t_probs.view(2, b, -1), self.m.student_temp)
            logs = {"dino_loss": distill.detach()}
            loss = distill
            if mask is not None and self.m.ibot_weight > 0:
                patch = self._ibot(s_patch, t_patch, mask)
                logs["ibot_loss"] = patch.detach()
                loss = loss + self.m.ibot_weight * patch
            if self.m.koleo_weight > 0:
                koleo = sum(koleo_loss(c.float()) for c in s_cls.chunk(2)) / 2
                logs["koleo_loss"] = koleo.detach()
                loss = loss + self.m.koleo_weight * koleo
        sample = t_probs[::max(1, t_probs.shape[0] // ENTROPY_ROWS)]  # a signal, not a loss: a sample of rows
        entropy = -(sample * sample.clamp_min(1e-12).log()).sum(1).mean()
        logs.update(loss=loss.detach(), teacher_entropy=entropy / math.log(t_probs.shape[1]),
                    teacher_temp=torch.tensor(self._at(self.teacher_temps)),
                    teacher_momentum=torch.tensor(self._at(self.momentums)))
        return StepOutput(loss, logs, views=(s_cls[:b].detach().float(), t_cls[b:].float()))

    def _teacher_probs(self, logits: Tensor, which: str) -> Tensor:
        """Sharpened, centred (or Sinkhorn-balanced) teacher probabilities; the centre's update is staged."""
        logits, temp = logits.float(), self._at(self.teacher_temps)
        if self.m.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp)
        center = self.center if which == "center" else self.patch_center
        self._staged.append((which, batch_center(logits)))
        return teacher_probs(logits, center, temp)

    def _ibot(self, s_patch: Tensor, t_patch: Tensor, mask: Tensor) -> Tensor:
        """iBOT's loss on the masked patch tokens: each masked image's tokens weigh 1 / its masked count, and the
        sum is divided by the number of global views, masked or not, as DINOv2 does (so ``ibot_weight`` means
        what it means there). The head runs on the masked tokens only: K scores for every token would not fit."""
        head = "patch_head" if "patch_head" in self.student else "head"
        with torch.no_grad():
            t_probs = self._teacher_probs(self.teacher.ema[head](t_patch[mask]), "patch_center")
        s_logits = self.student[head](s_patch[mask]).float()
        per_token = -(t_probs * F.log_softmax(s_logits / self.m.student_temp, dim=1)).sum(1)  # (M,)
        counts = mask.sum(1)
        weights = (1.0 / counts.clamp_min(1).float()).repeat_interleave(counts)
        return (per_token * weights).sum() / mask.shape[0]

    # -- after the step

    def before_optimizer_step(self, step: int) -> None:
        """Freeze the head's last layer for the first ``freeze_last_layer_epochs``: no gradient, no update."""
        if int(self.progress) < self.freeze_steps:
            for head in ("head", "patch_head"):
                if head in self.student:
                    for param in self.student[head].last_layer():
                        param.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Teacher <- EMA of the student; the centres <- EMA of this step's teacher means."""
        self.teacher.update(self.student, self._at(self.momentums))
        for which, mean in self._staged:
            buffer = getattr(self, which)
            buffer.copy_(ema_center(buffer, mean, self.m.center_momentum))
        self._staged.clear()
        self.progress += 1

    def skip_step(self) -> None:
        self._staged.clear()
        self.progress += 1

    def health(self) -> dict[str, float]:
        """``key_distance``: ||teacher - student|| / ||student|| over the backbone and head parameters."""
        return {"health/key_distance": self.teacher.distance(self.student)}

    def backbone_copies(self) -> list[nn.Module]:
        """The teacher's backbone starts as the student's: ``model.init`` weights go into both."""
        return [self.teacher.ema["backbone"]]

    # -- evaluation and export

    def encoder_module(self, encoder: str = "momentum") -> nn.Module:
        return (self.teacher.ema if encoder == "momentum" else self.student)["backbone"]

    @torch.no_grad()
    def embed(self, images: Tensor, *, encoder: str = "momentum", features: str = "backbone") -> Tensor:
        """(N, C, H, W) -> (N, D): the backbone's pooled output (a ViT's class token), ``patches``: a ViT's patch
        tokens averaged, ``projector``: the head's L2-normalised bottleneck."""
        net = self.teacher.ema if encoder == "momentum" else self.student
        if features == "patches":
            if not self.is_vit:
                raise ValueError("eval.features=patches needs a ViT backbone; use eval.features=backbone.")
            return vit_tokens(net["backbone"], images)[1].mean(1)
        pooled = net["backbone"](images)
        return pooled if features == "backbone" else net["head"].bottleneck(pooled)

    def export_spec(self, cfg: Config, encoder: str = "momentum") -> Exported:
        return Exported(self.encoder_module(encoder), cfg.model.backbone, backbone_kwargs(cfg), cfg.model.in_chans,
                        MEAN, STD)

    @property
    def backbone(self) -> nn.Module:
        return self.student["backbone"]


def _cpu_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """The masks are drawn on the CPU: a CPU generator seeded from ``generator`` (one draw from it)."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


def backbone_kwargs(cfg: Config) -> dict[str, Any]:
    """``model.backbone_kwargs``, plus, for a timm ViT, the image size of the global views and dynamic image
    sizes (the local views are smaller) unless the config sets them."""
    kwargs = dict(cfg.model.backbone_kwargs)
    try:
        module = model_entrypoint(cfg.model.backbone).__module__
    except (KeyError, RuntimeError):  # not a timm model: create_backbone says so
        return kwargs
    if module.rsplit(".", 1)[-1] in ("vision_transformer", "deit"):
        kwargs.setdefault("img_size", cfg.data.size)
        kwargs.setdefault("dynamic_img_size", True)
    return kwargs


@register("dino", DINO)
def build_dino(cfg: Config) -> DINO:
    m = cfg.method
    backbone = create_backbone(cfg.model.backbone, in_chans=cfg.model.in_chans, **backbone_kwargs(cfg))

    def head() -> DINOHead:
        return DINOHead(backbone.num_features, m.prototypes, hidden=m.head_hidden, bottleneck=m.head_bottleneck,
                        layers=m.head_layers, norm_last_layer=m.norm_last_layer, batch_norm=m.head_batch_norm)

    return DINO(cfg, backbone=backbone, head=head(), patch_head=head() if m.ibot and m.ibot_separate_head else None)
