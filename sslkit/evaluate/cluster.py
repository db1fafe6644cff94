"""k-means on embeddings with ``faiss.Kmeans`` (GPU build used when present).

FAISS is imported only inside ``sslkit.evaluate``. For large N, :func:`kmeans` trains on a
seeded uniform sample of ``max_train_points`` rows, drawn here, and then assigns every
point to the final centroids. ``faiss.Kmeans`` would otherwise subsample silently to
``max_points_per_centroid * k`` rows, so that limit is always set above
the number of rows it is given.

On CPU, the restarts run in parallel threads with faiss single-threaded in each. faiss's
own OpenMP splits every search into many short parallel regions; when the cores are
shared with other processes each region waits for a descheduled thread, and two OpenMP
threads ran 8-19x slower than one on a loaded 2-core machine. Whole tasks per thread
keep the parallelism coarse, as scikit-learn's k-means does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, TypeVar

import faiss
import numpy as np
import torch

from sslkit.evaluate.metrics import cluster_metrics

__all__ = ["faiss_gpu_available", "as_features", "whiten", "kmeans", "cluster_eval"]

_T = TypeVar("_T")
_R = TypeVar("_R")

# faiss's Clustering seeds restart r with seed + r * 15486557: the same seeds make the
# parallel restarts here give exactly what faiss's own ``nredo`` loop gives.
_REDO_SEED_STRIDE = 15486557
_ASSIGN_CHUNK = 65536  # rows per assignment task: ~10 ms of work each, few tasks


def faiss_gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    return bool(hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)


def worker_threads() -> int:
    """Threads for faiss work on CPU: faiss's OpenMP limit (``OMP_NUM_THREADS`` or
    ``faiss.omp_set_num_threads``), so the usual knob still caps it."""
    return max(1, int(faiss.omp_get_max_threads()))


def thread_map(fn: Callable[[_T], _R], items: Sequence[_T], *, workers: int | None = None) -> list[_R]:
    """``[fn(item) for item in items]`` on ``workers`` threads, faiss and torch single-threaded in each.

    faiss and torch release the GIL while they compute, so the threads run in parallel. torch's
    thread count is process-wide: it is one while the tasks run and restored afterwards. The results
    come back in the order of ``items`` and do not depend on the number of workers.
    """
    workers = min(len(items), workers or worker_threads()) or 1
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=faiss.omp_set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(torch_threads)


ROW_BLOCK = 65536  # rows per block when checking, converting or normalising features


def as_features(x: Any, *, name: str = "x", normalize: bool = False) -> np.ndarray:
    """Validate embeddings and return them as a C-contiguous float32 (N, D) array.

    A C-contiguous float32 input (a memory-mapped ``.npy`` included) is returned as a read-only
    view, not copied. Otherwise, or with ``normalize``, the result is one new float32 array,
    filled block by block, so the temporaries stay at one block of rows however large N is;
    the input is never modified.

    Args:
        x: (N, D) array-like of embeddings (numpy, a memory map or a CPU torch tensor).
        name: what to call ``x`` in error messages.
        normalize: L2-normalise each row (all-zero rows stay zero).

    Raises:
        ValueError: when ``x`` is not 2-D, is empty, or holds NaN/inf.
    """
    src = np.asarray(x)
    if src.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array of embeddings, got shape {src.shape}.")
    if src.shape[0] == 0 or src.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {src.shape}); pass at least one embedding.")
    as_is = src.dtype == np.float32 and src.flags.c_contiguous and not normalize
    out = src.view() if as_is else np.empty(src.shape, dtype=np.float32)
    if as_is:
        out.flags.writeable = False  # a view of the caller's array: never written through
    bad = 0
    for start in range(0, src.shape[0], ROW_BLOCK):
        block = np.asarray(src[start:start + ROW_BLOCK], dtype=np.float32)
        bad += int((~np.isfinite(block)).any(axis=1).sum())
        if normalize:  # numpy rather than faiss.normalize_L2, whose OpenMP loop suffers on shared cores
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            block = block / np.where(norms > 0, norms, 1.0).astype(np.float32)[:, None]  # zero rows stay zero
        if not as_is:
            out[start:start + len(block)] = block
    if bad:
        raise ValueError(
            f"{name} has NaN or inf values in {bad} of {src.shape[0]} rows; "
            "check the encoder outputs (e.g. a diverged run) before evaluating."
        )
    return out


WHITEN_FIT_ROWS = 100_000  # rows the whitening PCA is fitted on (a seeded sample above this)


def whiten(x: np.ndarray, dims: int, *, normalize: bool, seed: int = 0,
           fit_rows: Optional[int] = WHITEN_FIT_ROWS) -> np.ndarray:
    """(N, D) -> (N, min(dims, D, N)) float32: PCA-whitened (unit variance along each principal direction,
    scikit-learn's ``PCA(whiten=True)``), then L2-normalised again with ``normalize``. A direction that
    holds most of the variance (image brightness, stain) then weighs no more in k-means than the rest.

    The PCA is fitted in float64 on a seeded sample of ``fit_rows`` rows (``None``: every row) and applied
    65,536 rows at a time, so beside ``x`` only the float32 result is held, however large N is."""
    from sklearn.decomposition import PCA

    n = x.shape[0]
    dims = min(dims, x.shape[1], n)
    sample = training_sample(n, fit_rows, seed=seed)
    pca = PCA(n_components=dims, whiten=True, random_state=seed)
    pca.fit(np.asarray(x[sample] if sample is not None else x, dtype=np.float64))
    out = np.empty((n, dims), dtype=np.float32)
    for start in range(0, n, ROW_BLOCK):
        out[start:start + ROW_BLOCK] = as_features(pca.transform(np.asarray(x[start:start + ROW_BLOCK],
                                                                            dtype=np.float64)), normalize=normalize)
    return out


def resolve_gpu(gpu: bool | None) -> bool:
    """``None`` -> whether a faiss GPU is available; ``True`` requires one."""
    if gpu is None:
        return faiss_gpu_available()
    if gpu and not faiss_gpu_available():
        raise ValueError(
            "gpu=True but faiss has no usable GPU (CPU-only build or no device visible); "
            "install the 'gpu' extra (faiss-gpu-cu12) or pass gpu=None/False."
        )
    return bool(gpu)


def _check_kmeans_args(
    n: int, k: int, restarts: int, niter: int, max_train_points: int | None, tol: float
) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if n < k:
        raise ValueError(
            f"k-means with k={k} needs at least k points but got N={n}; "
            "lower k or pass more embeddings."
        )
    if restarts < 1 or niter < 1:
        raise ValueError(f"restarts and niter must be >= 1, got {restarts} and {niter}.")
    if max_train_points is not None and max_train_points < k:
        raise ValueError(
            f"max_train_points={max_train_points} is smaller than k={k}; set eval.kmeans_max_train "
            "to at least k (or null to train on all points)."
        )
    if not 0.0 <= tol < 1.0:
        raise ValueError(f"tol must be in [0, 1), got {tol}.")


def training_sample(n: int, max_train_points: int | None, *, seed: int) -> np.ndarray | None:
    """Sorted row indices of the seeded uniform training sample, or None for all N rows."""
    if max_train_points is None or n <= max_train_points:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_train_points, replace=False))


def _assign(arr: np.ndarray, centroids: np.ndarray, *, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: (N,) squared L2 distances and (N,) int64 indices."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    if gpu:
        sq_dist, assign = faiss.index_cpu_to_all_gpus(index).search(arr, 1)
        return sq_dist[:, 0], assign[:, 0].astype(np.int64)
    n = arr.shape[0]
    sq_dist = np.empty(n, dtype=np.float32)
    assign = np.empty(n, dtype=np.int64)

    def search(start: int) -> None:  # each task writes its own rows
        stop = min(start + _ASSIGN_CHUNK, n)
        dist, idx = index.search(arr[start:stop], 1)  # concurrent searches are safe on CPU
        sq_dist[start:stop], assign[start:stop] = dist[:, 0], idx[:, 0]

    thread_map(search, range(0, n, _ASSIGN_CHUNK))
    return sq_dist, assign


def sample_size(limit: int | None, k: int) -> int | None:
    """The ``max_train_points`` that evaluation uses: ``limit`` (``eval.kmeans_max_train``) but never
    fewer than faiss's own 256 points per cluster, so a large k is not starved; None: all points."""
    return None if limit is None else max(int(limit), 256 * int(k))


def kmeans(
    x: Any,
    *,
    k: int,
    restarts: int = 5,
    niter: int = 50,
    seed: int = 0,
    max_train_points: int | None = None,
    tol: float = 1e-4,
    gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means with ``faiss.Kmeans`` (k-means++ seeding), best of ``restarts`` runs.

    Each run seeds with k-means++ and does Lloyd iterations until the objective improves
    by less than ``tol`` (relative) or ``niter`` is reached. The run with the lowest
    training objective is kept, and then all N points are assigned to its centroids.

    Args:
        x: (N, D) embeddings; converted to contiguous float32.
        k: number of clusters, 1 <= k <= N.
        restarts: independent runs (faiss ``nredo``); run r is seeded with
            ``seed + r * 15486557`` as in faiss, so the result equals faiss's own loop.
        niter: most Lloyd iterations per run.
        seed: seeds the training sample and the runs.
        max_train_points: train on a seeded uniform sample of this many rows when
            N exceeds it; ``None`` trains on all N rows. Assignment always covers all N.
        tol: stop a run once ``(obj_prev - obj) / obj_prev < tol`` (faiss's
            ``early_stop_threshold``); 0 runs ``niter`` iterations unless the objective
            stops changing.
        gpu: ``None`` uses a faiss GPU when one is available, ``False`` never does,
            ``True`` requires one.

    Returns:
        assignments: (N,) int64 cluster index of each point.
        centroids: (k, D) float32.
        objective: sum over all N points of the squared L2 distance to the assigned
            centroid (comparable to scikit-learn's ``KMeans.inertia_``).

    Raises:
        ValueError: for N < k, k < 1, ``max_train_points`` < k, NaN/inf in ``x``, or
            ``gpu=True`` without a GPU.
    """
    arr = as_features(x)
    n, d = arr.shape
    _check_kmeans_args(n, k, restarts, niter, max_train_points, tol)
    sample = training_sample(n, max_train_points, seed=seed)
    train = arr if sample is None else arr[sample]
    use_gpu = resolve_gpu(gpu)

    def run(run_seed: int) -> tuple[float, np.ndarray]:
        km = faiss.Kmeans(
            d,
            int(k),
            niter=int(niter),
            nredo=1,
            seed=run_seed,
            # Above the sample size, so faiss trains on every row it is given.
            max_points_per_centroid=math.ceil(train.shape[0] / k) + 1,
            init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
            early_stop_threshold=float(tol),
            verbose=False,
            gpu=use_gpu,
        )
        km.train(train)
        # faiss keeps the restart with the lowest last objective; so does min() below.
        return float(km.obj[-1]), np.asarray(km.centroids, dtype=np.float32)

    seeds = [(int(seed) + r * _REDO_SEED_STRIDE) % 2**31 for r in range(restarts)]
    runs = [run(s) for s in seeds] if use_gpu else thread_map(run, seeds)
    centroids = min(runs, key=lambda r: r[0])[1]
    sq_dist, assign = _assign(arr, centroids, gpu=use_gpu)
    return assign, centroids, float(np.sum(sq_dist, dtype=np.float64))


def cluster_eval(
    x: Any,
    labels: Any,
    *,
    k: int | None = None,
    restarts: int = 5,
    niter: int = 50,
    seed: int = 0,
    max_train_points: int | None = None,
    normalize: bool = True,
) -> dict[str, float | int]:
    """Cluster embeddings with :func:`kmeans` and score the clusters against labels.

    Args:
        x: (N, D) embeddings.
        labels: (N,) ground-truth classes.
        k: number of clusters; default the number of distinct labels.
        restarts, niter, seed, max_train_points: passed to :func:`kmeans`.
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
        max_train_points=max_train_points,
    )
    out: dict[str, float | int] = dict(cluster_metrics(y, assign))
    out["k"] = int(k)
    return out
