"""``sslkit shard cells``: readers, crop geometry, class maps and bad input, on files made in tmp_path."""

from __future__ import annotations

import argparse
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import tifffile
from PIL import Image

from sslkit.errors import ConfigError, UsageError
from sslkit.sharding.cells.annotations import nuclei_from_map
from sslkit.sharding.cells.command import CellSource, add_parser, crop_window, cut_window, raw_class_map, read_class_map
from sslkit.sharding.core.imaging import resize, to_uint8
from sslkit.sharding.core.runner import run_source
from sslkit.sharding.core.source import Progress, UnitError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _run(source: CellSource) -> tuple[dict, dict, dict]:
    """All units produced in-process: samples by key, Progress details by unit id, errors by unit id."""
    samples, details, errors = {}, {}, {}
    for unit in source.units():
        progress = Progress()
        try:
            for sample in source.produce(unit, skip=0, progress=progress):
                samples[sample.key] = sample
        except UnitError as err:
            errors[unit.id] = str(err)
        details[unit.id] = progress.details
    return samples, details, errors


def _expected(image: np.ndarray, left: int, top: int, side: int, mode: str = "reflect") -> np.ndarray:
    pad = side + 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    return padded[top + pad:top + pad + side, left + pad:left + pad + side]


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
def test_cut_window_equals_np_pad(mode: str) -> None:
    image = _image(5, 7)
    for left, top, side in [(-3, -2, 4), (4, 3, 6), (-12, -9, 30), (2, 1, 3), (6, 4, 9), (4, 2, 3), (0, 0, 5)]:
        np.testing.assert_array_equal(cut_window(image, left, top, side, pad=mode),
                                      _expected(image, left, top, side, mode))
    gray = image[:, :, 0]
    np.testing.assert_array_equal(cut_window(gray, -4, -4, 10, pad="reflect"),
                                  _expected(image, -4, -4, 10)[:, :, 0])


def test_nuclei_from_map_matches_a_per_id_loop() -> None:
    rng = np.random.default_rng(0)
    for scale in (1, 10**6):  # small ids; huge sparse ids (renumbered first)
        inst = rng.integers(-1, 6, size=(9, 13)) * scale
        type_map = rng.integers(0, 3, size=inst.shape)
        nuclei, derived = nuclei_from_map(inst, types={scale: "a"}, type_map=type_map)
        ids = [int(i) for i in np.unique(inst) if i > 0]
        assert [n.instance for n in nuclei] == ids and derived == len(ids) - (scale in ids)
        for nucleus in nuclei:
            ys, xs = np.nonzero(inst == nucleus.instance)
            assert nucleus.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert nucleus.area == len(xs) and nucleus.centroid == (xs.sum() / len(xs), ys.sum() / len(ys))
            codes = np.bincount(type_map[ys, xs], minlength=3)[1:]
            majority = int(np.argmax(codes)) + 1 if codes.any() else 0
            assert nucleus.raw_type == ("a" if nucleus.instance == scale else majority)
    assert nuclei_from_map(np.zeros((4, 4), dtype=np.int64)) == ([], 0)


def test_crop_window_centres_on_the_bbox_with_a_minimum() -> None:
    assert crop_window((10, 20, 14, 26), scale=2, window=None, min_window=4) == (6, 17, 12)  # longer side 6
    assert crop_window((10, 20, 13, 23), scale=2, window=None, min_window=4) == (9, 19, 6)  # centre 11.5 rounds up
    assert crop_window((10, 20, 14, 26), scale=1.5, window=None, min_window=4) == (8, 19, 9)  # halves round up
    assert crop_window((5, 5, 7, 7), scale=2, window=None, min_window=16) == (-2, -2, 16)  # 2-px nucleus
    assert crop_window((10, 20, 14, 26), scale=2, window=21, min_window=16) == (2, 13, 21)


# ----------------------------------------------------------------------------- CoNSeP


def _consep_tile(folder: Path, name: str, image: np.ndarray, inst_map: np.ndarray, **extra) -> None:
    _save_png(folder / "Images" / f"{name}.png", image)
    (folder / "Labels").mkdir(parents=True, exist_ok=True)
    sio.savemat(folder / "Labels" / f"{name}.mat", {"inst_map": inst_map, **extra})


