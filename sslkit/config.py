"""The one typed config tree: defaults live here and nowhere else.

A recipe is a YAML file under ``configs/``; the command line layers dotted
``key=value`` overrides on top. Everything is validated against the dataclasses
below before any heavy work starts, and unknown keys are refused with a message
that names the key (and the closest known one). Every user error is a ConfigError of one sentence
naming the key or file, what it accepts, and where the bad value was set (file or override).

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.max_steps=50"])
    cfg.optim.lr  # 0.0003
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import subprocess
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf._utils import get_yaml_loader  # OmegaConf.load's loader: 1e-3 is a float, no timestamps, no tags
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from sslkit.errors import ConfigError
from sslkit.methods.registry import names as method_names

RECIPES = Path(__file__).resolve().parent / "configs"  # the recipes shipped with sslkit


@dataclass
class RunConfig:
    name: str = "run"
    dir: Optional[str] = None  # default: runs/<name>
    seed: int = 0
    resume: str = "auto"  # auto | false | path to a checkpoint directory


@dataclass
class BalancedConfig:
    classes: int = 0  # P classes per batch; 0: plain shuffled batches (data.batch_size must be P x per_class)
    per_class: int = 2  # K samples of each (SCL: 2, the paired batches B1 and B2)
    buffer: int = 0  # samples kept per class and worker; 0: 8 x per_class


@dataclass
class ViewsConfig:
    # local_global (CCRL) | global_global (neither crops) | local_local (both crop: SimCLR)
    recipe: str = "local_global"
    local: str = "query"  # which branch gets the random resized crop: query | key
    backend: str = "tensor"  # tensor: whole batches on the training device | pil: per image in the workers
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # b, c, s, hue
    p_jitter: float = 0.8
    p_gray: float = 0.2
    p_blur: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    blur_kernel: int = 0  # odd kernel size; 0: about a tenth of data.size, MoCo v2's rule (3 at 32x32)
    rotation: float = 180.0  # degrees, uniform in [0, rotation]
    # HED stain jitter (tensor back-end, RGB): per sample and stain, amount x U(1-hed, 1+hed) + U(-hed, hed); 0: off
    hed: float = 0.0
    # gamma jitter (tensor back-end): x ** g per sample, log g ~ U(-gamma, gamma); 0: off
    gamma: float = 0.0
    flips: bool = True
    vflip: bool = True  # with flips: vertical flips too (SupCAM flips horizontally only)
    # multi-crop (dino): two global views at data.size (crop scale crop_scale) and local_crops smaller ones
    local_crops: int = 8  # local views per image (dino); 0: the two global views only
    local_size: int = 96  # output size of the local views, pixels
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])  # area fraction of a local view


@dataclass
class DataConfig:
    shards: str = "shards/demo/train"  # folder with manifest.json, brace pattern or URL
    manifest: Optional[str] = None  # default: manifest.json beside the shards
    size: int = 32
    channels: int = 3
    batch_size: int = 256  # per process
    workers: int = 2
    shuffle_buffer: int = 2000
    max_bad_fraction: float = 0.05  # stop when more than this share of what was read is corrupt or missing
    retries: int = 3  # remote shards (http(s), pipe:): reopenings in a row without a new byte before reading stops
    labels: str = "cls"  # sample field holding the integer class (used by evaluation only in CCRL)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    balanced: BalancedConfig = field(default_factory=BalancedConfig)  # class-balanced batches (SCL)


@dataclass
class ModelConfig:
    backbone: str = "preact_resnet18"  # any timm model name, or preact_resnet18 (3x3 stem, 32x32)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {width: 32}
    in_chans: int = 3
    projector: list[int] = field(default_factory=lambda: [128, 64])  # hidden, out (input = backbone dim)
    embed_dim: int = 128  # SupCAM's fc output (no projector), SCL's embedding E (1024 in the paper)
    predictor: list[int] = field(default_factory=lambda: [32, 64])  # hidden, out (out = projector out)
    head_norm: bool = True  # BatchNorm in the hidden layer of the heads
    channels_last: bool = False  # see README: channels_last + CPU + checkpointing corrupted memory in torch 2.14
    sync_bn: bool = False  # SyncBatchNorm across ranks (GPUs only; on CPU use method.shuffle_bn)
    # continued pretraining: the backbone's first weights, from a run directory, an exported .safetensors file or
    # a PyTorch/timm checkpoint (.pth, .pt, .bin, .ckpt); null: random initialisation (sslkit.models.init)
    init: Optional[str] = None
    init_strict: bool = True  # true: every key of model.init must fit the backbone; false: load what fits, warn
    pretrained: bool = False  # timm's published weights for model.backbone (from the Hugging Face cache offline)


@dataclass
class MethodConfig:
    """All methods' parameters in one section; each method reads its own."""

    name: str = "ccrl"  # sslkit.methods.registry.names(): ccrl | supcam | scl | simclr | autoencoder | finetune | dino
    tau: float = 0.07  # temperature: ccrl, supcam, simclr (SSCL: 0.7)
    queue_size: int = 65536  # ccrl, supcam (1,024)
    momentum: float = 0.999  # ccrl, supcam
    in_batch_negatives: bool = True  # ccrl: True; MoCo v2: False
    shuffle_bn: bool = False  # ccrl, supcam: key encoder sees a batch shuffled across ranks (MoCo's shuffle-BN)
    use_predictor: bool = True  # ccrl
    # supcam
    margin: float = 0.2  # additive angular margin of the self-margin loss (radians)
    use_self_margin: bool = True  # L = L_SC + L_SM; false: L_SC alone (the "+SupCon" ablation)
    table: str = "middle"  # composition look-up table: middle | light | heavy | none
    p_cap: int = 200  # overlap pixels up to which a composite counts as touching
    tries: int = 10  # shift draws before an uncertain composite falls back to the candidate
    combine: str = "equal"  # where both images have foreground: equal | lambda | max
    roles: list[str] = field(default_factory=lambda: ["I", "T", "O", "TO"])  # cluster type of each class
    composite: dict[str, int] = field(default_factory=dict)  # composite type -> class; default: by roles
    background: int = 0  # background grey level of the images (white karyograms: 255)
    threshold: int = 0  # foreground: differs from background by more than this
    # scl
    gamma: float = 2.0  # focal loss exponent (scl)
    scale_init: float = 10.0  # initial value of the learnable similarity scale t (scl)
    con_weight: float = 1.0  # L = con_weight * L_con + cls_weight * L_cls (scl)
    cls_weight: float = 1.0
    num_classes: int = 0  # classifier outputs (scl, finetune); 0: the number of classes in the manifest
    # simclr
    projection: str = "mlp"  # mlp (model.projector) | linear (SSCL: one linear layer to model.projector[1])
    # autoencoder
    arch: str = "conv"  # fc | conv | conv_pool | resnet (DCAE's models; conv is its best, no max-pool)
    latent: int = 64  # bottleneck size for fc; conv bottlenecks are their last feature map
    ae_norm: bool = True  # BatchNorm in the autoencoder layers
    # dino (self-distillation; data.views gives the multi-crop views)
    prototypes: int = 65536  # K: outputs of the DINO head's weight-normalised last layer
    head_hidden: int = 2048  # DINO head: MLP hidden width
    head_bottleneck: int = 256  # DINO head: bottleneck before the last layer
    head_layers: int = 3  # DINO head: linear layers before the last one
    norm_last_layer: bool = True  # last layer's weight rows kept at unit norm (false: their norm is learned)
    head_batch_norm: bool = False  # BatchNorm after the DINO head's hidden layers (helps ResNet backbones)
    freeze_last_layer_epochs: float = 1.0  # the last layer is not updated for this many epochs
    teacher_momentum: list[float] = field(default_factory=lambda: [0.996, 1.0])  # start, end (cosine over the run)
    student_temp: float = 0.1
    teacher_temp: list[float] = field(default_factory=lambda: [0.04, 0.07])  # start, end of the warm-up
    teacher_temp_warmup_epochs: float = 30.0  # linear warm-up of the teacher temperature
    center_momentum: float = 0.9  # EMA of the teacher's centre
    centering: str = "center"  # center (EMA centre) | sinkhorn_knopp (DINOv2)
    ibot: bool = False  # masked patch-token distillation (ViT backbones)
    ibot_weight: float = 1.0
    ibot_separate_head: bool = False  # a patch head of its own (false: the DINO head)
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # share of patches masked, per image
    mask_share: float = 0.5  # share of global views that are masked
    koleo_weight: float = 0.0  # KoLeo regulariser on the student's class tokens (DINOv2: 0.1)


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant | step
    milestones: list[float] = field(default_factory=list)  # step schedule: where lr *= gamma, in milestone_unit
    milestone_unit: str = "auto"  # auto (epochs when train.epochs > 0, else steps) | epochs | steps
    gamma: float = 0.1  # step schedule factor
    min_lr: float = 0.0
    grad_clip: Optional[float] = None
    weight_decay_end: Optional[float] = None  # cosine schedule of the weight decay to this value; null: constant
    layer_decay: float = 1.0  # layer-wise lr decay: block i of n gets lr x layer_decay^(n - i) (timm models)
    patch_embed_lr_mult: float = 1.0  # lr multiplier of a ViT's patch embedding (DINOv2: 0.2)


