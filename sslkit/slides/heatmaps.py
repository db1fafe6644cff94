"""Attention heatmaps and top-tile galleries of ``sslkit mil``, drawn for a pathologist to read.

Per slide, ``draw_slide`` writes

- ``heatmaps/<slide>.png``: the slide's thumbnail in its own colours (left) and the same
  thumbnail with every tile coloured by its attention (right), 13 x 7 inches at 150 dpi;
  colours are the tile's rank within the slide (0: least attended, 1: most), so slides of
  any size and attention spread read alike; the ``top_tiles`` most attended tiles are
  outlined and numbered as in the gallery. The title names the slide, its true label, the
  predicted class with its probability and the fold whose model (not trained on the slide)
  gave both;
- ``galleries/<slide>.png``: those tiles read from the slide at full size, most attended first,
  each with its attention weight and level-0 (x, y).

The thumbnail comes from the slide file: the file in ``mil.slides`` whose slide id (as
``sslkit shard wsi`` and ``sslkit extract`` name slides) is the bag's, else the file the bag's
``slide_path`` attribute names. Without a readable slide file the heatmap is drawn on a blank canvas the
size of the tiles' extent (tiles in grey), the title says so, and no gallery is drawn.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy.stats import rankdata

from sslkit.evaluate.plots import save_png

HEATMAP_INCHES = (13.0, 7.0)  # at plots.DPI (150): 1950 x 1050 pixels
THUMB_PX = 1024  # long side of the thumbnail, pixels
TILE_PX = 224  # side of a gallery tile, pixels
CMAP = "turbo"  # dark blue (least attended) to dark red (most): visible on pink and on white
ALPHA = 0.5  # opacity of the attention colours over the thumbnail
BLANK, TILE_GREY = 245, 190  # the blank canvas and the tiles drawn on it


def patch_size(coords: np.ndarray, attrs: dict[str, Any]) -> int:
    """Tile side in level-0 pixels: the bag's ``patch_size_level0``, else the smallest step between tile corners."""
    if attrs.get("patch_size_level0"):
        return int(attrs["patch_size_level0"])
    steps = [np.diff(np.unique(coords[:, j])) for j in (0, 1)]
    steps = [s[s > 0] for s in steps if (s > 0).any()]
    return int(min(s.min() for s in steps)) if steps else 256


def slide_file(slide_id: str, attrs: dict[str, Any], slides_dir: Optional[str]) -> tuple[Optional[str], str]:
    """(path of the slide file or None, why none was found): the file of ``slide_id`` in ``slides_dir`` (slide ids
    as ``sslkit shard wsi`` gives them), else the bag's ``slide_path`` attribute when that is a file."""
    from sslkit.sharding.wsi.files import SLIDE_EXTENSIONS, slide_ids

    reasons = []
    if slides_dir:
        paths = sorted(str(p) for p in Path(slides_dir).iterdir() if p.suffix.lower() in SLIDE_EXTENSIONS)
        found = dict(zip(slide_ids(paths), paths)).get(slide_id)
        if found:
            return found, ""
        reasons.append(f"no file of slide '{slide_id}' in {slides_dir}")
    given = attrs.get("slide_path")
    if given and Path(given).is_file():
        return str(given), ""
    reasons.append(f"the bag's slide_path '{given}' is not a file" if given else "the bag names no slide_path")
    return None, "; ".join(reasons)


