"""Shard streams: equal batches on every rank, corrupt data counted, eval sees each sample once."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sslkit.config import BalancedConfig, DataConfig
from sslkit.data.augment import build_views
from sslkit.data.loaders import eval_loader, train_loader
from sslkit.data.shardset import ShardSet, resolve_shards

SIZE = 16
REPO = Path(__file__).resolve().parents[2]


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, *, shards: int = 3, per_shard: int = 20, corrupt_first: bool = False,
                 unlabelled: int = 0, manifest: bool = True) -> list[str]:
    """Tiny shards ``demo-00000i.tar`` + manifest.json; returns the keys in shard order."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, entries = [], []
    for s in range(shards):
        name = f"demo-{s:06d}.tar"
        with wds.TarWriter(str(folder / name), mtime=0) as sink:
            for i in range(per_shard):
                key = f"s{s}_{i:04d}"
                sample = {"__key__": key, "png": _png(s * 1000 + i), "json": {"i": i}}
                if corrupt_first and i == 0:
                    sample["png"] = b"definitely not a png"
                if i >= unlabelled:
                    sample["cls"] = str(i % 4)
                sink.write(sample)
                keys.append(key)
        entries.append({"name": name, "samples": per_shard, "bytes": (folder / name).stat().st_size})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({
            "format": "sslkit-shards/1", "shards": entries, "num_samples": shards * per_shard,
            "classes": ["a", "b", "c", "d"], "image": {"height": SIZE, "width": SIZE, "channels": 3, "format": "png"},
        }))
    return keys


def _cfg(folder: Path, **overrides) -> DataConfig:
    return DataConfig(**{**dict(shards=str(folder), size=SIZE, batch_size=4, workers=2, shuffle_buffer=8), **overrides})


def _train(folder: Path, *, steps: int, seed: int = 0, epoch: int = 0, **overrides):
    cfg = _cfg(folder, **overrides)
    views = build_views(cfg.views, size=SIZE, channels=3)
    return train_loader(resolve_shards(str(folder)), cfg, views=views, seed=seed, steps_per_epoch=steps, epoch=epoch)


# ---------------------------------------------------------------- resolve_shards


def test_resolve_folder_reads_the_manifest(tmp_path: Path) -> None:
    write_shards(tmp_path)
    shards = resolve_shards(str(tmp_path))
    assert [os.path.basename(u) for u in shards.urls] == [f"demo-{i:06d}.tar" for i in range(3)]
    assert shards.num_samples == 60 and shards.classes == ["a", "b", "c", "d"]
    assert shards.samples_per_shard == [20, 20, 20]


def test_resolve_brace_pattern_and_manifest_override(tmp_path: Path) -> None:
    write_shards(tmp_path / "s")
    shards = resolve_shards(str(tmp_path / "s" / "demo-{000000..000001}.tar"))
    assert len(shards.urls) == 2 and shards.num_samples == 40 and shards.manifest is not None
    moved = tmp_path / "elsewhere.json"
    (tmp_path / "s" / "manifest.json").rename(moved)
    shards = resolve_shards(str(tmp_path / "s"), manifest=str(moved))
    assert len(shards.urls) == 3 and shards.num_samples == 60


def test_resolve_without_manifest_counts_tar_headers(tmp_path: Path) -> None:
    write_shards(tmp_path, shards=2, per_shard=7, manifest=False)
    shards = resolve_shards(str(tmp_path))
    assert shards.manifest is None and shards.num_samples == 14 and shards.samples_per_shard == [7, 7]


