"""``sslkit mil CONFIG``: slide classification with gated attention-MIL on per-slide feature bags.

    cfg = load_mil_config(recipe_path("mil"), ["mil.features=bags/demo", "mil.labels=slides/labels.csv"])
    results = run_mil(cfg)            # RUN/eval/mil/metrics.json, predictions.csv, heatmaps, ...
    print(format_table(results))

The slides of the labels CSV (``sslkit.slides.mil_data``) are split into ``mil.folds`` folds of
whole patients, stratified by label. For each fold an ABMIL model (``sslkit.slides.mil_model``) is
trained on the other folds, early-stopped on a validation share of their patients, and predicts
the fold's slides: every slide is predicted once, by the one model that never saw it or its
patient. Scores (``sslkit.slides.mil_metrics``) are reported per fold, as mean and standard
deviation over the folds, and pooled over all slides. The run directory is ``runs/<run.name>``
(or ``run.dir``); ``sslkit report RUN`` shows what is written to ``RUN/eval/mil/``:

    config.yaml       the resolved config (also RUN/config.yaml when the run directory has none)
    metrics.json      classes, folds, per-fold scores, mean, std, pooled, confusion matrices, chance
                      levels, skipped rows, unlabelled bags, settings, timings, figures, heatmaps
    predictions.csv   one row per slide: fold, label, prediction, class probabilities, attention summary
    attention.npz     every slide's attention weights and tile coordinates (slide_ids, offsets, attention, coords)
    confusion.png     the confusion matrix summed over the folds
    heatmaps/, galleries/  per slide: attention over the thumbnail, the most attended tiles
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sslkit.atomic import replacing, write_json, write_text
from sslkit.config import Config, ConfigError, MilConfig, git_sha, run_dir, to_dict, to_yaml
from sslkit.slides.mil_data import Bags, Cohort, patient_folds, read_cohort, validation_split
from sslkit.slides.mil_metrics import SCORES, slide_metrics, summarize
from sslkit.slides.mil_model import predict, train_fold

MODEL = "gated attention-MIL (ABMIL, Ilse et al. 2018)"


def _device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("Config key 'mil.device' is 'cuda' but no GPU is visible; set mil.device=auto or cpu.")
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def fold_seed(seed: int, fold: int) -> int:
    """The seed of fold ``fold``'s validation split and model: independent streams per (seed, fold)."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def _cross_validate(cohort: Cohort, bags: Bags, folds: np.ndarray, cfg: Config, device: str
                    ) -> tuple[np.ndarray, list[np.ndarray], list[dict[str, Any]]]:
    """Out-of-fold probabilities (S, K), attention per slide, and one record per fold."""
    mil, labels, k = cfg.mil, cohort.labels, len(cohort.classes)
    probs, attention, records = np.zeros((len(labels), k)), [np.zeros(0)] * len(labels), []
    for fold in range(mil.folds):
        test, train = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
        seed = fold_seed(cfg.run.seed, fold)
        fit, val = validation_split(train, labels, cohort.patients, share=mil.val_share, seed=seed)
        model, info = train_fold(bags.features, fit, val, labels, dim=cohort.dim, num_classes=k, mil=mil, seed=seed,
                                 device=device, desc=f"fold {fold + 1}/{mil.folds}")
        probs[test], fold_attention = predict(model, bags.features, test, device)
        for i, a in zip(test, fold_attention):
            attention[i] = a
        records.append({"fold": fold, "train_slides": int(len(fit)), "val_slides": int(len(val)),
                        "test_slides": int(len(test)),
                        "test_patients": len({cohort.patients[i] for i in test}),
                        "epochs_run": info.epochs_run, "best_epoch": info.best_epoch,
                        "best_val_loss": info.best_val_loss, **slide_metrics(labels[test], probs[test]),
                        "history": info.history})
    return probs, attention, records


