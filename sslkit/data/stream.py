"""Reading shards: shard list -> rank/worker split -> shuffle -> decode -> views -> batches.

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
``torch.distributed`` when it is initialised, else 0 and 1). Do NOT pass it through
``accelerator.prepare`` -- or only with ``DataLoaderConfiguration(dispatch_batches=False,
split_batches=False)``: otherwise Accelerate reads batches on rank 0 and scatters them,
or re-splits them. Move batches to the device yourself.

Corrupt data is never fatal: an undecodable image or label skips the sample, an
unreadable shard or truncated member the rest of that shard; each is counted in
``batch["corrupt"]`` and logged once per worker with its shard and key. Only 1,000
failures in a row without one good sample stop reading, with an error.

Remote shards (http(s) URLs, ``pipe:CMD``) are opened by ``sslkit.data.remote``: a dropped
connection or failed command resumes at the byte where it stopped, so nothing is skipped;
a remote shard that stays unreadable after the retries, or that the server refuses (4xx),
stops reading with ``RemoteError`` naming the URL instead of counting as corrupt.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from itertools import accumulate, islice
from typing import Any, Callable, Iterable, Iterator, Optional
from urllib.parse import urljoin

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info
from webdataset.tariterators import base_plus_ext
from webdataset.utils import make_seed

from sslkit.config import DataConfig, check_balanced
from sslkit.data.augment import build_decode_transform, build_eval_transform
from sslkit.data.balanced import BalancedBatches
from sslkit.data.remote import RETRIES, RemoteError, open_shard, read_json
from sslkit.errors import ManifestError, MissingInput
from sslkit.shardformat import FORMAT as MANIFEST_FORMAT
from sslkit.shardformat import MANIFEST_NAME, StrictTarInfo, class_names, parse_manifest

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "tif", "tiff")
MAX_FAILURES_IN_A_ROW = 1000
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: tar members such as __index__ belong to no sample
_MAKE_IT = "create it with `sslkit shard synthetic --out {}` or point data.shards at existing shards"


@dataclass
class ShardSet:
    """Where the shards are and what the manifest says about them."""

    urls: list[str]
    manifest: Optional[dict]
    num_samples: Optional[int]  # manifest's num_samples; else counted from local tar headers; else None (remote)
    classes: Optional[list[str]]
    samples_per_shard: Optional[list[int]] = None  # aligned with urls, when known
    missing: list[str] = field(default_factory=list)  # shards the manifest lists that are not there (skip_missing)
    missing_samples: int = 0  # how many samples the manifest says they held


# ---------------------------------------------------------------- finding shards


def _is_remote(spec: str) -> bool:
    return ("://" in spec and not spec.startswith("file://")) or spec.startswith("pipe:")


def _read_manifest(path: Optional[str], *, missing_ok: bool = False) -> Optional[dict]:
    """The manifest at a local path or URL, checked and in the current layout (``parse_manifest``).

    ``missing_ok``: None when the server refuses the URL (4xx; S3 answers 403 for a missing key)."""
    if path is None:
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested thousands deep
        if missing_ok and getattr(err, "status", None):
            logger.info("No manifest at %s (%s); sample counts stay unknown.", path, err)
            return None
        raise ManifestError(f"Manifest '{path}' cannot be read ({err}); rewrite it with `sslkit shard` "
                            "or set data.manifest to a valid one.") from None
    return parse_manifest(manifest, f"'{path}'")


def _beside(folder: str) -> Optional[str]:
    path = os.path.join(folder, "manifest.json")
    return path if os.path.isfile(path) else None


def _count_local(urls: list[str]) -> list[int]:
    """Samples per local shard from the tar headers alone (no member data is read).

    A damaged shard is counted up to the damage, with a warning (reading skips the rest of it too);
    ``StrictTarInfo`` makes a damaged header or a cut-short file count as damage, not as its end."""
    counts = []
    for url in urls:
        keys: set = set()
        try:
            with tarfile.open(url.removeprefix("file://"), mode="r:", tarinfo=StrictTarInfo) as tar:
                for member in tar:  # one at a time: the keys before the damage stay counted
                    keys.add(base_plus_ext(member.name)[0])
        except (OSError, EOFError, ValueError, tarfile.TarError) as err:  # ValueError: a malformed pax header
            logger.warning("Shard %s is damaged (%s); counting the %d samples before it.", url, err,
                           len(keys - {None}))
        counts.append(len(keys - {None}))
    return counts


def _check_local(spec: str, urls: list[str], *, skip_missing: bool = False) -> list[str]:
    """The missing local shards: [] when all exist; with ``skip_missing``, some (not all) may be missing."""
    missing = [u for u in urls if not os.path.isfile(u.removeprefix("file://"))]
    if not missing or skip_missing and len(missing) < len(urls) and os.path.isdir(os.path.dirname(missing[0]) or "."):
        return missing
    folder = os.path.dirname(missing[0]) or "."
    if not spec.endswith(".tar") and "{" not in spec:  # a folder name, not a shard pattern
        folder, what = spec, f"Shard folder '{spec}' does not exist"
    elif not os.path.isdir(folder):
        what = f"Shard folder '{folder}' does not exist"
    else:
        what = f"Shard '{missing[0]}' does not exist ({len(missing)} of {len(urls)} missing)"
    raise MissingInput(f"{what}; {_MAKE_IT.format(folder)}.")


def resolve_shards(spec: str, *, manifest: Optional[str] = None, skip_missing: bool = False) -> ShardSet:
    """Shard URLs from a folder holding manifest.json (or *.tar), a brace pattern, or a URL/pipe.

    ``manifest`` overrides where the manifest is read (a path or URL); by default it is
    ``manifest.json`` in the folder or beside the first shard (local or http(s); ``pipe:``
    shards need ``manifest``). Sample counts come from the manifest; without one, local
    shards are counted from their tar headers and remote ones stay unknown
    (``num_samples=None``: training cannot be sized, eval reads to the end).
    Raises FileNotFoundError naming the path when the folder or a local shard is missing; with
    ``skip_missing`` (training) missing shards are left out with a warning and reported in
    ``missing`` and ``missing_samples``, unless all are missing.
    """
    spec = str(spec)
    if os.path.isdir(spec):  # shard names in the manifest are relative to this folder
        data = _read_manifest(manifest or _beside(spec))
        names = [s["name"] for s in (data or {}).get("shards", [])]
        urls = [n if "://" in n else os.path.join(spec, n) for n in names]
        urls = urls or sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not urls:
            raise MissingInput(
                f"Shard folder '{spec}' holds no manifest.json and no .tar shards; {_MAKE_IT.format(spec)}."
            )
    else:
        urls = list(braceexpand.braceexpand(spec))
        if manifest or not _is_remote(spec):
            data = _read_manifest(manifest or _beside(os.path.dirname(urls[0])))
        elif spec.startswith(("http://", "https://")):  # manifest.json in the shards' folder, if the server has one
            data = _read_manifest(urljoin(urls[0], MANIFEST_NAME), missing_ok=True)
        else:
            data = None  # pipe: commands say nothing about a manifest
    missing = [] if _is_remote(spec) else _check_local(spec, urls, skip_missing=skip_missing)
    if missing:
        lost = _samples_per_shard(missing, data)
        logger.warning("%d of %d shards of %s are missing and left out (%s%s).", len(missing), len(urls), spec,
                       ", ".join(os.path.basename(u) for u in missing[:5]), ", ..." if len(missing) > 5 else "")
        urls = [u for u in urls if u not in missing]
    per_shard = _samples_per_shard(urls, data)
    if per_shard is None and not _is_remote(spec):
        per_shard = _count_local(urls)
        logger.info("No per-shard counts in a manifest for %s; counted %d samples from tar headers.", spec,
                    sum(per_shard))
    num_samples = sum(per_shard) if per_shard is not None else (data or {}).get("num_samples")
    return ShardSet(urls, data, num_samples, class_names(data or {}), per_shard, missing,
                    sum(lost or []) if missing else 0)


def _samples_per_shard(urls: list[str], manifest: Optional[dict]) -> Optional[list[int]]:
    by_name = {os.path.basename(s["name"]): s.get("samples") for s in (manifest or {}).get("shards", [])}
    counts = [by_name.get(os.path.basename(u)) for u in urls]
    return None if None in counts else counts


def _rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---------------------------------------------------------------- pipeline stages


class _Skips:
    """This worker's tally of skipped samples/shards; also the webdataset error handler."""

    def __init__(self) -> None:
        self.pending, self.in_a_row, self.logged = 0, 0, set()

    def __call__(self, exn: Exception) -> bool:  # wds handler for unreadable shards and tar members
        if isinstance(exn, RemoteError):  # retries spent or refused: not corrupt data, and never silent
            raise type(exn)(exn.message, exn.status) from None  # fresh: webdataset appended to exn.args
        args = getattr(exn, "args", ())
        url = args[-1] if len(args) > 1 and isinstance(args[-1], str) else "a shard"
        self.skip(url, None, args[0] if args else exn)
        return True

    def skip(self, url: Optional[str], key: Optional[str], err: Any) -> None:
        self.pending, self.in_a_row = self.pending + 1, self.in_a_row + 1
        if self.in_a_row > MAX_FAILURES_IN_A_ROW:
            raise RuntimeError(
                f"{self.in_a_row} samples or shards in a row could not be read (last: {url} {key or ''}: {err}); "
                "check the shards with `sslkit shard verify` or point data.shards elsewhere."
            )
        if (url, key) not in self.logged:
            self.logged.add((url, key))
            logger.warning("Skipped %s of shard %s: %s", f"sample {key}" if key else "the rest", url, err)

    def ok(self) -> None:
        self.in_a_row = 0

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