@dataclass
class AlertConfig:
    """Rules on the logged signals that flag a failing run while it trains (sslkit.alerts; docs/training.md)."""

    action: str = "warn"  # warn: a log warning, alerts.jsonl and a tracker alert | stop: that, then end the run | off
    patience: int = 5  # logged steps in a row the collapse or chance condition must hold before the alert fires
    collapse_below: Optional[float] = 0.05  # collapse: health/std_ratio below this (1 uniform, 0 one point); null: off
    rank_below: Optional[float] = 0.05  # rank: health/rankme_ratio (effective rank / min(B, D)) below this; null: off
    chance_margin: Optional[float] = 0.03  # chance: loss above (1 - this) x the method's chance loss; null: off
    chance_after: int = 100  # chance, uniform: judged from this optimizer step on (every run starts at chance)
    uniform_above: Optional[float] = 0.97  # uniform: teacher_entropy (dino; 1: a uniform teacher) above this; null: off
    nonfinite: bool = True  # nonfinite: a step skipped for a non-finite loss or gradient since the last logged step


@dataclass
class TrainConfig:
    max_steps: int = 1000
    epochs: int = 0  # when > 0, max_steps = epochs x batches per epoch; an override of max_steps sets it to 0
    precision: str = "auto"  # auto (the launcher's --mixed_precision, else no) | no | bf16 | fp16 (GPU only)
    grad_accum: int = 1  # micro-batches per optimizer step; keys enter the queue once per step (README)
    max_bad_steps: int = 10  # stop after this many steps in a row with a non-finite loss or gradient (each is skipped)
    compile: bool = False  # torch.compile the model in place (slow to start: about a minute on CPU)
    log_every: int = 10
    ckpt_every: int = 500
    keep_ckpts: int = 2
    # online evaluation (kNN, k-means AMI/ARI on eval.online_samples held-out crops) every N steps; 0: off
    eval_every: int = 0
    threads: int = 0  # torch intra-op threads per process; 0 leaves torch's default
    alert: AlertConfig = field(default_factory=AlertConfig)