def _consep_map() -> np.ndarray:
    inst = np.zeros((40, 50), dtype=np.int32)
    inst[10:16, 0:4] = 1  # at the left border: bbox (0, 10, 4, 16), window 12
    inst[20:30, 20:28] = 2  # bbox (20, 20, 28, 30), window 20
    inst[35:38, 45:47] = 3  # small, near the corner: window = min 16
    return inst


def test_consep_crops_pixels_classes_and_meta(tmp_path: Path) -> None:
    image = _image(40, 50)
    types = np.array([[2], [4], [0]])  # merged codes: inflammatory, spindle, background (unmapped)
    _consep_tile(tmp_path / "Train", "train_1", image, _consep_map(), inst_type=types)
    _consep_tile(tmp_path / "Test", "test_1", _image(40, 50, 1), _consep_map(), inst_type=types)
    source = CellSource(fmt="consep", input=tmp_path, size=12, min_window=4)
    assert source.class_map.name == "consep4"
    assert source.classes == ["misc", "inflammatory", "epithelial", "spindle-shaped"]
    samples, details, errors = _run(source)
    assert not errors and sorted(samples) == ["Test_test_1_1", "Test_test_1_2", "Train_train_1_1", "Train_train_1_2"]
    assert details["Train_train_1"] == {"nuclei": 3, "crops": 2, "unmapped_types": {"0": 1}}
    first = samples["Train_train_1_1"]
    np.testing.assert_array_equal(first.image, _expected(image, -4, 7, 12))  # size 12: no resizing
    assert first.label == 1 and first.meta["class"] == "inflammatory" and first.meta["raw_type"] == 2
    assert first.meta["bbox"] == [0, 10, 4, 16] and first.meta["centroid"] == [1.5, 12.5]
    assert first.meta["area"] == 24 and first.meta["instance"] == 1 and first.meta["window"] == [-4, 7, 12]
    assert first.meta["source"] == "Train/Images/train_1.png"
    second = samples["Train_train_1_2"]
    assert second.label == 3 and second.meta["raw_type"] == 4 and second.image.shape == (12, 12, 3)
    np.testing.assert_array_equal(second.image, resize(_expected(image, 14, 15, 20), (12, 12)))


def test_constant_pad_value_fills_the_border(tmp_path: Path) -> None:
    image = _image(40, 50)
    _consep_tile(tmp_path, "t", image, _consep_map(), inst_type=np.array([[1], [2], [3]]))
    source = CellSource(fmt="consep", input=tmp_path, size=12, min_window=4, pad="constant", pad_value=200)
    crop = _run(source)[0]["t_1"]  # window (-4, 7, 12): 4 columns left of the image
    assert crop.meta["window"] == [-4, 7, 12] and source.params()["pad_value"] == 200
    assert (crop.image[:, :4] == 200).all()
    np.testing.assert_array_equal(crop.image[:, 4:], image[7:19, 0:8])
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), constant_values=200)
    np.testing.assert_array_equal(crop.image, padded[7 + 4:19 + 4, 0:12])


def test_names_equal_after_cleaning_both_get_sharded(tmp_path: Path) -> None:
    inst = _consep_map()
    _consep_tile(tmp_path, "a b", _image(40, 50), inst, inst_type=np.array([[1], [2], [3]]))
    _consep_tile(tmp_path, "a_b", _image(40, 50, 1), inst, inst_type=np.array([[1], [2], [3]]))
    source = CellSource(fmt="consep", input=tmp_path, size=8)
    assert [u.id for u in source.units()] == ["a_b", "a_b-2"] and not source.failed
    samples, _, errors = _run(source)
    assert not errors and sorted(samples) == ["a_b-2_1", "a_b-2_2", "a_b-2_3", "a_b_1", "a_b_2", "a_b_3"]
    assert samples["a_b_1"].meta["source"] == "Images/a b.png"
    assert samples["a_b-2_1"].meta["source"] == "Images/a_b.png"


