"""``sslkit shard cells``: one square crop per nucleus, from instance maps or boxes.

    sslkit shard cells --format consep --input CoNSeP --out shards/consep            # window 2x the nucleus
    sslkit shard cells --format nucls --input NuCLS/QC --out shards/nucls            # window 1x (CCRL)
    sslkit shard cells --format labelmap --input lab --out shards/lab --window 64

Geometry (source pixels; pixel i covers [i, i + 1)):
    centre  the centre of the nucleus' bounding box, so a window of scale >= 1 holds the
            whole nucleus (a centroid-centred window can cut off a lopsided one)
    side    ``--window PIX``, else max(``--min-window``, ceil(scale x the bbox's longer
            side)); scale 2 for instance maps (CoNSeP), 1 for boxes (NuCLS), as in CCRL.
            The minimum (16 px by default) keeps fragments cut by a tile edge from
            becoming 3-pixel windows blown up to 32.
    outside parts of the window beyond the image are filled like ``np.pad`` (reflect by
            default), then the window is resized to ``--size`` (imaging.resize).

Formats and file pairing (``pairing.find_groups``: a folder with an image folder and
an annotation folder under these names, case-insensitive, anywhere below ``--input``;
files match by relative stem; ``--images``/``--labels`` name the two folders directly):
    consep    Images/ + Labels/*.mat (inst_map, inst_type or type_map)     unit = tile
    nucls     rgb/ + csv/*.csv (xmin, ymin, xmax, ymax, a class column)    unit = tile
    voc       JPEGImages/ + Annotations/*.xml                              unit = image
    labelmap  images/ + labels/*.png|tif|npy (ids, 0 = background), optional types/*.csv
              (id, type) beside them or in ``--types``                   unit = image
    pannuke   images.npy + masks.npy (+ types.npy), PanNuke's fold layout  unit = a run of images

Classes (``--class-map``): a packaged map from ``sslkit/configs/classmaps`` by name, a YAML
file, ``raw`` (each raw type its own class) or ``none`` (no labels). Defaults: ``nucls``,
``pannuke``, ``raw`` for voc and labelmap, and for CoNSeP the map that fits the codes found
in the whole dataset: ``consep7`` when any code 5-7 occurs, else ``consep4`` (HoVer-Net's
merged codes), with a warning saying so. Raw types a map does not know get no class: they
are counted per unit (``unmapped_types``) and skipped, or kept unlabelled with ``--unknown keep``.

Samples: key ``<unit id>_<instance id>``; a unit id is the tile's relative stem through
``safe_id``, with ``-2``, ``-3``, ... added when two stems clean to the same id
(``a b.png``, ``a_b.png``). PanNuke keys are ``<folder id>_<image>_c<channel>_<id>``, the
folder id being ``safe_id`` of the folder holding images.npy, relative to --input
(``pannuke`` when it is --input itself). Meta ``source`` (image, or images.npy, relative
to --input), ``instance``, ``bbox`` [x0, y0, x1, y1] (x1, y1 exclusive), ``centroid``
[x, y] in pixel indices (pixel i's centre is i: the mean column and row of a map's pixels,
for a box its centre less 0.5), ``area``, ``raw_type``, ``class``, ``window`` [left, top,
side]; PanNuke adds ``image_index``, ``channel`` and ``tissue`` (when types.npy is there).
Instance ids are map ids, or row/object indices (from 0) for boxes.

Splits (``--split 0.8,0.2``, ``sslkit.sharding.core.splits``) go by group, never by nucleus or tile:
``--group-regex`` names the group (source image, patient, slide) of each tile from its path below
--input, so that train and test never share an image; ``OUT/<split>/`` per split, ``OUT/splits.json``.
    sslkit shard cells --format consep --input CoNSeP/Train --out shards/consep --split 0.8,0.2 \\
        --group-regex 'train_(\\d+)_'         # tiles train_<image>_<tile>: split by original image
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

import sslkit.sharding.cells.annotations as ann
import sslkit.sharding.cells.pairing as pairing
from sslkit.errors import ConfigError, MissingInput, UsageError
from sslkit.sharding.core.imaging import read_image, resize, to_channels
from sslkit.sharding.core.source import Progress, Sample, Unit, UnitError, natural_key, safe_id, unique_ids
from sslkit.sharding.core.splits import add_split_args, shard_split, split_from_args
from sslkit.sharding.core.stain import StainNormalizer, add_stain_args, stain_from_args

log = logging.getLogger(__name__)
CLASSMAPS = Path(__file__).resolve().parents[2] / "configs" / "classmaps"
FORMATS = ("consep", "pannuke", "nucls", "voc", "labelmap")
PAD_MODES = ("reflect", "constant", "edge", "symmetric")
_WINDOW_SCALE = {"consep": 2.0, "pannuke": 2.0, "labelmap": 2.0, "nucls": 1.0, "voc": 1.0}
_DEFAULT_MAP = {"pannuke": "pannuke", "nucls": "nucls", "voc": "raw", "labelmap": "raw"}


# ----------------------------------------------------------------------------- class maps


def type_key(raw: Any) -> Optional[str]:
    """A raw type as a comparable string: integers as digits, names lower-case with '_' for spaces/hyphens."""
    if raw is None:
        return None
    text = str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        return text.lower().replace(" ", "_").replace("-", "_")
    return str(int(number)) if number.is_integer() else text


@dataclass(frozen=True)
class ClassMap:
    """Raw types -> class index; ``classes`` None means no labels (``--class-map none``)."""

    name: str
    classes: Optional[list[str]]
    lookup: dict[str, int]
    note: str = ""

    def index(self, raw: Any) -> Optional[int]:
        return self.lookup.get(type_key(raw)) if self.classes is not None else None


def read_class_map(path: Path) -> ClassMap:
    """A YAML class map: ``classes: {name: [raw type, ...], ...}`` (order = label index)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"Class map {path} does not read as YAML ({err}); fix the file.") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise ConfigError(f"Class map {path} has no 'classes' mapping; write 'classes: {{name: [raw types]}}'.")
    lookup: dict[str, int] = {}
    for index, raws in enumerate(classes.values()):
        for raw in raws if isinstance(raws, list) else [raws]:
            key = type_key(raw)
            if key in lookup and lookup[key] != index:
                raise ConfigError(f"Class map {path} lists raw type {raw!r} under two classes; keep it under one.")
            lookup[key] = index
    return ClassMap(path.stem, [str(n) for n in classes], lookup)


