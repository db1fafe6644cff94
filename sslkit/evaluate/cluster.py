"""k-means on embeddings with ``faiss.Kmeans`` (GPU build used when present).

FAISS is imported only inside ``sslkit.evaluate``. ``faiss.Kmeans`` trains on at most
``max_points_per_centroid * k`` points and silently subsamples the rest (STACK-NOTES.md),
so :func:`kmeans` always sets that limit explicitly, by default high enough that every
point is used.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

from sslkit.evaluate.metrics import cluster_metrics

__all__ = ["faiss_gpu_available", "as_features", "kmeans", "cluster_eval"]


def faiss_gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    return bool(hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)


def as_features(x: Any, *, name: str = "x", normalize: bool = False) -> np.ndarray:
    """Validate embeddings and return them as a C-contiguous float32 (N, D) array.

    The input is copied when its dtype/layout differ or ``normalize`` is set, so it is
    never modified.

    Args:
        x: (N, D) array-like of embeddings (numpy or a CPU torch tensor).
        name: what to call ``x`` in error messages.
        normalize: L2-normalise each row (all-zero rows stay zero).

    Raises:
        ValueError: when ``x`` is not 2-D, is empty, or holds NaN/inf.
    """
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array of embeddings, got shape {arr.shape}.")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one embedding.")
    if not np.all(np.isfinite(arr)):
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(
            f"{name} has NaN or inf values in {bad} of {arr.shape[0]} rows; "
            "check the encoder outputs (e.g. a diverged run) before evaluating."
        )
    if normalize:
        arr = arr.copy()  # never normalise the caller's array in place
        faiss.normalize_L2(arr)  # rows with zero norm are left as they are
    return arr


def _resolve_gpu(gpu: bool | None) -> bool:
    if gpu is None:
        return faiss_gpu_available()
    if gpu and not faiss_gpu_available():
        raise ValueError(
            "gpu=True but faiss has no usable GPU (CPU-only build or no device visible); "
            "install the 'gpu' extra (faiss-gpu-cu12) or pass gpu=None/False."
        )
    return bool(gpu)


def kmeans(
    x: Any,
    *,
    k: int,
    restarts: int = 5,
    niter: int = 50,
    seed: int = 0,
    max_points_per_centroid: int | None = None,
    gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means with ``faiss.Kmeans``, best of ``restarts`` runs.

    Args:
        x: (N, D) embeddings; converted to contiguous float32.
        k: number of clusters, 1 <= k <= N.
        restarts: independent runs (faiss ``nredo``); the lowest objective is kept.
        niter: Lloyd iterations per run.
        seed: faiss random seed (initial centroids, and subsampling if any).
        max_points_per_centroid: faiss trains on at most this many points per centroid.
            Default ``ceil(N / k) + 1``, so all N points are used. A smaller value
            makes faiss subsample (quietly) to ``max_points_per_centroid * k`` points.
        gpu: ``None`` uses a faiss GPU when one is available, ``False`` never does,
            ``True`` requires one.

    Returns:
        assignments: (N,) int64 cluster index of each point.
        centroids: (k, D) float32.
        objective: sum over all N points of the squared L2 distance to the assigned
            centroid, for the returned centroids (comparable to scikit-learn's
            ``KMeans.inertia_``; faiss's own last ``obj`` lags one update behind).

    Raises:
        ValueError: for N < k, k < 1, NaN/inf in ``x``, or ``gpu=True`` without a GPU.
    """
    arr = as_features(x)
    n, d = arr.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if n < k:
        raise ValueError(
            f"k-means with k={k} needs at least k points but got N={n}; "
            "lower k or pass more embeddings."
        )
    if restarts < 1 or niter < 1:
        raise ValueError(f"restarts and niter must be >= 1, got {restarts} and {niter}.")
    if max_points_per_centroid is None:
        max_points_per_centroid = math.ceil(n / k) + 1
    if max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be >= 1, got {max_points_per_centroid}.")

    km = faiss.Kmeans(
        d,
        int(k),
        niter=int(niter),
        nredo=int(restarts),
        seed=int(seed),
        max_points_per_centroid=int(max_points_per_centroid),
        gpu=_resolve_gpu(gpu),
    )
    km.train(arr)
    # Assign with the final centroids; D holds squared L2 distances.
    sq_dist, assign = km.assign(arr)
    objective = float(np.sum(sq_dist, dtype=np.float64))
    return assign.astype(np.int64), np.asarray(km.centroids, dtype=np.float32), objective


def cluster_eval(
    x: Any,
    labels: Any,
    *,
    k: int | None = None,
    restarts: int = 5,
    niter: int = 50,
    seed: int = 0,
    max_points_per_centroid: int | None = None,
    normalize: bool = True,
) -> dict[str, float | int]:
    """Cluster embeddings with :func:`kmeans` and score the clusters against labels.

    Args:
        x: (N, D) embeddings.
        labels: (N,) ground-truth classes.
        k: number of clusters; default the number of distinct labels.
        restarts, niter, seed, max_points_per_centroid: passed to :func:`kmeans`.
        normalize: L2-normalise rows before clustering (cosine geometry).

    Returns:
        :func:`~sslkit.evaluate.metrics.cluster_metrics` keys
        (``ami, ari, nmi, purity, acc, f1``) plus ``"k"``.

    Raises:
        ValueError: when ``labels`` does not have one entry per row of ``x``, or as
            :func:`kmeans`.
    """
    arr = as_features(x, normalize=normalize)
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != arr.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = {arr.shape[0]} (one per embedding), got shape {y.shape}."
        )
    if k is None:
        k = int(np.unique(y).size)
    assign, _, _ = kmeans(
        arr,
        k=k,
        restarts=restarts,
        niter=niter,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
    )
    out: dict[str, float | int] = dict(cluster_metrics(y, assign))
    out["k"] = int(k)
    return out
