"""Plots: hand-made cluster/class tables, resumed-run curves, what the PNGs contain and their size."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sslkit.evaluate.gallery import cluster_gallery, gallery_picks
from sslkit.evaluate.metrics import hungarian_map
from sslkit.evaluate.plots import (
    DPI,
    cluster_confusion,
    cluster_order,
    confusion_plot,
    embedding_map,
    project,
    read_metrics,
    stratified_subsample,
    training_curves,
)

CLASSES = ["epithelial", "inflammatory", "spindle"]


def _png(path):
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB")), im.size


def _pairs(*pairs):
    """(class, cluster, count) triples -> labels, clusters."""
    labels = np.concatenate([np.full(n, y) for y, _, n in pairs])
    clusters = np.concatenate([np.full(n, c) for _, c, n in pairs])
    return labels, clusters


def test_cluster_order_hand_made():
    # epithelial: cluster 2 x5, cluster 0 x1, cluster 4 x2; inflammatory: cluster 3 x4;
    # spindle: cluster 0 x3, cluster 1 x2. Best one-to-one: 2 -> epithelial (5), 3 -> inflammatory (4),
    # 0 -> spindle (3); clusters 1 (mostly spindle) and 4 (mostly epithelial) are left over.
    labels, clusters = _pairs((0, 2, 5), (0, 0, 1), (0, 4, 2), (1, 3, 4), (2, 0, 3), (2, 1, 2))
    order, match = cluster_order(labels, clusters)
    assert match == {2: 0, 3: 1, 0: 2}
    assert order == [2, 3, 0, 4, 1]  # matched on the diagonal, then unmatched by majority class


def test_cluster_order_drops_a_match_with_nothing_in_common():
    # Two classes, two clusters: class 1 only ever falls in cluster 5, and the best assignment
    # gives cluster 6 to class 1 with zero overlap. That is no match to show.
    labels, clusters = _pairs((0, 5, 5), (0, 6, 1), (1, 5, 2))
    order, match = cluster_order(labels, clusters)
    assert match == {5: 0} and order == [5, 6]


def test_cluster_order_accuracy_equals_hungarian_map():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 300)
    clusters = np.where(rng.random(300) < 0.6, labels + 2, rng.integers(0, 7, 300))
    _, match = cluster_order(labels, clusters)
    mine = np.mean([match.get(int(c), -1) == y for y, c in zip(labels, clusters)])
    assert mine == pytest.approx(hungarian_map(labels, clusters)[1])


def test_cluster_confusion_png(tmp_path):
    labels, clusters = _pairs((0, 2, 5), (0, 0, 1), (1, 3, 4), (2, 0, 3), (2, 1, 2))
    labels = np.concatenate([labels, [-1, -1]])  # unlabelled crops are left out, not an error
    clusters = np.concatenate([clusters, [1, 2]])
    arr, _ = _png(cluster_confusion(labels, clusters, classes=CLASSES, out=tmp_path / "cc.png"))
    assert (arr < 200).any()  # something was drawn
    with pytest.raises(ValueError, match="classes has 2 names"):
        cluster_confusion(labels, clusters, classes=CLASSES[:2], out=tmp_path / "x.png")


def test_confusion_plot_checks_shape(tmp_path):
    with pytest.raises(ValueError, match="cm must be"):
        confusion_plot(np.eye(3), row_names=["a", "b"], col_names=["a", "b", "c"], out=tmp_path / "x.png",
                       title="t", xlabel="x", ylabel="y")
    out = confusion_plot(np.array([[3, 1], [0, 0]]), row_names=["a", "b"], col_names=["p", "q"],
                         out=tmp_path / "cm.png", title="probe", xlabel="predicted", ylabel="true")
    assert _png(out)[1][0] > 300 and not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def _write_jsonl(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_read_metrics_keeps_the_last_record_of_a_resumed_step(tmp_path):
    first = [{"step": s, "loss": 10.0 - s / 10, "lr": 0.1, "pairs_per_s": 100.0} for s in (10, 20, 30)]
    online = {"step": 20, "online/knn_top1": 0.5, "online/ami": 0.2}  # own record, same step as training
    resumed = [{"step": s, "loss": 1.0 + s / 100, "lr": 0.05, "pairs_per_s": 90.0} for s in (20, 30, 40)]
    path = tmp_path / "metrics.jsonl"
    _write_jsonl(path, first + [online] + resumed, tail='{"step": 50, "loss": 0.')  # cut short by a crash
    series, repeated = read_metrics(path)
    assert series["loss"] == {10: 9.0, 20: 1.2, 30: 1.3, 40: 1.4}
    assert series["lr"] == {10: 0.1, 20: 0.05, 30: 0.05, 40: 0.05}
    assert series["online/knn_top1"] == {20: 0.5}  # not erased by the training record of step 20
    assert repeated == 2
    out, size = _png(training_curves(path, tmp_path / "curves.png"))
    # loss, lr, throughput and online evaluation: four panels in a 2 x 2 grid of 5.2 x 3.3 inches.
    assert size == (round(2 * 5.2 * DPI), round((2 * 3.3 + 0.5) * DPI))


def test_training_curves_without_records(tmp_path):
    assert training_curves(tmp_path / "missing.jsonl", tmp_path / "a.png") is None
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert training_curves(empty, tmp_path / "b.png") is None
    _write_jsonl(tmp_path / "other.jsonl", [{"step": 1, "corrupt_samples": 0}])
    assert training_curves(tmp_path / "other.jsonl", tmp_path / "c.png") is None
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "c.png").exists()


def test_stratified_subsample():
    strata = np.repeat([0, 1, 2], [600, 300, 100])
    idx = stratified_subsample(strata, 100, seed=1)
    assert np.bincount(strata[idx]).tolist() == [60, 30, 10]
    assert np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, stratified_subsample(strata, 100, seed=1))
    assert not np.array_equal(idx, stratified_subsample(strata, 100, seed=2))
    odd = stratified_subsample(np.repeat([0, 1, 2], 5), 10, seed=0)  # 10/3 each: remainders decide
    assert len(odd) == 10 and sorted(np.bincount(np.repeat([0, 1, 2], 5)[odd])) == [3, 3, 4]
    assert len(stratified_subsample(strata, 5000)) == 1000


def _blobs(n_per=40, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 5
    feats = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres]).astype(np.float32)
    return feats, np.repeat(np.arange(3), n_per)


def test_tsne_projection_keeps_blobs_apart():
    feats, labels = _blobs()
    xy = project(feats, method="tsne", seed=0)
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert np.mean(labels[d.argmin(1)] == labels) > 0.95  # nearest neighbour in 2-D has the same blob
    with pytest.raises(ValueError, match="umap' or 'tsne"):
        project(feats, method="pca")


def test_embedding_map_panels(tmp_path):
    feats, labels = _blobs()
    clusters = (labels + 1) % 3
    _, two = _png(embedding_map(feats, labels, clusters, classes=CLASSES, out=tmp_path / "m.png",
                                method="tsne", max_points=90))
    assert two == (round(2 * 7.6 * DPI), round(5.6 * DPI))
    arr, one = _png(embedding_map(feats, np.full(len(labels), -1), clusters, classes=CLASSES,
                                  out=tmp_path / "u.png", method="tsne"))
    assert one == (round(7.6 * DPI), round(5.6 * DPI))  # unlabelled: the cluster panel only
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 10


@pytest.mark.slow
def test_embedding_map_umap(tmp_path):
    """UMAP compiles with numba on first use (tens of seconds), hence slow."""
    feats, labels = _blobs(n_per=60)
    out = embedding_map(feats, labels, labels, classes=CLASSES, out=tmp_path / "umap.png", method="umap")
    assert _png(out)[1] == (round(2 * 7.6 * DPI), round(5.6 * DPI))


def test_gallery_magnifies_small_crops_without_blending(tmp_path):
    crop = np.zeros((32, 32, 3), np.uint8)
    crop[:, :16, 0] = 255  # left half pure red, right half pure blue
    crop[:, 16:, 2] = 255
    rows = [np.stack([crop] * 3), np.stack([crop] * 2)]
    arr, size = _png(cluster_gallery(rows, titles=["cluster 0: 3 crops", "cluster 1: 2 crops"],
                                     out=tmp_path / "g.png"))
    r, g, b = (arr[..., i].astype(int) for i in range(3))
    red = (r > 250) & (g < 5) & (b < 5)
    purple = (r > 40) & (b > 40) & (r < 215) & (b < 215) & (g < 30)  # red and blue averaged
    assert purple.sum() == 0  # nearest-neighbour: no pixel mixes the two halves
    run = max(np.diff(np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))).max(initial=0) for row in red)
    assert run >= 3 * 16  # each half-crop (16 px) drawn at least 3x wide
    assert red.any(axis=1).sum() >= 2 * 3 * 32  # two rows of crops, each at least 3x tall


def test_gallery_grey_crops_stay_grey(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))  # (32, 32), dark to light
    rows = [np.stack([ramp] * 4)]  # (n, H, W): read as grey
    arr, _ = _png(cluster_gallery(rows, titles=["cluster 0"], out=tmp_path / "grey.png"))
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    assert (arr[..., 0] < 20).sum() > 100  # the dark end of the ramp is there, not a colour map
    with pytest.raises(ValueError, match="one title per row"):
        cluster_gallery(rows, titles=[], out=tmp_path / "x.png")


def test_gallery_picks_titles_and_order():
    labels, clusters = _pairs((0, 2, 5), (0, 0, 1), (1, 3, 4), (2, 0, 3), (2, 1, 2), (1, 1, 1))
    idx, titles = gallery_picks(clusters, labels=labels, classes=CLASSES, per_cluster=3, seed=0)
    assert titles == ["cluster 2: 5 crops, 100 % epithelial", "cluster 3: 4 crops, 100 % inflammatory",
                      "cluster 0: 4 crops, 75 % spindle", "cluster 1: 3 crops, 67 % spindle"]
    assert [len(i) for i in idx] == [3, 3, 3, 3]
    assert all(np.all(clusters[i] == k) for i, k in zip(idx, (2, 3, 0, 1)))
    _, plain = gallery_picks(clusters, per_cluster=2)
    assert plain == ["cluster 0: 4 crops", "cluster 1: 3 crops", "cluster 2: 5 crops", "cluster 3: 4 crops"]


def test_to_pixels_inverts_eval_normalisation():
    import torch

    from sslkit.data.augment import to_pixels

    img = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    normalised = (img.astype(np.float32) / 255 - 0.5) / 0.5
    assert np.array_equal(to_pixels(torch.from_numpy(normalised)).numpy(), img)