def test_consep_auto_map_follows_the_codes(tmp_path: Path) -> None:
    _consep_tile(tmp_path / "a", "t", _image(40, 50), _consep_map(), inst_type=np.array([[4], [5], [3]]))
    source = CellSource(fmt="consep", input=tmp_path / "a", size=8)
    assert source.class_map.name == "consep7" and "[3, 4, 5]" in source.params()["class_map_note"]
    samples, _, _ = _run(source)
    assert [s.meta["class"] for s in samples.values()] == ["epithelial", "spindle-shaped", "epithelial"]
    forced = CellSource(fmt="consep", input=tmp_path / "a", size=8, class_map="consep4")
    assert [s.meta["class"] for s in _run(forced)[0].values()] == ["spindle-shaped", "epithelial"]
    _consep_tile(tmp_path / "b", "t", _image(40, 50), _consep_map())  # instances only (Kumar, CPM layouts)
    untyped = CellSource(fmt="consep", input=tmp_path / "b", size=8)
    assert untyped.classes is None and len(_run(untyped)[0]) == 3


def test_consep_types_from_type_map_when_inst_type_missing(tmp_path: Path) -> None:
    inst = _consep_map()
    type_map = np.where(inst > 0, 3, 0)
    type_map[20:22, 20:28] = 1  # instance 2: 16 pixels of 1, 64 of 3 -> majority 3
    type_map[35:38, 45:47] = 0  # instance 3: no type -> code 0, unmapped
    _consep_tile(tmp_path, "t", _image(40, 50), inst, type_map=type_map)
    samples, details, _ = _run(CellSource(fmt="consep", input=tmp_path, size=8))
    assert {k: s.meta["raw_type"] for k, s in samples.items()} == {"t_1": 3, "t_2": 3}
    assert details["t"]["types_from_type_map"] == 3 and details["t"]["unmapped_types"] == {"0": 1}


def test_window_scale_fixed_window_min_area_and_unknown_keep(tmp_path: Path) -> None:
    _consep_tile(tmp_path, "t", _image(40, 50), _consep_map(), inst_type=np.array([[1], [2], [0]]))
    sides = {}
    for kwargs in ({"window_scale": 1.0}, {"window_scale": 3.0}, {"window": 10}):
        samples, _, _ = _run(CellSource(fmt="consep", input=tmp_path, size=8, min_window=4, **kwargs))
        sides[next(iter(kwargs.values()))] = [s.meta["window"][2] for s in samples.values()]
        assert all(s.image.shape == (8, 8, 3) for s in samples.values())
    assert sides == {1.0: [6, 10], 3.0: [18, 30], 10: [10, 10]}
    samples, details, _ = _run(CellSource(fmt="consep", input=tmp_path, size=8, min_area=25))
    assert list(samples) == ["t_2"] and details["t"] == {"nuclei": 3, "crops": 1, "small": 2}
    samples, details, _ = _run(CellSource(fmt="consep", input=tmp_path, size=8, unknown="keep"))
    assert list(samples) == ["t_1", "t_2", "t_3"] and samples["t_3"].label is None
    assert samples["t_3"].meta["class"] is None and details["t"]["unmapped_types"] == {"0": 1}
    samples, _, _ = _run(CellSource(fmt="consep", input=tmp_path, size=8, class_map="none", channels=1))
    assert len(samples) == 3 and all(s.label is None and s.image.shape == (8, 8) for s in samples.values())


def test_bad_consep_inputs_fail_alone(tmp_path: Path) -> None:
    _consep_tile(tmp_path, "good", _image(40, 50), _consep_map(), inst_type=np.array([[1], [2], [3]]))
    _consep_tile(tmp_path, "nomap", _image(40, 50), _consep_map())
    sio.savemat(tmp_path / "Labels" / "nomap.mat", {"type_map": np.zeros((40, 50))})
    _consep_tile(tmp_path, "broken", _image(40, 50), _consep_map())
    (tmp_path / "Images" / "broken.png").write_bytes(b"not a png at all")
    _consep_tile(tmp_path, "shape", _image(30, 50), _consep_map())
    _save_png(tmp_path / "Images" / "orphan.png", _image(8, 8))
    sio.savemat(tmp_path / "Labels" / "lonely.mat", {"inst_map": _consep_map()})
    source = CellSource(fmt="consep", input=tmp_path, size=8)
    samples, _, errors = _run(source)
    assert sorted(samples) == ["good_1", "good_2", "good_3"]
    assert set(errors) == {"nomap", "broken", "shape"}
    assert "nomap.mat has no 'inst_map'" in errors["nomap"] and "type_map" in errors["nomap"]
    assert "broken.png does not decode" in errors["broken"]
    assert "50x40 but its image is 50x30" in errors["shape"]
    assert [Path(f["source"]).name for f in source.failed] == ["orphan.png", "lonely.mat"]
    assert "no annotation file" in source.failed[0]["reason"] and "no image" in source.failed[1]["reason"]


