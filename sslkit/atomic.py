"""Atomic file writes: readers see the old file or the new one, never half of one.

Every writer in sslkit that leaves a file behind (checkpoint state, manifests, metrics,
plots, reports, predictions, exports, tissue masks) goes through :func:`replacing`: the
content is written to a temporary file beside the target, optionally fsynced, then renamed
over it with ``os.replace`` (atomic on POSIX and Windows within one file system). A writer
that fails or is killed leaves the target as it was, and the temporary file is removed.

    with replacing(out / "embeddings.npy") as tmp:
        np.save(tmp, feats)
    write_json(out / "metrics.json", results)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process, ending in ``path``'s suffix (so
    writers that choose a format by suffix, such as ``np.save`` or timm's loader, still work)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def replacing(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces ``path`` (after an fsync of
    the file when ``fsync``). On an exception ``path`` is untouched and the temporary removed.
    The parent folder is created when missing."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # gone after os.replace; left only by a failed writer


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    with replacing(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    with replacing(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, *, indent: int = 1, fsync: bool = False) -> Path:
    """``obj`` as indented JSON (one trailing newline), atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n", fsync=fsync)


__all__ = ["replacing", "temporary_name", "write_bytes", "write_text", "write_json"]
