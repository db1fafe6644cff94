"""Planning an image-folder import: which files, which labels and groups, which split.

Nothing is decoded here; ``sslkit.sharding.folder.command`` turns a plan into shards.

    sslkit shard folder data/chromosomes --out shards/chrom --size 64 --channels 1 \\
        --label-regex 'clase(\\d+)' --group-regex '^([^/]+)/' --split 0.8,0.1,0.1

Labels come from one source, first that applies: ``--label-regex`` on the relative path
(``/``-separated; the group named ``label``, else the first group, else the whole
match), the CSV's label column (``path,label[,group]``; paths relative to ROOT or to
the CSV; a first row whose path is neither a file nor an image name is a header), or
the class sub-folder (the first path component below ROOT). Groups (patient, case,
metaphase) come from ``--group-regex`` (named group ``group``, same rules) or the CSV's
third column; without either every image is its own group.

Classes are label names in natural order (``clase2`` < ``clase10``); a label's index is
its position. ``--classes`` fixes the set and the order: other labels are unexpected.
Without it a label is a stray, not a class, when it has fewer than ``--min-class-count``
images (default 5) *and* fewer than a tenth of the median count of the labels that have
at least that many (the 24-class chromosome set has one image labelled ``clase25``; a
tiny balanced folder has no strays). Images of unexpected or stray labels,
paths the regexes do not match and CSV rows naming missing files are not written; they
are printed and listed under the manifest's ``failed`` (of the first split).

Splits go by group, never by image (``sslkit.sharding.core.splits``): ``OUT/<split>/`` is a
complete shard set per split; ``OUT/splits.json`` holds fractions, counts and the group ->
split map.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sslkit.errors import ConfigError, MissingInput, UsageError
from sslkit.sharding.core.imaging import IMAGE_EXTENSIONS
from sslkit.sharding.core.source import natural_key, safe_id, unique_ids
from sslkit.sharding.core.splits import capture, check_split, compile_regex, split_groups

Item = tuple[str, str, str, str]  # (relative path, sample key, label name or "", group)


@dataclass
class FolderPlan:
    """What will be sharded: the accepted items, the classes, what was refused and why."""

    root: str  # absolute
    items: list[Item]  # in path order (folder walk) or row order (CSV)
    classes: Optional[list[str]]
    failed: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # how labels/groups/split were made


def walk_images(root: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[str], Counter, list]:
    """Relative '/'-paths of image files under ``root`` (sorted), other suffixes counted, unlistable folders.

    One ``os.scandir`` per folder and no per-file stat; names starting with '.' are skipped
    (``.DS_Store``, macOS ``._x.png`` forks); symlinked folders are followed unless they
    point back inside ``root`` (a cycle or a duplicate).
    """
    allowed = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    real_root = os.path.realpath(root)
    files, skipped, failed, stack, seen = [], Counter(), [], [""], set()
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir)) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    if entry.is_dir():
                        if entry.is_symlink():
                            real = os.path.realpath(entry.path)
                            if real in seen or real == real_root or real.startswith(real_root + os.sep):
                                continue
                            seen.add(real)
                        stack.append(rel)
                    else:
                        suffix = os.path.splitext(entry.name)[1].lower()
                        if suffix in allowed:
                            files.append(rel)
                        else:
                            skipped[suffix or "(no suffix)"] += 1
        except OSError as exc:
            failed.append({"source": os.path.join(root, rel_dir),
                           "reason": f"folder cannot be listed ({exc.strerror}); fix its permissions"})
    files.sort()
    return files, skipped, failed


def read_csv_list(csv_path: str, root: str) -> tuple[list[tuple[str, str, Optional[str]]], list[dict]]:
    """Rows ``(relative path, label, group or None)`` of a ``path,label[,group]`` file, and refused rows.

    A path is looked up under ``root`` first, then beside the CSV (one or two stats per row).
    Raises ConfigError when the file is not UTF-8 text or not CSV.
    """
    base = os.path.dirname(os.path.abspath(csv_path))
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            sample = handle.read(65536)
            handle.seek(0)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            rows = [(n, r) for n, r in enumerate(csv.reader(handle, dialect), 1) if r and r[0].strip()
                    and not r[0].lstrip().startswith("#")]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"CSV file {csv_path} cannot be read as UTF-8 path,label[,group] rows ({exc}); "
                          "save it as UTF-8 CSV text or give another --csv.") from None
    out, failed, seen = [], [], set()
    for index, (line, row) in enumerate(rows):
        cells = [c.strip() for c in row] + ["", ""]
        found = next((os.path.join(b, cells[0]) for b in (root, base)
                      if os.path.isfile(os.path.join(b, cells[0]))), None)
        where = f"{csv_path}:{line}"
        if found is None:
            if index == 0 and not cells[0].lower().endswith(IMAGE_EXTENSIONS):
                continue  # a header row
            failed.append({"source": f"{where} ({cells[0]})",
                           "reason": "names a file that exists neither under ROOT nor beside the CSV; "
                                     "fix the path or drop the row"})
            continue
        rel = Path(os.path.relpath(found, root)).as_posix()
        if rel in seen:
            failed.append({"source": f"{where} ({cells[0]})",
                           "reason": "lists a file a second time; keep one row per file"})
            continue
        seen.add(rel)
        out.append((rel, cells[1], (cells[2] or None) if len(row) > 2 else None))
    return out, failed


def _choose_classes(counts: Counter, classes: Optional[Sequence[str]], min_count: int) -> tuple[list, dict]:
    """The class list and, for every label that is not a class, the reason (with the fix)."""
    if classes is not None:
        fix = "add it to --classes (or --classes-file) or remove those files"
        return list(classes), {k: f"label {k!r} is not in --classes; {fix}" for k in counts if k not in classes}
    common = [n for n in counts.values() if n >= min_count]
    median = float(np.median(common)) if common else 0.0
    rare = {k for k, n in counts.items() if n < min_count and n < 0.1 * median}
    reasons = {k: f"label {k!r} has only {counts[k]} image(s), fewer than --min-class-count {min_count} and a "
                  f"tenth of the median class ({median:g}), so it is not made a class; name it in --classes or "
                  f"pass --min-class-count 1 to keep it" for k in rare}
    return sorted((k for k in counts if k not in rare), key=natural_key), reasons


def assign_keys(paths: Sequence[str]) -> list[str]:
    """Unique sample keys: safe_id of each path without its suffix; later clashes get '-2', '-3', ..."""
    return unique_ids([safe_id(os.path.splitext(p)[0]) for p in paths])


def _label_rows(rows: list[tuple[str, str, Optional[str]]], root: str, *, label_re: Optional[re.Pattern],
                group_re: Optional[re.Pattern], unlabeled: bool, csv_path: Optional[str]) -> tuple[list, list]:
    """(relative path, label, group) of every row that can be labelled and grouped, and refusals."""
    accepted, failed, interned = [], [], {}
    for rel, label, group in rows:
        problem = None
        if unlabeled:
            label = ""
        elif label_re is not None:
            label = capture(label_re, rel, "label")
            problem = None if label else f"path does not match --label-regex {label_re.pattern!r}"
        elif not label:
            problem = "has no label in the CSV" if csv_path else "is not inside a class sub-folder"
        if group_re is not None and problem is None:
            group = capture(group_re, rel)
            problem = None if group else f"path does not match --group-regex {group_re.pattern!r}"
        if problem:
            failed.append({"source": os.path.join(root, rel),
                           "reason": f"{problem}; fix --label-regex / --group-regex / --csv or move the file"})
        else:  # one string object per distinct label and group: a million rows share them
            group = group or rel
            accepted.append((rel, interned.setdefault(label, label), interned.setdefault(group, group)))
    return accepted, failed


def plan_folder(root: str | Path, *, csv_path: Optional[str] = None, label_regex: Optional[str] = None,
                group_regex: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                min_class_count: int = 5, unlabeled: bool = False,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> FolderPlan:
    """Find the images under ``root``, label and group them, choose the classes (nothing is decoded)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise MissingInput(f"Image folder {root} does not exist; give the folder that holds the images.")
    if unlabeled and (label_regex or classes):
        raise UsageError("--unlabeled cannot be combined with --label-regex or --classes; drop one of them.")
    if classes is not None and len(set(classes)) != len(classes):
        raise UsageError("--classes names a class twice; list each class once.")
    label_re, group_re = compile_regex(label_regex, "--label-regex"), compile_regex(group_regex, "--group-regex")
    notes: list[str] = []
    if csv_path is not None:
        if not os.path.isfile(csv_path):
            raise MissingInput(f"CSV file {csv_path} does not exist; give the path,label[,group] list.")
        rows, failed = read_csv_list(csv_path, root)
    else:
        files, skipped, failed = walk_images(root, extensions=extensions)
        rows = [(rel, rel.split("/", 1)[0] if "/" in rel else "", None) for rel in files]
        if skipped:
            notes.append("skipped files with other suffixes: " + ", ".join(f"{k} ({n})" for k, n in skipped.items()))
    accepted, refused_rows = _label_rows(rows, root, label_re=label_re, group_re=group_re, unlabeled=unlabeled,
                                         csv_path=csv_path)
    failed += refused_rows
    if not accepted:
        raise UsageError(f"No image under {root} could be labelled ({len(failed)} refused); "
                          "check --label-regex, --csv or the class sub-folders.")
    counts = Counter(label for _, label, _ in accepted)
    chosen, refused = (None, {}) if unlabeled else _choose_classes(counts, classes, min_class_count)
    failed += [{"source": os.path.join(root, rel), "reason": refused[label]}
               for rel, label, _ in accepted if label in refused]
    notes += [f"class {c!r} has no images" for c in chosen or [] if c not in counts]
    kept = [a for a in accepted if a[1] not in refused]
    items = [(rel, key, label, group) for (rel, label, group), key in zip(kept, assign_keys([a[0] for a in kept]))]
    settings = {"label_source": "none" if unlabeled else "regex" if label_re else "csv" if csv_path else "folders",
                "label_regex": label_regex, "group_regex": group_regex, "csv": csv_path and os.path.abspath(csv_path),
                "group_source": "regex" if group_re else "csv" if any(r[2] for r in rows) else "none",
                "min_class_count": min_class_count}
    return FolderPlan(root, items, chosen, failed, notes, settings)