def _pil_uint8(image: Image.Image, *, size: int, channels: int) -> Optional[torch.Tensor]:
    """(C, size, size) uint8 of a decoded image already ``size`` x ``size`` in mode RGB (3 channels) or
    L (1), else None: the pixels ``build_decode_transform`` gives (its mode conversion and resize would
    not change them) without its per-sample transform dispatch, which cost a worker about 17 % of its
    CPU on 32x32 PNG crops. Decoding stays with PIL, which raises on corrupt data (libpng through
    ``torchvision.io.decode_png`` crashed the process on a PNG with damaged pixel data)."""
    if image.size != (size, size) or image.mode != ("RGB" if channels == 3 else "L"):
        return None
    pixels = torch.from_numpy(np.array(image))  # (H, W, C) or (H, W); np.array copies, so it is writable
    return pixels.permute(2, 0, 1) if pixels.ndim == 3 else pixels.unsqueeze(0)


_GRAY_MODES = ("1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def stored_channels(manifest: Optional[dict], channels: int) -> int:
    """Channels of the shard set's crops: the manifest's when it gives one for all, else ``channels`` (data.channels)."""
    stored = ((manifest or {}).get("image") or {}).get("channels")
    return stored if stored in (1, 3) else channels


def stored_shape(manifest: Optional[dict]) -> Optional[tuple[int, int]]:
    """(height, width) every crop of the shard set has, from its manifest; None where crops differ or it is unknown."""
    image = (manifest or {}).get("image") or {}
    h, w = image.get("height"), image.get("width")
    return (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) else None


class _Decode:
    """Stage: raw samples -> {"image": PIL, "label": int, "key": str}; corrupt ones skipped and counted.

    Besides bytes that do not decode, a crop whose kind contradicts the set counts as corrupt: a
    grayscale crop in a set of ``channels``=3 (or a colour one where it is 1; ``channels`` is the
    set's, from its manifest, else data.channels), or a crop whose size differs from ``stored``
    (the manifest's, when all crops of the set share one). Other colour modes (RGBA, palette,
    CMYK) are converted, and so is a whole set into the model's data.channels. With ``uint8=(size, channels)`` (the tensor back-end)
    "image" is the (C, size, size) uint8 tensor that ``BatchViews`` takes: crops already of that
    size and mode straight from PIL's pixels (``_pil_uint8``), others through
    ``build_decode_transform`` -- the same pixels either way; an image that fails either path
    counts as corrupt."""

    def __init__(self, *, label_key: str, skips: _Skips, uint8: Optional[tuple[int, int]] = None,
                 channels: Optional[int] = None, stored: Optional[tuple[int, int]] = None) -> None:
        self.label_key, self.skips, self.uint8 = label_key, skips, uint8
        self.channels, self.stored = channels, stored
        self.to_uint8 = build_decode_transform(size=uint8[0], channels=uint8[1]) if uint8 is not None else None

    def _check(self, image: Image.Image) -> None:
        gray = image.mode in _GRAY_MODES
        if self.channels == 3 and gray or self.channels == 1 and not gray and image.mode != "P":
            kind = "grayscale" if gray else "colour"
            raise ValueError(f"a {kind} crop (mode {image.mode}) in a set of {self.channels}-channel crops")
        if self.stored is not None and (image.height, image.width) != self.stored:
            raise ValueError(f"a {image.height}x{image.width} crop in a set of {self.stored[0]}x{self.stored[1]} "
                             "crops (its manifest)")

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                data = next(sample[f] for f in IMAGE_FIELDS if f in sample)
                image = self._image(data)
                label = int(sample[self.label_key]) if self.label_key in sample else -1
            except Exception as err:  # noqa: BLE001 -- whatever breaks decoding these bytes marks the sample corrupt
                why = "no image field" if isinstance(err, StopIteration) else err
                self.skips.skip(sample.get("__url__"), sample.get("__key__"), why)
                continue
            self.skips.ok()
            yield {"image": image, "label": label, "key": sample["__key__"]}

    def _image(self, data: bytes) -> Any:
        image = Image.open(io.BytesIO(data))
        image.load()
        self._check(image)
        if self.uint8 is None:
            return image
        pixels = _pil_uint8(image, size=self.uint8[0], channels=self.uint8[1])
        return pixels if pixels is not None else self.to_uint8(image)


def _open(src: Iterable[dict], *, handler: _Skips, retries: int) -> Iterator[dict]:
    """Stage: {"url"} -> {"url", "stream"}; remote streams resume after a dropped connection.

    webdataset's ``url_opener`` with ``open_shard`` in place of ``gopen``; each stream is closed
    once the next stage has read it (or stopped)."""
    for sample in src:
        try:
            stream = open_shard(sample["url"], retries=retries)
        except Exception as exn:  # noqa: BLE001 -- the handler decides, as in url_opener
            exn.args = exn.args + (sample["url"],)
            if handler(exn):
                continue
            break
        try:
            yield {**sample, "stream": stream}
        finally:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 -- a wds Pipe (gs:, sftp:) re-raises a failure reading already reported
                pass


def _tar_samples(stream: Any, url: str, skips: _Skips) -> Iterator[dict]:
    """The samples of one tar stream: consecutive members ``<key>.<ext>`` grouped by key, as webdataset
    does. A sample is yielded only once the next key (or the end of the archive) shows it is whole; one
    with two members of the same extension counts as corrupt."""
    current: Optional[dict] = None
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=StrictTarInfo) as tar:
        for member in tar:
            key, ext = base_plus_ext(member.name)
            if not member.isreg() or key is None or _META.match(member.name):
                continue
            data = tar.extractfile(member).read()
            tar.members = []  # stream mode keeps every header otherwise
            if current is None or key != current["__key__"]:
                if current is not None and not current.pop("__bad__", False):
                    yield current
                current = {"__key__": key, "__url__": url}
            if ext.lower() in current:
                skips.skip(url, key, f"two members named {member.name}")
                current["__bad__"] = True
            current[ext.lower()] = data
    if current is not None and not current.pop("__bad__", False):
        yield current


