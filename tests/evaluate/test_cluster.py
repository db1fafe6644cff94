"""Tests of sslkit.evaluate.cluster (faiss.Kmeans) against exact means and scikit-learn."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from sklearn.cluster import KMeans

from sslkit.evaluate import as_features, cluster_eval, evaluate_embeddings, faiss_gpu_available, kmeans


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


def _four_corners(per: int, seed: int = 2) -> np.ndarray:
    # Four blobs 100 apart with unit noise: Lloyd converges at once and each final
    # centroid is the mean of the points of its blob that it was trained on.
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    return (np.repeat(centers, per, axis=0) + rng.normal(size=(4 * per, 2))).astype(np.float32)


def _means(x: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    return np.stack([x[assign == c].astype(np.float64).mean(axis=0) for c in range(k)])


def test_default_trains_on_all_points_no_silent_subsampling() -> None:
    # N = 300 * k > faiss's default cap of 256 * k points, above which it subsamples.
    x = _four_corners(300)
    assign, centroids, _ = kmeans(x, k=4, restarts=1, niter=10)
    np.testing.assert_allclose(centroids, _means(x, assign, 4), atol=1e-3)


class _TrainSpy:
    """Records the matrix and parameters of every faiss.Kmeans.train call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[np.ndarray, int, int]] = []
        real_train = faiss.Kmeans.train
        spy = self

        def train(km, x, *args, **kwargs):
            spy.calls.append((np.array(x), km.cp.max_points_per_centroid, km.k))
            return real_train(km, x, *args, **kwargs)

        monkeypatch.setattr(faiss.Kmeans, "train", train)


