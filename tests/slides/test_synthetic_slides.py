"""The synthetic slide collection: real pyramidal TIFFs, consistent tables, a planted label that shows in pixels."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

openslide = pytest.importorskip("openslide")

from sslkit import cli  # noqa: E402
from sslkit.errors import UsageError  # noqa: E402
from sslkit.sharding.core.source import UnitError  # noqa: E402
from sslkit.sharding.synthetic import CLASSES, render_cells  # noqa: E402
from sslkit.sharding.wsi.command import plan_tiles  # noqa: E402
from sslkit.sharding.wsi.slides import open_slide, read_target, slide_mpp  # noqa: E402
from sslkit.slides import synthetic as syn  # noqa: E402

SEED, NUM = 0, 4
TILE, TILE0 = 64, 128  # the tiles looked at: 64 px at 0.5 um/px, 128 level-0 px
SMALL = dict(width=1024, height=1024, bank_size=32, progress=False)  # for the byte-level checks


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """Four full-size slides, made through the command line."""
    out = tmp_path_factory.mktemp("collection")
    cli.main(["make-slides", "--out", str(out), "--num", str(NUM), "--seed", str(SEED)])
    return out


@pytest.fixture(scope="module")
def table(collection) -> list[dict]:
    with open(collection / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def plans(collection, table) -> dict:
    """slide id -> (open slide, tile plan at 0.5 um/px with 64-px tiles, layout that made it)."""
    out = {}
    for index, row in enumerate(table):
        slide = open_slide(str(collection / "slides" / f"{row['slide_id']}.tiff"))
        plan, _, _ = plan_tiles(slide, mpp=0.5, tile=TILE, overlap=0, min_tissue=0.5)
        layout = syn.slide_layout(SEED, index, positive=row["label"] == "positive", width=4096, height=3072)
        out[row["slide_id"]] = (slide, plan, layout)
    yield out
    for slide, _, _ in out.values():
        slide.close()


def level0_boxes(plan) -> np.ndarray:
    """(N, 4) level-0 boxes of the planned tiles."""
    corners = np.array([plan.geometry.to_level0(int(x), int(y)) for x, y in plan.tiles])
    return np.concatenate([corners, corners + TILE0], axis=1)


def region_overlap(boxes: np.ndarray, regions: list) -> np.ndarray:
    """Share of each box (N, 4) inside the union of non-overlapping ``regions``."""
    total = np.zeros(len(boxes))
    for x0, y0, x1, y1 in regions:
        w = np.clip(np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0), 0, None)
        h = np.clip(np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0), 0, None)
        total += w * h
    return total / TILE0 ** 2


def auc(low: np.ndarray, high: np.ndarray) -> float:
    """P(a value of ``high`` > a value of ``low``), ties counted half (Mann-Whitney)."""
    diff = high[:, None] - low[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


# ---------------------------------------------------------------- the files


def test_openslide_reads_the_pyramid(collection, table):
    assert len(table) == NUM and sorted((collection / "slides").iterdir()) == [
        collection / "slides" / f"{row['slide_id']}.tiff" for row in table]
    for row in table:
        path = str(collection / "slides" / f"{row['slide_id']}.tiff")
        s = openslide.OpenSlide(path)
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_count == 4 and s.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        assert s.level_dimensions == ((4096, 3072), (2048, 1536), (1024, 768), (512, 384))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-9)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25, rel=1e-9)
        assert s.properties["openslide.level[0].tile-width"] == "256"
        s.close()
        mine = open_slide(path)
        assert mine.reader == "openslide+tifffile"  # the stored-tile decoder was checked to decode alike
        assert slide_mpp(mine) == (0.25, 0.25, "metadata")
        mine.close()


def test_pixels_are_the_painted_ones_and_the_same_for_a_seed(tmp_path):
    """Two runs of one seed: the same bytes; level 0 is the painted image (JPEG q90: PSNR > 30 dB) and
    level 3 its 8 x 8 area mean; another seed gives other slides."""
    a = syn.make_slide_collection(tmp_path / "a", num_slides=4, seed=7, **SMALL)
    b = syn.make_slide_collection(tmp_path / "b", num_slides=4, seed=7, **SMALL)
    c = syn.make_slide_collection(tmp_path / "c", num_slides=4, seed=8, **SMALL)
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
    for name in ("labels.csv", "regions.json"):
        assert digest(tmp_path / "a" / name) == digest(tmp_path / "b" / name)
    assert [digest(a["paths"][k]) for k in a["slides"]] == [digest(b["paths"][k]) for k in b["slides"]]
    assert all(digest(a["paths"][k]) != digest(c["paths"][k]) for k in a["slides"])
    bank, plain = syn.render_bank(7, SMALL["bank_size"])
    for index, slide_id in enumerate(a["slides"]):
        layout = syn.slide_layout(7, index, positive=a["labels"][slide_id] == "positive", width=1024, height=1024)
        painted = syn.paint_slide(7, index, layout, bank, plain).astype(np.float64)
        s = openslide.OpenSlide(a["paths"][slide_id])
        level0 = np.asarray(s.read_region((0, 0), 0, (1024, 1024)).convert("RGB"), dtype=np.float64)
        level3 = np.asarray(s.read_region((0, 0), 3, (128, 128)).convert("RGB"), dtype=np.float64)
        other = np.asarray(openslide.OpenSlide(c["paths"][slide_id]).read_region((0, 0), 0, (1024, 1024))
                           .convert("RGB"), dtype=np.float64)
        s.close()
        psnr = lambda x, y: 10 * np.log10(255 ** 2 / np.mean((x - y) ** 2))
        assert psnr(level0, painted) > 30
        assert psnr(level3, painted.reshape(128, 8, 128, 8, 3).mean(axis=(1, 3))) > 30
        assert psnr(other, painted) < 20


def test_labels_patients_and_regions_agree(collection, table):
    regions = json.loads((collection / "regions.json").read_text())
    ids = [row["slide_id"] for row in table]
    assert list(table[0]) == ["slide_id", "label", "patient"] and len(set(ids)) == NUM and set(regions) == set(ids)
    patients = {}
    for row in table:
        patients.setdefault(row["patient"], []).append(row["label"])
    assert all(len(labels) == 2 and len(set(labels)) == 1 for labels in patients.values())
    assert sorted(labels[0] for labels in patients.values()) == ["negative", "positive"]
    for index, row in enumerate(table):
        entry = regions[row["slide_id"]]
        assert entry["label"] == row["label"] and entry["mpp"] == 0.25
        layout = syn.slide_layout(SEED, index, positive=row["label"] == "positive", width=4096, height=3072)
        assert layout.regions == entry["regions"]
        if row["label"] == "negative":
            assert entry["regions"] == [] and not layout.rich.any()
            continue
        assert 1 <= len(entry["regions"]) <= 2
        for x0, y0, x1, y1 in entry["regions"]:
            assert 0 <= x0 < x1 <= 4096 and 0 <= y0 < y1 <= 3072
            assert layout.tissue_fraction((x0, y0, x1, y1)) == 1.0  # wholly on tissue
        region_px = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in entry["regions"])
        assert region_px == layout.rich.sum() * syn.CELL ** 2  # boxes do not overlap
        full_cells = layout.tissue.reshape(48, 4, 64, 4).all(axis=(1, 3)).sum()
        assert 0.08 <= layout.rich.sum() / full_cells <= 0.26


# ---------------------------------------------------------------- tissue and the planted signal


def test_tissue_detector_finds_tissue_not_glass(plans):
    """Against the outline that was painted: every kept tile is mostly tissue, almost every
    all-tissue tile is kept."""
    for slide_id, (_, plan, layout) in plans.items():
        boxes = level0_boxes(plan)
        truth = np.array([layout.tissue_fraction(tuple(b)) for b in boxes])
        assert truth.min() >= 0.25, slide_id  # no glass-only tile, nor one mostly glass
        grid = [(x, y, x + TILE0, y + TILE0) for y in range(0, 3072 - TILE0 + 1, TILE0)
                for x in range(0, 4096 - TILE0 + 1, TILE0)]
        full = {b[:2] for b in grid if layout.tissue_fraction(b) == 1.0}
        kept = {tuple(b[:2]) for b in boxes.tolist()}
        assert len(full & kept) >= 0.98 * len(full), slide_id
        assert 150 <= len(plan.tiles) <= 400 and plan.info["tiles"] == len(plan.tiles)


def test_region_tiles_are_darker_at_their_darkest(plans, table):
    """Inflammatory nuclei (the planted type) are the densest: tiles inside a region have a darker
    1st percentile of luminance than the slide's tiles outside (AUC >= 0.75 on every positive slide)."""
    labels = {row["slide_id"]: row["label"] for row in table}
    for slide_id, (slide, plan, layout) in plans.items():
        share = region_overlap(level0_boxes(plan), layout.regions)
        if labels[slide_id] == "negative":
            assert not share.any()
            continue
        inside, outside = share >= 0.5, share == 0
        assert 0.08 <= inside.mean() <= 0.3 and inside.sum() >= 15
        p1 = np.array([np.percentile(read_target(slide, plan.geometry, int(x), int(y), TILE, TILE).mean(axis=2), 1)
                       for x, y in plan.tiles])
        assert auc(p1[inside], p1[outside]) >= 0.75, slide_id
        rng = np.random.default_rng(0)
        shuffled = rng.permutation(p1)  # the same test on random "regions" finds nothing
        assert abs(auc(shuffled[inside], shuffled[outside]) - 0.5) < 0.15


