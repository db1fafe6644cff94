"""Evaluation of embeddings: FAISS k-means and kNN, scored with scikit-learn/scipy.

FAISS is imported only inside this package: features go in as L2-normalised float32, and every
FAISS result is tested against a plain torch or scikit-learn computation.
"""

from __future__ import annotations

from sslkit.evaluate.cluster import as_features, cluster_eval, faiss_gpu_available, kmeans
from sslkit.evaluate.knn import knn_eval, knn_predict, knn_recall
from sslkit.evaluate.metrics import classification_metrics, cluster_metrics, hungarian_map
from sslkit.evaluate.scores import evaluate_embeddings, score_embeddings

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
    "knn_recall",
    "score_embeddings",
]
