"""Loaders over a ``ShardSet``: shard list -> rank/worker split -> shuffle -> decode -> views -> batches.

    shards = resolve_shards(cfg.data.shards, manifest=cfg.data.manifest)
    views = build_views(cfg.data.views, size=cfg.data.size, channels=cfg.data.channels)
    loader = train_loader(shards, cfg.data, views=views, seed=cfg.run.seed, steps_per_epoch=n)
    for batch in loader:  # exactly n batches per pass, on every rank
        batch["query"], batch["key"]  # (B, C, H, W) float32
        batch["label"]                # (B,) long, -1 where a sample has no label
        batch["corrupt"]              # () long: samples/shards this worker skipped since its last batch

With ``views=None`` (``data.views.backend: tensor``) workers only decode and resize, and
``batch["image"]`` (B, C, size, size) uint8 replaces query and key: the training process
makes the views with ``BatchViews`` on its device.

Training streams are *resampled*: every global worker (rank x DataLoader worker) draws
shards with replacement, seeded from (seed, epoch, global worker id), so none runs dry
and every rank yields the same number of batches whatever the shard count (uneven ranks
hang DDP). Each pass over the loader is one epoch (workers are persistent); pass
``epoch=`` when rebuilding it on resume. With ``workers=0`` the views and the shuffle
draw from the calling process's RNGs. Evaluation streams read every sample exactly
once: shards split by rank, then by worker, in order, no resampling.

Under Accelerate each rank builds its own loader (rank and world size come from
``sslkit.dist``: the process group's when it is initialised, else 0 and 1). Do NOT pass it through
``accelerator.prepare`` -- or only with ``DataLoaderConfiguration(dispatch_batches=False,
split_batches=False)``: otherwise Accelerate reads batches on rank 0 and scatters them,
or re-splits them. Move batches to the device yourself.

Finding the shards is ``sslkit.data.shardset``; reading and decoding the tars, and counting
what could not be read, is ``sslkit.data.tarread``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from itertools import accumulate, islice
from typing import Any, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info
from webdataset.utils import make_seed

from sslkit import dist
from sslkit.config import DataConfig, check_balanced
from sslkit.data.augment import build_eval_transform
from sslkit.data.balanced import BalancedBatches
from sslkit.data.shardset import ShardSet, stored_channels, stored_shape
from sslkit.data.tarread import Decode, Skips, tarfile_to_samples

logger = logging.getLogger(__name__)


def _views(src: Iterator[dict], views: Callable) -> Iterator[dict]:
    for sample in src:
        query, key = views(sample["image"])
        yield {"query": query, "key": key, "label": sample["label"]}


def _images(src: Iterator[dict]) -> Iterator[dict]:
    for sample in src:
        yield {"image": sample["image"], "label": sample["label"]}


def _transform(src: Iterator[dict], transform: Callable) -> Iterator[dict]:
    for sample in src:
        yield {"image": transform(sample["image"]), "label": sample["label"], "id": sample["id"]}


class _Collate:
    """List of samples -> batch dict: tensors stacked (B, ...), ints (B,) long, strings a list; plus
    "corrupt", the () long count of samples/shards this worker skipped since its previous batch."""

    def __init__(self, skips: Skips) -> None:
        self.skips = skips

    def __call__(self, samples: list[dict]) -> dict:
        batch: dict[str, Any] = {}
        for name, first in samples[0].items():
            values = [s[name] for s in samples]
            if torch.is_tensor(first):
                batch[name] = torch.stack(values)
            else:
                batch[name] = torch.tensor(values, dtype=torch.long) if isinstance(first, int) else values
        batch["corrupt"] = torch.tensor(self.skips.take(), dtype=torch.long)
        return batch


class _WorkerShare:
    """Stage: this DataLoader worker's share of ``total`` items, so all workers together yield exactly ``total``."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, src: Iterator) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from islice(src, self.total // workers + (worker < self.total % workers))