@dataclass
class EvalConfig:
    shards: Optional[str] = None  # default: data.shards
    encoder: str = "momentum"  # momentum | query
    features: str = "backbone"  # backbone | projector | patches (a ViT's patch tokens, mean-pooled: dino)
    normalize: bool = True
    whiten: int = 0  # PCA-whiten the features to this many dimensions before k-means (then L2 again); 0: off
    k: Optional[int] = None  # k-means clusters; default: number of classes
    restarts: int = 5
    niter: int = 50
    # k-means trains on a seeded sample this large (at least 256 per cluster), then assigns all; null: all points
    kmeans_max_train: Optional[int] = 100_000
    knn_k: int = 20
    knn_tau: float = 0.07
    # above this many crops the leave-one-out kNN searches an IVF index (recall@k against exact search measured
    # and written to metrics.json) instead of all pairs, whose cost grows as N^2; null: always exact
    knn_exact_max: Optional[int] = 200_000
    batch_size: int = 512
    max_samples: Optional[int] = None
    baselines: bool = True
    # the baselines are scored on a seeded sample of this many evaluation crops (the same for each); null: all
    baseline_samples: Optional[int] = 100_000
    morphology: bool = False  # also score morphological features of each crop's central object (a third baseline)
    probe: bool = True  # logistic-regression probe on frozen features (trained on data.shards, or cross-validated)
    probe_samples: int = 10_000  # training crops the probe is fitted on (the first ones of data.shards)
    plots: bool = True  # eval/*.png: embedding map, confusion matrices, curves, cluster gallery, Grad-CAM
    projection: str = "umap"  # embedding map: umap | tsne
    gallery: int = 12  # example crops per cluster in the gallery
    online_samples: int = 2000  # held-out crops used by train.eval_every


@dataclass
class FinetuneConfig:
    init: Optional[str] = None  # pretrained backbone: a run directory or a .safetensors backbone file
    label_smoothing: float = 0.0  # cross-entropy label smoothing (SupCAM: 0.1)
    freeze_backbone: bool = False  # true: a linear probe on frozen features
    # training augmentation: rotate (SupCAM: RandomRotate only) | views (data.views, one branch) | none
    views: str = "rotate"


@dataclass
class TrackerConfig:
    name: str = "wandb"  # wandb | tensorboard | none
    project: str = "sslkit"
    mode: str = "offline"  # offline | online (online needs WANDB_API_KEY)


@dataclass
class MilConfig:
    """Attention-MIL slide classification on per-slide feature bags (``sslkit mil``; docs/slides.md)."""

    features: Optional[str] = None  # folder of <slide_id>.h5 bags (what `sslkit extract --out` writes)
    labels: Optional[str] = None  # CSV with one row per slide: its id, its label and (optionally) its patient
    slide_column: str = "slide_id"  # the CSV column holding the slide id (a bag's file name without .h5)
    label_column: str = "label"  # the CSV column holding the class name (any text; classes sorted by name)
    # the CSV column naming each slide's patient (no patient in two folds); null, or a CSV without a column
    # 'patient' when left at this default: each slide is its own patient
    patient_column: Optional[str] = "patient"
    missing_bags: str = "error"  # a CSV row whose slide has no bag: error | skip (listed in metrics.json)
    slides: Optional[str] = None  # folder of the slide files, for heatmap thumbnails; null: each bag's slide_path
    folds: int = 5  # k of the k-fold cross-validation, grouped by patient and stratified by label
    val_share: float = 0.2  # share of each fold's training patients held out for early stopping; 0: none
    epochs: int = 50  # most passes over the training slides (one slide per optimizer step)
    patience: int = 10  # stop after this many epochs without a lower validation loss (best weights kept)
    lr: float = 2.0e-4  # Adam
    weight_decay: float = 1.0e-4  # Adam's L2 penalty
    hidden: int = 128  # width of the tile embedding h = ReLU(fc(x))
    attention_dim: int = 128  # width of the gated attention branches V and U
    dropout: float = 0.25  # after the tile embedding, in training
    class_weights: bool = True  # cross-entropy weighted by inverse class frequency of the training slides
    heatmaps: bool = True  # attention heatmap and top-tile gallery PNG per slide (eval/mil/heatmaps/)
    top_tiles: int = 16  # tiles in each slide's gallery of the most attended tiles
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    mil: MilConfig = field(default_factory=MilConfig)


CHOICES = {
    "data.views.recipe": ("local_global", "global_global", "local_local"),
    "data.views.local": ("query", "key"),
    "data.views.backend": ("tensor", "pil"),
    "method.table": ("middle", "light", "heavy", "none"),
    "method.combine": ("equal", "lambda", "max"),
    "method.projection": ("mlp", "linear"),
    "method.arch": ("fc", "conv", "conv_pool", "resnet"),
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.schedule": ("cosine", "constant", "step"),
    "optim.milestone_unit": ("auto", "epochs", "steps"),
    "train.precision": ("auto", "no", "bf16", "fp16"),
    "train.alert.action": ("warn", "stop", "off"),
    "finetune.views": ("rotate", "views", "none"),
    "eval.encoder": ("momentum", "query"),
    "eval.features": ("backbone", "projector", "patches"),
    "method.centering": ("center", "sinkhorn_knopp"),
    "eval.projection": ("umap", "tsne"),
    "tracker.name": ("wandb", "tensorboard", "none"),
    "tracker.mode": ("offline", "online"),
    "mil.missing_bags": ("error", "skip"),
    "mil.device": ("auto", "cpu", "cuda"),
}


