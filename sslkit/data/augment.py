"""View recipes: one PIL crop in, two normalised float views out (torchvision v2).

``local_global`` (CCRL, METHODS.md section 1): ONE branch takes a RandomResizedCrop
(the local view), the other keeps the whole cell resized (the global view);
``cfg.local`` says which. ``global_global``: neither branch crops. Both branches then
apply MoCo v2's photometric ops with CCRL's flips and rotation:

    views = build_views(cfg.data.views, size=32, channels=3)
    query, key = views(pil_image)  # each (C, 32, 32) float32, normalised with MEAN/STD

Rotation fill: crops have a background (tissue around a nucleus, white around a
chromosome), so by default the corners that a rotation uncovers are filled by
reflecting the crop's own border (pad, rotate, centre-crop) instead of a constant
that no real crop contains; pass ``rotation_fill=255`` (say) for a constant. The
reflection costs about 20 % of view throughput on 32x32 crops.

Ops run on PIL images (faster than uint8 tensors at 32x32: about 2x for rotation
and jitter); the tensor conversion and normalisation come last.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from PIL import Image
from torchvision.transforms import v2

from sslkit.config import ViewsConfig

MEAN = 0.5  # fixed per-channel normalisation, identical for training views and evaluation
STD = 0.5
_BILINEAR = v2.InterpolationMode.BILINEAR


class _Mode:
    """Convert a PIL image to ``RGB`` (3 channels) or ``L`` (1 channel) if it is not already."""

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"data.channels is {channels}; set it to 1 (grayscale) or 3 (RGB).")
        self.mode = "RGB" if channels == 3 else "L"

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode})"


def _to_tensor(channels: int) -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN] * channels, [STD] * channels)]


def _branch(cfg: ViewsConfig, *, local: bool, size: int, channels: int, rotation_fill: Optional[float]) -> v2.Compose:
    """One view's transform: PIL -> (C, size, size) float32."""
    b, c, s, h = cfg.jitter
    ops: list[Callable] = [
        _Mode(channels),
        v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), antialias=True) if local
        else v2.Resize((size, size), antialias=True),  # global view: the whole cell
        v2.RandomApply([v2.ColorJitter(b, c, s, h) if channels == 3 else v2.ColorJitter(b, c)], p=cfg.p_jitter),
    ]
    if channels == 3:  # one channel: no saturation, hue or grayscale
        ops.append(v2.RandomGrayscale(cfg.p_gray))
    ops.append(v2.RandomApply([v2.GaussianBlur(max(3, (size // 10) | 1), sigma=tuple(cfg.blur_sigma))], p=cfg.p_blur))
    if cfg.flips:
        ops += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if cfg.rotation > 0:
        fill = 0.0 if rotation_fill is None else rotation_fill
        rotate = v2.RandomRotation((0.0, cfg.rotation), interpolation=_BILINEAR, fill=fill)
        if rotation_fill is None:  # reflect the border into the corners a rotation uncovers
            pad = math.ceil(size * (math.sqrt(2) - 1) / 2) + 1  # covers any angle
            ops += [v2.Pad(pad, padding_mode="reflect"), rotate, v2.CenterCrop(size)]
        else:
            ops.append(rotate)
    return v2.Compose(ops + _to_tensor(channels))


class TwoViews:
    """PIL image -> (query view, key view), each (C, size, size) float32."""

    def __init__(self, query: Callable, key: Callable) -> None:
        self.query, self.key = query, key

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query(img), self.key(img)


def build_views(
    cfg: ViewsConfig, *, size: int, channels: int, rotation_fill: Optional[float] = None
) -> TwoViews:
    """The two-view augmentation named by ``cfg.recipe`` (``local_global`` or ``global_global``).

    ``rotation_fill``: None reflects the crop's border into the rotated corners; a number
    fills them with that constant (0-255).
    """
    if cfg.recipe not in ("local_global", "global_global"):
        raise ValueError(f"data.views.recipe is '{cfg.recipe}'; choose local_global or global_global.")
    if cfg.local not in ("query", "key"):
        raise ValueError(f"data.views.local is '{cfg.local}'; choose query or key.")
    crops = cfg.recipe == "local_global"
    query, key = (
        _branch(cfg, local=crops and cfg.local == side, size=size, channels=channels, rotation_fill=rotation_fill)
        for side in ("query", "key")
    )
    return TwoViews(query, key)


def build_eval_transform(*, size: int, channels: int) -> v2.Compose:
    """PIL image -> (C, size, size) float32: resize the whole crop, same normalisation as the views."""
    return v2.Compose([_Mode(channels), v2.Resize((size, size), antialias=True), *_to_tensor(channels)])


__all__ = ["MEAN", "STD", "TwoViews", "build_views", "build_eval_transform"]
