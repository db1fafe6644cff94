"""Read-only byte streams for remote shards that resume where a dropped connection stopped.

    with open_shard("https://host/shards/train-000000.tar") as stream:  # or "pipe:CMD", or a local path
        data = stream.read()
    manifest = read_json("https://host/shards/manifest.json")

webdataset opens http(s) through ``curl``, whose ``--retry`` covers only failures before the
body flows: a connection dropped mid-shard just ends the stream, and the reader loses the rest
of the shard. Here a failed read (reset, timeout, body shorter than its Content-Length, a
``pipe:`` command exiting non-zero) reopens the source at the byte where it stopped: http(s)
with ``Range: bytes=<offset>-`` (a server that ignores Range is read again from the start and
the first ``offset`` bytes dropped), ``pipe:`` by rerunning the command and dropping the bytes
already delivered. ``retries`` reopenings in a row without a new byte are allowed, after
``backoff`` x 1, 2, 4, ... seconds; then ``RemoteError`` names the URL, the byte and the
attempts. A 4xx answer is never retried. Local paths, ``file://`` and other schemes go
through ``webdataset.gopen`` as before (no resuming).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Optional, Protocol

from webdataset.gopen import gopen

from sslkit.errors import RemoteError, RemoteNotFound

logger = logging.getLogger(__name__)

RETRIES = 3  # reopenings in a row without progress (data.retries)
BACKOFF_S = 0.5  # first wait; doubled for each further retry in a row
TIMEOUT_S = 60.0  # seconds an http(s) connect or read may stall before it counts as failed
_CHUNK = 1 << 20


class _Broken(Exception):
    """The source ended before all its bytes arrived."""


class _Source(Protocol):
    def readinto(self, buffer: memoryview) -> int: ...
    def close(self) -> None: ...


def _discard_or_close(source: _Source, count: int) -> None:
    """Read and drop the first ``count`` bytes (a source that cannot start at an offset); close it on failure."""
    scratch = memoryview(bytearray(min(count, _CHUNK) or 1))
    try:
        while count > 0:
            n = source.readinto(scratch[: min(count, len(scratch))])
            if n == 0:
                raise _Broken(f"the stream ended {count} bytes before the resume point")
            count -= n
    except BaseException:
        source.close()
        raise


class _HTTPSource:
    """One GET from ``offset``: 206 with Range, or 200 from byte 0 with the first bytes dropped."""

    def __init__(self, url: str, offset: int, *, timeout: float, etag: Optional[str]) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            self.response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as err:
            if 400 <= err.code < 500 and err.code not in (408, 429):  # timeouts and rate limits are worth a retry
                kind = RemoteNotFound if err.code in (404, 410) else RemoteError
                raise kind(f"{url} answered HTTP {err.code} {err.reason}; check the URL (host, folder, shard "
                           "names, brace pattern) and that the server grants access.", err.code) from None
            raise
        self.etag = self.response.headers.get("ETag")
        if etag and self.etag and self.etag != etag:  # resuming would splice two versions of the file
            self.close()
            raise RemoteError(f"{url} changed while it was being read (ETag {etag} became {self.etag}); "
                              "do not rewrite shards while training reads them.")
        start = re.match(r"bytes (\d+)-", self.response.headers.get("Content-Range", ""))
        if self.response.status == 206 and (start is None or int(start.group(1)) != offset):
            self.close()
            raise _Broken(f"the server resumed at the wrong byte ({self.response.headers.get('Content-Range')})")
        if offset and self.response.status != 206:
            _discard_or_close(self, offset)

    def readinto(self, buffer: memoryview) -> int:
        n = self.response.readinto(buffer)
        missing = self.response.length  # bytes of the Content-Length not yet read (None: no length sent)
        if n == 0 and len(buffer) and missing:  # http.client reports a short body as a plain end of stream
            raise _Broken(f"connection closed with {missing} bytes of the body missing")
        return n

    def close(self) -> None:
        self.response.close()


class _PipeSource:
    """``sh -c CMD`` from its start, the first ``offset`` bytes dropped; a non-zero exit is a failure."""

    def __init__(self, command: str, offset: int) -> None:
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
        _discard_or_close(self, offset)

    def readinto(self, buffer: memoryview) -> int:
        n = self.proc.stdout.readinto(buffer)
        if n == 0 and len(buffer) and self.proc.wait() != 0:
            raise _Broken(f"`{self.command}` exited with status {self.proc.returncode}")
        return n

    def close(self) -> None:
        self.proc.stdout.close()
        if self.proc.poll() is None:  # closed before the end: the command has nobody to write to
            self.proc.kill()
        self.proc.wait()


class _Resumable(io.RawIOBase):
    """Raw stream over ``open_at(offset) -> source``, reopened at the current offset when a read fails."""

    def __init__(self, url: str, open_at: Callable[[int], _Source], *, retries: int, backoff: float) -> None:
        super().__init__()
        self.url, self.open_at, self.retries, self.backoff = url, open_at, retries, backoff
        self.offset, self.failures, self.source = 0, 0, None
        self._attempt(lambda: 0)  # connect now: a 4xx or a dead server shows when the shard is opened

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._attempt(lambda: self.source.readinto(memoryview(buffer).cast("B")))

    def _attempt(self, read: Callable[[], int]) -> int:
        while True:
            try:
                if self.source is None:
                    self.source = self.open_at(self.offset)
                n = read()
                self.offset += n
                self.failures = 0 if n else self.failures
                return n
            except RemoteError:
                raise
            except (OSError, http.client.HTTPException, _Broken) as err:  # resets, timeouts, 5xx, short bodies
                self._drop_source()
                self.failures += 1
                if self.failures > self.retries:
                    raise RemoteError(f"Could not read {self.url} at byte {self.offset} after {self.failures} "
                                      f"attempts ({err}); check the server, network or command, or raise "
                                      "data.retries.") from err
                delay = self.backoff * 2 ** (self.failures - 1)
                logger.warning("Reading %s failed at byte %d (%s); retry %d of %d in %.1f s.", self.url,
                               self.offset, err, self.failures, self.retries, delay)
                time.sleep(delay)

    def _drop_source(self) -> None:
        source, self.source = self.source, None
        if source is not None:
            try:
                source.close()
            except (OSError, http.client.HTTPException):  # a broken connection may fail to close too
                pass

    def close(self) -> None:
        if not self.closed:
            self._drop_source()
        super().close()

    def __repr__(self) -> str:
        return f"<remote {self.url} at byte {self.offset}>"


def open_shard(url: str, *, retries: int = RETRIES, backoff: float = BACKOFF_S, timeout: float = TIMEOUT_S,
               buffer_size: int = 1 << 16) -> io.BufferedIOBase:
    """A binary read stream for ``url``: http(s) and ``pipe:CMD`` resume after failures; others via webdataset."""
    if url.startswith("pipe:"):
        raw = _Resumable(url, lambda offset: _PipeSource(url[5:], offset), retries=retries, backoff=backoff)
    elif url.startswith(("http://", "https://")):
        etag: list[Optional[str]] = [None]  # the first answer's ETag: later ones must match it

        def open_at(offset: int) -> _HTTPSource:
            source = _HTTPSource(url, offset, timeout=timeout, etag=etag[0])
            etag[0] = etag[0] or source.etag
            return source

        raw = _Resumable(url, open_at, retries=retries, backoff=backoff)
    else:
        return gopen(url)
    return io.BufferedReader(raw, buffer_size)


def read_json(url: str, *, retries: int = RETRIES, backoff: float = BACKOFF_S) -> Any:
    """The JSON document at a local path or URL (a manifest), read through ``open_shard``."""
    with open_shard(url, retries=retries, backoff=backoff) as stream:
        return json.load(stream)


__all__ = ["RemoteError", "RemoteNotFound", "open_shard", "read_json", "RETRIES"]