# Inclusive "[" / exclusive "(" bounds of numeric keys that the types alone do not limit; a list is
# checked element by element, and null (off) always passes. Every float must also be finite.
RANGES = {
    "data.channels": "[1, inf)", "data.shuffle_buffer": "[0, inf)", "data.views.p_jitter": "[0, 1]",
    "data.views.p_gray": "[0, 1]", "data.views.p_blur": "[0, 1]", "data.views.rotation": "[0, 360]",
    "data.views.crop_scale": "(0, 1]", "data.views.jitter": "[0, inf)", "data.views.blur_sigma": "(0, inf)",
    "model.in_chans": "[1, inf)", "model.embed_dim": "[1, inf)", "model.projector": "[1, inf)",
    "model.predictor": "[1, inf)", "method.margin": "[0, inf)", "method.p_cap": "[0, inf)", "method.tries": "[1, inf)",
    "method.background": "[0, 255]", "method.threshold": "[0, 255]", "method.gamma": "[0, inf)",
    "method.scale_init": "(0, inf)", "method.con_weight": "[0, inf)", "method.cls_weight": "[0, inf)",
    "method.num_classes": "[0, inf)", "method.latent": "[1, inf)", "optim.weight_decay": "[0, inf)",
    "optim.momentum": "[0, 1]", "optim.betas": "[0, 1)", "optim.warmup_steps": "[0, inf)",
    "optim.milestones": "[0, inf)", "optim.gamma": "(0, inf)", "optim.min_lr": "[0, inf)",
    "optim.grad_clip": "(0, inf)",
    "data.views.hed": "[0, 1]", "data.views.gamma": "[0, 2]",
    "train.epochs": "[0, inf)", "train.log_every": "[1, inf)", "train.ckpt_every": "[1, inf)",
    "train.keep_ckpts": "[1, inf)", "train.threads": "[0, inf)", "train.alert.patience": "[1, inf)",
    "train.alert.collapse_below": "(0, 1]", "train.alert.rank_below": "(0, 1]", "train.alert.chance_margin": "(0, 1)",
    "train.alert.chance_after": "[0, inf)", "train.alert.uniform_above": "(0, 1]", "eval.k": "[1, inf)",
    "eval.restarts": "[1, inf)",
    "eval.niter": "[1, inf)", "eval.whiten": "[0, inf)", "eval.kmeans_max_train": "[1, inf)",
    "eval.knn_tau": "(0, inf)", "eval.knn_exact_max": "[1, inf)", "eval.baseline_samples": "[1, inf)",
    "eval.batch_size": "[1, inf)", "eval.max_samples": "[1, inf)", "eval.gallery": "[0, inf)",
    "finetune.label_smoothing": "[0, 1)",
    "data.views.local_crops": "[0, inf)", "data.views.local_size": "[8, inf)", "data.views.local_scale": "(0, 1]",
    "method.prototypes": "[2, inf)", "method.head_hidden": "[1, inf)", "method.head_bottleneck": "[1, inf)",
    "method.head_layers": "[1, inf)", "method.freeze_last_layer_epochs": "[0, inf)",
    "method.teacher_momentum": "[0, 1]", "method.student_temp": "(0, inf)", "method.teacher_temp": "(0, inf)",
    "method.teacher_temp_warmup_epochs": "[0, inf)", "method.center_momentum": "[0, 1]",
    "method.ibot_weight": "[0, inf)", "method.mask_ratio": "[0, 1]", "method.mask_share": "[0, 1]",
    "method.koleo_weight": "[0, inf)", "optim.weight_decay_end": "[0, inf)", "optim.layer_decay": "(0, 1]",
    "optim.patch_embed_lr_mult": "[0, inf)",
    "mil.folds": "[2, inf)", "mil.val_share": "[0, 0.5]", "mil.epochs": "[1, inf)", "mil.patience": "[1, inf)",
    "mil.lr": "(0, inf)", "mil.weight_decay": "[0, inf)", "mil.hidden": "[1, inf)", "mil.attention_dim": "[1, inf)",
    "mil.dropout": "[0, 1)", "mil.top_tiles": "[0, inf)",
}
MAX_VALUES = 100_000  # values a config may hold with YAML aliases expanded ("billion laughs" would hang the merge)
_DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.\w+)*")
_QUOTED_KEY = re.compile(r"'([a-z_]+(?:\.[a-z_0-9]+)+)'")  # how messages name keys: 'optim.lr'


def _known_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(value, DictConfig) and OmegaConf.get_type(value) is not dict:
            keys.extend(_known_keys(value, dotted + "."))
    return keys


def _unknown_key(key: str, section: type, prefix: str, source: str) -> ConfigError:
    names = ", ".join(typing.get_type_hints(section))
    hint = difflib.get_close_matches(key[len(prefix):], list(typing.get_type_hints(section)), n=1)  # in its section
    fix = (f"did you mean '{prefix}{hint[0]}'?" if hint else
           f"the keys of '{prefix[:-1]}' are {names}." if prefix else f"the sections are {names}.")
    return ConfigError(f"Unknown config key '{_clean(key)}' in {source}; {fix}")


def _unknown_key_error(err: ConfigKeyError, schema: DictConfig, source: str) -> ConfigError:
    full_key = getattr(err, "full_key", None) or str(err).split("'")[1]
    section, _, _ = full_key.rpartition(".")
    kind = _field_type(section) if section else Config
    return _unknown_key(full_key, kind if dataclasses.is_dataclass(kind) else Config, section and section + ".", source)


def _field_type(key: str) -> Any:
    """The declared type of a dotted key ('optim.lr' -> float, 'model.projector[0]' -> int), or None."""
    kind: Any = Config
    for part in re.split(r"\.|(?=\[)", key):
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if part.startswith("[") and origin is list:
            kind = args[0]
        elif origin is dict:
            kind = args[1]
        elif dataclasses.is_dataclass(kind) and part in typing.get_type_hints(kind):
            kind = typing.get_type_hints(kind)[part]
        else:
            return None
    return kind