# ----------------------------------------------------------------------------- PanNuke


def test_pannuke_fold_layout(tmp_path: Path) -> None:
    images = np.random.default_rng(0).uniform(0, 255, size=(3, 32, 32, 3))
    masks = np.zeros((3, 32, 32, 6))
    masks[0, 2:8, 0:6, 0] = 5  # neoplastic at the left edge
    masks[0, 10:20, 10:14, 4] = 9  # epithelial
    masks[1, 5:9, 5:9, 1] = 3  # inflammatory
    masks[2, 20:30, 20:30, 2] = 7  # connective
    masks[2, 0:3, 0:3, 3] = 8  # dead
    masks[..., 5] = (masks[..., :5].sum(-1) == 0)
    folder = tmp_path / "Fold 1"
    (folder / "images" / "fold1").mkdir(parents=True)
    (folder / "masks" / "fold1").mkdir(parents=True)
    np.save(folder / "images" / "fold1" / "images.npy", images)
    np.save(folder / "images" / "fold1" / "types.npy", np.array(["Breast", "Colon", "Lung"]))
    np.save(folder / "masks" / "fold1" / "masks.npy", masks)
    source = CellSource(fmt="pannuke", input=tmp_path, size=12, images_per_unit=2, min_window=4)
    units = source.units()
    assert [u.id for u in units] == ["Fold_1_images_fold1_00000", "Fold_1_images_fold1_00002"]
    samples, details, errors = _run(pickle.loads(pickle.dumps(source)))
    assert not errors and source.classes == ["neoplastic", "inflammatory", "connective", "dead", "epithelial"]
    prefix = "Fold_1_images_fold1_"
    assert {k: s.meta["class"] for k, s in samples.items()} == {
        prefix + "00000_c0_5": "neoplastic", prefix + "00000_c4_9": "epithelial",
        prefix + "00001_c1_3": "inflammatory", prefix + "00002_c2_7": "connective", prefix + "00002_c3_8": "dead"}
    first = samples[prefix + "00000_c0_5"]
    assert first.meta["tissue"] == "Breast" and first.meta["image_index"] == 0 and first.label == 0
    np.testing.assert_array_equal(first.image, _expected(to_uint8(images[0]), -3, -1, 12))
    assert details[units[0].id] == {"images": 2, "nuclei": 3, "crops": 3}


# ----------------------------------------------------------------------------- box formats