def test_resolve_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-shards"
    with pytest.raises(FileNotFoundError, match="no-such-shards.*sslkit shard synthetic"):
        resolve_shards(str(missing))
    with pytest.raises(FileNotFoundError, match="no-such-shards"):
        resolve_shards(str(missing / "x-{000000..000003}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no .tar shards"):
        resolve_shards(str(tmp_path / "empty"))


# ---------------------------------------------------------------- train_loader, one process


def test_train_batches_are_full_dicts(tmp_path: Path) -> None:
    write_shards(tmp_path, unlabelled=2)
    loader = _train(tmp_path, steps=5, workers=0)
    batches = list(loader)
    assert len(loader) == 5 and len(batches) == 5
    for batch in batches:
        assert batch["query"].shape == batch["key"].shape == (4, 3, SIZE, SIZE)
        assert batch["query"].dtype == torch.float32
        assert batch["label"].shape == (4,) and batch["label"].dtype == torch.long
        assert batch["corrupt"].shape == () and batch["corrupt"].dtype == torch.long
    labels = torch.cat([b["label"] for b in batches])
    assert labels.min() >= -1 and labels.max() <= 3


def test_tensor_backend_batches_hold_the_decoded_pixels(tmp_path: Path) -> None:
    # views=None: workers only decode and resize; the batch carries the exact PNG pixels as uint8
    write_shards(tmp_path, shards=1, per_shard=8)
    cfg = _cfg(tmp_path, workers=0, shuffle_buffer=1, size=SIZE)
    loader = train_loader(resolve_shards(str(tmp_path)), cfg, views=None, seed=0, steps_per_epoch=2)
    batches = list(loader)
    assert len(batches) == 2 and "query" not in batches[0]
    image = batches[0]["image"]
    assert image.shape == (4, 3, SIZE, SIZE) and image.dtype == torch.uint8
    originals = {i: torch.from_numpy(np.array(Image.open(io.BytesIO(_png(i))))).permute(2, 0, 1) for i in range(8)}
    for picture in torch.cat([b["image"] for b in batches]):
        assert any(torch.equal(picture, ref) for ref in originals.values())


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_shards(tmp_path, corrupt_first=True)  # sample 0 of every shard is garbage
    batches = list(_train(tmp_path, steps=8, workers=2))
    assert len(batches) == 8 and all(b["query"].shape[0] == 4 for b in batches)
    assert sum(int(b["corrupt"]) for b in batches) >= 1


def test_truncated_shard_is_skipped_and_counted(tmp_path: Path) -> None:
    write_shards(tmp_path, shards=2)
    bad = tmp_path / "demo-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2 + 100])  # cut mid-member
    batches = list(_train(tmp_path, steps=12, workers=0))
    assert len(batches) == 12 and all(b["query"].shape[0] == 4 for b in batches)
    assert sum(int(b["corrupt"]) for b in batches) >= 1


def test_epochs_are_seeded_from_seed_and_epoch(tmp_path: Path) -> None:
    write_shards(tmp_path)
    loader = _train(tmp_path, steps=3, seed=7)
    first, second = list(loader), list(loader)  # passes 0 and 1 of persistent workers
    again = list(_train(tmp_path, steps=3, seed=7))
    resumed = list(_train(tmp_path, steps=3, seed=7, epoch=1))
    other = list(_train(tmp_path, steps=3, seed=8))
    same = lambda a, b: all(torch.equal(x["query"], y["query"]) for x, y in zip(a, b))  # noqa: E731
    assert same(first, again) and same(second, resumed)
    assert not same(first, second) and not same(first, other)


# ---------------------------------------------------------------- eval_loader, one process


def test_eval_max_samples_keeps_the_first_samples(tmp_path: Path) -> None:
    keys = write_shards(tmp_path)
    shards = resolve_shards(str(tmp_path))
    seen = []
    for rank in range(2):
        loader = eval_loader(shards, size=SIZE, channels=3, batch_size=4, workers=2, rank=rank, world_size=2,
                             max_samples=25)
        for batch in loader:
            assert batch["image"].shape[1:] == (3, SIZE, SIZE)
            seen += batch["id"]
    assert sorted(seen) == sorted(keys[:25])
    unknown = ShardSet(shards.urls, None, None, None)  # no per-shard counts: even share per rank and worker
    seen = [k for r in range(2) for b in eval_loader(unknown, size=SIZE, channels=3, batch_size=4, workers=2,
                                                     rank=r, world_size=2, max_samples=25) for k in b["id"]]
    assert len(seen) == len(set(seen)) == 25


def test_eval_labels_and_corrupt(tmp_path: Path) -> None:
    write_shards(tmp_path, shards=1, unlabelled=3, corrupt_first=True)
    batches = list(eval_loader(resolve_shards(str(tmp_path)), size=SIZE, channels=3, batch_size=8, workers=0))
    labels = torch.cat([b["label"] for b in batches])
    assert len(labels) == 19 and (labels == -1).sum() == 2  # sample 0 (unlabelled too) is corrupt
    assert sum(int(b["corrupt"]) for b in batches) == 1


# ---------------------------------------------------------------- two real ranks (gloo)

RANK_SCRIPT = r"""
import json, sys
import torch.distributed as dist
from sslkit.config import BalancedConfig, DataConfig
from sslkit.data.augment import build_views
from sslkit.data.loaders import eval_loader, train_loader
from sslkit.data.shardset import resolve_shards

rank, init, folder, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
assert dist.get_world_size() == 2 and dist.get_rank() == rank
cfg = DataConfig(shards=folder, size=16, batch_size=4, workers=2, shuffle_buffer=8)
shards = resolve_shards(folder)
loader = train_loader(shards, cfg, views=build_views(cfg.views, size=16, channels=3), seed=0, steps_per_epoch=5)
passes = [[int(b["query"].shape[0]) for b in loader] for _ in range(2)]
first = float(next(iter(loader))["query"].sum())  # pass 2: must differ between ranks
keys = [k for b in eval_loader(shards, size=16, channels=3, batch_size=3, workers=2) for k in b["id"]]
json.dump({"world": dist.get_world_size(), "passes": passes, "first": first, "keys": keys}, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_two_ranks_two_workers(tmp_path: Path) -> None:
    """3 shards over 2 ranks x 2 workers: every rank gets exactly 5 full batches a pass; eval sees each key once."""
    keys = write_shards(tmp_path / "shards", shards=3, per_shard=10)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), init, str(tmp_path / "shards"), str(tmp_path / f"r{r}.json")],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    results = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2]
    for result in results:
        assert result["passes"] == [[4] * 5, [4] * 5]
    assert results[0]["first"] != results[1]["first"]  # ranks draw different (seeded) streams
    seen = results[0]["keys"] + results[1]["keys"]
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(keys)
    assert set(results[0]["keys"]).isdisjoint(results[1]["keys"])


# ---------------------------------------------------------------- class-balanced batches


def _assert_balanced(labels: list[int], classes: int, per_class: int) -> None:
    blocks = [labels[k * classes:(k + 1) * classes] for k in range(per_class)]
    assert len(labels) == classes * per_class
    assert blocks[0] == sorted(set(blocks[0])) and len(set(blocks[0])) == classes  # P distinct, class order
    assert all(block == blocks[0] for block in blocks)  # row i of every block is the same class


def test_balanced_batches_hold_p_classes_of_k_each(tmp_path: Path) -> None:
    write_shards(tmp_path, shards=3, per_shard=20)  # labels i % 4
    cfg = _cfg(tmp_path, batch_size=6, balanced=BalancedConfig(classes=3, per_class=2))
    loader = train_loader(resolve_shards(str(tmp_path)), cfg, views=None, seed=0, steps_per_epoch=6)
    batches = [b for _ in range(2) for b in loader]
    assert len(batches) == 12
    for batch in batches:
        _assert_balanced(batch["label"].tolist(), 3, 2)
        assert batch["image"].shape == (6, 3, SIZE, SIZE)
    chosen = {tuple(b["label"][:3].tolist()) for b in batches}
    assert len(chosen) > 1  # the P classes are drawn, not fixed


def test_balanced_stage_rules(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    from sslkit.data import balanced as bal

    stage = bal.BalancedBatches(classes=2, per_class=2, buffer=3, rng=random.Random(0), collate=lambda s: s)
    stream = [{"label": c, "id": f"{i}-{j}"} for i in range(10) for j, c in enumerate((0, 0, 0, 1, -1))]
    batches = list(stage(iter(stream)))
    assert batches and all([s["label"] for s in b] == [0, 1, 0, 1] for b in batches)
    assert len({s["id"] for b in batches for s in b}) == 4 * len(batches)  # no sample twice
    assert "skip samples without a label" in caplog.text
    monkeypatch.setattr(bal, "MAX_SAMPLES_WITHOUT_BATCH", 50)
    lonely = bal.BalancedBatches(classes=3, per_class=2, buffer=4, rng=random.Random(0), collate=lambda s: s)
    with pytest.raises(RuntimeError, match="only 2 classes"):
        list(lonely(iter([{"label": i % 2} for i in range(100)])))
    with pytest.raises(ValueError, match="buffer >= per_class"):
        bal.BalancedBatches(classes=2, per_class=4, buffer=2, rng=random.Random(0), collate=list)


def test_balanced_config_is_checked(tmp_path: Path) -> None:
    from sslkit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.batch_size' is 256 but balanced batches hold"):
        load_config(None, ["data.balanced.classes=24"])
    assert load_config(None, ["data.balanced.classes=24", "data.batch_size=48"]).data.balanced.per_class == 2
    write_shards(tmp_path, shards=1, per_shard=8)
    cfg = _cfg(tmp_path, batch_size=10, balanced=BalancedConfig(classes=5, per_class=2))
    with pytest.raises(ValueError, match="shards hold 4 classes"):
        train_loader(resolve_shards(str(tmp_path)), cfg, views=None, seed=0, steps_per_epoch=1)


BALANCED_RANK_SCRIPT = r"""
import json, sys
import torch.distributed as dist
from sslkit.config import BalancedConfig, DataConfig
from sslkit.data.loaders import train_loader
from sslkit.data.shardset import resolve_shards

rank, init, folder, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
assert dist.get_world_size() == 2 and dist.get_rank() == rank
cfg = DataConfig(shards=folder, size=16, batch_size=6, workers=2, shuffle_buffer=8,
                 balanced=BalancedConfig(classes=3, per_class=2))
loader = train_loader(resolve_shards(folder), cfg, views=None, seed=0, steps_per_epoch=5)
passes = [[b["label"].tolist() for b in loader] for _ in range(2)]
json.dump({"world": dist.get_world_size(), "passes": passes}, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_balanced_batches_on_two_ranks_two_workers(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", shards=3, per_shard=20)
    script = tmp_path / "rank.py"
    script.write_text(BALANCED_RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, str(tmp_path / "shards"),
                               str(tmp_path / f"r{r}.json")], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    results = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2]
    for result in results:
        assert [len(p) for p in result["passes"]] == [5, 5]  # equal batch counts on every rank (DDP)
        for labels in (b for p in result["passes"] for b in p):
            _assert_balanced(labels, 3, 2)
    assert results[0]["passes"] != results[1]["passes"]  # ranks draw their own streams


@pytest.mark.parametrize(("size", "channels"), [(SIZE, 3), (12, 3), (SIZE, 1), (20, 1)])
def test_eval_batches_equal_the_per_crop_eval_transform(tmp_path: Path, size: int, channels: int) -> None:
    """Every evaluation batch holds what the per-crop evaluation transform makes of each stored crop,
    resized (12, 20) or kept (16), in colour or grey, whichever worker read it."""
    from sslkit.data.augment import build_eval_transform

    keys = write_shards(tmp_path, shards=2, per_shard=6)
    loader = eval_loader(resolve_shards(str(tmp_path)), size=size, channels=channels, batch_size=4, workers=2)
    batches = list(loader)
    got = torch.cat([b["image"] for b in batches])
    ids = [k for b in batches for k in b["id"]]
    assert sorted(ids) == sorted(keys) and got.dtype == torch.float32 and got.shape[1:] == (channels, size, size)
    transform = build_eval_transform(size=size, channels=channels)
    for key, image in zip(ids, got):
        s, i = key[1:].split("_")
        expected = transform(Image.open(io.BytesIO(_png(int(s) * 1000 + int(i)))))
        assert torch.equal(image, expected), key
