"""`sslkit report`: one self-contained HTML page, checked in headless Chromium (every image loads,
the metrics table is there) with its screenshot kept in test-artifacts/."""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from chromium import needs_chromium, render_and_check
from PIL import Image

from sslkit.cli import main
from sslkit.report import write_report

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
def _png(path: Path, colour) -> None:
    Image.fromarray(np.full((40, 60, 3), colour, np.uint8)).save(path)


def _fake_run(root: Path, *, method="ccrl") -> Path:
    """A run directory as `sslkit evaluate` leaves it, with made-up numbers."""
    (root / "eval").mkdir(parents=True)
    (root / "config.yaml").write_text(f"# git: abc1234\nrun:\n  name: fake\nmethod:\n  name: {method}\n")
    block = {"cluster": {"ami": 0.31, "ari": 0.22, "nmi": 0.33, "purity": 0.6, "acc": 0.55, "f1": 0.5, "k": 4},
             "knn": {"top1": 0.7, "k": 20},
             "probe": {"accuracy": 0.8, "precision": 0.79, "sensitivity": 0.78, "specificity": 0.93, "f1": 0.78,
                       "auc": 0.95, "protocol": "train split", "train_samples": 100}}
    metrics = {**block, "method": method.upper(), "encoder": "momentum", "step": 300, "num_samples": 96,
               "shards": "shards/x/eval", "classes": ["a", "b", "c", "d"],
               "baselines": {"raw_pixels": block, "random_init": block},
               "figures": [{"name": "one", "file": "one.png", "title": "First", "caption": "red"},
                           {"name": "two", "file": "two.png", "title": "Second", "caption": "blue"}]}
    (root / "eval" / "metrics.json").write_text(json.dumps(metrics))
    _png(root / "eval" / "one.png", (255, 0, 0))
    _png(root / "eval" / "two.png", (0, 0, 255))
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 100, "lr": 1e-3,
                                                            "pairs_per_s": 100.0}) + "\n" for s in (10, 20, 30)))
    return root


def test_report_is_self_contained(tmp_path):
    run = _fake_run(tmp_path / "run")
    page = write_report(run).read_text()
    # No reference leaves the file: every image is inline, no scripts, styles or fonts fetched.
    assert not re.search(r"""(src|href)=['"](?!data:)""", page)
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 3  # two figures + the training curves the report drew itself
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    # The metrics table: the run, both baselines and the CCRL paper's two rows, numbers formatted.
    table = page[page.index("<table id='metrics'>"):page.index("</table>")]
    assert table.count("<tr class=") == 5 and "CCRL paper, CoNSeP" in table and "0.242" in table
    assert "0.310" in table and "raw pixels" in table and "# git: abc1234" not in table
    assert "git abc1234" in page and "train split" in page


def _fake_mil(run: Path) -> None:
    """What `sslkit mil` leaves in RUN/eval/mil, with made-up numbers: two folds, four heatmaps."""
    out = run / "eval" / "mil"
    (out / "heatmaps").mkdir(parents=True)
    scores = {"balanced_accuracy": 0.75, "f1": 0.7, "auc": 0.8, "accuracy": 0.75}
    drawn = [("right-a", "a", "a", 0.9), ("wrong", "a", "b", 0.8), ("right-b", "b", "b", 0.7),
             ("right-a2", "a", "a", 0.6)]
    folds = [{"fold": k, **scores, "test_slides": 4, "epochs_run": 20, "best_epoch": 12} for k in (0, 1)]
    metrics = {"model": "gated attention-MIL", "folds": 2, "num_slides": 8, "num_patients": 4, "grouping": "by patient",
               "classes": ["a", "b"], "features": "bags/x", "feature_dim": 16, "encoders": ["enc"], "per_fold": folds,
               "mean": scores, "std": {key: 0.01 for key in scores}, "pooled": {**scores, "num_slides": 8},
               "chance": {"balanced_accuracy": 0.5, "accuracy": 0.5, "auc": 0.5}, "skipped": [],
               "figures": [{"name": "mil_confusion", "file": "confusion.png", "title": "Confusion", "caption": "c"}],
               "heatmaps": [{"slide_id": s, "label": y, "predicted": p, "probability": q,
                             "heatmap": f"heatmaps/{s}.png", "gallery": None, "thumbnail": "blank"}
                            for s, y, p, q in drawn]}
    (out / "metrics.json").write_text(json.dumps(metrics))
    for name in ["confusion", *(f"heatmaps/{s}" for s, *_ in drawn)]:
        _png(out / f"{name}.png", (0, 128, 0))


def test_report_adds_slide_classification_to_an_evaluated_run(tmp_path):
    run = _fake_run(tmp_path / "run")
    _fake_mil(run)
    page = write_report(run).read_text()
    assert page.count("<tr class=") == 5 + 2  # the metrics table as before; mean and chance rows of the MIL table
    table = page[page.index("<table id='mil'>"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + 2 + 1 and "0.750 &plusmn; 0.010" in table  # header, folds, pooled
    # misclassified first, then the most confident right slide of each class; the rest stay on disk
    shown = [page.index(f"id='mil-heatmap-{s}'") for s in ("wrong", "right-a", "right-b")]
    assert shown == sorted(shown) and "mil-heatmap-right-a2" not in page
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 3 + 1 + 3


def test_report_of_a_slide_classification_run_alone(tmp_path):
    run = tmp_path / "run"
    _fake_mil(run)
    page = write_report(run).read_text()
    assert "<table id='metrics'>" not in page and "<table id='mil'>" in page


def test_report_without_evaluation_names_the_fix(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as err:
        main(["report", str(tmp_path / "run")])
    assert err.value.code == 2
    assert "sslkit evaluate" in capsys.readouterr().err


def test_report_renders_in_chromium(tmp_path):
    needs_chromium()
    run = _fake_run(tmp_path / "run")
    render_and_check(write_report(run), expect_images=3, screenshot=ARTIFACTS / "report-fake.png")
