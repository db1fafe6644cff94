"""A synthetic slide collection with a planted slide-level label, for testing the slide path.

    summary = make_slide_collection("slides-demo", num_slides=24, seed=0)

writes ``slides/<slide_id>.tiff`` (pyramidal tiled TIFF: JPEG tiles, levels at downsamples
1, 2, 4, 8 as reduced-resolution pages, level 0 at 0.25 um/px in CENTIMETER resolution tags,
so OpenSlide reports ``openslide.mpp-x`` = 0.25), ``labels.csv`` (``slide_id,label,patient``)
and ``regions.json`` (the planted regions, level-0 pixels).

How a slide is made:

- Tissue: one to three irregular blobs (Gaussian bumps plus smooth noise, thresholded to
  cover 30-42 % of the slide) on near-white glass with a little grey noise. The tissue
  outline lives on a grid of ``MASK_PX`` level-0 pixels.
- Texture: the slide is a grid of ``CELL`` x ``CELL`` level-0 cells, each a crop of the
  project's nucleus renderer (``sslkit.sharding.synthetic.render_cells``, even stain) taken
  from a bank rendered once per collection, in one of 8 orientations. At 0.25 um/px a cell
  is 16 um; at 0.5 um/px it is 32 px, the scale of the demo crops.
- Classes: outside the planted regions (both labels alike) nuclei are drawn from
  ``MIXTURE`` (inflammatory 5 %); in a region a cell is, with probability ``RICHNESS``, a
  crop whose nuclei are all inflammatory (small, dense, dark).
- Label: a positive slide holds 1 or 2 axis-aligned regions, whole cells of tissue, that
  together cover ``REGION_SHARE`` (10-25 %) of its all-tissue cells; a negative slide none.
- Stain: per slide, a per-channel optical-density gain and a brightness shift (one lookup
  table), and a glass tint.
- Patients: 2 slides each, of the same label (a grouped split keeps them together); half the
  patients (rounded down) are positive.

Everything is drawn from ``SeedSequence(seed, spawn_key=...)``: the bank from (1,), the labels
from (2,), slide ``i``'s layout from (0, i, 0) and its pixels from (0, i, 1), so the same seed
gives the same files byte for byte, and a slide does not depend on how many others are made.
Synthetic on purpose: it tests that the path from slides to slide-level answers works, it is
no benchmark of pathology.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sslkit.atomic import replacing, write_json, write_text
from sslkit.errors import UsageError

GENERATOR_VERSION = 1
MPP = 0.25  # um/px of level 0
DOWNSAMPLES = (1, 2, 4, 8)
CELL = 64  # level-0 px per rendered crop
MASK_PX = 16  # level-0 px per tissue-outline pixel
LABELS = ("negative", "positive")
MIXTURE = {"epithelial": 0.40, "inflammatory": 0.05, "spindle": 0.35, "misc": 0.20}  # outside regions
RICH_CLASS = "inflammatory"
RICHNESS = 0.7  # share of region cells that are rich crops
REGION_SHARE = (0.10, 0.25)  # of a positive slide's all-tissue cells
TISSUE_SHARE = (0.30, 0.42)  # of the slide's area
BANK_RICH_SHARE = 0.25  # of the bank: crops whose nuclei are all RICH_CLASS
POCKET_UM, PIECE_UM2 = 30.0, 16_000.0  # glass bays with a narrower mouth are filled; smaller tissue pieces dropped


@dataclass(frozen=True)
class SlideLayout:
    """Where one slide's tissue and planted regions are (no pixels yet)."""

    tissue: np.ndarray  # (height // MASK_PX, width // MASK_PX) bool, True on tissue
    regions: list[list[int]]  # level-0 boxes [x0, y0, x1, y1], whole cells of tissue
    rich: np.ndarray  # (height // CELL, width // CELL) bool, True on cells inside a region

    @property
    def size(self) -> tuple[int, int]:
        """Level 0 (width, height) in pixels."""
        return self.tissue.shape[1] * MASK_PX, self.tissue.shape[0] * MASK_PX

    def tissue_fraction(self, box: tuple[float, float, float, float]) -> float:
        """Share of the level-0 box (x0, y0, x1, y1) that is tissue."""
        from sslkit.sharding.wsi.tissue import box_fractions

        return float(box_fractions(self.tissue, np.asarray([box], dtype=np.float64) / MASK_PX)[0])


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _tissue_shape(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: 1-3 irregular blobs covering about TISSUE_SHARE of the area, clear of the border."""
    from scipy import ndimage

    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        a, b = rng.uniform(0.12, 0.28, size=2) * min(h, w) * 1.3
        cos, sin = np.cos(theta := rng.uniform(0, np.pi)), np.sin(theta)
        u, v = (xx - cx) * cos + (yy - cy) * sin, (cy - yy) * cos + (xx - cx) * sin
        field = np.maximum(field, np.exp(-0.5 * ((u / a) ** 2 + (v / b) ** 2)))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=min(h, w) / 30, mode="wrap")
    field += 0.2 * noise / max(float(noise.std()), 1e-6)
    border = np.minimum(np.minimum(xx, w - 1 - xx), np.minimum(yy, h - 1 - yy)) / (0.06 * min(h, w))
    field *= np.clip(border, 0, 1)
    return _tidy(field > np.quantile(field, 1 - rng.uniform(*TISSUE_SHARE)))


def _tidy(mask: np.ndarray) -> np.ndarray:
    """Tissue without what a tissue detector would not see as drawn: glass bays whose mouth is
    narrower than POCKET_UM become tissue (as do enclosed holes), pieces under PIECE_UM2 go."""
    from scipy import ndimage

    r = POCKET_UM / 2 / (MASK_PX * MPP)
    disk = np.hypot(*np.mgrid[-int(r):int(r) + 1, -int(r):int(r) + 1]) <= r
    glass = ~mask
    core = ndimage.binary_erosion(glass, disk, border_value=1)
    parts, _ = ndimage.label(core)
    outer = np.isin(parts, np.unique(np.concatenate([parts[[0, -1]].ravel(), parts[:, [0, -1]].ravel()])))
    mask = ~(ndimage.binary_dilation(outer & (parts > 0), disk) & glass)  # glass a disk reaches from the edge
    parts, count = ndimage.label(mask)
    sizes = np.bincount(parts.ravel(), minlength=count + 1) * (MASK_PX * MPP) ** 2
    keep = sizes >= PIECE_UM2
    keep[0] = False
    return keep[parts]


def _free_boxes(free: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, 2) top-left cells (y, x) of every h x w box that lies wholly on ``free`` cells."""
    table = np.zeros((free.shape[0] + 1, free.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(free, axis=0), axis=1, out=table[1:, 1:])
    sums = table[h:, w:] - table[:-h, w:] - table[h:, :-w] + table[:-h, :-w]
    return np.argwhere(sums == h * w)


def _place_regions(rng: np.random.Generator, cells: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """1 or 2 boxes of all-tissue ``cells`` (one cell apart at least) covering REGION_SHARE of them."""
    from scipy import ndimage

    target = rng.uniform(*REGION_SHARE) * cells.sum()
    count = 1 if rng.random() < 0.5 else 2
    rich, boxes = np.zeros_like(cells), []
    for _ in range(count):
        area, aspect = target / count, float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
        h = max(2, round(np.sqrt(area / aspect)))
        w = max(2, round(area / h))
        free = cells & ~ndimage.binary_dilation(rich, np.ones((3, 3), bool))
        while len(spots := _free_boxes(free, h, w)) == 0 and max(h, w) > 2:
            h, w = (max(2, min(v - 1, round(v * 0.85))) for v in (h, w))  # shrinks to 2 x 2 at the least
        if len(spots) == 0:
            break
        y, x = (int(v) for v in spots[rng.integers(len(spots))])
        rich[y:y + h, x:x + w] = True
        boxes.append([x * CELL, y * CELL, (x + w) * CELL, (y + h) * CELL])
    return boxes, rich


def slide_layout(seed: int, index: int, *, positive: bool, width: int, height: int) -> SlideLayout:
    """The tissue outline and planted regions of slide ``index`` of a collection made with ``seed``."""
    rng = _rng(seed, 0, index, 0)
    tissue = _tissue_shape(rng, (height // MASK_PX, width // MASK_PX))
    k = CELL // MASK_PX
    cells = tissue.reshape(height // CELL, k, width // CELL, k).all(axis=(1, 3))
    if not positive:
        return SlideLayout(tissue=tissue, regions=[], rich=np.zeros_like(cells))
    regions, rich = _place_regions(rng, cells)
    if not regions:
        raise UsageError(f"Slide {index} of {width} x {height} px has no room for a 2 x 2-cell region; "
                         "make the slides larger or use another seed.")
    return SlideLayout(tissue=tissue, regions=regions, rich=rich)


def render_bank(seed: int, size: int) -> tuple[np.ndarray, int]:
    """(size, CELL, CELL, 3) uint8 crops and how many of them are the plain mixture; the rest are rich.

    Mixture crops draw the centre and neighbour classes from ``MIXTURE``; rich crops' nuclei
    are all ``RICH_CLASS``.
    """
    from sslkit.sharding.synthetic import CLASSES, render_cells

    rng = _rng(seed, 1)
    rich = max(1, round(size * BANK_RICH_SHARE))
    plain = max(1, size - rich)
    p = np.array([MIXTURE[c] for c in CLASSES])
    classes = np.concatenate([rng.choice(len(CLASSES), size=(plain, 4), p=p / p.sum()),
                              np.full((rich, 4), CLASSES.index(RICH_CLASS))])
    return render_cells(rng, classes, size=CELL), plain


def _stain_lut(rng: np.random.Generator) -> np.ndarray:
    """(3, 256) uint8: per-channel optical-density gain (stain strength and hue) and brightness."""
    gain = rng.uniform(0.85, 1.2) * rng.uniform(0.88, 1.12, size=3)
    shift = rng.uniform(-6, 4)
    v = np.arange(256, dtype=np.float64) / 255
    return np.clip(np.rint(255 * v[None] ** gain[:, None] + shift), 0, 255).astype(np.uint8)


def _orient(cells: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Each (S, S, 3) cell in one of the 8 symmetries of the square (``turns`` 0-7)."""
    for t in range(1, 8):
        pick = np.flatnonzero(turns == t)
        if pick.size:
            moved = np.rot90(cells[pick], k=t % 4, axes=(1, 2))
            cells[pick] = moved[:, :, ::-1] if t >= 4 else moved
    return cells


def _glass(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, CELL, CELL, 3) uint8 patches of near-white glass: one slight tint, grey grain of +-2."""
    tint = np.rint(rng.uniform(236, 250) + rng.uniform(-2, 2, size=3)).astype(np.int16)
    grain = rng.integers(-2, 3, size=(count, CELL, CELL, 1), dtype=np.int16)
    return (tint + grain).astype(np.uint8)  # 232..254: no clipping needed


def paint_slide(seed: int, index: int, layout: SlideLayout, bank: np.ndarray, plain: int) -> np.ndarray:
    """Level 0 (height, width, 3) uint8 of slide ``index``: stained bank crops on tissue, glass elsewhere.

    Built cell by cell: cells that touch tissue take a bank crop (rich ones inside a region
    with probability RICHNESS), the others a glass patch; cells on the tissue's edge are
    glass outside the outline.
    """
    rng = _rng(seed, 0, index, 1)
    (width, height), (rows, cols) = layout.size, layout.rich.shape
    n, k = rows * cols, CELL // MASK_PX
    lut = _stain_lut(rng)
    stained = np.stack([lut[c][bank[..., c]] for c in range(3)], axis=-1)
    glass = _glass(rng, 16)
    rich = layout.rich.ravel() & (rng.random(n) < RICHNESS)
    pick = np.where(rich, plain + rng.integers(0, len(bank) - plain, n), rng.integers(0, plain, n))
    turns, glass_pick = rng.integers(0, 8, n), rng.integers(0, len(glass), n)
    cover = layout.tissue.reshape(rows, k, cols, k).transpose(0, 2, 1, 3).reshape(n, k, k)
    touched = cover.any(axis=(1, 2))
    cells = np.concatenate([stained, glass])[np.where(touched, pick, len(stained) + glass_pick)]
    cells = _orient(cells, np.where(touched, turns, 0))
    edge = np.flatnonzero(touched & ~cover.all(axis=(1, 2)))
    on = cover[edge].repeat(MASK_PX, axis=1).repeat(MASK_PX, axis=2)[..., None]
    cells[edge] = np.where(on, cells[edge], glass[glass_pick[edge]])
    return cells.reshape(rows, cols, CELL, CELL, 3).transpose(0, 2, 1, 3, 4).reshape(height, width, 3)


def _halve(image: np.ndarray) -> np.ndarray:
    """2 x 2 area mean, rounded half up."""
    a = image.astype(np.uint16)
    return ((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) >> 2).astype(np.uint8)


def write_pyramid(path: Path, level0: np.ndarray, *, mpp: float = MPP, tile: int = 256, quality: int = 90,
                  description: Optional[str] = None) -> Path:
    """Write ``level0`` as a pyramidal tiled TIFF (one page per level of ``DOWNSAMPLES``), atomically.

    JPEG tiles (``quality``), RGB; levels after the first are reduced-resolution pages
    (OpenSlide's generic TIFF); resolution in pixels per centimetre, so OpenSlide's
    ``openslide.mpp-x`` is ``mpp``.
    """
    import tifffile

    image = level0
    with replacing(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        for i, k in enumerate(DOWNSAMPLES):
            if i:
                image = _halve(image)
            tif.write(image, tile=(tile, tile), photometric="rgb", compression="jpeg",
                      compressionargs={"level": quality}, resolution=(1e4 / (mpp * k),) * 2,
                      resolutionunit="CENTIMETER", subfiletype=1 if i else 0,
                      description=description if i == 0 else None, metadata=None, maxworkers=os.cpu_count())
    return path


def patient_labels(seed: int, num_slides: int) -> list[tuple[str, str, str]]:
    """(slide_id, label, patient) of every slide: 2 slides per patient, half the patients positive."""
    patients = num_slides // 2
    positive = np.zeros(patients, bool)
    positive[_rng(seed, 2).permutation(patients)[:patients // 2]] = True
    return [(f"slide-{i:03d}", LABELS[int(positive[i // 2])], f"patient-{i // 2:02d}") for i in range(num_slides)]


def _check(num_slides: int, seed: int, width: int, height: int) -> None:
    if num_slides < 4 or num_slides % 2:
        raise UsageError(f"--num {num_slides}: the collection needs an even number of slides, at least 4 "
                         "(2 per patient, positive and negative patients).")
    if seed < 0:
        raise UsageError(f"--seed {seed}: use a non-negative integer.")
    step = CELL * DOWNSAMPLES[-1]
    if min(width, height) < 1024 or width % step or height % step:
        raise UsageError(f"Slides of {width} x {height} px cannot be made; use multiples of {step} px, "
                         "at least 1024 a side.")


def _write_tables(out: Path, rows: list[tuple[str, str, str]], regions: dict[str, Any]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["slide_id", "label", "patient"])
    writer.writerows(rows)
    write_text(out / "labels.csv", text.getvalue())
    write_json(out / "regions.json", regions)


def make_slide_collection(out: str | Path, *, num_slides: int = 24, seed: int = 0, width: int = 4096,
                          height: int = 3072, bank_size: int = 512, tile: int = 256, quality: int = 90,
                          progress: bool = True, command: Optional[str] = None) -> dict[str, Any]:
    """Write the collection (see the module notes) under ``out``; returns a summary.

    ``width`` x ``height``: level 0 in pixels (multiples of 512, at least 1024). ``bank_size``:
    rendered crops shared by all slides. ``tile``/``quality``: stored TIFF tiles. Also writes
    ``collection.json`` (the settings and ``command``). Summary keys: ``slides`` (ids),
    ``labels``, ``patients`` and ``paths`` (by slide id), ``labels_csv``, ``regions_json``, ``params``.
    """
    from tqdm.auto import tqdm

    _check(num_slides, seed, width, height)
    out = Path(out)
    rows = patient_labels(seed, num_slides)
    bank, plain = render_bank(seed, bank_size)
    regions, paths = {}, {}
    for index, (slide_id, label, _) in enumerate(tqdm(rows, desc="synthetic slides", unit="slide",
                                                      disable=not progress)):
        layout = slide_layout(seed, index, positive=label == "positive", width=width, height=height)
        pixels = paint_slide(seed, index, layout, bank, plain)
        paths[slide_id] = str(write_pyramid(out / "slides" / f"{slide_id}.tiff", pixels, tile=tile, quality=quality,
                                            description=f"sslkit synthetic slide {slide_id}"))
        regions[slide_id] = {"label": label, "mpp": MPP, "regions": layout.regions}
    _write_tables(out, rows, regions)
    params = {"generator": "sslkit.slides.synthetic", "generator_version": GENERATOR_VERSION, "seed": seed,
              "num_slides": num_slides, "width": width, "height": height, "bank_size": bank_size, "tile": tile,
              "quality": quality, "mpp": MPP, "downsamples": list(DOWNSAMPLES)}
    write_json(out / "collection.json", {"params": params, "command": command})
    return {"slides": [r[0] for r in rows], "labels": {r[0]: r[1] for r in rows},
            "patients": {r[0]: r[2] for r in rows}, "paths": paths, "labels_csv": str(out / "labels.csv"),
            "regions_json": str(out / "regions.json"), "params": params}


def write_corrupt_slide(source: str | Path, dest: str | Path, *, keep: float = 0.5) -> Path:
    """A damaged copy of a slide, for failure tests: the first ``keep`` share of its bytes.

    With ``keep`` 0.5 the header and first page directory survive, so a reader may still open
    the file, but reading level 0 fails (its later tiles are gone); with a few bytes
    (``keep`` ~ 1e-6) no reader opens it.
    """
    data = Path(source).read_bytes()
    with replacing(dest) as tmp:
        tmp.write_bytes(data[:int(len(data) * keep)])
    return Path(dest)


__all__ = ["SlideLayout", "make_slide_collection", "paint_slide", "patient_labels", "render_bank", "slide_layout",
           "write_corrupt_slide", "write_pyramid"]
