"""Simulated acquisition shifts: what another laboratory, scanner or microscope does to an image.

Each shift maps a batch of images in [0, 1] (B, C, H, W) to the same shape, deterministically, so
a model's accuracy on a held-out split can be read under each one beside the unshifted figure
(``bench/quality.py --shifts``). The strengths are stated in the names and are the kinds of
change seen between chromosome (and slide) preparations of different laboratories:

- ``contrast-0.6`` / ``contrast-1.5``: contrast scaled about the image's mean intensity
  (``torchvision``'s ``adjust_contrast``), clamped;
- ``gamma-0.6`` / ``gamma-1.6``: ``x ** gamma`` (below 1 brightens the mid-tones, above darkens);
- ``blur-1`` / ``blur-2``: Gaussian blur with sigma 1 or 2 pixels (an out-of-focus or lower-NA
  capture);
- ``resolution-1/2`` / ``resolution-1/3``: down-sampled by 2 or 3 (antialiased) and brought
  back to the input size (bilinear): a capture at a lower resolution, up-sampled to the size the
  model takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sslkit.data.augment import adjust_contrast, gaussian_blur

Shift = Callable[[Tensor], Tensor]


def contrast(factor: float) -> Shift:
    return lambda x: adjust_contrast(x, torch.full((x.shape[0],), factor, device=x.device)).clamp(0, 1)


def gamma(value: float) -> Shift:
    return lambda x: x.clamp(0, 1) ** value


def blur(sigma: float) -> Shift:
    kernel = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma

    def apply(x: Tensor) -> Tensor:
        if kernel > min(x.shape[-2:]):
            raise ValueError(f"A blur of sigma {sigma} needs images of at least {kernel} pixels; "
                             f"got {tuple(x.shape[-2:])}.")
        return gaussian_blur(x, torch.full((x.shape[0],), sigma, device=x.device), kernel).clamp(0, 1)

    return apply


def resolution(factor: int) -> Shift:
    def apply(x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=(max(1, round(h / factor)), max(1, round(w / factor))), mode="bilinear",
                              antialias=True, align_corners=False)
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)

    return apply


SHIFTS: dict[str, Shift] = {
    "contrast-0.6": contrast(0.6), "contrast-1.5": contrast(1.5),
    "gamma-0.6": gamma(0.6), "gamma-1.6": gamma(1.6),
    "blur-1": blur(1.0), "blur-2": blur(2.0),
    "resolution-1/2": resolution(2), "resolution-1/3": resolution(3),
}


def get_shift(name: str) -> Shift:
    """The shift called ``name`` (a key of :data:`SHIFTS`); ``none`` is the identity."""
    if name == "none":
        return lambda x: x
    if name not in SHIFTS:
        raise ValueError(f"Unknown shift '{name}'; the shifts are none, {', '.join(SHIFTS)}.")
    return SHIFTS[name]


__all__ = ["SHIFTS", "get_shift", "contrast", "gamma", "blur", "resolution"]
