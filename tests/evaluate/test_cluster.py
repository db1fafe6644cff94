"""Tests of sslkit.evaluate.cluster (faiss.Kmeans) against exact means and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from sslkit.evaluate import cluster_eval, evaluate_embeddings, faiss_gpu_available, kmeans


def _blobs(*, k: int, per: int, d: int, spread: float, std: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * spread
    y = np.repeat(np.arange(k), per)
    x = centers[y] + rng.normal(size=(k * per, d)) * std
    perm = rng.permutation(k * per)
    return x[perm].astype(np.float32), y[perm]


def test_separated_blobs_give_perfect_ami() -> None:
    x, y = _blobs(k=4, per=50, d=8, spread=20.0)
    m = cluster_eval(x, y, restarts=3, niter=20)
    assert m["k"] == 4
    assert m["ami"] == pytest.approx(1.0)
    assert m["acc"] == pytest.approx(1.0)


def test_same_seed_same_assignments() -> None:
    x, _ = _blobs(k=5, per=60, d=6, spread=1.5, seed=3)  # overlapping: init matters
    a1, c1, o1 = kmeans(x, k=5, restarts=2, niter=10, seed=7)
    a2, c2, o2 = kmeans(x, k=5, restarts=2, niter=10, seed=7)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(c1, c2)
    assert o1 == o2
    assert a1.shape == (300,) and c1.shape == (5, 6)


def test_objective_matches_sklearn_inertia() -> None:
    x, _ = _blobs(k=3, per=200, d=5, spread=3.0, seed=1)
    assign, centroids, obj = kmeans(x, k=3, restarts=5, niter=50, seed=0)
    # The objective is the sum of squared distances to the returned centroids ...
    x64 = x.astype(np.float64)
    sse = ((x64 - centroids.astype(np.float64)[assign]) ** 2).sum()
    assert obj == pytest.approx(sse, rel=1e-5)
    # ... and reaches the same optimum as scikit-learn (float32 vs float64: rel 1e-4).
    ref = KMeans(n_clusters=3, n_init=5, random_state=0).fit(x64)
    assert obj == pytest.approx(ref.inertia_, rel=1e-4)


def test_default_trains_on_all_points_no_silent_subsampling() -> None:
    # N = 300 * k > faiss's default cap of 256 * k. Blobs are far apart, so Lloyd
    # converges at once and each final centroid is the mean of the points trained on.
    k = 4
    rng = np.random.default_rng(2)
    centers = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    x = (np.repeat(centers, 300, axis=0) + rng.normal(size=(1200, 2))).astype(np.float32)
    assign, centroids, _ = kmeans(x, k=k, restarts=1, niter=10)
    exact = np.stack([x[assign == c].astype(np.float64).mean(axis=0) for c in range(k)])
    np.testing.assert_allclose(centroids, exact, atol=1e-3)
    # Control: capping at 256 per centroid makes faiss train on 1,024 of 1,200 points,
    # and the centroids visibly move off the full-data means (about 0.02 per coord).
    assign_s, centroids_s, _ = kmeans(x, k=k, restarts=1, niter=10, max_points_per_centroid=256)
    exact_s = np.stack([x[assign_s == c].astype(np.float64).mean(axis=0) for c in range(k)])
    assert np.abs(centroids_s - exact_s).max() > 5e-3


def test_fewer_points_than_clusters_raises() -> None:
    x = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"k=5 needs at least k points but got N=3"):
        kmeans(x, k=5)


def test_nan_and_bad_shape_raise() -> None:
    x = np.ones((10, 3), dtype=np.float32)
    x[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf values in 1 of 10 rows"):
        kmeans(x, k=2)
    with pytest.raises(ValueError, match=r"2-D \(N, D\)"):
        kmeans(np.ones(10), k=2)


@pytest.mark.skipif(faiss_gpu_available(), reason="a faiss GPU is present")
def test_gpu_true_without_gpu_raises() -> None:
    x, _ = _blobs(k=2, per=20, d=2, spread=10.0)
    with pytest.raises(ValueError, match="no usable GPU"):
        kmeans(x, k=2, gpu=True)


def test_normalize_does_not_modify_input_and_evaluate_embeddings_keys() -> None:
    x, y = _blobs(k=3, per=40, d=8, spread=20.0, seed=4)
    before = x.copy()
    out = evaluate_embeddings(x, y, restarts=2, niter=10, knn_k=5)
    np.testing.assert_array_equal(x, before)
    assert set(out["cluster"]) == {"ami", "ari", "nmi", "purity", "acc", "f1", "k"}
    assert set(out["knn"]) == {"top1", "k"}
    assert out["knn"]["k"] == 5
    assert out["cluster"]["ami"] == pytest.approx(1.0)
    assert out["knn"]["top1"] == pytest.approx(1.0)
