"""Nucleus annotations of the formats ``sslkit shard cells`` reads, as one list of ``Nucleus``.

Two kinds of annotation, one result:

    instance maps  (H, W) ints, 0 = background: CoNSeP/HoVer-Net ``.mat``, PanNuke ``masks.npy``
                   channels, label images (PNG/TIFF/NPY); bbox, area and centroid from the pixels
    boxes          NuCLS CSVs, Pascal-VOC XML; area = box area, centroid = box centre

Coordinates are in source pixels with pixel ``i`` covering [i, i + 1): a bbox is
``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive. A centroid is (x, y): for an instance map
in pixel indices, the mean column and row of the nucleus' pixels (as HoVer-Net's
``inst_centroid``); for a box the box centre ``((x0 + x1) / 2, (y0 + y1) / 2)`` in the same
continuous coordinates as the bbox, which is half a pixel more than the mean pixel index.

Which image goes with which annotation file is ``sslkit.sharding.cells.pairing``'s business.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Nucleus:
    """One annotated nucleus; ``raw_type`` is the code or name as the annotation writes it (None: none)."""

    instance: int
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 (exclusive), source pixels
    centroid: tuple[float, float]  # x, y
    area: float  # pixels (instance maps) or box area (box formats)
    raw_type: Any = None


def raw_types(fmt: str, plan: list[tuple], *, column: Optional[str] = None) -> set:
    """Every raw type the annotations of ``plan`` use (for ``--class-map raw`` and CoNSeP's auto map)."""
    if fmt == "pannuke":
        return set(PANNUKE_TYPES)
    found: set = set()
    for _, _, annotation, table in plan:
        try:
            if fmt == "consep":
                found |= consep_codes(Path(annotation))
            elif fmt in ("nucls", "voc"):
                boxes = read_voc(Path(annotation)) if fmt == "voc" else read_box_csv(Path(annotation), column=column)
                found |= {raw for _, _, raw in boxes[0]}
            elif table:
                found |= set(read_types_csv(Path(table)).values())
        except ValueError:
            continue  # the tile fails with this message when it is sharded
    return found - {None}


def load_nuclei(fmt: str, annotation: str, table: Optional[str], *, width: int, height: int,
                column: Optional[str] = None) -> tuple[list[Nucleus], dict[str, int]]:
    """The nuclei of one tile of a (width x height) image, and counts to report.

    Counts: ``types_from_type_map``; for boxes ``clipped`` (partly outside, clipped),
    ``outside`` (skipped), ``empty`` (zero size, skipped), ``unreadable_boxes``.
    Raises ValueError naming the file when it cannot be used.
    """
    path = Path(annotation)
    if fmt in ("consep", "labelmap"):
        if fmt == "consep":
            inst_map, types, type_map = read_consep(path)
        else:
            inst_map, type_map = read_label_image(path), None
            types = read_types_csv(Path(table)) if table else None
        if inst_map.shape != (height, width):
            raise ValueError(f"{path}: the instance map is {inst_map.shape[1]}x{inst_map.shape[0]} but its image "
                             f"is {width}x{height}; pair each image with its own map.")
        nuclei, derived = nuclei_from_map(inst_map, types=types, type_map=type_map)
        return nuclei, {"types_from_type_map": derived} if derived else {}
    boxes, bad = read_voc(path) if fmt == "voc" else read_box_csv(path, column=column)
    counts = {"unreadable_boxes": bad} if bad else {}
    nuclei = []
    for instance, box, raw in boxes:
        clipped, state = clip_box(box, width, height)
        if state != "inside":
            counts[state] = counts.get(state, 0) + 1
        if clipped is not None:
            nuclei.append(box_nucleus(instance, clipped, raw))
    return nuclei, counts


# ----------------------------------------------------------------------------- instance maps


def as_instance_map(array: np.ndarray, path: Path | str) -> np.ndarray:
    """An (H, W) int64 instance map from ints, integral floats, or (H, W, 3) colour-coded ids.

    Colour-coded label images (one RGB colour per nucleus, black background) get ids
    ``R * 65536 + G * 256 + B``. Raises ValueError naming ``path`` for anything else.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] in (3, 4):
        rgb = array[:, :, :3].astype(np.int64)
        array = (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]
    if array.ndim != 2:
        raise ValueError(f"{path}: the instance map has shape {array.shape}; it must be (H, W) integers.")
    if not np.issubdtype(array.dtype, np.integer):
        if array.dtype == np.bool_ or not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"{path}: the instance map holds non-integer values; save instance ids as integers.")
    return array.astype(np.int64)


def nuclei_from_map(inst_map: np.ndarray, *, types: Optional[Mapping[int, Any]] = None,
                    type_map: Optional[np.ndarray] = None) -> tuple[list[Nucleus], int]:
    """Every instance id > 0 of an (H, W) map as a ``Nucleus``, in increasing id order.

    ``types`` gives the raw type per id; ids it lacks take the majority of ``type_map``
    (H, W) inside the instance (background 0 excluded; all-0 gives 0), else None.
    Returns the nuclei and how many types came from ``type_map``.
    """
    labels = np.where(inst_map > 0, inst_map, 0) if inst_map.size and inst_map.min() < 0 else inst_map
    top = int(labels.max()) if labels.size else 0
    if top == 0:
        return [], 0
    ids = None  # find_objects lists every id up to the largest: renumber sparse huge ids (colour codes) 1..n
    if top > min(4 * labels.size, 10**7):
        ids, inverse = np.unique(labels, return_inverse=True)
        offset = int(ids[0] == 0)
        labels, ids = inverse.reshape(labels.shape) + (1 - offset), ids[offset:]
    nuclei, derived = [], 0
    for j, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue  # an id the map does not use
        inside = labels[box] == j
        ys, xs = np.nonzero(inside)
        area, rows, cols = len(xs), box[0], box[1]
        ident = j if ids is None else int(ids[j - 1])
        raw = types.get(ident) if types is not None else None
        if raw is None and type_map is not None:
            raw, derived = _majority(type_map[box][inside]), derived + 1
        centroid = ((int(xs.sum()) + area * cols.start) / area, (int(ys.sum()) + area * rows.start) / area)
        bbox = (float(cols.start), float(rows.start), float(cols.stop), float(rows.stop))
        nuclei.append(Nucleus(ident, bbox, centroid, float(area), raw))
    return nuclei, derived


def _majority(values: np.ndarray) -> int:
    values = values.astype(np.int64).ravel()
    labelled = values[values > 0]
    if labelled.size == 0:
        return 0
    codes, counts = np.unique(labelled, return_counts=True)
    return int(codes[np.argmax(counts)])  # ties: the smaller code


def read_consep(path: Path) -> tuple[np.ndarray, Optional[dict[int, int]], Optional[np.ndarray]]:
    """HoVer-Net ``.mat``: (inst_map (H, W) int64, {id: inst_type} or None, type_map or None).

    ``inst_type`` (N, 1) holds the type of instance ``i + 1`` at row ``i``.
    Raises ValueError naming the file when it does not load or has no ``inst_map``.
    """
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as err:  # noqa: BLE001 -- scipy raises several kinds for corrupt or HDF5 (v7.3) files
        raise ValueError(f"{path} does not load as a MATLAB file ({err}); save it with scipy.io.savemat "
                         "or MATLAB -v7.") from None
    if "inst_map" not in mat:
        names = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path} has no 'inst_map' (it holds {names or 'nothing'}); a CoNSeP label file needs "
                         "inst_map (H, W ints, 0 = background).")
    inst_map = as_instance_map(mat["inst_map"], path)
    types = None
    if "inst_type" in mat and np.size(mat["inst_type"]):
        codes = np.asarray(mat["inst_type"]).ravel()
        types = {i + 1: int(c) for i, c in enumerate(codes) if np.isfinite(c)}
    type_map = None
    if "type_map" in mat:
        type_map = np.asarray(mat["type_map"])
        if type_map.shape != inst_map.shape:
            raise ValueError(f"{path}: type_map {type_map.shape} and inst_map {inst_map.shape} differ in shape; "
                             "re-export them from the same tile.")
    return inst_map, types, type_map


def consep_codes(path: Path) -> set[int]:
    """The raw type codes a CoNSeP ``.mat`` uses (``inst_type``, else ``type_map``); empty when unreadable."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["inst_type", "type_map"])
    except Exception:  # noqa: BLE001 -- any unreadable file: reported when the tile itself is sharded
        return set()
    values = mat.get("inst_type")
    if values is None or not np.size(values):
        values = mat.get("type_map", np.zeros(0))
    values = np.asarray(values).ravel()
    return {int(v) for v in np.unique(values[np.isfinite(values)]) if v > 0}


def read_label_image(path: Path) -> np.ndarray:
    """An instance-label image (PNG/TIFF 8/16/32-bit, or ``.npy``) as an (H, W) int64 map."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        elif suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB") if img.mode in ("P", "PA") else img)
    except Exception as err:  # noqa: BLE001 -- imaging libraries raise many kinds for a damaged file
        raise ValueError(f"{path} does not decode as a label image ({err}); save instance ids as a PNG/TIFF.") from None
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    return as_instance_map(array, path)


# ----------------------------------------------------------------------------- tables and boxes


def _clean(value: str) -> str:
    return value.strip().lower().replace(" ", "_").replace("-", "_")


def _raw_value(text: Optional[str]) -> Any:
    """A CSV/XML type cell as int when it is an integer, else the stripped text (None when empty)."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else text


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{_clean(k or ""): v for k, v in row.items()} for row in reader]
            return [_clean(c) for c in reader.fieldnames or []], rows
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} does not read as a CSV file ({err}); save it as UTF-8 CSV with a header.") from None