def raw_class_map(raw_types: set) -> ClassMap:
    """Every raw type its own class, integers in numeric order first, then names in natural order (type2 < type10)."""
    keys = {type_key(r) for r in raw_types} - {None}
    ordered = sorted(keys, key=lambda k: (0, int(k), ()) if k.lstrip("-").isdigit() else (1, 0, natural_key(k)))
    return ClassMap("raw", ordered, {k: i for i, k in enumerate(ordered)})


def resolve_class_map(spec: str, *, fmt: str, raw_types: Callable[[], set], files: Sequence[str] = ()
                      ) -> ClassMap:
    """``spec`` (auto, none, raw, a packaged name or a YAML path) -> ClassMap; ``raw_types`` scans the data.

    ``auto`` and ``raw`` on annotations without any type give no labels (``none``), with a
    warning naming ``files`` (the annotation files ``raw_types`` reads).
    """
    if spec == "none":
        return ClassMap("none", None, {})
    if spec not in ("auto", "raw"):
        return _packaged(spec)
    found = raw_types()
    if not found:
        note = _no_types_note(fmt, files)
        log.warning(note)
        return ClassMap("none", None, {}, note=note)
    if spec == "auto" and fmt == "consep":
        name = "consep7" if found & {5, 6, 7} else "consep4"
        note = f"CoNSeP type codes found: {sorted(found)}; using class map '{name}' " + (
            "(the 7 original types)." if name == "consep7" else
            "(HoVer-Net's merged codes 1-4); pass --class-map consep7 if these are original types.")
        log.warning(note)
        return replace(_packaged(name), note=note)
    spec = _DEFAULT_MAP[fmt] if spec == "auto" else spec
    return raw_class_map(found) if spec == "raw" else _packaged(spec)


def _no_types_note(fmt: str, files: Sequence[str]) -> str:
    """The warning for annotations without any nucleus type, naming the first few files."""
    hint = {"consep": "the label files hold no inst_type or type_map",
            "nucls": "pass --class-column if their type column has another name",
            "labelmap": "put id,type CSVs in a types/ folder or name it with --types"}.get(fmt, "")
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    where = f"the {len(files)} annotation file(s) {shown}" if files else "the annotations (no type tables found)"
    return f"No nucleus types in {where}; writing crops without labels (class map 'none')" + (
        f": {hint}." if hint else ".")


