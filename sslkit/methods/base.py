"""The method protocol and registry.

A method is an ``nn.Module`` assembled from a backbone, ``MLPHead``s, a
``MomentumEncoder`` and a ``KeyQueue``; there is no base class to inherit from.
It provides:

- ``forward(batch) -> StepOutput(loss, logs)``: one training step's loss. The engine
  calls the (possibly DDP-wrapped) module, so gradient synchronisation works.
- ``after_optimizer_step(step)``: momentum update and queue push, after ``optimizer.step()``.
- ``embed(images, encoder=..., features=...) -> (N, D)``: features for evaluation.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from torch import Tensor, nn

from sslkit.config import Config, ConfigError


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
    import sslkit.methods.ccrl  # noqa: F401  (registers itself)

    if cfg.method.name not in _REGISTRY:
        raise ConfigError(f"Unknown method '{cfg.method.name}' (method.name); choose one of {sorted(_REGISTRY)}.")
    return _REGISTRY[cfg.method.name](cfg)
