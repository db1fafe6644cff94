"""Weighted k-nearest-neighbour classification of embeddings (InstDisc / DINO protocol).

Cosine similarity as inner products of L2-normalised float32 rows; each of the k neighbours
votes for its label with weight ``exp(sim / tau)``; the class with the largest summed weight
wins. Queries are processed in chunks, so memory stays at O(chunk_size * k) per thread however
large the bank and query sets are (no N x N matrix). On CPU the chunks are searched in parallel
threads, faiss single-threaded in each (why: ``sslkit.evaluate.cluster``); a faiss GPU is used
when one is available.

Two searches:

- **exact** (:func:`knn_predict`): every query against every bank row with faiss's brute-force
  ``knn_inner_product`` (BLAS), reading the normalised bank in place (no index copy on CPU).
  Its cost is 2 * M * N * D flops, bounded by the CPU's matrix-multiply peak: a leave-one-out
  pass over 1,000,000 rows of 128 dimensions is 2.6e14 flops, about 70 minutes on 2 shared cores
  (``bench/knn.py``).
- **approximate** (:func:`knn_eval` with ``exact_max`` below N, ``sslkit evaluate`` above
  ``eval.knn_exact_max``): on CPU a faiss ``IndexHNSWFlat`` graph (inner product, 16 links per
  node, ``efConstruction`` 40), on a GPU (or with ``index="ivf"``) an ``IndexIVFFlat`` with
  nlist = 4 sqrt(N) lists trained on a seeded sample. The search breadth (HNSW's ``efSearch``,
  from 32, x 1.5 at each try; IVF's ``nprobe``, doubled from 8) is the smallest whose recall@k against exact
  search reaches ``target_recall`` on a seeded sample of queries; the recall is then measured
  again on a second, disjoint sample and reported. The index holds one float32 copy of the bank
  (IVF: rows normalised block by block on the way in; HNSW: from one normalised copy, released
  once the graph is built). HNSW rather than IVF on CPU: the IVF scan
  reads every probed list from memory for each query, and at the probes a 0.95 recall needs on
  1M x 128 it was only 2x faster than the exact search (``bench/RESULTS.md``); the graph visits a
  few thousand rows per query. The graph is built on faiss's threads, so the order of insertion,
  and with it the last digits of the recall and the votes, can differ between runs unless faiss
  runs on one thread (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, Optional

import faiss
import numpy as np

from sslkit.evaluate.cluster import ROW_BLOCK, as_features, resolve_gpu, thread_map, training_sample

__all__ = ["knn_predict", "knn_eval", "knn_recall"]

_DEFAULT_CHUNK = 4096  # queries per chunk: faiss's own block, and ~50 tasks for 200k queries
_FIRST_NPROBE = 8  # lists probed first while choosing nprobe; doubled until the recall target is met
_HNSW_M = 16  # graph links per node: recall 0.97 at efSearch 64 on 1M x 128, about half HNSW32's build time
_HNSW_EF_CONSTRUCTION = 40  # faiss's default
_FIRST_EF, _LAST_EF = 32, 4096  # efSearch tried first while choosing it (x 1.5 each time), and the most tried
_TRAIN_PER_LIST = 64  # IVF training sample: rows per list (faiss asks for at least 39)
# faiss multiplies (query block x 1,024 bank rows) and then scans that tile into the k-heaps. Its default
# query block of 4,096 makes a 16 MB tile per thread, which leaves the caches before the scan reads it;
# 1,024 queries (a 4 MB tile) ran the exact search 20-30 % faster on 2 cores (bench/RESULTS.md). The
# neighbours found do not depend on the block.
_QUERY_BLOCK = 1024


@contextmanager
def _query_block() -> Iterator[None]:
    """faiss's brute-force search with ``_QUERY_BLOCK`` queries per BLAS block, restored afterwards."""
    before = faiss.cvar.distance_compute_blas_query_bs
    faiss.cvar.distance_compute_blas_query_bs = _QUERY_BLOCK
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_query_bs = before


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


