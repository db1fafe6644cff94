"""Atomic WebDataset shard-set writer: ``out_dir/{prefix}-{i:06d}.tar`` + ``manifest.json``.

Each shard is written as ``<name>.tmp`` and renamed once complete; the manifest is
written last (tmp file + ``os.replace``), so a folder with a manifest always holds a
complete, consistent shard set. A sample in a tar is::

    <key>.png    PNG bytes (RGB for 3 channels, L for grayscale)
    <key>.cls    the integer label as ASCII text (only when a label is given)
    <key>.json   meta dict, plus "source" when given (only when either is given)

    with ShardSetWriter("shards/demo", prefix="demo", maxcount=1000, classes=names) as w:
        w.write("demo-0000000", image, label=2, meta={"index": 0})
    manifest = w.manifest  # also returned by close()

Writing into a folder that already holds a shard set replaces it: the old manifest is
removed at once, and old ``{prefix}-*.tar`` files that the new set did not overwrite are
removed on close. On an exception inside ``with`` the partial shard is removed, finished
shards are kept, and no manifest is written (so readers refuse the folder).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import webdataset as wds
from PIL import Image

from sslkit.sharding.manifest import FORMAT, MANIFEST_NAME, sha256_file


def _sslkit_version() -> str:
    try:
        return importlib.metadata.version("sslkit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) RGB, (H, W, 1) or (H, W) grayscale uint8 array."""
    if image.dtype != np.uint8:
        raise ValueError(
            f"Images must be uint8, got {image.dtype}; convert with np.clip(x, 0, 255).astype(np.uint8)."
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        mode = "L"
    elif image.ndim == 3 and image.shape[2] == 3:
        mode = "RGB"
    else:
        raise ValueError(f"Images must be (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}.")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


class ShardSetWriter:
    """Write samples to ``out_dir/{prefix}-{i:06d}.tar`` (at most ``maxcount`` per shard)."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        prefix: str = "shard",
        maxcount: int = 1000,
        classes: list[str] | None = None,
        params: dict | None = None,
        command: str | None = None,
    ) -> None:
        if maxcount <= 0:
            raise ValueError(f"maxcount must be a positive number of samples per shard, got {maxcount}.")
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"Shard prefix {prefix!r} must be a non-empty name without '/' or '.'.")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.maxcount = prefix, maxcount
        self.classes = list(classes) if classes is not None else None
        self.params = dict(params or {})
        self.command = command if command is not None else shlex.join(sys.argv)
        self.manifest: dict[str, Any] | None = None
        self._shards: list[dict[str, Any]] = []
        self._file: BinaryIO | None = None
        self._tar: wds.TarWriter | None = None
        self._in_shard = 0
        self._keys: set[str] = set()
        self._class_counts: dict[str, int] = {}
        self._sources: dict[str, None] = {}  # insertion-ordered set
        self._failures: list[dict[str, str]] = []
        self._image: dict[str, Any] | None = None
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the old set is no longer valid

    # ---- samples -------------------------------------------------------------------
    def write(
        self,
        key: str,
        image: np.ndarray,
        *,
        label: int | None = None,
        meta: dict | None = None,
        source: str | None = None,
    ) -> None:
        """Add one sample; ``image`` is (H, W, C) or (H, W) uint8."""
        if self.manifest is not None:
            raise RuntimeError(f"ShardSetWriter for {self.out_dir} is closed; open a new one to write more.")
        sample = self._encode(key, image, label=label, meta=meta, source=source)
        if self._tar is None:
            self._open_shard()
        self._tar.write(sample)
        self._keys.add(key)
        self._in_shard += 1
        if self._in_shard >= self.maxcount:
            self._finish_shard()

    def record_failure(self, source: str, reason: str) -> None:
        """Note an input that could not be turned into samples (listed in the manifest)."""
        self._failures.append({"source": str(source), "reason": str(reason)})

    def _encode(self, key: str, image: np.ndarray, *, label: int | None, meta: dict | None,
                source: str | None) -> dict[str, Any]:
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"Sample key {key!r} must be a non-empty string without '.'.")
        if key in self._keys:
            raise ValueError(f"Sample key {key!r} was already written; keys must be unique in a shard set.")
        image = np.asarray(image)
        sample: dict[str, Any] = {"__key__": key, "png": encode_png(image)}
        self._note_image(image)
        if label is not None:
            label = self._check_label(label)
            sample["cls"] = str(label).encode("ascii")
            name = self.classes[label] if self.classes is not None else str(label)
            self._class_counts[name] = self._class_counts.get(name, 0) + 1
        if meta is not None or source is not None:
            record = dict(meta or {})
            if source is not None:
                record["source"] = str(source)
                self._sources.setdefault(str(source), None)
            try:
                sample["json"] = json.dumps(record, sort_keys=True).encode("utf-8")
            except TypeError as err:
                raise ValueError(f"Metadata of sample {key!r} is not JSON-serialisable ({err}).") from None
        return sample

    def _check_label(self, label: int) -> int:
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) or label < 0:
            raise ValueError(f"Labels must be non-negative integers, got {label!r}.")
        if self.classes is not None and label >= len(self.classes):
            raise ValueError(f"Label {label} is out of range for {len(self.classes)} classes {self.classes}.")
        return int(label)

    def _note_image(self, image: np.ndarray) -> None:
        info = {"height": image.shape[0], "width": image.shape[1],
                "channels": image.shape[2] if image.ndim == 3 else 1, "format": "png"}
        if self._image is None:
            self._image = info
        else:  # sizes that vary between samples are recorded as null
            self._image = {k: (v if info[k] == v else None) for k, v in self._image.items()}

    # ---- shards --------------------------------------------------------------------
    def _shard_name(self) -> str:
        return f"{self.prefix}-{len(self._shards):06d}.tar"

    def _open_shard(self) -> None:
        tmp = self.out_dir / (self._shard_name() + ".tmp")
        self._file = open(tmp, "wb")
        # mtime=0: reproducible bytes, and an integer mtime keeps tar headers short.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._in_shard = 0

    def _close_files(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._file is not None and not self._file.closed:
            self._file.close()
        self._tar, self._file = None, None

    def _finish_shard(self) -> None:
        name = self._shard_name()
        self._close_files()
        final = self.out_dir / name
        os.replace(self.out_dir / (name + ".tmp"), final)
        self._shards.append({"name": name, "samples": self._in_shard,
                             "bytes": final.stat().st_size, "sha256": sha256_file(final)})
        self._in_shard = 0

    def _remove_stale(self) -> None:
        """Delete ``{prefix}-*.tar`` / ``.tmp`` files of an earlier set that this one did not write."""
        ours = {s["name"] for s in self._shards}
        pattern = re.compile(re.escape(self.prefix) + r"-\d{6}\.tar(\.tmp)?")
        for path in self.out_dir.glob(f"{self.prefix}-*"):
            if pattern.fullmatch(path.name) and path.name not in ours:
                path.unlink()

    # ---- closing -------------------------------------------------------------------
    def close(self) -> dict[str, Any]:
        """Finish the last shard and write ``manifest.json``; returns the manifest dict."""
        if self.manifest is not None:
            return self.manifest
        if self._tar is not None:
            self._finish_shard()
        self._remove_stale()
        manifest = {
            "format": FORMAT,
            "created_by": self.command,
            "sslkit_version": _sslkit_version(),
            "shards": self._shards,
            "num_samples": sum(s["samples"] for s in self._shards),
            "classes": self.classes,
            "class_counts": self._ordered_counts(),
            "image": self._image,
            "sources": list(self._sources),
            "failures": self._failures,
            "params": self.params,
        }
        tmp = self.out_dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.out_dir / MANIFEST_NAME)
        self.manifest = manifest
        return manifest

    def _ordered_counts(self) -> dict[str, int]:
        if self.classes is None:
            return dict(sorted(self._class_counts.items(), key=lambda kv: int(kv[0])))
        return {name: self._class_counts.get(name, 0) for name in self.classes}

    def abort(self) -> None:
        """Drop the shard in progress (its .tmp file); finished shards stay, no manifest is written."""
        if self._tar is None:
            return
        name = self._shard_name()
        try:
            self._close_files()
        finally:
            (self.out_dir / (name + ".tmp")).unlink(missing_ok=True)

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