_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", Any: "a value"}
_PLURALS = {int: "whole numbers", float: "numbers", str: "strings", bool: "booleans", Any: "values"}


def _describe(kind: Any) -> str:
    """'a whole number', 'a number or null', 'a list of numbers', ... for a declared type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        return f"{_describe(next(a for a in args if a is not type(None)))} or null"
    if origin is list:
        return f"a list of {_PLURALS.get(args[0], 'values')}"
    if origin is dict:
        return "a mapping" if args[1] is Any else f"a mapping of names to {_PLURALS.get(args[1], 'values')}"
    if dataclasses.is_dataclass(kind):
        return f"a section (a mapping of {', '.join(typing.get_type_hints(kind))})"
    return _TYPE_NAMES.get(kind, str(kind))


def _show(value: Any) -> str:
    text = {True: "true", False: "false", None: "null"}.get(value, None) if isinstance(value, (bool, type(None))) \
        else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _clean(text: Any) -> str:
    """User text (a key, an override, a path) as it may appear in a one-line message: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _count_values(value: Any, limit: int = MAX_VALUES) -> int:
    """Values in ``value``, an aliased (shared) part counted each time it occurs; stops past ``limit``."""
    stack, count = [value], 0
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _yaml(text: str, source: str) -> Any:
    """Plain Python values from YAML text, read as OmegaConf reads it; ConfigError naming ``source`` otherwise."""
    try:
        value = yaml.load(text, Loader=get_yaml_loader())  # a SafeLoader: tags such as !!python/... are refused
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML{where} ({problem}); fix the syntax "
                          "(indent with spaces; tags such as !!python/... are not allowed).") from None
    except RecursionError:
        raise ConfigError(f"{source} nests lists or mappings too deeply to read; flatten it.") from None
    if _count_values(value) > MAX_VALUES:
        raise ConfigError(f"{source} holds more than {MAX_VALUES:,} values once its YAML aliases are expanded; "
                          "write the values out.")
    return value


def _read_file(path: Path) -> dict:
    """The sections of a YAML config file, checked to be YAML holding a mapping."""
    if not path.is_file():
        what = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(f"Config file '{_clean(path)}' {what}; pick one of the recipes in configs/.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"Config file '{_clean(path)}' is not UTF-8 text; save it as UTF-8 YAML.") from None
    except OSError as err:
        raise ConfigError(f"Config file '{_clean(path)}' cannot be read ({err.strerror}); "
                          "check its permissions.") from None
    data = _yaml(text, f"Config file '{_clean(path)}'")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{_clean(path)}' holds {_show(data)} at its top level instead of sections; "
                          "write sections such as 'optim: {lr: 0.001}' (see configs/ccrl.yaml).")
    return data


def _check_tree(data: dict, section: type, prefix: str, source: str) -> None:
    """Refuse unknown keys, and a section, list or mapping given as something else, naming the key
    (OmegaConf's own errors for these name no key, or the wrong one)."""
    hints = typing.get_type_hints(section)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in hints:
            raise _unknown_key(dotted, section, prefix, source)
        kind = hints[key]
        if isinstance(value, str) and "${" in value:  # an interpolation: resolved, and checked, later
            continue
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"Config key '{dotted}' in {source} is {_describe(kind)}, got {_show(value)}; "
                                  f"set its keys as {dotted}.KEY=VALUE or in a mapping.")
            _check_tree(value, kind, dotted + ".", source)
        elif typing.get_origin(kind) in (list, dict) and not isinstance(value, typing.get_origin(kind)):
            raise ConfigError(f"Config key '{dotted}' in {source} must be {_describe(kind)}, got {_show(value)}.")


def _lookup(data: Any, key: str) -> Any:
    """The value at a dotted key ('model.projector[0]') in plain data, or KeyError."""
    for part in re.split(r"\.|(?=\[)", key):
        data = data[int(part[1:-1])] if part.startswith("[") else data[part]
    return data


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise _unknown_key_error(err, base, source) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "?"
        try:
            value, kind = _lookup(other, key), _field_type(key)
        except (KeyError, IndexError, TypeError, ValueError):
            value, kind = None, None
        if kind is not None:
            raise ConfigError(f"Config key '{key}' in {source} must be {_describe(kind)}, "
                              f"got {_show(value)}.") from None
        reason = str(err.msg).splitlines()[0].rstrip(".")
        raise ConfigError(f"Bad value for config key '{key}' in {source}: {reason}.") from None


def _parse_override(item: str) -> dict:
    """``key=value`` as nested plain data, the value read as YAML (as OmegaConf's dotlist reads it)."""
    key, eq, text = item.partition("=")
    if not eq or not _DOTTED_KEY.fullmatch(key.strip()):
        raise ConfigError(f"Override '{_clean(item)}' is not of the form key=value with a dotted key "
                          "(for example optim.lr=3e-4, or model.projector=[256,128] for a whole list).")
    value = _yaml(text, f"The value of override '{_clean(item)}'")
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _to_object(merged: DictConfig, where: Any) -> Config:
    """The typed config, interpolations resolved; ``where(key)`` names the source of a key that fails."""
    try:
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as err:
        key = err.full_key
        raise ConfigError(f"Config key '{key}' in {where(key)} is ??? (missing); give it a value.") from None
    except OmegaConfBaseException as err:
        key, reason = getattr(err, "full_key", "") or "?", str(err.msg).splitlines()[0].rstrip(".")
        raise ConfigError(f"Config key '{key}' in {where(key)} cannot be resolved ({reason}); an interpolation "
                          "such as ${data.size} must name a key of the right type, and ${oc.env:NAME} a set "
                          "environment variable.") from None