def _drop_self(sims: np.ndarray, idx: np.ndarray, *, self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own bank index from its k+1 neighbours -> k neighbours.

    sims, idx: (q, k+1); query row r is bank point ``self_ids[r]``. When the point itself
    is not among the results (exact duplicates can tie with it; an approximate search can
    miss it), the last, least similar, neighbour is dropped instead.
    """
    q, kp1 = idx.shape
    keep = idx != np.asarray(self_ids)[:, None]  # (q, k+1)
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
    # One normalised copy when the queries are the bank (leave-one-out), not two.
    query = bank if query_x is bank_x else as_features(query_x, name="query_x", normalize=True)
    labels = _as_class_indices(bank_y, name="bank_y", n=bank.shape[0])
    chunk_size, num_classes = _check_knn_args(bank, labels, query, k=k, tau=tau, num_classes=num_classes,
                                              leave_one_out=leave_one_out, chunk_size=chunk_size)
    use_gpu = resolve_gpu(gpu)
    search = _exact_searcher(bank, k + int(leave_one_out), gpu=use_gpu)
    with _query_block():
        scores = _vote_chunks(search, lambda start, stop: query[start:stop], query.shape[0], labels, tau=tau,
                              num_classes=num_classes, leave_one_out=leave_one_out, chunk_size=chunk_size,
                              gpu=use_gpu)
    return scores.argmax(axis=1).astype(np.int64), scores


Search = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (q, D) unit rows -> sims, bank ids (q, n)


def _exact_searcher(bank: np.ndarray, n_search: int, *, gpu: bool) -> Search:
    """Brute-force inner-product search of ``n_search`` neighbours in the (N, D) unit rows ``bank``.

    On CPU through faiss's ``knn_inner_product`` on the array itself: what ``IndexFlatIP.search``
    runs, without the copy of the bank an index would hold. On a GPU through a flat GPU index."""
    if gpu:
        index = faiss.IndexFlatIP(bank.shape[1])
        index.add(bank)
        gpu_index = faiss.index_cpu_to_all_gpus(index)
        return lambda query: gpu_index.search(query, n_search)
    return lambda query: faiss.knn(query, bank, n_search, metric=faiss.METRIC_INNER_PRODUCT)


def _vote_chunks(search: Search, queries: Callable[[int, int], np.ndarray], m: int, labels: np.ndarray, *,
                 tau: float, num_classes: int, leave_one_out: bool, chunk_size: int, gpu: bool) -> np.ndarray:
    """(M, C) float64 vote scores of M queries, ``queries(start, stop)`` giving each chunk's unit rows;
    with ``leave_one_out`` query i is bank point i and is dropped from its own neighbours."""
    scores = np.empty((m, num_classes), dtype=np.float64)

    def search_and_vote(bounds: tuple[int, int]) -> None:  # each chunk writes its own rows of scores
        start, stop = bounds
        sims, idx = search(queries(start, stop))  # (q, n_search) each
        if leave_one_out:
            sims, idx = _drop_self(sims, idx, self_ids=np.arange(start, stop))
        scores[start:stop] = _weighted_vote(sims, labels[idx], tau=tau, num_classes=num_classes)

    if gpu:  # one device: the chunks go through it one after another
        for bounds in even_chunks(m, chunk_size):
            search_and_vote(bounds)
    else:
        thread_map(search_and_vote, even_chunks(m, chunk_size))  # concurrent searches are safe on CPU
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"tau={tau} is too small: exp(sim / tau) overflows; use tau >= 0.002.")
    return scores


def even_chunks(m: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, stop) of ceil(m / chunk_size) chunks of as equal sizes as can be, none above ``chunk_size``.

    Equal, not ``chunk_size`` and a remainder: a remainder below faiss's BLAS threshold (1,000 queries
    at D = 128) would be searched about 5x slower per query than the rest (5,000 queries in chunks of
    4,096 and 904 took longer than in two of 2,500)."""
    count = -(-m // chunk_size)
    edges = [m * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def knn_recall(approx_ids: Any, exact_ids: Any) -> float:
    """Recall@k of an approximate search: the mean over queries of the share of each query's k exact
    neighbours (``exact_ids``, (q, k) bank indices) that the approximate search also returned
    (``approx_ids``, (q, k); -1 for a place it could not fill, which never counts). Order is ignored."""
    approx, exact = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx.shape != exact.shape or approx.ndim != 2 or approx.size == 0:
        raise ValueError(f"approx_ids and exact_ids must both be (q, k) with q, k >= 1, got shapes "
                         f"{approx.shape} and {exact.shape}.")
    found = (exact[:, :, None] == approx[:, None, :]).any(axis=2) & (exact >= 0)  # (q, k)
    return float(found.mean())


def _unit_rows(x: np.ndarray, rows: Optional[np.ndarray] = None, start: int = 0, stop: Optional[int] = None
               ) -> np.ndarray:
    """L2-normalised float32 copy of ``x[rows]`` or ``x[start:stop]``: one block, not the whole array."""
    return as_features(x[rows] if rows is not None else x[start:stop], normalize=True)


def _ivf_index(x: np.ndarray, *, seed: int, gpu: bool) -> tuple[Any, int]:
    """An ``IndexIVFFlat`` (inner product) over the unit rows of ``x`` and its number of lists: 4 sqrt(N),
    at most N / 39 (faiss's least training rows per list), trained on a seeded sample of 64 rows per list
    and filled block by block, so no normalised copy of ``x`` is made beside the index's own."""
    n, d = x.shape
    nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed) % 2**31
    sample = training_sample(n, _TRAIN_PER_LIST * nlist, seed=seed)
    index.train(_unit_rows(x, sample) if sample is not None else _unit_rows(x))
    for start in range(0, n, ROW_BLOCK):
        index.add(_unit_rows(x, start=start, stop=start + ROW_BLOCK))
    return (faiss.index_cpu_to_all_gpus(index) if gpu else index), nlist


def _exact_neighbours(x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(q, k) bank ids of the k exact nearest neighbours (cosine, leave-one-out) of the bank rows ``rows``,
    searched block by block through the bank (each block normalised on its own) and merged."""
    queries, n_search = _unit_rows(x, rows), k + 1

    def block(start: int) -> tuple[np.ndarray, np.ndarray]:
        sims, idx = faiss.knn(queries, _unit_rows(x, start=start, stop=start + ROW_BLOCK), n_search,
                              metric=faiss.METRIC_INNER_PRODUCT)
        return sims, np.where(idx >= 0, idx + start, -1)  # -1: a block with fewer rows than n_search

    heap = faiss.ResultHeap(len(rows), n_search, keep_max=True)
    with _query_block():
        blocks = thread_map(block, range(0, x.shape[0], ROW_BLOCK))
    for sims, idx in blocks:
        heap.add_result(sims, idx)
    heap.finalize()
    return _drop_self(heap.D, heap.I, self_ids=rows)[1]


class _Approximate(NamedTuple):
    index: Any
    search: str  # "hnsw" | "ivf": the knn block's "search"
    knob: str  # the search-breadth parameter (faiss ParameterSpace name)
    breadth_key: str  # the knn block's name for it
    growth: float  # each try multiplies the breadth by this
    first: int  # its first value tried, grown until the recall target is met
    last: int  # its largest value (IVF: every list, an exact search)
    info: dict[str, Any]  # what else the knn block says about the index

    def grow(self, value: int) -> int:
        return math.ceil(value * self.growth)


def _hnsw_index(x: np.ndarray, *, k: int) -> _Approximate:
    """An ``IndexHNSWFlat`` (inner product) over the unit rows of ``x``.

    All rows go in with one ``add``: a graph filled block by block (65,536 rows a call) capped the recall@20
    of 1M x 128 rows at 0.87 whatever the efSearch, against 0.97 at efSearch 64 in one call. So a normalised
    copy of ``x`` exists beside the index's own while the graph is built, and is released after."""
    index = faiss.IndexHNSWFlat(x.shape[1], _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
    index.add(_unit_rows(x))
    # efSearch grows by half per try: its cost is about linear in it, and at 1M x 128 recall@20 0.95 lay
    # between 32 and 64
    return _Approximate(index, "hnsw", "efSearch", "ef_search", 1.5, max(_FIRST_EF, k + 1), max(_LAST_EF, k + 1),
                        {"hnsw_m": _HNSW_M})


def _approximate_index(x: np.ndarray, *, kind: str, k: int, seed: int, gpu: bool) -> _Approximate:
    """The index ``kind`` ("auto": HNSW on CPU, IVF on a GPU, where faiss has no HNSW)."""
    if kind not in ("auto", "hnsw", "ivf"):
        raise ValueError(f"index must be 'auto', 'hnsw' or 'ivf', got {kind!r}.")
    if kind == "hnsw" and gpu:
        raise ValueError("faiss has no HNSW index on the GPU; use index='ivf' or 'auto'.")
    if kind == "hnsw" or (kind == "auto" and not gpu):
        return _hnsw_index(x, k=k)
    index, nlist = _ivf_index(x, seed=seed, gpu=gpu)
    return _Approximate(index, "ivf", "nprobe", "nprobe", 2.0, min(_FIRST_NPROBE, nlist), nlist,
                        {"nlist": int(nlist)})


def _tune(x: np.ndarray, approx: _Approximate, *, k: int, gpu: bool, seed: int, target_recall: float,
          recall_queries: int) -> tuple[int, float, int]:
    """Set ``approx.index`` to the smallest search breadth (``approx.first``, then grown) whose recall@k against
    exact search reaches ``target_recall`` on ``recall_queries`` seeded bank rows; return that breadth, the
    recall@k measured on as many other rows (which did not choose it) and their number."""
    n = x.shape[0]
    picks = np.random.default_rng(seed).choice(n, size=min(n, 2 * recall_queries), replace=False)
    tune, check = np.sort(picks[: len(picks) // 2]), np.sort(picks[len(picks) // 2:])
    truth = _exact_neighbours(x, np.concatenate([tune, check]), k)

    def neighbours(rows: np.ndarray) -> np.ndarray:
        sims, idx = approx.index.search(_unit_rows(x, rows), k + 1)
        return _drop_self(sims, idx, self_ids=rows)[1]

    value = approx.first
    while True:
        _set_parameter(approx.index, approx.knob, value, gpu=gpu)
        if value >= approx.last or knn_recall(neighbours(tune), truth[: len(tune)]) >= target_recall:
            break
        value = min(approx.grow(value), approx.last)
    return value, knn_recall(neighbours(check), truth[len(tune):]), len(check)


def _approximate_loo(x: np.ndarray, labels: np.ndarray, *, k: int, tau: float, num_classes: int, gpu: bool,
                     seed: int, target_recall: float, recall_queries: int, index: str = "auto",
                     ) -> tuple[np.ndarray, dict[str, Any]]:
    """Leave-one-out kNN predictions of the (N, D) rows ``x`` through an approximate index (module
    docstring), and what the ``knn`` block says about the search: the index, its search breadth,
    recall@k and its query count."""
    approx = _approximate_index(x, kind=index, k=k, seed=seed, gpu=gpu)
    value, recall, checked = _tune(x, approx, k=k, gpu=gpu, seed=seed, target_recall=target_recall,
                                   recall_queries=recall_queries)
    search: Search = lambda query: approx.index.search(query, k + 1)  # noqa: E731
    scores = _vote_chunks(search, lambda start, stop: _unit_rows(x, start=start, stop=stop), x.shape[0], labels,
                          tau=tau, num_classes=num_classes, leave_one_out=True, chunk_size=_DEFAULT_CHUNK, gpu=gpu)
    return scores.argmax(axis=1).astype(np.int64), {
        "search": approx.search, **approx.info, approx.breadth_key: int(value),
        "recall_at_k": recall, "recall_queries": int(checked), "recall_target": float(target_recall)}


def _set_parameter(index: Any, name: str, value: int, *, gpu: bool) -> None:
    """Set the search breadth ``name`` from now on (before the searches start, not during them)."""
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, name, int(value))


def knn_eval(
    bank_x: Any,
    bank_y: Any,
    query_x: Any | None = None,
    query_y: Any | None = None,
    *,
    k: int = 20,
    tau: float = 0.07,
    gpu: bool | None = None,
    exact_max: int | None = None,
    seed: int = 0,
    target_recall: float = 0.95,
    recall_queries: int = 1000,
    index: str = "auto",
) -> dict[str, Any]:
    """Top-1 accuracy of the kNN vote: exact (:func:`knn_predict`), or approximate for a
    leave-one-out on a bank of more than ``exact_max`` rows (module docstring).

    Args:
        bank_x: (N, D) reference embeddings (a memory map is read block by block).
        bank_y: (N,) labels of any sortable kind (mapped to class indices here).
        query_x: (M, D) query embeddings, or ``None`` for leave-one-out on the bank.
        query_y: (M,) labels of ``query_x``; required with it, must be ``None`` without.
            Query classes absent from the bank can never be predicted and count as wrong.
        k, tau, gpu: as in :func:`knn_predict`.
        exact_max: leave-one-out on more than this many rows searches an approximate index;
            ``None``: always exact. A separate query set is always searched exactly.
        seed: seeds the IVF training sample and the recall queries.
        target_recall: the recall@k on the tuning queries that decides the search breadth.
        recall_queries: queries the reported recall@k is measured on (and as many tune the breadth).
        index: the approximate index: ``"auto"`` (HNSW on CPU, IVF on a GPU), ``"hnsw"`` or ``"ivf"``.

    Returns:
        ``{"top1": accuracy in [0, 1], "k": k, "search": "exact"}``; an approximate search says
        ``"search": "hnsw"`` with ``hnsw_m`` and ``ef_search``, or ``"search": "ivf"`` with ``nlist``
        and ``nprobe``, and adds ``recall_at_k`` (against exact search), ``recall_queries`` and
        ``recall_target``.
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
    info: dict[str, Any] = {"search": "exact"}
    if query_x is None and exact_max is not None and len(by) > exact_max:
        bank = as_features(bank_x, name="bank_x")  # checked; a float32 memory map stays on disk
        labels = _as_class_indices(bank_codes, name="bank_y", n=bank.shape[0])
        _check_knn_args(bank, labels, bank, k=k, tau=tau, num_classes=len(classes), leave_one_out=True,
                        chunk_size=_DEFAULT_CHUNK)
        preds, info = _approximate_loo(bank, labels, k=k, tau=tau, num_classes=len(classes), gpu=resolve_gpu(gpu),
                                       seed=seed, target_recall=target_recall, recall_queries=recall_queries,
                                       index=index)
    elif query_x is None:
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
    return {"top1": float(np.mean(preds == query_codes)), "k": int(k), **info}
