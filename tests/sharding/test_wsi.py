"""sslkit shard wsi: slides written with tifffile (each level its own page), and the real CMU-1 region."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

openslide = pytest.importorskip("openslide")
pytest.importorskip("tiffslide")

from sslkit.sharding.core.source import Progress, UnitError  # noqa: E402
from sslkit.sharding.wsi import command as wsi  # noqa: E402
from sslkit.sharding.wsi import files as slide_files  # noqa: E402
from sslkit.sharding.wsi import slides, tissue  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CMU = DATA / "slides" / "CMU-1-Small-Region.svs"
PINK, PALE, WHITE = (200, 80, 150), (238, 214, 230), (255, 255, 255)
W0, H0 = 2048, 1536  # level 0 of the generated slides, at 0.5 um/px


def layout() -> np.ndarray:
    """Level 0 (H0, W0, 3): rectangle A covers tiles (2..7, 2..5) of a 128-px grid, B (rows 8-9)
    covers column 11 and half of columns 10 and 12."""
    img = np.full((H0, W0, 3), 255, np.uint8)
    img[256:768, 256:1024] = PINK  # A
    img[1024:1280, 1344:1600] = PINK  # B
    return img


def shrink(img: np.ndarray, k: int) -> np.ndarray:
    h, w = img.shape[0] // k, img.shape[1] // k
    return np.rint(img[:h * k, :w * k].reshape(h, k, w, k, 3).mean(axis=(1, 3))).astype(np.uint8)


def write_slide(path: Path, img: np.ndarray, *, downsamples=(1, 2, 4), mpp: float | None = 0.5,
                compression: str = "zlib", description: str | None = None, dpi: float | None = None) -> Path:
    """A tiled pyramidal TIFF, one page per level (reduced-resolution pages: OpenSlide's generic TIFF)."""
    with tifffile.TiffWriter(path) as tif:
        for i, k in enumerate(downsamples):
            extra = {}
            if mpp is not None:
                extra = {"resolution": (1e4 / (mpp * k),) * 2, "resolutionunit": "CENTIMETER"}
            elif dpi is not None:
                extra = {"resolution": (dpi, dpi), "resolutionunit": "INCH"}
            tif.write(shrink(img, k), tile=(128, 128), photometric="rgb", compression=compression,
                      subfiletype=1 if i else 0, description=description if i == 0 else None, metadata=None, **extra)
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    path = write_slide(tmp_path_factory.mktemp("slides") / "slide.tif", layout())
    assert openslide.OpenSlide(str(path)).level_count == 3
    return path


def produce(path: Path, *, skip: int = 0, **kw) -> tuple[list, Progress]:
    source = wsi.WsiSource([str(path)], **kw)
    progress = Progress()
    return list(source.produce(source.units()[0], skip=skip, progress=progress)), progress


def truth_tiles(img: np.ndarray, *, tile: int, stride: int, min_tissue: float, margin: float = 0.1) -> set:
    """Level-0 corners of whole tiles whose true pink fraction >= min_tissue (none within ``margin`` of it)."""
    pink = np.all(img == PINK, axis=2)
    kept = set()
    for y in range(0, img.shape[0] - tile + 1, stride):
        for x in range(0, img.shape[1] - tile + 1, stride):
            f = pink[y:y + tile, x:x + tile].mean()
            assert abs(f - min_tissue) >= margin or f in (0.0, 1.0), "test layout too close to the threshold"
            if f >= min_tissue:
                kept.add((x, y))
    return kept


# ---------------------------------------------------------------- tiles, counts, coordinates


@pytest.mark.parametrize("reader, used", [("auto", "openslide+tifffile"), ("openslide", "openslide"),
                                          ("tiffslide", "tiffslide")])
def test_tiles_exact_at_level0(slide, reader, used):
    samples, progress = produce(slide, mpp=0.5, tile=128, min_tissue=0.5, reader=reader)
    assert progress.details["reader"] == used
    coords = {(s.meta["x"], s.meta["y"]) for s in samples}
    a = {(x * 128, y * 128) for x in range(2, 8) for y in range(2, 6)}
    b = {(x * 128, y * 128) for x in (10, 11, 12) for y in (8, 9)}
    assert coords == a | b and len(samples) == 30
    img = layout()
    for s in samples:
        x, y = s.meta["x"], s.meta["y"]
        assert s.key == f"slide_{x}_{y}" and s.label is None
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        np.testing.assert_array_equal(s.image, img[y:y + 128, x:x + 128])
        assert s.meta["tissue"] == pytest.approx(0.5 if (x, y) in b and x != 1408 else 1.0, abs=0.01)
        assert s.meta["level"] == 0 and s.meta["mpp"] == 0.5 and s.meta["level_mpp"] == 0.5
    info = progress.details
    assert info["mpp_source"] == "metadata" and info["level"] == 0 and info["downsample"] == 1.0
    assert info["tiles"] == 30 and info["grid_tiles"] == 16 * 12
    true_fraction = np.all(img == PINK, axis=2).mean()
    assert info["tissue_fraction"] == pytest.approx(true_fraction, abs=0.01)


@pytest.mark.parametrize("min_tissue, expected", [(0.6, 26), (0.5, 30), (0.0, 16 * 12)])
def test_min_tissue_counts(slide, min_tissue, expected):
    samples, _ = produce(slide, mpp=0.5, tile=128, min_tissue=min_tissue)
    assert len(samples) == expected


@pytest.mark.parametrize("tile, overlap, min_tissue",
                         [(128, 64, 0.7), (96, 32, 0.55), (256, 64, 0.375), (320, 64, 0.42)])
def test_grid_with_overlap_matches_truth(slide, tile, overlap, min_tissue):
    """Tiles kept from the overview mask equal those computed from the full-resolution layout."""
    samples, progress = produce(slide, mpp=0.5, tile=tile, overlap=overlap, min_tissue=min_tissue)
    expect = truth_tiles(layout(), tile=tile, stride=tile - overlap, min_tissue=min_tissue)
    assert [s.meta["x"] for s in samples] and {(s.meta["x"], s.meta["y"]) for s in samples} == expect
    stride = tile - overlap
    assert progress.details["grid_tiles"] == ((W0 - tile) // stride + 1) * ((H0 - tile) // stride + 1)


def test_edge_tiles_are_whole(tmp_path):
    """A slide whose size is no multiple of the tile: only whole tiles, the remainder strip dropped."""
    img = np.full((H0 - 50, W0 - 70, 3), PINK, np.uint8)
    path = write_slide(tmp_path / "edge.tif", img)
    samples, _ = produce(path, mpp=0.5, tile=256, min_tissue=0.5)
    xs, ys = {s.meta["x"] for s in samples}, {s.meta["y"] for s in samples}
    assert xs == set(range(0, 1978 - 256 + 1, 256)) and ys == set(range(0, 1486 - 256 + 1, 256))


# ---------------------------------------------------------------- levels and resizing


@pytest.mark.parametrize("target, downsamples, level, scale, size", [
    (0.5, (1, 2, 4), 0, 1.0, (2048, 1536)), (0.505, (1, 2, 4), 0, 1.0, (2048, 1536)),
    (0.75, (1, 2, 4), 0, 1.5, (1365, 1024)), (1.0, (1, 2, 4), 1, 1.0, (1024, 768)),
    (1.5, (1, 2, 4), 1, 1.5, (682, 512)), (3.0, (1, 2, 4), 2, 1.5, (341, 256)), (50.0, (1, 2, 4), 2, 25.0, (20, 15)),
    (1.5, (1, 3), 1, 1.0, (682, 512)), (1.0, (1, 3), 0, 2.0, (1024, 768)),
    # 682 x 512 under 2048 x 1536: OpenSlide's downsample is (2048 / 682 + 1536 / 512) / 2 = 3.0014663,
    # not 3; the level (1.5007 um/px) is shrunk by the exact remaining 2.0 / 1.5007 = 1.3326820, not 4 / 3
    (2.0, (1, 3), 1, 1.3326820, (511, 384))])
def test_level_choice(tmp_path, target, downsamples, level, scale, size):
    path = write_slide(tmp_path / "s.tif", layout(), downsamples=downsamples, compression="jpeg")
    s = slides.open_slide(str(path))
    assert len(s.dimensions) == len(downsamples)
    geom = slides.choose_level(s, (0.5, 0.5), target)
    assert geom.level == level and geom.scale[0] == pytest.approx(scale, rel=1e-7)
    assert geom.scale[1] == geom.scale[0] and geom.size == size


def test_finer_than_level0_refused(slide):
    with pytest.raises(UnitError, match=r"upsampling would invent detail.*--mpp 0\.5"):
        produce(slide, mpp=0.25)


def test_resized_tiles_match_whole_image_resize(slide):
    """Target 0.75 um/px: level 0 shrunk by 1.5 block by block equals shrinking it whole."""
    samples, progress = produce(slide, mpp=0.75, tile=128, overlap=16, min_tissue=0.3)
    assert progress.details["level"] == 0 and progress.details["downsample"] == 1.5
    whole = np.asarray(Image.fromarray(layout()).resize((1365, 1024), Image.Resampling.BILINEAR,
                                                        box=(0, 0, 1365 * 1.5, 1024 * 1.5)))
    assert len(samples) > 10
    for s in samples:
        tx, ty = round(s.meta["x"] / 1.5), round(s.meta["y"] / 1.5)
        assert abs(tx * 1.5 - s.meta["x"]) < 1 and s.meta["level_mpp"] == 0.5
        diff = np.abs(s.image.astype(int) - whole[ty:ty + 128, tx:tx + 128])
        assert diff.max() <= 1


def test_level1_read_as_stored(slide):
    samples, progress = produce(slide, mpp=1.0, tile=64, min_tissue=0.7)
    level1 = shrink(layout(), 2)
    assert progress.details["level"] == 1 and progress.details["downsample"] == 1.0
    for s in samples:
        x, y = s.meta["x"] // 2, s.meta["y"] // 2
        np.testing.assert_array_equal(s.image, level1[y:y + 64, x:x + 64])
    assert {(s.meta["x"], s.meta["y"]) for s in samples} == truth_tiles(layout(), tile=128, stride=128,
                                                                         min_tissue=0.7)
    assert len(samples) == 26


# ---------------------------------------------------------------- resolution metadata


def test_objective_power_fallback(tmp_path):
    desc = f"Aperio Image Library Fake\r\n{W0}x{H0} [0,0 {W0}x{H0}] (128x128) JPEG/RGB Q=90|AppMag = 20|Filename = x"
    path = write_slide(tmp_path / "aperio.svs", layout(), downsamples=(1, 4), mpp=None, compression="jpeg",
                       description=desc)
    assert openslide.OpenSlide(str(path)).properties.get("openslide.vendor") == "aperio"
    with pytest.warns(UserWarning, match="objective power 20"):
        samples, progress = produce(path, mpp=0.5, tile=128)
    info = progress.details
    assert info["mpp_source"] == "objective-power" and info["level0_mpp"] == 0.5 and "10 / power" in info["note"]
    # TiffSlide sees one level here, OpenSlide two; the stored-tile reader matches pages to OpenSlide's levels
    assert info["reader"] == "openslide+tifffile" and info["level"] == 0
    assert len(samples) == 30
    first = samples[0]
    expected = layout()[first.meta["y"]:first.meta["y"] + 128, first.meta["x"]:first.meta["x"] + 128]
    assert np.abs(first.image.astype(int) - expected).mean() < 3  # JPEG-compressed slide


@pytest.mark.parametrize("dpi", [None, 72.0])
def test_no_resolution_fails_unless_override(tmp_path, dpi):
    path = write_slide(tmp_path / "bare.tif", layout(), mpp=None, dpi=dpi)
    with pytest.raises(UnitError, match="--mpp-override") as err:
        produce(path)
    assert str(path) in str(err.value) and ("not plausible" in str(err.value)) == (dpi is not None)
    samples, progress = produce(path, mpp=0.5, tile=128, mpp_override=0.5)
    assert progress.details["mpp_source"] == "override" and len(samples) == 30


# ---------------------------------------------------------------- readers


def test_tiffslide_fallback_when_openslide_cannot_open(tmp_path):
    """A stripped TIFF with a SubIFD pyramid: OpenSlide refuses it, TiffSlide reads it."""
    path = tmp_path / "stripped.tif"
    img = layout()
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, subifds=2, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
                  metadata=None)
        tif.write(shrink(img, 2), subfiletype=1, photometric="rgb")
        tif.write(shrink(img, 4), subfiletype=1, photometric="rgb")
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(path))
    samples, progress = produce(path, mpp=1.0, tile=64)
    assert progress.details["reader"] == "tiffslide" and progress.details["level"] == 1
    for s in samples:
        x, y = s.meta["x"] // 2, s.meta["y"] // 2
        np.testing.assert_array_equal(s.image, shrink(img, 2)[y:y + 64, x:x + 64])
    assert len(samples) == 30


