"""The slide-classification section of ``sslkit report``: what ``sslkit mil`` wrote to ``RUN/eval/mil/``.

A table of the per-fold scores with their mean, standard deviation, pooled value and the chance
level; the confusion matrix; and the heatmaps and galleries of up to ``REPORT_SLIDES`` slides,
the misclassified ones first (the most confidently wrong first), then the most
confidently right slide of each class. Every heatmap stays in ``eval/mil/heatmaps/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sslkit.report import _esc, _fmt, _image

REPORT_SLIDES = 6
SCORE_NAMES = (("balanced_accuracy", "balanced accuracy"), ("f1", "macro F1"), ("auc", "AUC"),
               ("accuracy", "accuracy"))


def mil_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "eval" / "mil" / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _table(results: dict[str, Any]) -> str:
    heads = "".join(f"<th>{_esc(name)}</th>" for _, name in SCORE_NAMES)
    rows = []
    for r in results["per_fold"]:
        rows.append(f"<tr><td>fold {r['fold'] + 1}</td>" + "".join(f"<td>{_fmt(r[k])}</td>" for k, _ in SCORE_NAMES)
                    + f"<td>{r['test_slides']}</td><td>{r['epochs_run']} ({r['best_epoch']})</td></tr>")
    mean, std = results["mean"], results["std"]
    cells = "".join(f"<td>{_fmt(mean[k])} &plusmn; {_fmt(std[k])}</td>" for k, _ in SCORE_NAMES)
    rows.append(f"<tr class='ours'><td>mean &plusmn; std over folds</td>{cells}<td></td><td></td></tr>")
    pooled = results["pooled"]
    rows.append("<tr><td>pooled (all slides)</td>" + "".join(f"<td>{_fmt(pooled[k])}</td>" for k, _ in SCORE_NAMES)
                + f"<td>{pooled['num_slides']}</td><td></td></tr>")
    chance = results["chance"]
    rows.append("<tr class='paper'><td>chance</td>" + "".join(f"<td>{_fmt(chance.get(k))}</td>" for k, _ in SCORE_NAMES)
                + "<td></td><td></td></tr>")
    return (f"<table id='mil'><thead><tr><th></th>{heads}<th>test slides</th><th>epochs (best)</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _chosen(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The slides whose heatmaps the report shows (see the module notes)."""
    drawn = results.get("heatmaps", [])
    wrong = sorted((h for h in drawn if h["predicted"] != h["label"]), key=lambda h: -h["probability"])
    right = {}
    for h in sorted((h for h in drawn if h["predicted"] == h["label"]), key=lambda h: -h["probability"]):
        right.setdefault(h["label"], h)
    return (wrong + list(right.values()))[:REPORT_SLIDES]


def _heatmaps(out: Path, results: dict[str, Any]) -> str:
    chosen = _chosen(results)
    if not chosen:
        return ""
    parts = [f"<h3>Attention heatmaps</h3><p class='note'>{len(chosen)} of the {len(results['heatmaps'])} slides "
             "drawn (misclassified first, then the most confident right slide of each class); all are in "
             "eval/mil/heatmaps/ and eval/mil/galleries/. Colours: each tile's attention rank within its slide, from "
             "the fold model that did not train on the slide's patient.</p>"]
    for h in chosen:
        for key, what in (("heatmap", "attention over the slide"), ("gallery", "the most attended tiles")):
            if h.get(key) and (out / h[key]).is_file():
                parts.append(f"<figure id='mil-{key}-{_esc(h['slide_id'])}'><img alt='{_esc(what)}' "
                             f"src='{_image(out / h[key])}'><figcaption><b>{_esc(h['slide_id'])}</b>: {what}; true "
                             f"{_esc(h['label'])}, predicted {_esc(h['predicted'])} (p = {h['probability']:.2f}); "
                             f"thumbnail: {_esc(h['thumbnail'])}.</figcaption></figure>")
    return "".join(parts)


def mil_section(run_dir: Path) -> str:
    """The HTML section, or "" when the run has no ``eval/mil/metrics.json``."""
    results = mil_metrics(run_dir)
    if results is None:
        return ""
    out = Path(run_dir) / "eval" / "mil"
    notes = [f"{row['slide_id']} (line {row['line']}): {row['reason']}" for row in results.get("skipped", [])]
    skipped = f"<p class='note'>Rows left out (mil.missing_bags=skip): {_esc('; '.join(notes))}.</p>" if notes else ""
    figures = "".join(f"<figure id='fig-{_esc(f['name'])}'><img alt='{_esc(f['title'])}' "
                      f"src='{_image(out / f['file'])}'><figcaption><b>{_esc(f['title'])}.</b> "
                      f"{_esc(f.get('caption', ''))}</figcaption></figure>"
                      for f in results.get("figures", []) if (out / f["file"]).is_file())
    encoders = ", ".join(results.get("encoders", [])) or "not recorded"
    return (f"<h2>Slide classification (attention-MIL)</h2><p class='sub'>{_esc(results['model'])}; "
            f"{results['folds']}-fold cross-validation grouped by patient on {results['num_slides']} slides of "
            f"{results['num_patients']} patients ({_esc(results['grouping'])}); classes "
            f"{_esc(', '.join(results['classes']))}; bags from {_esc(results['features'])} "
            f"({results['feature_dim']} features per tile; encoder {_esc(encoders)}).</p>"
            + _table(results) + "<p class='note'>Each slide is predicted once, by the model of the fold that held "
            "its patient out; mean &plusmn; sample standard deviation over the folds, and the scores of all "
            "out-of-fold predictions pooled. Balanced accuracy: mean recall over classes; AUC: one-vs-rest, "
            "macro (two classes: the AUC of the second class).</p>" + skipped + figures + _heatmaps(out, results))


__all__ = ["REPORT_SLIDES", "mil_metrics", "mil_section"]
