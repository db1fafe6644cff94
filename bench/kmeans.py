"""k-means at scale: sslkit's ``cluster_eval`` (FAISS) against scikit-learn's ``KMeans`` and
``MiniBatchKMeans`` on the same clustered embeddings, in one process.

    python bench/kmeans.py [--n 1000000] [--d 128] [--k 32] [--seed 0]

sslkit runs as ``sslkit evaluate`` runs it: ``as_features(x, normalize=...)`` then ``kmeans``
with the ``EvalConfig()`` defaults for restarts, niter, ``kmeans_max_train`` and normalize,
k = the number of classes, the run seed (``sslkit/evaluate/run.py``); the library call
``cluster_eval``, which adds the scoring, is timed too. The scikit-learn estimators keep their
defaults apart from ``n_clusters`` and ``random_state``; like sslkit they start from the raw
rows and L2-normalise them first (``sklearn.preprocessing.normalize``, inside their timings),
so all three solve the same cosine k-means. Data generation and the scoring of the peers
are not timed. Prints time and AMI against the generating labels for each, then last
``ratio=<KMeans time / sslkit time>``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import sklearn
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import adjusted_mutual_info_score
from sklearn.preprocessing import normalize
from threadpoolctl import threadpool_info

from sslkit.config import EvalConfig
from sslkit.evaluate import as_features, cluster_eval, cluster_metrics, kmeans
from sslkit.evaluate.cluster import sample_size, worker_threads


def clustered_embeddings(n: int, d: int, k: int, *, seed: int, latent: int = 16,
                         sigma: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 embeddings of k Gaussian classes and their (n,) labels.

    Like an encoder's output, the classes live near a low-dimensional subspace (``latent``
    dimensions, randomly rotated into d, plus small isotropic noise) and overlap there:
    class centres come in groups of about four close siblings, class sizes are unequal
    (the smallest about 1/3 of the mean, the largest several times it) and each class has
    its own spread (0.5x to 1.5x ``sigma``). Seeded: the same arguments give the same rows.
    """
    rng = np.random.default_rng(seed)
    groups = max(2, k // 4)
    sizes = 0.7 * rng.dirichlet(np.ones(k)) + 0.3 / k
    labels = rng.choice(k, size=n, p=sizes)
    centres = rng.standard_normal((groups, latent))[rng.integers(0, groups, size=k)]
    centres += 0.6 * rng.standard_normal((k, latent))  # siblings within a group
    spread = rng.uniform(0.5, 1.5, size=k) * sigma
    basis = np.linalg.qr(rng.standard_normal((d, latent)))[0].T.astype(np.float32)  # (latent, d)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 65536):  # chunks keep the temporaries small
        y = labels[start:start + 65536]
        z = centres[y] + spread[y, None] * rng.standard_normal((len(y), latent))
        x[start:start + len(y)] = z.astype(np.float32) @ basis
        x[start:start + len(y)] += 0.05 * rng.standard_normal((len(y), d), dtype=np.float32)
    return x, labels


def timed(fn, *, warm_bytes: int = 0):
    """(fn(), seconds). First touches ``warm_bytes`` of fresh memory, untimed: on the VMs
    these figures come from, the first write to memory the guest has not used for a few
    seconds cost up to 2 s per GB, which would land in whichever timing allocated first."""
    if warm_bytes:
        np.ones(warm_bytes // 4, dtype=np.float32)
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def machine() -> str:
    """CPUs, load and the BLAS libraries loaded (faiss bundles its own OpenBLAS)."""
    blas = "; ".join(f"{os.path.basename(i['filepath']).split('-')[0]} {i['version']} "
                     f"{i.get('architecture')} kernels, {i['num_threads']} threads"
                     for i in threadpool_info() if i["user_api"] == "blas")
    return (f"machine: {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable, sslkit faiss threads "
            f"{worker_threads()}, load average {os.getloadavg()[0]:.2f}; numpy {np.__version__}, "
            f"scikit-learn {sklearn.__version__}; BLAS: {blas}; OPENBLAS_CORETYPE="
            f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=32, help="generating classes (and clusters)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ev = EvalConfig()

    (x, y), gen_s = timed(lambda: clustered_embeddings(args.n, args.d, args.k, seed=args.seed))
    print(f"data: {args.n:,} x {args.d} float32, {args.k} classes (sizes {np.bincount(y).min():,}"
          f" to {np.bincount(y).max():,}), generated in {gen_s:.1f} s (not timed below)")
    print(machine())
    warm = 2 * x.nbytes
    k = ev.k or int(np.unique(y).size)
    sample = sample_size(ev.kmeans_max_train, k)

    def sslkit_clusters() -> np.ndarray:  # what `sslkit evaluate` does before scoring
        arr = as_features(x, normalize=ev.normalize)
        return kmeans(arr, k=k, restarts=ev.restarts, niter=ev.niter, seed=args.seed, max_train_points=sample)[0]

    assign, sslkit_s = timed(sslkit_clusters, warm_bytes=warm)
    sslkit_ami = cluster_metrics(y, assign)["ami"]
    print(f"sslkit k-means          {sslkit_s:7.2f} s  AMI {sslkit_ami:.4f}  (restarts {ev.restarts}, "
          f"niter <= {ev.niter}, trained on {min(args.n, sample or args.n):,} points, "
          f"all {args.n:,} assigned, normalize {ev.normalize})")
    full, full_s = timed(lambda: cluster_eval(
        x, y, k=ev.k, restarts=ev.restarts, niter=ev.niter, seed=args.seed,
        max_train_points=sample, normalize=ev.normalize), warm_bytes=warm)
    print(f"sslkit cluster_eval     {full_s:7.2f} s  AMI {full['ami']:.4f}  (the same, plus scoring: "
          "AMI, ARI, NMI, purity, acc, F1)")

    prep = (lambda: normalize(x)) if ev.normalize else (lambda: x)
    xn, prep_s = timed(prep, warm_bytes=warm)
    km, fit_s = timed(lambda: KMeans(n_clusters=k, random_state=args.seed).fit(xn), warm_bytes=warm)
    km_s, km_ami = prep_s + fit_s, adjusted_mutual_info_score(y, km.labels_)
    print(f"sklearn KMeans          {km_s:7.2f} s  AMI {km_ami:.4f}  (normalize {prep_s:.2f} s + fit "
          f"{fit_s:.2f} s; n_init={km.n_init!r} -> {getattr(km, '_n_init', '?')} run, {km.n_iter_} "
          f"iterations, algorithm {km.algorithm!r})")
    mb, mb_fit_s = timed(lambda: MiniBatchKMeans(n_clusters=k, random_state=args.seed).fit(xn), warm_bytes=warm)
    print(f"sklearn MiniBatchKMeans {prep_s + mb_fit_s:7.2f} s  AMI {adjusted_mutual_info_score(y, mb.labels_):.4f}"
          f"  (normalize {prep_s:.2f} s + fit {mb_fit_s:.2f} s; n_init={mb.n_init!r} -> "
          f"{getattr(mb, '_n_init', '?')} run, batch {mb.batch_size}, {mb.n_steps_} steps = {mb.n_iter_} epochs)")

    print(f"AMI sslkit - KMeans = {sslkit_ami - km_ami:+.4f}; load average now {os.getloadavg()[0]:.2f}")
    print(f"ratio={km_s / sslkit_s:.2f}")


if __name__ == "__main__":
    main()
