"""The folder importer: labels (folders, CSV, regex), classes, group-wise splits, padding, failures."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslkit.cli import main
from sslkit.errors import UsageError
from sslkit.sharding.core.imaging import border_value, pad_to_square, resize
from sslkit.sharding.core.source import Progress, natural_key
from sslkit.sharding.folder.command import FolderSource, add_parser, shard_folder
from sslkit.sharding.folder.plan import assign_keys, plan_folder, read_csv_list, report_lines, split_groups, split_plan

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CHROMOSOMES = DATA / "chromosome-gband-24class.tar.gz"


def _png(path: Path, value: int = 0, shape: tuple[int, ...] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)
    return path


def _produce(source: FolderSource) -> tuple[list, list]:
    samples, failed = [], []
    for unit in source.units():
        progress = Progress()
        samples += list(source.produce(unit, skip=0, progress=progress))
        failed += progress.failed
    return samples, failed


def _class_tree(root: Path, counts: dict[str, int]) -> None:
    for name, n in counts.items():
        for i in range(n):
            _png(root / name / f"img{i}.png", value=(10 * i) % 256)


# ---- labels and classes -------------------------------------------------------------------
def test_natural_sort_and_keys() -> None:
    names = ["clase10", "clase2", "Clase1", "clase1", "b", "a10b", "a9z"]
    assert sorted(names, key=natural_key) == ["a9z", "a10b", "b", "Clase1", "clase1", "clase2", "clase10"]
    # 'x.png' and 'x.tif' clash; 'x-2' is a real name and keeps it, so the clash gets '-3'.
    assert assign_keys(["d/x.png", "d/x-2.png", "d/x.tif", "d.e/x.png"]) == ["d_x", "d_x-2", "d_x-3", "d_e_x"]


def test_class_folders_counts_and_reports(tmp_path: Path) -> None:
    _class_tree(tmp_path, {"clase10": 6, "clase2": 7, "clase1": 5})
    _png(tmp_path / "loose.png")  # not in a class folder
    _png(tmp_path / "clase2" / ".hidden.png")
    (tmp_path / "clase1" / "notes.txt").write_text("not an image")
    plan = plan_folder(tmp_path)
    assert plan.classes == ["clase1", "clase2", "clase10"]
    assert Counter(i[2] for i in plan.items) == {"clase1": 5, "clase2": 7, "clase10": 6}
    assert [f["source"] for f in plan.failed] == [str(tmp_path / "loose.png")]
    assert "class sub-folder" in plan.failed[0]["reason"]
    assert any(".txt (1)" in note for note in plan.notes)
    assert len({i[3] for i in plan.items}) == 18  # no group source: each image its own group
    assert any("its own group" in line for line in report_lines(plan))
    labels = {s.meta["path"]: s.label for s in _produce(FolderSource(plan, size=4, channels=1))[0]}
    assert labels["clase1/img0.png"] == 0 and labels["clase2/img3.png"] == 1 and labels["clase10/img5.png"] == 2


def test_stray_label_rule(tmp_path: Path) -> None:
    _class_tree(tmp_path, {"a": 30, "b": 30, "c": 30, "d": 3, "e": 2, "stray": 1})
    plan = plan_folder(tmp_path)
    assert plan.classes == ["a", "b", "c", "d"]  # 2 and 1 are < 5 and < 30 / 10; 3 is not < 3
    reasons = Counter(f["reason"] for f in plan.failed)
    assert sorted(reasons.values()) == [1, 2]
    assert all("--min-class-count 1" in r and "--classes" in r for r in reasons)
    assert plan_folder(tmp_path, min_class_count=1).classes == ["a", "b", "c", "d", "e", "stray"]
    small = tmp_path / "small"
    _class_tree(small, {"x": 3, "y": 3})  # tiny but even: nothing is a stray
    assert plan_folder(small).classes == ["x", "y"]


def test_expected_classes_report_unexpected_label(tmp_path: Path) -> None:
    _class_tree(tmp_path, {"a": 3, "b": 2, "odd": 2})
    plan = plan_folder(tmp_path, classes=["b", "a", "empty"])
    assert plan.classes == ["b", "a", "empty"]
    assert len(plan.items) == 5
    assert len(plan.failed) == 2
    assert all("'odd'" in f["reason"] and "--classes" in f["reason"] for f in plan.failed)
    assert "class 'empty' has no images" in plan.notes
    samples, _ = _produce(FolderSource(plan, size=4))
    assert sorted(s.label for s in samples) == [0, 0, 1, 1, 1]


def test_csv_with_header_groups_and_missing_rows(tmp_path: Path) -> None:
    root, lists = tmp_path / "imgs", tmp_path / "lists"
    for name in ("p1_a.png", "p1_b.png", "p2_a.png"):
        _png(root / name)
    _png(lists / "extra" / "p3.png")  # relative to the CSV, outside ROOT
    (lists / "labels.csv").write_text("path,label,patient\np1_a.png,tumour,P1\np1_b.png,normal,P1\n"
                                      "p2_a.png,tumour,P2\nextra/p3.png,normal,P3\nmissing.png,normal,P4\n"
                                      "p2_a.png,normal,P2\n")
    plan = plan_folder(root, csv_path=str(lists / "labels.csv"))
    assert plan.classes == ["normal", "tumour"]
    assert [(i[0], i[2], i[3]) for i in plan.items] == [  # CSV order
        ("p1_a.png", "tumour", "P1"), ("p1_b.png", "normal", "P1"), ("p2_a.png", "tumour", "P2"),
        ("../lists/extra/p3.png", "normal", "P3")]
    assert plan.settings["group_source"] == "csv"
    sources = sorted(f["source"] for f in plan.failed)
    assert sources == [f"{lists / 'labels.csv'}:6 (missing.png)", f"{lists / 'labels.csv'}:7 (p2_a.png)"]


def test_csv_without_header_or_group_semicolons(tmp_path: Path) -> None:
    _png(tmp_path / "x" / "1.png")
    _png(tmp_path / "x" / "2.tif")
    (tmp_path / "l.csv").write_text("x/1.png;cat\nx/2.tif;dog\n")
    rows, failed = read_csv_list(str(tmp_path / "l.csv"), str(tmp_path))
    assert rows == [("x/1.png", "cat", None), ("x/2.tif", "dog", None)] and failed == []
    plan = plan_folder(tmp_path, csv_path=str(tmp_path / "l.csv"))
    assert plan.settings["group_source"] == "none" and [i[3] for i in plan.items] == ["x/1.png", "x/2.tif"]


def test_regex_labels_and_groups(tmp_path: Path) -> None:
    for case in ("case1", "case2"):
        for kind, n in (("chromosome", 3), ("cluster", 1)):
            for i in range(n):
                _png(tmp_path / "images" / case / kind / f"{kind}_{i}.TIF")
    _png(tmp_path / "images" / "readme.png")
    plan = plan_folder(tmp_path, label_regex=r"/(?P<label>chromosome|cluster)/",
                       group_regex=r"images/(case\d+)/", min_class_count=1)
    assert plan.classes == ["chromosome", "cluster"]
    assert Counter((i[2], i[3]) for i in plan.items) == {("chromosome", "case1"): 3, ("cluster", "case1"): 1,
                                                        ("chromosome", "case2"): 3, ("cluster", "case2"): 1}
    assert len(plan.failed) == 1 and "--label-regex" in plan.failed[0]["reason"]
    with pytest.raises(UsageError, match="--group-regex"):
        plan_folder(tmp_path, group_regex="case(")
    with pytest.raises(UsageError, match="No image"):
        plan_folder(tmp_path, label_regex="nothing-matches")


# ---- splits -----------------------------------------------------------------------------
def test_split_equal_groups_exact_counts_and_partition(tmp_path: Path) -> None:
    sizes = {f"patient{g}": 10 for g in range(100)}
    where = split_groups(sizes, [0.8, 0.1, 0.1], seed=3)
    # Middle images at 10k + 5 against targets 800 / 900: exactly 80, 10 and 10 groups.
    assert Counter(where.values()) == {0: 80, 1: 10, 2: 10}
    assert where == split_groups(dict(reversed(list(sizes.items()))), [0.8, 0.1, 0.1], seed=3)
    assert where != split_groups(sizes, [0.8, 0.1, 0.1], seed=4)


def test_split_plan_by_group(tmp_path: Path) -> None:
    for g in range(30):
        for i in range(1 + g % 4):
            _png(tmp_path / ("a" if i % 2 else "b") / f"p{g}_img{i}.png")
    plan = plan_folder(tmp_path, group_regex=r"/(p\d+)_")
    parts, audit = split_plan(plan, fractions=[0.6, 0.2, 0.2], names=["tr", "va", "te"], seed=0)
    groups = {n: {i[3] for i in p.items} for n, p in parts.items()}
    assert sum(len(g) for g in groups.values()) == 30 and len(set().union(*groups.values())) == 30
    for name, part in parts.items():
        assert all(audit["group_to_split"][i[3]] == name for i in part.items)
    assert sum(audit["images"].values()) == len(plan.items) == sum(1 + g % 4 for g in range(30))
    assert audit["classes"]["tr"] == dict(Counter(i[2] for i in parts["tr"].items))
    # Independently: group sizes from the file names written above, then the documented rule.
    names = ["tr", "va", "te"]
    sizes = Counter({f"p{g}": 1 + g % 4 for g in range(30)})
    expected = {g: names[i] for g, i in split_groups(sizes, [0.6, 0.2, 0.2], seed=0).items()}
    assert audit["group_to_split"] == expected
    for name in names:
        n_images = sum(n for g, n in sizes.items() if expected[g] == name)
        assert audit["images"][name] == len(parts[name].items) == n_images > 0
        assert audit["groups"][name] == sum(s == name for s in expected.values())
    again, audit2 = split_plan(plan_folder(tmp_path, group_regex=r"/(p\d+)_"), fractions=[0.6, 0.2, 0.2],
                               names=["tr", "va", "te"], seed=0)
    assert audit2 == audit and {n: p.items for n, p in again.items()} == {n: p.items for n, p in parts.items()}
    with pytest.raises(UsageError, match="add up to 1"):
        split_plan(plan, fractions=[0.6, 0.2], names=["a", "b"])
    with pytest.raises(UsageError, match="no images"):
        split_plan(plan, fractions=[0.98, 0.01, 0.01], names=["a", "b", "c"])


# ---- pixels -----------------------------------------------------------------------------
def test_pad_to_square_pixel_exact(tmp_path: Path) -> None:
    gray = np.array([[10, 20, 30, 40], [50, 60, 70, 80]], dtype=np.uint8)  # border = all 8, median 45
    Image.fromarray(gray).save(tmp_path / "g.png")
    source = FolderSource(plan_folder(tmp_path, unlabeled=True), size=4, channels=1)
    image, meta = source.load(str(tmp_path / "g.png"))
    expected = np.full((4, 4), 45, dtype=np.uint8)
    expected[1:3] = gray
    np.testing.assert_array_equal(image, expected)
    assert meta == {"height": 2, "width": 4, "pad": 45}
    tall = np.full((5, 3, 3), 255, dtype=np.uint8)
    tall[1:4, 1] = (0, 100, 200)
    tall[0, 0] = (7, 7, 7)  # one odd border pixel does not move the median
    Image.fromarray(tall).save(tmp_path / "t.png")
    image, meta = FolderSource(plan_folder(tmp_path, unlabeled=True), size=5).load(str(tmp_path / "t.png"))
    expected = np.full((5, 5, 3), 255, dtype=np.uint8)
    expected[:, 1:4] = tall
    np.testing.assert_array_equal(image, expected)
    assert meta["pad"] == (255, 255, 255)
    forced, _ = FolderSource(plan_folder(tmp_path, unlabeled=True), size=4, channels=1, pad_value=0).load(
        str(tmp_path / "g.png"))
    assert forced[0].tolist() == [0, 0, 0, 0] and forced[1].tolist() == [10, 20, 30, 40]


def test_modes_resize_and_undecodable(tmp_path: Path) -> None:
    rows, cols = np.mgrid[0:8, 0:4]
    gray = (40 + 25 * rows + 9 * cols).astype(np.uint8)  # (8, 4) ramp, 40..242: not flat
    (tmp_path / "c").mkdir()
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "c" / "deep.tif")  # 16-bit: v * 257 -> v
    rgba = np.zeros((4, 8, 4), dtype=np.uint8)  # fully transparent: composited onto white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c" / "rgba.png")
    pal = Image.fromarray(np.array([[0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    pal.save(tmp_path / "c" / "pal.gif")
    (tmp_path / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    plan = plan_folder(tmp_path, min_class_count=1)
    samples, failed = _produce(FolderSource(plan, size=16, channels=1))
    by_path = {s.meta["path"]: s for s in samples}
    assert sorted(by_path) == ["c/deep.tif", "c/pal.gif", "c/rgba.png"]
    deep = by_path["c/deep.tif"].image
    assert deep.shape == (16, 16) and len(np.unique(deep)) > 10
    np.testing.assert_array_equal(deep, resize(pad_to_square(gray, border_value(gray)), (16, 16)))
    # Palette -> RGB -> ITU-R 601 luma: red 0.299 * 255 = 76, blue 0.114 * 255 = 29; already square.
    luma = np.where(np.array([[0, 1, 0], [1, 1, 0], [0, 0, 1]]) == 0, 76, 29).astype(np.uint8)
    np.testing.assert_array_equal(by_path["c/pal.gif"].image, resize(luma, (16, 16)))
    assert set(np.unique(by_path["c/pal.gif"].image)) >= {29, 76}
    assert by_path["c/pal.gif"].meta["pad"] == 76  # border median: 5 red, 3 blue of 8
    assert np.all(by_path["c/rgba.png"].image == 255)
    assert (by_path["c/deep.tif"].meta["height"], by_path["c/deep.tif"].meta["width"]) == (8, 4)
    assert [f["source"] for f in failed] == [str(tmp_path / "c" / "broken.png")]
    assert "cannot be decoded" in failed[0]["reason"]


def test_units_payloads_and_pickling(tmp_path: Path) -> None:
    _class_tree(tmp_path, {"a": 5, "b": 5})
    source = FolderSource(plan_folder(tmp_path), size=8, unit_files=4)
    units = source.units()
    assert [len(u.payload) for u in units] == [4, 4, 2] and [u.id for u in units] == [
        "files-000000", "files-000001", "files-000002"]
    clone = pickle.loads(pickle.dumps(source))
    assert clone._items is None and clone.params() == source.params()
    assert clone._index == source._index == {"a": 0, "b": 1}
    assert [u.cost for u in units] == [4.0, 4.0, 2.0]
    assert units[2].path == str(tmp_path / "b" / "img3.png")  # a unit's path is its first file
    keys = [s.key for u in units for s in clone.produce(u, skip=0, progress=Progress())]
    assert keys == [f"{c}_img{i}" for c in "ab" for i in range(5)]
    _png(tmp_path / "a" / "img9.png")
    assert FolderSource(plan_folder(tmp_path), size=8).params()["files_sha256"] != source.params()["files_sha256"]


# ---- real data --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromosomes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CHROMOSOMES.is_file():
        pytest.skip(f"{CHROMOSOMES.name} is not in ../shared/data")
    root = tmp_path_factory.mktemp("chromosomes")
    with tarfile.open(CHROMOSOMES) as tar:
        tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return root


@pytest.mark.slow  # extracting ~28k files takes 10-25 s on a slow file system
def test_chromosome_plan_and_split(chromosomes: Path) -> None:
    plan = plan_folder(chromosomes, label_regex=r"clase(\d+)", group_regex=r"^([^/]+)/")
    parts, audit = split_plan(plan, fractions=[0.8, 0.1, 0.1], names=["train", "val", "test"], seed=0)
    files = Counter()  # independent count: file names only
    for _, _, names in os.walk(chromosomes):
        files.update(re.match(r"clase(\d+)_", n).group(1) for n in names)
    assert plan.classes == [str(k) for k in range(1, 25)]
    assert files["25"] == 1 and len(plan.failed) == 1 and "'25'" in plan.failed[0]["reason"]
    del files["25"]
    per_class = Counter()
    for name in parts:
        per_class.update(audit["classes"][name])
    assert per_class == files
    metaphases = [{i[3] for i in part.items} for part in parts.values()]
    assert sum(map(len, metaphases)) == len(set().union(*metaphases)) == 612
    assert all(abs(audit["images"][n] / len(plan.items) - f) < 0.01 for n, f in audit["fractions"].items())
    samples, failed = _produce_unit(FolderSource(parts["val"], size=32, channels=1))
    assert failed == [] and all(s.image.shape == (32, 32) for s in samples)
    assert all(s.meta["group"] == s.meta["path"].split("/")[0] for s in samples)


def _produce_unit(source: FolderSource) -> tuple[list, list]:
    progress = Progress()
    samples = list(source.produce(source.units()[0], skip=0, progress=progress))
    return samples, progress.failed


# ---- end to end through run_source and the CLI -------------------------------------------
def _read_set(folder: Path) -> dict[str, tuple[int, dict]]:
    """key -> (label, meta) of every sample in the shards a manifest lists."""
    manifest = json.loads((folder / "manifest.json").read_text())
    out: dict[str, tuple[int, dict]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "cls":
                out[key] = (int(data), json.loads(members[f"{key}.json"]))
    return out


def _patients(root: Path) -> None:
    """12 patients (1-4 images each), classes 'benign' / 'malignant' by patient, one broken file."""
    for p in range(12):
        for i in range(1 + p % 4):
            _png(root / ("malignant" if p % 3 == 0 else "benign") / f"pt{p:02d}_{i}.png", value=20 * i,
                 shape=(5 + i, 3 + p % 5))
    (root / "benign" / "pt01_9.png").write_bytes(b"not a png")


def test_end_to_end_splits_agree_across_worker_counts(tmp_path: Path) -> None:
    _patients(tmp_path / "in")
    kwargs = dict(size=8, channels=1, group_regex=r"/(pt\d+)_", split=[0.5, 0.25, 0.25], seed=1,
                  unit_files=3, shard_size=4, progress=False, min_class_count=1)
    one = shard_folder(tmp_path / "in", tmp_path / "w0", workers=0, **kwargs)
    two = shard_folder(tmp_path / "in", tmp_path / "w2", workers=2, **kwargs)
    assert json.loads((tmp_path / "w0" / "splits.json").read_text()) == \
        json.loads((tmp_path / "w2" / "splits.json").read_text())
    audit = json.loads((tmp_path / "w0" / "splits.json").read_text())
    seen_groups: dict[str, str] = {}
    for name in ("train", "val", "test"):
        a, b = _read_set(tmp_path / "w0" / name), _read_set(tmp_path / "w2" / name)
        assert a == b and len(a) == audit["images"][name] - (name == audit["group_to_split"]["pt01"])
        for label, meta in a.values():
            assert ["benign", "malignant"][label] == meta["label"]
            assert audit["group_to_split"][meta["group"]] == name
            assert seen_groups.setdefault(meta["group"], name) == name
        manifest = json.loads((tmp_path / "w0" / name / "manifest.json").read_text())
        assert manifest["num_samples"] == len(a)
    assert sum(s["samples"] for s in one.values()) == sum(s["samples"] for s in two.values()) == 30
    assert len(seen_groups) == 12
    broken = [f for s in one.values() for f in s["manifest"]["failed"]]
    assert [f["source"] for f in broken] == [str(tmp_path / "in" / "benign" / "pt01_9.png")]
    again = shard_folder(tmp_path / "in", tmp_path / "w0", workers=0, **kwargs)  # resumes: nothing to do
    assert all(s["units_before"] == s["units"] and s["samples"] == 0 for s in again.values())


def test_cli_writes_shards_and_reports_unexpected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _class_tree(tmp_path / "in", {"a": 3, "b": 2, "zzz": 1})
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="source"))
    args = parser.parse_args(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "6",
                              "--classes", "a,b", "--workers", "0", "--no-progress", "--pad-value", "0"])
    with pytest.raises(SystemExit) as exit_info:  # an input was not written: exit status 3, after the manifest
        args.fn(args)
    assert exit_info.value.code == 3
    printed = capsys.readouterr().out
    assert "NOT WRITTEN: 1 file(s): label 'zzz' is not in --classes" in printed
    samples = _read_set(tmp_path / "out")
    assert sorted((label, meta["path"]) for label, meta in samples.values()) == [
        (0, "a/img0.png"), (0, "a/img1.png"), (0, "a/img2.png"), (1, "b/img0.png"), (1, "b/img1.png")]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [f["source"] for f in manifest["failed"]] == [str(tmp_path / "in" / "zzz" / "img0.png")]
    for flags, match in ((["--split", "0.8,x"], "--split"), (["--pad-value", "white"], "--pad-value"),
                         (["--classes", "a,a"], "twice"), (["--size", "0"], "--size")):
        bad = parser.parse_args(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--size", "6",
                                 *flags])
        with pytest.raises(UsageError, match=match):
            bad.fn(bad)
    assert not (tmp_path / "o2").exists()
    args = parser.parse_args(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "u"), "--size", "6",
                              "--unlabeled", "--workers", "0", "--no-progress", "--channels", "1"])
    args.fn(args)
    assert "unlabelled" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "u" / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and manifest["failed"] == []
    with tarfile.open(tmp_path / "u" / manifest["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert not any(n.endswith(".cls") for n in names) and sum(n.endswith(".png") for n in names) == 6



def test_rerun_with_another_seed_leaves_splits_json(tmp_path: Path) -> None:
    _patients(tmp_path / "in")
    kwargs = dict(size=8, channels=1, group_regex=r"/(pt\d+)_", split=[0.5, 0.5], workers=0, progress=False,
                  min_class_count=1)
    shard_folder(tmp_path / "in", tmp_path / "out", seed=1, **kwargs)
    before = (tmp_path / "out" / "splits.json").read_bytes()
    assert json.loads(before)["seed"] == 1 and sorted(json.loads(before)["images"]) == ["train", "val"]
    with pytest.raises(UsageError, match="holds shards made with other settings"):
        shard_folder(tmp_path / "in", tmp_path / "out", seed=2, **kwargs)
    assert (tmp_path / "out" / "splits.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["splits.json", "train", "val"]


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """stderr of ``sslkit ARGV``, which must end in a user error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_user_errors_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _class_tree(tmp_path / "in", {"a": 2})
    base = ["shard", "folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "6",
            "--workers", "0", "--no-progress"]
    err = _cli([*base, "--label-regex", "nothing-matches"], capsys)
    assert err.startswith("sslkit: error: No image under") and "could be labelled" in err
    assert "Traceback" not in err
    (tmp_path / "latin1.csv").write_bytes(b"a/img0.png,caf\xe9\n")
    err = _cli([*base, "--csv", str(tmp_path / "latin1.csv")], capsys)
    assert f"CSV file {tmp_path / 'latin1.csv'} cannot be read" in err and "UTF-8" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    (tmp_path / "huge.csv").write_text("a/img0.png," + "x" * 200_000 + "\n")  # over csv's field limit
    err = _cli([*base, "--csv", str(tmp_path / "huge.csv")], capsys)
    assert f"CSV file {tmp_path / 'huge.csv'} cannot be read" in err and "field limit" in err
    assert not (tmp_path / "out").exists()


