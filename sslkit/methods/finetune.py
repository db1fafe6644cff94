"""Fine-tuning: a pretrained backbone and a new linear head, trained with cross-entropy.

SupCAM: RandomRotate only, SGD 0.01, batch 16, 15 epochs, lr x0.1 at
epochs 8 and 12, label smoothing 0.1. SSCL (section 4): Adam 1e-4, batch 64, 100 epochs.
``finetune.freeze_backbone=true`` makes it a linear probe.

Where the backbone's weights come from (``finetune.init``):

- a run directory: the pretrained method's ``backbone`` from its newest checkpoint; the
  model section (backbone, backbone_kwargs, in_chans) must match the run's, which
  ``finetune_config`` copies over before anything is built;
- a ``.safetensors`` file holding a backbone state dict (timm key names);
- a PyTorch/timm checkpoint file (``.pth``, ``.pt``, ``.bin``, ``.ckpt``; the recipe's model section);
- None: random initialisation, or ``model.init`` / ``model.pretrained`` as for any method.

``build_method`` loads the weights through ``sslkit.models.init`` (the loader every method
shares: key report, ``model.init_strict``, position embeddings and input channels adapted),
reading ``finetune.init`` by ``Finetune.init_source``. The engine's resume and ``load_trained``
build without it and load the fine-tuned checkpoint, so a fine-tuned run does not depend on its
init still being there; ``finetune_config`` -- what ``sslkit finetune`` calls before training --
refuses a missing one.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.config import Config, ConfigError, apply_overrides, init_kind, validate
from sslkit.data.augment import BatchViews, normalize
from sslkit.methods.base import Method, StepOutput, register
from sslkit.models import create_backbone

log = logging.getLogger(__name__)

MODEL_KEYS = ("backbone", "backbone_kwargs", "in_chans")  # what must describe the pretrained network


class ClassifierInputs:
    """``prepare`` for fine-tuning: uint8 ``image`` -> normalised ``input`` (``finetune.views``)."""

    def __init__(self, cfg: Config) -> None:
        self.mode, self.shards = cfg.finetune.views, cfg.data.shards
        self.num_classes = cfg.method.num_classes
        views = copy.deepcopy(cfg.data.views)
        if self.mode == "rotate":  # SupCAM: RandomRotate and nothing else
            views.p_jitter = views.p_gray = views.p_blur = 0.0
            views.flips, views.recipe = False, "global_global"
        self.views = BatchViews(views, channels=cfg.data.channels)
        self.local = self.views.local["query"]  # "views": the query branch of the recipe

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        if "image" not in batch:
            return batch
        label = batch["label"]
        if label.numel() and (int(label.min()) < 0 or int(label.max()) >= self.num_classes):
            raise ConfigError(f"The training shards at '{self.shards}' hold labels outside 0..{self.num_classes - 1} "
                              f"(-1 = unlabelled); fine-tuning needs a class for every sample, so shard labelled "
                              f"data (e.g. `sslkit shard folder --label-regex ...`) and check method.num_classes.")
        x = self.views.unit(batch["image"])
        if self.mode != "none":
            x = self.views.branch(x, local=self.mode == "views" and self.local, generator=generator)
        return {"input": normalize(x), "label": label}


class Finetune(Method):
    has_classifier = True
    needs_class_count = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.finetune.init is not None and (cfg.model.init is not None or cfg.model.pretrained):
            other = "model.init" if cfg.model.init is not None else "model.pretrained"
            raise ConfigError(f"Config keys 'finetune.init' and '{other}' both give the backbone's first weights; "
                              f"fine-tuning takes finetune.init, so unset {other}.")

    @classmethod
    def untrained_config(cls, cfg: Config) -> Config:
        """The run's config points at its pretrained weights: the random baseline must not load them."""
        return apply_overrides(super().untrained_config(cfg), ["finetune.init=null"])

    @classmethod
    def init_source(cls, cfg: Config) -> tuple[str, Optional[str]]:
        """``finetune.init``; without it ``model.init`` (or ``model.pretrained``) as for any method."""
        return ("finetune.init", cfg.finetune.init) if cfg.finetune.init is not None else super().init_source(cfg)

    def __init__(
        self, *, backbone: nn.Module, num_classes: int, label_smoothing: float = 0.0,
        freeze_backbone: bool = False, inputs: ClassifierInputs | None = None,
    ) -> None:
        super().__init__()
        self.inputs = inputs
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.label_smoothing, self.frozen = label_smoothing, freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> Finetune:
        """A linear probe keeps the frozen backbone in eval mode (BatchNorm statistics fixed)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def prepare(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        return self.inputs(batch, generator) if self.inputs is not None else batch

    def logits(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, num_classes)."""
        if self.frozen:
            with torch.no_grad():
                feats = self.backbone(images)
        else:
            feats = self.backbone(images)
        return self.head(feats)

    def forward(self, batch: dict[str, Tensor]) -> StepOutput:
        logits = self.logits(batch["input"]).float()  # (B, K)
        label = batch["label"]
        loss = F.cross_entropy(logits, label, label_smoothing=self.label_smoothing)
        acc = (logits.detach().argmax(1) == label).float().mean()
        return StepOutput(loss, {"loss": loss.detach(), "acc": acc})

    def chance_loss(self) -> Optional[float]:
        """A classifier's chance: the cross-entropy of a uniform prediction over K classes (equal logits),
        log K, with or without label smoothing (the smoothed target still sums to 1). Equal features with
        a trained bias can do better on unbalanced classes, down to the entropy of the class frequencies."""
        return math.log(self.head.out_features)

    def after_optimizer_step(self, step: int) -> None:
        """Nothing to update: no momentum encoder, no queue."""

    @torch.no_grad()
    def embed(self, images: Tensor, *, encoder: str = "query", features: str = "backbone") -> Tensor:
        """(N, C, H, W) -> (N, D) backbone features, or (N, K) logits with ``features="projector"``."""
        return self.backbone(images) if features == "backbone" else self.logits(images)

    def classifier_net(self) -> nn.Module:
        """images -> logits with gradients through the backbone even when fine-tuning froze it (Grad-CAM)."""
        return nn.Sequential(self.backbone, self.head)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, K) class probabilities."""
        return self.logits(images).float().softmax(dim=1)


# ------------------------------------------------------------------ pretrained weights


def pretrained_backbone_state(init: str) -> dict[str, Tensor]:
    """The backbone state dict that ``finetune.init`` names (a run directory or a safetensors file)."""
    from sslkit.models.init import read_weights

    return read_weights(init, "finetune.init")


def _pretrained_model(init: str) -> dict[str, Any]:
    """What built the pretrained backbone: a run directory's model section, or the metadata that
    ``sslkit export`` writes into a .safetensors file (a file without it keeps the recipe's model)."""
    kind = init_kind(init, "finetune.init")
    if kind == "run":
        from sslkit.models.init import run_config

        stored = run_config(init, "finetune.init")
        return {**{key: getattr(stored.model, key) for key in MODEL_KEYS}, "size": stored.data.size}
    if kind == "checkpoint":  # a PyTorch/timm checkpoint says nothing about its network
        return {}
    from safetensors import safe_open

    with safe_open(init, framework="pt") as f:
        meta = f.metadata() or {}
    if "architecture" not in meta:
        return {}
    from sslkit.export import read_info

    info = read_info(init)
    return {"backbone": info["architecture"], "backbone_kwargs": info["backbone_kwargs"],
            "in_chans": info["in_chans"], "size": info["input_size"][-1]}


def finetune_config(cfg: Config) -> tuple[Config, list[str]]:
    """Check a fine-tuning config before training and copy the pretrained run's model section.

    Returns the config to train with and notes for the user (what was taken from the run).
    Raises ConfigError for a wrong method name, a missing ``eval.shards`` or a bad ``finetune.init``.
    """
    if cfg.method.name != "finetune":
        raise ConfigError(f"Config key 'method.name' is '{cfg.method.name}', but `sslkit finetune` trains "
                          "method.name=finetune; use `sslkit pretrain` for the other methods.")
    if not cfg.eval.shards:
        raise ConfigError("Config key 'eval.shards' is not set; fine-tuning reports test metrics, so point it at "
                          "held-out labelled shards (e.g. eval.shards=shards/clusters/test).")
    from sslkit.data.shardset import resolve_shards

    train_classes = resolve_shards(cfg.data.shards, manifest=cfg.data.manifest).classes
    try:
        eval_classes = resolve_shards(cfg.eval.shards).classes
    except (FileNotFoundError, ValueError) as err:  # the reader's message names data.shards
        raise ConfigError(f"Config key 'eval.shards' is '{cfg.eval.shards}', which cannot be read: "
                          f"{str(err).split(';')[0]}; point it at held-out labelled shards.") from None
    if train_classes and eval_classes and train_classes != eval_classes:
        raise ConfigError(f"The classes of data.shards ({', '.join(train_classes)}) and eval.shards "
                          f"({', '.join(eval_classes)}) differ, so their labels mean different things; "
                          "shard both splits with one command.")
    notes: list[str] = []
    cfg = copy.deepcopy(cfg)
    if cfg.finetune.init is None:
        notes.append("finetune.init is null: training from a random initialisation (the from-scratch baseline).")
    elif pretrained := _pretrained_model(cfg.finetune.init):  # MODEL_KEYS and the pretraining size
        for key in MODEL_KEYS:
            ours, theirs = getattr(cfg.model, key), pretrained[key]
            if ours != theirs:
                notes.append(f"model.{key}={theirs} from {cfg.finetune.init} (was {ours}).")
            setattr(cfg.model, key, copy.deepcopy(theirs))
        if cfg.data.channels != cfg.model.in_chans:  # the images must be what the backbone was built for
            notes.append(f"data.channels={cfg.model.in_chans} to match the pretrained network "
                         f"(was {cfg.data.channels}).")
            cfg.data.channels = cfg.model.in_chans
        if cfg.data.size != pretrained["size"]:
            notes.append(f"Note: data.size is {cfg.data.size} but {cfg.finetune.init} was pretrained at "
                         f"{pretrained['size']}; override data.size to fine-tune at the pretraining size.")
        validate(cfg)
    if cfg.data.channels != cfg.model.in_chans:
        raise ConfigError(f"Config keys 'data.channels' ({cfg.data.channels}) and 'model.in_chans' "
                          f"({cfg.model.in_chans}) differ; set both to the channels of the shards' images.")
    return cfg, notes


@register("finetune", Finetune)
def build_finetune(cfg: Config) -> Finetune:
    m, ft = cfg.model, cfg.finetune
    if cfg.method.num_classes < 1:
        raise ConfigError("Config key 'method.num_classes' is 0 and nothing filled it in from the manifest; "
                          "set it to the number of classes.")
    backbone = create_backbone(m.backbone, in_chans=m.in_chans, **m.backbone_kwargs)
    if ft.init is None and m.init is None and not m.pretrained:  # `sslkit finetune` says so when it trains
        log.info("finetune.init is null: the backbone starts from a random initialisation.")
    # build_method loads finetune.init into the backbone next (sslkit.models.init, Finetune.init_source)
    return Finetune(backbone=backbone, num_classes=cfg.method.num_classes, label_smoothing=ft.label_smoothing,
                    freeze_backbone=ft.freeze_backbone, inputs=ClassifierInputs(cfg))
