"""Whole-slide images to tiles at a target um/px: tissue mask, tile grid, reads planned per block.

    sslkit shard wsi slides/ --out shards/wsi --mpp 0.5 --tile 256 --min-tissue 0.5

One unit per slide. A worker opens the slide with OpenSlide (TiffSlide when OpenSlide cannot
open the file or is not installed), finds its resolution, picks a pyramid level, makes a
tissue mask from a low-resolution overview and yields the tiles with enough tissue. With
``--reader auto`` (the default) the stored tiles of tiled TIFF-family slides are decoded
directly (``slides.TiffTiles``), else by TiffSlide, once a sample is checked to decode like
OpenSlide; OpenSlide's metadata stays in charge (``sslkit.sharding.wsi.slides``).

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
  at the right and bottom. Keys ``<slide>_<x>_<y>`` with x, y in level-0 pixels; the
  manifest's entry of each slide gives ``tile_level0``, a tile's side in level-0 pixels.
- Tissue (``tissue_mask``): saturation, Otsu threshold kept within fixed bounds and above
  the glass's own level, hysteresis so pale stain joined to clear tissue stays in, green/blue
  marker and black excluded, small holes filled and specks removed (sizes in um^2). Blank
  glass gives no tissue. The mask (``masks/<slide>.png``) and the overview with the kept
  tiles outlined (``masks/<slide>-tiles.jpg``) are written for inspection.
- Speed and memory: the kept tiles are taken in blocks of about ``BLOCK_PX`` level pixels a
  side. A slide with ``per_tile_reads`` (the stored-tile reader) read without resizing gives
  one tile per read, from its cache of decoded tiles; else a block is read whole or run by
  run of side-by-side tiles, whichever ``_read_cost`` finds cheaper (resized once with a
  margin, so reads join seamlessly), and sliced with numpy. Nothing is read where no tile is
  kept; on resume the first ``skip`` tiles are not read again. Memory is bounded by the
  block, the decoded-tile cache and the overview (at most ``MASK_MAX_SIDE``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sslkit.errors import UsageError
from sslkit.sharding.core.source import Progress, Sample, Unit
from sslkit.sharding.core.stain import StainNormalizer, add_stain_args, stain_from_args
from sslkit.sharding.wsi.files import find_slides, slide_bytes, slide_ids
from sslkit.sharding.wsi.slides import (
    BLOCK_PX,
    MPP_TOLERANCE,
    READERS,
    Geometry,
    Slide,
    choose_level,
    open_slide,
    read_overview,
    read_target,
    slide_mpp,
)
from sslkit.sharding.wsi.tissue import (
    HOLE_UM2,
    SAT_HIGH,
    SAT_LOW,
    SPECK_UM2,
    box_fractions,
    outline_boxes,
    save_image,
    tissue_mask,
)

MASK_TILE_PX = 16  # overview pixels along a tile side, at least MASK_MIN_MPP um each
MASK_MIN_MPP, MASK_MAX_SIDE = 2.0, 4096


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
            "tile_level0": round(tile * geom.scale[0] * geom.downsample),
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
    # modules a worker process should import up front (forkserver preload takes names; import_readers() imports them
    # in this process, named in the code, as the safety scan asks of imports)
    preload = ("openslide", "tifffile", "imagecodecs", "scipy.ndimage", "skimage.filters", "skimage.morphology")

    @staticmethod
    def import_readers() -> None:
        """Import the modules of ``preload`` in this process (the optional ones when installed), so that
        processes forked from it do not each import them again."""
        with contextlib.suppress(ImportError):
            import openslide  # noqa: F401
        with contextlib.suppress(ImportError):
            import imagecodecs  # noqa: F401
        import scipy.ndimage  # noqa: F401
        import skimage.filters  # noqa: F401
        import skimage.morphology  # noqa: F401
        import tifffile  # noqa: F401

    def __init__(self, slides: list[str], *, mpp: float = 0.5, tile: int = 256, overlap: int = 0,
                 min_tissue: float = 0.5, encode: str = "jpeg", quality: int = 90,
                 mpp_override: Optional[float] = None, mpp_tolerance: float = MPP_TOLERANCE,
                 reader: str = "auto", mask_dir: Optional[str] = None, recursive: bool = False,
                 stain: Optional[StainNormalizer] = None) -> None:
        _check_settings(mpp=mpp, tile=tile, overlap=overlap, min_tissue=min_tissue, encode=encode,
                        quality=quality, mpp_override=mpp_override, mpp_tolerance=mpp_tolerance, reader=reader)
        self.mpp, self.tile, self.overlap, self.min_tissue = float(mpp), int(tile), int(overlap), float(min_tissue)
        self.encode, self.quality = encode, int(quality)
        self.mpp_override = None if mpp_override is None else float(mpp_override)
        self.mpp_tolerance, self.reader = float(mpp_tolerance), reader
        self.mask_dir = None if mask_dir is None else str(mask_dir)
        self.slides, self.failed = find_slides(slides, recursive=recursive)
        self.stain = stain

    def params(self) -> dict:
        return {"mpp": self.mpp, "tile": self.tile, "overlap": self.overlap, "min_tissue": self.min_tissue,
                "mpp_override": self.mpp_override, "mpp_tolerance": self.mpp_tolerance, "reader": self.reader,
                "tissue": {"sat_high": list(SAT_HIGH), "sat_low": SAT_LOW, "speck_um2": SPECK_UM2,
                           "hole_um2": HOLE_UM2}, **(self.stain.params if self.stain is not None else {})}

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
                save_image(mask.astype(np.uint8) * 255, Path(info["mask"]))
                save_image(outline_boxes(overview, plan.boxes), Path(self.mask_dir) / f"{unit.id}-tiles.jpg")
            if len(plan.tiles) == 0:
                found = "no tissue found" if not mask.any() else f"no tile has tissue >= {self.min_tissue:g}"
                info["note"] = "; ".join(filter(None, [info.get("note"), f"{found}: 0 tiles"]))
            progress.info(**info)
            progress.total(len(plan.tiles))
            yield from self._tiles(slide, unit, plan, skip, progress)
        finally:
            slide.close()

    def _tiles(self, slide: Slide, unit: Unit, plan: TilePlan, skip: int, progress: Progress) -> Iterator[Sample]:
        """The plan's tiles from index ``skip`` on, block by block (a resumed block's first row on
        its own, so no skipped tile is read): one read per tile where the slide's decoded tiles
        are cached and nothing is resized (``per_tile_reads``), else the reads ``read_spans`` picks.

        Keys are ``<slide>_<x>_<y>`` (slide ids are safe: ``files.slide_ids``), x, y in level-0 pixels.
        """
        geom, t = plan.geometry, self.tile
        per_tile = slide.per_tile_reads and geom.scale == (1.0, 1.0)
        cost = _read_cost(slide, geom)
        same = {"slide": unit.id, "path": unit.path, "level": geom.level, "mpp": self.mpp,
                "level_mpp": round(geom.level_mpp[0], 6)}  # the meta every tile of the slide shares
        start, kept = min(skip, len(plan.tiles)), 0
        while start < len(plan.tiles):
            stop = start + int(np.searchsorted(plan.blocks[start:], plan.blocks[start], side="right"))
            if start == skip > 0 and plan.blocks[start - 1] == plan.blocks[start]:  # resuming inside a block:
                stop = start + int(np.sum(plan.tiles[start:stop, 1] == plan.tiles[start, 1]))  # its row first
            if per_tile:
                spans = [(i, i + 1) for i in range(stop - start)]
            else:
                spans = read_spans(plan.tiles[start:stop], tile=t, stride=t - self.overlap, cost=cost)
            for i0, i1 in spans:
                corners = plan.tiles[start + i0:start + i1]
                (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0) + t
                pixels = read_target(slide, geom, int(x0), int(y0), int(x1 - x0), int(y1 - y0))  # (H, W, 3)
                for (x, y), fraction in zip(corners.tolist(), plan.tissue[start + i0:start + i1].tolist()):
                    lx, ly = geom.to_level0(x, y)
                    image = np.ascontiguousarray(pixels[y - y0:y - y0 + t, x - x0:x - x0 + t])
                    if self.stain is not None:  # each tile to the reference; one it cannot estimate stays
                        image, normalised = self.stain(image)
                        kept += not normalised
                        progress.info(stain_kept=kept)
                    yield Sample(key=f"{unit.id}_{lx}_{ly}", image=image,
                                 meta=dict(same, x=lx, y=ly, tissue=round(fraction, 4)))
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
    tiles, so neighbouring reads decode nothing twice); otherwise the pixels of the stored
    tiles the read touches.

    The stored-tile reader caches decoded tiles too, but when it resizes it still plans with
    the stored-tile model: planning by pixels groups reads differently, and the resampled
    tiles would move by up to one grey level against the shards sslkit already wrote.
    """
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
            raise UsageError(message)


