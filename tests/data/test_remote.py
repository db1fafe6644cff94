"""Remote shards: http(s) and pipe: streams resume after a dropped connection or a failed command."""

from __future__ import annotations

import functools
import http.server
import json
import re
import socket
import threading
from pathlib import Path

import pytest
import torch
from engine.conftest import TINY

from sslkit.config import load_config, recipe_path
from sslkit.data.loaders import eval_loader
from sslkit.data.remote import RemoteError, RemoteNotFound, open_shard
from sslkit.data.shardset import resolve_shards
from sslkit.engine import train
from sslkit.sharding.synthetic import make_synthetic

PATTERN = "train/train-{000000..000003}.tar"


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET with ``Range: bytes=N-`` (206), 404 for missing files, and a switch that cuts .tar bodies.

    ``state.cuts`` > 0: the next .tar answer announces the full Content-Length but the
    connection dies at byte ``state.cut`` of the file (nothing is sent when the answer starts
    later), ``cuts`` times. ``state.ignore_range``: always the whole file with 200.
    """

    def do_GET(self) -> None:
        state = self.server.state
        rng = self.headers.get("Range")
        with state.lock:
            state.requests.append((self.path, rng))
        path = state.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = re.fullmatch(r"bytes=(\d+)-", rng or "")
        start = 0 if start is None or state.ignore_range else int(start.group(1))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        if state.etag:
            self.send_header("ETag", state.etag)
        self.end_headers()
        with state.lock:
            cut = path.suffix == ".tar" and state.cuts > 0
            state.cuts -= cut
        if cut:
            self.wfile.write(data[start:max(start, state.cut(len(data)))])
            self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:
        pass


class _State:
    def __init__(self, root: Path) -> None:
        self.root, self.requests, self.lock = root, [], threading.Lock()
        self.cuts, self.ignore_range, self.etag = 0, False, None

    @staticmethod
    def cut(size: int) -> int:
        return size // 2

    def resumed(self) -> list[tuple[str, str]]:
        return [(p, r) for p, r in self.requests if r is not None]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    make_synthetic(root / "train", num_samples=160, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    (root / "bare").mkdir()  # shards without a manifest beside them
    (root / "bare" / "train-000000.tar").write_bytes((root / "train" / "train-000000.tar").read_bytes())
    return root


@pytest.fixture()
def server(shards, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = _State(shards)
    httpd.state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------- the reader


def test_dropped_connection_resumes_with_range(server, shards) -> None:
    expected = (shards / "train" / "train-000000.tar").read_bytes()
    server.cuts, server.etag = 1, '"v1"'  # the same ETag on both answers: the same file, safe to resume
    with open_shard(f"{server.base}/train/train-000000.tar", backoff=0) as stream:
        assert stream.read() == expected
    half = len(expected) // 2
    assert server.requests == [("/train/train-000000.tar", None), ("/train/train-000000.tar", f"bytes={half}-")]


def test_server_ignoring_range_is_read_again_and_skipped(server, shards) -> None:
    expected = (shards / "train" / "train-000001.tar").read_bytes()
    server.cuts, server.ignore_range = 1, True
    with open_shard(f"{server.base}/train/train-000001.tar", backoff=0) as stream:
        got = b"".join(iter(lambda: stream.read(7000), b""))  # small reads: many cross the resume point
    assert got == expected and len(server.requests) == 2 and server.requests[1][1] == f"bytes={len(expected) // 2}-"


def test_file_changed_between_attempts_is_not_spliced(server) -> None:
    server.cuts, server.etag = 1, '"v1"'
    with open_shard(f"{server.base}/train/train-000000.tar", backoff=0) as stream:
        stream.read(1000)  # well before the cut in the middle
        server.etag = '"v2"'  # the shard was rewritten on the server
        with pytest.raises(RemoteError, match=r'000000\.tar changed while it was being read \(ETag "v1" became "v2"\)'):
            stream.read()
    assert len(server.requests) == 2


def test_missing_shard_raises_one_sentence_without_retrying(server) -> None:
    url = f"{server.base}/train/train-000009.tar"
    with pytest.raises(RemoteNotFound, match=r"train-000009\.tar answered HTTP 404 .*check the URL") as err:
        open_shard(url, backoff=0)
    assert isinstance(err.value, FileNotFoundError) and str(err.value).count(". ") == 0
    assert len(server.requests) == 1


def test_retries_exhausted_names_url_byte_and_attempts(server, shards, caplog) -> None:
    size = (shards / "train" / "train-000002.tar").stat().st_size
    url = f"{server.base}/train/train-000002.tar"
    server.cuts = 100  # every answer dies at the middle: after the first half, no progress at all
    with open_shard(url, retries=2, backoff=0) as stream:
        with pytest.raises(RemoteError, match=rf"{re.escape(url)} at byte {size // 2} after 3 attempts"):
            stream.read()
    assert len(server.requests) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all(url in w and f"byte {size // 2}" in w for w in warnings)


def test_pipe_cat_and_a_command_failing_once(shards, tmp_path) -> None:
    path = shards / "train" / "train-000003.tar"
    with open_shard(f"pipe:cat {path}") as stream:
        assert stream.read() == path.read_bytes()
    # First run: 1,000 bytes, then exit 3. The rerun's first 1,000 bytes are dropped.
    marker = tmp_path / "ran-once"
    script = tmp_path / "flaky.sh"
    script.write_text(f"if [ -e {marker} ]; then cat {path}; else touch {marker}; head -c 1000 {path}; exit 3; fi\n")
    with open_shard(f"pipe:sh {script}", backoff=0) as stream:
        assert stream.read() == path.read_bytes()
    assert marker.exists()
    with open_shard("pipe:exit 5", retries=1, backoff=0) as stream:  # a failing command fails when read
        with pytest.raises(RemoteError, match=r"pipe:exit 5 at byte 0 after 2 attempts .*status 5"):
            stream.read()


# ---------------------------------------------------------------- resolve_shards and the loaders


def test_remote_manifest_beside_or_given(server) -> None:
    shards = resolve_shards(f"{server.base}/{PATTERN}")
    assert shards.urls[3] == f"{server.base}/train/train-000003.tar"
    assert shards.num_samples == 160 and shards.samples_per_shard == [48, 48, 48, 16]
    given = resolve_shards(f"{server.base}/bare/train-000000.tar", manifest=f"{server.base}/train/manifest.json")
    assert given.num_samples == 48 and given.classes is not None
    bare = resolve_shards(f"{server.base}/bare/train-000000.tar")  # the server has no manifest there: 404
    assert bare.manifest is None and bare.num_samples is None
    with pytest.raises(ValueError, match=r"Manifest '.*/bare/manifest\.json' cannot be read .*data\.manifest"):
        resolve_shards(f"{server.base}/bare/train-000000.tar", manifest=f"{server.base}/bare/manifest.json")


def _read_all(shards) -> tuple[list[str], torch.Tensor, int]:
    batches = list(eval_loader(shards, size=32, channels=3, batch_size=32, workers=0))
    keys = [k for b in batches for k in b["id"]]
    return keys, torch.cat([b["image"] for b in batches]), sum(int(b["corrupt"]) for b in batches)


def test_eval_over_http_with_a_dropped_connection_equals_local(server, shards) -> None:
    local_keys, local_images, _ = _read_all(resolve_shards(str(shards / "train")))
    server.cuts = 1
    keys, images, corrupt = _read_all(resolve_shards(f"{server.base}/{PATTERN}"))
    assert len(set(keys)) == len(keys) == 160 and keys == local_keys
    assert torch.equal(images, local_images) and corrupt == 0
    assert len(server.resumed()) == 1  # the cut happened and was resumed


def test_unreadable_remote_shard_stops_the_loader_instead_of_counting_corrupt(server, monkeypatch) -> None:
    missing = resolve_shards(f"{server.base}/train/train-{{000003..000004}}.tar")  # 000004 is not served
    with pytest.raises(RemoteNotFound) as err:
        _read_all(missing)
    assert str(err.value).startswith(f"{server.base}/train/train-000004.tar answered HTTP 404")  # webdataset's
    # appended args were dropped: the message is the reader's one sentence.
    monkeypatch.setattr("sslkit.data.tarread.open_shard", functools.partial(open_shard, backoff=0))
    server.cuts = 100  # every answer dies in the middle of the shard
    with pytest.raises(RemoteError, match=r"^Could not read http://.*/train-000003\.tar at byte \d+ after 4 attempts"):
        _read_all(resolve_shards(f"{server.base}/train/train-000003.tar"))


def test_train_from_http_survives_a_dropped_connection(server, tmp_path) -> None:
    cfg = load_config(recipe_path("demo"), [*TINY, f"data.shards={server.base}/{PATTERN}",
                                            f"run.dir={tmp_path / 'run'}", "train.max_steps=3", "data.workers=1"])
    server.cuts = 1
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(r["corrupt_samples"] == 0 for r in rows if "loss" in r)
    assert server.resumed() and server.resumed()[0][1].startswith("bytes=")


def test_train_from_http_without_manifest_says_so(server, tmp_path) -> None:
    cfg = load_config(recipe_path("demo"), [*TINY, f"data.shards={server.base}/bare/train-000000.tar",
                                            f"run.dir={tmp_path / 'run'}", "train.max_steps=1"])
    with pytest.raises(ValueError, match=r"no manifest\.json with num_samples.*data\.manifest"):
        train(cfg)