def _blank(coords: np.ndarray, patch: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A blank canvas covering the tiles' extent at thumbnail scale, tiles in grey; and the level-0 (w, h)."""
    size = (int(coords[:, 0].max()) + patch, int(coords[:, 1].max()) + patch)
    scale = THUMB_PX / max(size)
    canvas = np.full((max(1, round(size[1] * scale)), max(1, round(size[0] * scale)), 3), BLANK, np.uint8)
    for x, y in coords:
        canvas[_span(y, patch, scale, canvas.shape[0]), _span(x, patch, scale, canvas.shape[1])] = TILE_GREY
    return canvas, size


def _span(start: int, patch: int, scale: float, limit: int) -> slice:
    """Pixels [start, start + patch) of level 0 at ``scale``, at least one pixel wide, within [0, limit)."""
    a = min(int(start * scale), limit - 1)
    return slice(a, min(limit, max(a + 1, int(round((start + patch) * scale)))))


def rank_heat(attention: np.ndarray, coords: np.ndarray, patch: int, shape: tuple[int, int],
              scale: float) -> np.ndarray:
    """(h, w) float image: each tile's attention rank in (0, 1] (ties averaged) over its area, NaN elsewhere;
    overlapping tiles show the higher rank."""
    ranks = rankdata(attention) / len(attention)
    heat = np.full(shape, np.nan)
    for i in np.argsort(ranks, kind="stable"):  # ascending: the higher rank is painted last
        heat[_span(coords[i, 1], patch, scale, shape[0]), _span(coords[i, 0], patch, scale, shape[1])] = ranks[i]
    return heat


def heatmap_png(out: Path, *, thumb: np.ndarray, level0: tuple[int, int], attention: np.ndarray,
                coords: np.ndarray, patch: int, top: np.ndarray, title: str, note: str) -> Path:
    """The two-panel heatmap (see the module notes); ``top``: indices of the tiles to outline, most attended first."""
    scale = thumb.shape[1] / level0[0]
    heat = rank_heat(attention, coords, patch, thumb.shape[:2], scale)
    cmap = colormaps[CMAP]
    colours = cmap(np.nan_to_num(heat))[..., :3] * 255  # blended here: one image to resample, not two
    painted = ~np.isnan(heat)[..., None]
    overlay = np.where(painted, (1 - ALPHA) * thumb + ALPHA * colours, thumb).round().astype(np.uint8)
    fig = Figure(figsize=HEATMAP_INCHES, layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(thumb)
    left.set_title(note, fontsize=10)
    right.imshow(overlay)
    side = max(patch * scale, 2.0)
    for rank, i in enumerate(top, start=1):
        x, y = coords[i, 0] * scale, coords[i, 1] * scale
        right.add_patch(Rectangle((x, y), side, side, fill=False, edgecolor="black", linewidth=1.2))
        right.text(x, y, str(rank), fontsize=7, color="black", va="top", ha="left",
                   bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    right.set_title(f"attention over {len(attention)} tiles; the {len(top)} most attended outlined", fontsize=10)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=right, shrink=0.8)
    bar.set_label("attention rank within the slide (1 = most attended)")
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=12)
    return save_png(fig, out)


def gallery_png(out: Path, *, tiles: list[np.ndarray], attention: np.ndarray, coords: np.ndarray, top: np.ndarray,
                title: str) -> Path:
    """The ``top`` tiles (images in ``tiles``, same order) in a grid, most attended first."""
    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    fig = Figure(figsize=(2.7 * cols, 2.9 * rows + 0.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for rank, (ax, i, tile) in enumerate(zip(axes, top, tiles), start=1):
        ax.imshow(tile)
        ax.set_title(f"#{rank}  attention {attention[i]:.3g}\nx={coords[i, 0]}, y={coords[i, 1]}", fontsize=9)
    fig.suptitle("\n".join(textwrap.wrap(title, 20 * cols)), fontsize=11)
    return save_png(fig, out)


def _read_tiles(slide: Any, coords: np.ndarray, top: np.ndarray, patch: int) -> list[np.ndarray]:
    """The ``top`` tiles as (TILE_PX, TILE_PX, 3) uint8, read from the coarsest level still as fine as that."""
    from sslkit.sharding.wsi.slides import read_scaled

    level = max((i for i, ds in enumerate(slide.downsamples) if ds <= max(1.0, patch / TILE_PX)),
                key=lambda i: slide.downsamples[i], default=0)
    ds = slide.downsamples[level]
    return [read_scaled(slide, level, (coords[i, 0] / ds, coords[i, 1] / ds, (coords[i, 0] + patch) / ds,
                                       (coords[i, 1] + patch) / ds), (TILE_PX, TILE_PX)) for i in top]


def draw_slide(out_dir: Path, slide_id: str, *, coords: np.ndarray, attrs: dict[str, Any], attention: np.ndarray,
               title: str, slides_dir: Optional[str], top_tiles: int) -> dict[str, Any]:
    """Write ``out_dir/heatmaps/<slide_id>.png`` and (with a slide file) ``out_dir/galleries/<slide_id>.png``;
    returns what was drawn: the files (relative to ``out_dir``, the gallery None when not drawn) and ``thumbnail``
    (the slide file, or why the canvas is blank)."""
    from sslkit.sharding.core.source import UnitError
    from sslkit.sharding.wsi.slides import open_slide, read_overview

    patch = patch_size(coords, attrs)
    top = np.argsort(-attention, kind="stable")[:top_tiles]
    path, reason = slide_file(slide_id, attrs, slides_dir)
    slide, tiles = None, None
    if path is not None:
        try:
            slide = open_slide(path)
            level0 = slide.dimensions[0]
            scale = THUMB_PX / max(level0)
            thumb = read_overview(slide, (max(1, round(level0[1] * scale)), max(1, round(level0[0] * scale))))[0]
            tiles = _read_tiles(slide, coords, top, patch) if len(top) else []
        except (UnitError, RuntimeError, OSError) as err:
            path, reason = None, f"{path} cannot be read ({err})"
        finally:
            if slide is not None:
                slide.close()
    if path is None:
        thumb, level0 = _blank(coords, patch)
    note = f"thumbnail of {Path(path).name}" if path else "blank canvas: " + reason
    record = {"slide_id": slide_id, "heatmap": f"heatmaps/{slide_id}.png", "gallery": None,
              "thumbnail": str(path) if path else f"blank ({reason})"}
    heatmap_png(out_dir / record["heatmap"], thumb=thumb, level0=level0, attention=attention, coords=coords,
                patch=patch, top=top, title=title, note="\n".join(textwrap.wrap(note, 90)))
    if tiles:
        record["gallery"] = f"galleries/{slide_id}.png"
        gallery_png(out_dir / record["gallery"], tiles=tiles, attention=attention, coords=coords, top=top,
                    title=f"{title}: the {len(top)} most attended tiles")
    return record


__all__ = ["CMAP", "HEATMAP_INCHES", "THUMB_PX", "draw_slide", "gallery_png", "heatmap_png", "patch_size",
           "rank_heat", "slide_file"]
