"""The shard format: what a shard set is on disk, shared by the writers and the readers.

Writers (``sslkit.sharding``) make shard sets; readers (``sslkit.data``, evaluation, the demo)
take shard names and the sample count from the manifest instead of scanning tars. This
module imports neither, so both can depend on it.

- ``manifest.json`` beside the shards: building (``build_manifest``), writing
  (``write_manifest``), reading and checking (``read_manifest``, ``parse_manifest``).
- Tar members: a sample is the members ``<key>.<ext>`` that share a key (``split_member``);
  keys hold no '.' or '/' (``check_key``); the image is the member with one of
  ``IMAGE_FIELDS``, the label ``<key>.cls``, the meta dict ``<key>.json``.
- ``StrictTarInfo``: damage inside a tar is an error, never a silent end of the archive.

Re-hashing and re-counting shards against their manifest (``sslkit shard verify``) is the
writers' business: ``sslkit.sharding.core.verify``.

Manifest layout (``FORMAT``)::

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
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import reprlib
import tarfile
from pathlib import Path
from typing import Any, Optional

from sslkit.atomic import write_json
from sslkit.errors import ManifestError, MissingInput

FORMAT = "sslkit-shards/2"
FORMATS = ("sslkit-shards/1", FORMAT)
MANIFEST_NAME = "manifest.json"
_REQUIRED = ("format", "shards", "num_samples")


class StrictTarInfo(tarfile.TarInfo):
    """``tarfile.open(..., tarinfo=StrictTarInfo)``: a damaged header or a file cut short raises ReadError.

    After the first member, tarfile reads a header that fails its checksum, a header cut short, a file
    that ends without the end-of-archive blocks and a zero block with more data after it all as the end
    of the archive, so the members after the damage would vanish without an error.
    ``SubsequentHeaderError`` is the one header error that ``TarFile.next`` raises (as ReadError) at
    any offset."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a zero block: the end of the archive, if nothing but zeros follows
            while block := tar.fileobj.read(tarfile.RECORDSIZE):
                if block.strip(b"\0"):
                    raise tarfile.SubsequentHeaderError(f"a zero block with more data after it at byte "
                                                        f"{tar.offset}") from None
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as err:
            what = "the file ends without the end-of-archive blocks (cut short)" \
                if isinstance(err, tarfile.EmptyHeaderError) else f"damaged tar header ({err})"
            raise tarfile.SubsequentHeaderError(f"{what} at byte {tar.offset}") from None


IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "tif", "tiff")  # extensions a reader takes as a sample's image
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: <key>.<ext>, key up to the first '.'


def split_member(name: str) -> tuple[Optional[str], Optional[str]]:
    """(key, extension) of a tar member named ``<key>.<ext>``, as webdataset groups members (the key
    ends at the first '.' of the last path part); (None, None) for a name without an extension."""
    match = _MEMBER.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def check_key(key: str) -> str:
    """``key`` when it can name a sample's members (non-empty, no '.' or '/'), else ValueError."""
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"Sample key {key!r} must be a non-empty string without '.' or '/'.")
    return key


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


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write ``folder/manifest.json`` atomically."""
    return write_json(Path(folder) / MANIFEST_NAME, manifest)


def class_names(manifest: dict) -> Optional[list[str]]:
    """Label index -> class name, from a manifest of either format; None without classes."""
    classes = manifest.get("classes")
    return list(classes) if classes else None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _outside(name: str) -> bool:
    """Whether a shard name leaves the manifest's folder: absolute, or through a '..' part (URLs never do)."""
    return "://" not in name and (name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name))


def _check_fields(manifest: dict[str, Any], bad: Any) -> None:
    """Raise ``bad(what)`` unless every field a reader uses has its type (``build_manifest``'s layout)."""
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s and "samples" in s
                                               for s in shards):
        raise bad("has a shard entry without 'name' or 'samples'")
    for entry in shards:
        name, samples = entry["name"], entry["samples"]
        if not isinstance(name, str) or not name.strip() or "\0" in name or _outside(name):
            raise bad(f"names shard {reprlib.repr(name)}, which is not a file name inside its folder "
                      "(shard names are relative to the manifest's folder, without '..', or URLs)")
        if not _is_count(samples) or not _is_count(entry.get("bytes", 0)):
            raise bad(f"gives shard {reprlib.repr(name)} samples={reprlib.repr(samples)} and "
                      f"bytes={reprlib.repr(entry.get('bytes'))}, which must be whole numbers of 0 or more")
    if not _is_count(manifest["num_samples"]):
        raise bad(f"has num_samples={reprlib.repr(manifest['num_samples'])}, which must be a whole number of 0 or more")
    classes, counts = manifest.get("classes"), manifest.get("class_counts")
    if not (classes is None or isinstance(classes, list) and all(isinstance(c, str) for c in classes)
            or isinstance(classes, dict) and all(map(_is_count, classes.values()))) \
            or not (counts is None or isinstance(counts, dict) and all(map(_is_count, counts.values()))):
        raise bad("has 'classes' that is neither null nor a mapping of class names to sample counts")
    for key, kind in (("image", (dict, type(None))), ("sources", list), ("failed", list), ("failures", list)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise bad(f"has {key!r} of type {type(manifest[key]).__name__}")


def parse_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Check a loaded manifest and bring format 1 to the format-2 layout; ``where`` names it in errors.

    Raises ManifestError (a ValueError) naming ``where`` and the fix for anything a reader could not
    use: a missing field, a field of the wrong type, a negative count, a shard name outside the folder."""
    fix = "regenerate the shard set with `sslkit shard ...` or point to its folder"

    def bad(what: str) -> ManifestError:
        return ManifestError(f"Shard manifest {where} {what}; {fix}.")

    if not isinstance(manifest, dict) or any(k not in manifest for k in _REQUIRED):
        raise bad(f"lacks one of {list(_REQUIRED)}")
    if manifest["format"] not in FORMATS:
        raise bad(f"has format {reprlib.repr(manifest['format'])}, expected one of {list(FORMATS)}")
    _check_fields(manifest, bad)
    counted = sum(s["samples"] for s in manifest["shards"])
    if counted != manifest["num_samples"]:
        raise ManifestError(
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
        MissingInput (a FileNotFoundError): no manifest there.
        ManifestError (a ValueError): the file is not a valid sslkit manifest.
    """
    file = manifest_path(path)
    if not file.is_file():
        raise MissingInput(
            f"No shard manifest at {file}; make the shard set with `sslkit shard ...` (a run that is still "
            "going, or whose other ranks have not finished, writes it at the end) or point to its folder."
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ManifestError(f"Shard manifest {file} is not valid JSON ({err}); regenerate the shard set.") from None
    return parse_manifest(manifest, str(file))


__all__ = ["FORMAT", "FORMATS", "MANIFEST_NAME", "IMAGE_FIELDS", "StrictTarInfo", "split_member", "check_key",
           "manifest_path", "merge_image_info", "build_manifest", "write_manifest", "class_names",
           "parse_manifest", "read_manifest"]