def run_mil(cfg: Config) -> dict[str, Any]:
    """Cross-validate ABMIL on ``cfg.mil``'s bags and labels; write ``RUN/eval/mil/`` (module notes); return
    what ``metrics.json`` holds."""
    started = time.perf_counter()
    mil = cfg.mil
    cohort = read_cohort(mil)
    device = _device(mil.device)
    root = run_dir(cfg)
    out = root / "eval" / "mil"
    _write_config(root, out, cfg)
    bags = Bags(cohort.paths)
    folds = patient_folds(cohort.labels, cohort.patients, folds=mil.folds, seed=cfg.run.seed)
    probs, attention, records = _cross_validate(cohort, bags, folds, cfg, device)
    train_s = time.perf_counter() - started
    results = _results(cohort, cfg, folds, probs, records, device=device)
    _write_predictions(out / "predictions.csv", cohort, folds, probs, attention, bags)
    _write_attention(out / "attention.npz", cohort, attention, bags)
    results["timings"] = {"train_s": train_s, "total_s": time.perf_counter() - started}
    write_json(out / "metrics.json", results)  # the scores are on disk before any figure is drawn
    start = time.perf_counter()
    results["figures"] = [_confusion_figure(out, results)]
    results["heatmaps"] = _heatmaps(out, cohort, bags, folds, probs, attention, mil) if mil.heatmaps else []
    results["timings"].update(figures_s=time.perf_counter() - start, total_s=time.perf_counter() - started)
    write_json(out / "metrics.json", results)
    return results


def _write_config(root: Path, out: Path, cfg: Config) -> None:
    text = f"# git: {git_sha() or 'unknown'}\n" + to_yaml(cfg)
    write_text(out / "config.yaml", text)
    if not (root / "config.yaml").exists():  # a MIL-only run directory; a pretraining run keeps its own
        write_text(root / "config.yaml", text)


def _results(cohort: Cohort, cfg: Config, folds: np.ndarray, probs: np.ndarray, records: list[dict[str, Any]], *,
             device: str) -> dict[str, Any]:
    """The ``metrics.json`` block (see the module notes)."""
    mil, labels, k = cfg.mil, cohort.labels, len(cohort.classes)
    mean, std = summarize(records)
    counts = np.bincount(labels, minlength=k)
    return {
        "task": "slide classification", "model": MODEL, "features": mil.features, "labels": mil.labels,
        "encoders": cohort.encoders, "feature_dim": cohort.dim, "classes": cohort.classes,
        "class_index": {name: i for i, name in enumerate(cohort.classes)},
        "slides_per_class": {name: int(n) for name, n in zip(cohort.classes, counts)},
        "num_slides": len(labels), "num_patients": len(set(cohort.patients)), "grouping": cohort.grouping,
        "folds": mil.folds, "per_fold": records, "mean": mean, "std": std,
        "pooled": slide_metrics(labels, probs),
        "confusion_matrix": np.sum([r["confusion_matrix"] for r in records], axis=0).tolist(),
        "chance": {"balanced_accuracy": 1.0 / k, "accuracy": float(counts.max() / counts.sum()), "auc": 0.5},
        "skipped": cohort.skipped, "unlabelled_bags": cohort.unlabelled,
        "settings": to_dict(cfg)["mil"], "seed": cfg.run.seed, "device": device,
    }


def attention_summary(attention: np.ndarray) -> dict[str, float]:
    """``attention_max`` (largest weight), ``attention_top10_share`` (weight on the top 10 % of tiles, at least
    one) and ``attention_entropy`` (entropy / log N: 1 spread evenly, 0 on one tile; 0 for a one-tile bag)."""
    a = np.sort(attention)[::-1]
    top = max(1, int(np.ceil(0.1 * len(a))))
    entropy = float(-(a * np.log(np.clip(a, 1e-300, None))).sum() / np.log(len(a))) if len(a) > 1 else 0.0
    return {"attention_max": float(a[0]), "attention_top10_share": float(a[:top].sum()), "attention_entropy": entropy}


def _write_predictions(path: Path, cohort: Cohort, folds: np.ndarray, probs: np.ndarray,
                       attention: list[np.ndarray], bags: Bags) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide_id", "patient", "fold", "label", "predicted", *[f"p_{c}" for c in cohort.classes],
                     "correct", "tiles", "attention_max", "attention_top10_share", "attention_entropy",
                     "top_tile_x", "top_tile_y"])
    for i, slide in enumerate(cohort.slides):
        pred = int(probs[i].argmax())
        summary = attention_summary(attention[i])
        x, y = bags.coords(i)[0][int(attention[i].argmax())]
        writer.writerow([slide, cohort.patients[i], int(folds[i]), cohort.classes[cohort.labels[i]],
                         cohort.classes[pred], *[f"{p:.6f}" for p in probs[i]], int(pred == cohort.labels[i]),
                         len(attention[i]), *[f"{v:.6f}" for v in summary.values()], int(x), int(y)])
    write_text(path, buffer.getvalue())


def _write_attention(path: Path, cohort: Cohort, attention: list[np.ndarray], bags: Bags) -> None:
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in attention])]).astype(np.int64)
    with replacing(path) as tmp:
        np.savez_compressed(tmp, slide_ids=np.array(cohort.slides), offsets=offsets,
                            attention=np.concatenate(attention).astype(np.float32),
                            coords=np.concatenate([bags.coords(i)[0] for i in range(len(cohort.slides))]))


