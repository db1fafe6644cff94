"""kNN classification at scale: sslkit's ``knn_predict`` (FAISS) against scikit-learn's
``KNeighborsClassifier`` on the same clustered embeddings, in one process.

    python bench/knn.py [--n 200000] [--queries 200000] [--d 128] [--k 20] [--classes 32] [--seed 0]

Bank and queries are drawn from the same classes (``bench/kmeans.py``'s generator). sslkit
runs as ``sslkit evaluate`` does: cosine similarity, k = ``EvalConfig().knn_k``, vote
weights exp(sim / ``knn_tau``); its time covers L2 normalisation, the index, the search and
the vote. scikit-learn keeps its defaults apart from ``n_neighbors``; it gets the same raw
rows and L2-normalises them first (``sklearn.preprocessing.normalize``, timed), so its
Euclidean neighbours are the cosine ones; its time is that plus ``fit`` + ``predict``. Data
generation is not timed. Prints times and top-1 accuracy, then last
``ratio=<scikit-learn time / sslkit time>``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from kmeans import clustered_embeddings, machine, timed  # bench/ is on sys.path as a script
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize

from sslkit.config import EvalConfig
from sslkit.evaluate import knn_predict


def main() -> None:
    ev = EvalConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="bank size")
    parser.add_argument("--queries", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=ev.knn_k, help="neighbours")
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    (x, y), gen_s = timed(lambda: clustered_embeddings(args.n + args.queries, args.d, args.classes,
                                                       seed=args.seed))
    bank, bank_y, query, query_y = x[: args.n], y[: args.n], x[args.n :], y[args.n :]
    print(f"data: bank {args.n:,} x {args.d}, {args.queries:,} queries, {args.classes} classes, "
          f"float32, generated in {gen_s:.1f} s (not timed below)")
    print(machine())
    warm = 2 * x.nbytes

    (preds, _), sslkit_s = timed(lambda: knn_predict(bank, bank_y, query, k=args.k, tau=ev.knn_tau),
                                 warm_bytes=warm)
    print(f"sslkit knn_predict           {sslkit_s:7.2f} s  top-1 {np.mean(preds == query_y):.4f}  "
          f"(k {args.k}, tau {ev.knn_tau}, cosine, exact search)")

    def sklearn_knn() -> tuple[KNeighborsClassifier, np.ndarray]:
        clf = KNeighborsClassifier(n_neighbors=args.k).fit(normalize(bank), bank_y)
        return clf, clf.predict(normalize(query))

    (clf, sk_preds), sk_s = timed(sklearn_knn, warm_bytes=warm)
    print(f"sklearn KNeighborsClassifier {sk_s:7.2f} s  top-1 {np.mean(sk_preds == query_y):.4f}  "
          f"(normalize + fit + predict; n_neighbors {args.k}, algorithm {clf.algorithm!r} -> "
          f"{clf._fit_method!r}, weights {clf.weights!r}, metric {clf.metric!r} p={clf.p})")
    print(f"predictions agree on {np.mean(preds == sk_preds):.4f} of queries; "
          f"load average now {os.getloadavg()[0]:.2f}")
    print(f"ratio={sk_s / sslkit_s:.2f}")


if __name__ == "__main__":
    main()
