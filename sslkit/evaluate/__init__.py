"""Evaluation of embeddings: FAISS k-means and kNN, scored with scikit-learn/scipy.

FAISS is imported only inside this package: features go in as L2-normalised float32, and every
FAISS result is tested against a plain torch or scikit-learn computation.
"""

from __future__ import annotations

from typing import Any

from sslkit.evaluate.cluster import as_features, cluster_eval, faiss_gpu_available, kmeans
from sslkit.evaluate.knn import knn_eval, knn_predict
from sslkit.evaluate.metrics import classification_metrics, cluster_metrics, hungarian_map

__all__ = [
    "as_features",
    "classification_metrics",
    "cluster_eval",
    "cluster_metrics",
    "evaluate_embeddings",
    "faiss_gpu_available",
    "hungarian_map",
    "kmeans",
    "knn_eval",
    "knn_predict",
]


def evaluate_embeddings(
    x: Any,
    labels: Any,
    *,
    k: int | None = None,
    restarts: int = 5,
    niter: int = 50,
    seed: int = 0,
    max_train_points: int | None = None,
    knn_k: int = 20,
    knn_tau: float = 0.07,
    normalize: bool = True,
) -> dict[str, dict[str, float | int]]:
    """k-means cluster metrics and leave-one-out kNN top-1 of one embedding set.

    Args:
        x: (N, D) embeddings.
        labels: (N,) ground-truth classes.
        k, restarts, niter, seed, max_train_points, normalize: as in
            :func:`cluster_eval` (k defaults to the number of distinct labels).
        knn_k, knn_tau: neighbours and temperature of :func:`knn_eval` (always cosine).

    Returns:
        ``{"cluster": {ami, ari, nmi, purity, acc, f1, k}, "knn": {top1, k}}`` — the
        blocks of ``eval/metrics.json``.
    """
    return {
        "cluster": cluster_eval(
            x,
            labels,
            k=k,
            restarts=restarts,
            niter=niter,
            seed=seed,
            max_train_points=max_train_points,
            normalize=normalize,
        ),
        "knn": knn_eval(x, labels, k=knn_k, tau=knn_tau),
    }
