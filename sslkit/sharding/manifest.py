"""The ``manifest.json`` beside a shard set: building, reading, and checking shards against it.

The manifest is the contract between the shard writers (``sslkit.sharding``) and the
readers (``sslkit.data``): readers take shard names and the sample count from it
instead of scanning tars. Layout (``FORMAT``)::

    {"format": "sslkit-shards/2", "kind": "wsi", "created_by": "<command>", "sslkit_version": "0.1.0",
     "num_samples": 4000,
     "classes": {"a": 2000, "b": 2000},           # name -> count, in label-index order; null without labels
     "shards": [{"name": "wsi-r000-w00-000000.tar", "samples": 1000, "bytes": 123, "sha256": "..."}],
     "image": {"height": 256, "width": 256, "channels": 3, "format": "jpg"},  # null where samples differ
     "sources": [{"id": "slide-1", "path": "...", "status": "done", "samples": 812, ...}],
     "failed": [{"source": "bad.svs", "reason": "..."}],
     "params": {...}}

Manifests of format 1 (``classes`` a list beside ``class_counts``, ``failures``) are read
and returned in this layout.

    manifest = read_manifest("shards/demo/train")   # the folder or the file
    names = class_names(manifest)                   # label index -> name, or None
    report = verify_shards("shards/demo/train")     # report["ok"] is False on any problem
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Optional

FORMAT = "sslkit-shards/2"
FORMATS = ("sslkit-shards/1", FORMAT)
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


def _sslkit_version() -> str:
    try:
        return importlib.metadata.version("sslkit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def merge_image_info(seen: Optional[dict], new: Optional[dict]) -> Optional[dict]:
    """The ``image`` block of two sample groups: fields that differ become null."""
    if seen is None or new is None:
        return new if seen is None else seen
    return {k: (v if new.get(k) == v else None) for k, v in seen.items()}


def build_manifest(*, kind: str, command: str, shards: list[dict], classes: Optional[list[str]],
                   label_counts: dict[int, int], image: Optional[dict], sources: list[dict],
                   failed: list[dict], params: dict) -> dict[str, Any]:
    """A format-2 manifest; ``label_counts`` maps label index -> samples."""
    if classes is not None:
        counts: Optional[dict] = {name: int(label_counts.get(i, 0)) for i, name in enumerate(classes)}
    elif label_counts:
        counts = {str(i): int(n) for i, n in sorted(label_counts.items())}
    else:
        counts = None
    return {
        "format": FORMAT, "kind": kind, "created_by": command, "sslkit_version": _sslkit_version(),
        "num_samples": sum(int(s["samples"]) for s in shards), "classes": counts,
        "shards": shards, "image": image, "sources": sources, "failed": failed, "params": params,
    }


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (a uniquely named temporary file, then rename)."""
    final = Path(path)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, final)
    return final


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write ``folder/manifest.json`` atomically."""
    return write_json(Path(folder) / MANIFEST_NAME, manifest)


def class_names(manifest: dict) -> Optional[list[str]]:
    """Label index -> class name, from a manifest of either format; None without classes."""
    classes = manifest.get("classes")
    return list(classes) if classes else None


def parse_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Check a loaded manifest and bring format 1 to the format-2 layout; ``where`` names it in errors."""
    fix = "regenerate the shard set with `sslkit shard ...` or point to its folder"
    if not isinstance(manifest, dict) or any(k not in manifest for k in _REQUIRED):
        raise ValueError(f"Shard manifest {where} lacks one of {list(_REQUIRED)}; {fix}.")
    if manifest["format"] not in FORMATS:
        raise ValueError(
            f"Shard manifest {where} has format {manifest['format']!r}, expected one of {list(FORMATS)}; {fix}."
        )
    if not all(isinstance(s, dict) and "name" in s and "samples" in s for s in manifest["shards"]):
        raise ValueError(f"Shard manifest {where} has a shard entry without 'name' or 'samples'; {fix}.")
    counted = sum(int(s["samples"]) for s in manifest["shards"])
    if counted != manifest["num_samples"]:
        raise ValueError(
            f"Shard manifest {where} says num_samples={manifest['num_samples']} but its shards "
            f"hold {counted}; run `sslkit shard verify` on its folder and {fix}."
        )
    if manifest["format"] == "sslkit-shards/1":
        manifest = dict(manifest, format=FORMAT)
        names, counts = manifest.get("classes"), manifest.pop("class_counts", None) or {}
        manifest["classes"] = ({n: counts.get(n, 0) for n in names} if isinstance(names, list)
                               else (counts or None))
        manifest["failed"] = manifest.pop("failures", [])
        manifest["sources"] = [s if isinstance(s, dict) else {"path": s} for s in manifest.get("sources", [])]
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load and check a shard manifest; ``path`` is the manifest file or its folder.

    Raises:
        FileNotFoundError: no manifest there.
        ValueError: the file is not a valid sslkit manifest.
    """
    file = manifest_path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"No shard manifest at {file}; make the shard set with `sslkit shard ...` (a run that is still "
            "going, or whose other ranks have not finished, writes it at the end) or point to its folder."
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Shard manifest {file} is not valid JSON ({err}); regenerate the shard set.") from None
    return parse_manifest(manifest, str(file))


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
