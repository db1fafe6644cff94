"""Slide-level scores of ``sslkit mil``: balanced accuracy, macro F1, one-vs-rest AUC, confusion matrix.

Computed here from the confusion matrix and from ranks (numpy and scipy only), so that the tests
can check them against scikit-learn as an independent implementation. Definitions (as
scikit-learn's defaults):

- **balanced accuracy**: the mean recall of the classes that occur among the true labels;
- **macro F1**: the mean F1 of the classes that occur among the true or the predicted labels
  (a class predicted but never true scores 0);
- **AUC**: one-vs-rest, the macro mean over the classes that occur among the true labels, each
  scored by its own probability column (Mann-Whitney U / (n_pos x n_neg), ties counted half);
  with two classes, the AUC of class 1 (the second name in sorted order) alone; None when
  fewer than two classes occur;
- **confusion matrix**: K x K counts, rows true class, columns predicted class (the argmax).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from scipy.stats import rankdata

SCORES = ("balanced_accuracy", "f1", "auc", "accuracy")


def confusion(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def _auc_one(scores: np.ndarray, positive: np.ndarray) -> float:
    ranks = rankdata(scores)  # average ranks: a tie counts half
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(labels: np.ndarray, probs: np.ndarray) -> Optional[float]:
    """One-vs-rest macro AUC of (N, K) probabilities (binary: class 1's AUC); None below two classes present."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return _auc_one(probs[:, 1], labels == 1)
    return float(np.mean([_auc_one(probs[:, c], labels == c) for c in present]))


def slide_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Scores of (N, K) class probabilities against (N,) true classes 0..K-1 (see the module notes)."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(1)
    cm = confusion(labels, pred, probs.shape[1])
    tp, true, predicted = np.diag(cm).astype(np.float64), cm.sum(1), cm.sum(0)
    recall = np.divide(tp, true, out=np.zeros(len(tp)), where=true > 0)
    precision = np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(tp)), where=precision + recall > 0)
    occurs = (true > 0) | (predicted > 0)
    return {"balanced_accuracy": float(recall[true > 0].mean()), "f1": float(f1[occurs].mean()),
            "auc": auc(labels, probs), "accuracy": float(tp.sum() / len(labels)),
            "num_slides": int(len(labels)), "confusion_matrix": cm.tolist()}


def summarize(per_fold: list[dict[str, Any]]) -> tuple[dict[str, Optional[float]], dict[str, Optional[float]]]:
    """(mean, sample standard deviation (ddof 1)) of each score over the folds where it is defined."""
    mean, std = {}, {}
    for key in SCORES:
        values = np.array([fold[key] for fold in per_fold if fold.get(key) is not None], dtype=np.float64)
        mean[key] = float(values.mean()) if len(values) else None
        std[key] = float(values.std(ddof=1)) if len(values) > 1 else None
    return mean, std


__all__ = ["SCORES", "auc", "confusion", "slide_metrics", "summarize"]
