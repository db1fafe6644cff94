"""What ``sslkit mil`` trains on: the labels CSV, the per-slide feature bags, and folds grouped by patient.

The labels CSV has a header and one row per slide; the columns are named by ``mil.slide_column``
(``slide_id``), ``mil.label_column`` (``label``) and ``mil.patient_column`` (``patient``, optional).
A slide id is its bag's file name without ``.h5`` in ``mil.features``. Class names are any text;
class index i is the i-th name in sorted order (recorded in ``metrics.json``).

Rows are never dropped in silence. These stop the run with one message naming every such row by
its line in the file (the header is line 1):

- a row whose slide has no bag, or whose bag cannot be read (``mil.missing_bags=skip``: such rows
  are left out instead, and listed under ``skipped`` in ``metrics.json`` and on the terminal);
- an empty slide id, label or patient; a slide id on more than one row.

A bag with no row is not used; it is listed under ``unlabelled_bags`` (a bag folder often holds
more slides than one study labels). A class with fewer patients than ``mil.folds`` stops the run:
every test fold needs a patient of every class.

Bags are read with h5py in the layout CLAM and TRIDENT read (``features`` N x D float32,
``coords`` N x 2 level-0 pixels, attributes on the file and on ``coords``; docs/slides.md).
"""

from __future__ import annotations

import csv
import io
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from sslkit.config import MilConfig
from sslkit.errors import ConfigError

BAG_SUFFIX = ".h5"
CACHE_BYTES = 4 << 30  # bag features kept in memory up to this many bytes; the rest are read again when used
MAX_LISTED = 12  # problems named in one message; the rest are counted


def _text(value: Any) -> Any:
    """An HDF5 attribute as plain Python: bytes decoded, numpy scalars unwrapped."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open_bag(path: Path, *, features: bool) -> tuple[tuple[int, ...], np.ndarray | None, np.ndarray, dict[str, Any]]:
    """(features shape, features (N, D) float32 or None, coords (N, 2) int64, attributes) of one bag file.

    Attributes are the file's, completed by those on ``coords`` (CLAM's bags carry them there only).
    Raises ConfigError naming the file when it is not such a bag."""
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise ValueError(f"it holds {sorted(f.keys())}, not the datasets 'features' and 'coords'")
            shape, coords = tuple(f["features"].shape), np.asarray(f["coords"][()], dtype=np.int64)
            attrs = {**{k: _text(v) for k, v in f["coords"].attrs.items()}, **{k: _text(v) for k, v in f.attrs.items()}}
            feats = np.asarray(f["features"][()], dtype=np.float32) if features else None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"Bag '{path}' cannot be read ({err}); extract that slide again with `sslkit extract`.") \
            from None
    if len(shape) == 2 and shape[0] == 0:
        raise ConfigError(f"Bag '{path}' holds no tiles (no tissue was found at the extraction's settings); remove its "
                          "row, or set mil.missing_bags=skip.")
    if len(shape) != 2 or coords.shape != (shape[0], 2):
        raise ConfigError(f"Bag '{path}' has features of shape {shape} and coords of shape {coords.shape}; a bag "
                          "holds N x D features and N x 2 coords: extract that slide again.")
    if feats is not None and not np.isfinite(feats).all():
        raise ConfigError(f"Bag '{path}' holds NaN or infinite features; extract that slide again.")
    return shape, feats, coords, attrs


def _read_bag(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One bag: features (N, D) float32, coords (N, 2) int64 level-0 (x, y) of each tile, attributes."""
    _, feats, coords, attrs = _open_bag(path, features=True)
    return feats, coords, attrs


@dataclass
class Cohort:
    """The labelled slides with a bag, in the CSV's order, and what was left out."""

    slides: list[str]
    labels: np.ndarray  # (S,) class index
    patients: list[str]
    lines: list[int]  # the CSV line of each slide
    paths: list[Path]  # each slide's bag
    tiles: list[int]  # tiles in each bag
    classes: list[str]  # class names; index = class index
    dim: int  # feature dimension D
    grouping: str  # how the patients were decided, one sentence
    encoders: list[str] = field(default_factory=list)  # the distinct 'encoder' attributes of the bags
    skipped: list[dict[str, Any]] = field(default_factory=list)  # rows left out: line, slide_id, reason
    unlabelled: list[str] = field(default_factory=list)  # bags without a row