def _confusion_figure(out: Path, results: dict[str, Any]) -> dict[str, str]:
    from sslkit.evaluate.plots import confusion_plot

    classes, pooled = results["classes"], results["pooled"]
    confusion_plot(results["confusion_matrix"], row_names=classes, col_names=classes, out=out / "confusion.png",
                   title=f"Attention-MIL, {results['folds']}-fold cross-validation by patient: "
                         f"{results['num_slides']} slides, balanced accuracy {pooled['balanced_accuracy']:.3f}",
                   xlabel="predicted class", ylabel="true class")
    return {"name": "mil_confusion", "file": "confusion.png", "title": "Slide classification: confusion matrix",
            "caption": "Every slide predicted once, by the fold model that did not train on its patient; summed over "
                       "the folds. Cells shaded by the share of their row."}


def _heatmaps(out: Path, cohort: Cohort, bags: Bags, folds: np.ndarray, probs: np.ndarray,
              attention: list[np.ndarray], mil: MilConfig) -> list[dict[str, Any]]:
    from sslkit.slides.heatmaps import draw_slide

    drawn = []
    for i in tqdm(range(len(cohort.slides)), desc="heatmaps", unit="slide", leave=False):
        coords, attrs = bags.coords(i)
        pred = int(probs[i].argmax())
        title = (f"{cohort.slides[i]}: true {cohort.classes[cohort.labels[i]]}, predicted {cohort.classes[pred]} "
                 f"(p = {probs[i, pred]:.2f}) by the fold-{int(folds[i]) + 1} model, which did not train on this "
                 "slide's patient")
        record = draw_slide(out, cohort.slides[i], coords=coords, attrs=attrs, attention=attention[i], title=title,
                            slides_dir=mil.slides, top_tiles=mil.top_tiles)
        drawn.append({**record, "label": cohort.classes[cohort.labels[i]], "predicted": cohort.classes[pred],
                      "probability": float(probs[i, pred]), "fold": int(folds[i])})
    return drawn


def format_table(results: dict[str, Any]) -> str:
    """The per-fold scores, their mean and standard deviation, the pooled scores and the confusion matrix, as text."""
    def cell(value: Any) -> str:
        return f"{value:9.3f}" if isinstance(value, float) else f"{'-':>9}"

    head = "".join(f"{name:>9}" for name in ("bal.acc", "macro F1", "AUC", "accuracy"))
    lines = [f"{MODEL}, {results['folds']}-fold cross-validation grouped by patient: {results['num_slides']} slides of "
             f"{results['num_patients']} patients; classes {', '.join(results['classes'])}",
             f"{'':14}{head}   slides  epochs (best)", "-" * (14 + len(head) + 25)]
    for r in results["per_fold"]:
        lines.append(f"fold {r['fold'] + 1:<9}" + "".join(cell(r[key]) for key in SCORES)
                     + f"{r['test_slides']:9d}  {r['epochs_run']:4d} ({r['best_epoch']})")
    lines.append(f"{'mean':14}" + "".join(cell(results["mean"][key]) for key in SCORES))
    lines.append(f"{'std':14}" + "".join(cell(results["std"][key]) for key in SCORES))
    lines.append(f"{'pooled':14}" + "".join(cell(results["pooled"][key]) for key in SCORES))
    chance = results["chance"]
    lines.append(f"chance: balanced accuracy {chance['balanced_accuracy']:.3f}, AUC 0.500, majority-class accuracy "
                 f"{chance['accuracy']:.3f}; {results['grouping']}")
    width = max(len(c) for c in results["classes"]) + 2
    lines.append("confusion matrix, summed over the folds (rows true, columns predicted):")
    lines.append(" " * width + "".join(f"{c:>{width}}" for c in results["classes"]))
    for name, row in zip(results["classes"], results["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"{n:>{width}}" for n in row))
    for row in results["skipped"]:
        lines.append(f"skipped line {row['line']}: {row['reason']}")
    if results["unlabelled_bags"]:
        lines.append(f"{len(results['unlabelled_bags'])} bags without a row in the labels file were not used: "
                     + ", ".join(results["unlabelled_bags"][:10]) + (" ..." if len(results["unlabelled_bags"]) > 10
                                                                     else ""))
    return "\n".join(lines)


__all__ = ["MODEL", "attention_summary", "fold_seed", "format_table", "run_mil"]
