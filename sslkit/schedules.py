"""Schedules as arrays indexed by step: ``lrs = warmup_cosine(...); lr = lrs[step]``."""

from __future__ import annotations

import numpy as np


def warmup_cosine(*, base: float, total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> np.ndarray:
    """(total_steps,) values: linear warm-up from base/warmup to ``base``, then cosine down to ``final``."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = base * np.arange(1, warmup_steps + 1) / max(warmup_steps, 1)
    remaining = total_steps - warmup_steps
    progress = np.arange(remaining) / max(remaining, 1)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warmup, cosine])


def warmup_constant(*, base: float, total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    warmup_steps = min(warmup_steps, total_steps)
    warmup = base * np.arange(1, warmup_steps + 1) / max(warmup_steps, 1)
    return np.concatenate([warmup, np.full(total_steps - warmup_steps, base)])
