"""The journal of a sharding job: which shards are final and which units they complete.

Every worker slot (rank r, worker w) writes its own shards ``<kind>-r<r>-w<w>-<index>.tar``
and appends to its own ``.sslkit-shard/journal-r<r>-w<w>.jsonl``, one JSON record a line,
flushed to disk before the next step:

    {"type": "shard", "name": ..., "samples": n, "bytes": ..., "sha256": ...,
     "units": {unit_id: samples of that unit in this shard}, "labels": {"2": n}, "image": {...}}
    {"type": "unit", "id": ..., "path": ..., "status": "done" | "failed", "samples": n,
     "info": {...}, "failed": [{"source", "reason"}], "reason": "..." (when failed)}

A shard record is appended only after the shard was renamed into place, and a unit record
only after every shard holding its samples is final. Units yield samples in a fixed order,
so the samples of a unit in final shards are always its first ``final[unit]``: a re-run
skips units recorded as done and restarts the others at that index. Whatever a killed
process left (a ``.tmp`` shard, a renamed shard it had no time to journal, half a line) is
not in the journal and is ignored or removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sslkit.errors import ConfigError
from sslkit.shardformat import merge_image_info
from sslkit.sharding.core.source import Sample, Unit
from sslkit.sharding.core.writer import ShardFiles, encode_sample

JOURNAL_DIR = ".sslkit-shard"
_SHARD_NAME = re.compile(r"(?P<stem>.+-r\d{3,}-w\d{2,})-(?P<index>\d{6,})\.tar")


def slot_stem(kind: str, rank: int, slot: int) -> str:
    return f"{kind}-r{rank:03d}-w{slot:02d}"


def journal_path(out_dir: str | Path, rank: int, slot: int) -> Path:
    return Path(out_dir) / JOURNAL_DIR / f"journal-r{rank:03d}-w{slot:02d}.jsonl"


class Journal:
    """Append-only JSON-lines file; each record is written through to the OS before ``append`` returns.

    Flushed, not fsynced: a killed process loses nothing that was appended. A machine that
    loses power may lose the last records; their shards then count as orphans (removed) and
    their units are done again, so nothing is duplicated. Shards are fsynced before rename.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        _drop_partial_line(path)
        self._file = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a killed writer left without its newline, so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_journal(path: Path, *, offset: int = 0) -> list[dict]:
    """The records of one journal (from byte ``offset``); a line cut short by a kill is dropped."""
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # only the last line can be partial: it was being written when the process died
    return records


@dataclass
class JobState:
    """What the journals of all ranks and slots say is final."""

    shards: dict[str, dict] = field(default_factory=dict)  # shard name -> shard record
    final: dict[str, int] = field(default_factory=dict)  # unit id -> its samples in final shards
    units: dict[str, dict] = field(default_factory=dict)  # unit id -> latest unit record
    next_index: dict[str, int] = field(default_factory=dict)  # slot stem -> next shard index

    def add(self, record: dict) -> None:
        """Take one journal record into account (a shard seen before is not counted twice)."""
        if record.get("type") == "shard":
            if record["name"] in self.shards:
                return
            self.shards[record["name"]] = record
            for unit, n in record["units"].items():
                self.final[unit] = self.final.get(unit, 0) + int(n)
            match = _SHARD_NAME.fullmatch(record["name"])
            if match:
                stem, index = match["stem"], int(match["index"])
                self.next_index[stem] = max(self.next_index.get(stem, 0), index + 1)
        elif record.get("type") == "unit":
            self.units[record["id"]] = record

    def done(self, unit_id: str) -> bool:
        return self.units.get(unit_id, {}).get("status") == "done"


def load_state(out_dir: str | Path) -> JobState:
    """Merge every journal in ``out_dir`` and check that the shards they name are on disk.

    Raises:
        ConfigError: a journaled shard is missing or has another size (deleted or damaged by hand).
    """
    state = JobState()
    for path in sorted((Path(out_dir) / JOURNAL_DIR).glob("journal-*.jsonl")):
        for record in read_journal(path):
            state.add(record)
    for name, record in state.shards.items():
        file = Path(out_dir) / name
        if not file.is_file() or file.stat().st_size != record["bytes"]:
            raise ConfigError(
                f"Shard {file} is recorded as finished but is missing or changed on disk; delete "
                f"{out_dir} (or move it away) and run the command again to shard from scratch."
            )
    return state