def test_max_train_points_trains_on_a_seeded_sample_and_assigns_all(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _four_corners(300)  # N = 1200
    x[:, 0] += np.arange(1200) * 1e-3  # every row distinct, so rows can be traced back
    spy = _TrainSpy(monkeypatch)
    assign, centroids, obj = kmeans(x, k=4, restarts=3, niter=10, seed=5, max_train_points=500)
    assert len(spy.calls) == 3  # one faiss run per restart ...
    rows = {r.tobytes(): i for i, r in enumerate(x)}
    sample = spy.calls[0][0]
    for trained, max_per_centroid, k in spy.calls:
        # ... each on the same 500 distinct rows of x, which faiss may not subsample again.
        np.testing.assert_array_equal(trained, sample)
        assert max_per_centroid * k >= 500
    picked = [rows[r.tobytes()] for r in sample]
    assert sample.shape == (500, 2) and len(set(picked)) == 500
    # The centroids are the means of the sampled rows, not of all 1,200 ...
    sample_assign = np.argmin(((sample[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(centroids, _means(sample, sample_assign, 4), atol=1e-3)
    assert np.abs(centroids - _means(x, assign, 4)).max() > 5e-3
    # ... and every one of the N points is assigned to its nearest final centroid.
    sq = ((x.astype(np.float64)[:, None, :] - centroids.astype(np.float64)[None]) ** 2).sum(-1)
    assert assign.shape == (1200,)
    np.testing.assert_array_equal(assign, sq.argmin(axis=1))
    assert obj == pytest.approx(sq.min(axis=1).sum(), rel=1e-5)
    # Seeded: the same seed draws the same sample, another seed another one.
    kmeans(x, k=4, restarts=1, niter=10, seed=5, max_train_points=500)
    np.testing.assert_array_equal(spy.calls[-1][0], sample)
    kmeans(x, k=4, restarts=1, niter=10, seed=6, max_train_points=500)
    assert not np.array_equal(spy.calls[-1][0], sample)


def test_max_train_points_at_or_above_n_trains_on_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _four_corners(50)
    spy = _TrainSpy(monkeypatch)
    kmeans(x, k=4, restarts=1, niter=5, max_train_points=200)
    kmeans(x, k=4, restarts=1, niter=5, max_train_points=None)
    for trained, _, _ in spy.calls:
        np.testing.assert_array_equal(trained, x)
    with pytest.raises(ValueError, match="max_train_points=3 is smaller than k=4"):
        kmeans(x, k=4, max_train_points=3)


def test_sampled_training_still_separates_blobs() -> None:
    x, y = _blobs(k=6, per=2000, d=16, spread=20.0, seed=8)
    m = cluster_eval(x, y, restarts=2, niter=20, max_train_points=600)
    assert m["ami"] == pytest.approx(1.0)
    assert m["acc"] == pytest.approx(1.0)


def test_parallel_restarts_equal_faiss_nredo() -> None:
    # Restarts run in threads with faiss's own per-restart seeds: the best centroids are
    # exactly those of a single faiss.Kmeans call with nredo, whatever the thread count.
    x, _ = _blobs(k=6, per=150, d=8, spread=1.5, seed=9)  # overlapping: restarts differ
    ref = faiss.Kmeans(
        8, 6, niter=15, nredo=4, seed=11, max_points_per_centroid=10_000, verbose=False,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS, early_stop_threshold=0.0,
    )
    ref.train(x)
    _, centroids, _ = kmeans(x, k=6, restarts=4, niter=15, seed=11, tol=0.0, gpu=False)
    np.testing.assert_array_equal(centroids, ref.centroids)
    _, first_only, _ = kmeans(x, k=6, restarts=1, niter=15, seed=11, tol=0.0, gpu=False)
    assert not np.array_equal(first_only, centroids)  # a later restart won: not trivial
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)  # one worker thread: the restarts run one by one
        _, one_thread, _ = kmeans(x, k=6, restarts=4, niter=15, seed=11, tol=0.0, gpu=False)
    finally:
        faiss.omp_set_num_threads(before)
    np.testing.assert_array_equal(one_thread, centroids)


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
    assert set(out["knn"]) == {"top1", "k", "search"} and out["knn"]["search"] == "exact"
    assert out["knn"]["k"] == 5
    assert out["cluster"]["ami"] == pytest.approx(1.0)
    assert out["knn"]["top1"] == pytest.approx(1.0)


def test_whitening_gives_unit_covariance_and_finds_clusters_a_loud_direction_hides(monkeypatch):
    from sklearn.metrics import adjusted_mutual_info_score

    from sslkit.evaluate import cluster
    from sslkit.evaluate.cluster import whiten

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    x = np.stack([rng.normal(0, 20, 4000),  # a loud nuisance direction (brightness, stain)
                  np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 0.3, 4000),  # the classes, quiet
                  rng.normal(0, 0.5, 4000)], 1).astype(np.float32)
    white = whiten(x, 3, normalize=False)
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(3), atol=1e-3)
    assert whiten(x, 2, normalize=True).shape == (4000, 2)
    np.testing.assert_allclose(np.linalg.norm(whiten(x, 3, normalize=True), axis=1), 1.0, atol=1e-5)
    plain, _, _ = kmeans(x, k=2, restarts=3, seed=0)
    whitened, _, _ = kmeans(white, k=2, restarts=3, seed=0)
    assert adjusted_mutual_info_score(labels, plain) < 0.05  # split along the nuisance
    assert adjusted_mutual_info_score(labels, whitened) > 0.8
    # fitted on a 1,000-row sample and applied block by block: the same directions, unit variance to sampling error
    monkeypatch.setattr(cluster, "ROW_BLOCK", 1500)
    sampled = whiten(x, 3, normalize=False, fit_rows=1000)
    np.testing.assert_allclose(np.cov(sampled, rowvar=False), np.eye(3), atol=0.12)
    assert abs(np.corrcoef(sampled[:, 1], white[:, 1])[0, 1]) > 0.99  # the class direction (second), whitened


def test_as_features_reads_memory_maps_in_place_and_normalises_block_by_block(tmp_path, monkeypatch):
    from sslkit.evaluate import cluster

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    x[7] = 0.0  # a zero row stays zero
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    view = as_features(mapped)
    assert np.shares_memory(view, mapped) and not view.flags.writeable  # no copy of the file's rows
    monkeypatch.setattr(cluster, "ROW_BLOCK", 8)  # seven blocks, the last of two rows
    unit = as_features(mapped, normalize=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, x / np.where(norms > 0, norms, 1.0), rtol=1e-6)
    assert not np.shares_memory(unit, mapped) and np.array_equal(np.load(tmp_path / "x.npy"), x)
    bad = x.astype(np.float64)
    bad[[3, 20, 21], 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf values in 3 of 50 rows"):
        as_features(bad, normalize=True)


def test_thread_map_runs_torch_single_threaded_and_restores_it():
    import torch

    from sslkit.evaluate.cluster import thread_map

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = thread_map(lambda i: (i, torch.get_num_threads()), range(5), workers=2)
        assert seen == [(i, 1) for i in range(5)]  # in order, one torch thread in each task
        assert torch.get_num_threads() == 2
        with pytest.raises(ZeroDivisionError):
            thread_map(lambda i: 1 // 0, [0])
        assert torch.get_num_threads() == 2  # restored after a failing task too
    finally:
        torch.set_num_threads(before)
