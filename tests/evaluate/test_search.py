"""Tests of sslkit.evaluate.search: the pruned top-k of the exact search against a float64 brute force,
and the search by lists against its definition (exact search over the lists it says it searched)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslkit.evaluate import search
from sslkit.evaluate.search import ListSearch, TopK, exact_search


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ bank.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


@pytest.mark.parametrize(("n", "q", "k"), [(1000, 37, 5), (333, 130, 21), (64, 8, 64), (7, 3, 4)])
def test_exact_search_equals_brute_force(monkeypatch: pytest.MonkeyPatch, n: int, q: int, k: int) -> None:
    # small blocks and groups: many blocks, a last partial group, query blocks of unequal size, k above a block
    monkeypatch.setattr(search, "BANK_BLOCK", 24)
    monkeypatch.setattr(search, "GROUP", 8)
    monkeypatch.setattr(search, "QUERY_BLOCK", 50)
    rng = np.random.default_rng(n + q)
    bank, queries = _unit(rng.normal(size=(n, 16))), _unit(rng.normal(size=(q, 16)))
    values, ids = exact_search(queries, bank, k)
    want_values, want_ids = _brute(queries, bank, k)
    assert values.shape == ids.shape == (q, k) and values.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, want_ids)  # random rows: no ties, so the order is the brute force's
    np.testing.assert_allclose(values, want_values, atol=1e-5)


def test_rising_similarities_keep_raising_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bank sorted from least to most similar: every block beats the last one's thresholds, the most
    # candidates the pruning can meet, and the pending merges must run many times.
    monkeypatch.setattr(search, "BANK_BLOCK", 16)
    monkeypatch.setattr(search, "GROUP", 4)
    rng = np.random.default_rng(3)
    query = _unit(rng.normal(size=(1, 8)))
    bank = _unit(rng.normal(size=(2000, 8)))
    bank = bank[np.argsort(bank @ query[0])]
    queries = np.repeat(query, 40, axis=0)
    merges = 0
    merge = TopK._merge_pending

    def counting(self: TopK) -> None:
        nonlocal merges
        merges += bool(self._pending)
        merge(self)

    monkeypatch.setattr(TopK, "_merge_pending", counting)
    values, ids = exact_search(queries, bank, 10)
    assert merges > 10
    assert (ids == np.arange(1999, 1989, -1)).all()
    np.testing.assert_allclose(values[0], np.sort(bank @ query[0])[::-1][:10], atol=1e-6)


def test_duplicates_and_a_bank_smaller_than_k() -> None:
    rng = np.random.default_rng(0)
    row = _unit(rng.normal(size=(1, 6)))
    bank = np.concatenate([np.repeat(row, 5, axis=0), _unit(rng.normal(size=(3, 6)))])
    values, ids = exact_search(row, bank, 5)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]  # the five copies, in any order among themselves
    np.testing.assert_allclose(values[0], 1.0, atol=1e-6)
    values, ids = exact_search(row, bank, 10)  # 8 rows for 10 places: the last two stay empty
    assert (ids[0, 8:] == -1).all() and np.isneginf(values[0, 8:]).all() and sorted(ids[0, :8]) == list(range(8))
    with pytest.raises(ValueError, match="k must be >= 1"):
        TopK(torch.zeros(1, 6), 0)


def _lists_data(n: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 24)) * 2
    return (centres[rng.integers(0, 12, n)] + rng.normal(size=(n, 24))).astype(np.float32)


def test_lists_partition_the_bank() -> None:
    x = _lists_data()
    lists = ListSearch(x, seed=0)
    assert lists.nlist == round(np.sqrt(3000))
    assert np.array_equal(np.sort(lists.order), np.arange(3000)) and lists.offsets[-1] == 3000
    np.testing.assert_allclose(lists.rows, _unit(x[lists.order]), atol=1e-6)  # normalised, in list order
    assert (lists.order[lists.position] == np.arange(3000)).all()
    for lst in range(lists.nlist):  # every row lies in the list of its nearest centroid
        members = lists.order[lists.members(lst)]
        assert (lists.list_of[members] == lst).all()
    nearest = np.argmax(_unit(x) @ lists.centroids.numpy().T, axis=1)
    assert (nearest == lists.list_of).mean() > 0.999  # rounding may move a row on a boundary, no more


@pytest.mark.parametrize("probe", [1, 2, 5])
def test_a_list_is_searched_exactly_over_the_lists_it_names(probe: int) -> None:
    x = _lists_data(seed=1)
    lists = ListSearch(x, seed=1)
    unit, centroids = _unit(x), lists.centroids.numpy()
    for lst in (0, 7, lists.nlist - 1):
        members = lists.order[lists.members(lst)]
        named = lists.searched_lists(lst, probe).numpy()
        own = np.argsort(-(unit[members] @ centroids.T), axis=1)[:, :probe]
        assert np.isin(own, named).all() and lst in named  # each member's probe nearest lists, at least
        searched = np.flatnonzero(np.isin(lists.list_of, named))
        values, ids, compared = lists.search_list(lst, probe, 6)
        assert compared == len(searched)
        want_values, want = _brute(unit[members], unit[searched], 6)
        np.testing.assert_array_equal(ids, searched[want])
        np.testing.assert_allclose(values, want_values, atol=1e-5)
        subset = lists.members(lst).start + np.array([0, 2])  # two members alone search the same lists
        part_values, part, _ = lists.search_list(lst, probe, 6, positions=subset)
        np.testing.assert_array_equal(part, ids[[0, 2]])
    everything = lists.search_list(3, lists.nlist, 4)[1]  # probing every list is exact search
    np.testing.assert_array_equal(everything, _brute(unit[lists.order[lists.members(3)]], unit, 4)[1])
