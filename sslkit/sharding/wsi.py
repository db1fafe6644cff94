"""Whole-slide images to tiles at a target um/px: tissue mask, tile grid, block reads.

    sslkit shard wsi slides/ --out shards/wsi --mpp 0.5 --tile 256 --min-tissue 0.5

One unit per slide. A worker opens the slide with OpenSlide (TiffSlide when OpenSlide cannot
open the file or is not installed), finds its resolution, picks a pyramid level, makes a
tissue mask from a low-resolution overview and yields the tiles with enough tissue. With
``--reader auto`` (the default) TiffSlide decodes the pixels of slides it reads alike,
2-3x faster than OpenSlide (see ``open_slide``); OpenSlide's metadata stays in charge.

- Resolution: ``openslide.mpp-x/-y`` (``tiffslide.mpp-x/-y``). Without it, the objective
  power, assuming mpp = 10 / power (20x -> 0.5 um/px, 40x -> 0.25): a warning, and
  ``mpp_source: objective-power``. ``--mpp-override`` sets level 0's um/px of every slide.
  Values outside 0.02-20 um/px (a plain TIFF's 72 dpi is 353 um/px) count as missing.
- Level: the coarsest level at most ``MPP_TOLERANCE`` (2 %) coarser than the target. A level
  within 2 % of the target is read as it is (meta ``level_mpp`` keeps its true um/px); any
  other is read and shrunk by the exact factor (0.2497 -> 0.5 um/px is 1 / 2.0024, not 1/2).
  A target finer than level 0 fails the slide: upsampling invents detail.
- Grid: tiles of ``tile`` target pixels with stride ``tile - overlap`` from the top-left
  corner; only whole tiles inside the slide, so a strip narrower than the stride is left out
  at the right and bottom. Keys ``<slide>_<x>_<y>`` with x, y in level-0 pixels.
- Tissue (``tissue_mask``): saturation, Otsu threshold kept within fixed bounds and above
  the glass's own level, hysteresis so pale stain joined to clear tissue stays in, green/blue
  marker and black excluded, small holes filled and specks removed (sizes in um^2). Blank
  glass gives no tissue. The mask (``masks/<slide>.png``) and the overview with the kept
  tiles outlined (``masks/<slide>-tiles.png``) are written for inspection.
- Speed and memory: tiles are read in blocks of about ``BLOCK_PX`` level pixels a side (one
  ``read_region`` each, resized once with a margin so blocks join seamlessly), sliced with
  numpy; blocks without kept tiles are not read; on resume the first ``skip`` tiles are not
  read again. Memory is bounded by the block and the overview (at most ``MASK_MAX_SIDE``).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from sslkit.config import ConfigError
from sslkit.sharding.imaging import resize, to_channels
from sslkit.sharding.source import Progress, Sample, Unit, UnitError, safe_id

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")
READERS = ("auto", "openslide", "tiffslide")  # see open_slide
MPP_TOLERANCE = 0.02  # a level within 2 % of the target um/px is read without resizing
PLAUSIBLE_MPP = (0.02, 20.0)  # um/px; outside: metadata treated as missing
BLOCK_PX = 2048  # side of one read, in level pixels (plus the resampling margin)
MASK_TILE_PX = 16  # overview pixels along a tile side, at least MASK_MIN_MPP um each
MASK_MIN_MPP, MASK_MAX_SIDE = 2.0, 4096
SAT_HIGH, SAT_LOW = (0.07, 0.15), 0.04  # bounds of the Otsu threshold; floor of the hysteresis low
SPECK_UM2, HOLE_UM2 = 10_000.0, 40_000.0  # tissue pieces smaller than 0.01 mm^2 dropped; holes < 0.04 mm^2 filled


# ---------------------------------------------------------------- opening and reading slides


class Slide:
    """An open slide behind one interface; ``read`` gives (h, w, 3) uint8 RGB composited on white.

    ``properties``/``prefix``: whose metadata to use (OpenSlide's when TiffSlide only decodes).
    """

    def __init__(self, handle: Any, backend: str, path: str, *, properties: Optional[dict] = None,
                 prefix: Optional[str] = None) -> None:
        self.handle, self.backend, self.path = handle, backend, path
        self.dimensions = [tuple(map(int, d)) for d in handle.level_dimensions]  # (width, height) per level
        self.downsamples = [float(d) for d in handle.level_downsamples]
        self.properties = dict(handle.properties if properties is None else properties)
        self.prefix, self.reader = prefix or backend, backend

    def prop(self, name: str) -> Optional[str]:
        """A standard property without its prefix: ``prop("mpp-x")`` -> ``openslide.mpp-x``."""
        value = self.properties.get(f"{self.prefix}.{name}")
        return None if value is None else str(value)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level pixels [x, x+w) x [y, y+h) of ``level`` -> (h, w, 3) uint8."""
        ds = self.downsamples[level]
        try:
            if self.backend == "openslide":
                return _openslide_rgb(self.handle, (round(x * ds), round(y * ds)), level, (w, h))
            loc = (_floor_divisible(x, ds), _floor_divisible(y, ds))  # TiffSlide floors loc / ds
            return to_channels(self.handle.read_region(loc, level, (w, h), as_array=True), 3)
        except Exception as err:  # noqa: BLE001 -- OpenSlideError, tifffile/zarr/codec errors
            raise UnitError(f"Reading {self.path} failed at level {level}, region x={x} y={y} {w}x{h} "
                            f"({self.backend}: {err}); the file is damaged or incomplete: copy it again.") from None

    def thumbnail(self) -> Optional[np.ndarray]:
        """The slide's stored thumbnail image as (h, w, 3) uint8, or None."""
        try:
            image = self.handle.associated_images.get("thumbnail")
            return None if image is None else to_channels(np.asarray(image), 3)
        except Exception:  # noqa: BLE001 -- an unreadable extra image: the pyramid is used instead
            return None

    def tile_size(self, level: int) -> Optional[tuple[int, int]]:
        """(width, height) of the level's stored tiles, when the metadata says."""
        try:
            size = int(self.prop(f"level[{level}].tile-width")), int(self.prop(f"level[{level}].tile-height"))
        except (TypeError, ValueError, OverflowError):  # missing, or "inf" for a stripped TIFF
            return None
        return size if min(size) > 0 else None

    def close(self) -> None:
        self.handle.close()


def _openslide_rgb(handle: Any, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """OpenSlide region -> (h, w, 3) uint8 on white; a view of OpenSlide's own buffer when it can be.

    ``OpenSlide.read_region`` un-premultiplies into a PIL image that ``np.asarray`` copies
    again (measured on 2048 x 2048 reads: 16 instead of 11 ns/px). Here the C function
    fills a numpy buffer, and premultiplied ARGB over white is simply rgb + (255 - alpha).
    """
    from openslide import lowlevel

    (w, h), osr = size, getattr(handle, "_osr", None)
    if osr is None or not getattr(lowlevel, "_read_region", None) or w * h == 0:  # other bindings
        return to_channels(np.asarray(handle.read_region(location, level, size)), 3)
    buf = np.empty(h * w, dtype=np.uint32)
    lowlevel._read_region(osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                          location[0], location[1], level, w, h)
    argb = buf.view(np.uint8).reshape(h, w, 4)  # native-endian 0xAARRGGBB
    rgb, alpha = (argb[:, :, 2::-1], argb[:, :, 3]) if sys.byteorder == "little" else (argb[:, :, 1:], argb[:, :, 0])
    if alpha.min() == 255:
        return rgb
    return rgb + (255 - alpha)[:, :, None]  # premultiplied: never above 255


def _floor_divisible(v: int, ds: float) -> int:
    """The level-0 coordinate c with int(c / ds) == v (what TiffSlide computes from it)."""
    c = round(v * ds)
    while int(c / ds) < v:
        c += 1
    while c > 0 and int(c / ds) > v:
        c -= 1
    return c


def _open_openslide(path: str) -> Slide:
    try:
        import openslide
    except (ImportError, OSError) as err:  # OSError: the library itself does not load
        raise RuntimeError(f"OpenSlide is not available ({err})") from None
    try:
        return Slide(openslide.OpenSlide(path), "openslide", path)
    except (openslide.OpenSlideError, OSError) as err:
        raise RuntimeError(f"OpenSlide: {err}") from None


def _open_tiffslide(path: str) -> Slide:
    try:
        import tiffslide
        return Slide(tiffslide.TiffSlide(path), "tiffslide", path)
    except Exception as err:  # noqa: BLE001 -- TiffFileError, ValueError, NotImplementedError, ImportError ...
        raise RuntimeError(f"TiffSlide: {type(err).__name__}: {err}") from None


def _tiffslide_twin(slide: Slide) -> Optional[Slide]:
    """TiffSlide on the file OpenSlide opened, if it sees the same pyramid and decodes the same image.

    Checked on 128 x 128 pixels at the centre of level 0 and of the coarsest level: PSNR at
    least 35 dB (JPEG decoders differ slightly in chroma upsampling; a wrong colour space or
    a shifted level is far below). OpenSlide's metadata stays in use.
    """
    try:
        twin = _open_tiffslide(slide.path)
    except RuntimeError:
        return None
    same = twin.dimensions == slide.dimensions
    try:
        for level in sorted({0, len(slide.dimensions) - 1}) if same else []:
            w, h = (min(128, d) for d in slide.dimensions[level])
            x, y = (slide.dimensions[level][0] - w) // 2, (slide.dimensions[level][1] - h) // 2
            diff = twin.read(level, x, y, w, h).astype(np.float32) - slide.read(level, x, y, w, h)
            same = same and float(np.mean(diff * diff)) <= 255.0 ** 2 / 10 ** 3.5
    except UnitError:
        same = False
    if not same:
        twin.close()
        return None
    twin.properties, twin.prefix, twin.reader = slide.properties, slide.prefix, "openslide+tiffslide"
    return twin


def open_slide(path: str, reader: str = "auto") -> Slide:
    """Open ``path``; ``reader`` says how (see ``READERS``). Raises UnitError naming both libraries' errors.

    "auto": OpenSlide opens and describes the slide (TiffSlide when OpenSlide cannot); TiffSlide
    decodes the pixels when it sees the same pyramid and decodes a sample alike (it decodes
    TIFF-based slides 2-3x faster). "openslide" / "tiffslide": that library, the other as fallback.
    """
    order = [_open_tiffslide, _open_openslide] if reader == "tiffslide" else [_open_openslide, _open_tiffslide]
    errors = []
    for opener in order:
        try:
            slide = opener(path)
        except RuntimeError as err:
            errors.append(str(err))
            continue
        if reader == "auto" and slide.backend == "openslide":
            twin = _tiffslide_twin(slide)
            if twin is not None:
                slide.close()
                return twin
        return slide
    raise UnitError(f"Cannot open {path} as a slide ({'; '.join(errors)}); check that the file is complete "
                    "and in a format OpenSlide reads.")


# ---------------------------------------------------------------- resolution and level


def _plausible(value: Optional[str]) -> Optional[float]:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and PLAUSIBLE_MPP[0] <= number <= PLAUSIBLE_MPP[1] else None


def slide_mpp(slide: Slide, *, override: Optional[float] = None) -> tuple[float, float, str]:
    """(mpp_x, mpp_y, source) of level 0; source is "metadata", "objective-power" or "override"."""
    if override is not None:
        return override, override, "override"
    mpp_x = _plausible(slide.prop("mpp-x"))
    if mpp_x is not None:
        return mpp_x, _plausible(slide.prop("mpp-y")) or mpp_x, "metadata"
    try:
        power = float(slide.prop("objective-power") or "nan")
    except ValueError:
        power = math.nan
    if 1.0 <= power <= 200.0:
        return 10.0 / power, 10.0 / power, "objective-power"
    stated = slide.prop("mpp-x")
    found = f"mpp {stated} um/px is not plausible" if stated is not None else "no mpp"
    raise UnitError(f"{slide.path} has no usable resolution ({found}, no objective power); give level 0's "
                    "um/px with --mpp-override (e.g. 0.25 for 40x scans, 0.5 for 20x).")


@dataclass(frozen=True)
class Geometry:
    """Where target pixels come from: ``scale`` = level pixels per target pixel, (1, 1) = as read."""

    level: int
    downsample: float  # of the level, against level 0
    level_mpp: tuple[float, float]
    scale: tuple[float, float]
    size: tuple[int, int]  # the slide in target pixels (width, height)

    def to_level0(self, tx: float, ty: float) -> tuple[int, int]:
        return (round(tx * self.scale[0] * self.downsample), round(ty * self.scale[1] * self.downsample))


def choose_level(slide: Slide, mpp: tuple[float, float], target: float, *,
                 tolerance: float = MPP_TOLERANCE) -> Geometry:
    """The coarsest level no coarser than ``target`` um/px (within ``tolerance``); see the module notes."""
    fits = [i for i, ds in enumerate(slide.downsamples) if max(mpp) * ds <= target * (1 + tolerance)]
    if not fits:
        raise UnitError(f"{slide.path} is scanned at {mpp[0]:.4g} um/px, coarser than --mpp {target:g}, and "
                        f"upsampling would invent detail; use --mpp {mpp[0]:.4g} or more (or --mpp-override if "
                        "the slide's resolution metadata is wrong).")
    level = max(fits, key=lambda i: (slide.downsamples[i], -i))
    ds = slide.downsamples[level]
    level_mpp = (mpp[0] * ds, mpp[1] * ds)
    scale = (target / level_mpp[0], target / level_mpp[1])
    if all(abs(s - 1.0) <= tolerance for s in scale):
        scale = (1.0, 1.0)
    width, height = slide.dimensions[level]
    size = (int(math.floor(width / scale[0] + 1e-9)), int(math.floor(height / scale[1] + 1e-9)))
    return Geometry(level=level, downsample=ds, level_mpp=level_mpp, scale=scale, size=size)


def read_scaled(slide: Slide, level: int, box: tuple[float, float, float, float],
                size: tuple[int, int], *, area: bool = False) -> np.ndarray:
    """Level-pixel box (x0, y0, x1, y1), fractional, resampled to ``size`` = (h, w) -> (h, w, 3) uint8.

    One read with a margin of the filter's reach, clipped to the level; so a grid of boxes
    gives the same pixels as resizing the whole level at once.
    """
    x0, y0, x1, y1 = box
    (h, w), (width, height) = size, slide.dimensions[level]
    mx, my = math.ceil((x1 - x0) / w) + 1, math.ceil((y1 - y0) / h) + 1
    rx0, ry0 = max(0, math.floor(x0) - mx), max(0, math.floor(y0) - my)
    rx1, ry1 = min(width, math.ceil(x1) + mx), min(height, math.ceil(y1) + my)
    region = np.ascontiguousarray(slide.read(level, rx0, ry0, rx1 - rx0, ry1 - ry0))
    return resize(region, (h, w), box=(x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0), area=area)


def read_target(slide: Slide, geom: Geometry, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Target pixels [x, x+w) x [y, y+h) -> (h, w, 3) uint8."""
    sx, sy = geom.scale
    if (sx, sy) == (1.0, 1.0):
        return slide.read(geom.level, x, y, w, h)
    return read_scaled(slide, geom.level, (x * sx, y * sy, (x + w) * sx, (y + h) * sy), (h, w))


# ---------------------------------------------------------------- tissue


def read_overview(slide: Slide, shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    """The whole slide as (h, w, 3) uint8 for ``shape`` = (h, w), and where it came from.

    From the coarsest level at least that fine, read in blocks; from the stored thumbnail
    instead when that level is far larger and the thumbnail shows the same area (aspect
    within 1 %) at least as finely.
    """
    (h, w), (width0, height0) = shape, slide.dimensions[0]
    per_px = min(width0 / w, height0 / h)  # level-0 pixels per overview pixel
    level = max((i for i, ds in enumerate(slide.downsamples) if ds <= per_px * (1 + MPP_TOLERANCE)),
                key=lambda i: slide.downsamples[i], default=0)
    width, height = slide.dimensions[level]
    if width * height > 16 * w * h:
        thumb = slide.thumbnail()
        if (thumb is not None and thumb.shape[0] >= h and thumb.shape[1] >= w
                and abs(thumb.shape[1] / width0 - thumb.shape[0] / height0) <= 0.01 * thumb.shape[1] / width0):
            return resize(thumb, (h, w), box=(0, 0, thumb.shape[1], thumb.shape[0]), area=True), "thumbnail"
    fx, fy = width / w, height / h
    step = max(1, int(BLOCK_PX // max(fx, fy)))
    out = np.empty((h, w, 3), dtype=np.uint8)
    for y0 in range(0, h, step):
        for x0 in range(0, w, step):
            y1, x1 = min(h, y0 + step), min(w, x0 + step)
            box = (x0 * fx, y0 * fy, x1 * fx, y1 * fy)
            out[y0:y1, x0:x1] = read_scaled(slide, level, box, (y1 - y0, x1 - x0), area=True)
    return out, f"level {level}"


def tissue_mask(rgb: np.ndarray, *, um_per_px: float) -> np.ndarray:
    """(H, W, 3) uint8 overview of a slide -> (H, W) bool, True on tissue (see the module notes).

    Stain-agnostic (H&E, IHC/DAB, pale stains): tissue is coloured, glass is grey-white.
    """
    from scipy import ndimage
    from skimage import filters, morphology

    hi, lo = rgb.max(axis=2), rgb.min(axis=2)  # (H, W) uint8
    sat = (hi - lo) / np.maximum(hi, 1).astype(np.float32)  # the overview is area-averaged: no more smoothing
    otsu = float(filters.threshold_otsu(sat)) if np.ptp(sat) > 1e-6 else SAT_HIGH[1]
    glass = sat[sat < otsu]  # (and pale tissue): the glass's own tint and noise set the low threshold
    level = float(np.median(glass)) if glass.size else 0.0
    low = max(SAT_LOW, level + 6.0 * float(np.median(np.abs(glass - level))) if glass.size else 0.0)  # ~4 sigma
    high = max(float(np.clip(otsu, *SAT_HIGH)), low)
    tissue = filters.apply_hysteresis_threshold(sat, low, high)
    r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    marker = (sat > 0.2) & (g >= r) & ((g >= b) | (sat > 0.5))  # green/cyan ink; saturated blue ink
    tissue &= ~marker & (hi > 38)  # and nothing black (ink, dirt, scanner edges)
    tissue = ndimage.binary_closing(tissue, structure=np.ones((3, 3), bool), border_value=1) | tissue
    px = um_per_px * um_per_px
    tissue = morphology.remove_small_holes(tissue, max_size=int(HOLE_UM2 / px))
    return morphology.remove_small_objects(tissue, max_size=int(SPECK_UM2 / px))


def box_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box (N, 4) = x0, y0, x1, y1 in fractional mask pixels that is True -> (N,).

    Exact for fractional edges: the integral of a pixelwise-constant mask is bilinear within
    each pixel, so the summed-area table is interpolated bilinearly at the corners.
    """
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), dtype=np.int32)  # masks have at most MASK_MAX_SIDE ** 2 pixels
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=table[1:, 1:])

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.clip(x, 0, w), np.clip(y, 0, h)
        i, j = np.minimum(np.floor(x).astype(int), w - 1), np.minimum(np.floor(y).astype(int), h - 1)
        fx, fy = x - i, y - j
        return ((1 - fy) * ((1 - fx) * table[j, i] + fx * table[j, i + 1])
                + fy * ((1 - fx) * table[j + 1, i] + fx * table[j + 1, i + 1]))

    x0, y0, x1, y1 = (boxes[:, k].astype(np.float64) for k in range(4))
    area = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    return area / np.maximum((x1 - x0) * (y1 - y0), 1e-12)


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def _outline(overview: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The overview with each box (N, 4) in overview pixels outlined in green."""
    out = overview.copy()
    h, w = out.shape[:2]
    for x0, y0, x1, y1 in np.rint(boxes).astype(int):
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w - 1, x1 - 1), min(h - 1, y1 - 1)
        out[y0:y1 + 1, [x0, x1]] = (0, 170, 0)
        out[[y0, y1], x0:x1 + 1] = (0, 170, 0)
    return out


# ---------------------------------------------------------------- the tile plan


def tile_grid(size: tuple[int, int], *, tile: int, stride: int, per_block: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole tiles of a slide ``size`` = (width, height) target pixels, block by block.

    Returns (N, 2) top-left corners (x, y) and (N,) block numbers: blocks of ``per_block`` x
    ``per_block`` tiles in row-major order, tiles row-major inside a block.
    """
    xs = np.arange(0, size[0] - tile + 1, stride)
    ys = np.arange(0, size[1] - tile + 1, stride)
    ix, iy = (a.ravel() for a in np.meshgrid(np.arange(len(xs)), np.arange(len(ys))))
    bx, by = ix // per_block, iy // per_block
    order = np.lexsort((ix, iy, bx, by))
    blocks = by * max(1, -(-len(xs) // per_block)) + bx
    corners = np.stack([xs[ix[order]], ys[iy[order]]], axis=1).astype(np.int64).reshape(-1, 2)
    return corners, blocks[order].astype(np.int64)


@dataclass(frozen=True)
class TilePlan:
    """One slide's kept tiles, in the order they are yielded, and what the manifest says about it."""

    geometry: Geometry
    tiles: np.ndarray  # (N, 2) top-left corners, target pixels
    tissue: np.ndarray  # (N,) tissue fractions
    blocks: np.ndarray  # (N,) block numbers, non-decreasing
    boxes: np.ndarray  # (N, 4) the tiles in overview pixels
    info: dict


def plan_tiles(slide: Slide, *, mpp: float, tile: int, overlap: int, min_tissue: float,
               mpp_override: Optional[float] = None,
               tolerance: float = MPP_TOLERANCE) -> tuple[TilePlan, np.ndarray, np.ndarray]:
    """(plan, overview (h, w, 3) uint8, mask (h, w) bool) of one slide: which tiles to read, in order."""
    mx, my, source = slide_mpp(slide, override=mpp_override)
    geom = choose_level(slide, (mx, my), mpp, tolerance=tolerance)
    width0, height0 = slide.dimensions[0]
    mask_mpp = max(MASK_MIN_MPP, tile * mpp / MASK_TILE_PX, max(width0 * mx, height0 * my) / MASK_MAX_SIDE)
    shape = (max(1, round(height0 * my / mask_mpp)), max(1, round(width0 * mx / mask_mpp)))
    overview, overview_source = read_overview(slide, shape)
    mask = tissue_mask(overview, um_per_px=mask_mpp)
    stride = tile - overlap
    per_block = max(1, int((BLOCK_PX / max(geom.scale) - tile) // stride) + 1)
    corners, blocks = tile_grid(geom.size, tile=tile, stride=stride, per_block=per_block)
    to_mask = np.array([geom.scale[0] * geom.downsample * shape[1] / width0,
                        geom.scale[1] * geom.downsample * shape[0] / height0])  # overview px per target px
    boxes = np.concatenate([corners * to_mask, (corners + tile) * to_mask], axis=1).reshape(-1, 4)
    fractions = box_fractions(mask, boxes)
    keep = fractions >= min_tissue - 1e-9
    info = {"mpp": mpp, "mpp_source": source, "level0_mpp": round(mx, 6), "level": geom.level,
            "level_mpp": round(geom.level_mpp[0], 6), "downsample": round(geom.scale[0], 6),
            "level_downsample": round(geom.downsample, 6), "reader": slide.reader, "tiles": int(keep.sum()),
            "grid_tiles": len(corners), "tissue_fraction": round(float(mask.mean()), 4),
            "mask_source": overview_source}
    if source == "objective-power":
        info["note"] = (f"no mpp metadata: assumed {mx:.4g} um/px from objective power "
                        f"{slide.prop('objective-power')} (mpp = 10 / power)")
    plan = TilePlan(geometry=geom, tiles=corners[keep], tissue=fractions[keep], blocks=blocks[keep],
                    boxes=boxes[keep], info=info)
    return plan, overview, mask


# ---------------------------------------------------------------- the source


class WsiSource:
    """Slides -> ``tile`` x ``tile`` RGB tiles at ``mpp`` um/px with at least ``min_tissue`` tissue."""

    kind = "wsi"
    classes = None
    handles_skip = True
    unit_noun, sample_noun = "slide", "tile"

    def __init__(self, slides: list[str], *, mpp: float = 0.5, tile: int = 256, overlap: int = 0,
                 min_tissue: float = 0.5, encode: str = "jpeg", quality: int = 90,
                 mpp_override: Optional[float] = None, mpp_tolerance: float = MPP_TOLERANCE,
                 reader: str = "auto", mask_dir: Optional[str] = None, recursive: bool = False) -> None:
        _check_settings(mpp=mpp, tile=tile, overlap=overlap, min_tissue=min_tissue, encode=encode,
                        quality=quality, mpp_override=mpp_override, mpp_tolerance=mpp_tolerance, reader=reader)
        self.mpp, self.tile, self.overlap, self.min_tissue = float(mpp), int(tile), int(overlap), float(min_tissue)
        self.encode, self.quality = encode, int(quality)
        self.mpp_override = None if mpp_override is None else float(mpp_override)
        self.mpp_tolerance, self.reader = float(mpp_tolerance), reader
        self.mask_dir = None if mask_dir is None else str(mask_dir)
        self.slides, self.failed = find_slides(slides, recursive=recursive)

    def params(self) -> dict:
        return {"mpp": self.mpp, "tile": self.tile, "overlap": self.overlap, "min_tissue": self.min_tissue,
                "mpp_override": self.mpp_override, "mpp_tolerance": self.mpp_tolerance, "reader": self.reader,
                "tissue": {"sat_high": list(SAT_HIGH), "sat_low": SAT_LOW, "speck_um2": SPECK_UM2,
                           "hole_um2": HOLE_UM2}}

    def units(self) -> list[Unit]:
        return [Unit(id=uid, path=path, cost=float(slide_bytes(path)))
                for uid, path in zip(slide_ids(self.slides), self.slides)]

    def produce(self, unit: Unit, *, skip: int, progress: Progress) -> Iterator[Sample]:
        slide = open_slide(unit.path, self.reader)
        try:
            plan, overview, mask = plan_tiles(slide, mpp=self.mpp, tile=self.tile, overlap=self.overlap,
                                              min_tissue=self.min_tissue, mpp_override=self.mpp_override,
                                              tolerance=self.mpp_tolerance)
            info = dict(plan.info)
            if info["mpp_source"] == "objective-power":
                warnings.warn(f"{unit.path}: {info['note']}; give --mpp-override if that is wrong.", stacklevel=2)
            if self.mask_dir is not None:
                info["mask"] = str(Path(self.mask_dir) / f"{unit.id}.png")
                _save_png(mask.astype(np.uint8) * 255, Path(info["mask"]))
                _save_png(_outline(overview, plan.boxes), Path(self.mask_dir) / f"{unit.id}-tiles.png")
            if len(plan.tiles) == 0:
                found = "no tissue found" if not mask.any() else f"no tile has tissue >= {self.min_tissue:g}"
                info["note"] = "; ".join(filter(None, [info.get("note"), f"{found}: 0 tiles"]))
            progress.info(**info)
            progress.total(len(plan.tiles))
            yield from self._tiles(slide, unit, plan, skip)
        finally:
            slide.close()

    def _tiles(self, slide: Slide, unit: Unit, plan: TilePlan, skip: int) -> Iterator[Sample]:
        """The plan's tiles from index ``skip`` on, block by block; see ``read_spans``."""
        geom, t = plan.geometry, self.tile
        start = min(skip, len(plan.tiles))
        while start < len(plan.tiles):
            stop = start + int(np.searchsorted(plan.blocks[start:], plan.blocks[start], side="right"))
            if start == skip > 0 and plan.blocks[start - 1] == plan.blocks[start]:  # resuming inside a block:
                stop = start + int(np.sum(plan.tiles[start:stop, 1] == plan.tiles[start, 1]))  # its row first
            for i0, i1 in read_spans(plan.tiles[start:stop], tile=t, stride=t - self.overlap,
                                     cost=_read_cost(slide, geom)):
                corners = plan.tiles[start + i0:start + i1]
                (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0) + t
                pixels = read_target(slide, geom, int(x0), int(y0), int(x1 - x0), int(y1 - y0))  # (H, W, 3)
                for (x, y), fraction in zip(corners.tolist(), plan.tissue[start + i0:start + i1].tolist()):
                    lx, ly = geom.to_level0(x, y)
                    meta = {"slide": unit.id, "path": unit.path, "x": lx, "y": ly, "level": geom.level,
                            "mpp": self.mpp, "level_mpp": round(geom.level_mpp[0], 6), "tissue": round(fraction, 4)}
                    yield Sample(key=safe_id(f"{unit.id}_{lx}_{ly}"), image=np.ascontiguousarray(
                        pixels[y - y0:y - y0 + t, x - x0:x - x0 + t]), meta=meta)
            start = stop


def read_spans(corners: np.ndarray, *, tile: int, stride: int,
               cost: Callable[[int, int, int, int], float]) -> list[tuple[int, int]]:
    """How to read one block's tiles (N, 2), row-major: index ranges, one read each.

    Either the bounding box in one read, or each run of side-by-side tiles in a row on its
    own, whichever ``cost(x0, y0, x1, y1)`` (a target-pixel box) says is cheaper.
    """
    breaks = np.flatnonzero((np.diff(corners[:, 1]) != 0) | (np.diff(corners[:, 0]) != stride)) + 1
    edges = [0, *breaks.tolist(), len(corners)]
    runs = list(zip(edges[:-1], edges[1:]))
    (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0) + tile
    by_runs = sum(cost(corners[i, 0], corners[i, 1], corners[j - 1, 0] + tile, corners[i, 1] + tile) for i, j in runs)
    return [(0, len(corners))] if cost(x0, y0, x1, y1) <= by_runs else runs


def _read_cost(slide: Slide, geom: Geometry) -> Callable[[int, int, int, int], float]:
    """Cost of reading a target-pixel box: its pixels for OpenSlide (which caches decoded
    tiles, so neighbouring reads decode nothing twice); for TiffSlide, which decodes every
    stored tile a read touches, the pixels of those tiles."""
    (sx, sy), stored = geom.scale, slide.tile_size(geom.level)
    if slide.backend == "openslide" or stored is None:
        return lambda x0, y0, x1, y1: float((x1 - x0) * (y1 - y0))
    tw, th = stored

    def decoded(x0: int, y0: int, x1: int, y1: int) -> float:
        cols = math.ceil(x1 * sx / tw) - math.floor(x0 * sx / tw)
        rows = math.ceil(y1 * sy / th) - math.floor(y0 * sy / th)
        return float(cols * rows * tw * th) / (sx * sy)

    return decoded


def _check_settings(*, mpp: float, tile: int, overlap: int, min_tissue: float, encode: str, quality: int,
                    mpp_override: Optional[float], mpp_tolerance: float, reader: str) -> None:
    checks = [
        (mpp > 0, f"--mpp must be a positive um/px such as 0.5, got {mpp}."),
        (tile >= 8, f"--tile must be at least 8 pixels, got {tile}."),
        (0 <= overlap < tile, f"--overlap must be from 0 to --tile - 1 ({tile - 1}), got {overlap}."),
        (0 <= min_tissue <= 1, f"--min-tissue must be a fraction from 0 to 1, got {min_tissue}."),
        (encode in ("jpeg", "png"), f"--encode must be jpeg or png, got {encode!r}."),
        (1 <= quality <= 100, f"--quality must be from 1 to 100, got {quality}."),
        (mpp_override is None or mpp_override > 0, f"--mpp-override must be a positive um/px, got {mpp_override}."),
        (0 <= mpp_tolerance < 0.5, f"--mpp-tolerance must be a fraction from 0 to 0.5, got {mpp_tolerance}."),
        (reader in READERS, f"--reader must be one of {', '.join(READERS)}, got {reader!r}."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ---------------------------------------------------------------- finding slides and naming them


def find_slides(items: list[str], *, recursive: bool = False) -> tuple[list[str], list[dict]]:
    """Slide paths from files, folders (their slide files, sorted) and ``@list.txt`` files.

    Returns (paths without repeats, failed): missing entries of a list file are recorded as
    failed; a missing path given directly, or a folder without slides, raises FileNotFoundError.
    """
    paths: list[str] = []
    failed: list[dict] = []
    for item in items:
        if item.startswith("@"):
            listed = Path(item[1:])
            if not listed.is_file():
                raise FileNotFoundError(f"Slide list {listed} does not exist; give a text file with one path a line.")
            for line in listed.read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                path = Path(line) if Path(line).is_absolute() else listed.parent / line
                if path.is_file():
                    paths.append(str(path))
                else:
                    failed.append({"source": str(path), "reason": f"listed in {listed} but not a file; fix the list."})
        elif os.path.isdir(item):
            pattern = "**/*" if recursive else "*"
            found = sorted(str(p) for p in Path(item).glob(pattern)
                           if p.suffix.lower() in SLIDE_EXTENSIONS and p.is_file())
            if not found:
                raise FileNotFoundError(f"Folder {item} holds no slide files ({', '.join(SLIDE_EXTENSIONS)}); "
                                        "give slide files or a folder of them" + ("." if recursive else
                                                                                  ", or add --recursive."))
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"Slide {item} does not exist; check the path.")
    seen: set[str] = set()
    unique = [p for p in paths if not (os.path.abspath(p) in seen or seen.add(os.path.abspath(p)))]
    return unique, failed


def slide_ids(paths: list[str]) -> list[str]:
    """One id per slide: safe_id of the file stem. Slides whose stems collide are all named
    with their parent folders (as few as tell them apart), else also with the suffix, else
    numbered -2, -3 in input order; never equal to another slide's id."""
    ids = [safe_id(Path(p).stem) for p in paths]
    groups: dict[str, list[int]] = {}
    for i, uid in enumerate(ids):
        groups.setdefault(uid, []).append(i)
    taken = {uid for uid, members in groups.items() if len(members) == 1}
    for members in (g for g in groups.values() if len(g) > 1):
        parts = [Path(os.path.abspath(paths[i])).parts[:-1] for i in members]
        depth = max(len(p) for p in parts)
        tries = [(d, False) for d in range(1, depth + 1)] + [(d, True) for d in range(depth + 1)]
        for d, suffix in tries:
            names = [safe_id("_".join(p[len(p) - d:] + ((Path(paths[i]).name if suffix else Path(paths[i]).stem),)))
                     for p, i in zip(parts, members)]
            if len(set(names)) == len(names) and not taken & set(names):
                break
        else:
            names = [ids[members[0]] + (f"-{k + 1}" if k else "") for k in range(len(members))]
        for i, name in zip(members, names):
            ids[i] = name
        taken.update(names)
    return ids


def slide_bytes(path: str) -> int:
    """File size; for MIRAX (.mrxs) also the files of its companion folder."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    companion = Path(path).with_suffix("")
    if Path(path).suffix.lower() == ".mrxs" and companion.is_dir():
        size += sum(f.stat().st_size for f in companion.iterdir() if f.is_file())
    return size


# ---------------------------------------------------------------- command line

_EPILOG = """examples:
  sslkit shard wsi slides/ --out shards/wsi --mpp 0.5 --tile 256
  sslkit shard wsi a.svs b.ndpi --out shards/wsi --mpp 1.0 --tile 224 --min-tissue 0.25 --encode png
  sslkit shard wsi @slides.txt --out shards/wsi --mpp-override 0.25    # slides without resolution metadata
OUT/masks/<slide>.png is each slide's tissue mask, OUT/masks/<slide>-tiles.png its kept tiles."""


def _cmd_wsi(args: argparse.Namespace) -> None:
    from sslkit.sharding.runner import run_source, runner_kwargs

    source = WsiSource(args.slides, mpp=args.mpp, tile=args.tile, overlap=args.overlap,
                       min_tissue=args.min_tissue, encode=args.encode, quality=args.quality,
                       mpp_override=args.mpp_override, mpp_tolerance=args.mpp_tolerance, reader=args.reader,
                       mask_dir=str(Path(args.out) / "masks"), recursive=args.recursive)
    run_source(source, args.out, **runner_kwargs(args), command=shlex.join(sys.argv))


def add_parser(shard_sub: Any) -> argparse.ArgumentParser:
    """Add ``sslkit shard wsi`` to the ``sslkit shard`` sub-parsers."""
    from sslkit.sharding.runner import add_runner_args

    p = shard_sub.add_parser("wsi", help="whole-slide images -> tissue tiles at a target um/px",
                             description=__doc__.split("\n\n")[2], epilog=_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files, folders of slides, or @list.txt "
                   "(one path a line, relative to the list's folder)")
    p.add_argument("--out", required=True, help="output folder (shards, manifest.json, masks/)")
    p.add_argument("--mpp", type=float, default=0.5, help="target um/px of the tiles (default 0.5, about 20x)")
    p.add_argument("--tile", type=int, default=256, help="tile side in target pixels (default 256)")
    p.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring tiles (default 0)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="least tissue fraction of a kept tile (default 0.5)")
    p.add_argument("--encode", choices=("jpeg", "png"), default="jpeg", help="tile format in the tars (default jpeg)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--mpp-override", type=float, help="level 0's um/px for every slide, ignoring its metadata")
    p.add_argument("--mpp-tolerance", type=float, default=MPP_TOLERANCE,
                   help=f"a level this close to --mpp (relative) is used without resizing (default {MPP_TOLERANCE})")
    p.add_argument("--reader", choices=READERS, default="auto",
                   help="auto (default): OpenSlide opens every slide, TiffSlide decodes the pixels when it "
                   "reads the same pyramid alike (2-3x faster); openslide / tiffslide: that library "
                   "first, the other when it cannot open a file")
    p.add_argument("--recursive", action="store_true", help="also take slides in sub-folders of SLIDE folders")
    add_runner_args(p)
    p.set_defaults(fn=_cmd_wsi)
    return p


__all__ = ["Geometry", "Slide", "TilePlan", "WsiSource", "add_parser", "box_fractions", "choose_level",
           "find_slides", "open_slide", "plan_tiles", "read_overview", "read_scaled", "read_target",
           "slide_bytes", "slide_ids", "slide_mpp", "tile_grid", "tissue_mask"]
