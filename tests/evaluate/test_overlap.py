"""Whether evaluated crops were seen in training, from the two shard sets' manifests."""

import json
import shutil
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

from sslkit.data.shardset import resolve_shards
from sslkit.evaluate.overlap import training_overlap
from sslkit.sharding.cells.command import CellSource
from sslkit.sharding.core.runner import run_source
from sslkit.sharding.synthetic import make_synthetic


def _synthetic(folder: Path, seed: int) -> Path:
    make_synthetic(folder, num_samples=60, size=16, seed=seed, shard_size=20, prefix="s", progress=False)
    return folder


def test_synthetic_sets_are_compared_by_their_bytes(tmp_path):
    train = _synthetic(tmp_path / "train", 0)
    same = training_overlap(str(train), resolve_shards(str(train)))
    assert (same["seen"], same["shared_shards"], same["eval_shards"]) == ("all", 3, 3)
    assert same["shared_sources"] is None  # "synthetic[0:20]" names no file: not compared
    again = training_overlap(str(train), resolve_shards(str(_synthetic(tmp_path / "again", 0))))
    assert again["seen"] == "all"  # the same command made the same bytes elsewhere
    other = training_overlap(str(train), resolve_shards(str(_synthetic(tmp_path / "other", 1))))
    assert (other["seen"], other["shared_shards"]) == ("no", 0)
    assert other["note"] == "no shard in common with the training set"


def _tiles(folder: Path, names: list[str]) -> Path:
    rng = np.random.default_rng(0)
    for name in names:
        (folder / "Images").mkdir(parents=True, exist_ok=True)
        (folder / "Labels").mkdir(exist_ok=True)
        inst = np.zeros((40, 40), np.int32)
        inst[5:12, 5:12], inst[20:30, 22:31] = 1, 2
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "Images" / f"{name}.png")
        sio.savemat(folder / "Labels" / f"{name}.mat", {"inst_map": inst, "inst_type": np.array([[1], [2]])})
    return folder


def _cells(tiles: Path, out: Path, size: int = 16) -> Path:
    run_source(CellSource(fmt="consep", input=tiles, size=size, class_map="raw"), out, workers=0, progress=False)
    return out


def test_sets_cut_from_the_same_images_are_partly_seen(tmp_path):
    tiles = _tiles(tmp_path / "tiles", ["a", "b", "c", "d"])
    train = _cells(tiles, tmp_path / "train")
    held_out = _tiles(tmp_path / "held", ["e", "f"])
    unseen = training_overlap(str(train), resolve_shards(str(_cells(held_out, tmp_path / "test"))))
    assert (unseen["seen"], unseen["shared_sources"], unseen["eval_sources"]) == ("no", 0, 2)
    assert unseen["note"] == "no shard or source file in common with the training set"
    # The same tiles cut again at another size: no shard in common, but every source image is.
    resized = training_overlap(str(train), resolve_shards(str(_cells(tiles, tmp_path / "resized", size=24))))
    assert (resized["seen"], resized["shared_shards"], resized["shared_sources"]) == ("partly", 0, 4)
    assert resized["note"].startswith("4 of 4 source files are shared with the training set")
    # Two of the training tiles in a new set beside two unseen ones.
    mixed_tiles = tmp_path / "mixed"
    for name in ("a", "b"):
        for sub, ext in (("Images", "png"), ("Labels", "mat")):
            (mixed_tiles / sub).mkdir(parents=True, exist_ok=True)
            (mixed_tiles / sub / f"{name}.{ext}").symlink_to(tiles / sub / f"{name}.{ext}")
    _tiles(mixed_tiles, ["g", "h"])
    mixed = training_overlap(str(train), resolve_shards(str(_cells(mixed_tiles, tmp_path / "mixed-set"))))
    assert (mixed["seen"], mixed["shared_sources"], mixed["eval_sources"]) == ("partly", 2, 4)


def test_unreadable_training_shards_give_unknown(tmp_path):
    train = _synthetic(tmp_path / "train", 0)
    test = resolve_shards(str(train))
    shutil.rmtree(train)
    gone = training_overlap(str(train), test)
    assert gone["seen"] == "unknown" and "could not be read" in gone["note"]
    json.dumps(gone)  # it goes into metrics.json
