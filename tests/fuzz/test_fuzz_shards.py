"""Damaged shards: the reader yields well-formed samples and counts (or logs) what it lost, or stops with
the documented error -- never another exception, never a hang, never silently short.

One valid 6-sample shard is cut, overwritten, spliced or replaced by random bytes, then read through
``resolve_shards`` + ``eval_loader`` (every batch) and ``train_loader`` (a few batches of the endless
resampled stream), with and without its manifest (without one, ``resolve_shards`` counts tar headers).
The documented error (sslkit/data/tarread.py): corrupt data is skipped and counted; only
``MAX_FAILURES_IN_A_ROW`` failures in a row raise RuntimeError naming ``sslkit shard verify``.
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch
from fuzz.fuzzing import FUZZ, run_within
from hypothesis import given, settings
from hypothesis import strategies as st

from sslkit.config import DataConfig
from sslkit.data import shardset, tarread
from sslkit.data.loaders import eval_loader, train_loader
from sslkit.data.shardset import resolve_shards
from sslkit.sharding.synthetic import make_synthetic

SIZE, SAMPLES, EVAL_BATCH, TRAIN_BATCH, TRAIN_STEPS = 16, 6, 4, 2, 3
SHARD = "f-000000.tar"
# Each failure in a row re-reads the damaged shard; 1,000 of them would cost seconds per example. A shard
# here holds 6 samples, so a stream with any good sample in it stays far below 64 failures in a row.
FAILURES_IN_A_ROW = 64


@pytest.fixture(scope="module", autouse=True)
def fewer_failures_in_a_row():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tarread, "MAX_FAILURES_IN_A_ROW", FAILURES_IN_A_ROW)
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The intact shard: its bytes, manifest, header offsets and what eval reads from it, by key."""
    folder = tmp_path_factory.mktemp("base")
    make_synthetic(folder, num_samples=SAMPLES, size=SIZE, seed=0, shard_size=SAMPLES, prefix="f", progress=False)
    with tarfile.open(folder / SHARD) as tar:
        headers = [member.offset for member in tar]
    batches = eval_loader(resolve_shards(str(folder)), size=SIZE, channels=3, batch_size=EVAL_BATCH, workers=0)
    originals = {key: (int(label), image) for batch in batches
                 for key, label, image in zip(batch["id"], batch["label"], batch["image"])}
    assert len(originals) == SAMPLES and set(label for label, _ in originals.values()) == {0, 1, 2, 3}
    return _Base(tar=(folder / SHARD).read_bytes(), manifest=(folder / "manifest.json").read_text(),
                 headers=headers, originals=originals)


class _Base(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example: not 30 kB of tar
        return f"<shard of {SAMPLES} samples, {len(self['tar'])} bytes>"


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _read(blob: bytes, base: dict, *, manifest: bool, train: bool) -> tuple[list[dict], list[str]]:
    """Batches read from a folder holding ``blob`` as the shard, and the warnings logged meanwhile."""
    warnings = _Warnings()
    logger = logging.getLogger("sslkit.data")  # shardset counts damaged shards, tarread skips samples
    logger.addHandler(warnings)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / SHARD).write_bytes(blob)
            if manifest:
                (folder / "manifest.json").write_text(base["manifest"])
            shards = resolve_shards(str(folder))  # without a manifest: counts the damaged shard's headers
            if shards.urls != [str(folder / SHARD)] or shards.num_samples != (SAMPLES if manifest else
                                                                               shards.samples_per_shard[0]):
                raise AssertionError(f"resolve_shards gave {shards}")  # re-raised by _check, not documented
            if train:
                cfg = DataConfig(shards=str(folder), size=SIZE, channels=3, batch_size=TRAIN_BATCH, workers=0,
                                 shuffle_buffer=4)
                loader = train_loader(shards, cfg, views=None, seed=0, steps_per_epoch=TRAIN_STEPS)
            else:
                loader = eval_loader(shards, size=SIZE, channels=3, batch_size=EVAL_BATCH, workers=0)
            return run_within(lambda: list(loader)), warnings.messages
    finally:
        logger.removeHandler(warnings)


def _documented(err: Exception) -> bool:
    return isinstance(err, RuntimeError) and "in a row could not be read" in str(err) \
        and "sslkit shard verify" in str(err)


