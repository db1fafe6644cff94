"""Embeddings from shards: every rank embeds its share, the main process gets them all, sorted by key.

    feats, labels, keys = embed_shards(lambda x: method.embed(x), shards, size=32, channels=3, ...)
    feats, labels, keys = embed_shards(fn, shards, size=32, channels=3, out=Path("eval/x.npy"))  # on disk

Memory: with ``out``, each rank appends its rows to a raw float32 file beside ``out`` as the batches
arrive, holding none of them; the ranks exchange only labels, keys and row counts (small), and
the main process writes ``out`` (an ``.npy`` through ``numpy.lib.format.open_memmap``) in key order,
one block of rows at a time, reading the ranks' files through memory maps. Every rank then gets
``out`` as a read-only memory map. So the extra memory is the keys and labels plus one block of
rows, and the page cache holds the rest. The ranks' files must be visible to the main process: on
several machines ``out`` must lie on a file system they share. Without ``out`` (small sets: the
probe's training crops, a classifier's probabilities) the rows are gathered in memory to every
rank and put in key order by the same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sslkit import dist
from sslkit.atomic import replacing, write_text
from sslkit.data.augment import to_pixels
from sslkit.data.loaders import eval_loader
from sslkit.data.shardset import ShardSet

_SORT_BLOCK = 65536  # rows copied into key order at a time


class _RankRows:
    """This rank's embedded rows as they arrive: appended to a raw float32 file, or kept in a list."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path, self.parts, self.rows, self.dim = path, [], 0, None
        self.file = open(path, "wb") if path is not None else None  # noqa: SIM115 -- closed in handoff()

    def add(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.rows, self.dim = self.rows + len(rows), rows.shape[1]
        if self.file is not None:
            self.file.write(rows.tobytes())
        else:
            self.parts.append(rows)

    def handoff(self) -> tuple[Optional[str], list[np.ndarray], int, Optional[int]]:
        """What the main process needs to read these rows: (file or None, in-memory parts, rows, D)."""
        if self.file is not None:
            self.file.close()
        return (str(self.path) if self.path else None), self.parts, self.rows, self.dim


def _rank_source(handoff: tuple, dim: int) -> np.ndarray:
    """One rank's rows as an (n, D) array: a read-only memory map of its file, or its parts joined."""
    path, parts, rows, _ = handoff
    if path is None:
        return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"A rank's embeddings file '{path}' is not visible to the main process; "
                                "put the run directory on a file system every rank shares.")
    return np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim)) if rows else np.zeros((0, dim), np.float32)


def sort_rows(dest: np.ndarray, sources: list[np.ndarray], order: np.ndarray) -> None:
    """``dest[i] = concatenation(sources)[order[i]]``, one block of rows at a time (the sources may be
    memory maps: only the rows of one block are read at once, and nothing is concatenated)."""
    offsets = np.cumsum([0] + [len(source) for source in sources])
    for start in range(0, len(order), _SORT_BLOCK):
        wanted = order[start:start + _SORT_BLOCK]
        owner = np.searchsorted(offsets, wanted, side="right") - 1  # which source holds each row
        block = np.empty((len(wanted), dest.shape[1]), dtype=np.float32)
        for r, source in enumerate(sources):
            mine = owner == r
            if mine.any():
                block[mine] = source[wanted[mine] - offsets[r]]
        dest[start:start + len(wanted)] = block