class _ResampledStream(torch.utils.data.IterableDataset):
    """Source: {"url"} forever, shards drawn with replacement (wds.ResampledShards).

    Every pass first reseeds this worker -- shard draws, shuffle buffer (``self.rng``) and
    the torch RNG used by the views -- from (seed, epoch, global worker id), then advances
    the epoch. Global worker id = rank * workers + DataLoader worker id.
    """

    def __init__(self, urls: list[str], *, seed: int, epoch: int, rank: int, workers: int) -> None:
        super().__init__()
        self.seed, self.epoch, self.rank, self.workers = seed, epoch, rank, max(1, workers)
        self.rng = random.Random(seed)
        self.shards = wds.ResampledShards(urls, seed=seed, worker_seed=self.global_worker, deterministic=True)

    def global_worker(self) -> int:
        info = get_worker_info()
        return self.rank * self.workers + (info.id if info is not None else 0)

    def __iter__(self) -> Iterator[dict]:
        seed = make_seed(self.seed, self.epoch, self.global_worker())
        self.rng.seed(seed)
        if get_worker_info() is not None:  # in the main process (workers=0) the caller owns torch's RNG
            torch.manual_seed(seed)
        self.shards.epoch = self.epoch - 1  # ResampledShards adds one on entry: it draws with self.epoch
        self.epoch += 1
        yield from self.shards


class _Pipeline(wds.DataPipeline):
    """wds.DataPipeline with a fixed ``__len__`` (picklable, unlike ``with_length``)."""

    def __init__(self, *stages: Any, length: int) -> None:
        super().__init__(*stages)
        self.batches = length

    def __len__(self) -> int:
        return self.batches


# ---------------------------------------------------------------- loaders


