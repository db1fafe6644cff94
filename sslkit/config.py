"""The one typed config tree: defaults live here and nowhere else.

A recipe is a YAML file under ``configs/``; the command line layers dotted
``key=value`` overrides on top. Everything is validated against the dataclasses
below before any heavy work starts, and unknown keys are refused with a message
that names the key (and the closest known one).

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.max_steps=50"])
    cfg.optim.lr  # 0.0003
"""

from __future__ import annotations

import copy
import difflib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config the user wrote cannot be used; the message says what and how to fix it."""


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
    recipe: str = "local_global"  # local_global (CCRL) | global_global (neither crops) | local_local (both crop: SimCLR)
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
    flips: bool = True
    vflip: bool = True  # with flips: vertical flips too (SupCAM flips horizontally only)


@dataclass
class DataConfig:
    shards: str = "shards/demo/train"  # folder with manifest.json, brace pattern or URL
    manifest: Optional[str] = None  # default: manifest.json beside the shards
    size: int = 32
    channels: int = 3
    batch_size: int = 256  # per process
    workers: int = 2
    shuffle_buffer: int = 2000
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


@dataclass
class MethodConfig:
    """All methods' parameters in one section; each method reads its own (METHODS.md)."""

    name: str = "ccrl"  # ccrl | supcam | scl | simclr | autoencoder | finetune
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


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant | step
    milestones: list[float] = field(default_factory=list)  # step: epochs (train.epochs) or steps at which lr *= gamma
    gamma: float = 0.1  # step schedule factor
    min_lr: float = 0.0
    grad_clip: Optional[float] = None


@dataclass
class TrainConfig:
    max_steps: int = 1000
    epochs: int = 0  # when > 0, max_steps = epochs x batches per epoch (and step milestones are epochs)
    precision: str = "auto"  # auto (the launcher's --mixed_precision, else no) | no | bf16 | fp16 (GPU only)
    grad_accum: int = 1  # micro-batches per optimizer step; keys enter the queue once per step (README)
    compile: bool = False  # torch.compile the model in place (slow to start: about a minute on CPU)
    log_every: int = 10
    ckpt_every: int = 500
    keep_ckpts: int = 2
    eval_every: int = 0  # online evaluation (kNN, k-means AMI/ARI on eval.online_samples held-out crops) every N steps; 0: off
    threads: int = 0  # torch intra-op threads per process; 0 leaves torch's default


@dataclass
class EvalConfig:
    shards: Optional[str] = None  # default: data.shards
    encoder: str = "momentum"  # momentum | query
    features: str = "backbone"  # backbone | projector
    normalize: bool = True
    k: Optional[int] = None  # k-means clusters; default: number of classes
    restarts: int = 5
    niter: int = 50
    kmeans_max_train: Optional[int] = 100_000  # k-means trains on a seeded sample this large (at least 256 per cluster), then assigns all; null: all points
    knn_k: int = 20
    knn_tau: float = 0.07
    batch_size: int = 512
    max_samples: Optional[int] = None
    baselines: bool = True
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
    views: str = "rotate"  # training augmentation: rotate (SupCAM: RandomRotate only) | views (data.views, one branch) | none


@dataclass
class TrackerConfig:
    name: str = "wandb"  # wandb | tensorboard | none
    project: str = "sslkit"
    mode: str = "offline"  # offline | online (online needs WANDB_API_KEY)


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


CHOICES = {
    "data.views.recipe": ("local_global", "global_global", "local_local"),
    "data.views.local": ("query", "key"),
    "data.views.backend": ("tensor", "pil"),
    "method.name": ("ccrl", "supcam", "scl", "simclr", "autoencoder", "finetune"),
    "method.table": ("middle", "light", "heavy", "none"),
    "method.combine": ("equal", "lambda", "max"),
    "method.projection": ("mlp", "linear"),
    "method.arch": ("fc", "conv", "conv_pool", "resnet"),
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.schedule": ("cosine", "constant", "step"),
    "train.precision": ("auto", "no", "bf16", "fp16"),
    "finetune.views": ("rotate", "views", "none"),
    "eval.encoder": ("momentum", "query"),
    "eval.features": ("backbone", "projector"),
    "eval.projection": ("umap", "tsne"),
    "tracker.name": ("wandb", "tensorboard", "none"),
    "tracker.mode": ("offline", "online"),
}


def _known_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(value, DictConfig) and OmegaConf.get_type(value) is not dict:
            keys.extend(_known_keys(value, dotted + "."))
    return keys


