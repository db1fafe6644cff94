"""Galleries of crops: the first thing a pathologist looks at in a clustering.

``gallery_picks`` chooses which crops of each cluster to show (a seeded random sample, rows
in the order of the cluster confusion matrix) and ``cluster_gallery`` draws them, one row
per cluster, magnified without smoothing so 32-pixel crops stay readable.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sslkit.evaluate.plots import DPI, _check_classes, _labels, cluster_order, save_png

__all__ = ["cluster_gallery", "gallery_picks"]


def gallery_picks(clusters: Any, *, labels: Any | None = None, classes: Sequence[str] | None = None,
                  per_cluster: int = 12, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Which crops to show per cluster, and each row's title, for :func:`cluster_gallery`.

    Crops are a seeded random sample of each cluster rather than those nearest its
    centroid: the nearest ones look alike and hide how mixed a cluster is. Rows follow
    :func:`cluster_order` when labels exist, so they line up with the cluster confusion.

    Returns:
        indices: one sorted int array per cluster (into the N samples).
        titles: e.g. "cluster 2: 412 crops, 71 % inflammatory".
    """
    c = _labels(clusters, name="clusters")
    y = _labels(labels, name="labels", n=c.shape[0]) if labels is not None else np.full(c.shape, -1)
    keep = y >= 0
    if keep.any() and classes is None:
        raise ValueError("gallery_picks got labels but no class names; pass classes=[...].")
    if keep.any():
        _check_classes(y, classes)
        order = cluster_order(y[keep], c[keep])[0]
        order += sorted(int(k) for k in np.unique(c) if int(k) not in order)
    else:
        order = sorted(int(k) for k in np.unique(c))
    rng = np.random.default_rng(seed)
    indices, titles = [], []
    for k in order:
        members = np.flatnonzero(c == k)
        indices.append(np.sort(rng.choice(members, size=min(per_cluster, members.size), replace=False)))
        title = f"cluster {k}: {members.size} crops"
        known = y[members][y[members] >= 0]
        if known.size:
            top = np.bincount(known).argmax()
            title += f", {100 * np.mean(known == top):.0f} % {classes[top]}"
        titles.append(title)
    return indices, titles


def _strip(row: np.ndarray, ncols: int, gap: int) -> np.ndarray:
    """(n, H, W, C) crops -> one (H, ncols * (W + gap) - gap, C) image on a white background."""
    n, h, w, ch = row.shape
    strip = np.full((h, ncols * (w + gap) - gap, ch), 255, dtype=np.uint8)
    for i in range(min(n, ncols)):
        strip[:, i * (w + gap): i * (w + gap) + w] = row[i]
    return strip


def cluster_gallery(images: Sequence[np.ndarray], *, titles: Sequence[str], out: str | Path,
                    ncols: int | None = None, title: str = "Example crops per k-means cluster") -> Path:
    """One row per cluster: a strip of its crops, the row's title on the left.

    Args:
        images: one (n_i, H, W, C) uint8 array per row (C = 1 shown in grey, or 3);
            (n_i, H, W) is read as grey.
        titles: one per row, e.g. "cluster 2: 412 crops, 71 % inflammatory".
        ncols: crops per row (default: the longest row); longer rows are cut.

    Small crops are magnified with nearest-neighbour sampling, so their pixels stay sharp
    and every crop is drawn at least ~95 pixels wide.
    """
    rows = [np.asarray(r)[..., None] if np.asarray(r).ndim == 3 else np.asarray(r) for r in images]
    if not rows or len(rows) != len(titles):
        raise ValueError(f"cluster_gallery needs one title per row and at least one row; got {len(rows)} rows "
                         f"and {len(titles)} titles.")
    shapes = {r.shape[1:] for r in rows}
    if len(shapes) != 1 or any(r.dtype != np.uint8 or r.ndim != 4 for r in rows) or rows[0].shape[-1] not in (1, 3):
        raise ValueError(f"cluster_gallery needs uint8 crops of one shape (n, H, W, 1 or 3); got shapes "
                         f"{sorted(shapes)} and dtypes {sorted({str(r.dtype) for r in rows})}.")
    h, w, ch = rows[0].shape[1:]
    ncols = ncols or max(1, max(len(r) for r in rows))
    gap = max(1, w // 16)
    crop_in = float(np.clip(w / 48, 0.64, 1.2))  # a 32-pixel crop is 96 pixels wide at 150 dpi
    strip_in = crop_in * (ncols * (w + gap) - gap) / w
    left_in, top_in, row_in = 2.5, 0.45, crop_in * h / w + 0.12
    width, height = left_in + strip_in + 0.15, top_in + row_in * len(rows) + 0.1
    fig = Figure(figsize=(width, height))
    for i, (row, text) in enumerate(zip(rows, titles)):
        bottom = height - top_in - row_in * (i + 1) + 0.06
        ax = fig.add_axes((left_in / width, bottom / height, strip_in / width, (row_in - 0.12) / height))
        strip = _strip(row, ncols, gap)
        # Nearest when magnifying keeps pixels crisp; matplotlib's antialiasing when shrinking large crops.
        interp = "nearest" if crop_in * DPI >= w else "antialiased"
        if ch == 1:
            ax.imshow(strip[..., 0], cmap="gray", vmin=0, vmax=255, interpolation=interp, aspect="auto")
        else:
            ax.imshow(strip, interpolation=interp, aspect="auto")
        ax.set_axis_off()
        ax.text(-0.1 / strip_in, 0.5, "\n".join(textwrap.wrap(text, 30)), transform=ax.transAxes,
                ha="right", va="center", fontsize=8)
    fig.suptitle(f"{title} ({len(rows)} rows, up to {ncols} crops each)", fontsize=10,
                 y=1 - 0.1 / height, va="top")
    return save_png(fig, out)