def _origin(key: str, overrides: list[str] | tuple[str, ...], file: Optional[tuple[Path, dict]]) -> str:
    """Where the value of ``key`` was set: the last override naming it (or its section), the file, or nowhere."""
    for item in reversed(overrides):
        name = item.partition("=")[0].strip()
        if key == name or key.startswith(name + ".") or name.startswith(key + "."):
            return f"set by override '{_clean(item)}'"
    if file is not None:
        data: Any = file[1]
        for part in key.split("."):
            data = data.get(part, _origin) if isinstance(data, dict) else _origin
        if data is not _origin:
            return f"set in config file '{_clean(file[0])}'"
    return "left at its default"


def _attributed(message: str, overrides: list[str] | tuple[str, ...], file: Optional[tuple[Path, dict]]) -> str:
    """A ``validate`` message with where each config key it names was set, still one sentence."""
    keys = [key for key in dict.fromkeys(_QUOTED_KEY.findall(message)) if _field_type(key) is not None]
    if not keys:
        return message
    notes = [_origin(key, overrides, file) for key in keys]
    note = notes[0] if len(keys) == 1 else ", ".join(f"{key} {n}" for key, n in zip(keys, notes))
    end = message[-1] if message[-1] in ".?" else "."
    return f"{message.rstrip('.?')} ({note}){end}"


def _in_range(value: Any, bounds: str) -> bool:
    low, high = (float(b) for b in bounds[1:-1].split(","))
    above = low <= value if bounds[0] == "[" else low < value
    return above and (value <= high if bounds[-1] == "]" else value < high)


def _leaves(node: Any, prefix: str = "") -> Any:
    """(dotted key, value) of every scalar and list in plain config data."""
    for name, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _check_ranges(plain: dict) -> None:
    """Raise ConfigError naming the first key whose number is out of ``RANGES`` or not finite."""
    for key, value in _leaves(plain):
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, float) and not math.isfinite(item) for item in items):
            raise ConfigError(f"Config key '{key}' is {_show(value)}; give a finite number.")
        bounds = RANGES.get(key)
        if bounds and any(item is not None and not _in_range(item, bounds) for item in items):
            raise ConfigError(f"Config key '{key}' must be in {bounds}, got {_show(value)}.")
    scale, betas = plain["data"]["views"]["crop_scale"], plain["optim"]["betas"]
    if len(scale) != 2 or scale[0] > scale[1]:
        raise ConfigError(f"Config key 'data.views.crop_scale' is the [smallest, largest] share of the area, "
                          f"got {scale}.")
    if len(betas) != 2:
        raise ConfigError(f"Config key 'optim.betas' is Adam's [beta1, beta2], got {betas}.")


def check_balanced(data: DataConfig) -> None:
    """Raise ConfigError unless ``data.balanced`` is off or agrees with ``data.batch_size``."""
    balanced = data.balanced
    if balanced.classes < 0 or balanced.per_class < 1 or balanced.buffer < 0:
        raise ConfigError("Config keys 'data.balanced.classes' (0 = off), 'data.balanced.per_class' (>= 1) and "
                          f"'data.balanced.buffer' (0 = 8 x per_class) got {balanced.classes}, "
                          f"{balanced.per_class} and {balanced.buffer}.")
    if balanced.classes and data.batch_size != balanced.classes * balanced.per_class:
        raise ConfigError(f"Config key 'data.batch_size' is {data.batch_size} but balanced batches hold "
                          f"'data.balanced.classes' x 'data.balanced.per_class' = "
                          f"{balanced.classes * balanced.per_class}; make them agree.")


def _check_no_api_key(tree: dict[str, Any], prefix: str = "") -> None:
    """The config is written to config.yaml, every checkpoint and the tracker: it must not hold the W&B
    API key (an ``${oc.env:WANDB_API_KEY}`` interpolation, or the key pasted into an override)."""
    key = os.environ.get("WANDB_API_KEY", "")
    if len(key) < 8:  # unset, or too short to tell from an ordinary value
        return
    for name, value in tree.items():
        dotted = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, dict):
            _check_no_api_key(value, dotted)
        elif key in str(value):
            raise ConfigError(f"Config key '{dotted}' holds the value of WANDB_API_KEY, which would be written to "
                              "config.yaml, checkpoints and the tracker; remove it (W&B reads the key from the "
                              "environment).")


