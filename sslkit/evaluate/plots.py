"""PNG figures of an evaluation, written for a pathologist to read at a glance (crop galleries:
``sslkit.evaluate.gallery``).

Every function takes numpy arrays and keyword arguments and returns the path of the PNG
it wrote (atomically: a temporary file, then ``os.replace``), at :data:`DPI` dots per
inch and at a pixel size fixed by the figure size (no tight cropping). Figures are built
on ``matplotlib.figure.Figure`` directly, never through pyplot, so no global figure or
backend state is touched. Colours come from tab10/tab20 (colour-blind-safe qualitative
palettes); beyond 20 groups the colours repeat with a different marker.
"""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter
from scipy.optimize import linear_sum_assignment
from sklearn.metrics.cluster import contingency_matrix

from sslkit.atomic import replacing

__all__ = ["DPI", "cluster_confusion", "cluster_order", "confusion_plot", "embedding_map", "project",
           "read_metrics", "save_png", "stratified_subsample", "training_curves"]

DPI = 150
MARKERS = ("o", "s", "^", "D")
UNLABELLED = "#b0b0b0"
ONLINE = (("online/knn_top1", "kNN top-1"), ("online/ami", "k-means AMI"), ("online/ari", "k-means ARI"))


def save_png(fig: Figure, out: str | Path) -> Path:
    """Write ``fig`` to ``out`` as PNG at :data:`DPI`; readers never see a half-written file."""
    with replacing(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(out)


def _style(n: int) -> list[tuple[Any, str]]:
    """(colour, marker) for ``n`` groups: tab10 up to 10, tab20 up to 20, then markers vary too."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [(cmap(i % cmap.N), MARKERS[(i // cmap.N) % len(MARKERS)]) for i in range(n)]


def _labels(x: Any, *, name: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        expected = f"({n},)" if n is not None else "(N,)"
        raise ValueError(f"{name} must be a 1-D array {expected} with one entry per sample, got shape {arr.shape}.")
    return arr.astype(np.int64)


def _check_classes(labels: np.ndarray, classes: Sequence[str]) -> None:
    if labels.size and labels.max() >= len(classes):
        raise ValueError(f"labels go up to {labels.max()} but classes has {len(classes)} names; "
                         "pass one name per class index (the manifest's class list).")


# ------------------------------------------------------------------ clusters vs classes


def cluster_order(labels: Any, clusters: Any) -> tuple[list[int], dict[int, int]]:
    """Columns for a cluster-vs-class table: each matched cluster under its class.

    Clusters are matched one-to-one to classes by the Hungarian assignment on the
    contingency table (as :func:`sslkit.evaluate.metrics.hungarian_map`); a match with
    no sample in common adds nothing to the accuracy and is dropped.

    Args:
        labels: (N,) class indices (no -1: drop unlabelled samples first).
        clusters: (N,) cluster ids.

    Returns:
        order: cluster ids; the matched ones in the order of their classes, then the
            unmatched ones (by majority class, then id).
        match: cluster id -> class index, for the matched clusters.
    """
    y = _labels(labels, name="labels")
    c = _labels(clusters, name="clusters", n=y.shape[0])
    present, ids = np.unique(y), np.unique(c)
    cont = contingency_matrix(y, c)  # (classes present, clusters), np.unique order
    rows, cols = linear_sum_assignment(cont, maximize=True)
    match = {int(ids[j]): int(present[i]) for i, j in zip(rows, cols) if cont[i, j] > 0}
    matched = sorted(match, key=lambda k: match[k])
    majority = {int(k): int(present[cont[:, j].argmax()]) for j, k in enumerate(ids)}
    rest = sorted((int(k) for k in ids if int(k) not in match), key=lambda k: (majority[k], k))
    return matched + rest, match


def confusion_plot(cm: Any, *, row_names: Sequence[str], col_names: Sequence[str], out: str | Path,
                   title: str, xlabel: str, ylabel: str) -> Path:
    """A (K, K2) count table: cells shaded by the share of their row, annotated with counts.

    Rows are labelled with their totals ("epithelial (n=412)"), so a row's shading reads
    as "where did the crops of this class go".
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape != (len(row_names), len(col_names)):
        raise ValueError(f"cm must be (len(row_names), len(col_names)) = ({len(row_names)}, {len(col_names)}), "
                         f"got shape {cm.shape}.")
    totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)
    rows = [f"{name} (n={int(t)})" for name, t in zip(row_names, totals[:, 0])]
    k, k2 = cm.shape
    char = 0.07  # inches per character at the 8-point tick labels
    big = k * k2 > 150  # e.g. 24 chromosome classes: smaller cells, counts only
    width = 2.2 + (0.42 if big else 0.6) * k2 + char * max(map(len, rows))
    height = 1.6 + (0.32 if big else 0.45) * k + 0.7 * char * max(map(len, col_names))
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for i in range(k):
        for j in range(k2):
            text = f"{int(cm[i, j])}" if big else f"{int(cm[i, j])}\n{share[i, j]:.0%}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7 if big else 8,
                    color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(k2), list(col_names), rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(k), rows, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("\n".join(textwrap.wrap(title, max(40, int(width * 12)))), fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the row")
    return save_png(fig, out)


def cluster_confusion(labels: Any, clusters: Any, *, classes: Sequence[str], out: str | Path) -> Path:
    """True classes (rows) against k-means clusters (columns) after the Hungarian match.

    Columns follow :func:`cluster_order`: "cluster 3 (-> epithelial)" sits on the
    diagonal cell of epithelial; unmatched clusters come last. Unlabelled samples (-1)
    are left out.
    """
    y = _labels(labels, name="labels")
    c = _labels(clusters, name="clusters", n=y.shape[0])
    keep = y >= 0
    if not keep.any():
        raise ValueError("cluster_confusion needs labelled samples, but every label is -1.")
    y, c = y[keep], c[keep]
    _check_classes(y, classes)
    order, match = cluster_order(y, c)
    col = {k: j for j, k in enumerate(order)}
    cm = np.zeros((len(classes), len(order)), dtype=np.int64)
    np.add.at(cm, (y, np.array([col[k] for k in c])), 1)
    names = [f"cluster {k} (-> {classes[match[k]]})" if k in match else f"cluster {k} (unmatched)" for k in order]
    acc = sum(cm[match[k], col[k]] for k in match) / y.size
    return confusion_plot(cm, row_names=list(classes), col_names=names, out=out,
                          title=f"k-means clusters vs true classes on {y.size} labelled crops "
                                f"(Hungarian-matched accuracy {acc:.1%})",
                          xlabel="k-means cluster (-> class it is matched to)", ylabel="true class")


# ------------------------------------------------------------------ 2-D maps


def stratified_subsample(strata: Any, n: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``min(n, N)`` samples, each stratum kept in proportion (seeded)."""
    s = _labels(strata, name="strata")
    if n >= s.size:
        return np.arange(s.size)
    rng = np.random.default_rng(seed)
    values, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    quota = counts * n / s.size
    take = np.floor(quota).astype(np.int64)
    # Largest remainders get the leftover places, so the total is exactly n.
    take[np.argsort(-(quota - take), kind="stable")[: n - take.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(inverse == v))[:t] for v, t in zip(range(values.size), take)]
    return np.sort(np.concatenate(picked))


def project(feats: Any, *, method: str = "umap", seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) with umap-learn's UMAP or scikit-learn's TSNE, both in cosine geometry.

    umap is imported here, not at module import: its numba compilation costs tens of
    seconds per process, which only callers of UMAP should pay.
    """
    x = np.ascontiguousarray(feats, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 5:
        raise ValueError(f"feats must be (N, D) with N >= 5 to draw a 2-D map, got shape {x.shape}.")
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (x.shape[0] - 1) / 3)  # t-SNE needs perplexity < N
        return TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity,
                    random_state=seed).fit_transform(x)
    if method == "umap":
        import umap

        with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": seeded = serial
            warnings.filterwarnings("ignore", message=".*n_jobs value.*")
            reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=min(15, x.shape[0] - 1),
                                random_state=seed)
            return reducer.fit_transform(x)
    raise ValueError(f"Unknown projection method '{method}'; use 'umap' or 'tsne'.")


