"""What a collection must provide to be sharded: units of work that yield samples.

A *source* (a set of slides, tiles with instance maps, an image folder) is cut into
*units*: pieces that one worker shards as a whole (a slide, a tile and its annotation,
a run of image files). ``sslkit.sharding.core.runner`` partitions units over ranks, hands
them to worker processes, writes what they yield into shards and records in a journal
which units are final, so a re-run skips them.

    class MySource:
        kind = "folder"                  # shard prefix and manifest "kind"
        classes = ["a", "b"]             # label index -> name, or None without labels
        encode, quality = "png", 95      # how images are stored in the tars
        handles_skip = False             # True: produce() itself starts at sample `skip`
        unit_noun, sample_noun = "image", "crop"  # optional: words for progress bars and the summary
        preload = ("scipy.ndimage",)     # optional: modules worker processes should import up front
        def params(self) -> dict: ...    # JSON; a re-run into the same folder must match
        def units(self) -> list[Unit]: ...            # parent process, deterministic order
        def produce(self, unit, *, skip, progress): ...  # worker: yields Samples in a fixed order

Sources are pickled to spawned worker processes, so they hold plain data (paths,
numbers, lists), never open files. A unit must yield its samples in the same order every
time: on resume the runner asks for them from index ``skip`` on (the first ``skip`` are
already in final shards). With ``handles_skip = False`` the runner drops them itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_id(text: str) -> str:
    """``text`` with every run of characters outside [A-Za-z0-9_-] replaced by '_'.

    Sample keys may not hold '.', and WebDataset splits keys on it; slide and file names
    (``97002341.12``, ``TCGA-A1 (copy).svs``) go through this before becoming keys.
    """
    return _UNSAFE.sub("_", text).strip("_") or "_"


def unique_ids(ids: list[str]) -> list[str]:
    """``ids`` with later repeats renamed ``<id>-2``, ``<id>-3``, ... (never a name already in the list)."""
    out, used, first = list(ids), set(ids), set()
    for i, name in enumerate(ids):
        if name in first:
            n = 2
            while f"{name}-{n}" in used:
                n += 1
            out[i] = f"{name}-{n}"
            used.add(out[i])
        first.add(name)
    return out


_NATURAL = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: 'clase2' < 'clase10', 'a9b' < 'a10a'."""
    parts = _NATURAL.split(text)
    return tuple((1, int(p), "") if i % 2 else (0, 0, p.lower()) for i, p in enumerate(parts)), text


class UnitError(Exception):
    """A unit that cannot be sharded; the message names the file and the reason (and a fix)."""


@dataclass(frozen=True)
class Unit:
    """One piece of work: sharded whole by one worker, journaled as done or failed."""

    id: str  # unique in the job and stable across runs; [A-Za-z0-9_-] (safe_id)
    path: str  # what a person looks for when it fails: the file (or the first of several)
    cost: float = 1.0  # relative work (file bytes, image count), for balancing ranks
    payload: Any = None  # picklable data the producer needs (annotation path, labels, ...)


@dataclass
class Sample:
    """One image and what is known about it.

    ``image`` is (H, W, 3) RGB or (H, W) grayscale uint8; ``label`` an index into the
    source's ``classes``; ``meta`` JSON-serialisable, stored as ``<key>.json``.
    """

    key: str
    image: np.ndarray
    label: Optional[int] = None
    meta: dict = field(default_factory=dict)


class Progress:
    """What a producer tells the runner about the unit it is working on.

    ``total(n)``: the unit will yield ``n`` samples (sizes the per-unit progress bar).
    ``info(**kv)``: facts about the unit, kept in the manifest's ``sources`` entry
    (level, mpp, tissue fraction, clipped boxes, a note such as "no tissue").
    ``fail(path, reason)``: one item inside the unit could not be read (an image that does
    not decode); it is listed under the manifest's ``failed`` and the unit goes on.
    ``advance(n)``: ``n`` more items done that yielded no sample (moves the bar).
    """

    def __init__(self, send: Optional[Callable[[str, Any], None]] = None) -> None:
        self._send = send or (lambda kind, value: None)
        self.details: dict[str, Any] = {}
        self.failed: list[dict[str, str]] = []

    def total(self, n: int) -> None:
        self._send("total", int(n))

    def advance(self, n: int = 1) -> None:
        self._send("advance", int(n))

    def info(self, **kv: Any) -> None:
        self.details.update(kv)

    def fail(self, path: str, reason: str) -> None:
        self.failed.append({"source": str(path), "reason": str(reason)})


class Source(Protocol):
    kind: str
    classes: Optional[list[str]]
    encode: str
    quality: int
    handles_skip: bool

    def params(self) -> dict: ...

    def units(self) -> list[Unit]: ...

    def produce(self, unit: Unit, *, skip: int, progress: Progress) -> Iterator[Sample]: ...


__all__ = ["Unit", "Sample", "Progress", "Source", "UnitError", "safe_id", "unique_ids"]