def test_auto_keeps_openslide_when_faster_decoders_decode_otherwise(slide, monkeypatch):
    def shifted(opener):
        def open_shifted(*args):  # a decoder that gets colours wrong
            twin = opener(*args)
            read = twin.read
            twin.read = lambda *a: (read(*a).astype(int) * 3 // 4).astype(np.uint8)
            return twin
        return open_shifted

    monkeypatch.setattr(slides, "_open_tiffslide", shifted(slides._open_tiffslide))
    monkeypatch.setattr(slides, "_open_tifftiles", shifted(slides._open_tifftiles))
    monkeypatch.setattr(slides, "_DECODES_ALIKE", set())
    samples, progress = produce(slide, mpp=0.5, tile=128)
    assert progress.details["reader"] == "openslide" and len(samples) == 30
    np.testing.assert_array_equal(samples[0].image, layout()[256:384, 256:384])


def test_without_openslide_installed(slide, monkeypatch):
    expected, _ = produce(slide, mpp=0.75, tile=128, reader="openslide")
    monkeypatch.setitem(sys.modules, "openslide", None)  # `import openslide` now raises ImportError
    samples, progress = produce(slide, mpp=0.75, tile=128)
    assert progress.details["reader"] == "tiffslide"
    assert [s.key for s in samples] == [s.key for s in expected]
    for a, b in zip(samples, expected):
        np.testing.assert_array_equal(a.image, b.image)


def test_openslide_fast_read_equals_public_api(tmp_path):
    img = layout()
    img[:, :700] = 0  # some black too
    path = write_slide(tmp_path / "s.tif", img, compression="jpeg")
    handle = openslide.OpenSlide(str(path))
    for loc, level, size in [((0, 0), 0, (W0, H0)), ((300, 200), 1, (333, 211)), ((1900, 1400), 0, (400, 300))]:
        public = slides.to_channels(np.asarray(handle.read_region(loc, level, size)), 3)  # outside: transparent
        ours = slides._openslide_rgb(handle, loc, level, size)
        assert np.abs(ours.astype(int) - public).max() <= 1
        if loc == (1900, 1400):
            assert (ours[-150:, -200:] == 255).all()  # beyond the slide: white


# ---------------------------------------------------------------- tissue


def test_tissue_mask_stains_and_artefacts():
    rng = np.random.default_rng(0)
    img = np.full((400, 600, 3), 246, np.uint8)  # slightly grey glass
    img[40:160, 40:200] = (120, 60, 140)  # dark H&E
    img[40:160, 200:300] = PALE  # pale eosin joined to it
    img[220:340, 40:200] = (150, 100, 60)  # DAB brown
    img[220:340, 200:300] = (160, 165, 205)  # hematoxylin counterstain (IHC)
    img[40:140, 400:560] = (40, 170, 80)  # green marker on glass
    img[200:300, 400:560] = (50, 80, 190)  # blue marker on glass
    img[330:380, 420:560] = (10, 10, 10)  # black marker
    img[100:104, 500:504] = PINK  # a speck (16 px at 8 um/px = 1024 um^2)
    img = np.clip(img + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)  # scanner noise
    mask = tissue.tissue_mask(img, um_per_px=8.0)
    for y0, y1, x0, x1 in [(40, 160, 40, 300), (220, 340, 40, 300)]:
        assert mask[y0 + 2:y1 - 2, x0 + 2:x1 - 2].all()
    assert not mask[:, 360:].any() and not mask[180:200].any() and not mask[:, :30].any()
    assert not tissue.tissue_mask(np.full((300, 300, 3), 245, np.uint8), um_per_px=8.0).any()
    assert not tissue.tissue_mask(rng.integers(235, 256, (300, 300, 3)).astype(np.uint8), um_per_px=8.0).any()


def test_box_fractions_against_supersampling():
    rng = np.random.default_rng(1)
    mask = rng.random((30, 40)) > 0.5
    fine = np.repeat(np.repeat(mask, 8, axis=0), 8, axis=1)  # 1/8-pixel grid
    boxes = np.sort(rng.integers(0, 8 * 30, (50, 2, 2)), axis=1) / 8.0  # corners on the 1/8 grid
    boxes = np.stack([boxes[:, 0, 1], boxes[:, 0, 0], boxes[:, 1, 1] + 0.125, boxes[:, 1, 0] + 0.125], axis=1)
    got = tissue.box_fractions(mask, boxes)
    for (x0, y0, x1, y1), f in zip((boxes * 8).astype(int), got):
        assert f == pytest.approx(fine[y0:y1, x0:x1].mean(), abs=1e-9)


def test_no_tissue_slide_gives_note(tmp_path):
    path = write_slide(tmp_path / "blank.tif", np.full((H0, W0, 3), 250, np.uint8))
    samples, progress = produce(path, mpp=0.5, tile=128, mask_dir=str(tmp_path / "masks"))
    assert samples == [] and progress.details["tiles"] == 0 and "no tissue" in progress.details["note"]
    assert (tmp_path / "masks" / "blank.png").is_file()


# ---------------------------------------------------------------- resume, bad input, ids


@pytest.mark.parametrize("reader", ["openslide", "auto", "tiffslide"])
@pytest.mark.parametrize("mpp, n", [(0.5, 16 * 12), (0.75, 10 * 8)])  # 0.75: level 0 shrunk by 1.5
def test_skip_does_not_read_skipped_tiles(slide, monkeypatch, reader, mpp, n):
    """Resuming inside a block reads that block's row first, then whole blocks again; with
    per-tile reads (auto, no resize) every read is one tile. TiffSlide's cost (whole stored
    tiles) at 0.75 is where a block's bounding box, skipped tiles included, would be cheapest."""
    monkeypatch.setattr(wsi, "BLOCK_PX", 512)  # 0.5: blocks of 4 x 4 tiles, 4 x 3 blocks; 0.75: 2 x 2 tiles
    full, progress = produce(slide, mpp=mpp, tile=128, min_tissue=0.0, reader=reader)  # every tile
    assert len(full) == n and progress.details["reader"] == {"auto": "openslide+tifffile"}.get(reader, reader)
    reads = []
    original = wsi.read_target
    monkeypatch.setattr(wsi, "read_target", lambda s, g, x, y, w, h: reads.append((x, y, w, h)) or
                        original(s, g, x, y, w, h))
    per_tile = reader == "auto" and mpp == 0.5
    for skip in sorted(k for k in {0, 1, 2, 3, 5, 16, 21, 41, 100, 191, n - 1, n} if k <= n):
        reads.clear()
        rest, _ = produce(slide, skip=skip, mpp=mpp, tile=128, min_tissue=0.0, reader=reader)
        assert [s.key for s in rest] == [s.key for s in full[skip:]] and bool(reads) == (skip < n)
        if skip == 0:  # block reads unless per tile
            assert all((w, h) == (128, 128) for _, _, w, h in reads) == per_tile
        for s in full[:skip]:
            x, y = round(s.meta["x"] * 0.5 / mpp), round(s.meta["y"] * 0.5 / mpp)  # target pixels
            assert not any(x < rx + rw and rx < x + 128 and y < ry + rh and ry < y + 128 for rx, ry, rw, rh in reads)
        for a, b in zip(rest, full[skip:]):
            np.testing.assert_array_equal(a.image, b.image)


@pytest.mark.parametrize("reader", ["openslide", "auto"])
def test_unreadable_slides_fail_with_reason(tmp_path, reader):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(UnitError, match=r"notes\.svs.*OpenSlide: Unsupported or missing image file"):
        produce(text, reader=reader)
    path = write_slide(tmp_path / "damaged.tif", layout(), compression="jpeg")
    page = tifffile.TiffFile(path).pages[0]
    offset, size = page.dataoffsets[4 * 16 + 4], page.databytecounts[4 * 16 + 4]  # a tile inside A
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(data))
    backend = {"auto": "tifffile"}.get(reader, reader)
    x = 512 if reader == "auto" else 256  # tile by tile: the damaged stored tile (4, 4) itself; else its row's run
    with pytest.raises(UnitError, match=rf"damaged\.tif failed at level 0, region x={x} y=512 .*\({backend}: "
                                        "Not a JPEG file.*copy it again"):
        produce(path, mpp=0.5, tile=128, reader=reader)


