"""Finding shards: a folder, brace pattern, URL or ``pipe:`` command and its manifest -> a ``ShardSet``.

    shards = resolve_shards(cfg.data.shards, manifest=cfg.data.manifest)
    shards.urls, shards.num_samples, shards.classes, shards.samples_per_shard

The manifest (``sslkit.shardformat``) gives the shard names and sample counts; without one,
local shards are counted from their tar headers and remote ones stay unknown. Reading the
tars is ``sslkit.data.tarread``; loaders over a ``ShardSet`` are ``sslkit.data.loaders``.
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urljoin

import braceexpand

from sslkit.data.remote import read_json
from sslkit.errors import ManifestError, MissingInput
from sslkit.shardformat import MANIFEST_NAME, StrictTarInfo, class_names, parse_manifest, split_member

logger = logging.getLogger(__name__)

_MAKE_IT = "create it with `sslkit shard synthetic --out {}` or point data.shards at existing shards"


@dataclass
class ShardSet:
    """Where the shards are and what the manifest says about them."""

    urls: list[str]
    manifest: Optional[dict]
    num_samples: Optional[int]  # manifest's num_samples; else counted from local tar headers; else None (remote)
    classes: Optional[list[str]]
    samples_per_shard: Optional[list[int]] = None  # aligned with urls, when known
    missing: list[str] = field(default_factory=list)  # shards the manifest lists that are not there (skip_missing)
    missing_samples: int = 0  # how many samples the manifest says they held


def _is_remote(spec: str) -> bool:
    return ("://" in spec and not spec.startswith("file://")) or spec.startswith("pipe:")


def _read_manifest(path: Optional[str], *, missing_ok: bool = False) -> Optional[dict]:
    """The manifest at a local path or URL, checked and in the current layout (``parse_manifest``).

    ``missing_ok``: None when the server refuses the URL (4xx; S3 answers 403 for a missing key)."""
    if path is None:
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested thousands deep
        if missing_ok and getattr(err, "status", None):
            logger.info("No manifest at %s (%s); sample counts stay unknown.", path, err)
            return None
        raise ManifestError(f"Manifest '{path}' cannot be read ({err}); rewrite it with `sslkit shard` "
                            "or set data.manifest to a valid one.") from None
    return parse_manifest(manifest, f"'{path}'")


def _beside(folder: str) -> Optional[str]:
    path = os.path.join(folder, "manifest.json")
    return path if os.path.isfile(path) else None


def _count_local(urls: list[str]) -> list[int]:
    """Samples per local shard from the tar headers alone (no member data is read).

    A damaged shard is counted up to the damage, with a warning (reading skips the rest of it too);
    ``StrictTarInfo`` makes a damaged header or a cut-short file count as damage, not as its end."""
    counts = []
    for url in urls:
        keys: set = set()
        try:
            with tarfile.open(url.removeprefix("file://"), mode="r:", tarinfo=StrictTarInfo) as tar:
                for member in tar:  # one at a time: the keys before the damage stay counted
                    keys.add(split_member(member.name)[0])
        except (OSError, EOFError, ValueError, tarfile.TarError) as err:  # ValueError: a malformed pax header
            logger.warning("Shard %s is damaged (%s); counting the %d samples before it.", url, err,
                           len(keys - {None}))
        counts.append(len(keys - {None}))
    return counts


def _check_local(spec: str, urls: list[str], *, skip_missing: bool = False) -> list[str]:
    """The missing local shards: [] when all exist; with ``skip_missing``, some (not all) may be missing."""
    missing = [u for u in urls if not os.path.isfile(u.removeprefix("file://"))]
    if not missing or skip_missing and len(missing) < len(urls) and os.path.isdir(os.path.dirname(missing[0]) or "."):
        return missing
    folder = os.path.dirname(missing[0]) or "."
    if not spec.endswith(".tar") and "{" not in spec:  # a folder name, not a shard pattern
        folder, what = spec, f"Shard folder '{spec}' does not exist"
    elif not os.path.isdir(folder):
        what = f"Shard folder '{folder}' does not exist"
    else:
        what = f"Shard '{missing[0]}' does not exist ({len(missing)} of {len(urls)} missing)"
    raise MissingInput(f"{what}; {_MAKE_IT.format(folder)}.")


def resolve_shards(spec: str, *, manifest: Optional[str] = None, skip_missing: bool = False) -> ShardSet:
    """Shard URLs from a folder holding manifest.json (or *.tar), a brace pattern, or a URL/pipe.

    ``manifest`` overrides where the manifest is read (a path or URL); by default it is
    ``manifest.json`` in the folder or beside the first shard (local or http(s); ``pipe:``
    shards need ``manifest``). Sample counts come from the manifest; without one, local
    shards are counted from their tar headers and remote ones stay unknown
    (``num_samples=None``: training cannot be sized, eval reads to the end).
    Raises FileNotFoundError naming the path when the folder or a local shard is missing; with
    ``skip_missing`` (training) missing shards are left out with a warning and reported in
    ``missing`` and ``missing_samples``, unless all are missing.
    """
    spec = str(spec)
    if os.path.isdir(spec):  # shard names in the manifest are relative to this folder
        data = _read_manifest(manifest or _beside(spec))
        names = [s["name"] for s in (data or {}).get("shards", [])]
        urls = [n if "://" in n else os.path.join(spec, n) for n in names]
        urls = urls or sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not urls:
            raise MissingInput(
                f"Shard folder '{spec}' holds no manifest.json and no .tar shards; {_MAKE_IT.format(spec)}."
            )
    else:
        urls = list(braceexpand.braceexpand(spec))
        if manifest or not _is_remote(spec):
            data = _read_manifest(manifest or _beside(os.path.dirname(urls[0])))
        elif spec.startswith(("http://", "https://")):  # manifest.json in the shards' folder, if the server has one
            data = _read_manifest(urljoin(urls[0], MANIFEST_NAME), missing_ok=True)
        else:
            data = None  # pipe: commands say nothing about a manifest
    missing = [] if _is_remote(spec) else _check_local(spec, urls, skip_missing=skip_missing)
    if missing:
        lost = _samples_per_shard(missing, data)
        logger.warning("%d of %d shards of %s are missing and left out (%s%s).", len(missing), len(urls), spec,
                       ", ".join(os.path.basename(u) for u in missing[:5]), ", ..." if len(missing) > 5 else "")
        urls = [u for u in urls if u not in missing]
    per_shard = _samples_per_shard(urls, data)
    if per_shard is None and not _is_remote(spec):
        per_shard = _count_local(urls)
        logger.info("No per-shard counts in a manifest for %s; counted %d samples from tar headers.", spec,
                    sum(per_shard))
    num_samples = sum(per_shard) if per_shard is not None else (data or {}).get("num_samples")
    return ShardSet(urls, data, num_samples, class_names(data or {}), per_shard, missing,
                    sum(lost or []) if missing else 0)


def _samples_per_shard(urls: list[str], manifest: Optional[dict]) -> Optional[list[int]]:
    by_name = {os.path.basename(s["name"]): s.get("samples") for s in (manifest or {}).get("shards", [])}
    counts = [by_name.get(os.path.basename(u)) for u in urls]
    return None if None in counts else counts


def stored_channels(manifest: Optional[dict], channels: int) -> int:
    """Channels of the shard set's crops: the manifest's when it gives one for all, else ``channels``
    (data.channels)."""
    stored = ((manifest or {}).get("image") or {}).get("channels")
    return stored if stored in (1, 3) else channels


def stored_shape(manifest: Optional[dict]) -> Optional[tuple[int, int]]:
    """(height, width) every crop of the shard set has, from its manifest; None where crops differ or it is unknown."""
    image = (manifest or {}).get("image") or {}
    h, w = image.get("height"), image.get("width")
    return (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) else None


__all__ = ["ShardSet", "resolve_shards", "stored_channels", "stored_shape"]
