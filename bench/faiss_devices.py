"""sslkit's k-means and kNN on the GPU (faiss) against the CPU on the same 1M embeddings.

    python bench/faiss_devices.py [--n 1000000] [--queries 100000] [--d 128] [--classes 32] [--seed 0]

Both sides run the library calls ``sslkit evaluate`` makes, with ``gpu=False`` and ``gpu=True``:
``kmeans`` with the ``EvalConfig()`` defaults (restarts, niter, training sample) on the L2-normalised
rows, k = the number of classes, then ``knn_predict`` of ``--queries`` rows against the whole bank
(exact search: a faiss flat index on the GPU, sslkit's pruned matrix-product search on the CPU;
the queries are drawn from the same classes, not from the bank). Data generation
is not timed (``bench/kmeans.py``'s generator). Prints each time, the AMI of both k-means runs
and the share of equal kNN predictions, then last ``ratio=<CPU time / GPU time>`` for k-means
and kNN together. Needs a faiss GPU build (``pip install 'sslkit[gpu]'``) and a visible GPU.
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
from kmeans import clustered_embeddings, machine, timed  # bench/ is on sys.path as a script
from sklearn.metrics import adjusted_mutual_info_score

from sslkit.config import EvalConfig
from sslkit.evaluate.cluster import as_features, faiss_gpu_available, kmeans, sample_size
from sslkit.evaluate.knn import knn_predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="bank size (k-means and kNN)")
    parser.add_argument("--queries", type=int, default=100_000, help="kNN queries (exact search)")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not faiss_gpu_available():
        raise SystemExit("faiss sees no GPU (a CPU-only faiss build, or no device visible); install "
                         "faiss-gpu-cu12 (pip install 'sslkit[gpu]') on a machine with a GPU.")
    ev = EvalConfig()
    x, y = clustered_embeddings(args.n + args.queries, args.d, args.classes, seed=args.seed)
    bank, bank_y, query = x[: args.n], y[: args.n], x[args.n:]
    print(machine())
    seconds: dict[str, float] = {}
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    train_points = sample_size(ev.kmeans_max_train, args.classes)
    for side, gpu in (("cpu", False), ("gpu", True)):
        feats = as_features(bank, normalize=True)
        (assign, _, _), t_km = timed(partial(kmeans, feats, k=args.classes, restarts=ev.restarts, niter=ev.niter,
                                             seed=args.seed, gpu=gpu, max_train_points=train_points))
        (pred, _), t_knn = timed(partial(knn_predict, bank, bank_y, query, k=ev.knn_k, tau=ev.knn_tau, gpu=gpu))
        seconds[side] = t_km + t_knn
        found[side] = (assign, pred)
        print(f"faiss {side}: k-means {t_km:7.2f} s (AMI {adjusted_mutual_info_score(bank_y, assign):.3f}), "
              f"kNN {args.queries:,} queries x {args.n:,} {t_knn:7.2f} s")
    same = float(np.mean(found["cpu"][1] == found["gpu"][1]))
    print(f"kNN predictions equal on both devices: {same:.4f}")
    print(f"ratio={seconds['cpu'] / seconds['gpu']:.2f}")


if __name__ == "__main__":
    main()