@torch.no_grad()
def embed_shards(
    fn: Callable[[Tensor], Tensor], shards: ShardSet, *, size: int, channels: int, batch_size: int = 512,
    workers: int = 2, device: torch.device | str = "cpu", max_samples: int | None = None,
    desc: str = "embed", channels_last: bool = False, out: Optional[Path] = None,
    keep: Optional[Collection[str]] = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Apply ``fn`` ((B, C, H, W) -> (B, D)) to every sample once; returns (N, D) float32, (N,) labels, keys.

    Rows are sorted by sample key, so the result does not depend on the number of ranks. With
    ``out`` (a ``.npy`` path, written atomically) the rows stream to disk and come back as a
    read-only memory map of ``out`` on every rank (module docstring). ``keep``: embed only the
    samples with these keys (the others are still read and decoded, but ``fn`` never sees them).
    """
    loader = eval_loader(shards, size=size, channels=channels, batch_size=batch_size, workers=workers,
                         rank=dist.rank(), world_size=dist.world_size(), max_samples=max_samples)
    rows = _RankRows(None if out is None else _rank_file(Path(out), dist.rank()))
    labels, keys = [], []
    total = shards.num_samples if max_samples is None else min(max_samples, shards.num_samples or max_samples)
    bar = tqdm(total=len(keep) if keep is not None else total, desc=desc, unit="img",
               disable=not dist.is_main_process(), dynamic_ncols=True, leave=False)
    try:
        for batch in loader:
            images, batch_labels, ids = batch["image"], batch["label"].numpy(), list(batch["id"])
            if keep is not None:
                wanted = np.fromiter((key in keep for key in ids), dtype=bool, count=len(ids))
                if not wanted.any():
                    continue
                images, batch_labels = images[torch.from_numpy(wanted)], batch_labels[wanted]
                ids = [key for key, w in zip(ids, wanted) if w]
            images = images.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            rows.add(fn(images).float().cpu().numpy())
            labels.append(batch_labels)
            keys.extend(ids)
            bar.update(len(ids))
    finally:
        handoff = rows.handoff()
        bar.close()
    return _in_key_order(dist.gather_objects((handoff, labels, keys)), out)


def _rank_file(out: Path, rank: int) -> Path:
    """Where rank ``rank`` appends its rows while ``out`` is being made: a hidden file beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.stem}.rank{rank}.f32")


def _in_key_order(parts: list, out: Optional[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every rank's (handoff, labels, keys) -> all rows, labels and keys sorted by key (see embed_shards)."""
    all_keys = [key for part in parts for key in part[2]]
    batches = [lab for part in parts for lab in part[1]]
    all_labels = np.concatenate(batches).astype(np.int64) if batches else np.zeros(0, np.int64)
    order = np.argsort(np.asarray(all_keys), kind="stable")
    dims = {part[0][3] for part in parts} - {None}
    if len(dims) > 1:
        raise ValueError(f"The ranks' embeddings have different dimensions {sorted(dims)}; the embedding "
                         "function must give the same D for every batch.")
    dim = dims.pop() if dims else 0
    labels, keys = all_labels[order], [all_keys[i] for i in order]
    if out is None:
        feats = np.empty((len(order), dim), dtype=np.float32)
        sort_rows(feats, [_rank_source(part[0], dim) for part in parts], order)
        return feats, labels, keys
    if dist.is_main_process():
        with replacing(out) as tmp:
            dest = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(order), dim))
            sort_rows(dest, [_rank_source(part[0], dim) for part in parts], order)
            dest.flush()
            del dest
        for part in parts:
            if part[0][0] is not None:
                Path(part[0][0]).unlink(missing_ok=True)
    dist.barrier()  # out is complete before any rank opens it
    return np.load(out, mmap_mode="r") if len(order) else np.zeros((0, dim), np.float32), labels, keys


def save_embeddings(out: Path, feats: Union[np.ndarray, Path], labels: np.ndarray, keys: list[str],
                    **arrays: np.ndarray) -> None:
    """``embeddings.npy``, ``labels.npy``, ``keys.txt`` (one sample key a line) and any further
    ``NAME.npy`` in ``out``, each written atomically. ``feats`` may be the path of an ``.npy`` file
    already written (``embed_shards(out=...)``) on the same file system: it is renamed into place,
    not copied, and a memory map of it stays valid."""
    for name, array in {"embeddings": feats, "labels": labels, **arrays}.items():
        with replacing(out / f"{name}.npy") as tmp:
            if isinstance(array, Path):
                os.replace(array, tmp)
            else:
                np.save(tmp, array)
    write_text(out / "keys.txt", "\n".join(keys) + "\n")


def load_crops(shards: ShardSet, keys: list[str] | set[str], *, size: int, channels: int, workers: int = 2,
               max_samples: int | None = None) -> dict[str, np.ndarray]:
    """The crops with the given sample keys, as the evaluation saw them: {key: (H, W, C) uint8}.

    One pass over the shards (this process only), stopping once every key is found; for
    galleries and heat maps, so only a few hundred crops are asked for.
    """
    wanted, found = set(keys), {}
    loader = eval_loader(shards, size=size, channels=channels, batch_size=256, workers=workers, rank=0,
                         world_size=1, max_samples=max_samples)
    for batch in loader:
        for image, key in zip(batch["image"], batch["id"]):
            if key in wanted:
                found[key] = to_pixels(image).permute(1, 2, 0).numpy()
        if len(found) == len(wanted):
            break
    return found
