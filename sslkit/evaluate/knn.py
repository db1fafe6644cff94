"""Weighted k-nearest-neighbour classification of embeddings (InstDisc / DINO protocol).

Cosine similarity through ``faiss.IndexFlatIP`` on L2-normalised float32 rows; each of
the k neighbours votes for its label with weight ``exp(sim / tau)``; the class with the
largest summed weight wins. Queries are processed in chunks, so memory stays at
O(chunk_size * k) per thread however large the bank and query sets are (no N x N matrix).
On CPU the chunks are searched in parallel threads, faiss single-threaded in each (why:
``sslkit.evaluate.cluster``); a faiss GPU is used when one is available.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from sslkit.evaluate.cluster import as_features, resolve_gpu, thread_map

__all__ = ["knn_predict", "knn_eval"]

_DEFAULT_CHUNK = 4096  # queries per chunk: faiss's own block, and ~50 tasks for 200k queries


def _as_class_indices(y: Any, *, name: str, n: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be (N,) with N = {n} (one per embedding), got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must hold integer class indices, got dtype {arr.dtype}; "
            "map labels to 0..C-1 first (knn_eval does this for you)."
        )
    if arr.min() < 0:
        raise ValueError(f"{name} has negative class indices; use 0..C-1.")
    return arr.astype(np.int64)


def _drop_self(sims: np.ndarray, idx: np.ndarray, *, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own bank index from its k+1 neighbours -> k neighbours.

    sims, idx: (q, k+1). Query row r is bank point ``offset + r``. When the point itself
    is not among the results (exact duplicates can tie with it), the last, least similar,
    neighbour is dropped instead.
    """
    q, kp1 = idx.shape
    keep = idx != (offset + np.arange(q))[:, None]  # (q, k+1)
    no_self = keep.all(axis=1)
    keep[no_self, -1] = False
    # A self-hit appears at most once per row, so every row keeps exactly k entries.
    return sims[keep].reshape(q, kp1 - 1), idx[keep].reshape(q, kp1 - 1)


def _weighted_vote(sims: np.ndarray, nbr_labels: np.ndarray, *, tau: float, num_classes: int) -> np.ndarray:
    """sims, nbr_labels: (q, k) -> class scores (q, C), scores[c] = sum exp(sim / tau)."""
    q = sims.shape[0]
    weights = np.exp(sims.astype(np.float64) / tau)  # (q, k)
    flat = (np.arange(q)[:, None] * num_classes + nbr_labels).ravel()
    return np.bincount(flat, weights=weights.ravel(), minlength=q * num_classes).reshape(
        q, num_classes
    )


