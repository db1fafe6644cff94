"""The method contract: what the engine, evaluation, export and reports need of a training method.

A method is a :class:`Method`, an ``nn.Module`` assembled from a backbone, ``MLPHead``s and,
for momentum methods, a ``MomentumEncoder`` and a ``KeyQueue``. It states only what differs
from the defaults below.

Capabilities (class attributes, read without building the method):

- ``momentum_encoder``: ``embed(encoder="momentum")`` reads an EMA copy that differs from the
  query encoder (CCRL, SupCAM); export and evaluation then offer both encoders.
- ``has_classifier``: ``predict`` and ``classifier_net`` give class probabilities and logits
  (SCL, fine-tuning); ``sslkit evaluate`` then scores the head too and draws Grad-CAM.
- ``needs_class_count``: ``method.num_classes`` is filled in from the shards' manifest when 0.
- ``worker_views``: the method takes the two views that ``data.views.backend: pil`` makes in
  the loader workers (two-view methods); the others make their inputs in ``prepare``.

Hooks:

- ``check_config(cfg)`` (class method): the method's own config rules, raising ConfigError;
  ``sslkit.config.validate`` calls it after the checks every method shares.
- ``untrained_config(cfg)`` (class method): the config of the random-initialisation baseline
  (``model.init`` and ``model.pretrained`` dropped; fine-tuning drops ``finetune.init`` too).
- ``init_source(cfg)`` (class method): ``(config key, path)`` of the weights the backbone starts
  from, ``("model.init", cfg.model.init)`` by default (fine-tuning: ``finetune.init``).
- ``backbone_copies() -> list[nn.Module]``: modules built as copies of ``backbone`` that must start
  from the same weights: a momentum method's key encoder backbone, a DINO-style teacher's backbone
  (none by default). ``load_backbone_state(state)`` loads the first weights (``model.init``,
  ``model.pretrained``; ``sslkit.models.init`` has fitted them to ``backbone`` already) into
  ``backbone`` and then copies ``backbone``'s whole state into each of them, so an EMA copy made at
  construction, from random weights, starts equal to the loaded backbone. A method whose copies
  need more than that overrides ``load_backbone_state``.
- ``prepare(batch, generator) -> batch``: the loader's batch, on the training device, turned
  into this method's inputs (views, composites), every random number drawn from ``generator``
  so a resumed run repeats a straight one.
- ``forward(batch) -> StepOutput(loss, logs, views)``: one training step's loss. The engine calls
  the (possibly DDP-wrapped) module, so gradient synchronisation works. ``views`` (optional):
  the step's embeddings, from which the engine logs the ``health/`` signals.
- ``health() -> dict``: the method's own health signals (a momentum method: how far its key
  encoder is from the query encoder, how full its queue is).
- ``chance_loss() -> float | None``: the loss the last ``forward`` would have given had every
  embedding been the same, i.e. from an encoder that carries no information (a classifier: the
  loss of a uniform prediction). A collapsed run's
  loss sits there and every run starts near it; the engine logs it as ``loss_chance`` and the
  ``chance`` alert (``sslkit.alerts``) compares the loss with it. None (the default): the method
  has no such value and the rule does not judge it.
- ``set_run_length(total_steps, steps_per_epoch)``: called by the engine before training, once the
  run's length is known: for schedules the method keeps itself (DINO's teacher momentum and
  temperature).
- ``before_optimizer_step(step)``: after the gradients are reduced, before ``optimizer.step()``
  (DINO drops its last layer's gradients while that layer is frozen).
- ``after_optimizer_step(step)``: momentum update and queue push, after ``optimizer.step()``.
- ``skip_step()``: forget what ``forward`` staged for ``after_optimizer_step``; called
  instead of it when the engine skips a step with a non-finite loss or gradient.
- ``encoder_module(encoder)``: the module ``embed(..., features="backbone")`` runs.
- ``embed(images, encoder=..., features=...) -> (N, D)``: features for evaluation, from
  normalised images as the evaluation loader yields them; ``features`` is "backbone" or
  "projector" (the method's head output).
- ``export_spec(cfg, encoder) -> Exported``: the module ``sslkit export`` writes, as a timm model.
- ``backbone``: the network ``sslkit finetune`` takes.

A new method is one module: subclass ``Method``, write a builder ``cfg -> method`` and register
it with ``@register(name, cls)``; see ``tests/methods/test_contract.py`` for a complete one.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Optional

import torch
from torch import Tensor, nn

from sslkit.config import Config, apply_overrides
from sslkit.data.augment import MEAN, STD, BatchViews
from sslkit.methods.registry import add as _add
from sslkit.methods.registry import entry as _entry


class StepOutput(NamedTuple):
    loss: Tensor
    logs: dict[str, Tensor]
    # this rank's (B, D) embeddings of the step and, for two-view methods, of their positives: the
    # engine computes the health/ signals (sslkit.health) from them at logging steps; None: none
    views: Optional[tuple[Tensor, Optional[Tensor]]] = None


class Exported(NamedTuple):
    """What ``sslkit export`` writes: a timm model and how to feed it."""

    module: nn.Module  # the backbone: (B, C, H, W) normalised with mean/std -> (B, num_features)
    architecture: str  # timm model name
    kwargs: dict[str, Any]  # timm.create_model kwargs besides in_chans and num_classes
    in_chans: int
    mean: float  # per channel, the same for every channel
    std: float


class Method(nn.Module, metaclass=ABCMeta):
    """Base class of the training methods; see the module docstring for the contract."""

    backbone: nn.Module  # a submodule or a property: the network fine-tuning takes and export writes by default
    init_report: Optional[dict[str, Any]] = None  # what build_method loaded into the backbone (sslkit.models.init)

    momentum_encoder: ClassVar[bool] = False
    has_classifier: ClassVar[bool] = False
    needs_class_count: ClassVar[bool] = False
    worker_views: ClassVar[bool] = False

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError for settings this method cannot train with (nothing by default)."""

    @classmethod
    def untrained_config(cls, cfg: Config) -> Config:
        """The config that builds this method's random-initialisation baseline: no first weights."""
        if cfg.model.init is None and not cfg.model.pretrained:
            return cfg
        return apply_overrides(cfg, ["model.init=null", "model.pretrained=false"])

    @classmethod
    def init_source(cls, cfg: Config) -> tuple[str, Optional[str]]:
        """(config key, path) of the weights the backbone starts from; path None: none (or model.pretrained)."""
        return "model.init", cfg.model.init

    def backbone_copies(self) -> list[nn.Module]:
        """Copies of ``backbone`` made at construction (EMA encoders) that start from its weights (none)."""
        return []

    @torch.no_grad()
    def load_backbone_state(self, state: dict[str, Tensor]) -> None:
        """Load ``state`` (fitted to ``backbone``: every key is one of its own, of its shape) into ``backbone``,
        then copy ``backbone``'s whole state into each of ``backbone_copies()``."""
        self.backbone.load_state_dict(state, strict=False)
        for copy in self.backbone_copies():
            copy.load_state_dict(self.backbone.state_dict(), strict=True)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        return batch

    @abstractmethod
    def forward(self, batch: dict[str, Any]) -> StepOutput:
        """One training step's loss (and logs, and optionally the step's embeddings)."""

    def set_run_length(self, total_steps: int, steps_per_epoch: int) -> None:
        """No schedule of the method's own by default."""

    def before_optimizer_step(self, step: int) -> None:
        """Nothing to change in the gradients by default."""

    def after_optimizer_step(self, step: int) -> None:
        """Nothing to update by default (no momentum encoder, no queue)."""

    def skip_step(self) -> None:
        """Nothing staged by default."""

    def health(self) -> dict[str, float]:
        """The method's own ``health/`` signals, logged with the embedding ones (none by default)."""
        return {}

    def chance_loss(self) -> Optional[float]:
        """The loss of the last ``forward`` had every embedding been the same; None: no such value (default)."""
        return None

    def encoder_module(self, encoder: str = "query") -> nn.Module:
        """The module that ``embed(..., encoder=encoder, features="backbone")`` runs."""
        return self.backbone

    @torch.no_grad()
    def embed(self, images: Tensor, *, encoder: str = "query", features: str = "backbone") -> Tensor:
        """(N, C, H, W) -> (N, D) backbone features (methods with a head override this for "projector")."""
        if features != "backbone":
            raise ValueError(f"{type(self).__name__} has no projector features; use eval.features=backbone.")
        return self.encoder_module(encoder)(images)

    def classifier_net(self) -> Optional[nn.Module]:
        """images -> logits, with gradients through the backbone (Grad-CAM); None without a classifier."""
        return None

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, K) class probabilities of the classifier head."""
        net = self.classifier_net()
        if net is None:
            raise TypeError(f"{type(self).__name__} has no classifier head.")
        return net(images).float().softmax(dim=1)

    def export_spec(self, cfg: Config, encoder: str = "query") -> Exported:
        """The backbone ``embed`` runs, described as the timm model of ``cfg.model``, fed like evaluation."""
        m = cfg.model
        return Exported(self.encoder_module(encoder), m.backbone, dict(m.backbone_kwargs), m.in_chans, MEAN, STD)


Builder = Callable[[Config], Method]


def register(name: str, cls: type[Method]) -> Callable[[Builder], Builder]:
    """Decorate a builder ``cfg -> cls instance`` to make ``method.name=name`` train it."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register('{name}', ...) takes a Method subclass, got {cls!r}.")

    def wrap(build: Builder) -> Builder:
        _add(name, cls, build)
        return build

    return wrap


def method_class(name: str) -> type[Method]:
    """The class registered as ``name`` (its capabilities and checks), without building it."""
    return _entry(name).cls


def build_method(cfg: Config, *, init: bool = True) -> Method:
    """Build ``cfg.method.name`` from the whole config (it reads model and method sections).

    With ``init`` the backbone (and its copies) then load the first weights the config names
    (``model.init``, ``model.pretrained``, ``finetune.init``: ``sslkit.models.init``). Without it they keep
    their random initialisation: for a method whose checkpoint is loaded next (resume, ``load_trained``),
    which must not depend on the init still being there."""
    method = _entry(cfg.method.name).build(cfg)
    if init:
        from sslkit.models.init import init_backbone

        init_backbone(method, cfg)
    return method


class TwoViewInputs:
    """``prepare`` for two-view methods: uint8 ``image`` -> ``query`` and ``key`` views (``BatchViews``).

    A batch whose views the workers made already (``data.views.backend: pil``) passes unchanged."""

    def __init__(self, cfg: Config) -> None:
        self.views = BatchViews(cfg.data.views, channels=cfg.data.channels)

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        if "image" in batch:
            batch["query"], batch["key"] = self.views(batch.pop("image"), generator=generator)
        return batch
