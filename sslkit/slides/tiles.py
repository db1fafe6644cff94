"""Where ``sslkit extract`` gets each slide's tiles: slides tiled on the fly, or ``sslkit shard wsi`` shards.

    source = SlideFiles(["slides/"], mpp=0.5, tile=256)       # the plan `sslkit shard wsi` makes, no shards
    source = ShardTiles("shards/wsi")                          # the tiles those shards hold
    for job in source.jobs():                                  # one per slide, in a fixed order
        info, total, tiles = source.read(job)                  # tiles: (x, y, PIL image), x, y level-0 pixels

Both give a slide's tiles in the same order with the same level-0 corners for the same slide
and settings (``SlideFiles`` runs ``WsiSource.produce``, the code that wrote the shards); the
pixels are the same up to the shards' encoding (exactly the same for ``--encode png``).

``SlideChunks`` is the DataLoader dataset: DataLoader workers split the slides (never a slide's
tiles), read the tiles of each, make the encoder's input pixels of them (uint8,
``TileEncoder.pixels``) and yield them in chunks of at most ``batch_size`` tiles of one slide,
in order, the last one marked, so the main process can finish a slide's bag as soon as its
last chunk is embedded. A slide that cannot be read yields one item with its ``error``
instead (after any chunks already sent).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from sslkit.errors import UsageError
from sslkit.shardformat import IMAGE_FIELDS, MANIFEST_NAME, read_manifest, split_member
from sslkit.sharding.core.source import Progress, Unit
from sslkit.sharding.wsi.command import WsiSource
from sslkit.sharding.wsi.slides import MPP_TOLERANCE

Tiles = Iterator[tuple[int, int, Image.Image]]


@dataclass(frozen=True)
class SlideJob:
    """One slide: its id (the bag's file name), its path as given, its relative cost, and what the source needs."""

    id: str
    path: str
    cost: float
    payload: Any = None


def tile_level0(info: dict, tile: int) -> int:
    """A tile's side in level-0 pixels, from a slide's plan info (``plan_tiles``, or a shard manifest's source)."""
    if "tile_level0" in info:
        return int(info["tile_level0"])
    return round(tile * float(info["downsample"]) * float(info["level_downsample"]))  # shards of earlier versions


def _setting_keys(params: dict) -> dict:
    keys = ("mpp", "tile", "overlap", "min_tissue", "mpp_override", "mpp_tolerance")
    return {k: params.get(k) for k in keys}


class SlideFiles:
    """Slides tiled on the fly, with ``sslkit shard wsi``'s plan (``WsiSource``): files, folders, ``@list.txt``."""

    kind = "slides"

    def __init__(self, slides: list[str], *, mpp: float = 0.5, tile: int = 256, overlap: int = 0,
                 min_tissue: float = 0.5, mpp_override: Optional[float] = None,
                 mpp_tolerance: float = MPP_TOLERANCE, reader: str = "auto", recursive: bool = False) -> None:
        self.wsi = WsiSource(slides, mpp=mpp, tile=tile, overlap=overlap, min_tissue=min_tissue,
                             mpp_override=mpp_override, mpp_tolerance=mpp_tolerance, reader=reader,
                             recursive=recursive)
        self.failed = list(self.wsi.failed)  # list entries that are not files: {"source", "reason"}
        self.tile, self.overlap = self.wsi.tile, self.wsi.overlap

    def settings(self) -> dict:
        return _setting_keys(self.wsi.params())

    def preload(self) -> None:
        """Import what reading slides needs (OpenSlide, scipy, scikit-image) in this process, so that
        DataLoader workers forked from it do not each import them again."""
        self.wsi.import_readers()

    def jobs(self) -> list[SlideJob]:
        return [SlideJob(u.id, u.path, u.cost) for u in self.wsi.units()]

    def read(self, job: SlideJob) -> tuple[dict, int, Tiles]:
        """Open and plan the slide (raises UnitError when it cannot be); its tiles are read as they are taken."""
        progress = Progress()
        samples = self.wsi.produce(Unit(job.id, job.path, job.cost), skip=0, progress=progress)
        first = next(samples, None)  # opens the slide and plans its tiles
        info = dict(progress.details)

        def tiles() -> Tiles:
            with _closing(samples):
                for sample in ([first] if first is not None else []):
                    yield sample.meta["x"], sample.meta["y"], Image.fromarray(sample.image)
                for sample in samples:
                    yield sample.meta["x"], sample.meta["y"], Image.fromarray(sample.image)

        return info, int(info.get("tiles", 0)), tiles()


class _closing:
    """Close a generator (so ``produce`` closes its slide) however the ``with`` block ends."""

    def __init__(self, gen: Iterator) -> None:
        self.gen = gen

    def __enter__(self) -> Iterator:
        return self.gen

    def __exit__(self, *exc: object) -> None:
        self.gen.close()


class ShardTiles:
    """The tiles of a shard folder written by ``sslkit shard wsi`` (local files), grouped by slide.

    The tars are indexed once (member headers only); a slide's tiles are then read by offset,
    in the order they were written, which is the slide's plan order."""

    kind = "shards"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / MANIFEST_NAME).is_file():
            raise UsageError(f"--shards {folder} holds no {MANIFEST_NAME}; give a folder written by "
                             "`sslkit shard wsi` (a local folder, with its manifest).")
        self.manifest = read_manifest(self.folder)
        if self.manifest.get("kind") != "wsi" or not self.manifest.get("sources"):
            raise UsageError(f"--shards {folder} was not written by `sslkit shard wsi` (kind "
                             f"{self.manifest.get('kind')!r}); its tiles carry no slide or level-0 position.")
        params = self.manifest.get("params") or {}
        self.tile, self.overlap = int(params["tile"]), int(params.get("overlap", 0))
        self.sources = {s["id"]: s for s in self.manifest["sources"]}
        self.failed = [{"source": s["path"], "reason": f"sharding failed: {s.get('reason', '')}"}
                       for s in self.manifest["sources"] if s.get("status") == "failed"]

    def settings(self) -> dict:
        return _setting_keys(self.manifest.get("params") or {})

    def jobs(self) -> list[SlideJob]:
        members = self._index()
        return [SlideJob(s["id"], s["path"], float(s.get("samples", 0)), members.get(s["id"], []))
                for s in self.manifest["sources"] if s.get("status") == "done"]

    def _index(self) -> dict[str, list[tuple]]:
        """slide id -> [(tar, image offset, size, image ext, json offset, size)] in written order."""
        found: dict[str, list[tuple]] = {}
        for shard in self.manifest["shards"]:
            tar_path = str(self.folder / shard["name"])
            entries: dict[str, dict] = {}
            with tarfile.open(tar_path, "r:") as tar:
                for member in tar:
                    key, ext = split_member(member.name)
                    if key is not None and member.isfile():
                        entries.setdefault(key, {})[ext] = (member.offset_data, member.size)
            for key, fields in entries.items():
                image_ext = next((e for e in IMAGE_FIELDS if e in fields), None)
                if image_ext is None or "json" not in fields:
                    continue
                slide = key.rsplit("_", 2)[0]  # keys are <slide>_<x>_<y>
                found.setdefault(slide, []).append((tar_path, *fields[image_ext], image_ext, *fields["json"]))
        return found

    def read(self, job: SlideJob) -> tuple[dict, int, Tiles]:
        info = dict(self.sources[job.id])
        return info, len(job.payload), self._tiles(job)

    @staticmethod
    def _tiles(job: SlideJob) -> Tiles:
        handles: dict[str, Any] = {}
        try:
            for tar_path, offset, size, _, meta_offset, meta_size in job.payload:
                handle = handles.get(tar_path) or handles.setdefault(tar_path, open(tar_path, "rb"))  # noqa: SIM115
                handle.seek(offset)
                image = Image.open(io.BytesIO(handle.read(size)))
                image.load()
                handle.seek(meta_offset)
                meta = json.loads(handle.read(meta_size))
                if meta.get("slide") != job.id:
                    raise ValueError(f"a tile of slide {meta.get('slide')!r} filed under {job.id!r}")
                yield int(meta["x"]), int(meta["y"]), image
        finally:
            for handle in handles.values():
                handle.close()


