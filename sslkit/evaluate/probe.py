"""Test metrics of a fine-tuned (or linear-probe) classifier: predict the evaluation shards,
score with ``classification_metrics``, add the per-class report and the confusion matrix.

    results = evaluate_classifier("runs/supcam-finetune")   # writes eval/classification.json
    print(format_report(results))

Written to ``RUN/eval/``: ``classification.json`` (everything below), ``predictions.npz``
(probabilities (N, K), labels (N,), keys (N,)) and the ``probe`` block of ``metrics.json``
(DESIGN.md), merged into the file if ``sslkit evaluate`` wrote one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm

from sslkit import dist
from sslkit.config import ConfigError
from sslkit.data.stream import resolve_shards
from sslkit.embed import embed_shards
from sslkit.evaluate.metrics import classification_metrics

PROBE_KEYS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc")


def probe_report(probs: np.ndarray, labels: np.ndarray, *, classes: list[str] | None = None) -> dict[str, Any]:
    """Scores of (N, K) class probabilities against (N,) labels in 0..K-1.

    Returns ``probe`` (macro metrics as in ``classification_metrics``; ``auc`` one-vs-rest,
    absent when a class never occurs), ``per_class`` (precision, sensitivity, specificity,
    f1, support per class name), ``confusion_matrix`` (K x K, rows true, columns predicted),
    ``classes`` and ``num_samples``.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    k = probs.shape[1]
    names = list(classes) if classes else [str(c) for c in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} probability columns; pass one name per class.")
    pred = probs.argmax(1)
    ids = np.arange(k)
    cm = skm.confusion_matrix(labels, pred, labels=ids)  # (K, K)
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    negatives = cm.sum() - cm.sum(1)  # per class: samples of the other classes
    true_neg = negatives - (cm.sum(0) - np.diag(cm))  # ... minus those predicted as this class
    specificity = np.divide(true_neg, negatives, out=np.zeros(k), where=negatives > 0)
    per_class = {
        name: {"precision": float(precision[i]), "sensitivity": float(recall[i]),
               "specificity": float(specificity[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(names)
    }
    return {
        "probe": classification_metrics(labels, pred, scores=probs, num_classes=k),
        "per_class": per_class, "confusion_matrix": cm.tolist(), "classes": names,
        "num_samples": int(len(labels)),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_results(out: Path, results: dict[str, Any], probs: np.ndarray, labels: np.ndarray, keys: list[str]) -> None:
    """``classification.json``, ``predictions.npz`` and the ``probe`` block of ``metrics.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "predictions.tmp.npz"
    np.savez(tmp, probabilities=probs.astype(np.float32), labels=labels, keys=np.asarray(keys))
    os.replace(tmp, out / "predictions.npz")
    _write_json(out / "classification.json", results)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["probe"] = {key: results["probe"][key] for key in PROBE_KEYS if key in results["probe"]}
    _write_json(metrics_path, metrics)


def evaluate_classifier(run_dir: str | Path, *, device: str | None = None) -> dict[str, Any]:
    """Predict ``eval.shards`` with a fine-tuned run's newest checkpoint; write and return the scores."""
    from sslkit.evaluate.run import load_trained

    run_dir = Path(run_dir)
    cfg, method, state = load_trained(run_dir)
    if not hasattr(method, "predict"):
        raise ConfigError(f"The run '{run_dir}' trained method '{cfg.method.name}', which has no classifier; "
                          "fine-tune it first with `sslkit finetune`.")
    if not cfg.eval.shards:
        raise ConfigError(f"The run '{run_dir}' has no eval.shards; classification metrics need held-out "
                          "labelled shards.")
    shards = resolve_shards(cfg.eval.shards)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    method.to(device)
    probs, labels, keys = embed_shards(method.predict, shards, size=cfg.data.size, channels=cfg.data.channels,
                                       batch_size=cfg.eval.batch_size, workers=cfg.data.workers, device=device,
                                       max_samples=cfg.eval.max_samples, desc="predict")
    if (labels < 0).any():
        raise ConfigError(f"The evaluation shards at '{cfg.eval.shards}' hold {int((labels < 0).sum())} unlabelled "
                          "samples; point eval.shards at labelled shards.")
    results = {
        **probe_report(probs, labels, classes=shards.classes),
        "method": cfg.method.name, "init": cfg.finetune.init, "freeze_backbone": cfg.finetune.freeze_backbone,
        "eval_shards": cfg.eval.shards, "step": state["step"], "checkpoint": state["checkpoint"],
    }
    if dist.is_main_process():
        write_results(run_dir / "eval", results, probs, labels, keys)
    return results


def format_report(results: dict[str, Any]) -> str:
    """Macro metrics, a per-class table (like sklearn's classification report) and the confusion matrix."""
    names, probe = results["classes"], results["probe"]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"Classification of {results['num_samples']} held-out samples"
             + (f" (step {results['step']})" if "step" in results else ""),
             "  ".join(f"{k} {probe[k]:.4f}" for k in PROBE_KEYS if k in probe), ""]
    cols = ("precision", "sensitivity", "specificity", "f1")
    head = "".ljust(width) + "".join(c.rjust(13) for c in cols) + "support".rjust(9)
    lines += [head, "-" * len(head)]
    for name in names:
        row = results["per_class"][name]
        lines.append(name.ljust(width) + "".join(f"{row[c]:13.4f}" for c in cols) + f"{row['support']:9d}")
    lines.append("macro avg".ljust(width) + "".join(f"{probe[c]:13.4f}" for c in cols)
                 + f"{results['num_samples']:9d}")
    cell = max(8, *(len(n) + 2 for n in names))
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              "".ljust(width) + "".join(n.rjust(cell) for n in names)]
    for name, row in zip(names, results["confusion_matrix"]):
        lines.append(name.ljust(width) + "".join(f"{v:{cell}d}" for v in row))
    return "\n".join(lines)
