"""Training methods: one module per method, one contract (``sslkit.methods.base.Method``).

``build_method(cfg)`` builds ``cfg.method.name``. The names come from ``sslkit.methods.registry``,
which imports without torch; the rest of this package is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Exported", "Method", "StepOutput", "build_method", "method_class", "register"]


def __getattr__(name: str) -> Any:  # PEP 562: `import sslkit.methods.registry` must not load torch
    if name in __all__:
        from sslkit.methods import base

        return getattr(base, name)
    raise AttributeError(f"module 'sslkit.methods' has no attribute '{name}'")
