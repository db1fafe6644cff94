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
