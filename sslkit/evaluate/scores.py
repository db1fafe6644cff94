"""One way to score an embedding set: k-means against the labels, and a leave-one-out kNN.

``sslkit evaluate`` (the trained encoder and every baseline), the online evaluation during
training and the library function ``evaluate_embeddings`` all score through
:func:`score_embeddings`, so a figure means the same thing wherever it is printed.

    scores = score_embeddings(feats, labels, restarts=5, seed=0)
    scores.blocks["cluster"]["ami"], scores.blocks["knn"]["top1"], scores.assign  # (N,) clusters
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from sslkit.evaluate.cluster import as_features, kmeans, sample_size, whiten
from sslkit.evaluate.knn import knn_eval
from sslkit.evaluate.metrics import cluster_metrics


class Scores(NamedTuple):
    blocks: dict[str, dict[str, Any]]  # {"cluster": {ami, ari, nmi, purity, acc, f1, k}, "knn": {top1, k}}
    assign: np.ndarray  # (N,) k-means cluster of each row


def score_embeddings(x: Any, labels: Any, *, k: int | None = None, restarts: int = 5, niter: int = 50, seed: int = 0,
                     kmeans_max_train: int | None = None, normalize: bool = True, whiten_dims: int = 0,
                     knn_k: int = 20, knn_tau: float = 0.07) -> Scores:
    """Cluster (N, D) embeddings ``x`` into ``k`` groups (default: the number of distinct labels) and
    score the clusters against the (N,) ``labels``; kNN top-1 with cosine similarity, leave-one-out.

    k-means sees the rows L2-normalised when ``normalize`` and, with ``whiten_dims`` > 0, PCA-whitened
    to that many dimensions; it trains on a seeded sample of ``kmeans_max_train`` rows (never fewer
    than 256 per cluster) and assigns every row. ``knn_k`` shrinks to N - 1 for tiny sets."""
    y = np.asarray(labels)
    arr = as_features(x, normalize=normalize)
    if y.ndim != 1 or y.shape[0] != arr.shape[0]:
        raise ValueError(f"labels must be (N,) with N = {arr.shape[0]} (one per embedding), got shape {y.shape}.")
    if whiten_dims:
        arr = whiten(arr, whiten_dims, normalize=normalize, seed=seed)
    k = int(k or np.unique(y).size)
    assign, _, _ = kmeans(arr, k=k, restarts=restarts, niter=niter, seed=seed,
                          max_train_points=sample_size(kmeans_max_train, k))
    blocks = {"cluster": {**cluster_metrics(y, assign), "k": k},
              "knn": knn_eval(x, y, k=min(knn_k, len(y) - 1), tau=knn_tau)}
    return Scores(blocks, assign)


def evaluate_embeddings(x: Any, labels: Any, **options: Any) -> dict[str, dict[str, Any]]:
    """The ``cluster`` and ``knn`` blocks of ``eval/metrics.json`` for one embedding set; ``options``
    as :func:`score_embeddings`."""
    return score_embeddings(x, labels, **options).blocks


__all__ = ["Scores", "evaluate_embeddings", "score_embeddings"]