def split_plan(plan: FolderPlan, *, fractions: Sequence[float], names: Sequence[str],
               seed: int = 0) -> tuple[dict[str, FolderPlan], dict[str, Any]]:
    """One sub-plan per split (planning failures go to the first) and the audit record for splits.json."""
    check_split(fractions, names)
    sizes = Counter(item[3] for item in plan.items)
    where = split_groups(sizes, fractions, seed=seed)
    parts = {name: replace(plan, items=[], failed=[] if i else list(plan.failed), notes=[],
                           settings={**plan.settings, "split": name, "fractions": list(fractions), "seed": seed})
             for i, name in enumerate(names)}
    for item in plan.items:
        parts[names[where[item[3]]]].items.append(item)
    empty = [n for n, p in parts.items() if not p.items]
    if empty:
        raise UsageError(f"Split {empty[0]!r} would get no images ({len(sizes)} groups in all); "
                          "use fewer splits or larger fractions.")
    audit = {"seed": seed, "fractions": dict(zip(names, fractions)),
             "group_source": plan.settings.get("group_source"),
             "images": {n: len(p.items) for n, p in parts.items()},
             "groups": {n: len({it[3] for it in p.items}) for n, p in parts.items()},
             "classes": {n: dict(sorted(Counter(it[2] for it in p.items).items(), key=lambda kv: natural_key(kv[0])))
                         for n, p in parts.items()},
             "group_to_split": {g: names[where[g]] for g in sorted(where, key=natural_key)},
             "failed": plan.failed}
    return parts, audit