def _samples(src: Iterable[dict], *, skips: _Skips, retries: int = RETRIES) -> Iterator[dict]:
    """Stage: {"url"} -> raw samples {"__key__", "__url__", "png", "cls", "json"}, one shard at a time.

    As ``wds.tarfile_to_samples`` (opened through ``_open``), but where webdataset would lose data
    without a count: a damaged header or a file cut short raises (``StrictTarInfo``) instead of
    ending the shard; a shard that fails part-way drops the sample it was assembling (its other
    members are missing) rather than yielding it unlabelled or carrying it into the next shard; and
    a shard without one sample counts as a skip, so a resampled stream over empty shards stops with
    the error instead of spinning forever."""
    for source in _open(src, handler=skips, retries=retries):  # {"url", "stream"}: one open shard at a time
        url, read = source["url"], 0
        try:
            for sample in _tar_samples(source["stream"], url, skips):
                read += 1
                yield sample
        except RemoteError:  # retries spent or refused: not corrupt data, and never silent
            raise
        except Exception as err:  # noqa: BLE001 -- whatever breaks reading the tar skips the rest of the shard
            skips.skip(url, None, err)
            continue
        if not read:
            skips.skip(url, None, "no samples in the shard")


_tarfile_to_samples = wds.pipelinefilter(_samples)