def _nucls_csv(path: Path, rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["raw_classification,main_classification,super_classification,type,xmin,ymin,xmax,ymax"]
    lines += [f"{raw},m,s,rectangle,{x0},{y0},{x1},{y1}" for raw, x0, y0, x1, y1 in rows]
    path.write_text("\n".join(lines) + "\n")


def test_nucls_boxes_merge_clip_and_skip(tmp_path: Path) -> None:
    image = _image(60, 80)
    _save_png(tmp_path / "QC" / "rgb" / "tile_a.png", image)
    _nucls_csv(tmp_path / "QC" / "csv" / "tile_a.csv", [
        ("tumor", 10, 10, 20, 22), ("mitotic_figure", 30, 30, 40, 40), ("lymphocyte", 50, 5, 60, 15),
        ("apoptotic_body", 5, 40, 15, 50), ("unlabeled", 20, 40, 30, 50), ("fibroblast", 74, 50, 90, 58),
        ("eosinophil", 100, 100, 120, 120)])  # the 6th sticks out on the right, the 7th is outside
    source = CellSource(fmt="nucls", input=tmp_path, size=16, min_window=4)
    assert source.classes == ["tumor", "stromal", "sTILs", "apoptotic", "other"]
    samples, details, errors = _run(source)
    assert not errors
    assert {k: s.meta["class"] for k, s in samples.items()} == {
        "QC_tile_a_0": "tumor", "QC_tile_a_1": "tumor", "QC_tile_a_2": "sTILs", "QC_tile_a_3": "apoptotic",
        "QC_tile_a_5": "stromal"}
    assert details["QC_tile_a"] == {"nuclei": 6, "crops": 5, "clipped": 1, "outside": 1,
                                    "unmapped_types": {"unlabeled": 1}}
    tumor = samples["QC_tile_a_0"]  # window 1x the longer side (12), centred on (15, 16)
    assert tumor.meta["window"] == [9, 10, 12] and tumor.meta["area"] == 120 and tumor.meta["raw_type"] == "tumor"
    assert tumor.meta["centroid"] == [15.0, 16.0]  # box centre: columns 10-19, rows 10-21
    np.testing.assert_array_equal(tumor.image, resize(_expected(image, 9, 10, 12), (16, 16)))
    clipped = samples["QC_tile_a_5"]
    assert clipped.meta["bbox"] == [74, 50, 80, 58] and clipped.meta["window"] == [73, 50, 8]
    np.testing.assert_array_equal(clipped.image, resize(_expected(image, 73, 50, 8), (16, 16)))


def test_nucls_main_classification_column(tmp_path: Path) -> None:
    _save_png(tmp_path / "rgb" / "t.png", _image(30, 30))
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "t.csv").write_text("main_classification,xmin,ymin,xmax,ymax\n"
                                            "tumor_nonMitotic,1,1,9,9\nnonTILnonMQ_stromal,10,10,20,20\n"
                                            "other_nucleus,2,2,5,5\nAMBIGUOUS,3,3,6,6\nlymphocyte,x,1,2,3\n")
    samples, details, _ = _run(CellSource(fmt="nucls", input=tmp_path, size=8))
    assert [s.meta["class"] for s in samples.values()] == ["tumor", "stromal"]
    assert details["t"]["unmapped_types"] == {"ambiguous": 1, "other_nucleus": 1}
    assert details["t"]["unreadable_boxes"] == 1


def test_nucls_without_a_type_column_writes_unlabelled_crops(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    _save_png(tmp_path / "rgb" / "t.png", _image(30, 30))
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "t.csv").write_text("xmin,ymin,xmax,ymax\n1,1,9,9\n10,10,20,20\n")
    with caplog.at_level("WARNING", logger="sslkit.sharding.cells.command"):
        source = CellSource(fmt="nucls", input=tmp_path, size=8)
    assert source.class_map.name == "none" and source.classes is None
    assert "No nucleus types" in caplog.text and "csv/t.csv" in caplog.text and "--class-column" in caplog.text
    assert source.params()["class_map_note"] in caplog.text
    samples, details, _ = _run(source)
    assert sorted(samples) == ["t_0", "t_1"] and details["t"] == {"nuclei": 2, "crops": 2}
    assert all(s.label is None and s.meta["class"] is None for s in samples.values())


def test_voc_boxes_are_one_based(tmp_path: Path) -> None:
    image = _image(40, 40)
    _save_png(tmp_path / "JPEGImages" / "im1.png", image)
    (tmp_path / "Annotations").mkdir()
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                      f"<ymax>{b[3]}</ymax></bndbox></object>"
                      for n, b in [("lymph", (1, 1, 10, 8)), ("tumor", (20, 20, 30, 35)), ("lymph", (41, 41, 50, 50))])
    (tmp_path / "Annotations" / "im1.xml").write_text(f"<annotation><filename>im1.jpg</filename>{objects}</annotation>")
    source = CellSource(fmt="voc", input=tmp_path, size=10, min_window=4)
    assert source.classes == ["lymph", "tumor"] and source.class_map.name == "raw"
    samples, details, _ = _run(source)
    assert list(samples) == ["im1_0", "im1_1"] and details["im1"]["outside"] == 1
    lymph = samples["im1_0"]
    assert lymph.meta["bbox"] == [0, 0, 10, 8] and lymph.meta["window"] == [0, -1, 10] and lymph.label == 0
    assert lymph.meta["centroid"] == [5.0, 4.0]  # 1-based 1..10, 1..8 = 0-based 0..9, 0..7: box centre
    np.testing.assert_array_equal(lymph.image, _expected(image, 0, -1, 10))