def _unknown_key_error(err: ConfigKeyError, schema: DictConfig, source: str) -> ConfigError:
    full_key = getattr(err, "full_key", None) or str(err).split("'")[1]
    hint = difflib.get_close_matches(full_key, _known_keys(schema), n=1)
    fix = f" Did you mean '{hint[0]}'?" if hint else " See the sections in configs/ccrl.yaml."
    return ConfigError(f"Unknown config key '{full_key}' in {source}.{fix}")


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise _unknown_key_error(err, base, source) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "?")
        reason = str(err.msg).splitlines()[0]
        raise ConfigError(f"Bad value for config key '{key}' in {source}: {reason}.") from None


def _parse_override(item: str) -> DictConfig:
    if "=" not in item:
        raise ConfigError(f"Override '{item}' is not of the form key=value (for example optim.lr=3e-4).")
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as err:
        reason = str(err.msg).splitlines()[0]
        raise ConfigError(f"Cannot parse override '{item}': {reason}.") from None


def check_balanced(data: DataConfig) -> None:
    """Raise ConfigError unless ``data.balanced`` is off or agrees with ``data.batch_size``."""
    balanced = data.balanced
    if balanced.classes < 0 or balanced.per_class < 1 or balanced.buffer < 0:
        raise ConfigError("Config keys 'data.balanced.classes' (0 = off), 'data.balanced.per_class' (>= 1) and "
                          f"'data.balanced.buffer' (0 = 8 x per_class) got {balanced.classes}, "
                          f"{balanced.per_class} and {balanced.buffer}.")
    if balanced.classes and data.batch_size != balanced.classes * balanced.per_class:
        raise ConfigError(f"Config key 'data.batch_size' is {data.batch_size} but balanced batches hold "
                          f"data.balanced.classes x per_class = {balanced.classes * balanced.per_class}; make them agree.")


def validate(cfg: Config) -> None:
    """Check the values that the types alone cannot; raise ConfigError naming the key."""
    for dotted, allowed in CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(cfg), dotted)
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
    if cfg.method.name == "ccrl" and cfg.method.use_predictor and cfg.model.predictor[1] != cfg.model.projector[1]:
        raise ConfigError(
            f"Config key 'model.predictor' must end at the projector's size {cfg.model.projector[1]}, "
            f"got {cfg.model.predictor[1]}."
        )
    if not 0.0 <= cfg.method.momentum <= 1.0:
        raise ConfigError(f"Config key 'method.momentum' must be in [0, 1], got {cfg.method.momentum}.")
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
    if cfg.data.views.backend == "pil" and cfg.method.name not in ("ccrl", "simclr"):
        raise ConfigError(f"Config key 'data.views.backend' is 'pil', which makes query/key views in the workers; "
                          f"method '{cfg.method.name}' makes its own inputs: set data.views.backend=tensor.")
    unknown = sorted(set(cfg.method.roles) - {"I", "T", "O", "TO"})
    if unknown:
        raise ConfigError(f"Config key 'method.roles' holds {unknown}; each class's role is one of I, T, O, TO.")
    for role, label in cfg.method.composite.items():
        if role not in ("T", "O", "TO") or not 0 <= label < len(cfg.method.roles):
            raise ConfigError(f"Config key 'method.composite' maps '{role}' to {label}; map T, O or TO to a class "
                              f"index below {len(cfg.method.roles)} (the length of method.roles).")
    if cfg.optim.schedule == "step" and not cfg.optim.milestones:
        raise ConfigError("Config key 'optim.schedule' is 'step' but 'optim.milestones' is empty; "
                          "give the epochs (or steps) at which the learning rate drops, e.g. [8, 12].")
    kernel = cfg.data.views.blur_kernel
    if kernel != 0 and (kernel < 3 or kernel % 2 == 0):
        raise ConfigError(f"Config key 'data.views.blur_kernel' must be 0 (about a tenth of data.size) "
                          f"or an odd size of at least 3, got {kernel}.")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated; returns a typed ``Config``."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist; pick one of the recipes in configs/.")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml errors come in many types
            raise ConfigError(f"Config file '{path}' is not valid YAML: {err}") from None
        merged = _merge(merged, loaded, str(path))
    return apply_overrides(OmegaConf.to_object(merged), overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``cfg`` with dotted ``key=value`` overrides applied, validated."""
    merged = OmegaConf.structured(cfg)
    for item in overrides:
        merged = _merge(merged, _parse_override(item), f"override '{item}'")
    out: Config = OmegaConf.to_object(merged)
    validate(out)
    return out


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
    return OmegaConf.to_object(_merge(OmegaConf.structured(Config), OmegaConf.create(data), "stored config"))


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


__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "to_yaml", "to_dict", "from_dict", "run_dir", "git_sha", "MISSING"]
