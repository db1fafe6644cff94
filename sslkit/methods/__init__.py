"""One module per method; ``build_method(cfg)`` picks by ``method.name``."""

from sslkit.methods.base import StepOutput, build_method, register

__all__ = ["StepOutput", "build_method", "register"]
