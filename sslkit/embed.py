"""Embeddings from shards: every rank embeds its share, the main process gets them all.

    feats, labels, keys = embed_shards(lambda x: method.embed(x), shards, size=32, channels=3, ...)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sslkit import dist
from sslkit.atomic import replacing, write_text
from sslkit.data.augment import to_pixels
from sslkit.data.loaders import eval_loader
from sslkit.data.shardset import ShardSet


@torch.no_grad()
def embed_shards(
    fn: Callable[[Tensor], Tensor], shards: ShardSet, *, size: int, channels: int, batch_size: int = 512,
    workers: int = 2, device: torch.device | str = "cpu", max_samples: int | None = None,
    desc: str = "embed", channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Apply ``fn`` ((B, C, H, W) -> (B, D)) to every sample once; returns (N, D) float32, (N,) labels, keys.

    Rows are sorted by sample key, so the result does not depend on the number of ranks.
    """
    loader = eval_loader(shards, size=size, channels=channels, batch_size=batch_size, workers=workers,
                         rank=dist.rank(), world_size=dist.world_size(), max_samples=max_samples)
    feats, labels, keys = [], [], []
    total = shards.num_samples if max_samples is None else min(max_samples, shards.num_samples or max_samples)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not dist.is_main_process(), dynamic_ncols=True, leave=False)
    for batch in loader:
        images = batch["image"].to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        feats.append(fn(images).float().cpu().numpy())
        labels.append(batch["label"].numpy())
        keys.extend(batch["id"])
        bar.update(len(batch["id"]))
    bar.close()
    parts = dist.gather_objects((feats, labels, keys))
    all_feats = np.concatenate([f for p in parts for f in p[0]]).astype(np.float32)
    all_labels = np.concatenate([lab for p in parts for lab in p[1]]).astype(np.int64)
    all_keys = [k for p in parts for k in p[2]]
    order = np.argsort(np.asarray(all_keys), kind="stable")
    return all_feats[order], all_labels[order], [all_keys[i] for i in order]


def save_embeddings(out: Path, feats: np.ndarray, labels: np.ndarray, keys: list[str],
                    **arrays: np.ndarray) -> None:
    """``embeddings.npy``, ``labels.npy``, ``keys.txt`` (one sample key a line) and any further
    ``NAME.npy`` in ``out``, each written atomically."""
    for name, array in {"embeddings": feats, "labels": labels, **arrays}.items():
        with replacing(out / f"{name}.npy") as tmp:
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
