"""The names of the training methods, importable without torch.

``method.name`` in a config must be one of :func:`names`: the built-in methods below, plus any
method registered at run time with :func:`sslkit.methods.register` (a method defined in a
user's own module or a test). The built-in methods' modules are imported only when one is
built or asked about (:func:`entry`), so the config loader can check the name before torch
is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

from sslkit.errors import ConfigError

# The built-in methods: each registers itself when its module sslkit.methods.<name> is imported.
BUILTIN = ("ccrl", "supcam", "scl", "simclr", "autoencoder", "finetune", "dino")


class Entry(NamedTuple):
    cls: type  # the Method subclass: its capabilities and config checks
    build: Callable[[Any], Any]  # Config -> an instance of cls


_ENTRIES: dict[str, Entry] = {}


def names() -> tuple[str, ...]:
    """Every method name a config may give: the built-in ones, then those registered at run time."""
    return tuple(dict.fromkeys([*BUILTIN, *_ENTRIES]))


def add(name: str, cls: type, build: Callable[[Any], Any]) -> None:
    """Record ``name``. A built-in name is taken by its own module only, whether or not that module
    was imported yet: anything else would silently replace a method the recipes rely on."""
    if name in BUILTIN and cls.__module__ != f"sslkit.methods.{name}":
        raise ValueError(f"Method name '{name}' is taken by the built-in method of sslkit.methods.{name}; "
                         "register yours under another name.")
    _ENTRIES[name] = Entry(cls, build)


def entry(name: str) -> Entry:
    """The class and builder of ``name``, importing a built-in method's module on first use."""
    if name not in _ENTRIES and name in BUILTIN:
        importlib.import_module(f"sslkit.methods.{name}")  # registers itself
    if name not in _ENTRIES:
        raise ConfigError(f"Config key 'method.name' is '{name}'; choose one of {', '.join(names())}.")
    return _ENTRIES[name]


__all__ = ["BUILTIN", "Entry", "add", "entry", "names"]
