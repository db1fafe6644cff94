"""Group-wise splits: every item of one group (a source image, a patient, a slide, a metaphase)
lands in one split, so a train and a test set never share one.

Groups are ordered by sha256(seed, group) and each goes to the split in whose share of the
running item count its middle item falls: the assignment depends only on the groups (names and
sizes), the fractions and the seed, never on the order the files were listed in.

``sslkit shard folder`` splits its planned images; ``sslkit shard cells`` (``shard_split``) splits
a source's units (one tile or image each), grouped by ``--group-regex`` on the unit's path
relative to the input folder, else one group per unit. ``OUT/<split>/`` is then a complete
shard set per split and ``OUT/splits.json`` records the fractions, counts and the group ->
split map.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sslkit.atomic import write_json
from sslkit.errors import UsageError
from sslkit.sharding.core.source import Progress, Sample, Source, Unit

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def split_groups(sizes: dict[str, int], fractions: Sequence[float], *, seed: int) -> dict[str, int]:
    """Group -> split index. Groups in sha256(seed, group) order fill the splits in turn: a group
    goes to the split whose cumulative item target its middle item falls under."""
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}\0{g}".encode("utf-8", "surrogateescape")).digest())
    bounds = list(np.cumsum(fractions) / np.sum(fractions) * sum(sizes.values()))
    out, running = {}, 0
    for group in order:
        out[group] = min(bisect.bisect_right(bounds, running + sizes[group] / 2), len(bounds) - 1)
        running += sizes[group]
    return out


def check_split(fractions: Sequence[float], names: Sequence[str]) -> None:
    """Raise UsageError unless ``fractions`` are positive and add up to 1, with one distinct safe name each."""
    if len(names) != len(fractions) or len(set(names)) != len(names) or not all(_NAME.match(n) for n in names):
        raise UsageError(f"--split-names {','.join(names)} must be {len(fractions)} distinct names of "
                          "letters, digits, '-' or '_', one per --split fraction.")
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UsageError(f"--split {','.join(map(str, fractions))} must be positive fractions that add up "
                          "to 1, e.g. 0.8,0.1,0.1.")


def default_names(count: int) -> list[str]:
    return ["train", "val", "test"] if count == 3 else ["train", "val"] if count == 2 else \
        [f"split{i}" for i in range(count)]


def list_arg(text: Optional[str]) -> Optional[list[str]]:
    """'a, b,,c' -> ['a', 'b', 'c']; None stays None."""
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def add_split_args(parser: argparse.ArgumentParser, *, group_help: str) -> None:
    """``--split``, ``--split-names``, ``--seed`` and ``--group-regex``."""
    parser.add_argument("--split", help="group-wise split fractions, e.g. 0.8,0.1,0.1")
    parser.add_argument("--split-names", help="folder names of the splits (default train,val,test for three "
                        "fractions, train,val for two, split0,split1,... otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the group-wise split (default 0)")
    parser.add_argument("--group-regex", help=group_help)


def split_from_args(args: argparse.Namespace) -> tuple[Optional[list[float]], Optional[list[str]]]:
    """(fractions, names) from ``--split`` and ``--split-names``; (None, None) without ``--split``."""
    if args.split is None:
        if args.split_names:
            raise UsageError("--split-names needs --split (the fractions); add it or drop --split-names.")
        return None, None
    try:
        fractions = [float(f) for f in list_arg(args.split)]
    except ValueError:
        raise UsageError(f"--split {args.split} must be comma-separated fractions such as 0.8,0.1,0.1.") from None
    names = list_arg(args.split_names) or default_names(len(fractions))
    check_split(fractions, names)
    return fractions, names


def capture(regex: re.Pattern, text: str, name: str = "group") -> Optional[str]:
    """The group called ``name``, else the first group, else the whole match; None without a match."""
    match = regex.search(text)
    if match is None:
        return None
    return match.group(name if name in regex.groupindex else 1 if regex.groups else 0) or None


def compile_regex(pattern: Optional[str], flag: str) -> Optional[re.Pattern]:
    try:
        return None if pattern is None else re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{flag} {pattern!r} is not a valid regular expression ({exc}); fix the pattern.") from None


# ---------------------------------------------------------------- splitting a source's units


class SplitSource:
    """``source`` restricted to the units of one split; the split is part of its settings, so a folder
    sharded with other split settings is refused. Failures found while listing go to the first split."""

    def __init__(self, source: Source, *, keep: set[str], split: dict[str, Any], first: bool) -> None:
        self.source, self.keep, self.split, self.first = source, frozenset(keep), split, first
        self.kind, self.classes, self.encode = source.kind, source.classes, source.encode
        self.quality, self.handles_skip = source.quality, source.handles_skip
        self.unit_noun = getattr(source, "unit_noun", "unit")
        self.sample_noun = getattr(source, "sample_noun", "sample")
        self.preload = (type(source).__module__, *getattr(source, "preload", ()))

    @property
    def failed(self) -> list[dict[str, str]]:
        return list(getattr(self.source, "failed", None) or []) if self.first else []

    def params(self) -> dict:
        return {**self.source.params(), "split": self.split}

    def units(self) -> list[Unit]:
        return [unit for unit in self.source.units() if unit.id in self.keep]

    def produce(self, unit: Unit, *, skip: int, progress: Progress) -> Iterator[Sample]:
        return self.source.produce(unit, skip=skip, progress=progress)


def unit_groups(units: list[Unit], *, root: Optional[Path], group_regex: Optional[str]) -> dict[str, str]:
    """Unit id -> group: ``group_regex`` on the unit's path relative to ``root`` ('/'-separated), else the
    unit itself. A unit the regex does not match is an error naming it (every unit needs a group)."""
    regex = compile_regex(group_regex, "--group-regex")
    groups = {}
    for unit in units:
        path = Path(unit.path)
        rel = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else unit.path
        group = unit.id if regex is None else capture(regex, rel)
        if group is None:
            raise UsageError(f"--group-regex '{group_regex}' does not match '{rel}'; every input needs a group "
                              "(the patient, slide or source image it belongs to): fix the pattern.")
        groups[unit.id] = group
    return groups


def assign_units(groups: dict[str, str], *, fractions: Sequence[float], names: Sequence[str], seed: int = 0,
                 noun: str = "unit") -> dict[str, set[str]]:
    """Split name -> the unit ids in it, whole groups at a time (``groups``: unit id -> group); a split
    that would be empty is a UsageError."""
    check_split(fractions, names)
    sizes = Counter(groups.values())
    where = split_groups(sizes, fractions, seed=seed)
    keep: dict[str, set[str]] = {name: set() for name in names}
    for unit_id, group in groups.items():
        keep[names[where[group]]].add(unit_id)
    empty = [name for name in names if not keep[name]]
    if empty:
        raise UsageError(f"Split {empty[0]!r} would get no {noun}s ({len(sizes)} groups in all); use fewer splits, "
                          "larger fractions or a --group-regex that makes more groups.")
    return keep


def shard_split(source: Source, out: str | Path, *, fractions: Sequence[float], names: Sequence[str], seed: int = 0,
                group_regex: Optional[str] = None, **run_kwargs: Any) -> dict[str, dict]:
    """Shard ``source`` into ``OUT/<name>`` per split, by group; returns {out folder: run_source summary}.

    ``OUT/splits.json`` is written after every split ran, so a refused run leaves it as it was."""
    from sslkit.sharding.core.runner import run_source

    out, units, noun = Path(out), source.units(), getattr(source, "unit_noun", "unit")
    groups = unit_groups(units, root=getattr(source, "root", None), group_regex=group_regex)
    keep = assign_units(groups, fractions=fractions, names=names, seed=seed, noun=noun)
    split_of = {groups[unit_id]: name for name, ids in keep.items() for unit_id in ids}
    group_counts = Counter(split_of.values())
    print(f"{len(units)} {noun}s in {len(split_of)} groups (" + (f"--group-regex '{group_regex}'" if group_regex else
          f"each {noun} its own group") + "): " + ", ".join(f"{n} {len(keep[n])} {noun}s / {group_counts[n]} groups"
                                                           for n in names), flush=True)
    settings = {"fractions": dict(zip(names, fractions)), "seed": seed, "group_regex": group_regex}
    summaries = {}
    for i, name in enumerate(names):
        part = SplitSource(source, keep=keep[name], split={"name": name, **settings}, first=i == 0)
        summaries[str(out / name)] = run_source(part, out / name, **run_kwargs)
    audit = {**settings, "group_source": "regex" if group_regex else "unit",
             f"{noun}s": {n: len(keep[n]) for n in names}, "groups": {n: group_counts[n] for n in names},
             "group_to_split": dict(sorted(split_of.items()))}
    write_json(out / "splits.json", audit)
    return summaries


__all__ = ["split_groups", "check_split", "default_names", "add_split_args", "split_from_args", "SplitSource",
           "unit_groups", "assign_units", "shard_split"]