def test_labelmap_tiff_png_and_type_tables(tmp_path: Path) -> None:
    image_a, image_b = _image(30, 40), _image(30, 40, 1)
    _save_png(tmp_path / "images" / "a.png", image_a)
    _save_png(tmp_path / "images" / "b.png", image_b)
    (tmp_path / "labels").mkdir()
    inst_a = np.zeros((30, 40), dtype=np.uint32)
    inst_a[2:12, 30:40], inst_a[15:25, 5:15] = 70000, 12  # ids beyond 16 bits
    tifffile.imwrite(tmp_path / "labels" / "a.tif", inst_a)
    inst_b = np.zeros((30, 40), dtype=np.uint16)
    inst_b[0:6, 0:6] = 300
    Image.fromarray(inst_b).save(tmp_path / "labels" / "b_label.png")
    (tmp_path / "types").mkdir()
    (tmp_path / "types" / "a.csv").write_text("id,type\n12,tumour\n70000,immune\n")
    source = CellSource(fmt="labelmap", input=tmp_path, size=10, min_window=4)
    assert source.classes == ["immune", "tumour"]
    samples, details, errors = _run(source)
    assert not errors and sorted(samples) == ["a_12", "a_70000"]
    assert samples["a_70000"].meta["class"] == "immune" and samples["a_12"].label == 1
    assert details["b"] == {"nuclei": 1, "crops": 0, "unmapped_types": {"None": 1}}
    assert samples["a_70000"].meta["window"] == [25, -3, 20]
    np.testing.assert_array_equal(samples["a_70000"].image, resize(_expected(image_a, 25, -3, 20), (10, 10)))
    unlabelled, _, _ = _run(CellSource(fmt="labelmap", input=tmp_path, size=10, class_map="none", min_window=4))
    assert sorted(unlabelled) == ["a_12", "a_70000", "b_300"]
    assert unlabelled["b_300"].meta["window"] == [-3, -3, 12] and unlabelled["b_300"].meta["raw_type"] is None
    np.testing.assert_array_equal(unlabelled["b_300"].image, resize(_expected(image_b, -3, -3, 12), (10, 10)))


# ----------------------------------------------------------------------------- options and class maps