def _scatter_panel(ax: Any, xy: np.ndarray, groups: np.ndarray, names: list[str],
                   styles: list[tuple[Any, str]], title: str) -> None:
    """Draw group g (-1: unlabelled) in ``styles[g]``, largest first so small groups stay visible on top."""
    size = float(np.clip(6000 / len(xy), 2, 30))
    present = np.unique(groups).tolist()
    for g in sorted(present, key=lambda g: -(groups == g).sum()):
        pts = xy[groups == g]
        colour, marker = (UNLABELLED, "o") if g < 0 else styles[g]
        ax.scatter(pts[:, 0], pts[:, 1], s=size, c=[colour], marker=marker, linewidths=0, alpha=0.8)
    handles = []
    for g in present:
        colour, marker = (UNLABELLED, "o") if g < 0 else styles[g]
        name = "unlabelled" if g < 0 else names[g]
        handles.append(Line2D([], [], ls="", marker=marker, color=colour, ms=6,
                              label=f"{name} ({int((groups == g).sum())})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
              ncol=1 if len(handles) <= 14 else 2, handletextpad=0.2, borderaxespad=0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def embedding_map(feats: Any, labels: Any, clusters: Any, *, classes: Sequence[str], out: str | Path,
                  method: str = "umap", seed: int = 0, max_points: int = 5000) -> Path:
    """A 2-D map of the embeddings: coloured by true class (left) and by k-means cluster (right).

    Args:
        feats: (N, D) embeddings.
        labels: (N,) class indices into ``classes``; -1 = unlabelled (all -1: one panel).
        clusters: (N,) k-means cluster ids.
        classes: class names.
        method: "umap" (umap-learn) or "tsne" (scikit-learn), cosine metric.
        seed: seeds the subsample and the projection.
        max_points: above this, a stratified (by class, else by cluster) seeded
            subsample is drawn; the title says so.
    """
    x = np.asarray(feats)
    y = _labels(labels, name="labels", n=x.shape[0] if x.ndim == 2 else None)
    c = _labels(clusters, name="clusters", n=y.shape[0])
    _check_classes(y, classes)
    labelled = bool((y >= 0).any())
    idx = stratified_subsample(y if labelled else c, max_points, seed=seed)
    xy = project(x[idx], method=method, seed=seed)
    y, c = y[idx], c[idx]

    # A cluster matched to a class is drawn in that class's colour, so the panels compare at a glance.
    order, match = cluster_order(y[y >= 0], c[y >= 0]) if labelled else ([], {})
    order += sorted(int(k) for k in np.unique(c) if int(k) not in order)
    unmatched = [k for k in order if k not in match]
    n_classes = len(classes) if labelled else 0
    styles = _style(n_classes + len(unmatched))
    cluster_styles = [styles[match[k]] if k in match else styles[n_classes + unmatched.index(k)] for k in order]
    cluster_names = [f"cluster {k}" + (f" (-> {classes[match[k]]})" if k in match else "") for k in order]
    pos = {k: i for i, k in enumerate(order)}
    groups = np.array([pos[int(k)] for k in c])
    panels = [(groups, cluster_names, cluster_styles, f"coloured by k-means cluster (k={len(order)})")]
    if labelled:
        panels.insert(0, (y, list(classes), styles[:n_classes], "coloured by true class"))
    fig = Figure(figsize=(7.6 * len(panels), 5.6), layout="constrained")
    for i, (groups, names, panel_styles, title) in enumerate(panels):
        _scatter_panel(fig.add_subplot(1, len(panels), i + 1), xy, groups, names, panel_styles, title)
    sample = f" (stratified random sample of {x.shape[0]})" if len(idx) < x.shape[0] else ""
    fig.suptitle(f"{'UMAP' if method == 'umap' else 't-SNE'} of {len(idx)} embeddings{sample}, "
                 "cosine distance", fontsize=11)
    return save_png(fig, out)


# ------------------------------------------------------------------ training curves


def read_metrics(path: str | Path) -> tuple[dict[str, dict[int, float]], int]:
    """A run's ``metrics.jsonl`` as ``{key: {step: value}}``, and how many steps were logged twice.

    A resumed run logs again the steps after its checkpoint: for each key, the last
    record of a step wins. Records of different keys at one step (training logs and
    online evaluation) are merged. Unreadable lines (cut short by a crash) are skipped.
    """
    series: dict[str, dict[int, float]] = {}
    repeated: set[int] = set()
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash, or a blank line
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            continue
        step = int(rec["step"])
        for key, value in rec.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if step in series.setdefault(key, {}):
                repeated.add(step)
            series[key][step] = float(value)
    return series, len(repeated)


def _line(ax: Any, data: dict[int, float], *, label: str | None = None, smooth: bool = False, **kw: Any) -> None:
    steps = np.array(sorted(data))
    values = np.array([data[s] for s in steps])
    if smooth and len(values) >= 20:
        w = max(3, len(values) // 25)
        ax.plot(steps, values, lw=0.8, alpha=0.35, label="logged", **kw)
        avg = np.convolve(values, np.ones(w) / w, mode="valid")
        ax.plot(steps[w // 2: w // 2 + len(avg)], avg, lw=1.6, label=f"moving average of {w} logs", **kw)
        ax.legend(fontsize=7, frameon=False)
    else:
        ax.plot(steps, values, lw=1.4, marker="o" if len(values) < 30 else None, ms=3, label=label, **kw)


def training_curves(metrics_jsonl: str | Path, out: str | Path) -> Path | None:
    """Loss, learning rate, throughput and (when logged) online evaluation against step.

    Reads the run's ``metrics.jsonl``. A resumed run logs some steps twice: for each
    metric, the last record of a step wins. Returns None when the file is missing or
    holds none of these metrics.
    """
    path = Path(metrics_jsonl)
    if not path.is_file():
        return None
    series, repeated = read_metrics(path)
    panels: list[tuple[str, list[tuple[str, str]]]] = [
        ("training loss", [("loss", "loss")]), ("learning rate", [("lr", "lr")]),
        ("throughput (pairs / s)", [("pairs_per_s", "pairs / s")]),
        ("online evaluation on held-out crops", list(ONLINE)),
        ("share of wall time in online evaluation", [("online/eval_share", "share")]),
    ]
    panels = [(title, [p for p in keys if p[0] in series]) for title, keys in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    ncols = 2 if len(panels) <= 4 else 3
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.3 * nrows + 0.5), layout="constrained")
    styles = _style(len(ONLINE))
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for key, label in keys:
            online = key in dict(ONLINE)
            colour = styles[[k for k, _ in ONLINE].index(key)][0] if online else "#1f77b4"
            _line(ax, series[key], label=label if online else None, smooth=key == "loss", color=colour)
        if title.startswith("online evaluation"):
            ax.set_ylim(min(0.0, *(min(series[k].values()) for k, _ in keys)) - 0.02, 1.02)
            ax.legend(fontsize=7, frameon=False)
        if keys[0][0] == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if keys[0][0] == "online/eval_share":
            ax.set_ylim(0, max(0.05, 1.2 * max(series[keys[0][0]].values())))
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    steps = sorted({s for d in series.values() for s in d})
    note = (f"; {repeated} step{'s' * (repeated > 1)} logged twice (resumed run): the last record is shown"
            if repeated else "")
    fig.suptitle(f"Training curves of {path.parent.name or 'the run'}: {len(steps)} logged steps, "
                 f"up to step {steps[-1]}{note}", fontsize=11)
    return save_png(fig, out)