def test_cli_classes_file_and_split_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _class_tree(tmp_path / "in", {"a": 4, "b": 4, "c": 4})
    (tmp_path / "classes.txt").write_text("\ufeff# index order\nc\n\n  a  \nb\n", encoding="utf-8")
    main(["shard", "folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "6",
          "--classes-file", str(tmp_path / "classes.txt"), "--split", "0.5,0.5", "--split-names", "left,right",
          "--seed", "3", "--workers", "0", "--no-progress"])
    capsys.readouterr()
    audit = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert list(audit["images"]) == ["left", "right"] and sum(audit["images"].values()) == 12
    assert set(audit["group_to_split"].values()) == {"left", "right"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["left", "right", "splits.json"]
    samples = {}
    for name in ("left", "right"):
        manifest = json.loads((tmp_path / "out" / name / "manifest.json").read_text())
        assert manifest["num_samples"] == audit["images"][name]
        assert manifest["params"]["classes"] == ["c", "a", "b"] and manifest["params"]["split"] == name
        samples.update(_read_set(tmp_path / "out" / name))
    assert {meta["path"]: label for label, meta in samples.values()} == {
        f"{c}/img{i}.png": "cab".index(c) for c in "abc" for i in range(4)}
    both = ["shard", "folder", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--size", "6"]
    assert "not both" in _cli([*both, "--classes", "a", "--classes-file", str(tmp_path / "classes.txt")], capsys)
    assert "--split-names" in _cli([*both, "--split", "0.5,0.5", "--split-names", "x,y,z"], capsys)
    assert "needs --split" in _cli([*both, "--split-names", "x,y"], capsys)
    assert "does not exist" in _cli([*both, "--classes-file", str(tmp_path / "none.txt")], capsys)
    assert not (tmp_path / "o2").exists()
    summaries = shard_folder(tmp_path / "in", tmp_path / "four", size=6, split=[0.25] * 4, workers=0,
                             progress=False)  # four fractions: default names split0..split3
    assert sorted(summaries) == [str(tmp_path / "four" / f"split{i}") for i in range(4)]
    two = shard_folder(tmp_path / "in", tmp_path / "two", size=6, split=[0.5, 0.5], workers=0, progress=False)
    assert sorted(two) == [str(tmp_path / "two" / n) for n in ("train", "val")]

@pytest.mark.slow
def test_chromosomes_end_to_end(chromosomes: Path, tmp_path: Path) -> None:
    summaries = shard_folder(chromosomes, tmp_path, size=32, channels=1, label_regex=r"clase(\d+)",
                             group_regex=r"^([^/]+)/", split=[0.8, 0.1, 0.1], workers=2, progress=False)
    files = Counter(re.match(r"clase(\d+)_", n).group(1) for _, _, names in os.walk(chromosomes) for n in names)
    stray = files.pop("25")
    per_class, split_of = Counter(), {}
    for name in ("train", "val", "test"):
        manifest = summaries[str(tmp_path / name)]["manifest"]
        per_class.update(manifest["classes"])
        samples = _read_set(tmp_path / name)
        for label, meta in samples.values():
            assert meta["label"] == str(label + 1) and (meta["height"], meta["width"]) != (32, 32)
            assert split_of.setdefault(meta["group"], name) == name  # no metaphase in two splits
        for key in sorted(samples)[::max(1, len(samples) // 10)]:  # about ten samples per split
            meta = samples[key][1]
            with Image.open(chromosomes / meta["path"]) as img:
                assert (meta["width"], meta["height"]) == img.size
    assert per_class == files and len(per_class) == 24 and stray == 1 and len(split_of) == 612
    failed = summaries[str(tmp_path / "train")]["manifest"]["failed"]
    assert len(failed) == 1 and "clase25" in failed[0]["source"] and "--min-class-count 1" in failed[0]["reason"]


def test_invert_bright_on_dark_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Q-banded (fluorescent) chromosomes are bright on black: --invert makes them dark on white, as G-band
    ones are; auto decides per image from its border."""
    bright = np.zeros((20, 12), np.uint8)
    bright[4:16, 4:8] = 210  # a bright chromosome on black
    (tmp_path / "in" / "a").mkdir(parents=True)
    Image.fromarray(bright).save(tmp_path / "in" / "a" / "fluor.png")
    Image.fromarray(255 - bright).save(tmp_path / "in" / "a" / "gband.png")  # dark on white already
    plan = plan_folder(tmp_path / "in")
    for invert, expected in (("no", {"fluor.png": False, "gband.png": False}),
                             ("yes", {"fluor.png": True, "gband.png": True}),
                             ("auto", {"fluor.png": True, "gband.png": False})):
        source = FolderSource(plan, size=20, channels=1, invert=invert)
        for rel in ("a/fluor.png", "a/gband.png"):
            image, meta = source.load(str(tmp_path / "in" / rel))
            original = bright if rel.endswith("fluor.png") else 255 - bright
            flipped = expected[rel.split("/")[1]]
            shown = 255 - original if flipped else original
            want = resize(pad_to_square(shown, border_value(shown)), (20, 20))
            np.testing.assert_array_equal(image, want)
            assert meta.get("inverted", False) is flipped and ("inverted" in meta) == (invert != "no")
        assert ("invert" in source.params()) == (invert != "no")
    main(["shard", "folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "8", "--channels", "1",
          "--invert", "auto", "--workers", "0", "--no-progress", "--min-class-count", "1"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["params"]["invert"] == "auto"
    assert {meta["path"]: meta["inverted"] for _, meta in _read_set(tmp_path / "out").values()} == {
        "a/fluor.png": True, "a/gband.png": False}
    with pytest.raises(SystemExit):  # a changed setting into the same folder is refused
        main(["shard", "folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--size", "8",
              "--channels", "1", "--invert", "yes", "--workers", "0", "--no-progress", "--min-class-count", "1"])
    assert "invert: 'auto' before, 'yes' now" in capsys.readouterr().err
