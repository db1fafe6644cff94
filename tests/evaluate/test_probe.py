"""The classifier report: hand-worked metrics and confusion matrix, AUC against scikit-learn, the files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from sslkit.evaluate.probe import format_report, probe_report, write_results

# Nine samples, three classes. Predictions (the argmax of each row):
#   true  0 0 0 1 1 2 2 2 2
#   pred  0 0 1 1 2 2 2 0 2
# Confusion (rows true, columns predicted): [[2, 1, 0], [0, 1, 1], [1, 0, 3]].
# class 0: TP 2, FP 1, FN 1, TN 5 -> precision 2/3, sensitivity 2/3, specificity 5/6
# class 1: TP 1, FP 1, FN 1, TN 6 -> 1/2, 1/2, 6/7
# class 2: TP 3, FP 1, FN 1, TN 4 -> 3/4, 3/4, 4/5
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
PROBS = np.array([
    [0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.3, 0.6, 0.1],
    [0.2, 0.5, 0.3], [0.1, 0.4, 0.5],
    [0.1, 0.2, 0.7], [0.2, 0.3, 0.5], [0.5, 0.1, 0.4], [0.0, 0.1, 0.9],
])
NAMES = ["single", "touching", "overlap"]


def test_hand_worked_three_classes():
    r = probe_report(PROBS, LABELS, classes=NAMES)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert r["num_samples"] == 9 and r["classes"] == NAMES
    p = r["probe"]
    assert p["accuracy"] == pytest.approx(6 / 9)
    assert p["specificity"] == pytest.approx((5 / 6 + 6 / 7 + 4 / 5) / 3)
    assert p["sensitivity"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert p["precision"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert p["f1"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)  # P == R per class
    expected = {"single": (2 / 3, 2 / 3, 5 / 6, 3), "touching": (1 / 2, 1 / 2, 6 / 7, 2),
                "overlap": (3 / 4, 3 / 4, 4 / 5, 4)}
    for name, (prec, sens, spec, support) in expected.items():
        row = r["per_class"][name]
        assert row["precision"] == pytest.approx(prec)
        assert row["sensitivity"] == pytest.approx(sens)
        assert row["specificity"] == pytest.approx(spec)
        assert row["support"] == support
    # The macro specificity is the mean of the per-class ones (two independent computations).
    assert p["specificity"] == pytest.approx(np.mean([row["specificity"] for row in r["per_class"].values()]))
    assert p["auc"] == pytest.approx(roc_auc_score(LABELS, PROBS, multi_class="ovr", average="macro"), abs=1e-12)


def test_auc_agrees_with_sklearn_binary_and_random():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=200)
    p1 = np.clip(0.35 * y + 0.65 * rng.random(200), 0, 1)
    r = probe_report(np.stack([1 - p1, p1], 1), y)
    assert r["probe"]["auc"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)
    assert r["classes"] == ["0", "1"]
    y4 = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 4)) + np.eye(4)[y4]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r4 = probe_report(probs, y4)
    assert r4["probe"]["auc"] == pytest.approx(roc_auc_score(y4, probs, multi_class="ovr"), abs=1e-12)
    assert np.asarray(r4["confusion_matrix"]).sum() == 300


def test_wrong_number_of_names():
    with pytest.raises(ValueError, match="2 class names for 3 probability columns"):
        probe_report(PROBS, LABELS, classes=["a", "b"])


def test_files_and_report(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    # `sslkit evaluate` wrote its blocks first: the probe block joins them.
    (out / "metrics.json").write_text(json.dumps({"cluster": {"ami": 0.5}}))
    r = probe_report(PROBS, LABELS, classes=NAMES)
    keys = [f"k{i}" for i in range(9)]
    write_results(out, r, PROBS, LABELS, keys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cluster"] == {"ami": 0.5}
    assert set(metrics["classifier"]) == {"accuracy", "precision", "sensitivity", "specificity", "f1", "auc"}
    saved = json.loads((out / "classification.json").read_text())
    assert saved["confusion_matrix"] == r["confusion_matrix"]
    pred = np.load(out / "predictions.npz")
    np.testing.assert_allclose(pred["probabilities"], PROBS, rtol=1e-6)
    assert pred["labels"].tolist() == LABELS.tolist() and pred["keys"].tolist() == keys
    assert not list(out.glob("*.tmp*"))
    text = format_report(r)
    assert "touching" in text and "macro avg" in text
    row = next(line for line in text.splitlines()[::-1] if line.startswith("single"))
    assert [int(v) for v in row.split()[1:]] == [2, 1, 0]


def _blobs(n_per_class, *, classes=3, dim=8, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + rng.normal(0, spread, (len(y), dim)), y


def test_linear_probe_separable_and_agrees_with_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sslkit.evaluate.probe import linear_probe

    x, y = _blobs(40)
    rng = np.random.default_rng(5)  # a test set around the same class centres
    centres = np.stack([x[y == c].mean(0) for c in range(3)])
    yt = np.repeat(np.arange(3), 20)
    xt = centres[yt] + rng.normal(0, 0.3, (60, 8))
    r = linear_probe(x, y, xt, yt, classes=NAMES)
    assert r["probe"]["accuracy"] == 1.0 and r["protocol"] == "train split" and r["train_samples"] == 120
    # An independent fit with scikit-learn directly gives the same predictions.
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=0)).fit(x, y)
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (yt, ref.predict(xt)), 1)
    assert r["confusion_matrix"] == cm.tolist()


def test_linear_probe_pads_classes_missing_from_training():
    from sslkit.evaluate.probe import linear_probe

    x, y = _blobs(30)
    keep = y != 2  # class 2 never seen in training: its column is all zeros, it is never predicted
    r = linear_probe(x[keep], y[keep], x, y, classes=NAMES)
    assert r["per_class"]["overlap"]["sensitivity"] == 0.0
    assert np.array(r["confusion_matrix"])[:, 2].sum() == 0
    assert r["probe"]["accuracy"] == pytest.approx(60 / 90)


def test_cv_probe_predicts_every_sample_once():
    from sslkit.evaluate.probe import cv_probe

    x, y = _blobs(12, spread=2.0, seed=3)  # overlapping: not every prediction is right
    r = cv_probe(x, y, classes=NAMES, folds=5)
    assert r["num_samples"] == 36 and np.array(r["confusion_matrix"]).sum() == 36
    assert r["protocol"] == "5-fold cross-validation"
    # Folds shrink to the smallest class; a class seen once cannot be cross-validated.
    y2 = y.copy()
    y2[:9] = 1  # class 0 keeps 3 samples -> 3 folds
    assert cv_probe(x, y2, classes=NAMES)["protocol"] == "3-fold cross-validation"
    y2[:11] = 1
    with pytest.raises(ValueError, match="at least two samples"):
        cv_probe(x, y2, classes=NAMES)
