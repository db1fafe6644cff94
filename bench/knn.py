"""kNN search at scale: exact against approximate (HNSW) search on 1,000,000 clustered embeddings,
and the exact search's arithmetic rate against the CPU's matrix-multiply peak, in one process.

    python bench/knn.py [--n 1000000] [--queries 20000] [--d 128] [--k 20] [--classes 32] [--seed 0]
                        [--index auto|hnsw|ivf]

Data: ``bench/kmeans.py``'s seeded Gaussian classes near a 16-dimensional subspace,
L2-normalised (untimed), as ``sslkit evaluate`` sees them. Both searches run as ``knn_eval``
runs them, leave-one-out (k + 1 neighbours, each query's own row dropped), in chunks of
queries on ``worker_threads()`` threads with faiss single-threaded in each:

- exact: faiss's brute-force inner product (``knn_predict``'s search) of a seeded sample of
  ``--queries`` bank rows against the whole bank; a leave-one-out pass over all N rows costs
  N / queries times as much, so the per-query time is what the output compares;
- approximate: the index ``knn_eval`` builds above ``eval.knn_exact_max`` (on CPU an HNSW
  graph; ``--index ivf`` the IVF index it uses on a GPU), build and choice of the search breadth
  timed apart (the latter on its own 2 x 1,000 seeded queries), then the same sample of queries;
  recall@k of its neighbours against the exact ones. The speed-up is printed per query and for
  a whole leave-one-out pass over the N rows with the build and the breadth choice included.

The exact search's rate, 2 * queries * N * D flops over its time, is compared with a
float32 matrix multiply of the shapes faiss multiplies ((4,096, D) x (D, 1,024) blocks, and
larger ones), timed in the same run: numpy's BLAS on the same threads as the search (one per
task), and torch's matrix multiply on all its threads; the best of these is the peak. Prints the
figures, then last ``ratio=<exact / approximate time of a whole leave-one-out pass>``.
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np
import torch
from kmeans import clustered_embeddings, machine, timed  # bench/ is on sys.path as a script
from threadpoolctl import threadpool_limits

from sslkit.config import EvalConfig
from sslkit.evaluate import as_features, knn_recall
from sslkit.evaluate.cluster import thread_map, worker_threads
from sslkit.evaluate.knn import (
    _DEFAULT_CHUNK,
    _QUERY_BLOCK,
    _approximate_index,
    _drop_self,
    _exact_searcher,
    _query_block,
    _tune,
    even_chunks,
)


def search_all(search, queries: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(q, k) leave-one-out neighbour ids of the unit ``queries`` (bank rows ``rows``), chunked as knn_eval."""
    out = np.empty((len(rows), k), dtype=np.int64)

    def chunk(bounds: tuple[int, int]) -> None:
        start, stop = bounds
        sims, idx = search(queries[start:stop])
        out[start:stop] = _drop_self(sims, idx, self_ids=rows[start:stop])[1]

    thread_map(chunk, even_chunks(len(rows), _DEFAULT_CHUNK))
    return out


def matmul_peak(bank: np.ndarray, d: int, *, flops: float = 4e11) -> tuple[float, str]:
    """Best float32 GFLOP/s of (4096, d) x (d, nb) products: through numpy's BLAS as the search runs
    (worker_threads() tasks, one thread each), and through torch's matrix multiply on all its threads;
    each timed over about ``flops`` operations after a warm-up. The best of these is the peak."""
    best, where = 0.0, ""
    tasks = worker_threads()
    rows = bank[: 4096 * tasks]
    for nb in (1024, 4096, 16384):
        block = np.ascontiguousarray(bank[-nb:].T)
        reps = max(1, int(flops / (2 * 4096 * nb * d * tasks)))

        def task(i: int, nb: int = nb, reps: int = reps, block: np.ndarray = block) -> None:
            out = np.empty((4096, nb), dtype=np.float32)
            for _ in range(reps):
                np.matmul(rows[i * 4096:(i + 1) * 4096], block, out=out)

        with threadpool_limits(1, user_api="blas"):
            task(0)  # warm
            start = time.perf_counter()
            thread_map(task, range(tasks))
            gflops = 2 * 4096 * nb * d * reps * tasks / (time.perf_counter() - start) / 1e9
        if gflops > best:
            best, where = gflops, f"numpy matmul (4096, {d}) x ({d}, {nb}), {tasks} tasks of 1 thread"
        gflops = _torch_rate(rows[:4096], block, reps * tasks)
        if gflops > best:
            best, where = gflops, f"torch.mm (4096, {d}) x ({d}, {nb}), {torch.get_num_threads()} threads"
    return best, where