def train_loader(
    shards: ShardSet, cfg: DataConfig, *, views: Optional[Callable], seed: int, steps_per_epoch: int,
    epoch: int = 0,
) -> DataLoader:
    """Endless resampled stream cut into passes of exactly ``steps_per_epoch`` full batches per rank.

    ``views``: PIL image -> (query, key) tensors, e.g. ``build_views(...)``; batches are then
    ``{"query": (B,C,H,W), "key": (B,C,H,W), "label": (B,) long, "corrupt": () long}``.
    ``views=None`` (the tensor back-end, ``BatchViews``): workers only decode and resize, and
    batches are ``{"image": (B,C,size,size) uint8, "label", "corrupt"}``.
    ``len(loader) == steps_per_epoch``.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch is {steps_per_epoch}; pass at least 1 (lower data.batch_size or add "
                         "samples).")
    rank = dist.rank()
    skips = Skips()
    stream = _ResampledStream(shards.urls, seed=seed, epoch=epoch, rank=rank, workers=cfg.workers)
    pipeline = _Pipeline(
        stream,  # {"url"}: this global worker's seeded draws of shards, forever
        tarfile_to_samples(skips=skips, retries=cfg.retries),  # {"__key__", "__url__", "png", "cls", "json"}: raw bytes
        wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=stream.rng),  # same, mixed across shards
        Decode(label_key=cfg.labels, skips=skips, channels=stored_channels(shards.manifest, cfg.channels),
                stored=stored_shape(shards.manifest),
                # {"image": PIL, "label": int, "id": str}; corrupt or out-of-place crops skipped
                uint8=None if views is not None else (cfg.size, cfg.channels)),  # or "image": (C,size,size) uint8
        wds.pipelinefilter(_views)(views) if views is not None  # {"query": (C,H,W), "key": (C,H,W), "label": int}
        else _images,  # or {"image": (C,size,size) uint8, "label": int}
        _batches(cfg, skips, stream.rng, shards),  # (B,C,H,W), (B,), "corrupt": (); P x K classes when balanced
        _WorkerShare(steps_per_epoch),  # this worker's share of the pass's batches
        length=steps_per_epoch,
    )
    return DataLoader(
        pipeline, batch_size=None, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def _batches(cfg: DataConfig, skips: Skips, rng: random.Random, shards: ShardSet) -> Callable:
    """The batching stage: full shuffled batches, or class-balanced ones (``data.balanced``)."""
    balanced = cfg.balanced
    if not balanced.classes:
        return wds.batched(cfg.batch_size, collation_fn=_Collate(skips), partial=False)
    check_balanced(cfg)  # also for a DataConfig built in code, which load_config never saw
    known = len(shards.classes) if shards.classes else None
    if known is not None and balanced.classes > known:
        raise ValueError(f"data.balanced.classes={balanced.classes} but the shards hold {known} classes "
                         f"({', '.join(shards.classes)}); lower data.balanced.classes.")
    return BalancedBatches(classes=balanced.classes, per_class=balanced.per_class,
                           buffer=balanced.buffer or 8 * balanced.per_class, rng=rng, collate=_Collate(skips))


def eval_loader(
    shards: ShardSet, *, size: int, channels: int, batch_size: int, workers: int, rank: Optional[int] = None,
    world_size: Optional[int] = None, max_samples: Optional[int] = None, label_key: str = "cls",
) -> DataLoader:
    """Every sample exactly once across ranks and workers, in a fixed order for a given world size.

    Shards are split by rank (``urls[rank::world_size]``), then by worker; each worker's last
    batch may be partial, and a rank with fewer shards yields fewer batches (gather with
    sizes). ``rank``/``world_size`` default to ``sslkit.dist``'s (the process group's, else 0 of
    1). ``max_samples`` keeps the first samples in shard order when per-shard counts are known,
    else an even share per rank and worker. Batches: ``{"image": (B,C,H,W), "label": (B,) long, "id": list[str],
    "corrupt": () long}``.
    """
    rank, world_size = (rank if rank is not None else dist.rank()), (world_size or dist.world_size())
    urls = shards.urls[rank::world_size]
    limit: list[Callable] = []
    if max_samples is not None and shards.samples_per_shard is not None:
        offsets = dict(zip(shards.urls, accumulate(shards.samples_per_shard, initial=0)))
        urls = [u for u in urls if offsets[u] < max_samples]
        limit = [_Prefix(offsets, max_samples)]
    elif max_samples is not None:
        limit = [_WorkerShare(max_samples // world_size + (rank < max_samples % world_size))]
    if not urls:
        logger.warning("Rank %d of %d has no shards to evaluate (%d shards in all); it yields no batches.",
                       rank, world_size, len(shards.urls))
        return DataLoader([], batch_size=None)
    skips = Skips()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),  # {"url"}: this rank's shards, in order
        wds.split_by_worker,  # this worker's shards
        tarfile_to_samples(skips=skips),  # {"__key__", "__url__", "png", "cls", "json"}: raw bytes
        *limit,  # same, only the first max_samples
        Decode(label_key=label_key, skips=skips, channels=stored_channels(shards.manifest, channels),
                stored=stored_shape(shards.manifest)),
        # {"image": PIL, "label": int, "id": str}
        wds.pipelinefilter(_transform)(build_eval_transform(size=size, channels=channels)),  # "image": (C,H,W)
        wds.batched(batch_size, collation_fn=_Collate(skips), partial=True),  # (B,C,H,W), (B,), list[str], ()
    )
    workers = min(workers, len(urls))  # a worker without a shard would only idle
    return DataLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())


class _Prefix:
    """Stage: keep samples whose global index (shard order, then position in the shard) is below ``limit``."""

    def __init__(self, offsets: dict[str, int], limit: int) -> None:
        self.offsets, self.limit = offsets, limit

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        url, position = None, 0
        for sample in src:
            if sample["__url__"] != url:
                url, position = sample["__url__"], 0
            if self.offsets[url] + position >= self.limit:
                return  # this worker's later shards come later in the global order too
            position += 1
            yield sample


__all__ = ["train_loader", "eval_loader"]