def test_options_and_class_map_errors(tmp_path: Path) -> None:
    _consep_tile(tmp_path, "t", _image(40, 50), _consep_map(), inst_type=np.array([[1], [2], [3]]))
    with pytest.raises(UsageError, match="exclude each other"):
        CellSource(fmt="consep", input=tmp_path, window=10, window_scale=2)
    with pytest.raises(UsageError, match="No class map named 'nope'"):
        CellSource(fmt="consep", input=tmp_path, class_map="nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CellSource(fmt="consep", input=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="No voc images"):
        CellSource(fmt="voc", input=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes:\n  a: [1]\n  b: [1, 2]\n")
    with pytest.raises(ConfigError, match="under two classes"):
        read_class_map(bad)
    custom = tmp_path / "two.yaml"
    custom.write_text("classes:\n  round: [1, 2]\n  long: [3]\n")
    samples, details, _ = _run(CellSource(fmt="consep", input=tmp_path, class_map=str(custom), size=8))
    assert [s.meta["class"] for s in samples.values()] == ["round", "round", "long"]


def test_raw_class_map_orders_numbers_then_names_naturally() -> None:
    assert raw_class_map({"type10", "Type2", 12, 3, "-1", None, "b"}).classes == ["-1", "3", "12", "b", "type2",
                                                                                  "type10"]


def test_packaged_class_maps() -> None:
    from sslkit.sharding.cells.command import CLASSMAPS

    maps = {p.stem: read_class_map(p) for p in CLASSMAPS.glob("*.yaml")}
    assert maps["consep7"].classes == maps["consep4"].classes
    assert [maps["consep7"].index(c) for c in range(8)] == [None, 0, 1, 2, 2, 3, 3, 3]
    assert [maps["consep4"].index(c) for c in range(6)] == [None, 0, 1, 2, 3, None]
    nucls = maps["nucls"]
    raw12 = ["tumor", "mitotic_figure", "fibroblast", "vascular_endothelium", "macrophage", "lymphocyte",
             "plasma_cell", "apoptotic_body", "myoepithelium", "neutrophil", "ductal_epithelium", "eosinophil"]
    assert [nucls.classes[nucls.index(r)] for r in raw12] == [
        "tumor", "tumor", "stromal", "stromal", "stromal", "sTILs", "sTILs", "apoptotic", "other", "other",
        "other", "other"]
    assert nucls.index("unlabeled") is None and nucls.index("AMBIGUOUS") is None
    assert maps["pannuke"].classes == ["neoplastic", "inflammatory", "connective", "dead", "epithelial"]


# ----------------------------------------------------------------------------- real data


def _consep_counts(labels: Path) -> tuple[int, np.ndarray]:
    counts, total = np.zeros(8, dtype=np.int64), 0
    for mat in sorted(labels.glob("*.mat")):
        data = sio.loadmat(mat)
        present = np.unique(data["inst_map"])
        total += int((present > 0).sum())
        counts += np.bincount(data["inst_type"].ravel().astype(int), minlength=8)
    return total, counts


def test_real_consep_one_crop_per_instance() -> None:
    root = SHARED / "consep-tiles"
    if not (root / "Train" / "Labels").is_dir():
        pytest.skip("../shared/data/consep-tiles is not present")
    total, counts = _consep_counts(root / "Train" / "Labels")
    source = CellSource(fmt="consep", input=root)
    assert source.class_map.name == "consep4" and not counts[5:].any()
    units = source.units()
    assert len(units) == 432 and not source.failed
    found = np.zeros(4, dtype=np.int64)
    crops = 0
    for unit in units:
        for sample in source.produce(unit, skip=0, progress=Progress()):
            found[sample.label] += 1
            crops += 1
            assert sample.image.shape == (32, 32, 3)
    assert crops == total == counts[1:5].sum()
    np.testing.assert_array_equal(found, counts[1:5])


# ----------------------------------------------------------------------------- end to end


def test_run_source_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    _consep_tile(data, "t1", _image(40, 50), _consep_map(), inst_type=np.array([[1], [2], [0]]))
    _consep_tile(data, "t2", _image(40, 50, 1), _consep_map())
    sio.savemat(data / "Labels" / "t2.mat", {"type_map": np.zeros((40, 50))})
    source = CellSource(fmt="consep", input=data, size=16)
    summary = run_source(source, tmp_path / "out", workers=1, progress=False, command="test")
    manifest = summary["manifest"]
    assert manifest["num_samples"] == 2 and manifest["classes"]["misc"] == 1
    assert any("inst_map" in f["reason"] for f in manifest["failed"])
    with tarfile.open(tmp_path / "out" / manifest["shards"][0]["name"]) as tar:
        names = sorted(tar.getnames())
        meta = json.loads(tar.extractfile("t1_1.json").read())
    assert names == ["t1_1.cls", "t1_1.json", "t1_1.png", "t1_2.cls", "t1_2.json", "t1_2.png"]
    assert meta["class"] == "misc" and meta["raw_type"] == 1

    parser = argparse.ArgumentParser(prog="sslkit shard")
    add_parser(parser.add_subparsers(dest="source"))
    args = parser.parse_args(["cells", "--format", "consep", "--input", str(data), "--out", str(tmp_path / "cli"),
                              "--window", "20", "--size", "8", "--no-progress", "--workers", "1"])
    with pytest.raises(SystemExit) as stop:  # t2 failed: exit status 3, after the shards and the manifest
        args.fn(args)
    assert stop.value.code == 3
    cli_manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert cli_manifest["num_samples"] == 2 and cli_manifest["params"]["window"] == 20
    assert cli_manifest["image"]["height"] == 8

    from sslkit.cli import main

    main(["shard", "cells", "--format", "consep", "--input", str(data), "--out", str(tmp_path / "main"),
          "--size", "8", "--no-progress", "--workers", "0", "--allow-failures"])
    assert json.loads((tmp_path / "main" / "manifest.json").read_text())["num_samples"] == 2
    with pytest.raises(SystemExit) as stop:
        main(["shard", "cells", "--format", "consep", "--input", str(data), "--out", str(tmp_path / "x"),
              "--class-map", "nope"])
    assert stop.value.code == 2 and "No class map named 'nope'" in capsys.readouterr().err