def _raise_rows(csv_path: str, problems: list[tuple[int, str]], *, fix: str) -> None:
    problems = sorted(problems)
    named = "; ".join(f"line {line}: {text}" for line, text in problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise ConfigError(f"Labels file '{csv_path}' (mil.labels) has {len(problems)} unusable row"
                      f"{'s' if len(problems) > 1 else ''} ({named}{more}); {fix}.")


def _columns(mil: MilConfig, header: list[str]) -> tuple[str | None, str]:
    """The patient column to use (None: each slide its own patient) and the grouping sentence; ConfigError
    naming a configured column the header lacks (the default patient column may be absent)."""
    patient = mil.patient_column
    missing = [(key, col) for key, col in (("slide_column", mil.slide_column), ("label_column", mil.label_column),
                                           ("patient_column", patient)) if col is not None and col not in header]
    if ("patient_column", patient) in missing and patient == MilConfig.patient_column:
        missing.remove(("patient_column", patient))
        patient, grouping = None, f"each slide is its own patient (the labels file has no '{patient}' column)"
    else:
        grouping = (f"patients from column '{patient}'" if patient is not None
                    else "each slide is its own patient (mil.patient_column is null)")
    if missing:
        key, col = missing[0]
        raise ConfigError(f"Labels file '{mil.labels}' has no column '{col}' (mil.{key}); its columns are "
                          f"{', '.join(header) or 'none'}: name the right one with mil.{key}=NAME.")
    return patient, grouping


def _read_rows(mil: MilConfig) -> tuple[list[tuple[int, str, str, str | None]], str]:
    """(line, slide id, label, patient or None) of every row, and the grouping sentence; ConfigError naming
    the lines of empty values and of slides listed twice, a missing column, or a file that is not UTF-8 CSV."""
    try:
        text = Path(mil.labels).read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheets write a BOM
    except UnicodeDecodeError:
        raise ConfigError(f"Labels file '{mil.labels}' (mil.labels) is not UTF-8 text; save it as UTF-8 CSV.") \
            from None
    except OSError as err:
        raise ConfigError(f"Labels file '{mil.labels}' (mil.labels) cannot be read ({err.strerror}); check its "
                          "permissions.") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in (reader.fieldnames or [])]
        reader.fieldnames = header
        patient, grouping = _columns(mil, header)
        rows = [(reader.line_num, *((row.get(c) or "").strip() for c in (mil.slide_column, mil.label_column)),
                 (row.get(patient) or "").strip() if patient is not None else None) for row in reader]
    except csv.Error as err:
        raise ConfigError(f"Labels file '{mil.labels}' (mil.labels) is not valid CSV at line {reader.line_num} "
                          f"({err}); fix that line.") from None
    problems = [(line, f"empty {what}") for line, *values in rows
                for what, value in zip(("slide id", "label", "patient"), values) if value == ""]
    seen: dict[str, list[int]] = defaultdict(list)
    for line, slide, *_ in rows:
        if slide:
            seen[slide].append(line)
    problems += [(lines[0], f"slide '{slide}' is listed {len(lines)} times (lines {', '.join(map(str, lines))})")
                 for slide, lines in seen.items() if len(lines) > 1]
    if problems:
        _raise_rows(mil.labels, problems, fix="give every slide one row with its slide id, label and patient")
    if not rows:
        raise ConfigError(f"Labels file '{mil.labels}' (mil.labels) has a header but no rows; add one row per slide.")
    return rows, grouping


def read_cohort(mil: MilConfig) -> Cohort:
    """The labelled slides of ``mil.labels`` that have a bag in ``mil.features``; see the module notes for the
    rules. Bag headers are read here (shapes and attributes), their features when training uses them."""
    rows, grouping = _read_rows(mil)
    folder = Path(mil.features)
    bags = {p.name[:-len(BAG_SUFFIX)]: p for p in folder.iterdir()  # hidden: a bag being written (sslkit.atomic)
            if p.name.endswith(BAG_SUFFIX) and not p.name.startswith(".")}
    kept, problems, skipped, shapes = [], [], [], {}
    for line, slide, label, patient in rows:
        reason = None
        if slide not in bags:
            reason = f"slide '{slide}' has no bag {slide}{BAG_SUFFIX} in '{folder}'"
        else:
            try:
                shape, _, _, attrs = _open_bag(bags[slide], features=False)
                shapes[slide] = (shape[1], shape[0], str(attrs.get("encoder", "")))
            except ConfigError as err:
                reason = f"slide '{slide}': {str(err).rstrip('.')}"
        if reason is None:
            kept.append((line, slide, label, patient if patient is not None else slide))
        elif mil.missing_bags == "skip":
            skipped.append({"line": line, "slide_id": slide, "reason": reason})
        else:
            problems.append((line, reason))
    if problems:
        _raise_rows(mil.labels, problems, fix="extract those slides (`sslkit extract`), remove their rows, or set "
                                              "mil.missing_bags=skip to leave them out (they are then listed)")
    return _cohort(mil, kept, bags, shapes, grouping=grouping, skipped=skipped)