def validate(cfg: Config) -> None:
    """Check the values that the types alone cannot; raise ConfigError naming the key."""
    plain = to_dict(cfg)
    _check_ranges(plain)
    _check_no_api_key(plain)
    for dotted, allowed in {"method.name": method_names(), **CHOICES}.items():
        value = _lookup(plain, dotted)
        if value not in allowed:
            raise ConfigError(f"Config key '{dotted}' is '{value}'; choose one of {', '.join(allowed)}.")
    positive = {
        "data.size": cfg.data.size, "data.batch_size": cfg.data.batch_size,
        "train.max_steps": cfg.train.max_steps, "train.grad_accum": cfg.train.grad_accum,
        "method.queue_size": cfg.method.queue_size, "method.tau": cfg.method.tau,
        "optim.lr": cfg.optim.lr, "eval.knn_k": cfg.eval.knn_k,
    }
    for dotted, value in positive.items():
        if not value > 0:
            raise ConfigError(f"Config key '{dotted}' must be positive, got {value}.")
    if len(cfg.model.projector) != 2 or len(cfg.model.predictor) != 2:
        raise ConfigError("Config keys 'model.projector' and 'model.predictor' are [hidden, out] lists.")
    if not 0.0 <= cfg.method.momentum <= 1.0:
        raise ConfigError(f"Config key 'method.momentum' must be in [0, 1], got {cfg.method.momentum}.")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0 or cfg.train.max_bad_steps < 1:
        raise ConfigError(f"Config keys 'data.max_bad_fraction' (0 to 1) and 'train.max_bad_steps' (>= 1) got "
                          f"{cfg.data.max_bad_fraction} and {cfg.train.max_bad_steps}.")
    if cfg.data.retries < 0:
        raise ConfigError(f"Config key 'data.retries' must be 0 or more, got {cfg.data.retries}.")
    if cfg.data.workers < 0:
        raise ConfigError(f"Config key 'data.workers' must be 0 or more, got {cfg.data.workers}.")
    check_balanced(cfg.data)
    if cfg.train.eval_every < 0 or cfg.eval.online_samples < 2 or cfg.eval.probe_samples < 1:
        raise ConfigError(f"Config keys 'train.eval_every' (0 = off), 'eval.online_samples' (>= 2) and "
                          f"'eval.probe_samples' (>= 1) got {cfg.train.eval_every}, {cfg.eval.online_samples} "
                          f"and {cfg.eval.probe_samples}.")
    if cfg.train.eval_every and not cfg.eval.shards:
        raise ConfigError("Config key 'train.eval_every' turns on online evaluation, which needs labelled held-out "
                          "shards: set eval.shards, or train.eval_every=0.")
    if cfg.data.views.gamma > 0 and cfg.data.views.backend != "tensor":
        raise ConfigError(f"Config key 'data.views.gamma' is {cfg.data.views.gamma}: gamma jitter is made by the "
                          "tensor back-end only; set data.views.backend=tensor or data.views.gamma=0.")
    if cfg.data.views.hed > 0 and (cfg.data.views.backend != "tensor" or cfg.data.channels != 3):
        raise ConfigError(f"Config key 'data.views.hed' is {cfg.data.views.hed}: HED stain jitter is made by the "
                          "tensor back-end on RGB crops; set data.views.backend=tensor and data.channels=3, or "
                          "data.views.hed=0.")
    if cfg.optim.schedule == "step" and not cfg.optim.milestones:
        raise ConfigError("Config key 'optim.schedule' is 'step' but 'optim.milestones' is empty; "
                          "give the epochs (or steps) at which the learning rate drops, e.g. [8, 12].")
    kernel = cfg.data.views.blur_kernel
    if kernel != 0 and (kernel < 3 or kernel % 2 == 0):
        raise ConfigError(f"Config key 'data.views.blur_kernel' must be 0 (about a tenth of data.size) "
                          f"or an odd size of at least 3, got {kernel}.")
    _check_init(cfg.model)
    _check_method(cfg)


def _check_init(model: ModelConfig) -> None:
    """One source for the backbone's first weights. Whether ``model.init`` exists is checked by
    ``load_config`` (a new run) and where the weights are read, not here: ``validate`` also checks
    stored configs (evaluation's overrides), whose init may have moved since the run trained."""
    if model.init is not None and not model.init.strip():
        raise ConfigError("Config key 'model.init' is an empty string; give a run directory, a .safetensors file or "
                          "a checkpoint file, or null to start from a random initialisation.")
    if model.pretrained and model.init is not None:
        raise ConfigError(f"Config keys 'model.pretrained' (true) and 'model.init' ('{_clean(model.init)}') "
                          "both give the backbone's first weights; set model.pretrained=false or model.init=null.")


def check_mil(mil: MilConfig) -> None:
    """What ``sslkit mil`` needs beyond ``validate``: the bag folder, the labels CSV and the slide folder
    exist, and the CSV columns are named apart. Not part of ``validate``: other commands leave them unset."""
    for key, value, what in (("features", mil.features, "the folder of <slide>.h5 bags that `sslkit extract --out` "
                                                         "wrote"),
                             ("labels", mil.labels, "the CSV of slide labels (columns slide_id,label[,patient])")):
        if not value:
            raise ConfigError(f"Config key 'mil.{key}' is not set; give {what}, e.g. mil.{key}=PATH.")
    checks = (("features", mil.features, Path.is_dir, "a folder"), ("labels", mil.labels, Path.is_file, "a file"),
              ("slides", mil.slides, Path.is_dir, "a folder"))
    for key, value, test, kind in checks:
        if value is not None and not test(Path(value)):
            found = "does not exist" if not Path(value).exists() else f"is not {kind}"
            fallback = " (or null: thumbnails from each bag's slide_path)" if key == "slides" else ""
            raise ConfigError(f"Config key 'mil.{key}' is '{_clean(value)}', which {found}; give {kind} that "
                              f"exists{fallback}.")
    columns = [c for c in (mil.slide_column, mil.label_column, mil.patient_column) if c is not None]
    if any(not c.strip() for c in columns) or len(set(columns)) != len(columns):
        raise ConfigError(f"Config keys 'mil.slide_column', 'mil.label_column' and 'mil.patient_column' must name "
                          f"different, non-empty CSV columns, got {_show(columns)}.")