def failure_reason(err: BaseException) -> str:
    """One sentence for a slide that failed: the error's own message when it is a user-facing one."""
    from sslkit.sharding.core.source import UnitError

    text = " ".join(str(err).split())
    if isinstance(err, UnitError):
        return text
    return f"{type(err).__name__}: {text}".rstrip(": ").rstrip(".") + "."


class SlideChunks(IterableDataset):
    """Items ``{"slide", "images" (b, C, H, W) uint8, "coords" (b, 2) int64, "total", "last", "info", "error"}``
    for the slides ``jobs`` = [(index, SlideJob)]; workers take every n-th slide (see the module notes)."""

    def __init__(self, source: Any, jobs: list[tuple[int, SlideJob]], pixels: Callable[[Image.Image], torch.Tensor],
                 batch_size: int) -> None:
        super().__init__()
        self.source, self.jobs, self.pixels, self.batch_size = source, jobs, pixels, batch_size

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        mine = self.jobs if worker is None else self.jobs[worker.id::worker.num_workers]
        for index, job in mine:
            yield from self._chunks(index, job)

    def _chunks(self, index: int, job: SlideJob) -> Iterator[dict]:
        def failed(reason: str) -> dict:
            return {"slide": index, "error": reason}

        try:
            info, total, tiles = self.source.read(job)
        except Exception as err:  # noqa: BLE001 -- a slide that cannot be opened or planned is recorded
            yield failed(failure_reason(err))
            return
        if total == 0:
            yield failed(f"{info.get('note') or 'no tiles'}: nothing to extract.")
            return
        images, coords, sent = [], [], 0
        try:
            for x, y, image in tiles:
                images.append(self.pixels(image))
                coords.append((x, y))
                if len(images) == self.batch_size or sent + len(images) == total:
                    yield {"slide": index, "images": torch.stack(images), "last": sent + len(images) == total,
                           "coords": torch.from_numpy(np.asarray(coords, dtype=np.int64)), "total": total,
                           "info": info if sent == 0 else None, "error": None}
                    sent, images, coords = sent + len(images), [], []
        except Exception as err:  # noqa: BLE001 -- a damaged region: the slide fails, the others go on
            yield failed(failure_reason(err))
            return
        if sent != total:
            yield failed(f"the slide gave {sent} tiles where its plan has {total}; it changed while being read.")


__all__ = ["ShardTiles", "SlideChunks", "SlideFiles", "SlideJob", "failure_reason", "tile_level0"]
