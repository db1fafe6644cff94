"""Weighted k-nearest-neighbour classification of embeddings (InstDisc / DINO protocol).

Cosine similarity as inner products of L2-normalised float32 rows; each of the k neighbours
votes for its label with weight ``exp(sim / tau)``; the class with the largest summed weight
wins. Queries are processed in chunks, so memory stays at O(chunk_size * k) per thread however
large the bank and query sets are (no N x N matrix). On CPU the chunks are searched in parallel
threads, faiss single-threaded in each (why: ``sslkit.evaluate.cluster``); a faiss GPU is used
when one is available.

Two searches:

- **exact** (:func:`knn_predict`): every query against every bank row as matrix products whose
  tiles are reduced to each query's top k without a heap scan of every similarity
  (:func:`~sslkit.evaluate.search.exact_search`), reading the normalised bank in place (no index
  copy on CPU); on a GPU a flat faiss index. Its cost is 2 * M * N * D flops, bounded by the
  CPU's matrix-multiply peak: a leave-one-out pass over 1,000,000 rows of 128 dimensions is
  2.6e14 flops, a quarter of an hour or more on 2 cores (``bench/knn.py``).
- **approximate** (:func:`knn_eval` with ``exact_max`` below N, ``sslkit evaluate`` above
  ``eval.knn_exact_max``), leave-one-out only: on CPU the search by lists of
  :class:`~sslkit.evaluate.search.ListSearch` (about sqrt(N) spherical k-means lists; a list's
  members search together, as matrix products, the union of each member's ``probe`` nearest
  lists); on a GPU (or with ``index="ivf"``) a faiss ``IndexIVFFlat`` with nlist = 4 sqrt(N)
  lists trained on a seeded sample; ``index="hnsw"`` a faiss ``IndexHNSWFlat`` graph (16 links
  per node, ``efConstruction`` 40). The search breadth (``probe``, doubled from 2; IVF's
  ``nprobe``, doubled from 8; HNSW's ``efSearch``, from 32, x 1.5 at each try) is the smallest
  whose recall@k against exact search reaches ``target_recall`` on a seeded sample of queries;
  the recall is then measured again on a second, disjoint sample and reported. Each holds one
  float32 copy of the bank (lists: normalised and gathered block by block in list order; IVF:
  normalised block by block on the way in; HNSW: from one normalised copy, released once the
  graph is built). Why lists on CPU: an IVF scan reads every probed list from memory for each
  query, and at the probes a 0.95 recall needs on 1M x 128 it was only 2x faster than exact
  search; an HNSW graph reached 0.95 at 13x per query, but building it took longer than a
  quarter of the exact search it replaced; searching a list's members together keeps the work
  in matrix products (``bench/RESULTS.md``). HNSW's graph is built on faiss's threads, so its
  recall and votes can differ in the last digits between runs unless faiss runs on one thread
  (``OMP_NUM_THREADS=1``); the other two are seeded and repeat exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import faiss
import numpy as np

from sslkit.evaluate.cluster import ROW_BLOCK, as_features, resolve_gpu, thread_map, training_sample, worker_threads
from sslkit.evaluate.search import ListSearch, exact_search, unit_rows

__all__ = ["knn_predict", "knn_eval", "knn_recall"]

_DEFAULT_CHUNK = 4096  # queries per chunk: two query blocks of the exact search, ~50 tasks for 200k queries
_FIRST_NPROBE = 8  # lists probed first while choosing nprobe; doubled until the recall target is met
_FIRST_PROBE = 2  # each query's nearest lists searched first by the search by lists; doubled likewise
_HNSW_M = 16  # graph links per node: recall 0.97 at efSearch 64 on 1M x 128, about half HNSW32's build time
_HNSW_EF_CONSTRUCTION = 40  # faiss's default
_FIRST_EF, _LAST_EF = 32, 4096  # efSearch tried first while choosing it (x 1.5 each time), and the most tried
_TRAIN_PER_LIST = 64  # IVF training sample: rows per list (faiss asks for at least 39)


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
        chunk_size = _DEFAULT_CHUNK
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
        chunk_size: queries searched and voted per chunk, one thread each (bounds memory;
            the result depends on it only through the float32 rounding of the products).
            Default 4,096: two blocks of 2,048 queries that share each block of bank rows
            while it is in cache; larger chunks leave threads idle when the queries are few.
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
    scores = _vote_chunks(search, lambda start, stop: query[start:stop], query.shape[0], labels, tau=tau,
                          num_classes=num_classes, leave_one_out=leave_one_out, chunk_size=chunk_size, gpu=use_gpu)
    return scores.argmax(axis=1).astype(np.int64), scores


Search = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (q, D) unit rows -> sims, bank ids (q, n)


def _exact_searcher(bank: np.ndarray, n_search: int, *, gpu: bool) -> Search:
    """Brute-force inner-product search of ``n_search`` neighbours in the (N, D) unit rows ``bank``.

    On CPU through :func:`~sslkit.evaluate.search.exact_search` on the array itself (no copy of the
    bank). On a GPU through a flat faiss GPU index."""
    if gpu:
        index = faiss.IndexFlatIP(bank.shape[1])
        index.add(bank)
        gpu_index = faiss.index_cpu_to_all_gpus(index)
        return lambda query: gpu_index.search(query, n_search)
    return lambda query: exact_search(query, bank, n_search)


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
        thread_map(search_and_vote, even_chunks(m, chunk_size, workers=worker_threads()))  # safe on CPU
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"tau={tau} is too small: exp(sim / tau) overflows; use tau >= 0.002.")
    return scores


def even_chunks(m: int, chunk_size: int, *, workers: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of chunks of as equal sizes as can be, none above ``chunk_size``: ceil(m / chunk_size)
    of them, rounded up to a multiple of ``workers`` (while every chunk keeps a row), so that no thread
    is left with one chunk more than the others (5 chunks on 2 threads keep one idle for a sixth of the
    time). Equal, not ``chunk_size`` and a remainder, so no chunk is a sliver."""
    count = -(-m // chunk_size)
    count = min(m, -(-count // workers) * workers) if m else 0
    edges = [m * i // count for i in range(count + 1)] if count else [0]
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


def _ivf_index(x: np.ndarray, *, seed: int, gpu: bool) -> tuple[Any, int]:
    """An ``IndexIVFFlat`` (inner product) over the unit rows of ``x`` and its number of lists: 4 sqrt(N),
    at most N / 39 (faiss's least training rows per list), trained on a seeded sample of 64 rows per list
    and filled block by block, so no normalised copy of ``x`` is made beside the index's own."""
    n, d = x.shape
    nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed) % 2**31
    sample = training_sample(n, _TRAIN_PER_LIST * nlist, seed=seed)
    index.train(unit_rows(x, sample) if sample is not None else unit_rows(x))
    for start in range(0, n, ROW_BLOCK):
        index.add(unit_rows(x, start=start, stop=start + ROW_BLOCK))
    return (faiss.index_cpu_to_all_gpus(index) if gpu else index), nlist


def _exact_neighbours(x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(q, k) bank ids of the k exact nearest neighbours (cosine, leave-one-out) of the bank rows ``rows``,
    searched block by block through the bank (each block normalised on its own) and merged."""
    queries, n_search = unit_rows(x, rows), k + 1

    def block(start: int) -> tuple[np.ndarray, np.ndarray]:
        bank = unit_rows(x, start=start, stop=start + ROW_BLOCK)
        sims, idx = exact_search(queries, bank, min(n_search, bank.shape[0]))
        return sims, idx + start

    heap = faiss.ResultHeap(len(rows), n_search, keep_max=True)
    for sims, idx in thread_map(block, range(0, x.shape[0], ROW_BLOCK)):
        pad = n_search - sims.shape[1]  # a last block with fewer rows than n_search
        heap.add_result(np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf),
                        np.pad(idx, ((0, 0), (0, pad)), constant_values=-1))
    heap.finalize()
    return _drop_self(heap.D, heap.I, self_ids=rows)[1]


Neighbours = Callable[[np.ndarray, int], np.ndarray]  # (bank rows, breadth) -> (q, k) leave-one-out bank ids
Scores = Callable[[int], np.ndarray]  # breadth -> (N, C) leave-one-out vote scores of every bank row


class _Approximate(NamedTuple):
    search: str  # "lists" | "hnsw" | "ivf": the knn block's "search"
    breadth_key: str  # the knn block's name for the search breadth
    growth: float  # each try multiplies the breadth by this
    first: int  # its first value tried, grown until the recall target is met
    last: int  # its largest value (lists, IVF: every list, an exact search)
    info: dict[str, Any]  # what else the knn block says about the index
    neighbours: Neighbours
    scores: Scores

    def grow(self, value: int) -> int:
        return math.ceil(value * self.growth)


def _faiss_search(x: np.ndarray, index: Any, knob: str, *, k: int, gpu: bool, vote: dict[str, Any]
                  ) -> tuple[Neighbours, Scores]:
    """The ``neighbours`` and ``scores`` of a faiss index whose search breadth is the parameter ``knob``."""

    def neighbours(rows: np.ndarray, value: int) -> np.ndarray:
        _set_parameter(index, knob, value, gpu=gpu)
        sims, idx = index.search(unit_rows(x, rows), k + 1)
        return _drop_self(sims, idx, self_ids=rows)[1]

    def scores(value: int) -> np.ndarray:
        _set_parameter(index, knob, value, gpu=gpu)
        search: Search = lambda query: index.search(query, k + 1)  # noqa: E731
        return _vote_chunks(search, lambda start, stop: unit_rows(x, start=start, stop=stop), x.shape[0],
                            leave_one_out=True, chunk_size=_DEFAULT_CHUNK, gpu=gpu, **vote)

    return neighbours, scores


def _hnsw_index(x: np.ndarray, *, k: int, vote: dict[str, Any]) -> _Approximate:
    """An ``IndexHNSWFlat`` (inner product) over the unit rows of ``x``.

    All rows go in with one ``add``: a graph filled block by block (65,536 rows a call) capped the recall@20
    of 1M x 128 rows at 0.87 whatever the efSearch, against 0.97 at efSearch 64 in one call. So a normalised
    copy of ``x`` exists beside the index's own while the graph is built, and is released after."""
    index = faiss.IndexHNSWFlat(x.shape[1], _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION
    index.add(unit_rows(x))
    # efSearch grows by half per try: its cost is about linear in it, and at 1M x 128 recall@20 0.95 lay
    # between 32 and 64
    return _Approximate("hnsw", "ef_search", 1.5, max(_FIRST_EF, k + 1), max(_LAST_EF, k + 1), {"hnsw_m": _HNSW_M},
                        *_faiss_search(x, index, "efSearch", k=k, gpu=False, vote=vote))


def _list_index(x: np.ndarray, *, k: int, seed: int, vote: dict[str, Any]) -> _Approximate:
    """The search list by list of :class:`~sslkit.evaluate.search.ListSearch`: its breadth is ``probe``, each
    query's nearest lists that are surely searched."""
    lists = ListSearch(x, seed=seed)

    def neighbours(rows: np.ndarray, value: int) -> np.ndarray:
        out = np.empty((len(rows), k), dtype=np.int64)
        where = lists.list_of[rows]

        def one_list(lst: int) -> None:
            mine = np.nonzero(where == lst)[0]
            sims, idx, _ = lists.search_list(lst, value, k + 1, positions=lists.position[rows[mine]])
            out[mine] = _drop_self(sims, idx, self_ids=rows[mine])[1]

        thread_map(one_list, np.unique(where).tolist())
        return out

    def scores(value: int) -> np.ndarray:
        out = np.empty((x.shape[0], vote["num_classes"]), dtype=np.float64)
        searched = np.zeros(lists.nlist, dtype=np.int64)

        def one_list(lst: int) -> None:
            sims, idx, searched[lst] = lists.search_list(lst, value, k + 1)
            members = lists.order[lists.members(lst)]
            sims, idx = _drop_self(sims, idx, self_ids=members)
            out[members] = _weighted_vote(sims, vote["labels"][idx], tau=vote["tau"], num_classes=vote["num_classes"])

        thread_map(one_list, [lst for lst in range(lists.nlist) if lists.offsets[lst + 1] > lists.offsets[lst]])
        # the share of the n x n products an exact search computes that this one computed
        info["searched_share"] = float(searched @ np.diff(lists.offsets)) / float(x.shape[0]) ** 2
        return out

    info: dict[str, Any] = {"nlist": int(lists.nlist)}
    return _Approximate("lists", "probe", 2.0, min(_FIRST_PROBE, lists.nlist), lists.nlist, info, neighbours, scores)


def _approximate_index(x: np.ndarray, *, kind: str, k: int, seed: int, gpu: bool, vote: dict[str, Any]
                       ) -> _Approximate:
    """The search ``kind`` ("auto": by lists on CPU, IVF on a GPU)."""
    if kind not in ("auto", "lists", "hnsw", "ivf"):
        raise ValueError(f"index must be 'auto', 'lists', 'hnsw' or 'ivf', got {kind!r}.")
    if kind in ("hnsw", "lists") and gpu:
        raise ValueError(f"index={kind!r} runs on CPU only; use index='ivf' or 'auto' with a GPU.")
    if kind == "hnsw":
        return _hnsw_index(x, k=k, vote=vote)
    if kind == "lists" or (kind == "auto" and not gpu):
        return _list_index(x, k=k, seed=seed, vote=vote)
    index, nlist = _ivf_index(x, seed=seed, gpu=gpu)
    return _Approximate("ivf", "nprobe", 2.0, min(_FIRST_NPROBE, nlist), nlist, {"nlist": int(nlist)},
                        *_faiss_search(x, index, "nprobe", k=k, gpu=gpu, vote=vote))


def _tune(x: np.ndarray, approx: _Approximate, *, k: int, seed: int, target_recall: float,
          recall_queries: int) -> tuple[int, float, int]:
    """The smallest search breadth (``approx.first``, then grown) whose recall@k against exact search reaches
    ``target_recall`` on ``recall_queries`` seeded bank rows; with the recall@k measured at it on as many
    other rows (which did not choose it) and their number."""
    n = x.shape[0]
    picks = np.random.default_rng(seed).choice(n, size=min(n, 2 * recall_queries), replace=False)
    tune, check = np.sort(picks[: len(picks) // 2]), np.sort(picks[len(picks) // 2:])
    truth = _exact_neighbours(x, np.concatenate([tune, check]), k)
    value = approx.first
    while value < approx.last and knn_recall(approx.neighbours(tune, value), truth[: len(tune)]) < target_recall:
        value = min(approx.grow(value), approx.last)
    return value, knn_recall(approx.neighbours(check, value), truth[len(tune):]), len(check)


def _approximate_loo(x: np.ndarray, labels: np.ndarray, *, k: int, tau: float, num_classes: int, gpu: bool,
                     seed: int, target_recall: float, recall_queries: int, index: str = "auto",
                     ) -> tuple[np.ndarray, dict[str, Any]]:
    """Leave-one-out kNN predictions of the (N, D) rows ``x`` through an approximate search (module
    docstring), and what the ``knn`` block says about it: the search, its breadth, recall@k and its
    query count."""
    vote = {"labels": labels, "tau": tau, "num_classes": num_classes}
    approx = _approximate_index(x, kind=index, k=k, seed=seed, gpu=gpu, vote=vote)
    value, recall, checked = _tune(x, approx, k=k, seed=seed, target_recall=target_recall,
                                   recall_queries=recall_queries)
    scores = approx.scores(value)
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
        seed: seeds the k-means of the lists, the IVF training sample and the recall queries.
        target_recall: the recall@k on the tuning queries that decides the search breadth.
        recall_queries: queries the reported recall@k is measured on (and as many tune the breadth).
        index: the approximate search: ``"auto"`` (by lists on CPU, IVF on a GPU), ``"lists"``, ``"hnsw"``
            or ``"ivf"``.

    Returns:
        ``{"top1": accuracy in [0, 1], "k": k, "search": "exact"}``; an approximate search says
        ``"search": "lists"`` with ``nlist``, ``probe`` and ``searched_share`` (the share of an exact
        search's products it computed), ``"search": "hnsw"`` with ``hnsw_m`` and ``ef_search``, or
        ``"search": "ivf"`` with ``nlist`` and ``nprobe``, and adds ``recall_at_k`` (against exact
        search), ``recall_queries`` and ``recall_target``.
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
