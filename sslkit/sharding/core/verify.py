"""``sslkit shard verify``: re-hash and re-count every shard against its manifest.

    report = verify_shards("shards/demo/train")     # report["ok"] is False on any problem
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Any

from sslkit.shardformat import StrictTarInfo, manifest_path, read_manifest


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (shards can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def count_tar_samples(path: str | Path) -> int:
    """Number of distinct WebDataset keys (``<key>.<ext>`` members) in a tar."""
    keys = set()
    with tarfile.open(path, mode="r|*", tarinfo=StrictTarInfo) as tar:
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