def test_outside_the_regions_a_positive_slide_is_a_negative_one():
    """The label changes the regions' cells and nothing else: the same slide painted without its
    regions has the same pixels outside them."""
    bank, plain = syn.render_bank(3, 32)
    layout = syn.slide_layout(3, 1, positive=True, width=2048, height=1536)
    plain_layout = dataclasses.replace(layout, regions=[], rich=np.zeros_like(layout.rich))
    with_regions = syn.paint_slide(3, 1, layout, bank, plain)
    without = syn.paint_slide(3, 1, plain_layout, bank, plain)
    inside = layout.rich.repeat(syn.CELL, axis=0).repeat(syn.CELL, axis=1)
    assert inside.sum() == sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in layout.regions) > 0
    np.testing.assert_array_equal(with_regions[~inside], without[~inside])
    changed = np.any(with_regions != without, axis=-1)[inside].mean()
    assert 0.5 <= changed <= syn.RICHNESS + 0.1  # about RICHNESS of the region's cells are rich crops


def test_rich_crops_hold_only_the_rich_class():
    """render_cells honours the classes it is given: all-inflammatory crops have small, dense nuclei:
    fewer nucleus pixels (dark: luminance < 150) than all-epithelial ones, yet darker ones."""
    rng = np.random.default_rng(0)
    crops = {c: render_cells(rng, np.full((24, 4), CLASSES.index(c)), size=64).mean(axis=3)
             for c in ("inflammatory", "epithelial")}
    dark = {c: (v < 150).mean() for c, v in crops.items()}
    darkest = {c: np.percentile(v, 0.5) for c, v in crops.items()}
    assert dark["inflammatory"] < dark["epithelial"] and darkest["inflammatory"] < darkest["epithelial"] - 20


# ---------------------------------------------------------------- bad input, damaged copies


@pytest.mark.parametrize("argv, message", [(["--num", "3"], "even number of slides"),
                                           (["--num", "2"], "at least 4"), (["--seed", "-1"], "non-negative")])
def test_bad_flags_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["make-slides", "--out", str(tmp_path / "x"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_size_is_named(tmp_path):
    with pytest.raises(UsageError, match="multiples of 512"):
        syn.make_slide_collection(tmp_path, num_slides=4, width=1000, height=1024)


def test_corrupt_copy_fails_to_read(collection, tmp_path):
    bad = syn.write_corrupt_slide(collection / "slides" / "slide-000.tiff", tmp_path / "bad.tiff")
    assert bad.stat().st_size == (collection / "slides" / "slide-000.tiff").stat().st_size // 2
    with pytest.raises(UnitError):
        slide = open_slide(str(bad))
        try:
            slide.read(0, 0, 0, *slide.dimensions[0])
        finally:
            slide.close()
