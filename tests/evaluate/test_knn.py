"""Tests of sslkit.evaluate.knn against a hand-worked vote and an independent torch kNN."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch

from sslkit.evaluate import faiss_gpu_available, knn_eval, knn_predict, knn_recall


def _torch_knn(bank, bank_y, query, *, k, tau, num_classes, leave_one_out=False):
    """Reference: cosine matmul + topk + exp(sim / tau) vote, all in torch."""
    b = torch.nn.functional.normalize(torch.as_tensor(bank, dtype=torch.float64), dim=1)
    q = torch.nn.functional.normalize(torch.as_tensor(query, dtype=torch.float64), dim=1)
    sim = q @ b.T  # (M, N)
    if leave_one_out:
        sim.fill_diagonal_(-float("inf"))
    top_sim, top_idx = sim.topk(k, dim=1)  # (M, k)
    labels = torch.as_tensor(bank_y)[top_idx]
    scores = torch.zeros(q.shape[0], num_classes, dtype=torch.float64)
    scores.scatter_add_(1, labels, (top_sim / tau).exp())
    return scores.argmax(1).numpy(), scores.numpy()


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_agrees_with_torch_reference(leave_one_out: bool) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 32))
    bank_y = rng.integers(0, 5, size=600)
    bank = centers[bank_y] * 0.4 + rng.normal(size=(600, 32))
    query = bank if leave_one_out else rng.normal(size=(200, 32)) + centers[rng.integers(0, 5, 200)] * 0.4
    preds, scores = knn_predict(
        bank, bank_y, query, k=20, tau=0.07, num_classes=5, leave_one_out=leave_one_out
    )
    ref_preds, ref_scores = _torch_knn(
        bank, bank_y, query, k=20, tau=0.07, num_classes=5, leave_one_out=leave_one_out
    )
    np.testing.assert_array_equal(preds, ref_preds)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4)
    assert len(np.unique(preds)) > 1  # not a degenerate all-one-class case


def test_hand_worked_vote() -> None:
    # Bank (not normalised on purpose): b0 = (2, 0) class 0, b1 = (0, 5) class 1,
    # b2 = (3, 3) class 1. Query (1, 0). Cosine sims: 1, 0, 1/sqrt(2).
    bank = np.array([[2.0, 0.0], [0.0, 5.0], [3.0, 3.0]])
    bank_y = np.array([0, 1, 1])
    query = np.array([[1.0, 0.0]])
    s = 1 / math.sqrt(2)
    # tau = 0.5: class 0 = e^2 = 7.389; class 1 = e^0 + e^(2s) = 1 + 4.113 = 5.113 -> 0.
    preds, scores = knn_predict(bank, bank_y, query, k=3, tau=0.5)
    np.testing.assert_allclose(scores[0], [math.exp(2), 1 + math.exp(2 * s)], rtol=1e-6)
    assert preds[0] == 0
    # tau = 1: class 0 = e = 2.718; class 1 = 1 + e^s = 1 + 2.028 = 3.028 -> 1.
    preds, scores = knn_predict(bank, bank_y, query, k=3, tau=1.0)
    np.testing.assert_allclose(scores[0], [math.e, 1 + math.exp(s)], rtol=1e-6)
    assert preds[0] == 1
    # k = 2 keeps b0 and b2 only: class 1 = e^s = 2.028 < e -> 0.
    preds, scores = knn_predict(bank, bank_y, query, k=2, tau=1.0)
    np.testing.assert_allclose(scores[0], [math.e, math.exp(s)], rtol=1e-6)
    assert preds[0] == 0


def _triplet_bank() -> tuple[np.ndarray, np.ndarray]:
    # 8 well-separated groups of 3 nearby points labelled 0, 1, 2: every point's
    # neighbours inside its group carry the two other labels.
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(8, 16)) * 10
    x = np.repeat(centers, 3, axis=0) + rng.normal(size=(24, 16)) * 0.05
    y = np.tile(np.arange(3), 8)
    return x, y


def test_leave_one_out_excludes_self() -> None:
    x, y = _triplet_bank()
    # Without leave-one-out, each query finds itself first (sim 1, the largest weight),
    # and the other two labels get one smaller vote each -> always right.
    assert knn_eval(x, y, x, y, k=1)["top1"] == 1.0
    assert knn_eval(x, y, x, y, k=3)["top1"] == 1.0
    # Leave-one-out: the neighbours are the two others in the group -> always wrong.
    assert knn_eval(x, y, k=1)["top1"] == 0.0
    assert knn_eval(x, y, k=2)["top1"] == 0.0


def test_leave_one_out_with_exact_duplicates_keeps_k_neighbours() -> None:
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = np.array([0, 1, 0, 1])
    preds, scores = knn_predict(x, y, x, k=1, tau=0.1, leave_one_out=True)
    # Each point's only other point at sim 1 is its duplicate, whose label differs.
    np.testing.assert_array_equal(preds, [1, 0, 1, 0])
    np.testing.assert_allclose(scores.sum(axis=1), math.exp(10), rtol=1e-6)


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_chunking_does_not_change_result(leave_one_out: bool) -> None:
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(300, 12))
    bank_y = rng.integers(0, 4, size=300)
    query = bank if leave_one_out else rng.normal(size=(101, 12))
    kwargs = dict(k=10, tau=0.07, leave_one_out=leave_one_out)
    p_one, s_one = knn_predict(bank, bank_y, query, chunk_size=10_000, **kwargs)
    for chunk in (1, 7, 64):
        p, s = knn_predict(bank, bank_y, query, chunk_size=chunk, **kwargs)
        np.testing.assert_array_equal(p, p_one)
        # the matrix product may round the last bit of a float32 similarity differently for another query count
        np.testing.assert_allclose(s, s_one, rtol=1e-5)


def test_knn_eval_arbitrary_labels_and_errors() -> None:
    x, y = _triplet_bank()
    names = np.array(["lymph", "tumour", "stroma"])[y]
    assert knn_eval(x, names, x, names, k=1)["top1"] == 1.0
    with pytest.raises(ValueError, match="k=30 is out of range for a bank of 24 points"):
        knn_eval(x, y, k=30)
    with pytest.raises(ValueError, match="together"):
        knn_eval(x, y, x)
    with pytest.raises(ValueError, match="dimension 3 but bank_x has 16"):
        knn_predict(x, y, np.ones((2, 3)))
    with pytest.raises(ValueError, match="integer class indices"):
        knn_predict(x, names, x)


def test_result_does_not_depend_on_thread_count() -> None:
    rng = np.random.default_rng(4)
    bank = rng.normal(size=(500, 16))
    bank_y = rng.integers(0, 3, size=500)
    p_many, s_many = knn_predict(bank, bank_y, bank, k=7, leave_one_out=True, chunk_size=64, gpu=False)
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)  # one worker thread: the chunks run one by one
        p_one, s_one = knn_predict(bank, bank_y, bank, k=7, leave_one_out=True, chunk_size=64, gpu=False)
    finally:
        faiss.omp_set_num_threads(before)
    np.testing.assert_array_equal(p_many, p_one)
    np.testing.assert_array_equal(s_many, s_one)


@pytest.mark.skipif(faiss_gpu_available(), reason="a faiss GPU is present")
def test_gpu_true_without_gpu_raises() -> None:
    x, y = _triplet_bank()
    with pytest.raises(ValueError, match="no usable GPU"):
        knn_predict(x, y, x, k=2, gpu=True)
    with pytest.raises(ValueError, match="no usable GPU"):
        knn_eval(x, y, k=2, gpu=True)
    # gpu=None falls back to the CPU without a GPU and gives the CPU result.
    assert knn_eval(x, y, k=1, gpu=None) == knn_eval(x, y, k=1, gpu=False)


# ---------------------------------------------------------------- approximate search above exact_max


def test_recall_by_hand() -> None:
    approx = np.array([[1, 2, 3], [4, 5, -1]])
    exact = np.array([[3, 2, 9], [4, 6, 7]])
    # Row 0 finds 3 and 2 of {3, 2, 9}: 2/3; row 1 finds 4 of {4, 6, 7}: 1/3 (-1 never counts).
    assert knn_recall(approx, exact) == pytest.approx(0.5)
    assert knn_recall(exact, exact) == 1.0
    with pytest.raises(ValueError, match="must both be"):
        knn_recall(approx[:, :2], exact)


def _clustered(n: int, d: int = 16, classes: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 1.5
    y = rng.integers(0, classes, size=n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_exact_neighbours_merge_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from sslkit.evaluate import knn

    x, _ = _clustered(203)
    rows = np.array([0, 5, 100, 202])
    sims = torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float64), dim=1)
    sims = sims[rows] @ sims.T
    sims[torch.arange(4), torch.as_tensor(rows)] = -float("inf")
    expected = sims.topk(7, dim=1).indices.numpy()
    monkeypatch.setattr(knn, "ROW_BLOCK", 50)  # five blocks, the last one of 3 rows (fewer than k + 1)
    got = knn._exact_neighbours(x, rows, 7)
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(expected, axis=1))


def test_approximate_search_above_exact_max(tmp_path) -> None:
    x, y = _clustered(4000)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")  # read block by block, as sslkit evaluate does
    exact = knn_eval(x, y, k=10, gpu=False)
    assert exact["search"] == "exact" and set(exact) == {"top1", "k", "search"}
    assert knn_eval(x, y, k=10, gpu=False, exact_max=4000) == exact  # at the threshold: still exact
    approx = knn_eval(mapped, y, k=10, gpu=False, exact_max=3999, recall_queries=300, seed=1, index="ivf")
    assert approx["search"] == "ivf" and approx["k"] == 10
    assert approx["nlist"] == 4000 // 39  # 4 sqrt(N) = 253 lists would be too few rows per list
    assert approx["recall_queries"] == 300 and approx["recall_target"] == 0.95
    assert 0.95 <= approx["recall_at_k"] <= 1.0 and 8 <= approx["nprobe"] < approx["nlist"]
    assert abs(approx["top1"] - exact["top1"]) < 0.01 and approx["top1"] > 0.5
    again = knn_eval(mapped, y, k=10, gpu=False, exact_max=3999, recall_queries=300, seed=1, index="ivf")
    assert again == approx  # seeded: the same index, nprobe, recall and votes


def test_cpu_default_searches_by_lists(tmp_path) -> None:
    x, y = _clustered(4000)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    exact = knn_eval(x, y, k=10, gpu=False)
    approx = knn_eval(mapped, y, k=10, gpu=False, exact_max=3999, recall_queries=300, seed=1)
    assert approx["search"] == "lists" and approx["nlist"] == round(math.sqrt(4000))
    assert approx["probe"] >= 2 and approx["recall_queries"] == 300
    assert 0.95 <= approx["recall_at_k"] <= 1.0 and 0.0 < approx["searched_share"] < 1.0
    assert abs(approx["top1"] - exact["top1"]) < 0.01
    assert knn_eval(mapped, y, k=10, gpu=False, exact_max=3999, recall_queries=300, seed=1) == approx  # seeded
    # an unreachable target doubles the probe up to every list: then every pair is compared, as exact search does
    wide = knn_eval(x, y, k=10, gpu=False, exact_max=100, recall_queries=300, seed=1, target_recall=1.01)
    assert wide["probe"] == wide["nlist"] and wide["searched_share"] == pytest.approx(1.0)
    assert wide["recall_at_k"] == pytest.approx(1.0) and wide["top1"] == pytest.approx(exact["top1"])


def test_hnsw_graph_on_request(tmp_path, monkeypatch) -> None:
    from sslkit.evaluate import knn

    x, y = _clustered(4000)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    exact = knn_eval(x, y, k=10, gpu=False)
    monkeypatch.setattr(knn, "_FIRST_EF", 2)  # start below k + 1: efSearch is never below the k + 1 neighbours
    approx = knn_eval(mapped, y, k=10, gpu=False, exact_max=3999, recall_queries=300, seed=1, index="hnsw")
    assert approx["search"] == "hnsw" and approx["hnsw_m"] == knn._HNSW_M
    assert approx["ef_search"] >= 11 and approx["recall_queries"] == 300
    assert 0.95 <= approx["recall_at_k"] <= 1.0
    assert abs(approx["top1"] - exact["top1"]) < 0.01
    # an unreachable target doubles efSearch up to its cap; at 4,000 rows the graph is then searched exhaustively
    monkeypatch.setattr(knn, "_LAST_EF", 4096)
    wide = knn_eval(x, y, k=10, gpu=False, exact_max=100, recall_queries=300, seed=1, target_recall=1.01,
                    index="hnsw")
    assert wide["ef_search"] == 4096 and wide["recall_at_k"] == pytest.approx(1.0)
    assert wide["top1"] == pytest.approx(exact["top1"])
    with pytest.raises(ValueError, match="index must be"):
        knn_eval(x, y, k=10, gpu=False, exact_max=100, index="lsh")


def test_approximate_recall_is_measured_not_assumed() -> None:
    # Unclustered rows in 64 dimensions: neighbours spread over many lists, so the fewest lists that reach the
    # target are many, and an unreachable target probes every list, where IVF equals exact search.
    x = np.random.default_rng(2).normal(size=(3000, 64)).astype(np.float32)
    y = np.arange(3000) % 3
    full = knn_eval(x, y, k=5, gpu=False, exact_max=100, recall_queries=200, target_recall=1.01, index="ivf")
    assert full["nprobe"] == full["nlist"] and full["recall_at_k"] == pytest.approx(1.0)
    assert full["top1"] == pytest.approx(knn_eval(x, y, k=5, gpu=False)["top1"])
    few = knn_eval(x, y, k=5, gpu=False, exact_max=100, recall_queries=200, target_recall=0.0, index="ivf")
    assert few["nprobe"] == 8 and few["recall_at_k"] < 0.9  # the first nprobe is kept and its recall reported


def test_even_chunks_by_hand() -> None:
    from sslkit.evaluate.knn import even_chunks

    assert even_chunks(10, 4) == [(0, 3), (3, 6), (6, 10)]  # 3 chunks of at most 4, no sliver
    assert even_chunks(20000, 4096, workers=2) == [(0, 3333), (3333, 6666), (6666, 10000), (10000, 13333),
                                                   (13333, 16666), (16666, 20000)]  # 5 rounded up to 6
    assert even_chunks(3, 4096, workers=4) == [(0, 1), (1, 2), (2, 3)]  # never an empty chunk
    assert even_chunks(0, 10) == []
