"""The method protocol and registry.

A method is an ``nn.Module`` assembled from a backbone, ``MLPHead``s, a
``MomentumEncoder`` and a ``KeyQueue``; there is no base class to inherit from.
It provides:

- ``prepare(batch, generator) -> batch``: the loader's batch, on the training device, turned
  into this method's inputs. With the tensor back-end the batch holds uint8 ``image``s
  (B, C, H, W) and ``label``s; a method makes its views here (two views for CCRL and
  SimCLR, composites for SupCAM, one view for SCL, the plain image for an autoencoder),
  drawing every random number from ``generator`` so a resumed run repeats a straight one.
- ``forward(batch) -> StepOutput(loss, logs)``: one training step's loss. The engine
  calls the (possibly DDP-wrapped) module, so gradient synchronisation works.
- ``after_optimizer_step(step)``: momentum update and queue push, after ``optimizer.step()``.
- ``skip_step()`` (optional): forget what ``forward`` staged for ``after_optimizer_step``;
  called instead of it when the engine skips a step with a non-finite loss or gradient.
- ``embed(images, encoder=..., features=...) -> (N, D)``: features for evaluation, from
  normalised images as ``eval_loader`` yields them. ``encoder`` is "momentum" or "query"
  (methods without a momentum encoder have only one); ``features`` "backbone" or
  "projector" (the method's head output).
- ``backbone``: the module that ``sslkit finetune`` and export take.

``build_method(cfg)`` imports ``sslkit.methods.<name>`` for ``cfg.method.name``; the
module registers its builder with ``@register(name)``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from sslkit.config import CHOICES, Config, ConfigError
from sslkit.data.augment import BatchViews


class StepOutput(NamedTuple):
    loss: Tensor
    logs: dict[str, Tensor]


_REGISTRY: dict[str, Callable[[Config], nn.Module]] = {}


def register(name: str) -> Callable[[Callable[[Config], nn.Module]], Callable[[Config], nn.Module]]:
    def wrap(builder: Callable[[Config], nn.Module]) -> Callable[[Config], nn.Module]:
        _REGISTRY[name] = builder
        return builder

    return wrap


def build_method(cfg: Config) -> nn.Module:
    """Build ``cfg.method.name`` from the whole config (it reads model and method sections)."""
    name = cfg.method.name
    if name not in CHOICES["method.name"]:
        raise ConfigError(f"Unknown method '{name}' (method.name); choose one of {', '.join(CHOICES['method.name'])}.")
    importlib.import_module(f"sslkit.methods.{name}")  # registers itself
    return _REGISTRY[name](cfg)


class TwoViewInputs:
    """``prepare`` for two-view methods: uint8 ``image`` -> ``query`` and ``key`` views (``BatchViews``).

    A batch whose views the workers made already (``data.views.backend: pil``) passes unchanged."""

    def __init__(self, cfg: Config) -> None:
        self.views = BatchViews(cfg.data.views, channels=cfg.data.channels)

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        if "image" in batch:
            batch["query"], batch["key"] = self.views(batch.pop("image"), generator=generator)
        return batch
