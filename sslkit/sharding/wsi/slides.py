"""Whole-slide images behind one small interface: open, resolution, pyramid level, pixels.

    slide = open_slide("a.svs")                    # OpenSlide, else TiffSlide; see READERS
    mx, my, source = slide_mpp(slide)              # level 0's um/px, from metadata or objective power
    geom = choose_level(slide, (mx, my), 0.5)      # the level to read and the exact resize factor
    pixels = read_target(slide, geom, x, y, w, h)  # (h, w, 3) uint8 at the target um/px

Pixels come composited on white. OpenSlide describes every slide it can open (levels,
resolution, associated images). For the pixels of tiled TIFF-family slides (Aperio SVS,
generic pyramidal TIFF, ...) the default reader decodes the stored tiles itself with
tifffile and imagecodecs (``TiffTiles``), each one once while it stays in a bounded cache.
Before it is used, a sample is checked to decode like OpenSlide's, once per kind of slide
(``TiffTiles.signature``) per process; ``bench/shard_wsi.py`` prints its speed against
OpenSlide's ``read_region``. How a ``Slide`` reads is told by its properties, not by its
library's name: ``caches_tiles`` (a read's extent does not change the decoding work) and
``per_tile_reads`` (reading one tile at a time copies the least).
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from sslkit.sharding.core.imaging import resize, to_channels
from sslkit.sharding.core.source import UnitError

READERS = ("auto", "openslide", "tiffslide")  # see open_slide
MPP_TOLERANCE = 0.02  # a level within 2 % of the target um/px is read without resizing
PLAUSIBLE_MPP = (0.02, 20.0)  # um/px; outside: metadata treated as missing
BLOCK_PX = 2048  # side of one read, in level pixels (plus the resampling margin)




Reader = Callable[[int, int, int, int, int], np.ndarray]  # (level, x, y, w, h) -> (h, w, 3) uint8


class Slide:
    """An open slide behind one interface; ``read`` gives (h, w, 3) uint8 RGB composited on white.

    The opener says how its library reads: ``read`` (the library's call, as ``Slide.read``
    without the error wrapping), ``caches_tiles`` (decoded stored tiles are cached, so a
    read's extent does not change the decoding work), ``per_tile_reads`` (reading one tile
    at a time copies the least). ``properties``/``prefix``: whose metadata to use (OpenSlide's
    when another library decodes).
    """

    def __init__(self, handle: Any, backend: str, path: str, *, read: Reader, caches_tiles: bool,
                 per_tile_reads: bool = False, properties: Optional[dict] = None,
                 prefix: Optional[str] = None) -> None:
        self.handle, self.backend, self.path = handle, backend, path
        self.dimensions = [tuple(map(int, d)) for d in handle.level_dimensions]  # (width, height) per level
        self.downsamples = [float(d) for d in handle.level_downsamples]
        self.properties = dict(handle.properties if properties is None else properties)
        self.prefix = prefix or backend
        self.caches_tiles, self.per_tile_reads, self._read = caches_tiles, per_tile_reads, read
        self.metadata: Optional[Slide] = None  # the slide whose metadata this one adopted; closed with it

    @property
    def reader(self) -> str:
        """Who describes the slide and who decodes it: "openslide", "openslide+tifffile", ..."""
        return self.backend if self.prefix == self.backend else f"{self.prefix}+{self.backend}"

    def prop(self, name: str) -> Optional[str]:
        """A standard property without its prefix: ``prop("mpp-x")`` -> ``openslide.mpp-x``."""
        value = self.properties.get(f"{self.prefix}.{name}")
        return None if value is None else str(value)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level pixels [x, x+w) x [y, y+h) of ``level`` -> (h, w, 3) uint8."""
        try:
            return self._read(level, x, y, w, h)
        except Exception as err:  # noqa: BLE001 -- OpenSlideError, tifffile/zarr/codec errors
            raise UnitError(f"Reading {self.path} failed at level {level}, region x={x} y={y} {w}x{h} "
                            f"({self.backend}: {err}); the file is damaged or incomplete: copy it again.") from None

    def thumbnail(self) -> Optional[np.ndarray]:
        """The slide's stored thumbnail image as (h, w, 3) uint8, or None."""
        try:
            own = getattr(self.handle, "thumbnail", None)  # TiffTiles: the file's own thumbnail series
            if own is not None and (image := own()) is not None:
                return image
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
        if self.metadata is not None:
            self.metadata.close()


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
    """OpenSlide caches decoded tiles. Its reads stay block-sized (not ``per_tile_reads``): one
    call per tile was no faster, and a read error names the block's region."""
    try:
        import openslide
    except (ImportError, OSError) as err:  # OSError: the library itself does not load
        raise RuntimeError(f"OpenSlide is not available ({err})") from None
    try:
        handle = openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError) as err:
        raise RuntimeError(f"OpenSlide: {err}") from None
    ds = [float(d) for d in handle.level_downsamples]

    def read(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return _openslide_rgb(handle, (round(x * ds[level]), round(y * ds[level])), level, (w, h))

    return Slide(handle, "openslide", path, read=read, caches_tiles=True)


def _open_tiffslide(path: str) -> Slide:
    """TiffSlide decodes every stored tile a read touches, each time: no cache."""
    try:
        import tiffslide
        handle = tiffslide.TiffSlide(path)
        ds = [float(d) for d in handle.level_downsamples]

        def read(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
            loc = (_floor_divisible(x, ds[level]), _floor_divisible(y, ds[level]))  # TiffSlide floors loc / ds
            return to_channels(handle.read_region(loc, level, (w, h), as_array=True), 3)

        return Slide(handle, "tiffslide", path, read=read, caches_tiles=False)
    except Exception as err:  # noqa: BLE001 -- TiffFileError, ValueError, NotImplementedError, ImportError ...
        raise RuntimeError(f"TiffSlide: {type(err).__name__}: {err}") from None


class TiffTiles:
    """The pixels of a tiled TIFF pyramid, decoded stored tile by stored tile with tifffile.

    Each stored tile (JPEG, JPEG 2000, LZW, ... whatever imagecodecs decodes) is read and
    decoded once while it stays in a small cache (``cache_bytes``), so neighbouring reads
    cost nothing twice. Levels are the TIFF pages whose size equals OpenSlide's levels, and
    OpenSlide's handle (``meta``, borrowed: not closed here) keeps serving the associated images.
    """

    def __init__(self, path: str, meta: Any, *, cache_bytes: int = 64 << 20) -> None:
        import tifffile

        self.tif, self.meta, self.cache_bytes = tifffile.TiffFile(path), meta, cache_bytes
        self.level_dimensions, self.level_downsamples = meta.level_dimensions, meta.level_downsamples
        self._cache, self._cached = OrderedDict(), 0
        pages = {}
        for page in self.tif.pages:
            if page.is_tiled and page.dtype == np.uint8 and page.samplesperpixel in (3, 4) and page.planarconfig == 1:
                pages.setdefault((page.imagewidth, page.imagelength), page)
        self.pages = [pages.get(tuple(size)) for size in self.level_dimensions]
        if None in self.pages:
            self.tif.close()
            raise RuntimeError("tifffile: not a tiled RGB TIFF pyramid with OpenSlide's levels")

    def signature(self, vendor: Optional[str]) -> tuple:
        """What decides how the stored tiles decode: once one slide of a kind decodes like
        OpenSlide, the next slide of the same kind is not checked again in this process."""
        return (vendor, *((len(p.jpegtables or b""), int(p.compression), int(p.photometric), p.samplesperpixel,
                           tuple(p.subsampling or ()), p.tilewidth, p.tilelength) for p in self.pages))

    def thumbnail(self) -> Optional[np.ndarray]:
        """The file's own thumbnail series (Aperio's "Thumbnail"), decoded by tifffile, or None."""
        series = next((s for s in self.tif.series if (s.name or "").lower() == "thumbnail"), None)
        return None if series is None else to_channels(series.asarray(maxworkers=1), 3)

    @property
    def associated_images(self) -> Any:
        return self.meta.associated_images

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level pixels [x, x+w) x [y, y+h) -> (h, w, 3) uint8; white beyond the level."""
        page = self.pages[level]
        tw, th = page.tilewidth, page.tilelength
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, page.imagewidth), min(y + h, page.imagelength)
        inside = (x0, y0, x1, y1) == (x, y, x + w, y + h)
        out = np.empty((h, w, 3), dtype=np.uint8) if inside else np.full((h, w, 3), 255, dtype=np.uint8)
        for row in range(y0 // th, -(-y1 // th) if y1 > y0 else 0):
            for col in range(x0 // tw, -(-x1 // tw) if x1 > x0 else 0):
                tile = self._tile(level, row, col)  # (th, tw, 3)
                ty0, tx0 = max(y0, row * th), max(x0, col * tw)
                ty1, tx1 = min(y1, (row + 1) * th), min(x1, (col + 1) * tw)
                out[ty0 - y:ty1 - y, tx0 - x:tx1 - x] = tile[ty0 - row * th:ty1 - row * th,
                                                             tx0 - col * tw:tx1 - col * tw]
        return out

    def _tile(self, level: int, row: int, col: int) -> np.ndarray:
        key = (level, row, col)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        page = self.pages[level]
        index = row * -(-page.imagewidth // page.tilewidth) + col
        offset, size = page.dataoffsets[index], page.databytecounts[index]
        if size == 0:  # a tile the scanner never wrote: background
            tile = np.full((page.tilelength, page.tilewidth, 3), 255, dtype=np.uint8)
        else:
            decode = page.decode  # built on first use, and building it moves the file position
            handle = self.tif.filehandle
            handle.seek(offset)
            data = handle.read(size)
            segment = decode(data, index, jpegtables=page.jpegtables)[0]
            tile = to_channels(segment.reshape(segment.shape[-3:]), 3)
        self._cache[key] = tile
        self._cached += tile.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            self._cached -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def close(self) -> None:
        self.tif.close()


def _open_tifftiles(path: str, meta: Any) -> Slide:
    """Stored tiles decoded with tifffile; ``meta``, an OpenSlide handle, describes the slide."""
    try:
        tiles = TiffTiles(path, meta)
        return Slide(tiles, "tifffile", path, read=tiles.read, caches_tiles=True, per_tile_reads=True,
                     properties=meta.properties, prefix="openslide")
    except Exception as err:  # noqa: BLE001 -- not a TIFF, stripped pages, unknown compression ...
        raise RuntimeError(f"tifffile: {type(err).__name__}: {err}") from None


_DECODES_ALIKE: set[tuple] = set()  # TiffTiles.signature()s checked in this process


def _decodes_alike(twin: Slide, slide: Slide) -> bool:
    """Same pyramid, and 64 x 64 pixels at the centre of level 0 and of the coarsest level
    within 35 dB PSNR (JPEG decoders differ slightly in chroma upsampling; a wrong colour
    space or a shifted level is far below)."""
    if twin.dimensions != slide.dimensions:
        return False
    try:
        for level in sorted({0, len(slide.dimensions) - 1}):
            w, h = (min(64, d) for d in slide.dimensions[level])
            x, y = (slide.dimensions[level][0] - w) // 2, (slide.dimensions[level][1] - h) // 2
            diff = twin.read(level, x, y, w, h).astype(np.float32) - slide.read(level, x, y, w, h)
            if float(np.mean(diff * diff)) > 255.0 ** 2 / 10 ** 3.5:
                return False
    except UnitError:
        return False
    return True


def _faster_twin(slide: Slide) -> Optional[Slide]:
    """A faster decoder of the slide OpenSlide opened, checked to decode it alike, that adopts
    OpenSlide's metadata and closes ``slide`` with itself; None when none is. Stored tiles
    through tifffile first (checked once per ``TiffTiles.signature``), then TiffSlide."""
    twins = [(_open_tifftiles, (slide.path, slide.handle), True),  # looked up here: tests replace them
             (_open_tiffslide, (slide.path,), False)]
    for opener, args, by_signature in twins:
        try:
            twin = opener(*args)
        except RuntimeError:
            continue
        signature = twin.handle.signature(slide.prop("vendor")) if by_signature else None
        if signature in _DECODES_ALIKE or _decodes_alike(twin, slide):
            if signature is not None:
                _DECODES_ALIKE.add(signature)
            twin.properties, twin.prefix, twin.metadata = slide.properties, slide.prefix, slide
            return twin
        twin.close()  # its own file only: ``slide`` is not yet adopted
    return None


def open_slide(path: str, reader: str = "auto") -> Slide:
    """Open ``path``; ``reader`` says how (see ``READERS``). Raises UnitError naming both libraries' errors.

    "auto": OpenSlide opens and describes the slide (TiffSlide when OpenSlide cannot); the
    pixels of tiled TIFF-family slides are decoded from their stored tiles (``TiffTiles``),
    else by TiffSlide, when that decodes a sample alike, else by OpenSlide itself.
    "openslide" / "tiffslide": that library, the other as fallback.
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
            return _faster_twin(slide) or slide
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
