"""The ``manifest.json`` beside a shard set: reading it, and checking shards against it.

The manifest is the contract between the shard writers (``sslkit.sharding``) and the
readers (``sslkit.data``): readers take shard names and the sample count from it
instead of scanning tars. Layout (``FORMAT``)::

    {"format": "sslkit-shards/1", "created_by": "<command>", "sslkit_version": "0.1.0",
     "shards": [{"name": "demo-000000.tar", "samples": 1000, "bytes": 123, "sha256": "..."}],
     "num_samples": 4000, "classes": ["a", "b"], "class_counts": {"a": 2000, "b": 2000},
     "image": {"height": 32, "width": 32, "channels": 3, "format": "png"},
     "sources": [...], "failures": [{"source": "...", "reason": "..."}], "params": {...}}

    manifest = read_manifest("shards/demo/train")   # the folder or the file
    report = verify_shards("shards/demo/train")     # report["ok"] is False on any problem
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

FORMAT = "sslkit-shards/1"
MANIFEST_NAME = "manifest.json"
_REQUIRED = ("format", "shards", "num_samples")


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (shards can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(path: str | Path) -> Path:
    """``path`` itself when it names a file, else ``path/manifest.json``."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load and check a shard manifest; ``path`` is the manifest file or its folder.

    Raises:
        FileNotFoundError: no manifest there.
        ValueError: the file is not a valid sslkit manifest.
    """
    file = manifest_path(path)
    fix = "regenerate the shard set (e.g. `sslkit shard synthetic ...`) or point to its folder"
    if not file.is_file():
        raise FileNotFoundError(f"No shard manifest at {file}; {fix}.")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Shard manifest {file} is not valid JSON ({err}); {fix}.") from None
    if not isinstance(manifest, dict) or any(k not in manifest for k in _REQUIRED):
        raise ValueError(f"Shard manifest {file} lacks one of {list(_REQUIRED)}; {fix}.")
    if manifest["format"] != FORMAT:
        raise ValueError(
            f"Shard manifest {file} has format {manifest['format']!r}, expected {FORMAT!r}; {fix}."
        )
    counted = sum(int(s["samples"]) for s in manifest["shards"])
    if counted != manifest["num_samples"]:
        raise ValueError(
            f"Shard manifest {file} says num_samples={manifest['num_samples']} but its shards "
            f"hold {counted}; run `sslkit shard verify {file.parent}` and {fix}."
        )
    return manifest


def count_tar_samples(path: str | Path) -> int:
    """Number of distinct WebDataset keys (``<key>.<ext>`` members) in a tar."""
    keys = set()
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            keys.add((directory, base.split(".", 1)[0]))
    return len(keys)


def _check_shard(file: Path, entry: dict[str, Any]) -> str | None:
    """Why ``file`` does not match its manifest entry, or None when it does."""
    size = file.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        return f"{size} bytes on disk, manifest says {entry['bytes']}"
    if "sha256" in entry and sha256_file(file) != entry["sha256"]:
        return "sha256 differs from the manifest"
    try:
        samples = count_tar_samples(file)
    except (tarfile.TarError, OSError, EOFError) as err:
        return f"unreadable tar ({err})"
    if samples != entry["samples"]:
        return f"{samples} samples in the tar, manifest says {entry['samples']}"
    return None


def verify_shards(folder: str | Path) -> dict[str, Any]:
    """Re-hash and re-count every shard listed in ``folder``'s manifest.

    Returns ``{"ok", "folder", "checked", "missing": [name], "mismatched":
    [{"name", "reason"}], "extra": [name]}``; ``extra`` lists ``*.tar`` and ``*.tmp``
    files in the folder that the manifest does not name. ``ok`` is True only when all
    three lists are empty.
    """
    file = manifest_path(folder)
    manifest = read_manifest(file)
    root = file.parent
    missing: list[str] = []
    mismatched: list[dict[str, str]] = []
    for entry in manifest["shards"]:
        shard = root / entry["name"]
        if not shard.is_file():
            missing.append(entry["name"])
        elif (reason := _check_shard(shard, entry)) is not None:
            mismatched.append({"name": entry["name"], "reason": reason})
    listed = {entry["name"] for entry in manifest["shards"]}
    on_disk = {p.name for pattern in ("*.tar", "*.tmp") for p in root.glob(pattern)}
    extra = sorted(on_disk - listed)
    return {
        "ok": not (missing or mismatched or extra),
        "folder": str(root),
        "checked": len(manifest["shards"]),
        "missing": missing,
        "mismatched": mismatched,
        "extra": extra,
    }
