"""`sslkit mil`: gated attention-MIL on feature bags written here with h5py in the bag layout
(features N x D, coords N x 2 level-0 pixels, attributes on the file and on coords).

The label of a slide is carried by a few planted tiles among noise tiles: class 0 has none, class c > 0
has PLANTED tiles shifted by SHIFT along a direction of its own. A model that pools the tiles evenly
sees a 0.3-sigma difference; one that attends to the planted tiles sees 5 sigma."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy.stats import binom
from sklearn import metrics as skm

from sslkit.cli import main
from sslkit.config import ConfigError, load_config, load_mil_config, recipe_path
from sslkit.slides import heatmaps
from sslkit.slides.mil import format_table, run_mil
from sslkit.slides.mil_data import patient_folds, read_cohort, validation_split
from sslkit.slides.mil_metrics import slide_metrics
from sslkit.slides.mil_report import _chosen

DIM, SHIFT, PLANTED, PATCH = 16, 5.0, 4, 128
PINK, GREEN = (205, 110, 170), (40, 170, 60)  # tissue, and the planted tiles in the slide images


def write_bag(path: Path, feats: np.ndarray, coords: np.ndarray, **attrs) -> Path:
    """A bag as `sslkit extract` writes it; attributes on the file and on coords."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float32))
        f.create_dataset("coords", data=coords.astype(np.int64))
        for target in (f, f["coords"]):
            target.attrs.update({"patch_size": 64, "patch_size_level0": PATCH, "target_mpp": 0.5, "level0_mpp": 0.25,
                                 "encoder": "test-encoder", "feature_kind": "backbone", **attrs})
    return path


def write_slide(path: Path, coords: np.ndarray, planted: set[int]) -> Path:
    """A tiled two-level TIFF at 0.25 um/px: tissue pink, the planted tiles green, the rest white."""
    w, h = int(coords[:, 0].max()) + PATCH, int(coords[:, 1].max()) + PATCH
    img = np.full((h, w, 3), 255, np.uint8)
    for i, (x, y) in enumerate(coords):
        img[y:y + PATCH, x:x + PATCH] = GREEN if i in planted else PINK
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate((img, img[::4, ::4])):
            tif.write(np.ascontiguousarray(level), tile=(128, 128), photometric="rgb", compression="zlib",
                      subfiletype=1 if k else 0, resolution=(1e4 / (0.25 * 4 ** k),) * 2, resolutionunit="CENTIMETER",
                      metadata=None)
    return path


