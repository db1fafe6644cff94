"""The slide path end to end on the synthetic collection (`sslkit demo --slides`, smaller encoder run):
an encoder pretrained on the demo crops, 24 synthetic slides, feature bags, attention-MIL, heatmaps
and the report; the slide labels are found and the attention lands on the planted regions."""

import csv
import json

import numpy as np
import pytest
from scipy.stats import binom

from sslkit.demo import demo_splits
from sslkit.slides.bags import load_bag
from sslkit.slides.demo import run_slide_demo

STEPS = 150  # the crop demo's encoder at half its 300 steps: enough to tell the nucleus types apart
P_VALUE = 1e-3  # the binomial margins below: a chance model passes them less than once in a thousand


def need(n: int, p: float) -> int:
    """The least number of successes out of ``n`` that chance (probability ``p`` each) reaches with
    probability below ``P_VALUE``."""
    return int(binom.ppf(1 - P_VALUE, n, p)) + 1


def predictions(root) -> list[dict]:
    """The rows of the MIL run's predictions.csv."""
    return list(csv.DictReader((root / "mil" / "eval" / "mil" / "predictions.csv").read_text().splitlines()))


def in_regions(coords: np.ndarray, tile0: int, regions: list) -> np.ndarray:
    """(N,) whether each tile's centre (top-left ``coords`` + half of ``tile0`` level-0 px) is in a region."""
    centres = coords + tile0 / 2
    inside = np.zeros(len(coords), dtype=bool)
    for x0, y0, x1, y1 in regions:
        inside |= (centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)
    return inside


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("slide-demo")
    shards, slides, bags = root / "shards", root / "slides-demo", root / "bags"
    encoder = [f"run.dir={root / 'encoder'}", f"train.max_steps={STEPS}", "train.eval_every=0", "train.ckpt_every=150",
               "tracker.name=none"]
    results = run_slide_demo(shards=shards, slides=slides, bags=bags, encoder_overrides=encoder,
                             mil_overrides=["mil.top_tiles=4"], splits=demo_splits(num_eval=256),
                             run=root / "mil")
    return root, results


@pytest.mark.slow
def test_abmil_finds_the_planted_label_by_a_binomial_margin(demo):
    root, results = demo
    rows = predictions(root)
    assert len(rows) == 24 and results["num_slides"] == 24
    correct = sum(row["predicted"] == row["label"] for row in rows)
    assert correct >= need(24, 0.5), f"{correct} of 24 slides right out of fold"  # 20 of 24
    assert results["pooled"]["auc"] > 0.9


@pytest.mark.slow
def test_the_most_attended_tile_lies_in_a_planted_region_more_often_than_chance(demo):
    root, _ = demo
    regions = json.loads((root / "slides-demo" / "regions.json").read_text())
    rows = {row["slide_id"]: row for row in predictions(root)}
    hits, shares = 0, []
    for slide, entry in regions.items():
        if not entry["regions"]:
            continue
        _, coords, attrs = load_bag(root / "bags" / f"{slide}.h5")
        tile0 = int(attrs["patch_size_level0"])
        shares.append(in_regions(coords, tile0, entry["regions"]).mean())  # chance of a tile drawn at random
        top = np.array([[int(rows[slide]["top_tile_x"]), int(rows[slide]["top_tile_y"])]])
        hits += bool(in_regions(top, tile0, entry["regions"])[0])
    assert len(shares) == 12 and max(shares) < 0.3
    assert hits >= need(12, max(shares)), f"the top tile of {hits} of 12 positive slides lies in a region"


@pytest.mark.slow
def test_every_slide_has_a_bag_a_heatmap_and_a_place_in_the_report(demo):
    root, results = demo
    manifest = json.loads((root / "bags" / "manifest.json").read_text())
    assert manifest["done"] == 24 and manifest["failed"] == 0
    mil = root / "mil" / "eval" / "mil"
    assert sorted(p.stem for p in (mil / "heatmaps").glob("*.png")) == sorted(json.loads(
        (root / "slides-demo" / "regions.json").read_text()))
    assert len(results["heatmaps"]) == 24
    page = (root / "mil" / "report.html").read_text()
    assert "attention-MIL" in page and page.count("data:image/png;base64,") >= 2
