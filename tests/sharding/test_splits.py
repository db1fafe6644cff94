"""Group-wise splits of cell crops: train and test never share a source image."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sslkit.cli import main
from sslkit.data.shardset import resolve_shards
from sslkit.errors import UsageError
from sslkit.evaluate.overlap import training_overlap
from sslkit.sharding.core.source import Unit
from sslkit.sharding.core.splits import assign_units, unit_groups

CONSEP = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "consep-tiles" / "Train"

groupings = st.dictionaries(st.text("abcdefgh0123456789_", min_size=1, max_size=8),
                            st.sampled_from([f"g{i}" for i in range(12)]), min_size=3, max_size=60)
fraction_sets = st.sampled_from([(0.8, 0.2), (0.5, 0.5), (0.6, 0.2, 0.2), (0.34, 0.33, 0.33)])


@settings(max_examples=200, deadline=None)
@given(groups=groupings, fractions=fraction_sets, seed=st.integers(0, 10))
def test_every_unit_lands_once_and_no_group_in_two_splits(groups, fractions, seed):
    names = [f"s{i}" for i in range(len(fractions))]
    try:
        keep = assign_units(groups, fractions=fractions, names=names, seed=seed)
    except UsageError as err:  # too few groups for the splits: said, never an empty split
        assert "would get no units" in str(err) and len(set(groups.values())) >= 1
        return
    assert sorted(u for ids in keep.values() for u in ids) == sorted(groups)
    split_of: dict[str, str] = {}
    for name, ids in keep.items():
        assert ids
        for unit_id in ids:
            assert split_of.setdefault(groups[unit_id], name) == name
    # The same groups listed in another order, and the same seed: the same split.
    assert assign_units(dict(reversed(list(groups.items()))), fractions=fractions, names=names, seed=seed) == keep


def test_group_shares_follow_the_fractions_and_the_seed_matters():
    groups = {f"u{i}": f"g{i // 4}" for i in range(400)}  # 100 groups of 4 units
    keep = assign_units(groups, fractions=(0.8, 0.2), names=["train", "test"], seed=0)
    assert abs(len(keep["test"]) - 80) <= 8
    assert keep != assign_units(groups, fractions=(0.8, 0.2), names=["train", "test"], seed=1)


def test_unit_groups_from_a_regex_on_the_relative_path(tmp_path):
    units = [Unit(f"t{i}", str(tmp_path / "Images" / f"train_{i // 3}_{i:03d}.png")) for i in range(6)]
    assert unit_groups(units, root=tmp_path, group_regex=None) == {f"t{i}": f"t{i}" for i in range(6)}
    assert unit_groups(units, root=tmp_path, group_regex=r"train_(\d+)_") == {f"t{i}": str(i // 3) for i in range(6)}
    assert set(unit_groups(units, root=tmp_path, group_regex=r"^Images/(?P<group>train_\d)").values()) == {
        "train_0", "train_1"}
    no_match = r"--group-regex 'test_\(\\d\+\)' does not match 'Images/train_0_000.png'; every input needs a group"
    with pytest.raises(UsageError, match=no_match):
        unit_groups(units, root=tmp_path, group_regex=r"test_(\d+)")
    with pytest.raises(UsageError, match="is not a valid regular expression"):
        unit_groups(units, root=tmp_path, group_regex="(")


def _tiles(root: Path, images: int, tiles_per_image: int) -> Path:
    """CoNSeP-layout tiles named img<image>_<tile>: tiles of one image share a source image."""
    rng = np.random.default_rng(0)
    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir()
    inst = np.zeros((32, 32), np.int32)
    inst[4:10, 4:10], inst[16:26, 18:27] = 1, 2
    for image in range(images):
        for tile in range(tiles_per_image):
            name = f"img{image}_{tile}"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "Images" / f"{name}.png")
            sio.savemat(root / "Labels" / f"{name}.mat", {"inst_map": inst, "inst_type": np.array([[1], [2]])})
    return root


def _image_of(manifest: dict) -> set[str]:
    return {re.search(r"(img\d+)_", s["path"]).group(1) for s in manifest["sources"]}


def test_cli_splits_cells_by_source_image(tmp_path, capsys):
    tiles = _tiles(tmp_path / "in", images=10, tiles_per_image=3)
    args = ["shard", "cells", "--format", "consep", "--input", str(tiles), "--out", str(tmp_path / "out"),
            "--size", "16", "--workers", "0", "--no-progress", "--split", "0.7,0.3", "--split-names", "train,test",
            "--group-regex", r"(img\d+)_"]
    main(args)
    assert "30 tiles in 10 groups (--group-regex '(img\\d+)_'): train 21 tiles / 7 groups, test 9 tiles / 3 groups" \
        in capsys.readouterr().out
    train, test = (json.loads((tmp_path / "out" / s / "manifest.json").read_text()) for s in ("train", "test"))
    assert not _image_of(train) & _image_of(test) and len(_image_of(train) | _image_of(test)) == 10
    assert train["num_samples"] + test["num_samples"] == 60
    assert train["params"]["split"] == {"name": "train", "fractions": {"train": 0.7, "test": 0.3}, "seed": 0,
                                        "group_regex": r"(img\d+)_"}
    audit = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert audit["tiles"] == {"train": 21, "test": 9} and audit["groups"] == {"train": 7, "test": 3}
    assert {g for g, s in audit["group_to_split"].items() if s == "test"} == _image_of(test)
    overlap = training_overlap(str(tmp_path / "out" / "train"), resolve_shards(str(tmp_path / "out" / "test")))
    assert overlap["seen"] == "no" and overlap["shared_sources"] == 0
    main(args)  # run again: everything is done already
    assert capsys.readouterr().out.count("0 tiles done, 0 failed") == 2
    with pytest.raises(SystemExit) as stop:  # another seed would move groups: refused, nothing touched
        main([*args, "--seed", "1"])
    assert stop.value.code == 2 and "holds shards made with other settings" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "splits.json").read_text()) == audit


@pytest.mark.parametrize("extra, message", [
    (["--group-regex", "x"], "--group-regex groups tiles for --split"),
    (["--split", "0.5,0.5", "--group-regex", "nomatch"], "does not match"),
    (["--split", "0.9,0.1", "--group-regex", "(img)"], "Split 'val' would get no tiles (1 groups in all)"),
    (["--split-names", "a,b"], "--split-names needs --split"),
])
def test_cli_split_mistakes_are_one_sentence(tmp_path, capsys, extra, message):
    tiles = _tiles(tmp_path / "in", images=2, tiles_per_image=2)
    with pytest.raises(SystemExit) as stop:
        main(["shard", "cells", "--format", "consep", "--input", str(tiles), "--out", str(tmp_path / "out"),
              "--size", "16", "--workers", "0", "--no-progress", *extra])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out" / "val").exists()


@pytest.mark.skipif(not CONSEP.is_dir(), reason="shared data not present")
def test_real_consep_tiles_split_by_original_image(tmp_path):
    main(["shard", "cells", "--format", "consep", "--input", str(CONSEP), "--out", str(tmp_path), "--size", "16",
          "--split", "0.75,0.25", "--split-names", "train,test", "--group-regex", r"train_(\d+)_", "--workers", "2",
          "--no-progress"])
    images = {}
    for split in ("train", "test"):
        manifest = json.loads((tmp_path / split / "manifest.json").read_text())
        images[split] = {re.search(r"train_(\d+)_", s["path"]).group(1) for s in manifest["sources"]}
    assert not images["train"] & images["test"] and len(images["train"] | images["test"]) == 27
    assert json.loads((tmp_path / "splits.json").read_text())["groups"] == {"train": 20, "test": 7}
