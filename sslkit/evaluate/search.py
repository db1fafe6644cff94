"""Inner-product top-k search as matrix products: exact, and list by list through a coarse partition.

**Exact** (:func:`exact_search`): the queries are multiplied with the bank one block of rows at a
time (``torch.mm``, the CPU's fastest float32 matrix product here), and each tile of similarities
is reduced to its top k without sorting it. :class:`TopK` keeps, for every query, its k best so
far and their smallest value, the query's *threshold*; a (queries x bank rows) tile is first
reduced to the largest value of every group of 64 consecutive bank rows per query (one
vectorised pass over the tile), and only the groups whose maximum beats the query's threshold
are copied out and looked at further. Once a few blocks are in, a query's threshold is near its
final k-th similarity and few groups pass: the product and that one pass dominate, instead of a
scan of every similarity into a heap (``bench/knn.py`` measures the rate against the CPU's
matrix-multiply peak). The result is exact; only ties at the k-th value may be resolved
differently from another exact search.

**By lists** (:class:`ListSearch`, the approximate leave-one-out search of ``sslkit evaluate``
on CPU): the bank is partitioned by spherical k-means into about sqrt(N) lists and copied,
L2-normalised, in list order. The members of one list are searched together, as the queries of
one exact search, against the union of the ``probe`` nearest lists of each member (by centroid
similarity). Every query therefore sees at least its own ``probe`` nearest lists, as in an
inverted-file (IVF) search with that many probes, usually many more; and since its list's
members share the search, it runs as matrix products too, rather than one scan per query. Its
recall against exact search is measured by the caller, who picks ``probe``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import faiss
import numpy as np
import torch

from sslkit.evaluate.cluster import ROW_BLOCK, as_features, training_sample

__all__ = ["Scratch", "TopK", "exact_search", "ListSearch", "as_tensor", "unit_rows"]

GROUP = 64  # bank rows per group whose largest similarity is compared with each query's threshold
# bank rows per matrix product and queries per TopK: a (2,048 x 1,024) tile of similarities (8 MB), which ran
# about 10 % faster than 1,024 x 1,024 on 2 cores (fewer small operations per product); the bank block is
# reused by every query block while it is in cache
BANK_BLOCK = 1024
QUERY_BLOCK = 2048
_TRAIN_PER_LIST = 64  # k-means training rows per list
GATHER_MIN = 256  # queries from which a list's search copies the rows it searches into one array


def unit_rows(x: np.ndarray, rows: Optional[np.ndarray] = None, start: int = 0, stop: Optional[int] = None
              ) -> np.ndarray:
    """L2-normalised float32 copy of ``x[rows]`` or ``x[start:stop]``: one block, not the whole array."""
    return as_features(x[rows] if rows is not None else x[start:stop], normalize=True)


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing the memory of the float32 array ``x`` (read-only arrays included: the
    search never writes to it, so torch's warning about non-writable arrays does not apply)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x)


class Scratch:
    """A float32 buffer handed out as (rows, cols) tiles, grown when too small: the query blocks of one
    search take turns with it, so one tile stays in cache rather than one per block."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0)

    def tile(self, rows: int, cols: int) -> torch.Tensor:
        if self._buffer.numel() < rows * cols:
            self._buffer = torch.empty(rows * cols)
        return self._buffer[: rows * cols].view(rows, cols)


