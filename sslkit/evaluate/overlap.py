"""Were the crops an evaluation scores seen in training? The evaluated shard set against the run's
training set (``data.shards``), from their manifests alone: shards with the same sha256, and
source files (slides, tiles, images) both sets were cut from.

A figure measured on training crops says how well the model fits them, not how it does on new
images, so ``sslkit evaluate`` writes the verdict into ``eval/metrics.json`` and the report.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from sslkit.data.shardset import ShardSet, resolve_shards

# Kinds whose sources are not files: their shards' bytes alone tell whether two sets are the same.
_NOT_FILES = ("synthetic",)


def _source_key(path: str) -> str:
    return os.path.realpath(path) if os.path.exists(path) else os.path.normpath(path)


def _sources(manifest: dict) -> Optional[list[str]]:
    """The source files a set was cut from, or None when its manifest names none."""
    if manifest.get("kind") in _NOT_FILES:
        return None
    paths = [_source_key(s["path"]) for s in manifest.get("sources", []) if isinstance(s.get("path"), str)]
    return paths or None


def training_overlap(train_spec: str, test: ShardSet, *, train_manifest: Optional[str] = None) -> dict[str, Any]:
    """``{"seen": "all" | "partly" | "no" | "unknown", "shared_shards", "eval_shards", "shared_sources",
    "eval_sources", "train_shards", "note"}``: "all" when every evaluated shard is a training shard,
    "partly" when some shard or source file is shared, "no" when none is."""
    out: dict[str, Any] = {"train_shards": train_spec}
    try:
        train = resolve_shards(train_spec, manifest=train_manifest, skip_missing=True)
    except Exception as err:  # noqa: BLE001 -- moved, deleted or remote training shards: the verdict is unknown
        reason = " ".join(str(err).split())
        return {**out, "seen": "unknown", "note": f"the training shards could not be read ({reason})"}
    if train.manifest is None or test.manifest is None:
        return {**out, "seen": "unknown", "note": "a shard set has no manifest to compare"}
    train_hashes = {s.get("sha256") for s in train.manifest["shards"]} - {None}
    eval_hashes = [s.get("sha256") for s in test.manifest["shards"]]
    shared_shards = sum(h in train_hashes for h in eval_hashes if h)
    train_sources, eval_sources = _sources(train.manifest), _sources(test.manifest)
    shared_sources = None
    if train_sources is not None and eval_sources is not None:
        known = set(train_sources)
        shared_sources = sum(s in known for s in eval_sources)
    out.update(shared_shards=shared_shards, eval_shards=len(eval_hashes), shared_sources=shared_sources,
               eval_sources=None if eval_sources is None else len(eval_sources))
    if eval_hashes and shared_shards == len(eval_hashes):
        return {**out, "seen": "all", "note": "every evaluated shard is a training shard: these figures measure "
                                              "fit to the training crops, not generalisation"}
    if shared_shards or shared_sources:
        what = [f"{shared_shards} of {len(eval_hashes)} shards"] if shared_shards else []
        what += [f"{shared_sources} of {len(eval_sources)} source files"] if shared_sources else []
        return {**out, "seen": "partly", "note": f"{' and '.join(what)} are shared with the training set: "
                                                f"evaluate on images the model never saw"}
    basis = "shard or source file" if shared_sources is not None else "shard"
    return {**out, "seen": "no", "note": f"no {basis} in common with the training set"}
