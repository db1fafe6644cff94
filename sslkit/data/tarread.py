"""Reading tar shards: strict tar iteration, samples grouped by key, decoding, bad-sample accounting.

The pipeline stages here turn ``{"url"}`` items into decoded samples; ``sslkit.data.loaders``
puts them into DataLoaders. Member naming and the strict tar rules are ``sslkit.shardformat``'s.

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

import io
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from sslkit.data.augment import build_decode_transform
from sslkit.data.remote import RETRIES, open_shard
from sslkit.errors import RemoteError
from sslkit.shardformat import IMAGE_FIELDS, StrictTarInfo, split_member

logger = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 1000
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: tar members such as __index__ belong to no sample


class Skips:
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


class Decode:
    """Stage: raw samples -> {"image": PIL, "label": int, "id": str}; corrupt ones skipped and counted.

    Besides bytes that do not decode, a crop whose kind contradicts the set counts as corrupt: a
    grayscale crop in a set of ``channels``=3 (or a colour one where it is 1; ``channels`` is the
    set's, from its manifest, else data.channels), or a crop whose size differs from ``stored``
    (the manifest's, when all crops of the set share one). Other colour modes (RGBA, palette,
    CMYK) are converted, and so is a whole set into the model's data.channels. With
    ``uint8=(size, channels)`` (the tensor back-end) "image" is the (C, size, size) uint8 tensor
    that ``BatchViews`` takes: crops already of that size and mode straight from PIL's pixels
    (``_pil_uint8``), others through ``build_decode_transform`` -- the same pixels either way; an
    image that fails either path counts as corrupt."""

    def __init__(self, *, label_key: str, skips: Skips, uint8: Optional[tuple[int, int]] = None,
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
            yield {"image": image, "label": label, "id": sample["__key__"]}

    def _image(self, data: bytes) -> Any:
        image = Image.open(io.BytesIO(data))
        image.load()
        self._check(image)
        if self.uint8 is None:
            return image
        pixels = _pil_uint8(image, size=self.uint8[0], channels=self.uint8[1])
        return pixels if pixels is not None else self.to_uint8(image)


def _open(src: Iterable[dict], *, handler: Skips, retries: int) -> Iterator[dict]:
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


def _tar_samples(stream: Any, url: str, skips: Skips) -> Iterator[dict]:
    """The samples of one tar stream: consecutive members ``<key>.<ext>`` grouped by key, as webdataset
    does. A sample is yielded only once the next key (or the end of the archive) shows it is whole; one
    with two members of the same extension counts as corrupt."""
    current: Optional[dict] = None
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=StrictTarInfo) as tar:
        for member in tar:
            key, ext = split_member(member.name)
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


def _samples(src: Iterable[dict], *, skips: Skips, retries: int = RETRIES) -> Iterator[dict]:
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


tarfile_to_samples = wds.pipelinefilter(_samples)


__all__ = ["MAX_FAILURES_IN_A_ROW", "Skips", "Decode", "tarfile_to_samples"]