def _check_eval(batches: list[dict], warnings: list[str], base: dict, *, exact: bool) -> int:
    """Well-formed batches; ``exact``: every sample is an original one, unchanged. Returns the sample count."""
    samples, corrupt = 0, 0
    for batch in batches:
        images, labels, keys = batch["image"], batch["label"], batch["id"]
        n = len(keys)
        assert 1 <= n <= EVAL_BATCH and images.shape == (n, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert torch.isfinite(images).all() and images.abs().max() <= 1.0  # ((x / 255) - 0.5) / 0.5
        assert labels.shape == (n,) and labels.dtype == torch.long and (labels >= -1).all()
        assert all(isinstance(key, str) for key in keys)
        assert batch["corrupt"].shape == () and batch["corrupt"].dtype == torch.long and batch["corrupt"] >= 0
        samples, corrupt = samples + n, corrupt + int(batch["corrupt"])
        if exact:  # bytes were only removed: what comes out must be what went in, label included
            for key, label, image in zip(keys, labels, images):
                assert key in base["originals"], key
                want_label, want_image = base["originals"][key]
                assert int(label) == want_label, (key, int(label), want_label)
                assert torch.equal(image, want_image), key
    if samples < SAMPLES:  # lost samples are counted, or at least logged with the shard (never silent)
        assert corrupt > 0 or any(SHARD in message for message in warnings), (samples, corrupt, warnings)
    return samples


def _check(blob: bytes, base: dict, *, manifest: bool, exact: bool = False) -> None:
    try:
        batches, warnings = _read(blob, base, manifest=manifest, train=False)
    except AssertionError:
        raise
    except Exception as err:  # noqa: BLE001 -- anything but the documented error fails below
        assert _documented(err), repr(err)
        return
    samples = _check_eval(batches, warnings, base, exact=exact)
    try:
        batches, _ = _read(blob, base, manifest=manifest, train=True)
    except AssertionError:
        raise
    except Exception as err:  # noqa: BLE001
        assert _documented(err), repr(err)
        # a resampled stream stops only when no sample of the shard can be read, which eval saw too
        assert samples == 0, f"training stopped although eval read {samples} samples: {err}"
        return
    assert samples > 0, "training read batches from a shard in which eval found nothing"
    assert len(batches) == TRAIN_STEPS
    for batch in batches:
        assert batch["image"].shape == (TRAIN_BATCH, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
        assert batch["label"].dtype == torch.long and (batch["label"] >= -1).all()
        assert batch["corrupt"].shape == () and batch["corrupt"] >= 0


def _position(data: st.DataObject, base: dict, size: int) -> int:
    """A byte offset: anywhere, or (half the time) inside a tar header, where damage is subtlest."""
    in_header = st.sampled_from(base["headers"]).flatmap(lambda at: st.integers(at, at + 511))
    return data.draw(st.one_of(st.integers(0, size - 1), in_header.filter(lambda at: at < size)))


_RUNS = st.one_of(st.binary(min_size=1, max_size=64), st.integers(1, 1024).map(lambda n: b"\0" * n),
                  st.sampled_from([b"\xff" * 8, b"ustar\x00", b"9" * 12, b"\x80" + b"\xff" * 11]))


@settings(FUZZ, max_examples=300)
@given(data=st.data(), manifest=st.booleans())
def test_truncated_shard(base, data, manifest):
    cut = data.draw(st.one_of(st.integers(0, len(base["tar"])), st.sampled_from(base["headers"])), label="cut")
    _check(base["tar"][:cut], base, manifest=manifest, exact=True)


@settings(FUZZ, max_examples=300)
@given(data=st.data(), manifest=st.booleans())
def test_overwritten_bytes(base, data, manifest):
    blob = bytearray(base["tar"])
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = _position(data, base, len(blob))
        if data.draw(st.booleans(), label="flip a bit"):
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            run = data.draw(_RUNS, label="run")
            blob[at:at + len(run)] = run[:len(blob) - at]
    _check(bytes(blob), base, manifest=manifest)


@settings(FUZZ, max_examples=200)
@given(data=st.data(), manifest=st.booleans())
def test_inserted_and_deleted_runs(base, data, manifest):
    blob = bytearray(base["tar"])
    for _ in range(data.draw(st.integers(1, 2), label="edits")):
        at = _position(data, base, len(blob))
        if data.draw(st.booleans(), label="insert"):
            blob[at:at] = data.draw(_RUNS, label="run")
        else:
            del blob[at:at + data.draw(st.integers(1, 1024), label="deleted")]
    _check(bytes(blob), base, manifest=manifest)


# ustar header fields (offset, length): what a bad writer could put there with a correct checksum
_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "mtime": (136, 12), "typeflag": (156, 1),
           "linkname": (157, 100), "magic": (257, 8), "prefix": (345, 155)}
_TYPEFLAGS = st.sampled_from([b"0", b"1", b"2", b"5", b"7", b"L", b"K", b"x", b"g", b"S", b"\0", b"Z"])


def _rechecksum(blob: bytearray, at: int) -> None:
    header = blob[at:at + 512]
    header[148:156] = b" " * 8
    blob[at + 148:at + 156] = b"%06o\0 " % sum(header)


@settings(FUZZ, max_examples=300)
@given(data=st.data(), manifest=st.booleans())
def test_headers_with_valid_checksums(base, data, manifest):
    """Header fields rewritten, checksum fixed: tarfile parses these, so odd sizes, types (links, pax,
    GNU long names), names and magic values reach the reader instead of failing the checksum."""
    blob = bytearray(base["tar"])
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        at = data.draw(st.sampled_from(base["headers"]), label="header")
        field = data.draw(st.sampled_from(sorted(_FIELDS)), label="field")
        start, length = _FIELDS[field]
        value = data.draw(_TYPEFLAGS if field == "typeflag" else st.one_of(
            st.binary(min_size=1, max_size=length), st.from_regex(rb"\A[0-7 ]{1,11}\x00?\Z"),
            st.sampled_from([b"\x80" + b"\xff" * (length - 1), b"\xff" * length, b"../../x.png", b"a" * length])),
            label="value")[:length]
        blob[at + start:at + start + len(value)] = value
        _rechecksum(blob, at)
    _check(bytes(blob), base, manifest=manifest)


@settings(FUZZ, max_examples=100)
@given(blob=st.one_of(st.binary(max_size=2048), st.binary(min_size=512, max_size=512).map(lambda b: b * 3)),
       manifest=st.booleans())
def test_random_bytes(base, blob, manifest):
    _check(blob, base, manifest=manifest)


def _empty_tar() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(Path(tmp) / "empty.tar", "w"):
            pass
        return (Path(tmp) / "empty.tar").read_bytes()


def _retyped(tar: bytes, field: str, value: bytes) -> bytes:
    """The shard with one field of its first header rewritten and the checksum fixed."""
    blob = bytearray(tar)
    start, length = _FIELDS[field]
    blob[start:start + length] = value.ljust(length, b"\0")
    _rechecksum(blob, 0)
    return bytes(blob)


@pytest.mark.parametrize("damage", ["cut after a member", "cut inside a header", "first header zeroed",
                                    "header checksum", "zero block inside", "empty tar", "empty file",
                                    "first member a directory",
                                    "first member a hard link", "negative size", "size of 8 GB"])
def test_damage_tarfile_reads_as_the_end(base, damage):
    """Damage that Python's tarfile reads as a normal end of the archive (past the first member it
    stops at a bad, cut or missing header, or at any zero block; a directory's or link's data is read as
    the next header):
    the samples after it must not vanish without a count or a warning, and an endless training stream
    over a shard that gives nothing must stop with the documented error instead of spinning forever."""
    tar, headers = base["tar"], base["headers"]
    blob = {
        "cut after a member": lambda: tar[:headers[1]],  # sample 0's image whole, its label and the rest gone
        "cut inside a header": lambda: tar[:headers[4] + 100],
        "first header zeroed": lambda: b"\0" * 512 + tar[512:],
        "header checksum": lambda: tar[:headers[3] + 148] + b"0000000\0" + tar[headers[3] + 156:],
        "zero block inside": lambda: tar[:headers[1]] + b"\0" * 512 + tar[headers[1]:],  # reads as the end marker
        "empty tar": _empty_tar,
        "empty file": lambda: b"",
        "first member a directory": lambda: _retyped(tar, "typeflag", b"5"),
        "first member a hard link": lambda: _retyped(tar, "typeflag", b"1"),
        "negative size": lambda: _retyped(tar, "size", b"\xff" + b"\xff" * 11),  # base-256: -1
        "size of 8 GB": lambda: _retyped(tar, "size", b"77777777777"),
    }[damage]()
    _check(blob, base, manifest=True, exact=damage.startswith("cut"))


def test_intact_shard_reads_whole(base):
    """The harness's negative control: the undamaged shard gives every sample, nothing counted or logged."""
    batches, warnings = _read(base["tar"], base, manifest=False, train=False)
    assert _check_eval(batches, warnings, base, exact=True) == SAMPLES
    assert sum(int(b["corrupt"]) for b in batches) == 0 and warnings == []


def test_resolve_counts_headers_of_a_damaged_shard(base, tmp_path, caplog):
    """Without a manifest, a shard cut mid-way is counted up to the damage, with a warning naming it."""
    (tmp_path / SHARD).write_bytes(base["tar"][:base["headers"][7]])  # samples 0, 1 and sample 2's image
    with caplog.at_level(logging.WARNING, logger=shardset.__name__):
        shards = resolve_shards(str(tmp_path))
    assert shards.samples_per_shard == [3]
    assert any(SHARD in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
