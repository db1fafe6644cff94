"""View recipes: one PIL crop in, two normalised float views out (torchvision v2).

``local_global`` (CCRL): ONE branch takes a RandomResizedCrop
(the local view), the other keeps the whole cell resized (the global view);
``cfg.local`` says which. ``global_global``: neither branch crops; ``local_local``: both
do (SimCLR). Both branches then
apply MoCo v2's photometric ops with CCRL's flips and rotation:

    views = build_views(cfg.data.views, size=32, channels=3)
    query, key = views(pil_image)  # each (C, 32, 32) float32, normalised with MEAN/STD

Rotation fill: crops have a background (tissue around a nucleus, white around a
chromosome), so by default the corners that a rotation uncovers are filled by
reflecting the crop's own border (pad, rotate, centre-crop) instead of a constant
that no real crop contains; pass ``rotation_fill=255`` (say) for a constant. The
reflection costs about 20 % of view throughput on 32x32 crops.

Two back-ends, chosen by ``cfg.backend``:

- ``tensor`` (default): ``BatchViews`` augments a whole uint8 batch at once on the
  training device, every sample with its own random parameters (torchvision v2 draws one
  set per call, so it cannot do this). DataLoader workers only decode and resize; the
  views are made in the training process -- on a GPU, or on a CPU without spending the
  cores on per-image Python:

      views = BatchViews(cfg.data.views, channels=3)
      query, key = views(images_uint8, generator=g)  # (B, C, H, W) float32 each

- ``pil``: ``build_views`` makes the two views of one PIL image inside the workers
  (ops on PIL images are about 2x faster than on uint8 tensors at 32x32). Use it when
  crops are much larger than ``data.size``: the local crop is then cut from the
  full-resolution image instead of the resized one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
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
    ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel(cfg, size), sigma=tuple(cfg.blur_sigma))], p=cfg.p_blur))
    if cfg.flips:
        ops += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()] if cfg.vflip else [v2.RandomHorizontalFlip()]
    if cfg.rotation > 0:
        fill = 0.0 if rotation_fill is None else rotation_fill
        rotate = v2.RandomRotation((0.0, cfg.rotation), interpolation=_BILINEAR, fill=fill)
        if rotation_fill is None:  # reflect the border into the corners a rotation uncovers
            pad = math.ceil(size * (math.sqrt(2) - 1) / 2) + 1  # covers any angle
            ops += [v2.Pad(pad, padding_mode="reflect"), rotate, v2.CenterCrop(size)]
        else:
            ops.append(rotate)
    return v2.Compose(ops + _to_tensor(channels))


def blur_kernel(cfg: ViewsConfig, size: int) -> int:
    """``cfg.blur_kernel``, or by default about a tenth of the crop (odd, at least 3)."""
    if cfg.blur_kernel == 0:
        return max(3, (size // 10) | 1)
    if cfg.blur_kernel < 3 or cfg.blur_kernel % 2 == 0:
        raise ValueError(f"data.views.blur_kernel is {cfg.blur_kernel}; use an odd size of at least 3, or 0 for "
                         "the default.")
    return cfg.blur_kernel


RECIPES = ("local_global", "global_global", "local_local")


def cropping_branches(cfg: ViewsConfig) -> dict[str, bool]:
    """Which of the two branches take a random resized crop under ``cfg.recipe``."""
    if cfg.recipe not in RECIPES:
        raise ValueError(f"data.views.recipe is '{cfg.recipe}'; choose one of {', '.join(RECIPES)}.")
    if cfg.local not in ("query", "key"):
        raise ValueError(f"data.views.local is '{cfg.local}'; choose query or key.")
    if cfg.recipe == "local_local":
        return {"query": True, "key": True}
    crops = cfg.recipe == "local_global"
    return {"query": crops and cfg.local == "query", "key": crops and cfg.local == "key"}


class TwoViews:
    """PIL image -> (query view, key view), each (C, size, size) float32."""

    def __init__(self, query: Callable, key: Callable) -> None:
        self.query, self.key = query, key

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query(img), self.key(img)


def build_views(
    cfg: ViewsConfig, *, size: int, channels: int, rotation_fill: Optional[float] = None
) -> TwoViews:
    """The two-view augmentation named by ``cfg.recipe`` (see ``RECIPES``).

    ``rotation_fill``: None reflects the crop's border into the rotated corners; a number
    fills them with that constant (0-255).
    """
    local = cropping_branches(cfg)
    query, key = (
        _branch(cfg, local=local[side], size=size, channels=channels, rotation_fill=rotation_fill)
        for side in ("query", "key")
    )
    return TwoViews(query, key)


def build_eval_transform(*, size: int, channels: int) -> v2.Compose:
    """PIL image -> (C, size, size) float32: resize the whole crop, same normalisation as the views."""
    return v2.Compose([_Mode(channels), v2.Resize((size, size), antialias=True), *_to_tensor(channels)])


def build_decode_transform(*, size: int, channels: int) -> v2.Compose:
    """PIL image -> (C, size, size) uint8: what workers hand to ``BatchViews``."""
    return v2.Compose([_Mode(channels), v2.Resize((size, size), antialias=True), v2.ToImage()])


# ------------------------------------------------------------ batched (tensor back-end)

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    return torch.stack([(h / 6.0) % 1.0, s, maxc], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    """The six-sector HSV -> RGB map in closed form, channel n = v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (6h + n) mod 6 for n = 5, 3, 1 (R, G, B): the same values as a per-pixel sector
    look-up, without building and gathering a (6, 3, B, H, W) table (3.5x faster on 32x32 batches)."""
    h, s, v = x.unbind(1)
    h6, vs = h * 6.0, v * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        channels.append(v - vs * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, 1)


def normalize(x: Tensor) -> Tensor:
    """[0, 1] -> the network's input scale (MEAN/STD), as for evaluation."""
    return (x - MEAN) / STD