def _pick(columns: list[str], wanted: tuple[str, ...]) -> Optional[str]:
    return next((c for c in wanted if c in columns), None)


TYPE_COLUMNS = ("raw_classification", "main_classification", "super_classification", "group", "label",
                "class", "classification", "category", "class_name", "cell_type", "name", "type")
_ID_COLUMNS = ("id", "instance", "instance_id", "inst_id", "label_id", "nucleus", "nucleus_id")


def read_types_csv(path: Path) -> dict[int, Any]:
    """A ``labelmap`` type table: instance id column (id, instance, ...) and type column (type, label, ...)."""
    columns, rows = _read_rows(path)
    id_col = _pick(columns, _ID_COLUMNS)
    type_col = _pick([c for c in columns if c != id_col], ("type",) + TYPE_COLUMNS)
    if id_col is None or type_col is None:
        raise ValueError(f"{path} has columns {columns}; a type table needs an instance id column "
                         f"(one of {list(_ID_COLUMNS)}) and a type column (type or label).")
    types = {}
    for row in rows:
        ident = _raw_value(row.get(id_col))
        if isinstance(ident, int):
            types[ident] = _raw_value(row.get(type_col))
    return types


_BOX_COLUMNS = (("xmin", "ymin", "xmax", "ymax"), ("x_min", "y_min", "x_max", "y_max"),
                ("x0", "y0", "x1", "y1"), ("left", "top", "right", "bottom"))


