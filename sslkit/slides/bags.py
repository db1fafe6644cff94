"""Per-slide feature bags on disk, in the layout CLAM and TRIDENT read.

    write_bag(out / "slide-1.h5", features, coords, attrs)   # atomically: a temporary name, then renamed
    features, coords, attrs = load_bag(out / "slide-1.h5")

One HDF5 file per slide:

- ``features``: float32 (N, D), one row per tile;
- ``coords``: int64 (N, 2), the level-0 pixel (x, y) of each tile's top-left corner, rows in
  the order of ``features``, sorted by (y, x);
- attributes, on the file and on ``coords`` (where CLAM and TRIDENT look): ``patch_size``
  (tile side in target pixels), ``patch_size_level0`` (the tile side in level-0 pixels),
  ``target_mpp`` and ``level0_mpp`` (um/px), ``slide_id``, ``slide_path`` (as given),
  ``encoder`` (``sslkit.slides.encoders.TileEncoder.identity``), ``feature_kind``
  ("backbone" or "projector"), ``sslkit_version``; and, for TRIDENT's readers,
  ``target_magnification`` and ``level0_magnification`` (10 / mpp: 0.5 um/px is 20x) and
  ``overlap`` (target pixels).

``write_pt`` writes the features alone as a torch tensor (N, D), CLAM's ``pt_files`` layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sslkit.atomic import replacing

BAG_ATTRS = ("patch_size", "patch_size_level0", "target_mpp", "level0_mpp", "slide_id", "slide_path", "encoder",
             "feature_kind", "sslkit_version")


def _plain(value: Any) -> Any:
    """An HDF5 attribute value as Python: numpy scalars to int/float, bytes to str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_bag(path: str | Path, features: np.ndarray, coords: np.ndarray, attrs: dict[str, Any]) -> Path:
    """Write one slide's bag to ``path`` (.h5) under a temporary name, then rename it into place.

    ``features`` (N, D) is stored as float32, ``coords`` (N, 2) as int64; ``attrs`` (str, int,
    float values) go on the file and on ``coords``. Raises ValueError when the row counts differ.
    """
    import h5py

    features = np.ascontiguousarray(features, dtype=np.float32)
    coords = np.ascontiguousarray(coords, dtype=np.int64).reshape(-1, 2)
    if features.ndim != 2 or len(features) != len(coords):
        raise ValueError(f"A bag needs features (N, D) and coords (N, 2) with the same N; got {features.shape} and "
                         f"{coords.shape}.")
    path = Path(path)
    with replacing(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            dataset = f.create_dataset("coords", data=coords)
            for target in (f, dataset):
                for key, value in attrs.items():
                    target.attrs[key] = value
    return path


def load_bag(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features float32 (N, D), coords int64 (N, 2), attrs dict) of a bag; attrs are the file's
    merged with ``coords``' (the file's win), as plain Python values."""
    import h5py

    with h5py.File(path, "r") as f:
        features = np.asarray(f["features"][()], dtype=np.float32)
        coords = np.asarray(f["coords"][()], dtype=np.int64)
        attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
        attrs.update({k: _plain(v) for k, v in f.attrs.items()})
    return features, coords, attrs


def bag_rows(path: str | Path) -> int | None:
    """The number of tiles in a complete, readable bag; None when the file is missing or unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            n, m = f["features"].shape[0], f["coords"].shape[0]
            return int(n) if n == m and f["coords"].shape[1:] == (2,) else None
    except (OSError, KeyError, ValueError, IndexError):
        return None


def write_pt(path: str | Path, features: np.ndarray) -> Path:
    """The features as a float32 torch tensor (N, D) in ``path`` (.pt), atomically: CLAM's ``pt_files``."""
    import torch

    path = Path(path)
    with replacing(path) as tmp:
        torch.save(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), tmp)
    return path


__all__ = ["BAG_ATTRS", "bag_rows", "load_bag", "write_bag", "write_pt"]