def _cohort(mil: MilConfig, kept: list[tuple[int, str, str, str]], bags: dict[str, Path],
            shapes: dict[str, tuple[int, int, str]], *, grouping: str, skipped: list[dict[str, Any]]) -> Cohort:
    if not kept:
        raise ConfigError(f"No row of '{mil.labels}' has a bag in '{mil.features}'; check that mil.features is the "
                          "folder `sslkit extract --out` wrote and that the slide ids are the bags' file names.")
    dims = Counter(shapes[slide][0] for _, slide, _, _ in kept)
    if len(dims) > 1:
        usual = dims.most_common(1)[0][0]
        odd = [f"{slide} ({shapes[slide][0]})" for _, slide, _, _ in kept if shapes[slide][0] != usual]
        raise ConfigError(f"Bags in '{mil.features}' have {usual} features per tile but {', '.join(odd[:MAX_LISTED])} "
                          "differ; extract every slide with the same encoder.")
    classes = sorted({label for _, _, label, _ in kept})
    index = {name: i for i, name in enumerate(classes)}
    cohort = Cohort(slides=[s for _, s, _, _ in kept], labels=np.array([index[lb] for _, _, lb, _ in kept]),
                    patients=[p for _, _, _, p in kept], lines=[line for line, *_ in kept],
                    paths=[bags[s] for _, s, _, _ in kept], tiles=[shapes[s][1] for _, s, _, _ in kept],
                    classes=classes, dim=next(iter(dims)), grouping=grouping, skipped=skipped,
                    encoders=sorted({shapes[s][2] for _, s, _, _ in kept} - {""}),
                    unlabelled=sorted(set(bags) - {s for _, s, _, _ in kept} - {r["slide_id"] for r in skipped}))
    _check_classes(cohort, mil)
    return cohort


def _check_classes(cohort: Cohort, mil: MilConfig) -> None:
    """At least two classes, and every class with at least ``mil.folds`` patients."""
    if len(cohort.classes) < 2:
        raise ConfigError(f"Every usable row of '{mil.labels}' has the label '{cohort.classes[0]}'; slide "
                          "classification needs at least two classes.")
    for k, name in enumerate(cohort.classes):
        patients = {p for p, y in zip(cohort.patients, cohort.labels) if y == k}
        if len(patients) < mil.folds:
            slides = int((cohort.labels == k).sum())
            fix = (f"lower mil.folds to {len(patients)} or label more patients" if len(patients) >= 2
                   else "label slides of at least two patients of that class")
            raise ConfigError(f"Class '{name}' has {len(patients)} patient{'s' if len(patients) != 1 else ''} "
                              f"({slides} slide{'s' if slides != 1 else ''}) but mil.folds is {mil.folds}, and every "
                              f"test fold needs a patient of every class; {fix}.")


def patient_folds(labels: np.ndarray, patients: list[str], *, folds: int, seed: int) -> np.ndarray:
    """The test fold (0..folds-1) of every slide: k folds of whole patients, label shares kept alike
    (scikit-learn's StratifiedGroupKFold, shuffled with ``seed``)."""
    groups = np.unique(np.asarray(patients), return_inverse=True)[1]
    out = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        out[test] = k
    return out


def validation_split(train: np.ndarray, labels: np.ndarray, patients: list[str], *, share: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) slide indices from the training slides ``train``: about ``share`` of their patients
    held out, stratified by label; no validation (an empty array) when ``share`` is 0 or one patient trains."""
    groups = np.unique(np.asarray(patients)[train], return_inverse=True)[1]
    splits = min(max(2, round(1 / share)) if share > 0 else 0, int(groups.max()) + 1)
    if splits < 2:
        return train, train[:0]
    with warnings.catch_warnings():  # a class with fewer patients than splits: some splits lack it, as intended
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splitter = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
        fit, val = next(splitter.split(np.zeros(len(train)), labels[train], groups))
    return train[fit], train[val]


class Bags:
    """The cohort's bag features by slide index, kept in memory up to ``budget`` bytes (read again beyond)."""

    def __init__(self, paths: list[Path], *, budget: int = CACHE_BYTES) -> None:
        self.paths, self.budget, self.used = paths, budget, 0
        self.cache: dict[int, np.ndarray] = {}

    def features(self, i: int) -> np.ndarray:
        if i in self.cache:
            return self.cache[i]
        feats = _read_bag(self.paths[i])[0]
        if self.used + feats.nbytes <= self.budget:
            self.cache[i] = feats
            self.used += feats.nbytes
        return feats

    def coords(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(coords (N, 2), attributes) of slide ``i``'s bag."""
        _, _, coords, attrs = _open_bag(self.paths[i], features=False)
        return coords, attrs


__all__ = ["BAG_SUFFIX", "Bags", "Cohort", "patient_folds", "read_cohort", "validation_split"]