def read_box_csv(path: Path, *, column: Optional[str] = None) -> tuple[list[tuple[int, tuple, Any]], int]:
    """NuCLS-style CSV: ``[(row index, (xmin, ymin, xmax, ymax), raw type)]`` and the unreadable row count.

    The type comes from ``column`` or the first of ``TYPE_COLUMNS`` present except ``type``
    (NuCLS uses ``type`` for the geometry: rectangle or polyline).
    """
    columns, rows = _read_rows(path)
    box_cols = next((names for names in _BOX_COLUMNS if all(n in columns for n in names)), None)
    if box_cols is None:
        raise ValueError(f"{path} has columns {columns}; a box table needs xmin, ymin, xmax, ymax.")
    type_col = _clean(column) if column else _pick(columns, TYPE_COLUMNS[:-1])
    if type_col is not None and type_col not in columns:
        raise ValueError(f"{path} has no column '{column}' (it has {columns}); pass one of them to --class-column.")
    boxes, bad = [], 0
    for index, row in enumerate(rows):
        try:
            box = tuple(float(row[c]) for c in box_cols)
        except (TypeError, ValueError):
            bad += 1
            continue
        boxes.append((index, box, _raw_value(row.get(type_col)) if type_col else None))
    return boxes, bad


def read_voc(path: Path) -> tuple[list[tuple[int, tuple, Any]], int]:
    """Pascal-VOC XML: ``[(object index, (xmin, ymin, xmax, ymax), name)]`` and the unreadable object count.

    VOC boxes are 1-based inclusive pixel indices (the devkit's convention), so the
    box returned is ``(xmin - 1, ymin - 1, xmax, ymax)`` in this module's coordinates.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"{path} does not parse as Pascal-VOC XML ({err}); fix or remove the file.") from None
    boxes, bad = [], 0
    for index, obj in enumerate(root.iter("object")):
        box = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            bad += 1
            continue
        boxes.append((index, (x0 - 1, y0 - 1, x1, y1), _raw_value(obj.findtext("name"))))
    return boxes, bad


def clip_box(box: tuple, width: int, height: int) -> tuple[Optional[tuple[float, ...]], str]:
    """``box`` clipped to the image: (box or None, "inside" | "clipped" | "outside" | "empty")."""
    x0, y0, x1, y1 = box
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    if x1 <= x0 or y1 <= y0:
        return None, "empty"
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        return None, "outside"
    state = "inside" if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1) else "clipped"
    return (cx0, cy0, cx1, cy1), state


def box_nucleus(instance: int, box: tuple[float, ...], raw_type: Any) -> Nucleus:
    x0, y0, x1, y1 = box
    centroid = ((x0 + x1) / 2, (y0 + y1) / 2)  # the box centre (see the module notes)
    return Nucleus(instance, (x0, y0, x1, y1), centroid, (x1 - x0) * (y1 - y0), raw_type)


# ----------------------------------------------------------------------------- PanNuke

PANNUKE_TYPES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")


def pannuke_channels_last(masks: np.ndarray) -> bool:
    """True for (N, H, W, C) masks, False for (N, C, H, W); C is 5 or 6 (the 6th is background)."""
    if masks.ndim != 4:
        raise ValueError(f"masks.npy has shape {masks.shape}; PanNuke masks are (N, H, W, 6).")
    if masks.shape[3] in (5, 6):
        return True
    if masks.shape[1] in (5, 6):
        return False
    raise ValueError(f"masks.npy has shape {masks.shape}; PanNuke masks are (N, H, W, 6).")


def pannuke_nuclei(mask: np.ndarray) -> list[tuple[int, Nucleus]]:
    """(H, W, C) mask of one image -> ``[(channel, nucleus)]``, channel by channel (0-4), ids increasing."""
    out = []
    for channel, name in enumerate(PANNUKE_TYPES):
        if not mask[:, :, channel].any():
            continue
        inst = as_instance_map(mask[:, :, channel], f"masks.npy channel {channel}")
        nuclei, _ = nuclei_from_map(inst, types={})
        out.extend((channel, replace(n, raw_type=name)) for n in nuclei)
    return out