def _packaged(spec: str) -> ClassMap:
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise MissingInput(f"Class map file {path} does not exist; give an existing YAML file or a name.")
        return read_class_map(path)
    if (CLASSMAPS / f"{spec}.yaml").is_file():
        return read_class_map(CLASSMAPS / f"{spec}.yaml")
    known = ", ".join(sorted(p.stem for p in CLASSMAPS.glob("*.yaml")) + ["raw", "none"])
    raise UsageError(f"No class map named '{spec}'; give a YAML file or one of: {known}.")


# ----------------------------------------------------------------------------- geometry


def crop_window(bbox: tuple[float, ...], *, scale: float, window: Optional[int], min_window: int
                ) -> tuple[int, int, int]:
    """(left, top, side) of the square window centred on ``bbox`` = (x0, y0, x1, y1), source pixels."""
    x0, y0, x1, y1 = bbox
    side = window or max(min_window, math.ceil(scale * max(x1 - x0, y1 - y0) - 1e-6))
    return math.floor((x0 + x1 - side) / 2 + 0.5), math.floor((y0 + y1 - side) / 2 + 0.5), int(side)


def _wrap(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Positions outside [0, n) folded back in the way ``np.pad(mode)`` fills them."""
    if mode == "edge":
        return np.clip(index, 0, n - 1)
    if mode == "reflect":
        if n == 1:
            return np.zeros_like(index)
        period = 2 * (n - 1)
        m = index % period
        return np.where(m >= n, period - m, m)
    period = 2 * n  # symmetric: the edge pixel repeated
    m = index % period
    return np.where(m >= n, period - 1 - m, m)


def cut_window(image: np.ndarray, left: int, top: int, side: int, *, pad: str = "reflect",
               value: int = 0) -> np.ndarray:
    """(side, side[, C]) window of an (H, W[, C]) image; equals ``np.pad(image, mode=pad)`` cut there."""
    height, width = image.shape[:2]
    if top >= 0 and left >= 0 and top + side <= height and left + side <= width:
        return image[top:top + side, left:left + side]  # inside: no padding
    rows, cols = np.arange(top, top + side), np.arange(left, left + side)
    if pad != "constant":
        return image[np.ix_(_wrap(rows, height, pad), _wrap(cols, width, pad))]
    out = np.full((side, side) + image.shape[2:], value, dtype=image.dtype)
    r0, r1 = max(top, 0), min(top + side, height)
    c0, c1 = max(left, 0), min(left + side, width)
    if r1 > r0 and c1 > c0:
        out[r0 - top:r1 - top, c0 - left:c1 - left] = image[r0:r1, c0:c1]
    return out


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(float(value), 2)


# ----------------------------------------------------------------------------- the source


class CellSource:
    """Nuclei of a CoNSeP, PanNuke, NuCLS, Pascal-VOC or label-image collection, one crop each.

    Plans the files (and resolves the class map, which may scan annotations) when built,
    so ``classes`` is known before ``units()``; holds only paths and numbers (picklable).
    """

    kind, encode, quality, handles_skip = "cells", "png", 95, False
    unit_noun, sample_noun = "tile", "crop"

    def __init__(self, *, fmt: str, input: str | Path, size: int = 32, window_scale: Optional[float] = None,
                 window: Optional[int] = None, min_window: int = 16, pad: str = "reflect", pad_value: int = 0,
                 class_map: str = "auto", class_column: Optional[str] = None, unknown: str = "skip",
                 channels: int = 3, min_area: float = 0, images: Optional[str] = None,
                 labels: Optional[str] = None, types: Optional[str] = None, images_per_unit: int = 64,
                 stain: Optional[StainNormalizer] = None) -> None:
        _check_options(fmt, size, window_scale, window, min_window, pad, unknown, channels, min_area,
                       images_per_unit)
        self.root = Path(input).resolve()
        if not self.root.is_dir():
            raise MissingInput(f"Input folder {input} does not exist; give the dataset (or split) folder.")
        self.fmt, self.size, self.window, self.min_window = fmt, size, window, min_window
        self.window_scale = None if window else window_scale or _WINDOW_SCALE[fmt]
        self.pad, self.pad_value, self.unknown, self.channels = pad, pad_value, unknown, channels
        self.class_column, self.min_area, self.images_per_unit = class_column, min_area, images_per_unit
        if stain is not None and channels != 3:
            raise UsageError("--stain-normalize works on RGB images; drop it or use --channels 3.")
        self.stain = stain  # whole images are normalised before their nuclei are cut
        self.failed: list[dict[str, str]] = []
        if fmt == "pannuke":
            self._plan, self._plan_failed = pairing.find_pannuke(self.root)
        else:
            self._plan, self._plan_failed = pairing.pair_tiles(fmt, self.root, images=images, labels=labels,
                                                               types=types)
        if not self._plan:
            raise MissingInput(f"No {fmt} images with annotations found under {input}; see "
                                    "'sslkit shard cells --help' for the layout each format expects.")
        scan = lambda: ann.raw_types(fmt, self._plan, column=class_column)  # noqa: E731
        scanned = [] if fmt == "pannuke" else [row[3] if fmt == "labelmap" else row[2] for row in self._plan]
        self.class_map = resolve_class_map(class_map, fmt=fmt, raw_types=scan,
                                           files=[self._relative(f) for f in scanned if f])
        self.classes = self.class_map.classes

    def params(self) -> dict:
        return {"format": self.fmt, "input": str(self.root), "size": self.size, "window": self.window,
                "window_scale": self.window_scale, "min_window": self.min_window, "pad": self.pad,
                "pad_value": self.pad_value, "channels": self.channels, "min_area": self.min_area,
                "unknown": self.unknown, "class_column": self.class_column, "class_map": self.class_map.name,
                "class_map_note": self.class_map.note, "classes": self.classes,
                "images_per_unit": self.images_per_unit if self.fmt == "pannuke" else None,
                **(self.stain.params if self.stain is not None else {})}

    def units(self) -> list[Unit]:
        """One unit per tile (PanNuke: per run of images); ids equal after ``safe_id`` get -2, -3, ..."""
        self.failed = list(self._plan_failed)
        if self.fmt == "pannuke":
            return _pannuke_units(self)
        ids = unique_ids([safe_id(rel) for rel, *_ in self._plan])
        return [Unit(uid, image, float(Path(image).stat().st_size),
                     {"rel": rel, "image": image, "annotation": annotation, "types": types})
                for uid, (rel, image, annotation, types) in zip(ids, self._plan)]

    def _relative(self, path: str) -> str:
        """``path`` relative to --input as a '/'-path (as given when outside it)."""
        return Path(path).relative_to(self.root).as_posix() if Path(path).is_relative_to(self.root) else path

    # -- producing (worker process) --

    def produce(self, unit: Unit, *, skip: int, progress: Progress) -> Iterator[Sample]:
        if self.fmt == "pannuke":
            yield from _produce_pannuke(self, unit, progress)
            return
        p = unit.payload
        try:
            image = read_image(p["image"], channels=self.channels)
        except Exception as err:  # noqa: BLE001 -- decoders raise many kinds for a damaged file
            raise UnitError(f"{p['image']} does not decode as an image ({err}); re-export or remove it.") from None
        if self.stain is not None:
            image, normalised = self.stain(image)
            progress.info(stain_kept=int(not normalised))
        try:
            nuclei, counts = ann.load_nuclei(self.fmt, p["annotation"], p["types"], width=image.shape[1],
                                             height=image.shape[0], column=self.class_column)
        except ValueError as err:
            raise UnitError(str(err)) from None
        extra = {"source": self._relative(p["image"])}
        yield from self._crops(image, nuclei, counts, key=unit.id, extra=extra, progress=progress)

    def _select(self, nuclei: list[ann.Nucleus], counts: dict[str, Any]) -> list[tuple[int, Optional[int]]]:
        """(position in ``nuclei``, label) of those to write; counts small nuclei and unmapped types."""
        chosen, unmapped = [], {}
        for position, nucleus in enumerate(nuclei):
            if nucleus.area < self.min_area:
                counts["small"] = counts.get("small", 0) + 1
                continue
            label = self.class_map.index(nucleus.raw_type)
            if self.classes is not None and label is None:
                name = str(type_key(nucleus.raw_type))
                unmapped[name] = unmapped.get(name, 0) + 1
                if self.unknown == "skip":
                    continue
            chosen.append((position, label))
        if unmapped:
            counts["unmapped_types"] = dict(sorted(unmapped.items()))
        return chosen

    def _crops(self, image: np.ndarray, nuclei: list, counts: dict, *, key: str, extra: dict,
               progress: Progress) -> Iterator[Sample]:
        chosen = self._select(nuclei, counts)
        progress.info(nuclei=len(nuclei), crops=len(chosen), **counts)
        progress.total(len(chosen))
        for position, label in chosen:
            nucleus = nuclei[position]
            yield self._sample(image, nucleus, label, key=f"{key}_{nucleus.instance}", meta=extra)

    def _sample(self, image: np.ndarray, nucleus: ann.Nucleus, label: Optional[int], *, key: str,
                meta: dict) -> Sample:
        left, top, side = crop_window(nucleus.bbox, scale=self.window_scale, window=self.window,
                                      min_window=self.min_window)
        crop = resize(cut_window(image, left, top, side, pad=self.pad, value=self.pad_value), (self.size, self.size))
        record = dict(meta, instance=nucleus.instance, bbox=[_number(v) for v in nucleus.bbox],
                      centroid=[_number(v) for v in nucleus.centroid], area=_number(nucleus.area),
                      raw_type=nucleus.raw_type, window=[left, top, side],
                      **{"class": self.classes[label] if label is not None else None})
        return Sample(key, crop, label, record)


def _pannuke_units(source: CellSource) -> list[Unit]:
    """Runs of ``images_per_unit`` images; the key prefix is the folder's ``safe_id``, made unique."""
    folders = [Path(images).parent.relative_to(source.root).as_posix() for images, _, _ in source._plan]
    prefixes = unique_ids([safe_id(rel) if rel != "." else "pannuke" for rel in folders])
    units = []
    for prefix, (images, masks, types) in zip(prefixes, source._plan):
        try:
            count = np.load(images, mmap_mode="r").shape[0]
            mask_array = np.load(masks, mmap_mode="r")
            ann.pannuke_channels_last(mask_array)
        except (OSError, ValueError) as err:
            source.failed.append({"source": images, "reason": f"does not load with its masks ({err}); "
                                                              "check the .npy files."})
            continue
        if mask_array.shape[0] != count:
            source.failed.append({"source": images, "reason": f"holds {count} images but {masks} holds "
                                                              f"{mask_array.shape[0]} masks; use matching files."})
            continue
        for start in range(0, count, source.images_per_unit):
            stop = min(start + source.images_per_unit, count)
            units.append(Unit(f"{prefix}_{start:05d}", images, float(stop - start),
                              {"images": images, "masks": masks, "types": types, "start": start, "stop": stop,
                               "prefix": prefix}))
    return units


def _produce_pannuke(source: CellSource, unit: Unit, progress: Progress) -> Iterator[Sample]:
    """Crops of images [start, stop) of one PanNuke file; keys ``<folder id>_<image>_c<channel>_<id>``."""
    p = unit.payload
    images, masks = np.load(p["images"], mmap_mode="r"), np.load(p["masks"], mmap_mode="r")
    tissue = np.load(p["types"], mmap_mode="r") if p["types"] else None
    last = ann.pannuke_channels_last(masks)
    rel = Path(p["images"]).relative_to(source.root).as_posix()
    planned, counts = [], {}
    for i in range(p["start"], p["stop"]):
        mask = np.asarray(masks[i]) if last else np.moveaxis(np.asarray(masks[i]), 0, -1)
        try:
            planned += [(i, channel, nucleus) for channel, nucleus in ann.pannuke_nuclei(mask)]
        except ValueError as err:
            raise UnitError(f"{p['masks']}, image {i}: {err}") from None
    chosen = source._select([nucleus for _, _, nucleus in planned], counts)
    progress.info(images=p["stop"] - p["start"], nuclei=len(planned), crops=len(chosen), **counts)
    progress.total(len(chosen))
    current, image, kept = -1, None, 0
    for position, label in chosen:
        i, channel, nucleus = planned[position]
        if i != current:
            current, image = i, to_channels(np.asarray(images[i]), source.channels)
            if source.stain is not None:
                image, normalised = source.stain(image)
                kept += not normalised
                progress.info(stain_kept=kept)
        meta = {"source": rel, "image_index": i, "channel": channel}
        if tissue is not None:
            meta["tissue"] = str(tissue[i])
        yield source._sample(image, nucleus, label, key=f"{p['prefix']}_{i:05d}_c{channel}_{nucleus.instance}",
                             meta=meta)


def _check_options(fmt: str, size: int, window_scale: Optional[float], window: Optional[int], min_window: int,
                   pad: str, unknown: str, channels: int, min_area: float, images_per_unit: int) -> None:
    checks = [
        (fmt in FORMATS, f"--format {fmt!r} is not known; use one of {', '.join(FORMATS)}."),
        (size > 0, f"--size must be a positive number of pixels, got {size}."),
        (window is None or window_scale is None, "--window and --window-scale exclude each other; give one."),
        (window is None or window > 0, f"--window must be a positive number of pixels, got {window}."),
        (window_scale is None or window_scale > 0, f"--window-scale must be positive, got {window_scale}."),
        (min_window > 0, f"--min-window must be a positive number of pixels, got {min_window}."),
        (pad in PAD_MODES, f"--pad {pad!r} is not known; use one of {', '.join(PAD_MODES)}."),
        (unknown in ("skip", "keep"), f"--unknown {unknown!r} is not known; use skip or keep."),
        (channels in (1, 3), f"--channels must be 1 or 3, got {channels}."),
        (min_area >= 0, f"--min-area must be zero or positive, got {min_area}."),
        (images_per_unit > 0, f"--images-per-unit must be positive, got {images_per_unit}."),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


# ----------------------------------------------------------------------------- command line

def add_parser(shard_sub: Any) -> argparse.ArgumentParser:
    """Add ``sslkit shard cells`` to the ``sslkit shard`` sub-parsers."""
    from sslkit.sharding.core.runner import add_runner_args

    p = shard_sub.add_parser("cells", help="one crop per nucleus from instance maps or boxes",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS, help="annotation layout")
    p.add_argument("--input", required=True, help="dataset folder (or one split of it)")
    p.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    win = p.add_mutually_exclusive_group()
    win.add_argument("--window-scale", type=float, help="window side / nucleus bbox side (default 2; 1 for nucls, voc)")
    win.add_argument("--window", type=int, help="fixed window side in source pixels")
    p.add_argument("--min-window", type=int, default=16, help="smallest window side in source pixels (default 16)")
    p.add_argument("--size", type=int, default=32, help="crop side in pixels after resizing (default 32)")
    p.add_argument("--pad", choices=PAD_MODES, default="reflect", help="fill outside the image (default reflect)")
    p.add_argument("--pad-value", type=int, default=0, help="fill value for --pad constant (default 0)")
    p.add_argument("--class-map", default="auto",
                   help="packaged map name, YAML file, raw or none (default: per format, see above)")
    p.add_argument("--class-column", help="CSV column holding the type (nucls; default raw_classification, ...)")
    p.add_argument("--unknown", choices=("skip", "keep"), default="skip",
                   help="nuclei whose type the map lacks: skip (default) or keep unlabelled")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--min-area", type=float, default=0, help="skip nuclei smaller than this (pixels; default 0)")
    p.add_argument("--images", help="image folder (instead of finding it under --input)")
    p.add_argument("--labels", help="annotation folder (instead of finding it under --input)")
    p.add_argument("--types", help="labelmap: folder of per-image type CSVs (id,type)")
    p.add_argument("--images-per-unit", type=int, default=64, help="pannuke: images per unit of work (default 64)")
    add_stain_args(p)
    add_split_args(p, group_help="with --split: the group (source image, patient, slide) of a tile = named group "
                   "'group' / first group of this regex on its path below --input, e.g. 'train_(\\d+)_'; default: "
                   "each tile (PanNuke: each run of images) its own group")
    add_runner_args(p)
    p.set_defaults(fn=_cmd_cells)
    return p


def source_from_args(args: argparse.Namespace) -> CellSource:
    return CellSource(fmt=args.format, input=args.input, size=args.size, window_scale=args.window_scale,
                      window=args.window, min_window=args.min_window, pad=args.pad, pad_value=args.pad_value,
                      class_map=args.class_map, class_column=args.class_column, unknown=args.unknown,
                      channels=args.channels, min_area=args.min_area, images=args.images, labels=args.labels,
                      types=args.types, images_per_unit=args.images_per_unit,
                      stain=stain_from_args(args, channels=args.channels))


def _cmd_cells(args: argparse.Namespace) -> None:
    from sslkit.sharding.core.runner import exit_on_failures, run_source, runner_kwargs

    fractions, names = split_from_args(args)
    if fractions is None and args.group_regex:
        raise UsageError("--group-regex groups tiles for --split; add --split (e.g. 0.8,0.2) or drop it.")
    source, command = source_from_args(args), shlex.join(["sslkit", *sys.argv[1:]])
    if fractions is None:
        summaries = [run_source(source, args.out, **runner_kwargs(args), command=command)]
    else:
        summaries = list(shard_split(source, args.out, fractions=fractions, names=names, seed=args.seed,
                                     group_regex=args.group_regex, **runner_kwargs(args), command=command).values())
    exit_on_failures(summaries, args)
