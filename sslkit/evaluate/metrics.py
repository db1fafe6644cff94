"""Clustering and classification metrics, computed with scikit-learn and scipy.

Vocabulary:

- clustering: AMI, ARI, NMI, purity, unsupervised accuracy (Hungarian) and macro F1 on
  the labels inferred through that same one-to-one cluster -> class map;
- classification (linear probe / fine-tune): accuracy, macro precision / sensitivity
  (recall) / specificity / F1 and one-vs-rest macro AUC.

All functions return plain Python floats so the result can go straight to JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm
from sklearn.metrics.cluster import contingency_matrix
from sklearn.preprocessing import label_binarize

__all__ = ["cluster_metrics", "classification_metrics", "hungarian_map"]


def _as_label_vector(y: Any, *, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; metrics need at least one sample.")
    return arr


def _check_same_length(a: np.ndarray, b: np.ndarray, *, names: tuple[str, str]) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{names[0]} has {a.shape[0]} entries but {names[1]} has {b.shape[0]}; "
            "pass one label per sample in both."
        )


def hungarian_map(labels_true: Any, labels_pred: Any) -> tuple[np.ndarray, float]:
    """Best one-to-one cluster -> class map (Hungarian on the contingency matrix).

    Args:
        labels_true: (N,) ground-truth classes (any hashable, sortable values).
        labels_pred: (N,) cluster ids.

    Returns:
        mapped: (N,) int array; the index (into ``np.unique(labels_true)``) of the class
            each sample's cluster was matched to, or -1 where the cluster was left
            unmatched (more clusters than classes). -1 never equals a class.
        acc: fraction of samples whose mapped class is their true class.
    """
    yt = _as_label_vector(labels_true, name="labels_true")
    yp = _as_label_vector(labels_pred, name="labels_pred")
    _check_same_length(yt, yp, names=("labels_true", "labels_pred"))
    # contingency: (n_classes, n_clusters), rows/cols in np.unique order.
    cont = contingency_matrix(yt, yp)
    rows, cols = linear_sum_assignment(cont, maximize=True)
    _, cluster_idx = np.unique(yp, return_inverse=True)
    cluster_to_class = np.full(cont.shape[1], -1, dtype=np.int64)
    cluster_to_class[cols] = rows
    mapped = cluster_to_class[cluster_idx]
    acc = float(cont[rows, cols].sum() / yt.shape[0])
    return mapped, acc


def cluster_metrics(labels_true: Any, labels_pred: Any) -> dict[str, float]:
    """Agreement between ground-truth classes and cluster assignments.

    Args:
        labels_true: (N,) ground-truth classes.
        labels_pred: (N,) cluster ids; the number of clusters may differ from the
            number of classes.

    Returns:
        ``{"ami", "ari", "nmi", "purity", "acc", "f1"}``. ``purity`` gives each cluster
        its majority class (many clusters may share one); ``acc`` uses the best
        one-to-one map instead, so clusters left without a class count as wrong, and
        ``f1`` is the macro F1 (over the true classes) of those mapped predictions.

    Raises:
        ValueError: on empty, non 1-D or unequal-length inputs.

    Example:
        >>> m = cluster_metrics([0, 0, 1, 1], [5, 5, 7, 7])
        >>> m["acc"], m["ami"]
        (1.0, 1.0)
    """
    yt = _as_label_vector(labels_true, name="labels_true")
    yp = _as_label_vector(labels_pred, name="labels_pred")
    _check_same_length(yt, yp, names=("labels_true", "labels_pred"))
    n = yt.shape[0]

    cont = contingency_matrix(yt, yp)  # (n_classes, n_clusters)
    purity = float(cont.max(axis=0).sum() / n)

    mapped, acc = hungarian_map(yt, yp)
    _, true_idx = np.unique(yt, return_inverse=True)
    f1 = skm.f1_score(
        true_idx,
        mapped,
        labels=np.arange(cont.shape[0]),  # the sentinel -1 is not a class
        average="macro",
        zero_division=0,
    )
    return {
        "ami": float(skm.adjusted_mutual_info_score(yt, yp)),
        "ari": float(skm.adjusted_rand_score(yt, yp)),
        "nmi": float(skm.normalized_mutual_info_score(yt, yp)),
        "purity": purity,
        "acc": acc,
        "f1": float(f1),
    }


def _class_list(
    yt: np.ndarray, yp: np.ndarray, *, scores: np.ndarray | None, num_classes: int | None
) -> np.ndarray:
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        classes = np.arange(num_classes)
    elif scores is not None and scores.ndim == 2:
        classes = np.arange(scores.shape[1])
    else:
        return np.unique(np.concatenate([yt, yp]))
    stray = np.setdiff1d(np.concatenate([yt, yp]), classes)
    if stray.size:
        raise ValueError(
            f"labels {stray[:5].tolist()} fall outside classes 0..{classes.size - 1}; "
            "labels must be integer class indices below num_classes (or scores.shape[1])."
        )
    return classes


def _specificity(yt: np.ndarray, yp: np.ndarray, classes: np.ndarray) -> float:
    # (C, 2, 2) one-vs-rest confusion matrices: [[tn, fp], [fn, tp]] per class.
    mcm = skm.multilabel_confusion_matrix(yt, yp, labels=classes)
    tn, fp = mcm[:, 0, 0], mcm[:, 0, 1]
    denom = tn + fp
    per_class = np.divide(tn, denom, out=np.zeros(len(classes)), where=denom > 0)
    return float(per_class.mean())


def _auc(yt: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> float | None:
    if not np.all(np.isin(classes, yt)) or len(classes) < 2:
        return None  # some class never occurs: its one-vs-rest AUC is undefined
    if scores.ndim == 1 or (len(classes) == 2 and scores.shape[1] == 2):
        pos = scores if scores.ndim == 1 else scores[:, 1]
        if len(classes) != 2:
            raise ValueError("1-D scores are only valid for two classes; pass (N, C).")
        return float(skm.roc_auc_score(yt == classes[1], pos))
    # One-vs-rest macro AUC = mean of per-class binary AUCs; binarising first means the
    # scores need not be probabilities that sum to 1 (e.g. kNN vote weights).
    y_bin = label_binarize(yt, classes=classes)
    return float(skm.roc_auc_score(y_bin, scores, average="macro"))


def classification_metrics(
    y_true: Any,
    y_pred: Any,
    *,
    scores: Any | None = None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Accuracy and macro precision / sensitivity / specificity / F1 (and AUC).

    Args:
        y_true: (N,) true classes.
        y_pred: (N,) predicted classes.
        scores: optional (N, C) class scores (probabilities, logits or votes; column c
            scores class c), or (N,) positive-class scores in the binary case.
        num_classes: number of classes C; labels must then be integers in [0, C).
            Defaults to ``scores.shape[1]`` when scores are (N, C), else to the
            classes seen in ``y_true`` and ``y_pred``.

    Returns:
        ``{"accuracy", "precision", "sensitivity", "specificity", "f1"}`` plus
        ``"auc"`` (one-vs-rest macro) only when ``scores`` is given and every class
        occurs in ``y_true``. Macro means run over all C classes; a class with no
        predictions (or no samples) scores 0 for the undefined ratio (sklearn's
        ``zero_division=0``). Specificity of class c is TN / (TN + FP).

    Raises:
        ValueError: on mismatched lengths, labels outside the class range, or scores
            whose shape does not match.
    """
    yt = _as_label_vector(y_true, name="y_true")
    yp = _as_label_vector(y_pred, name="y_pred")
    _check_same_length(yt, yp, names=("y_true", "y_pred"))
    sc = None
    if scores is not None:
        sc = np.asarray(scores, dtype=np.float64)
        if sc.ndim not in (1, 2) or sc.shape[0] != yt.shape[0]:
            raise ValueError(
                f"scores must be (N,) or (N, C) with N = {yt.shape[0]}, got {sc.shape}."
            )
        if not np.all(np.isfinite(sc)):
            raise ValueError("scores contain NaN or inf; pass finite class scores.")
    classes = _class_list(yt, yp, scores=sc, num_classes=num_classes)
    if sc is not None and sc.ndim == 2 and sc.shape[1] != len(classes):
        raise ValueError(
            f"scores has {sc.shape[1]} columns but there are {len(classes)} classes; "
            "pass one score column per class."
        )

    out = {
        "accuracy": float(skm.accuracy_score(yt, yp)),
        "precision": float(
            skm.precision_score(yt, yp, labels=classes, average="macro", zero_division=0)
        ),
        "sensitivity": float(
            skm.recall_score(yt, yp, labels=classes, average="macro", zero_division=0)
        ),
        "specificity": _specificity(yt, yp, classes),
        "f1": float(skm.f1_score(yt, yp, labels=classes, average="macro", zero_division=0)),
    }
    if sc is not None:
        auc = _auc(yt, sc, classes)
        if auc is not None:
            out["auc"] = auc
    return out