def _check_knn_args(bank: np.ndarray, labels: np.ndarray, query: np.ndarray, *, k: int, tau: float,
                    num_classes: int | None, leave_one_out: bool, chunk_size: int | None) -> tuple[int, int]:
    """Raise ValueError for arguments :func:`knn_predict` cannot use; return the chunk size and C."""
    n, d = bank.shape
    if query.shape[1] != d:
        raise ValueError(f"query_x has dimension {query.shape[1]} but bank_x has {d}; they must match.")
    if leave_one_out and query.shape[0] != n:
        raise ValueError(
            f"leave_one_out needs query_x to be bank_x (N = {n} rows), got {query.shape[0]} rows."
        )
    n_search = k + int(leave_one_out)
    if k < 1 or n_search > n:
        raise ValueError(
            f"k={k} is out of range for a bank of {n} points"
            f"{' with leave-one-out' if leave_one_out else ''}; use 1 <= k <= {n - int(leave_one_out)}."
        )
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}.")
    if chunk_size is None:
        chunk_size = max(_DEFAULT_CHUNK, -(-int(faiss.cvar.distance_compute_blas_threshold) // d))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif labels.max() >= num_classes:
        raise ValueError(f"bank_y has class index {int(labels.max())} >= num_classes={num_classes}.")
    return chunk_size, num_classes


def knn_predict(
    bank_x: Any,
    bank_y: Any,
    query_x: Any,
    *,
    k: int = 20,
    tau: float = 0.07,
    num_classes: int | None = None,
    leave_one_out: bool = False,
    chunk_size: int | None = None,
    gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Temperature-weighted kNN vote with cosine similarity.

    Args:
        bank_x: (N, D) reference embeddings.
        bank_y: (N,) integer class indices in [0, C).
        query_x: (M, D) embeddings to classify. With ``leave_one_out`` this must be the
            bank itself (M = N, row i is bank point i).
        k: neighbours per query.
        tau: temperature of the vote weights ``exp(sim / tau)``; > 0.
        num_classes: C; default ``bank_y.max() + 1``.
        leave_one_out: search k + 1 neighbours and drop each query's own bank index.
        chunk_size: queries searched and voted per chunk (bounds memory; the result
            does not depend on it). Default 4,096, raised where needed to
            ``faiss.cvar.distance_compute_blas_threshold / D`` (1,000 at D = 128):
            faiss uses BLAS only for chunks that large and is about 5x slower per query
            below. Larger chunks gain nothing (faiss multiplies in blocks of 4,096
            queries) and leave threads idle when the queries are few.
        gpu: ``None`` uses a faiss GPU when one is available, ``False`` never does,
            ``True`` requires one.

    Returns:
        predictions: (M,) int64 argmax of the scores (ties -> lowest class index).
        scores: (M, C) float64 summed vote weights per class (not normalised).

    Raises:
        ValueError: on bad shapes, NaN/inf, non-integer labels, k out of range,
            tau <= 0, ``leave_one_out`` with a query set that is not the bank, or
            ``gpu=True`` without a GPU.
    """
    bank = as_features(bank_x, name="bank_x", normalize=True)
    query = as_features(query_x, name="query_x", normalize=True)
    labels = _as_class_indices(bank_y, name="bank_y", n=bank.shape[0])
    chunk_size, num_classes = _check_knn_args(bank, labels, query, k=k, tau=tau, num_classes=num_classes,
                                              leave_one_out=leave_one_out, chunk_size=chunk_size)
    n_search = k + int(leave_one_out)
    use_gpu = resolve_gpu(gpu)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    m = query.shape[0]
    scores = np.empty((m, num_classes), dtype=np.float64)

    def search_and_vote(start: int) -> None:  # each chunk writes its own rows of scores
        stop = min(start + chunk_size, m)
        sims, idx = index.search(query[start:stop], n_search)  # (q, n_search) each
        if leave_one_out:
            sims, idx = _drop_self(sims, idx, offset=start)
        scores[start:stop] = _weighted_vote(sims, labels[idx], tau=tau, num_classes=num_classes)

    starts = range(0, m, chunk_size)
    if use_gpu:  # one device: the chunks go through it one after another
        for start in starts:
            search_and_vote(start)
    else:
        thread_map(search_and_vote, starts)  # concurrent searches are safe on a CPU index
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"tau={tau} is too small: exp(sim / tau) overflows; use tau >= 0.002.")
    return scores.argmax(axis=1).astype(np.int64), scores


def knn_eval(
    bank_x: Any,
    bank_y: Any,
    query_x: Any | None = None,
    query_y: Any | None = None,
    *,
    k: int = 20,
    tau: float = 0.07,
    gpu: bool | None = None,
) -> dict[str, float | int]:
    """Top-1 accuracy of :func:`knn_predict`.

    Args:
        bank_x: (N, D) reference embeddings.
        bank_y: (N,) labels of any sortable kind (mapped to class indices here).
        query_x: (M, D) query embeddings, or ``None`` for leave-one-out on the bank.
        query_y: (M,) labels of ``query_x``; required with it, must be ``None`` without.
            Query classes absent from the bank can never be predicted and count as wrong.
        k, tau, gpu: as in :func:`knn_predict`.

    Returns:
        ``{"top1": accuracy in [0, 1], "k": k}``.
    """
    if (query_x is None) != (query_y is None):
        raise ValueError("pass query_x and query_y together, or neither for leave-one-out on the bank.")
    by = np.asarray(bank_y)
    qy = by if query_y is None else np.asarray(query_y)
    if by.ndim != 1 or qy.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shapes {by.shape} and {qy.shape}.")
    # Shared class indices for bank and query labels.
    classes, codes = np.unique(np.concatenate([by, qy]), return_inverse=True)
    bank_codes, query_codes = codes[: by.shape[0]], codes[by.shape[0] :]
    if query_x is None:
        preds, _ = knn_predict(
            bank_x, bank_codes, bank_x, k=k, tau=tau, num_classes=len(classes), leave_one_out=True, gpu=gpu
        )
    else:
        preds, _ = knn_predict(
            bank_x, bank_codes, query_x, k=k, tau=tau, num_classes=len(classes), gpu=gpu
        )
        if preds.shape[0] != query_codes.shape[0]:
            raise ValueError(
                f"query_x has {preds.shape[0]} rows but query_y has {query_codes.shape[0]} labels."
            )
    return {"top1": float(np.mean(preds == query_codes)), "k": int(k)}
