"""Block-wise patch masks for masked-image distillation (iBOT, DINOv2), after BEiT's masking."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


class _Uniforms:
    """Uniform floats in [0, 1) from a torch generator, drawn ``chunk`` at a time and handed out one by
    one: one torch call per chunk instead of one per number, and the same generator state gives the
    same sequence."""

    def __init__(self, generator: torch.Generator | None, chunk: int = 1024) -> None:
        self.generator, self.chunk = generator, chunk
        self.pool: list[float] = []

    def __call__(self) -> float:
        if not self.pool:
            self.pool = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist()[::-1]
        return self.pool.pop()

    def many(self, count: int) -> np.ndarray:
        return np.array([self() for _ in range(count)])


def _add_block(mask: np.ndarray, budget: int, min_block: int, uniform: _Uniforms, tries: int) -> int:
    """Mask one random rectangle that adds between 1 and ``budget`` new patches; up to ``tries`` draws.
    Returns how many patches it added (0: every draw failed)."""
    height, width = mask.shape
    low, high = min(min_block, budget), budget
    log_aspect = math.log(0.3), math.log(1 / 0.3)
    for _ in range(tries):
        area = low + (high - low) * uniform()
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * uniform())
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (0 < h <= height and 0 < w <= width):
            continue
        top = min(int(uniform() * (height - h + 1)), height - h)
        left = min(int(uniform() * (width - w + 1)), width - w)
        block = mask[top:top + h, left:left + w]
        added = h * w - int(block.sum())
        if 0 < added <= budget:
            block[:] = True
            return added
    return 0


def _one_mask(grid: tuple[int, int], target: int, min_block: int, uniform: _Uniforms, tries: int) -> np.ndarray:
    """A (h, w) mask of exactly ``target`` patches: rectangles while they fit, then single patches."""
    mask = np.zeros(grid, dtype=bool)
    count = 0
    while count < target:
        added = _add_block(mask, target - count, min_block, uniform, tries)
        if added == 0:
            break
        count += added
    if count < target:  # top up with single patches chosen at random among the unmasked ones
        free = np.flatnonzero(~mask)
        chosen = free[np.argsort(uniform.many(free.size), kind="stable")[:target - count]]
        mask.reshape(-1)[chosen] = True
    return mask


def block_masks(n: int, grid: tuple[int, int], *, ratio: tuple[float, float] = (0.1, 0.5), share: float = 0.5,
                min_block: int = 4, generator: torch.Generator | None = None, tries: int = 10) -> Tensor:
    """Block-wise masks of the patch grid for a batch of ``n`` images (True: the patch is masked).

    The distribution:

    * ``m = floor(n * share + 0.5)`` images get a mask (``round`` with halves up); which ones is a
      uniformly random subset (the first m of a random permutation). The other rows are all False.
    * The masked images' ratios are stratified over ``ratio``, as DINOv2 spreads them: the
      interval is cut into m equal strata, the j-th masked image draws r_j uniformly in the j-th
      (so each r_j is uniform in [ratio[0], ratio[1]] for a random image, and the batch covers the
      range evenly). Its target is ``round(r_j * h * w)`` patches.
    * A mask is built from rectangles: the area is uniform between ``min_block`` (or the remaining
      budget, when smaller) and the remaining budget, the aspect ratio h/w log-uniform in
      [0.3, 1/0.3], the position uniform on the grid. A rectangle is kept when it adds at least one
      new patch and does not overshoot the budget; after ``tries`` draws that add nothing, the
      rectangles stop. Unlike BEiT, the mask is then topped up with single patches drawn
      uniformly among the unmasked ones, so that it holds exactly the target number.

    All randomness comes from ``generator`` (the default torch generator when None): the same
    generator state gives the same masks.

    Args:
        n: the batch size.
        grid: (h, w), the patch grid (14 x 14 for 224-pixel images and 16-pixel patches).
        ratio: the range of the fraction of patches masked in a masked image.
        share: the fraction of images that get a mask.
        min_block: the smallest rectangle area drawn (in patches).
        generator: the torch generator to draw from.
        tries: rectangle draws that may fail in a row before the rectangles stop.

    Returns:
        (n, h * w) bool, rows in batch order, patches in row-major order.
    """
    height, width = grid
    if not (0.0 <= ratio[0] <= ratio[1] <= 1.0):
        raise ValueError(f"ratio must satisfy 0 <= ratio[0] <= ratio[1] <= 1, got {ratio}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must lie in [0, 1], got {share}")
    if n < 0 or height <= 0 or width <= 0:
        raise ValueError(f"need n >= 0 and a non-empty grid, got n={n}, grid={grid}")
    masks = torch.zeros(n, height * width, dtype=torch.bool)
    n_masked = math.floor(n * share + 0.5)
    if n_masked == 0:
        return masks
    chosen = torch.randperm(n, generator=generator)[:n_masked].tolist()
    uniform = _Uniforms(generator)
    step = (ratio[1] - ratio[0]) / n_masked
    for j, image in enumerate(chosen):
        target = round((ratio[0] + step * (j + uniform())) * height * width)
        masks[image] = torch.from_numpy(_one_mask((height, width), target, min_block, uniform, tries).reshape(-1))
    return masks
