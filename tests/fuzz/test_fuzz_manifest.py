"""Damaged manifests: ``parse_manifest`` and ``resolve_shards`` give the same result as before for a valid
manifest and ManifestError (a ValueError: one sentence naming the manifest and the fix) for anything else
-- never a KeyError, TypeError or AttributeError from deep inside, never a hang.

A valid two-shard manifest is mutated (fields removed, values of the wrong type, negative, huge or
fractional counts, unicode names, names leaving the folder), replaced by random JSON, or by random bytes.
Shard names are relative to the manifest's folder (the writers write bare file names): absolute names and
names through '..' are refused, sub-folders and URLs are not.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from fuzz.fuzzing import FUZZ, run_within
from hypothesis import given, settings
from hypothesis import strategies as st

from sslkit.data.loaders import eval_loader
from sslkit.data.shardset import resolve_shards
from sslkit.errors import ManifestError
from sslkit.shardformat import class_names, parse_manifest, read_manifest
from sslkit.sharding.core.verify import verify_shards
from sslkit.sharding.synthetic import make_synthetic

SIZE, PER_SHARD = 16, 4
NAMES = ("m-000000.tar", "m-000001.tar")
WHERE = "'fuzzed/manifest.json'"

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_COUNTS = st.sampled_from([-1, -4, 0, 10 ** 30, 2 ** 63, 4.0, 1.5, float("inf"), float("nan"), True, "4", None,
                           [], {}, [4]])
_NAMES = st.one_of(st.sampled_from([
    "../m-000000.tar", "/m-000000.tar", "sub/../m-000000.tar", "..", ".", "", " ", "m-000000.tar/", "sub/x.tar",
    "ünïcødé-☃.tar", "a\x00b.tar", "http://127.0.0.1:9/x.tar", "..\\m-000000.tar", "C:\\x.tar", NAMES[1],
]), st.text(max_size=20))


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """Two real 4-sample shards (their bytes, by name) and their valid manifest."""
    folder = tmp_path_factory.mktemp("set")
    manifest = make_synthetic(folder, num_samples=2 * PER_SHARD, size=SIZE, seed=0, shard_size=PER_SHARD,
                              prefix="m", progress=False)
    assert [s["name"] for s in manifest["shards"]] == list(NAMES)
    return _Set(manifest=manifest, tars={name: (folder / name).read_bytes() for name in NAMES})


class _Set(dict):
    def __repr__(self) -> str:  # hypothesis prints a failing example's arguments: not the tars' bytes
        return "<two 4-sample shards and their manifest>"


def _one_sentence(err: Exception, where: str) -> None:
    text = str(err)
    assert where in text and "\n" not in text and text.endswith("."), text
    assert "sslkit shard" in text, text  # the fix: regenerate the set (or point elsewhere)


def _resolve(text: bytes, shard_set: dict):
    """``resolve_shards`` on a folder with the two shards and ``text`` as manifest.json; then, when it
    succeeds, every batch of the eval stream (the manifest's fields reach the readers' decode stage)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in shard_set["tars"].items():
            (folder / name).write_bytes(data)
        (folder / "manifest.json").write_bytes(text)
        shards = resolve_shards(str(folder))
        batches = run_within(lambda: list(eval_loader(shards, size=SIZE, channels=3, batch_size=8, workers=0)))
        return shards, [os.path.relpath(u, folder) for u in shards.urls], batches


def _check(manifest, text: bytes, shard_set: dict) -> None:
    """``manifest`` is what ``text`` (the bytes of manifest.json) decodes to, or None when it does not."""
    try:
        parsed = parse_manifest(copy.deepcopy(manifest), WHERE) if manifest is not None else None
    except ManifestError as err:
        _one_sentence(err, WHERE)
        parsed = None
    try:
        shards, names, batches = _resolve(text, shard_set)
    except ManifestError as err:
        assert parsed is None, f"resolve_shards refused a manifest that parse_manifest took: {err}"
        _one_sentence(err, "manifest.json")
        return
    except FileNotFoundError as err:  # a listed shard is not in the folder: documented in resolve_shards
        assert parsed is not None and "does not exist" in str(err) and "\n" not in str(err)
        assert any(s["name"] not in NAMES for s in parsed["shards"])
        return
    assert parsed is not None, "resolve_shards took a manifest that parse_manifest refused"
    want = [s["name"] for s in parsed["shards"]] or sorted(NAMES)  # no shards listed: the folder's tars
    assert [os.path.normpath(n) for n in names] == [os.path.normpath(n) for n in want]
    assert shards.classes == class_names(parsed)
    assert sum(len(b["id"]) + int(b["corrupt"]) for b in batches) == PER_SHARD * len(want)
    for batch in batches:
        assert batch["image"].shape[1:] == (3, SIZE, SIZE) and batch["image"].dtype == torch.float32