def make_cohort(root: Path, *, classes: int = 3, per_class: int = 10, slides_for: int = 0, seed: int = 0) -> dict:
    """Bags of ``classes`` x ``per_class`` slides, two slides per patient (same label), labels.csv; a slide file
    for the first ``slides_for`` slides. Returns the paths and the planted tiles of every slide."""
    rng = np.random.default_rng(seed)
    bags, slides = root / "bags", root / "slides"
    bags.mkdir(parents=True)
    slides.mkdir()
    directions = rng.normal(size=(classes, DIM))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rows, planted = ["slide_id,label,patient"], {}
    for s in range(classes * per_class):
        label, slide = s // per_class, f"slide-{s:03d}"
        n = int(rng.integers(40, 81))
        feats = rng.normal(size=(n, DIM))
        chosen = rng.choice(n, PLANTED, replace=False) if label else np.zeros(0, int)
        feats[chosen] += SHIFT * directions[label]
        side = int(np.ceil(np.sqrt(n)))
        coords = np.array([((i % side) * PATCH, (i // side) * PATCH) for i in range(n)])
        slide_path = slides / f"{slide}.tif"
        if s < slides_for:
            write_slide(slide_path, coords, set(chosen.tolist()))
        write_bag(bags / f"{slide}.h5", feats, coords, slide_id=slide, slide_path=str(slide_path))
        rows.append(f"{slide},{['normal', 'tumour', 'inflamed'][label]},patient-{s // 2:03d}")
        planted[slide] = set(chosen.tolist())
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"bags": bags, "labels": root / "labels.csv", "slides": slides, "planted": planted, "root": root}


def mil_config(cohort: dict, run: Path, *extra: str):
    return load_mil_config(recipe_path("mil"), [f"mil.features={cohort['bags']}", f"mil.labels={cohort['labels']}",
                                                f"run.dir={run}", *extra])


FAST = ("mil.folds=3", "mil.epochs=15", "mil.patience=15", "mil.lr=5e-3", "mil.hidden=32", "mil.attention_dim=32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, dict, Path]:
    """One cross-validated run on 30 slides of 3 classes (15 patients), heatmaps off (drawn in their own tests)."""
    cohort = make_cohort(tmp_path_factory.mktemp("cohort"))
    run = cohort["root"] / "run"
    return cohort, run_mil(mil_config(cohort, run, *FAST, "mil.heatmaps=false")), run


# ---------------------------------------------------------------- learning and attention


def test_abmil_beats_chance_by_a_binomial_margin(trained):
    """Out-of-fold predictions of all 30 slides: more correct than the 99.9 % quantile of the number a
    classifier at the majority rate (1/3) would get, under Binomial(30, 1/3): 18, so at least 19 right."""
    _, results, _ = trained
    n = results["num_slides"]
    correct = round(results["pooled"]["accuracy"] * n)
    bound = binom.ppf(0.999, n, results["chance"]["accuracy"])
    assert n == 30 and correct > bound, (correct, bound, format_table(results))
    assert results["pooled"]["auc"] > 0.9 and results["mean"]["balanced_accuracy"] > 0.8


def test_the_most_attended_tile_is_a_planted_one_more_often_than_chance(trained):
    """For the 20 slides with planted tiles, the most attended tile is one of the 4 planted ones. A
    tile drawn at random is planted with probability 4/N <= 4/40 = 0.1; under Binomial(20, 0.1) the
    99.9 % quantile is 7 hits, and the run must do better."""
    cohort, results, run = trained
    npz = np.load(run / "eval" / "mil" / "attention.npz")
    offsets, hits, chances = npz["offsets"], 0, []
    for i, slide in enumerate(npz["slide_ids"]):
        planted = cohort["planted"][str(slide)]
        if not planted:
            continue
        a = npz["attention"][offsets[i]:offsets[i + 1]]
        assert a.sum() == pytest.approx(1.0, abs=1e-4)
        hits += int(a.argmax()) in planted
        chances.append(len(planted) / len(a))
    assert len(chances) == 20 and max(chances) <= 0.1
    assert hits > binom.ppf(0.999, len(chances), max(chances)), hits


def test_a_run_repeats_exactly_with_its_seed_and_differs_with_another(tmp_path):
    cohort = make_cohort(tmp_path, classes=2, per_class=4)
    runs = [run_mil(mil_config(cohort, tmp_path / f"run{i}", "mil.folds=2", "mil.epochs=4", "mil.heatmaps=false",
                               f"run.seed={seed}")) for i, seed in enumerate((0, 0, 1))]
    histories = [[f["history"] for f in r["per_fold"]] for r in runs]
    assert histories[0] == histories[1] and runs[0]["pooled"] == runs[1]["pooled"]
    assert histories[0] != histories[2]
    same = [(tmp_path / f"run{i}" / "eval" / "mil" / "predictions.csv").read_text() for i in (0, 1)]
    assert same[0] == same[1]


# ---------------------------------------------------------------- folds


@pytest.mark.parametrize("seed", range(5))
def test_folds_never_split_a_patient(seed):
    """Random cohorts, patients with one to four slides and mixed labels: every slide is tested once, a
    patient's slides share one test fold, and the validation patients are neither tested nor fitted on."""
    rng = np.random.default_rng(seed)
    patients = [f"p{p}" for p in range(40) for _ in range(rng.integers(1, 5))]
    labels = rng.integers(0, 3, size=len(patients))
    folds = patient_folds(labels, patients, folds=5, seed=seed)
    assert set(folds) == set(range(5))
    by_patient = {}
    for patient, fold in zip(patients, folds):
        by_patient.setdefault(patient, set()).add(int(fold))
    assert all(len(f) == 1 for f in by_patient.values())
    for k in range(5):
        train = np.flatnonzero(folds != k)
        fit, val = validation_split(train, labels, patients, share=0.2, seed=seed)
        named = [{patients[i] for i in part} for part in (fit, val, np.flatnonzero(folds == k))]
        assert len(val) and not (named[0] & named[1]) and not (named[1] & named[2]) and not (named[0] & named[2])
        assert sorted([*fit, *val]) == sorted(train)


def test_the_run_tests_each_patient_in_one_fold(trained):
    _, results, run = trained
    rows = list(csv.DictReader(io.StringIO((run / "eval" / "mil" / "predictions.csv").read_text())))
    assert len(rows) == 30
    folds = {}
    for row in rows:
        folds.setdefault(row["patient"], set()).add(row["fold"])
    assert len(folds) == 15 and all(len(f) == 1 for f in folds.values())
    assert sum(r["test_slides"] for r in results["per_fold"]) == 30
    assert results["classes"] == ["inflamed", "normal", "tumour"]  # sorted names; index = position


# ---------------------------------------------------------------- metrics


def test_metrics_agree_with_sklearn_and_a_hand_made_confusion_matrix():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    probs = np.array([[.7, .2, .1], [.5, .4, .1], [.2, .3, .5], [.1, .8, .1], [.3, .6, .1], [.6, .3, .1],
                      [.1, .1, .8], [.2, .2, .6], [.1, .5, .4], [.3, .3, .4]])
    got = slide_metrics(labels, probs)
    pred = probs.argmax(1)
    assert got["confusion_matrix"] == [[2, 0, 1], [1, 2, 0], [0, 1, 3]]
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    assert got["f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    assert got["auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert got["accuracy"] == pytest.approx(0.7)
    # binary, with tied scores: the AUC of class 1 (ties count half)
    y, p1 = np.array([0, 0, 0, 1, 1, 1, 1]), np.array([.1, .4, .6, .4, .7, .9, .6])
    binary = slide_metrics(y, np.stack([1 - p1, p1], axis=1))
    assert binary["auc"] == pytest.approx(skm.roc_auc_score(y, p1)) and binary["auc"] == pytest.approx(10 / 12)
    assert binary["f1"] == pytest.approx(skm.f1_score(y, (p1 > 0.5).astype(int), average="macro"))


# ---------------------------------------------------------------- bad rows, bad config


@pytest.fixture()
def small(tmp_path) -> dict:
    return make_cohort(tmp_path, classes=2, per_class=4)


def _labels(cohort: dict, text: str, *overrides: str):
    cohort["labels"].write_text(text)
    return mil_config(cohort, cohort["root"] / "run", "mil.folds=2", *overrides).mil


@pytest.mark.parametrize("text, expected", [
    ("slide_id,label,patient\nslide-000,normal,a\nslide-001,normal,b\nslide-999,tumour,c\n",
     r"1 unusable row \(line 4: slide 'slide-999' has no bag slide-999.h5 in '.*bags'\); extract those slides"),
    ("slide_id,label,patient\nslide-000,normal,a\nslide-001,,b\nslide-004, ,c\n",
     r"2 unusable rows \(line 3: empty label; line 4: empty label\)"),
    ("slide_id,label,patient\nslide-000,normal,a\nslide-001,normal,b\nslide-004,tumour,c\nslide-000,tumour,d\n",
     r"line 2: slide 'slide-000' is listed 2 times \(lines 2, 5\)"),
    ("slide_id,label,patient\nslide-000,normal,\n,tumour,b\n", r"line 2: empty patient; line 3: empty slide id"),
])
def test_bad_rows_are_named_with_their_lines(small, text, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        read_cohort(_labels(small, text))
    assert str(err.value).startswith(f"Labels file '{small['labels']}' (mil.labels) has ")
    assert "\n" not in str(err.value)


def test_skipped_rows_and_unlabelled_bags_are_listed(small, tmp_path):
    text = ("slide_id,label,patient\n" + "".join(f"slide-00{i},{'normal' if i < 4 else 'tumour'},p{i}\n"
                                                  for i in (0, 1, 2, 4, 5, 6)) + "gone,tumour,p9\n")
    mil = _labels(small, text + "empty,tumour,p10\n", "mil.missing_bags=skip")
    write_bag(small["bags"] / "empty.h5", np.zeros((0, DIM)), np.zeros((0, 2)))  # a slide without tissue
    write_bag(small["bags"] / ".slide-008.tmp-99.h5", np.zeros((1, DIM)), np.zeros((1, 2)))  # one being written
    cohort = read_cohort(mil)
    assert cohort.skipped[0] == {"line": 8, "slide_id": "gone",
                                 "reason": f"slide 'gone' has no bag gone.h5 in '{small['bags']}'"}
    assert cohort.skipped[1]["line"] == 9 and "holds no tiles" in cohort.skipped[1]["reason"]
    assert cohort.unlabelled == ["slide-003", "slide-007"] and len(cohort.slides) == 6
    assert cohort.grouping == "patients from column 'patient'"


def test_class_and_column_faults_are_one_sentence(small):
    few = "slide_id,label,patient\nslide-000,normal,a\nslide-001,normal,a\nslide-004,tumour,c\nslide-005,tumour,d\n"
    with pytest.raises(ConfigError, match=r"Class 'normal' has 1 patient \(2 slides\) but mil.folds is 2"):
        read_cohort(_labels(small, few))
    with pytest.raises(ConfigError, match=r"no column 'diagnosis' \(mil.label_column\); its columns are slide_id, "
                                          r"label, patient"):
        read_cohort(_labels(small, "slide_id,label,patient\nslide-000,normal,a\n", "mil.label_column=diagnosis"))
    mil = _labels(small, "")
    small["labels"].write_bytes("slide_id,label\nslide-000,tumeur-caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"\(mil.labels\) is not UTF-8 text; save it as UTF-8 CSV.$"):
        read_cohort(mil)
    # the default patient column may be absent: each slide is then its own patient, and the run says so
    no_patient = "slide_id,label\nslide-000,normal\nslide-001,normal\nslide-004,tumour\nslide-005,tumour\n"
    cohort = read_cohort(_labels(small, no_patient))
    assert cohort.patients == cohort.slides and "no 'patient' column" in cohort.grouping


@pytest.mark.parametrize("override, message", [
    ("mil.folds=1", r"Config key 'mil.folds' must be in \[2, inf\), got 1 \(set by override 'mil.folds=1'\)."),
    ("mil.val_share=0.7", r"Config key 'mil.val_share' must be in \[0, 0.5\], got 0.7"),
    ("mil.dropout=1", r"Config key 'mil.dropout' must be in \[0, 1\), got 1"),
    ("mil.fold=3", r"Unknown config key 'mil.fold' in override 'mil.fold=3'; did you mean 'mil.folds'\?"),
    ("mil.device=tpu", r"Config key 'mil.device' is 'tpu'; choose one of auto, cpu, cuda"),
    ("mil.epochs=many", r"Config key 'mil.epochs' in override 'mil.epochs=many' must be a whole number"),
])
def test_the_mil_section_is_validated_like_the_others(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(recipe_path("mil"), [override])


def test_mil_inputs_are_checked_before_any_work(small, tmp_path):
    with pytest.raises(ConfigError, match=r"Config key 'mil.features' is '.*nowhere', which does not exist; give a "
                                          r"folder that exists \(set by override 'mil.features="):
        load_mil_config(recipe_path("mil"), [f"mil.features={tmp_path / 'nowhere'}", f"mil.labels={small['labels']}"])
    with pytest.raises(ConfigError, match=r"Config key 'mil.labels' is not set"):
        load_mil_config(None, [f"mil.features={small['bags']}"])


# ---------------------------------------------------------------- heatmaps


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _share_near(image: np.ndarray, colour, tol: int = 12) -> float:
    return float((np.abs(image.astype(int) - colour).max(axis=2) <= tol).mean())


def test_heatmap_over_the_slide_and_gallery_of_its_planted_tiles(tmp_path):
    """Attention all but on the planted tiles: the heatmap shows the slide's own colours (pink tissue, green
    planted tiles) at its fixed size, the attention colours over them, and the gallery the green tiles first."""
    cohort = make_cohort(tmp_path, classes=2, per_class=1, slides_for=2)
    slide = "slide-001"
    with h5py.File(cohort["bags"] / f"{slide}.h5") as f:
        coords, attrs = f["coords"][()], dict(f.attrs)
    planted = sorted(cohort["planted"][slide])
    attention = np.full(len(coords), 1e-3)
    attention[planted] = 1.0
    attention /= attention.sum()
    out = tmp_path / "out"
    record = heatmaps.draw_slide(out, slide, coords=coords, attrs=attrs, attention=attention, title="t",
                                 slides_dir=None, top_tiles=len(planted))  # the file the bag's slide_path names
    assert record["thumbnail"] == str(cohort["slides"] / f"{slide}.tif")
    image = _png(out / record["heatmap"])
    assert image.shape == (round(heatmaps.HEATMAP_INCHES[1] * 150), round(heatmaps.HEATMAP_INCHES[0] * 150), 3)
    assert _share_near(image, PINK) > 0.05 and _share_near(image, GREEN) > 0.001  # the thumbnail, left
    rank = (len(coords) - (len(planted) - 1) / 2) / len(coords)  # the planted tiles tie: their mean rank
    top_colour = np.array(heatmaps.colormaps[heatmaps.CMAP](rank)[:3]) * 255
    assert _share_near(image, (1 - heatmaps.ALPHA) * np.array(GREEN) + heatmaps.ALPHA * top_colour, 3) > 0.001
    gallery = _png(out / record["gallery"])
    assert _share_near(gallery, GREEN) > 0.3 and _share_near(gallery, PINK) < 0.01  # every tile shown is planted


def test_rank_heat_paints_each_tile_with_its_rank():
    coords = np.array([[0, 0], [100, 0], [0, 100], [100, 100]])
    heat = heatmaps.rank_heat(np.array([0.1, 0.4, 0.2, 0.3]), coords, 100, (20, 20), 0.1)
    assert heat[5, 5] == 0.25 and heat[5, 15] == 1.0 and heat[15, 5] == 0.5 and heat[15, 15] == 0.75


# ---------------------------------------------------------------- the command and the report


def test_sslkit_mil_end_to_end_then_report(tmp_path, capsys):
    """The command on 8 slides (two with slide files), then `sslkit report` on the MIL-only run directory."""
    cohort = make_cohort(tmp_path, classes=2, per_class=4, slides_for=2)
    run = tmp_path / "runs" / "mil-e2e"
    main(["mil", "mil", f"mil.features={cohort['bags']}", f"mil.labels={cohort['labels']}", f"run.dir={run}",
          "mil.folds=2", "mil.epochs=3", "mil.top_tiles=4", f"mil.slides={cohort['slides']}"])
    printed = capsys.readouterr().out
    assert "2-fold cross-validation grouped by patient: 8 slides of 4 patients" in printed
    out = run / "eval" / "mil"
    for name in ("metrics.json", "predictions.csv", "attention.npz", "confusion.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert (run / "config.yaml").read_text() == (out / "config.yaml").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_fold"]) == 2 and metrics["classes"] == ["normal", "tumour"]
    assert sum(np.array(f["confusion_matrix"]) for f in metrics["per_fold"]).tolist() == metrics["confusion_matrix"]
    drawn = {h["slide_id"]: h for h in metrics["heatmaps"]}
    assert len(drawn) == 8 and all((out / h["heatmap"]).is_file() for h in drawn.values())
    assert drawn["slide-000"]["gallery"] and drawn["slide-005"]["gallery"] is None
    # without its slide file a heatmap is drawn on a blank canvas the size of the tiles' extent, tiles in grey
    assert drawn["slide-005"]["thumbnail"].startswith("blank (no file of slide 'slide-005'")
    blank = _png(out / drawn["slide-005"]["heatmap"])
    assert blank.shape[:2] == (1050, 1950) and _share_near(blank, (heatmaps.TILE_GREY,) * 3, 2) > 0.05
    assert len(np.unique(blank.reshape(-1, 3), axis=0)) > 200  # the attention colours, right
    main(["report", str(run)])
    page = (run / "report.html").read_text()
    assert "<table id='mil'>" in page and "Slide classification" in page and "chance" in page
    shown = _chosen(metrics)
    assert shown and all(f"id='mil-heatmap-{h['slide_id']}'" in page for h in shown)
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 1 + len(shown) + sum(bool(h["gallery"]) for h in shown)  # the confusion matrix too


def test_the_command_names_a_missing_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["mil", "mil", f"mil.features={tmp_path}", "mil.labels=none.csv"])
    assert err.value.code == 2
    assert capsys.readouterr().err == ("sslkit: error: Config key 'mil.labels' is 'none.csv', which does not exist; "
                                       "give a file that exists (set by override 'mil.labels=none.csv').\n")
    assert not (tmp_path / "runs").exists()
