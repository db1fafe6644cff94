"""ShardSetWriter, read_manifest and verify_shards on tiny shard sets in tmp_path."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from sslkit.shardformat import FORMAT, class_names, read_manifest
from sslkit.sharding.core.verify import sha256_file, verify_shards
from sslkit.sharding.core.writer import ShardFiles, ShardSetWriter, encode_image, encode_png

CLASSES = ["a", "b", "c"]


def _images(n: int, *, channels: int = 3, size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = (n, size, size, channels) if channels > 1 else (n, size, size)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _write(out: Path, images: np.ndarray, *, maxcount: int = 3, prefix: str = "t") -> dict:
    with ShardSetWriter(out, prefix=prefix, maxcount=maxcount, classes=CLASSES,
                        params={"seed": 1}, command="pytest") as writer:
        for i, image in enumerate(images):
            writer.write(f"s{i:04d}", image, label=i % 3, meta={"index": i}, source=f"img{i // 4}.png")
        writer.record_failure("broken.png", "cannot decode")
    return writer.manifest


def test_round_trip_through_webdataset(tmp_path: Path) -> None:
    images = _images(10)
    manifest = _write(tmp_path, images, maxcount=3)  # 3 + 3 + 3 + 1
    assert [s["name"] for s in manifest["shards"]] == [f"t-{i:06d}.tar" for i in range(4)]
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 3, 1]
    urls = [str(tmp_path / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"s{i:04d}" for i in range(10)]
    for i, sample in enumerate(samples):
        assert sample["png"].mode == "RGB"
        np.testing.assert_array_equal(np.asarray(sample["png"]), images[i])
        assert sample["cls"] == i % 3
        assert sample["json"] == {"index": i, "source": f"img{i // 4}.png"}


def test_manifest_contents_match_files(tmp_path: Path) -> None:
    manifest = _write(tmp_path, _images(10))
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["format"] == FORMAT and manifest["created_by"] == "pytest"
    assert manifest["num_samples"] == 10
    assert manifest["classes"] == {"a": 4, "b": 3, "c": 3} and list(manifest["classes"]) == CLASSES
    assert manifest["kind"] == "t"
    assert manifest["image"] == {"height": 8, "width": 8, "channels": 3, "format": "png"}
    assert manifest["sources"] == [{"path": "img0.png", "samples": 4}, {"path": "img1.png", "samples": 4},
                                   {"path": "img2.png", "samples": 2}]
    assert manifest["failed"] == [{"source": "broken.png", "reason": "cannot decode"}]
    assert manifest["params"] == {"seed": 1}
    for shard in manifest["shards"]:
        path = tmp_path / shard["name"]
        assert shard["bytes"] == path.stat().st_size
        assert shard["sha256"] == sha256_file(path)
    assert not list(tmp_path.glob("*.tmp"))
    assert read_manifest(tmp_path) == read_manifest(tmp_path / "manifest.json") == manifest


def test_tar_members_are_reproducible_and_mtime_zero(tmp_path: Path) -> None:
    first = _write(tmp_path / "one", _images(5))
    second = _write(tmp_path / "two", _images(5))
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]
    with tarfile.open(tmp_path / "one" / "t-000000.tar") as tar:
        members = tar.getmembers()
    assert {m.name for m in members} == {f"s{i:04d}.{e}" for i in range(3) for e in ("cls", "json", "png")}
    assert all(m.mtime == 0 for m in members)


def test_grayscale_without_label_or_meta(tmp_path: Path) -> None:
    images = _images(4, channels=1)
    with ShardSetWriter(tmp_path, maxcount=10) as writer:
        for i, image in enumerate(images):
            writer.write(f"k{i}", image)
    manifest = writer.manifest
    assert manifest["classes"] is None
    assert manifest["image"]["channels"] == 1
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == [f"k{i}.png" for i in range(4)]
        png = Image.open(io.BytesIO(tar.extractfile("k2.png").read()))
    assert png.mode == "L"
    np.testing.assert_array_equal(np.asarray(png), images[2])


def test_exception_keeps_finished_shards_only(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ShardSetWriter(tmp_path, prefix="t", maxcount=3) as writer:
            for i, image in enumerate(_images(5)):
                writer.write(f"s{i}", image, label=0)
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-000000.tar"]
    with pytest.raises(FileNotFoundError, match="No shard manifest"):
        read_manifest(tmp_path)


def test_rewriting_a_folder_replaces_the_old_set(tmp_path: Path) -> None:
    _write(tmp_path, _images(10), maxcount=3)  # four shards
    (tmp_path / "other-000000.tar").write_bytes(b"not ours")
    manifest = _write(tmp_path, _images(4), maxcount=3)  # two shards
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert names == ["other-000000.tar", "t-000000.tar", "t-000001.tar"]
    assert manifest["num_samples"] == 4
    assert verify_shards(tmp_path)["extra"] == ["other-000000.tar"]


def test_verify_detects_tampered_missing_and_extra(tmp_path: Path) -> None:
    _write(tmp_path, _images(10), maxcount=3)
    report = verify_shards(tmp_path)
    assert report["ok"] and report["checked"] == 4
    data = bytearray((tmp_path / "t-000001.tar").read_bytes())
    data[600] ^= 0xFF  # inside the first member's payload: same size, different hash
    (tmp_path / "t-000001.tar").write_bytes(bytes(data))
    (tmp_path / "t-000003.tar").unlink()
    (tmp_path / "t-000009.tar.tmp").write_bytes(b"")
    report = verify_shards(tmp_path)
    assert not report["ok"]
    assert report["missing"] == ["t-000003.tar"]
    assert [m["name"] for m in report["mismatched"]] == ["t-000001.tar"]
    assert "sha256" in report["mismatched"][0]["reason"]
    assert report["extra"] == ["t-000009.tar.tmp"]


def test_verify_detects_wrong_sample_count(tmp_path: Path) -> None:
    _write(tmp_path, _images(6), maxcount=3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = 4
    manifest["num_samples"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    [problem] = verify_shards(tmp_path)["mismatched"]
    assert problem["name"] == "t-000000.tar" and "3 samples" in problem["reason"]


@pytest.mark.parametrize(
    "content, match",
    [("{not json", "not valid JSON"), ('{"format": "other/9", "shards": [], "num_samples": 0}', "format"),
     ('{"format": "sslkit-shards/1", "shards": [], "num_samples": 5}', "sslkit shard verify"),
     ('{"shards": []}', "lacks")],
)
def test_read_manifest_rejects_bad_files(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        read_manifest(tmp_path)


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    image = _images(1)[0]
    with ShardSetWriter(tmp_path, classes=CLASSES) as writer:
        writer.write("ok", image, label=2)
        with pytest.raises(ValueError, match="already written"):
            writer.write("ok", image)
        with pytest.raises(ValueError, match="without '.'"):
            writer.write("a.b", image)
        with pytest.raises(ValueError, match="out of range"):
            writer.write("x", image, label=3)
        with pytest.raises(ValueError, match="uint8"):
            writer.write("y", image.astype(np.float32))
        with pytest.raises(ValueError, match="shape"):
            writer.write("z", np.zeros((4, 4, 2), np.uint8))
    assert writer.manifest["num_samples"] == 1
    with pytest.raises(RuntimeError, match="closed"):
        writer.write("late", image)
    with pytest.raises(ValueError, match="maxcount"):
        ShardSetWriter(tmp_path, maxcount=0)


def test_encode_png_squeezes_single_channel() -> None:
    image = _images(1, channels=1)[0]
    decoded = Image.open(io.BytesIO(encode_png(image[:, :, None])))
    assert decoded.mode == "L"
    np.testing.assert_array_equal(np.asarray(decoded), image)


def test_format_1_manifest_is_read_in_the_current_layout(tmp_path: Path) -> None:
    old = {"format": "sslkit-shards/1", "shards": [{"name": "d-000000.tar", "samples": 3}], "num_samples": 3,
           "classes": ["a", "b"], "class_counts": {"a": 1, "b": 2}, "sources": ["x.png"],
           "failures": [{"source": "y.png", "reason": "bad"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    manifest = read_manifest(tmp_path)
    assert manifest["format"] == FORMAT and manifest["classes"] == {"a": 1, "b": 2}
    assert manifest["failed"] == [{"source": "y.png", "reason": "bad"}] and "failures" not in manifest
    assert manifest["sources"] == [{"path": "x.png"}] and class_names(manifest) == ["a", "b"]


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_samples_decode_close_to_the_original(tmp_path: Path, channels: int) -> None:
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1).astype(np.uint8)  # JPEG-friendly ramps
    image = smooth if channels == 3 else smooth[:, :, 0]
    with ShardSetWriter(tmp_path, prefix="j", encode="jpeg", quality=95) as writer:
        writer.write("ramp", image)
    assert writer.manifest["image"]["format"] == "jpg"
    with tarfile.open(tmp_path / "j-000000.tar") as tar:
        assert tar.getnames() == ["ramp.jpg"]
        decoded = np.asarray(Image.open(io.BytesIO(tar.extractfile("ramp.jpg").read())))
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image).mean() < 2.0
    with pytest.raises(ValueError, match="encoding"):
        encode_image(image, fmt="gif")


def test_shard_files_hash_while_writing_equals_hash_on_disk(tmp_path: Path) -> None:
    entries: list[dict] = []
    files = ShardFiles(tmp_path, stem="s", maxcount=2, start_index=5, on_shard=entries.append)
    for i in range(3):
        files.add(f"k{i}", {"png": encode_png(_images(1)[0]), "cls": b"1"})
    assert [e["name"] for e in entries] == ["s-000005.tar"] and files.name == "s-000006.tar"
    assert (tmp_path / "s-000006.tar.tmp").exists()
    files.finish()
    assert [e["samples"] for e in entries] == [2, 1]
    for entry in entries:
        assert entry["sha256"] == sha256_file(tmp_path / entry["name"])
        assert entry["bytes"] == (tmp_path / entry["name"]).stat().st_size
    assert not list(tmp_path.glob("*.tmp"))


def test_jpeg_through_imagecodecs_is_byte_identical_to_pil() -> None:
    pytest.importorskip("imagecodecs")
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:96, 0:80]
    image = np.clip(np.stack([xx * 3, yy * 2, xx + yy], -1) + rng.normal(0, 12, (96, 80, 3)), 0, 255).astype(np.uint8)
    for array in (image, image[:, :, 1]):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=87)
        assert encode_image(array, fmt="jpeg", quality=87) == ("jpg", buffer.getvalue())
