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


def warmup_step(*, base: float, total_steps: int, milestones: list[int], gamma: float = 0.1,
                warmup_steps: int = 0) -> np.ndarray:
    """Linear warm-up, then ``base`` times ``gamma`` for every milestone step already reached
    (SupCAM's fine-tuning: x0.1 at epochs 8 and 12)."""
    lrs = warmup_constant(base=base, total_steps=total_steps, warmup_steps=warmup_steps)
    steps = np.arange(total_steps)
    drops = (steps[:, None] >= np.asarray(sorted(milestones), dtype=np.int64)[None, :]).sum(axis=1) \
        if milestones else np.zeros(total_steps, dtype=np.int64)
    return lrs * gamma ** drops
