"""One way to score an embedding set: k-means against the labels, and a leave-one-out kNN.

``sslkit evaluate`` (the trained encoder and every baseline), the online evaluation during
training and the library function ``evaluate_embeddings`` all score through
:func:`score_embeddings`, so a figure means the same thing wherever it is printed.

    scores = score_embeddings(feats, labels, restarts=5, seed=0)
    scores.blocks["cluster"]["ami"], scores.blocks["knn"]["top1"], scores.assign  # (N,) clusters
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Optional

import numpy as np

from sslkit.evaluate.cluster import as_features, kmeans, sample_size, whiten
from sslkit.evaluate.knn import knn_eval
from sslkit.evaluate.metrics import cluster_metrics


class Scores(NamedTuple):
    blocks: dict[str, dict[str, Any]]  # {"cluster": {ami, ari, nmi, purity, acc, f1, k}, "knn": {top1, k, search, ...}}
    assign: np.ndarray  # (N,) k-means cluster of each row
    seconds: dict[str, float]  # {"kmeans_s": wall time of k-means and its scores, "knn_s": of the kNN}


def score_embeddings(x: Any, labels: Any, *, k: int | None = None, restarts: int = 5, niter: int = 50, seed: int = 0,
                     kmeans_max_train: int | None = None, normalize: bool = True, whiten_dims: int = 0,
                     knn_k: int = 20, knn_tau: float = 0.07, knn_exact_max: Optional[int] = None) -> Scores:
    """Cluster (N, D) embeddings ``x`` into ``k`` groups (default: the number of distinct labels) and
    score the clusters against the (N,) ``labels``; kNN top-1 with cosine similarity, leave-one-out.

    k-means sees the rows L2-normalised when ``normalize`` and, with ``whiten_dims`` > 0, PCA-whitened
    to that many dimensions; it trains on a seeded sample of ``kmeans_max_train`` rows (never fewer
    than 256 per cluster) and assigns every row. ``knn_k`` shrinks to N - 1 for tiny sets; above
    ``knn_exact_max`` rows the kNN search is approximate and its recall is measured (``knn_eval``).

    Memory: ``x`` may be a memory map, read in place. k-means works on one L2-normalised float32
    copy of it (none without ``normalize``; whitening makes its own), freed before the kNN, whose
    exact search makes one normalised copy of its own and whose approximate search normalises block
    by block into its index: at most one full float32 copy at a time beside ``x``."""
    y = np.asarray(labels)
    arr = as_features(x)  # checked; a float32 memory map is not copied
    if y.ndim != 1 or y.shape[0] != arr.shape[0]:
        raise ValueError(f"labels must be (N,) with N = {arr.shape[0]} (one per embedding), got shape {y.shape}.")
    start = time.perf_counter()
    feats = as_features(arr, normalize=True) if normalize else arr
    if whiten_dims:
        feats = whiten(feats, whiten_dims, normalize=normalize, seed=seed)
    k = int(k or np.unique(y).size)
    assign, _, _ = kmeans(feats, k=k, restarts=restarts, niter=niter, seed=seed,
                          max_train_points=sample_size(kmeans_max_train, k))
    del feats  # the normalised copy goes before the kNN makes its own
    cluster = {**cluster_metrics(y, assign), "k": k}
    after_kmeans = time.perf_counter()
    knn = knn_eval(arr, y, k=min(knn_k, len(y) - 1), tau=knn_tau, exact_max=knn_exact_max, seed=seed)
    seconds = {"kmeans_s": after_kmeans - start, "knn_s": time.perf_counter() - after_kmeans}
    return Scores({"cluster": cluster, "knn": knn}, assign, seconds)


def evaluate_embeddings(x: Any, labels: Any, **options: Any) -> dict[str, dict[str, Any]]:
    """The ``cluster`` and ``knn`` blocks of ``eval/metrics.json`` for one embedding set; ``options``
    as :func:`score_embeddings`."""
    return score_embeddings(x, labels, **options).blocks


__all__ = ["Scores", "evaluate_embeddings", "score_embeddings"]