def report_lines(plan: FolderPlan, audit: Optional[dict] = None) -> list[str]:
    """What a person should read before trusting the shards: classes, groups, refusals, splits."""
    counts = Counter(item[2] for item in plan.items)
    names = plan.classes or []
    lines = [f"{len(plan.items)} images under {plan.root}; " + (
        "unlabelled." if plan.classes is None else f"labels from {plan.settings['label_source']}, {len(names)} "
        "classes: " + ", ".join(f"{c} ({counts.get(c, 0)})" for c in names))]
    if plan.settings["group_source"] == "none":
        lines.append("no --group-regex or CSV group column: every image is its own group, so images of one "
                     "patient or case may land in different splits.")
    else:
        lines.append(f"{len({item[3] for item in plan.items})} groups from {plan.settings['group_source']}.")
    lines += plan.notes
    reasons, examples = Counter(), {}
    for f in plan.failed:
        reasons[f["reason"]] += 1
        examples.setdefault(f["reason"], f["source"])
    for reason, n in reasons.most_common():
        lines.append(f"NOT WRITTEN: {n} file(s): {reason} (e.g. {examples[reason]})")
    for name, n in (audit or {}).get("images", {}).items():
        lines.append(f"split {name}: {n} images in {audit['groups'][name]} groups")
    return lines
