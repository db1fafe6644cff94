"""kNN search at scale: exact against approximate search on 1,000,000 clustered embeddings, and the
exact search's arithmetic rate against the CPU's matrix-multiply peak, in one process.

    python bench/knn.py [--n 1000000] [--queries 20000] [--d 128] [--k 20] [--classes 32] [--seed 0]
                        [--index auto|lists|hnsw|ivf]

Data: ``bench/kmeans.py``'s seeded Gaussian classes near a 16-dimensional subspace,
L2-normalised (untimed), as ``sslkit evaluate`` sees them. Both searches run as ``knn_eval``
runs them, leave-one-out (k + 1 neighbours, each query's own row dropped), on
``worker_threads()`` threads:

- exact: sslkit's exact search (``knn_predict``'s: matrix products with pruned top-k, in chunks
  of 4,096 queries, one thread each) of a seeded sample of ``--queries`` bank rows against the
  whole bank; a leave-one-out pass over all N rows costs N / queries times as much. The same
  queries also go through faiss's brute-force search (``faiss.knn``, what sslkit used before),
  timed the same way, and the neighbours of both are compared;
- approximate: what ``knn_eval`` does above ``eval.knn_exact_max`` (on CPU the search by lists;
  ``--index`` another): building the index, choosing the search breadth (on its own 2 x 1,000
  seeded queries) and a whole leave-one-out pass with votes over all N rows, each timed; then
  the neighbours of the sample queries at the chosen breadth, and their recall@k against the
  exact ones. The speed-up is that of a whole pass, build and breadth choice included.

The exact search's rate, 2 * queries * N * D flops over its time, is compared with a float32
matrix multiply of (4,096, D) x (D, nb) blocks timed in the same run: numpy's BLAS on the same
threads as the search (one per task), and torch's matrix multiply on all its threads; the best of
these is the peak. Prints the figures, then last ``ratio=<exact / approximate time of a whole
leave-one-out pass>``.
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
from sslkit.evaluate.knn import _DEFAULT_CHUNK, _approximate_index, _drop_self, _exact_searcher, _tune, even_chunks


def search_all(search, queries: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(q, k) leave-one-out neighbour ids of the unit ``queries`` (bank rows ``rows``), chunked as knn_eval."""
    out = np.empty((len(rows), k), dtype=np.int64)

    def chunk(bounds: tuple[int, int]) -> None:
        start, stop = bounds
        sims, idx = search(queries[start:stop])
        out[start:stop] = _drop_self(sims, idx, self_ids=rows[start:stop])[1]

    thread_map(chunk, even_chunks(len(rows), _DEFAULT_CHUNK, workers=worker_threads()))
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


def _exact(args: argparse.Namespace, bank: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> tuple:
    """Time sslkit's exact search and faiss's on the sample; print both; return sslkit's neighbours and time."""
    mine = _exact_searcher(bank, args.k + 1, gpu=False)
    truth, exact_s = timed(lambda: search_all(mine, queries, rows, args.k))
    theirs = lambda q: faiss.knn(q, bank, args.k + 1, metric=faiss.METRIC_INNER_PRODUCT)  # noqa: E731
    faiss_ids, faiss_s = timed(lambda: search_all(theirs, queries, rows, args.k))
    agree = float(np.mean(np.sort(truth, axis=1) == np.sort(faiss_ids, axis=1)))
    per_query = exact_s / args.queries * 1e6
    print(f"exact search    {exact_s:8.2f} s for {args.queries:,} queries = {per_query:8.1f} us/query "
          f"(a full leave-one-out pass over {args.n:,} rows: {per_query * args.n / 1e6 / 60:.1f} min); "
          f"faiss.knn {faiss_s:.2f} s = {faiss_s / exact_s:.2f}x its time; the same neighbours in "
          f"{100 * agree:.3f} % of places (the rest: ties, or float32 rounding at the k-th)")
    return truth, exact_s


def _approximate(args: argparse.Namespace, bank: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                 truth: np.ndarray) -> tuple[float, float]:
    """Build, tune and run a whole leave-one-out pass of the approximate search; print; return time, recall."""
    vote = {"labels": labels, "tau": 0.07, "num_classes": args.classes}
    approx, build_s = timed(lambda: _approximate_index(bank, kind=args.index, k=args.k, seed=args.seed, gpu=False,
                                                       vote=vote))
    (breadth, tune_recall, _), tune_s = timed(lambda: _tune(bank, approx, k=args.k, seed=args.seed,
                                                           target_recall=0.95, recall_queries=1000))
    scores, pass_s = timed(lambda: approx.scores(breadth))
    recall = knn_recall(approx.neighbours(rows, breadth), truth)
    top1 = float(np.mean(scores.argmax(axis=1) == labels))
    what = {"lists": lambda: f"by lists, {approx.info['nlist']} lists, probe {breadth}, "
                             f"{100 * approx.info['searched_share']:.2f} % of the pairs compared",
            "hnsw": lambda: f"HNSW{approx.info['hnsw_m']}, efSearch {breadth}",
            "ivf": lambda: f"IVF-Flat, nlist {approx.info['nlist']}, nprobe {breadth}"}[approx.search]()
    total = build_s + tune_s + pass_s
    print(f"approx. search  build {build_s:.1f} s, breadth choice {tune_s:.1f} s (recall {tune_recall:.4f} on its "
          f"own queries), whole leave-one-out pass with votes {pass_s:.1f} s = {pass_s / args.n * 1e6:.1f} us/query; "
          f"{total / 60:.2f} min in all ({what}); kNN top-1 {top1:.4f}")
    print(f"recall@{args.k} of the approximate search on the {args.queries:,} sample queries: {recall:.4f}")
    return total, recall


def main() -> None:
    ev = EvalConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="bank size")
    parser.add_argument("--queries", type=int, default=20_000, help="bank rows searched (leave-one-out)")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=ev.knn_k, help="neighbours")
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", choices=("auto", "lists", "hnsw", "ivf"), default="auto",
                        help="approximate search (auto: by lists on CPU, as sslkit evaluate)")
    args = parser.parse_args()
    print(f"load average at start {os.getloadavg()[0]:.2f}")

    (x, labels), gen_s = timed(lambda: clustered_embeddings(args.n, args.d, args.classes, seed=args.seed))
    bank = as_features(x, normalize=True)
    del x
    rows = np.sort(np.random.default_rng(args.seed + 1).choice(args.n, size=args.queries, replace=False))
    queries = bank[rows]
    print(f"data: bank {args.n:,} x {args.d} float32 (L2-normalised), {args.classes} classes, generated in "
          f"{gen_s:.1f} s; {args.queries:,} seeded query rows, leave-one-out, k {args.k}")
    print(machine())
    truth, exact_s = _exact(args, bank, queries, rows)
    gflops = 2 * args.queries * args.n * args.d / exact_s / 1e9
    peak, where = matmul_peak(bank, args.d)
    print(f"exact search {gflops:.1f} GFLOP/s = {gflops / peak:.2f} of the matmul peak {peak:.1f} GFLOP/s ({where})")
    approx_pass, recall = _approximate(args, bank, labels, rows, truth)
    exact_pass = exact_s / args.queries * args.n
    print(f"speed-up of a whole leave-one-out pass {exact_pass / approx_pass:.1f}x (exact {exact_pass / 60:.1f} min, "
          f"from its sample; approximate {approx_pass / 60:.2f} min with build and breadth choice) at "
          f"recall@{args.k} {recall:.4f}; load average now {os.getloadavg()[0]:.2f}")
    print(f"ratio={exact_pass / approx_pass:.2f}")


if __name__ == "__main__":
    main()