def _torch_rate(a: np.ndarray, b: np.ndarray, reps: int) -> float:
    x, y = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(b)
    out = torch.empty(x.shape[0], y.shape[1])
    torch.mm(x, y, out=out)  # warm
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(x, y, out=out)
    return 2 * x.shape[0] * x.shape[1] * y.shape[1] * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    ev = EvalConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="bank size")
    parser.add_argument("--queries", type=int, default=20_000, help="bank rows searched (leave-one-out)")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=ev.knn_k, help="neighbours")
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", choices=("auto", "hnsw", "ivf"), default="auto",
                        help="approximate index (auto: HNSW on CPU, as sslkit evaluate)")
    args = parser.parse_args()
    print(f"load average at start {os.getloadavg()[0]:.2f}")

    (x, _), gen_s = timed(lambda: clustered_embeddings(args.n, args.d, args.classes, seed=args.seed))
    bank = as_features(x, normalize=True)
    del x
    rows = np.sort(np.random.default_rng(args.seed + 1).choice(args.n, size=args.queries, replace=False))
    queries = bank[rows]
    print(f"data: bank {args.n:,} x {args.d} float32 (L2-normalised), {args.classes} classes, generated in "
          f"{gen_s:.1f} s; {args.queries:,} seeded query rows, leave-one-out, k {args.k}")
    print(machine())

    exact = _exact_searcher(bank, args.k + 1, gpu=False)
    with _query_block():  # as knn_predict searches
        truth, exact_s = timed(lambda: search_all(exact, queries, rows, args.k))
    check = min(args.queries, 2048)  # faiss's default blocks find the same neighbours (in the same order)
    same = np.array_equal(search_all(exact, queries[:check], rows[:check], args.k), truth[:check])
    exact_us = exact_s / args.queries * 1e6
    gflops = 2 * args.queries * args.n * args.d / exact_s / 1e9
    print(f"exact search    {exact_s:8.2f} s for {args.queries:,} queries = {exact_us:8.1f} us/query "
          f"(a full leave-one-out pass over {args.n:,} rows: {exact_us * args.n / 1e6 / 60:.1f} min); "
          f"neighbours of the first {check:,} equal with faiss's default blocks: {same}")

    approx, build_s = timed(lambda: _approximate_index(bank, kind=args.index, k=args.k, seed=args.seed, gpu=False))
    (breadth, tune_recall, _), tune_s = timed(lambda: _tune(bank, approx, k=args.k, gpu=False, seed=args.seed,
                                                           target_recall=0.95, recall_queries=1000))
    found, approx_s = timed(lambda: search_all(lambda q: approx.index.search(q, args.k + 1), queries, rows, args.k))
    approx_us = approx_s / args.queries * 1e6
    recall = knn_recall(found, truth)
    what = (f"HNSW{approx.info['hnsw_m']}, efSearch {breadth}" if approx.search == "hnsw"
            else f"IVF-Flat, nlist {approx.info['nlist']}, nprobe {breadth}")
    exact_pass = exact_us * args.n / 1e6
    approx_pass = approx_us * args.n / 1e6 + build_s + tune_s
    print(f"approx. search  {approx_s:8.2f} s for {args.queries:,} queries = {approx_us:8.1f} us/query "
          f"({what}; build {build_s:.1f} s, breadth choice {tune_s:.1f} s with recall {tune_recall:.4f} on its own "
          f"queries; a full pass: {approx_pass / 60:.1f} min with build and choice)")
    print(f"recall@{args.k} of the approximate search on the {args.queries:,} queries: {recall:.4f}")
    peak, where = matmul_peak(bank, args.d)
    print(f"exact search {gflops:.1f} GFLOP/s = {gflops / peak:.2f} of the matmul peak {peak:.1f} GFLOP/s "
          f"({where}); faiss BLAS blocks {_QUERY_BLOCK} queries x "
          f"{faiss.cvar.distance_compute_blas_database_bs} bank rows")
    print(f"speed-up per query {exact_us / approx_us:.1f}x, whole leave-one-out pass {exact_pass / approx_pass:.1f}x "
          f"(build and breadth choice included) at recall@{args.k} {recall:.4f}; "
          f"load average now {os.getloadavg()[0]:.2f}")
    print(f"ratio={exact_pass / approx_pass:.2f}")


if __name__ == "__main__":
    main()