# ---------------------------------------------------------------- command line

_EPILOG = """examples:
  sslkit shard wsi slides/ --out shards/wsi --mpp 0.5 --tile 256
  sslkit shard wsi a.svs b.ndpi --out shards/wsi --mpp 1.0 --tile 224 --min-tissue 0.25 --encode png
  sslkit shard wsi @slides.txt --out shards/wsi --mpp-override 0.25    # slides without resolution metadata
OUT/masks/<slide>.png is each slide's tissue mask, OUT/masks/<slide>-tiles.jpg its kept tiles."""


def _cmd_wsi(args: argparse.Namespace) -> None:
    from sslkit.sharding.core.runner import exit_on_failures, run_source, runner_kwargs

    source = WsiSource(args.slides, mpp=args.mpp, tile=args.tile, overlap=args.overlap,
                       min_tissue=args.min_tissue, encode=args.encode, quality=args.quality,
                       mpp_override=args.mpp_override, mpp_tolerance=args.mpp_tolerance, reader=args.reader,
                       mask_dir=str(Path(args.out) / "masks"), recursive=args.recursive,
                       stain=stain_from_args(args))
    exit_on_failures([run_source(source, args.out, **runner_kwargs(args), command=shlex.join(sys.argv))], args)


def add_parser(shard_sub: Any) -> argparse.ArgumentParser:
    """Add ``sslkit shard wsi`` to the ``sslkit shard`` sub-parsers."""
    from sslkit.sharding.core.runner import add_runner_args

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
                   help="auto (default): OpenSlide opens every slide; tiled TIFF-family slides are decoded "
                   "from their stored tiles (else by TiffSlide) once a sample decodes like OpenSlide's; "
                   "openslide / tiffslide: that library first, the other when it cannot open a file")
    p.add_argument("--recursive", action="store_true", help="also take slides in sub-folders of SLIDE folders")
    add_stain_args(p)
    add_runner_args(p)
    p.set_defaults(fn=_cmd_wsi)
    return p


__all__ = ["TilePlan", "WsiSource", "add_parser", "plan_tiles", "tile_grid"]
