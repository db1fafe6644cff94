"""Classifiers on top of embeddings, and their scores.

Two kinds, scored the same way (``probe_report``: macro metrics, per-class table, confusion matrix):

- the **linear probe**: logistic regression on frozen features (``linear_probe``), fitted on
  labelled training embeddings or, without them, cross-validated on the evaluation set
  (``cv_probe``); ``sslkit evaluate`` runs it for every encoder and baseline (the ``probe``
  block of ``eval/metrics.json``);
- a run's **own classifier head** (SCL, fine-tuned runs): ``evaluate_classifier`` predicts the
  evaluation shards and writes ``eval/classification.json``, ``eval/predictions.npz``
  (probabilities (N, K), labels (N,), keys (N,)) and the ``classifier`` block of ``metrics.json``.

    results = evaluate_classifier("runs/supcam-finetune")
    print(format_report(results))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from sslkit import dist
from sslkit.atomic import replacing, write_json
from sslkit.config import Config, ConfigError
from sslkit.data.shardset import ShardSet, resolve_shards
from sslkit.embed import embed_shards
from sslkit.evaluate.metrics import classification_metrics
from sslkit.rundir import load_trained

PROBE_KEYS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc")
_PREDICT_BLOCK = 65536  # test rows the probe predicts at a time


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


def _probe_model(seed: int) -> Pipeline:
    # Standardised features, L2-regularised multinomial logistic regression (C = 1): the usual
    # frozen-feature probe; lbfgs converges well within 1,000 iterations on standardised inputs.
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=seed))


def _full_columns(probs: np.ndarray, seen: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over the classes the model saw -> (N, num_classes), zeros for unseen classes."""
    out = np.zeros((probs.shape[0], num_classes))
    out[:, seen] = probs
    return out


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 classes: list[str], seed: int = 0) -> dict[str, Any]:
    """Fit logistic regression on (N, D) training features with labels in 0..K-1, score the test set.

    Returns :func:`probe_report` of the test predictions plus ``protocol`` and ``train_samples``.
    """
    model = _probe_model(seed).fit(train_x, train_y)
    # In blocks of rows: the scaler's copy of a million test rows would otherwise be made at once.
    probs = np.concatenate([model.predict_proba(test_x[start:start + _PREDICT_BLOCK])
                            for start in range(0, len(test_x), _PREDICT_BLOCK)])
    probs = _full_columns(probs, model.classes_, len(classes))
    return {**probe_report(probs, test_y, classes=classes), "protocol": "train split",
            "train_samples": int(len(train_y))}


def cv_probe(x: np.ndarray, y: np.ndarray, *, classes: list[str], folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Linear probe without a training split: stratified k-fold, each sample predicted by the model
    fitted on the other folds. ``folds`` shrinks to the smallest class size (at least 2)."""
    smallest = int(np.bincount(y)[np.unique(y)].min())
    if smallest < 2:
        raise ValueError("A cross-validated probe needs at least two samples of every class present; "
                         "evaluate on more samples (eval.max_samples) or give labelled training shards.")
    folds = min(folds, smallest)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(_probe_model(seed), x, y, cv=cv, method="predict_proba")
    probs = _full_columns(probs, np.unique(y), len(classes))
    return {**probe_report(probs, y, classes=classes), "protocol": f"{folds}-fold cross-validation",
            "train_samples": int(len(y) - len(y) // folds)}


def write_results(out: Path, results: dict[str, Any], probs: np.ndarray, labels: np.ndarray, keys: list[str]) -> None:
    """``classification.json``, ``predictions.npz`` and the ``classifier`` block of ``metrics.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / "predictions.npz") as tmp:
        np.savez(tmp, probabilities=probs.astype(np.float32), labels=labels, keys=np.asarray(keys))
    write_json(out / "classification.json", results)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["classifier"] = {key: results["probe"][key] for key in PROBE_KEYS if key in results["probe"]}
    write_json(metrics_path, metrics)


def classify_shards(cfg: Config, method: torch.nn.Module, state: dict[str, Any], shards: ShardSet, *,
                    run_dir: Path, device: str) -> dict[str, Any]:
    """Predict ``shards`` with the method's classifier head; write (main process) and return the scores,
    with the (N, K) ``probs``, (N,) ``labels`` and ``keys`` they came from."""
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
        write_results(Path(run_dir) / "eval", results, probs, labels, keys)
    return {**results, "probs": probs, "labels": labels, "keys": keys}  # the arrays for the figures


def evaluate_classifier(run_dir: str | Path, *, device: str | None = None) -> dict[str, Any]:
    """Predict ``eval.shards`` with a fine-tuned run's newest checkpoint; write and return the scores."""
    run_dir = Path(run_dir)
    cfg, method, state = load_trained(run_dir)
    if not method.has_classifier:
        raise ConfigError(f"The run '{run_dir}' trained method '{cfg.method.name}', which has no classifier; "
                          "fine-tune it first with `sslkit finetune`.")
    if not cfg.eval.shards:
        raise ConfigError(f"The run '{run_dir}' has no eval.shards; classification metrics need held-out "
                          "labelled shards.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return classify_shards(cfg, method, state, resolve_shards(cfg.eval.shards), run_dir=run_dir, device=device)


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