def _check_method(cfg: Config) -> None:
    """The method's own rules (its module's ``check_config``). They run after the checks above, and
    import the method's module (torch): a config with a mistake every method shares fails earlier."""
    from sslkit.methods.registry import entry

    method = entry(cfg.method.name).cls
    if cfg.data.views.backend == "pil" and not method.worker_views:
        raise ConfigError(f"Config key 'data.views.backend' is 'pil', which makes query/key views in the workers; "
                          f"method '{cfg.method.name}' makes its own inputs: set data.views.backend=tensor.")
    method.check_config(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated; returns a typed ``Config``.

    Raises ConfigError, one sentence naming the key (or the file), what it accepts and where the bad
    value was set, for a missing or unreadable file, YAML that does not parse, an unknown key, a value
    of the wrong type or out of range, or an override that is not ``key=value``."""
    merged, file = OmegaConf.structured(Config), None
    if path is not None:
        path = Path(path)
        file = (path, _read_file(path))
        source = f"config file '{_clean(path)}'"
        _check_tree(file[1], Config, "", source)
        merged = _merge(merged, file[1], source)
    cfg = _to_object(merged, lambda key: f"config file '{_clean(path)}'")
    cfg = _apply(cfg, overrides, file)
    if cfg.model.init is not None:  # a new run's weights must be there; a stored config is not rechecked
        try:
            init_kind(cfg.model.init, "model.init")
        except ConfigError as err:
            raise ConfigError(_attributed(str(err), overrides, file)) from None
    return cfg


def load_mil_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """``load_config``, then ``check_mil``: the config of ``sslkit mil``, its errors naming where each key was set."""
    cfg = load_config(path, overrides)
    try:
        check_mil(cfg.mil)
    except ConfigError as err:
        file = (Path(path), _read_file(Path(path))) if path is not None else None
        raise ConfigError(_attributed(str(err), overrides, file)) from None
    return cfg


INIT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")  # PyTorch/timm checkpoints a backbone's init may come from


def init_kind(init: str, key: str) -> str:
    """What the weights file or folder ``init`` (config key ``key``) is: "run" (a run directory),
    "safetensors" (a state dict, e.g. an ``sslkit export`` file) or "checkpoint" (``INIT_SUFFIXES``);
    ConfigError naming the key when it does not exist or is none of these."""
    path, accepted = Path(init), ("a run directory, a .safetensors file or a checkpoint file "
                                  f"({', '.join(INIT_SUFFIXES)})")
    if path.is_dir():
        return "run"
    if not path.exists():
        raise ConfigError(f"Config key '{key}' is '{_clean(init)}', which does not exist; give {accepted}, "
                          "or null to start from a random initialisation.")
    if path.is_file() and path.suffix == ".safetensors":
        return "safetensors"
    if path.is_file() and path.suffix in INIT_SUFFIXES:
        return "checkpoint"
    raise ConfigError(f"Config key '{key}' is '{_clean(init)}', which is not {accepted}; point it at one of "
                      "those, or null to start from a random initialisation.")


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``cfg`` with dotted ``key=value`` overrides applied, validated."""
    return _apply(cfg, overrides, None)


def _apply(cfg: Config, overrides: list[str] | tuple[str, ...], file: Optional[tuple[Path, dict]]) -> Config:
    merged, lengths = OmegaConf.structured(cfg), set()
    for item in overrides:
        data, source = _parse_override(item), f"override '{_clean(item)}'"
        _check_tree(data, Config, "", source)
        key = item.partition("=")[0].strip()
        node = OmegaConf.select(merged, key, default=None)
        if isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict:
            # a free-form mapping (model.backbone_kwargs, method.composite) is replaced as a whole, so that
            # model.backbone_kwargs={} clears a recipe's {width: 16} when another backbone is chosen
            OmegaConf.update(merged, key, _lookup(data, key), merge=False)
        else:
            merged = _merge(merged, data, source)
        train = data.get("train")
        lengths |= {key for key in ("max_steps", "epochs") if isinstance(train, dict) and key in train}
    out = _to_object(merged, lambda key: _origin(key, overrides, file).split(" ", 2)[-1])
    _overridden_length(out, lengths)
    try:
        validate(out)
    except ConfigError as err:
        raise ConfigError(_attributed(str(err), overrides, file)) from None
    return out


def _overridden_length(cfg: Config, named: set[str]) -> None:
    """An override of the run's length beats the other length set in the file, in place: a command-line
    ``train.max_steps`` turns off the recipe's ``train.epochs`` (whose step milestones stay in epochs);
    a ``train.epochs`` replaces ``train.max_steps`` anyway. Both among the overrides is an error."""
    if "max_steps" not in named or cfg.train.epochs == 0:
        return
    if "epochs" in named:
        raise ConfigError(f"Overrides set both 'train.max_steps' ({cfg.train.max_steps}) and 'train.epochs' "
                          f"({cfg.train.epochs}), two lengths for one run; give one of them (train.epochs=0 "
                          "turns epochs off).")
    if cfg.optim.milestones and cfg.optim.milestone_unit == "auto":
        cfg.optim.milestone_unit = "epochs"
    cfg.train.epochs = 0


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


# Keys older sslkit versions stored in run directories and checkpoints; dropped on reading, so
# their runs stay loadable. Each says what replaced it.
RETIRED = {"eval.max_points_per_centroid": "eval.kmeans_max_train"}


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (as stored in a run directory)."""
    data = copy.deepcopy(data)
    for dotted in RETIRED:
        section, _, key = dotted.rpartition(".")
        data.get(section, {}).pop(key, None)
    return OmegaConf.to_object(_merge(OmegaConf.structured(Config), data, "stored config"))




def recipe_path(name: str) -> Path:
    """A YAML path as given, or a recipe name such as ``demo`` or ``ccrl`` shipped with sslkit."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    packaged = RECIPES / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise ConfigError(f"No config file or recipe named '{name}'; give a YAML path or one of: {known}.")


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / cfg.run.name


def git_sha() -> Optional[str]:
    """The commit of the sslkit checkout, or None when not run from a git clone."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


__all__ = ["Config", "ConfigError", "check_mil", "init_kind", "load_config", "load_mil_config", "recipe_path",
           "apply_overrides", "to_yaml", "to_dict", "from_dict", "run_dir", "git_sha", "MISSING"]
