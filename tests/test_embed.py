"""embed_shards: rows streamed to a memory-mapped .npy equal the in-memory result, sorted by key,
whatever the number of ranks (two real gloo processes), and save_embeddings renames such a file into place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sslkit.data.shardset import resolve_shards
from sslkit.embed import embed_shards, save_embeddings
from sslkit.sharding.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]


def per_sample(x: torch.Tensor) -> torch.Tensor:
    """Features of each crop alone (no batch statistics), so any batch layout gives the same rows."""
    return torch.cat([x.mean(dim=(2, 3)), x[:, :, :2, :2].flatten(1)], dim=1)  # (B, 3 + 12)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embed") / "shards"
    make_synthetic(root, num_samples=70, size=16, seed=3, shard_size=12, prefix="eval", progress=False)
    return root


def test_memory_map_equals_in_memory_sorted_by_key(shards: Path, tmp_path: Path) -> None:
    shard_set = resolve_shards(str(shards))
    feats, labels, keys = embed_shards(per_sample, shard_set, size=16, channels=3, batch_size=8, workers=0)
    out = tmp_path / "made" / "feats.npy"
    mapped, mapped_labels, mapped_keys = embed_shards(per_sample, shard_set, size=16, channels=3, batch_size=5,
                                                      workers=2, out=out)
    assert keys == sorted(keys) and len(keys) == len(set(keys)) == 70 and feats.shape == (70, 15)
    assert isinstance(mapped, np.memmap) and Path(mapped.filename) == out
    np.testing.assert_array_equal(mapped, feats)
    np.testing.assert_array_equal(mapped_labels, labels)
    assert mapped_keys == keys
    assert sorted(p.name for p in out.parent.iterdir()) == ["feats.npy"]  # the rank's part file is gone
    save_embeddings(tmp_path / "eval", out, labels, keys)
    assert not out.exists() and np.array_equal(np.load(tmp_path / "eval" / "embeddings.npy"), feats)
    np.testing.assert_array_equal(mapped, feats)  # the memory map outlives the rename


def test_keep_embeds_only_the_chosen_keys(shards: Path, tmp_path: Path) -> None:
    shard_set = resolve_shards(str(shards))
    feats, labels, keys = embed_shards(per_sample, shard_set, size=16, channels=3, batch_size=8, workers=0)
    chosen = [keys[i] for i in (0, 3, 4, 40, 69)]
    seen: list[int] = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return per_sample(x)

    part, part_labels, part_keys = embed_shards(counting, shard_set, size=16, channels=3, batch_size=8,
                                                workers=0, out=tmp_path / "part.npy", keep=set(chosen))
    assert part_keys == chosen and sum(seen) == 5  # the others were never embedded
    np.testing.assert_array_equal(part, feats[[0, 3, 4, 40, 69]])
    np.testing.assert_array_equal(part_labels, labels[[0, 3, 4, 40, 69]])


RANK_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
import torch
import torch.distributed as dist
from sslkit.data.shardset import resolve_shards
from sslkit.embed import embed_shards

rank, init, folder, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
fn = lambda x: torch.cat([x.mean(dim=(2, 3)), x[:, :, :2, :2].flatten(1)], dim=1)
feats, labels, keys = embed_shards(fn, resolve_shards(folder), size=16, channels=3, batch_size=4, workers=1,
                                   out=Path(out))
json.dump({"shape": list(feats.shape), "labels": labels.tolist(), "keys": keys, "sum": float(np.sum(feats))},
          open(f"{out}.rank{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_two_ranks_write_the_same_file_as_one(shards: Path, tmp_path: Path) -> None:
    feats, labels, keys = embed_shards(per_sample, resolve_shards(str(shards)), size=16, channels=3, batch_size=8,
                                       workers=0)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "two" / "feats.npy"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), f"file://{tmp_path / 'rendezvous'}",
                               str(shards), str(out)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [proc.communicate(timeout=180)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(logs)
    np.testing.assert_array_equal(np.load(out), feats)  # the same rows in the same (key) order
    for rank in range(2):  # every rank got the whole sorted result
        seen = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        assert seen["keys"] == keys and seen["labels"] == labels.tolist() and seen["shape"] == [70, 15]
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".json")) == ["feats.npy"]