class TopK:
    """The k largest inner products of the rows of ``queries`` (q, D) with bank rows added block by block.

    :meth:`add` a block of bank rows with their ids; :meth:`result` gives the (q, k) similarities in
    descending order and their ids (-1 where fewer than k rows were added). See the module docstring.
    """

    def __init__(self, queries: torch.Tensor, k: int, *, scratch: Optional[Scratch] = None) -> None:
        """``scratch``: shared by TopKs that add blocks one after another (by default, one of its own)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        self.queries, self.k = queries, int(k)
        q = queries.shape[0]
        self.values = torch.full((q, self.k), -math.inf)
        self.ids = torch.full((q, self.k), -1, dtype=torch.int64)
        self.threshold = torch.full((q,), -math.inf)  # the k-th best so far: only larger values can enter
        self.seen = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (query, id, value)
        self._pending_count = 0
        self._scratch = scratch or Scratch()

    def add(self, block: torch.Tensor, ids: torch.Tensor) -> None:
        """Bank rows ``block`` (b, D) with their ids (b,) int64."""
        b, q = block.shape[0], self.queries.shape[0]
        if b == 0:
            return
        tile = self._scratch.tile(q, b)  # (queries, bank rows): a query's similarities lie side by side
        torch.mm(self.queries, block.T, out=tile)
        if self.seen < self.k:  # no threshold yet: merge this block's best rows directly
            values, where = torch.topk(tile, min(self.k, b), dim=1)
            self._merge_dense(values, ids[where])
        else:
            grouped = b // GROUP * GROUP
            if grouped:
                self._collect_groups(tile[:, :grouped].unflatten(1, (-1, GROUP)), ids)
            if grouped < b:  # the last rows, fewer than a group: compared one by one
                query, col = torch.nonzero(tile[:, grouped:] > self.threshold[:, None], as_tuple=True)
                self._keep(query, ids[grouped + col], tile[query, grouped + col])
        self.seen += b

    def _collect_groups(self, groups: torch.Tensor, ids: torch.Tensor) -> None:
        """Keep every similarity in ``groups`` (q, groups, GROUP) above its query's threshold."""
        group_max = torch.amax(groups, dim=2)  # (q, groups): one pass over the tile
        query, group = torch.nonzero(group_max > self.threshold[:, None], as_tuple=True)
        if query.numel() == 0:
            return
        values = groups[query, group]  # (hits, GROUP): each hit's similarities, copied side by side
        hit, col = torch.nonzero(values > self.threshold[query][:, None], as_tuple=True)
        self._keep(query[hit], ids[group[hit] * GROUP + col], values[hit, col])

    def _keep(self, query: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Pending candidates; merged, and the thresholds raised, once there are more than k per query."""
        if query.numel() == 0:
            return
        self._pending.append((query, ids, values))
        self._pending_count += query.numel()
        if self._pending_count > self.values.numel():
            self._merge_pending()

    def _merge_dense(self, values: torch.Tensor, ids: torch.Tensor) -> None:
        merged = torch.cat([self.values, values], dim=1)
        self.values, where = torch.topk(merged, self.k, dim=1)
        self.ids = torch.gather(torch.cat([self.ids, ids], dim=1), 1, where)
        self.threshold = self.values[:, -1].clone()

    def _merge_pending(self) -> None:
        if not self._pending:
            return
        query, ids, values = (torch.cat(parts) for parts in zip(*self._pending))
        self._pending, self._pending_count = [], 0
        q = self.values.shape[0]
        counts = torch.bincount(query, minlength=q)
        order = torch.argsort(query, stable=True)
        query, ids, values = query[order], ids[order], values[order]
        slot = torch.arange(query.numel()) - (torch.cumsum(counts, 0) - counts)[query]  # place within its query
        width = int(counts.max())
        dense_values = torch.full((q, width), -math.inf)
        dense_ids = torch.full((q, width), -1, dtype=torch.int64)
        dense_values[query, slot] = values
        dense_ids[query, slot] = ids
        self._merge_dense(dense_values, dense_ids)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k) similarities, largest first, and their bank ids."""
        self._merge_pending()
        return self.values, self.ids


def exact_search(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest inner products of each of the (q, D) ``queries`` with the (N, D) ``bank`` rows:
    float32 similarities (q, k), largest first, and int64 bank indices, as ``faiss.knn`` returns them.

    Runs on the calling thread with torch's current thread count (``thread_map`` makes it one)."""
    q_all, bank_t = as_tensor(np.ascontiguousarray(queries, dtype=np.float32)), as_tensor(bank)
    blocks = ((bank_t[s:s + BANK_BLOCK], torch.arange(s, min(s + BANK_BLOCK, bank_t.shape[0])))
              for s in range(0, bank_t.shape[0], BANK_BLOCK))
    return _top_k(q_all, k, blocks)


def _top_k(queries: torch.Tensor, k: int, blocks: Any) -> tuple[np.ndarray, np.ndarray]:
    """(q, k) similarities and ids of the ``queries`` against ``blocks`` of (bank rows, their ids): the query
    blocks share one scratch tile and each bank block while it is in cache."""
    scratch = Scratch()
    tops = [TopK(queries[start:start + QUERY_BLOCK], k, scratch=scratch)
            for start in range(0, queries.shape[0], QUERY_BLOCK)]
    for block, ids in blocks:
        for top in tops:
            top.add(block, ids)
    values, ids = zip(*(top.result() for top in tops))
    return torch.cat(values).numpy(), torch.cat(ids).numpy()


class ListSearch:
    """Leave-one-out top-k search of the unit rows of ``x`` list by list (module docstring).

    Holds one L2-normalised float32 copy of ``x`` in list order (``rows``), the bank index of each of
    its rows (``order``), where each list starts (``offsets``) and the list centroids."""

    def __init__(self, x: np.ndarray, *, seed: int) -> None:
        n, d = x.shape
        self.nlist = max(1, min(round(math.sqrt(n)), n // 39 or 1))
        sample = training_sample(n, _TRAIN_PER_LIST * self.nlist, seed=seed)
        kmeans = faiss.Kmeans(d, self.nlist, niter=10, spherical=True, seed=int(seed) % 2**31,
                              max_points_per_centroid=_TRAIN_PER_LIST)
        kmeans.train(unit_rows(x, sample))
        self.centroids = torch.from_numpy(np.ascontiguousarray(kmeans.centroids, dtype=np.float32))
        nearest = np.concatenate([self._nearest_lists(as_tensor(unit_rows(x, None, s, s + ROW_BLOCK)), 1)[:, 0].numpy()
                                  for s in range(0, n, ROW_BLOCK)])
        self.order = np.argsort(nearest, kind="stable")
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(nearest, minlength=self.nlist))])
        self.rows = np.empty((n, d), dtype=np.float32)
        for s in range(0, n, ROW_BLOCK):  # gathered block by block: no second full copy
            self.rows[s:s + ROW_BLOCK] = unit_rows(x, self.order[s:s + ROW_BLOCK])
        self.position = np.empty(n, dtype=np.int64)  # where each bank row lies in ``rows``
        self.position[self.order] = np.arange(n)
        self.list_of = nearest  # each bank row's list
        self._rows_t, self._order_t = as_tensor(self.rows), torch.from_numpy(self.order)
        self._searched: dict[tuple[int, int], torch.Tensor] = {}

    def _nearest_lists(self, unit: torch.Tensor, probe: int) -> torch.Tensor:
        return torch.topk(unit @ self.centroids.T, min(probe, self.nlist), dim=1).indices

    def members(self, lst: int) -> slice:
        return slice(int(self.offsets[lst]), int(self.offsets[lst + 1]))

    def searched_lists(self, lst: int, probe: int) -> torch.Tensor:
        """The lists the members of ``lst`` search: the union of each member's ``probe`` nearest (and
        ``lst`` itself, whatever rounding says about a member near a boundary), ``lst`` first and then by
        the similarity of their centroid to its centroid. Nearest first, the members' thresholds rise
        at once and few similarities of the later lists pass them."""
        if (lst, probe) not in self._searched:  # kept: the breadth choice and the pass ask again
            nearest = self._nearest_lists(self._rows_t[self.members(lst)], probe)
            lists = torch.unique(torch.cat([torch.tensor([lst]), nearest.flatten()]))
            closeness = self.centroids[lists] @ self.centroids[lst]
            closeness[lists == lst] = math.inf
            self._searched[(lst, probe)] = lists[torch.argsort(closeness, descending=True)]
        return self._searched[(lst, probe)]

    def _blocks(self, lists: list[int], gather: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The rows of ``lists`` and their bank ids: list by list, or, with ``gather``, copied into one array
        and cut into ``BANK_BLOCK`` rows (a list holds about sqrt(N) rows: products that small lose more to
        their overhead than the copy costs)."""
        if not gather:
            return [(self._rows_t[self.members(lst)], self._order_t[self.members(lst)]) for lst in lists]
        where = torch.cat([torch.arange(int(self.offsets[lst]), int(self.offsets[lst + 1])) for lst in lists])
        rows, ids = self._rows_t[where], self._order_t[where]
        return [(rows[s:s + BANK_BLOCK], ids[s:s + BANK_BLOCK]) for s in range(0, len(where), BANK_BLOCK)]

    def search_list(self, lst: int, probe: int, k: int, positions: Optional[np.ndarray] = None
                    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Top-k similarities and bank ids of the members of ``lst`` (or of the rows at ``positions``
        within it, which search the same lists), each row itself included, and how many bank rows
        each of them was compared with."""
        queries = self._rows_t[self.members(lst)] if positions is None else self._rows_t[torch.from_numpy(positions)]
        blocks = self._blocks(self.searched_lists(lst, probe).tolist(), gather=queries.shape[0] >= GATHER_MIN)
        values, ids = _top_k(queries, k, blocks)
        return values, ids, sum(block.shape[0] for block, _ in blocks)