def to_pixels(x: Tensor) -> Tensor:
    """The inverse of the evaluation transform: normalised floats -> the stored 8-bit pixels (uint8)."""
    return ((x * STD + MEAN) * 255).round().clamp(0, 255).to(torch.uint8)


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


# Ruifrok & Johnston's stain vectors, rows H, E, DAB: the RGB optical density of one unit of each stain
# (scikit-image's ``rgb_from_hed``). Optical densities are scaled as scikit-image's ``rgb2hed`` does:
# OD = log(max(rgb, 1e-6)) / log(1e-6): 0 for white, 1 at the floor 1e-6 (0.4 for an 8-bit value of 1).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_OD_FLOOR = 1e-6


def rgb_to_hed(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> stain amounts (H, E, DAB), as ``skimage.color.rgb2hed`` but not clipped
    at 0, so that ``hed_to_rgb`` inverts it exactly."""
    od = torch.log(x.clamp_min(_OD_FLOOR)) / math.log(_OD_FLOOR)
    return torch.einsum("bchw,cs->bshw", od, HED_FROM_RGB.to(x))


def hed_to_rgb(stains: Tensor) -> Tensor:
    """(B, 3, H, W) stain amounts -> RGB in [0, 1], as ``skimage.color.hed2rgb``."""
    od = torch.einsum("bshw,sc->bchw", stains, RGB_FROM_HED.to(stains))
    return torch.exp(od * math.log(_OD_FLOOR)).clamp(0, 1)


def jitter_hed(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Tellez et al. (2018)'s stain augmentation: each stain's amount times ``scale`` plus ``shift``
    (both (B, 3): per sample and stain), in the optical-density space of ``rgb_to_hed``."""
    stains = rgb_to_hed(x)
    return hed_to_rgb(stains * scale[:, :, None, None] + shift[:, :, None, None])


class BatchViews:
    """uint8 batch (B, C, H, W) -> (query, key) float32, normalised with MEAN/STD.

    Each sample draws its own parameters from ``generator``. Per branch, in order:
    one geometric warp (random resized crop for the local view, redrawn while the box does
    not fit the image, as torchvision does; horizontal and vertical flips; rotation
    ~ U(0, cfg.rotation) degrees counter-clockwise, as torchvision's; bilinear, corners
    filled by reflecting the image), then, with ``hed`` > 0, a stain jitter in HED optical-density
    space (``jitter_hed``), with ``gamma`` > 0 a gamma jitter (``x ** g``, log g uniform in
    [-gamma, gamma]), then ColorJitter with probability ``p_jitter``
    (brightness, contrast, saturation, hue -- in this fixed order, where torchvision
    shuffles it), grayscale with ``p_gray`` and a Gaussian blur with ``p_blur``. Each op on
    its own, clamped to [0, 1], matches torchvision's functional op
    (tests/data/test_batch_views.py), and each random parameter has the PIL back-end's
    distribution (tests/data/test_view_distributions.py; crop boxes are continuous, as
    torchvision's whole-pixel boxes become on a fine source). Unlike torchvision,
    brightness, contrast and saturation are chained before one clamp, so a bright
    background is not flattened to white by the first op. The output size is the input size.
    """

    def __init__(self, cfg: ViewsConfig, *, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"data.channels is {channels}; set it to 1 (grayscale) or 3 (RGB).")
        self.cfg, self.channels = cfg, channels
        self.local = cropping_branches(cfg)

    def __call__(self, images: Tensor, *, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        x = self.unit(images)
        query = self.branch(x, local=self.local["query"], generator=generator)
        key = self.branch(x, local=self.local["key"], generator=generator)
        return normalize(query), normalize(key)

    def multi_crop(self, images: Tensor, *, generator: Optional[torch.Generator] = None
                   ) -> tuple[list[Tensor], list[Tensor]]:
        """uint8 batch (B, C, H, W) -> 2 global views (B, C, H, W) and ``cfg.local_crops`` local views
        (B, C, local_size, local_size), float32 normalised: DINO's multi-crop. A global view is a random
        resized crop of area fraction ``crop_scale`` resampled to the input size, a local view one of
        ``local_scale`` resampled to ``local_size``; each then takes this recipe's photometric ops. The
        local views of the batch are made in one pass (B x local_crops samples), each with its own draws."""
        x = self.unit(images)
        views = [normalize(self.branch(x, local=True, generator=generator)) for _ in range(2)]
        n, count = x.shape[0], self.cfg.local_crops
        if count == 0:
            return views, []
        local = self.branch(x.repeat(count, 1, 1, 1), local=True, generator=generator,
                            scale=self.cfg.local_scale, size=self.cfg.local_size)
        return views, list(normalize(local).split(n))

    def unit(self, images: Tensor) -> Tensor:
        """(B, C, H, W) uint8 (or float in [0, 1]) -> float32 in [0, 1], shape checked."""
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"BatchViews expects (B, {self.channels}, H, W) images; got {tuple(images.shape)}.")
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()

    # -- one branch

    def _uniform(self, n: int, low: float, high: float, x: Tensor, g: Optional[torch.Generator]) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=g, device=x.device)

    def _coin(self, n: int, p: float, x: Tensor, g: Optional[torch.Generator]) -> Tensor:
        return torch.rand(n, generator=g, device=x.device) < p

    def branch(self, x: Tensor, *, local: bool, generator: Optional[torch.Generator] = None,
               scale: Optional[list[float]] = None, size: Optional[int] = None) -> Tensor:
        """(B, C, H, W) float in [0, 1] -> one augmented view in [0, 1], (B, C, size, size) (default: the
        input's size); ``scale``: the crop's area fraction range (default ``cfg.crop_scale``)."""
        cfg, g, n = self.cfg, generator, x.shape[0]
        x = warp(x, self.geometry(n, local=local, like=x, generator=g, scale=scale), size=size)
        if cfg.hed > 0 and self.channels == 3:
            scale = self._uniform(n * 3, 1 - cfg.hed, 1 + cfg.hed, x, g).view(n, 3)
            shift = self._uniform(n * 3, -cfg.hed, cfg.hed, x, g).view(n, 3)
            x = jitter_hed(x, scale, shift)
        if cfg.gamma > 0:
            value = torch.exp(self._uniform(n, -cfg.gamma, cfg.gamma, x, g))
            x = adjust_gamma(x, value)
        if cfg.p_jitter > 0:
            b, c, s, h = cfg.jitter
            on = self._coin(n, cfg.p_jitter, x, g)
            y = adjust_brightness(x, self._uniform(n, max(0.0, 1 - b), 1 + b, x, g))
            y = adjust_contrast(y, self._uniform(n, max(0.0, 1 - c), 1 + c, x, g))
            if self.channels == 3:
                y = adjust_saturation(y, self._uniform(n, max(0.0, 1 - s), 1 + s, x, g))
                y = adjust_hue(y.clamp(0, 1), self._uniform(n, -h, h, x, g))
            x = torch.where(_per_sample(on), y.clamp(0, 1), x)
        if self.channels == 3 and cfg.p_gray > 0:
            on = self._coin(n, cfg.p_gray, x, g)
            x = torch.where(_per_sample(on), _gray(x).expand_as(x), x)
        if cfg.p_blur > 0:
            on = self._coin(n, cfg.p_blur, x, g)
            sigma = self._uniform(n, *cfg.blur_sigma, x, g)
            x = torch.where(_per_sample(on), gaussian_blur(x, sigma, blur_kernel(cfg, x.shape[-1])), x)
        return x

    def geometry(self, n: int, *, local: bool, like: Tensor, generator: Optional[torch.Generator] = None,
                 scale: Optional[list[float]] = None) -> Tensor:
        """(n, 2, 3) affine maps from output to input coordinates (``F.affine_grid`` convention)."""
        cfg, g = self.cfg, generator
        ones = torch.ones(n, device=like.device)
        if local:  # RandomResizedCrop: area fraction ~ U(scale), log aspect ~ U(log 3/4, log 4/3),
            # redrawn up to 10 times while the box is wider or taller than the image, then the whole image
            # (as torchvision; clamping the box instead shifts area and aspect for ~16 % of the crops)
            tries = 10
            area = self._uniform(n * tries, *(scale or cfg.crop_scale), like, g).view(n, tries)
            aspect = torch.exp(self._uniform(n * tries, math.log(3 / 4), math.log(4 / 3), like, g)).view(n, tries)
            w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)  # half-extent in [-1, 1] units = fraction
            fits = (w <= 1) & (h <= 1)
            first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
            half_w = torch.where(fits.any(1), w.gather(1, first).squeeze(1), ones)
            half_h = torch.where(fits.any(1), h.gather(1, first).squeeze(1), ones)
            cx = (1 - half_w) * self._uniform(n, -1.0, 1.0, like, g)
            cy = (1 - half_h) * self._uniform(n, -1.0, 1.0, like, g)
        else:
            half_w, half_h, cx, cy = ones, ones, 0 * ones, 0 * ones
        flip_x = torch.where(self._coin(n, 0.5, like, g), -ones, ones) if cfg.flips else ones
        flip_y = torch.where(self._coin(n, 0.5, like, g), -ones, ones) if cfg.flips and cfg.vflip else ones
        angle = self._uniform(n, 0.0, math.radians(cfg.rotation), like, g)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # input = centre + S @ Flip @ R @ output: crop, then flip, then rotate the view; with y pointing down,
        # R = [[cos, -sin], [sin, cos]] turns the view counter-clockwise, as torchvision's rotate does
        a = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (n, 2, 2)
        a = a * torch.stack([half_w * flip_x, half_h * flip_y], 1).unsqueeze(2)
        return torch.cat([a, torch.stack([cx, cy], 1).unsqueeze(2)], 2)