def test_slide_ids_and_finding(tmp_path):
    for name in ("a/x.svs", "b/x.svs", "b/x.tif", "c/y z.ndpi", "c/notes.txt", "c/deep/w.svs"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"0" * 10)
    found, failed = slide_files.find_slides([str(tmp_path / "c"), str(tmp_path / "a" / "x.svs")])
    assert [Path(p).name for p in found] == ["y z.ndpi", "x.svs"] and failed == []
    found = slide_files.find_slides([str(tmp_path / "c")], recursive=True)[0]
    assert [Path(p).name for p in found] == ["w.svs", "y z.ndpi"]
    (tmp_path / "list.txt").write_text("# slides\na/x.svs\nb/x.svs\n\nb/x.tif\nmissing.svs\na/x.svs\n")
    found, failed = slide_files.find_slides([f"@{tmp_path / 'list.txt'}"])
    assert len(found) == 3 and [f["source"] for f in failed] == [str(tmp_path / "missing.svs")]
    assert slide_files.slide_ids(found) == ["a_x_svs", "b_x_svs", "b_x_tif"]
    assert slide_files.slide_ids(["p/q.svs", "p/q.svs.svs", "r/y z.svs"]) == ["q", "q_svs", "y_z"]
    assert slide_files.slide_ids(["a/x.svs", "b/x.svs", "c/x.svs"]) == ["a_x", "b_x", "c_x"]
    assert slide_files.slide_ids(["p/a/x.svs", "q/a/x.svs"]) == ["p_a_x", "q_a_x"]
    # told apart by nothing safe: numbered past an existing id; no id is "_" (keys <id>_<x>_<y> stay safe)
    assert slide_files.slide_ids(["p/a b/q.svs", "p/a_b/q.svs", "p/q-2.svs"]) == ["q", "q-3", "q-2"]
    assert slide_files.slide_ids(["p/#.svs", "p/(1).svs"]) == ["slide", "1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no slide files"):
        slide_files.find_slides([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        slide_files.find_slides([str(tmp_path / "nope.svs")])
    mrxs = tmp_path / "m.mrxs"
    mrxs.write_bytes(b"1" * 5)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "Data0000.dat").write_bytes(b"2" * 100)
    assert slide_files.slide_bytes(str(mrxs)) == 105


@pytest.mark.parametrize("bad", [{"overlap": 256}, {"min_tissue": 1.5}, {"mpp": 0}, {"tile": 4},
                                 {"quality": 0}, {"mpp_override": -1.0}, {"reader": "pil"}])
def test_bad_settings(slide, bad):
    from sslkit.errors import UsageError

    with pytest.raises(UsageError, match="^--"):
        wsi.WsiSource([str(slide)], **bad)


# ---------------------------------------------------------------- end to end


def read_shards(out: Path) -> dict:
    from sslkit.shardformat import read_manifest

    samples: dict = {}
    for shard in read_manifest(out)["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_run_source_png_and_jpeg_round_trip(slide, tmp_path):
    from sslkit.sharding.core.runner import run_source

    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    img = layout()
    for encode in ("png", "jpeg"):
        out = tmp_path / encode
        source = wsi.WsiSource([str(slide), str(bad)], mpp=0.5, tile=128, encode=encode, quality=90,
                               mask_dir=str(out / "masks"))
        summary = run_source(source, out, workers=0, shard_size=7, progress=False)
        assert summary["units_done"] == 1 and summary["units_failed"] == 1 and summary["samples"] == 30
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["num_samples"] == 30
        assert [f["source"] for f in manifest["failed"]] == [str(bad)]
        assert "broken.svs" in manifest["failed"][0]["reason"]
        entry = next(s for s in manifest["sources"] if s["id"] == "slide")
        assert entry["tiles"] == 30 and entry["mask"] == str(out / "masks" / "slide.png")
        mask = np.asarray(Image.open(out / "masks" / "slide.png"))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        assert (out / "masks" / "slide-tiles.jpg").is_file() and not list((out / "masks").glob("*.tmp"))
        samples = read_shards(out)
        assert len(samples) == 30
        for key, fields in samples.items():
            meta = json.loads(fields["json"])
            assert key == f"slide_{meta['x']}_{meta['y']}" and meta["slide"] == "slide"
            decoded = np.asarray(Image.open(io.BytesIO(fields["png" if encode == "png" else "jpg"])).convert("RGB"))
            want = img[meta["y"]:meta["y"] + 128, meta["x"]:meta["x"] + 128].astype(int)
            if encode == "png":
                np.testing.assert_array_equal(decoded, want)
            else:
                assert np.abs(decoded - want).mean() < 2.0


def test_cli_with_workers_and_resume(slide, tmp_path, capsys):
    from sslkit.cli import main

    out = tmp_path / "cli"
    args = ["shard", "wsi", str(slide), str(slide.parent), "--out", str(out), "--mpp", "0.5", "--tile", "128",
            "--workers", "2", "--no-progress", "--encode", "png"]
    main(args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 30 and manifest["params"]["tile"] == 128
    assert "1 slide done, 0 failed, 0 already done; 30 tiles" in capsys.readouterr().out
    main(args)  # everything done: nothing re-read, the same set
    assert "0 slides done, 0 failed, 1 already done; 0 tiles" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]


def test_add_parser_on_a_fresh_parser(slide, tmp_path):
    parser = argparse.ArgumentParser()
    wsi.add_parser(parser.add_subparsers(dest="source"))
    args = parser.parse_args(["wsi", f"@{tmp_path / 'l.txt'}", "--out", str(tmp_path / "o"), "--overlap", "16"])
    assert args.slides == [f"@{tmp_path / 'l.txt'}"] and args.overlap == 16 and args.fn is wsi._cmd_wsi


# ---------------------------------------------------------------- the real slide


@pytest.mark.skipif(not CMU.is_file(), reason="shared data not present")
def test_cmu_small_region(tmp_path):
    from sslkit.sharding.core.runner import run_source

    source = wsi.WsiSource([str(CMU)], mpp=0.499, tile=256, min_tissue=0.5, encode="jpeg", quality=90,
                           mask_dir=str(tmp_path / "masks"))
    summary = run_source(source, tmp_path, workers=0, progress=False)
    entry = summary["manifest"]["sources"][0]
    assert 0.3 <= entry["tissue_fraction"] <= 0.95 and entry["mpp_source"] == "metadata"
    assert summary["samples"] == entry["tiles"] > 20
    handle = openslide.OpenSlide(str(CMU))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = read_shards(tmp_path)
    for fields in list(samples.values())[:10]:
        meta = json.loads(fields["json"])
        tile = handle.read_region((meta["x"], meta["y"]), 0, (256, 256)).convert("RGB")
        buffer = io.BytesIO()
        tile.save(buffer, format="JPEG", quality=90)  # the same encoder on read_region's pixels
        got = np.asarray(Image.open(io.BytesIO(fields["jpg"])).convert("RGB")).astype(int)
        assert np.abs(got - np.asarray(Image.open(buffer))).max() <= 1
        assert np.abs(got - np.asarray(tile)).mean() < 8.0  # JPEG q90, 4:2:0 chroma, on sharp H&E detail
        assert meta["tissue"] >= 0.5 and meta["x"] % 256 == 0 and meta["y"] % 256 == 0
    mask = np.asarray(Image.open(tmp_path / "masks" / "CMU-1-Small-Region.png")) > 0
    thumb = np.asarray(handle.get_thumbnail(mask.shape[::-1]).convert("RGB").resize(mask.shape[::-1]))
    dark = thumb.min(axis=2) < 200  # clearly stained pixels must be in the mask
    assert mask[dark].mean() > 0.95 and mask[thumb.min(axis=2) > 235].mean() < 0.1


# ---------------------------------------------------------------- the stored-tile reader


def test_stored_tile_reader_equals_openslide_across_tiles_and_beyond_the_edge(tmp_path):
    rng = np.random.default_rng(5)
    img = layout()
    img[600:900, 100:1900] = rng.integers(0, 256, (300, 1800, 3), dtype=np.uint8)  # detail across many tiles
    path = write_slide(tmp_path / "j.tif", img, compression="jpeg")
    handle = openslide.OpenSlide(str(path))
    reader = slides.TiffTiles(str(path), handle, cache_bytes=4 * 128 * 128 * 3)  # room for 4 tiles only
    for level, (x, y, w, h) in [(0, (100, 500, 700, 450)), (1, (0, 0, W0 // 2, H0 // 2)), (2, (400, 300, 200, 150)),
                                (0, (1900, 1400, 300, 250))]:  # the last one runs beyond the slide: white
        ours = reader.read(level, x, y, w, h)
        ds = handle.level_downsamples[level]
        theirs = slides.to_channels(np.asarray(handle.read_region((round(x * ds), round(y * ds)), level, (w, h))), 3)
        assert ours.shape == (h, w, 3)
        assert np.abs(ours.astype(int) - theirs).max() <= 1, (level, x, y)
        assert reader._cached <= reader.cache_bytes
    assert (reader.read(0, 1900, 1400, 300, 250)[-100:, -150:] == 255).all()


def test_a_kind_of_slide_is_checked_against_openslide_once_per_process(tmp_path, monkeypatch):
    paths = [write_slide(tmp_path / f"s{i}.tif", layout(), compression="jpeg") for i in range(3)]
    checks = []
    check = slides._decodes_alike
    monkeypatch.setattr(slides, "_DECODES_ALIKE", set())
    monkeypatch.setattr(slides, "_decodes_alike", lambda twin, slide: checks.append(slide.path) or check(twin, slide))
    opened = [slides.open_slide(str(p)) for p in paths]
    assert [s.reader for s in opened] == ["openslide+tifffile"] * 3
    assert checks == [str(paths[0])]  # same vendor, compression, photometric, tiling: trusted after the first
    other = write_slide(tmp_path / "z.tif", layout(), compression="zlib")
    assert slides.open_slide(str(other)).reader == "openslide+tifffile" and checks[-1] == str(other)


def test_two_ranks_from_the_environment_shard_disjoint_slides(tmp_path, monkeypatch):
    from sslkit.sharding.core.runner import run_source
    from sslkit.sharding.core.verify import verify_shards

    img = layout()
    paths = [str(write_slide(tmp_path / f"slide{i}.tif", img[:, : W0 - 128 * i])) for i in range(5)]
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        source = wsi.WsiSource(paths, mpp=0.5, tile=128, encode="png")
        summary = run_source(source, tmp_path / "out", workers=0, progress=False)
        assert summary["world_size"] == 2 and summary["units"] in (2, 3)
        assert (summary["manifest"] is None) == (rank == 0)  # the last rank to finish writes it
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    slides_by_rank: dict[str, set] = {"r000": set(), "r001": set()}
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "out" / shard["name"]) as tar:
            names = {json.loads(tar.extractfile(m).read())["slide"] for m in tar if m.name.endswith(".json")}
        slides_by_rank[shard["name"].split("-")[1]] |= names
    assert slides_by_rank["r000"] and slides_by_rank["r001"]
    assert not slides_by_rank["r000"] & slides_by_rank["r001"]
    assert slides_by_rank["r000"] | slides_by_rank["r001"] == {f"slide{i}" for i in range(5)}
    assert [s["status"] for s in manifest["sources"]] == ["done"] * 5
    assert manifest["num_samples"] == sum(s["samples"] for s in manifest["sources"]) > 0
    assert verify_shards(tmp_path / "out")["ok"]


def test_import_readers_imports_every_installed_module_that_preload_names():
    """The forkserver's names (WsiSource.preload) and the imports of import_readers() are two lists: they must agree."""
    code = ("import sys; from sslkit.sharding.wsi.command import WsiSource; WsiSource.import_readers(); "
            "print(' '.join(m for m in WsiSource.preload if m not in sys.modules))")
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    installed = [m for m in missing if importlib.util.find_spec(m.split(".")[0]) is not None]
    assert installed == [], f"import_readers() does not import {installed}"
