"""Losses: pure functions of tensors — no state, no device or rank calls."""

from sslkit.losses.info_nce import info_nce

__all__ = ["info_nce"]