def warp(x: Tensor, theta: Tensor, size: Optional[int] = None) -> Tensor:
    """Resample (B, C, H, W) through affine maps ``theta`` (B, 2, 3) to (B, C, size, size) (default: the input's
    size); outside pixels reflect the image."""
    shape = list(x.shape) if size is None else [*x.shape[:2], size, size]
    grid = F.affine_grid(theta.to(x.dtype), shape, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``torchvision.transforms.v2.functional.adjust_brightness``, not clamped."""
    return x * _per_sample(factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``adjust_contrast``, not clamped: blend with the mean luma (mean intensity for one channel)."""
    mean = (_gray(x) if x.shape[1] == 3 else x).mean((1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return f * x + (1 - f) * mean


def adjust_gamma(x: Tensor, value: Tensor) -> Tensor:
    """Per-sample ``adjust_gamma`` (gain 1): ``x ** value``, x in [0, 1]."""
    return x.clamp(0, 1) ** _per_sample(value)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``adjust_saturation`` (RGB), not clamped: blend with the luma image."""
    f = _per_sample(factor)
    return f * x + (1 - f) * _gray(x)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Per-sample ``adjust_hue`` (RGB in [0, 1]): rotate the HSV hue by ``shift`` in [-0.5, 0.5] turns."""
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], 1))


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-sample ``gaussian_blur`` with a ``kernel_size`` square kernel and reflected borders."""
    b, c, h, w = x.shape
    r = kernel_size // 2
    offsets = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (offsets / sigma.to(x.dtype).view(-1, 1)) ** 2)  # (B, K)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B * C, K)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel_size), groups=b * c)  # along x
    y = F.conv2d(y, k.view(b * c, 1, kernel_size, 1), groups=b * c)  # along y
    return y.view(b, c, h, w)


__all__ = ["MEAN", "STD", "TwoViews", "BatchViews", "build_views", "build_eval_transform", "build_decode_transform",
           "rgb_to_hed", "hed_to_rgb", "jitter_hed"]