def _views(src: Iterator[dict], views: Callable) -> Iterator[dict]:
    for sample in src:
        query, key = views(sample["image"])
        yield {"query": query, "key": key, "label": sample["label"]}


def _images(src: Iterator[dict]) -> Iterator[dict]:
    for sample in src:
        yield {"image": sample["image"], "label": sample["label"]}


def _transform(src: Iterator[dict], transform: Callable) -> Iterator[dict]:
    for sample in src:
        yield {"image": transform(sample["image"]), "label": sample["label"], "key": sample["key"]}


class _Collate:
    """List of samples -> batch dict: tensors stacked (B, ...), ints (B,) long, strings a list; plus
    "corrupt", the () long count of samples/shards this worker skipped since its previous batch."""

    def __init__(self, skips: _Skips) -> None:
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
        raise ValueError(f"steps_per_epoch is {steps_per_epoch}; pass at least 1 (lower data.batch_size or add samples).")
    rank, _ = _rank_world()
    skips = _Skips()
    stream = _ResampledStream(shards.urls, seed=seed, epoch=epoch, rank=rank, workers=cfg.workers)
    pipeline = _Pipeline(
        stream,  # {"url"}: this global worker's seeded draws of shards, forever
        _tarfile_to_samples(skips=skips, retries=cfg.retries),  # {"__key__", "__url__", "png", "cls", "json"}: raw bytes
        wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=stream.rng),  # same, mixed across shards
        _Decode(label_key=cfg.labels, skips=skips, channels=stored_channels(shards.manifest, cfg.channels),
                stored=stored_shape(shards.manifest),
                # {"image": PIL, "label": int, "key": str}; corrupt or out-of-place crops skipped
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


def _batches(cfg: DataConfig, skips: _Skips, rng: random.Random, shards: ShardSet) -> Callable:
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
    sizes). ``rank``/``world_size`` default to torch.distributed's. ``max_samples`` keeps the
    first samples in shard order when per-shard counts are known, else an even share per
    rank and worker. Batches: ``{"image": (B,C,H,W), "label": (B,) long, "key": list[str],
    "corrupt": () long}``.
    """
    rank, world_size = (rank if rank is not None else _rank_world()[0]), (world_size or _rank_world()[1])
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
    skips = _Skips()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),  # {"url"}: this rank's shards, in order
        wds.split_by_worker,  # this worker's shards
        _tarfile_to_samples(skips=skips),  # {"__key__", "__url__", "png", "cls", "json"}: raw bytes
        *limit,  # same, only the first max_samples
        _Decode(label_key=label_key, skips=skips, channels=stored_channels(shards.manifest, channels),
                stored=stored_shape(shards.manifest)),
        # {"image": PIL, "label": int, "key": str}
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


__all__ = ["ShardSet", "resolve_shards", "train_loader", "eval_loader", "MANIFEST_FORMAT"]
