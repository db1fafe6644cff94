"""``sslkit demo --slides``: the slide path on a generated collection, in minutes on a laptop CPU.

1. the encoder: the crop demo's run (``runs/demo``, pretrained as ``sslkit demo`` pretrains it,
   resumed, so nothing is redone once it is finished);
2. the synthetic slide collection ``slides-demo/`` (``sslkit make-slides``) unless it is there:
   24 slides of 12 patients, half of them with a planted region rich in inflammatory nuclei;
3. feature bags in ``bags/demo-slides/``: every tissue tile of 64 x 64 pixels at 0.5 um/px, fed to
   the encoder at that size (the scale its 32-pixel training crops had), as
   ``sslkit extract runs/demo --slides slides-demo/slides --mpp 0.5 --tile 64 --input-size 64`` does;
4. attention-MIL, 5-fold cross-validation grouped by patient (``configs/mil.yaml`` with the
   small-cohort settings below), heatmaps over the thumbnails, in ``runs/demo-slides/eval/mil/``;
5. the HTML report ``runs/demo-slides/report.html``.

Each step is skipped when its output is already there (the bags are resumed slide by slide), so a
second run only trains the MIL model again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from sslkit.config import load_mil_config, recipe_path, run_dir
from sslkit.demo import DEMO_SPLITS, pretrain_demo

MIL_SETTINGS = ["mil.lr=1e-3", "mil.epochs=40", "mil.patience=15"]  # a 24-slide cohort: docs/slides.md


def ensure_collection(root: Path, *, num_slides: int = 24, seed: int = 0) -> None:
    """``root/slides`` and ``root/labels.csv`` from ``make_slide_collection`` unless both are there."""
    from sslkit.slides.synthetic import make_slide_collection

    if (root / "labels.csv").is_file() and (root / "slides").is_dir():
        return
    print(f"Making the synthetic slide collection in {root} ({num_slides} slides, seed {seed}) ...")
    make_slide_collection(root, num_slides=num_slides, seed=seed)


def run_slide_demo(*, shards: Path = Path("shards/demo"), slides: Path = Path("slides-demo"),
                   bags: Path = Path("bags/demo-slides"), encoder_overrides: list[str] | tuple[str, ...] = (),
                   mil_overrides: list[str] | tuple[str, ...] = (), num_slides: int = 24,
                   splits: dict[str, dict[str, int]] = DEMO_SPLITS, run: Optional[Path] = None) -> dict[str, Any]:
    """Steps 1-5 of the module notes; returns what ``RUN/eval/mil/metrics.json`` holds. ``run``: the
    MIL run directory (default ``runs/demo-slides``)."""
    from sslkit.report import write_report
    from sslkit.slides.encoders import load_encoder
    from sslkit.slides.extract import describe, extract_bags
    from sslkit.slides.mil import format_table, run_mil
    from sslkit.slides.tiles import SlideFiles

    encoder_dir = pretrain_demo(shards=shards, overrides=encoder_overrides, splits=splits)
    ensure_collection(slides, num_slides=num_slides)
    encoder = load_encoder(str(encoder_dir), input_size=64)
    source = SlideFiles([str(slides / "slides")], mpp=0.5, tile=64, min_tissue=0.5)
    summary = extract_bags(encoder, source, bags)
    print(describe(summary, bags))
    cfg = load_mil_config(recipe_path("mil"), [f"mil.features={bags}", f"mil.labels={slides / 'labels.csv'}",
                                               f"mil.slides={slides / 'slides'}", "run.name=demo-slides",
                                               *MIL_SETTINGS, *([f"run.dir={run}"] if run else []), *mil_overrides])
    results = run_mil(cfg)
    print()
    print(format_table(results))
    out = run_dir(cfg)
    report = write_report(out)
    print(f"\nBags: {bags}; MIL results: {out / 'eval' / 'mil'} (metrics.json, predictions.csv, heatmaps/)")
    print(f"Report: {report} (open it in a browser)")
    return results