def stale_files(out_dir: Path, prefix: str, state: JobState) -> list[Path]:
    """Files named ``{prefix}*`` that are ``.tmp`` shards or shards no journal names (left by a dead writer).

    ``prefix`` is a rank's (``<kind>-r000-w``) or one worker slot's (``slot_stem(...)``).
    """
    return [path for path in out_dir.glob(f"{prefix}*")
            if path.name.endswith(".tmp") or (_SHARD_NAME.fullmatch(path.name) and path.name not in state.shards)]


class SlotWriter:
    """One worker slot's rolling shards and journal; units pass through it one at a time.

    ``emit(record)`` sees every journal record after it is on disk (the runner's progress
    and crash recovery use it).
    """

    def __init__(self, out_dir: Path, *, kind: str, rank: int, slot: int, start_index: int,
                 maxcount: int, encode: str, quality: int, num_classes: Optional[int],
                 emit: Callable[[dict], None]) -> None:
        self.encode, self.quality, self.num_classes, self.emit = encode, quality, num_classes, emit
        self.journal = Journal(journal_path(out_dir, rank, slot))
        self.files = ShardFiles(out_dir, stem=slot_stem(kind, rank, slot), maxcount=maxcount,
                                start_index=start_index, on_shard=self._on_shard)
        self._in_shard: dict[str, int] = {}  # unit id -> its samples in the open shard
        self._labels: dict[str, int] = {}
        self._image: Optional[dict] = None
        self._pending: list[dict] = []  # unit records waiting for the open shard to be final
        self._unit: Optional[Unit] = None
        self._written = 0
        self._keys: set[str] = set()

    def begin(self, unit: Unit) -> None:
        self._unit, self._written, self._keys = unit, 0, set()

    def write(self, sample: Sample) -> None:
        """Encode and add one sample of the current unit (ValueError on a bad key, label or image)."""
        key = sample.key
        if key in self._keys:
            raise ValueError(f"the source yielded sample key {key!r} twice")
        fields, label, info = encode_sample(key, sample.image, label=sample.label, meta=sample.meta,
                                            fmt=self.encode, quality=self.quality, num_classes=self.num_classes)
        self._keys.add(key)
        unit_id = self._unit.id
        self._in_shard[unit_id] = self._in_shard.get(unit_id, 0) + 1
        if label is not None:
            self._labels[str(label)] = self._labels.get(str(label), 0) + 1
        self._image = merge_image_info(self._image, info)
        self._written += 1
        self.files.add(key, fields)  # may finish the shard: _on_shard journals it

    def end(self, *, skipped: int, status: str, info: dict, failed: list[dict],
            reason: Optional[str] = None) -> None:
        """Close the current unit: journal it now, or once the shard holding its last samples is final."""
        unit = self._unit
        record = {"type": "unit", "id": unit.id, "path": unit.path, "status": status,
                  "samples": skipped + self._written, "info": info, "failed": failed}
        if reason is not None:
            record["reason"] = reason
        if unit.id in self._in_shard:
            self._pending.append(record)
        else:
            self._journal(record)
        self._unit = None

    def close(self) -> None:
        self.files.finish()
        for record in self._pending:  # nothing open any more (also when no shard was)
            self._journal(record)
        self._pending = []
        self.journal.close()

    def _on_shard(self, entry: dict) -> None:
        record = dict(entry, type="shard", units=self._in_shard, labels=self._labels, image=self._image)
        self._in_shard, self._labels, self._image = {}, {}, None
        self._journal(record)
        pending, self._pending = self._pending, []
        for unit_record in pending:
            self._journal(unit_record)

    def _journal(self, record: dict) -> None:
        self.journal.append(record)
        self.emit(record)