def _mutate(data: st.DataObject, manifest: dict) -> dict:
    out = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        entries = out.get("shards")
        entry = data.draw(st.sampled_from(entries), label="entry") \
            if isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries) else None
        op = data.draw(st.sampled_from(["drop", "set", "count", "name", "entries"]), label="op")
        if op == "drop":
            target = entry if entry is not None and data.draw(st.booleans()) else out
            if target:
                target.pop(data.draw(st.sampled_from(sorted(target))), None)
        elif op == "set":
            target = entry if entry is not None and data.draw(st.booleans()) else out
            key = data.draw(st.sampled_from(sorted(target) + ["classes", "image"]) if target else st.just("format"))
            target[key] = data.draw(_JSON, label="value")
        elif op == "count":
            target, key = (entry, "samples") if entry is not None and data.draw(st.booleans()) else (out, "num_samples")
            target[key] = data.draw(_COUNTS, label="count")
        elif op == "name" and entry is not None:
            entry["name"] = data.draw(_NAMES, label="name")
        elif op == "entries" and isinstance(entries, list):
            what = data.draw(st.sampled_from(["duplicate", "remove", "clear"]), label="entries")
            out["shards"] = {"duplicate": entries + entries[:1], "remove": entries[1:], "clear": []}[what]
    return out


def _dumps(manifest) -> bytes:
    return json.dumps(manifest, ensure_ascii=False).encode("utf-8")


def test_valid_manifest_reads_as_before(shard_set):
    """The negative control: the writer's manifest parses to itself and resolves to both shards."""
    manifest = shard_set["manifest"]
    assert parse_manifest(copy.deepcopy(manifest), WHERE) == manifest
    shards, names, batches = _resolve(_dumps(manifest), shard_set)
    assert names == list(NAMES) and shards.num_samples == 2 * PER_SHARD and shards.samples_per_shard == [4, 4]
    assert sum(len(b["id"]) for b in batches) == 2 * PER_SHARD and all(int(b["corrupt"]) == 0 for b in batches)
    _check(manifest, _dumps(manifest), shard_set)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_mutated_manifest(shard_set, data):
    manifest = _mutate(data, shard_set["manifest"])
    _check(manifest, _dumps(manifest), shard_set)


@settings(FUZZ, max_examples=150)
@given(manifest=st.one_of(_JSON, st.fixed_dictionaries(
    {"format": st.sampled_from(["sslkit-shards/1", "sslkit-shards/2"]) | _JSON, "shards": _JSON | st.lists(
        st.fixed_dictionaries({"name": _NAMES, "samples": _COUNTS | _JSON}), max_size=3),
     "num_samples": _COUNTS | _JSON},
    optional={"classes": _JSON, "class_counts": _JSON, "image": _JSON, "sources": _JSON, "failures": _JSON})))
def test_random_json_manifest(shard_set, manifest):
    _check(manifest, _dumps(manifest), shard_set)


@settings(FUZZ, max_examples=60)
@given(text=st.one_of(st.binary(max_size=64), st.sampled_from([b"\xff\xfe{}", b"[" * 5000, b"{" * 5000,
                                                                 b"NaN", b"", b'{"format": "sslkit-shards/2",'])))
def test_manifest_that_is_not_json(shard_set, text):
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):
        manifest = None
    _check(manifest, text, shard_set)


@pytest.mark.parametrize("name, refused", [("../m-000000.tar", True), ("/srv/m-000000.tar", True),
                                           ("sub/../../m-000000.tar", True), ("sub/m-000000.tar", False),
                                           ("https://example.org/shards/m-000000.tar", False)])
def test_shard_names_stay_inside_the_folder(shard_set, tmp_path, name, refused):
    """A manifest is read from a folder, and the writers list bare file names: a name that leaves the
    folder is refused by every reader (resolve_shards, read_manifest, verify_shards) with one sentence."""
    manifest = copy.deepcopy(shard_set["manifest"])
    manifest["shards"][0]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    readers = [lambda: parse_manifest(copy.deepcopy(manifest), WHERE), lambda: read_manifest(tmp_path),
               lambda: resolve_shards(str(tmp_path)), lambda: verify_shards(tmp_path)]
    for read in readers:
        if refused:
            with pytest.raises(ManifestError, match="not a file name inside its folder") as err:
                read()
            assert "\n" not in str(err.value)
        else:
            try:
                read()
            except FileNotFoundError as err:  # the name is taken; the file just is not there
                assert "does not exist" in str(err)
