"""Tests of sslkit.evaluate.metrics: hand-worked cases and agreement with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from sslkit.evaluate.metrics import classification_metrics, cluster_metrics, hungarian_map


def test_cluster_metrics_hand_worked() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    preds = [1, 1, 0, 0, 0, 2]
    # Contingency (rows = classes 0,1,2; cols = clusters 0,1,2):
    #   class 0: [0, 2, 0]
    #   class 1: [2, 0, 0]
    #   class 2: [1, 0, 1]
    # purity: column maxima 2 + 2 + 1 = 5 -> 5/6.
    # Hungarian: class0<-cluster1 (2), class1<-cluster0 (2), class2<-cluster2 (1) -> acc 5/6.
    # Mapped predictions: [0, 0, 1, 1, 1, 2]
    #   F1 class 0: P=1,   R=1   -> 1
    #   F1 class 1: P=2/3, R=1   -> 4/5
    #   F1 class 2: P=1,   R=1/2 -> 2/3
    #   macro = (1 + 4/5 + 2/3) / 3 = 37/45
    m = cluster_metrics(labels, preds)
    assert set(m) == {"ami", "ari", "nmi", "purity", "acc", "f1"}
    assert m["purity"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["acc"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["f1"] == pytest.approx(37 / 45, abs=1e-12)
    mapped, acc = hungarian_map(labels, preds)
    np.testing.assert_array_equal(mapped, [0, 0, 1, 1, 1, 2])
    assert acc == pytest.approx(5 / 6)
    assert all(isinstance(v, float) for v in m.values())


def test_perfect_clustering_under_permutation_is_one() -> None:
    labels = np.array(["a", "a", "b", "b", "c", "c", "c"])
    preds = np.array([7, 7, 3, 3, 5, 5, 5])  # any relabelling of the classes
    m = cluster_metrics(labels, preds)
    for key, value in m.items():
        assert value == pytest.approx(1.0), key


def test_information_scores_agree_with_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=500)
    preds = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 7, size=500))
    m = cluster_metrics(labels, preds)
    assert m["ami"] == pytest.approx(skm.adjusted_mutual_info_score(labels, preds), abs=1e-12)
    assert m["ari"] == pytest.approx(skm.adjusted_rand_score(labels, preds), abs=1e-12)
    assert m["nmi"] == pytest.approx(skm.normalized_mutual_info_score(labels, preds), abs=1e-12)
    assert 0.0 < m["ami"] < 1.0


def test_more_clusters_than_classes() -> None:
    labels = [0, 0, 0, 1, 1, 1]
    preds = [0, 0, 1, 2, 2, 3]
    # Contingency: class 0: [2, 1, 0, 0]; class 1: [0, 0, 2, 1].
    # Every cluster is pure -> purity 1, but only 2 clusters can be matched one-to-one:
    # class0<-cluster0, class1<-cluster2 -> acc 4/6; clusters 1 and 3 count as wrong.
    # Mapped: [0, 0, -, 1, 1, -]; F1 per class: P=1, R=2/3 -> 0.8; macro 0.8.
    m = cluster_metrics(labels, preds)
    assert m["purity"] == pytest.approx(1.0)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(0.8)


def test_fewer_clusters_than_classes() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 0, 0, 0, 1, 1]
    # class 0 or 1 takes cluster 0 (2 right), class 2 takes cluster 1 (2 right): acc 4/6.
    # Mapped: class 0 or 1 gets cluster 0 (a tie; either gives the same F1), class 2 cluster 1.
    # F1: matched class of cluster 0: P=1/2, R=1 -> 2/3; class 2: 1; the other: 0.
    m = cluster_metrics(labels, preds)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["purity"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_cluster_metrics_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="labels_true has 3 entries"):
        cluster_metrics([0, 1, 1], [0, 1])


def test_specificity_hand_worked_three_classes() -> None:
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 0, 2]
    # Confusion (rows true, cols pred):   N = 9
    #   [[2, 1, 0],
    #    [0, 1, 1],
    #    [1, 0, 3]]
    # class 0: TP 2, FP 1, FN 1, TN 5 -> spec 5/6, sens 2/3, prec 2/3
    # class 1: TP 1, FP 1, FN 1, TN 6 -> spec 6/7, sens 1/2, prec 1/2
    # class 2: TP 3, FP 1, FN 1, TN 4 -> spec 4/5, sens 3/4, prec 3/4
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert m["specificity"] == pytest.approx((5 / 6 + 6 / 7 + 4 / 5) / 3)
    assert m["sensitivity"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert m["precision"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    f1s = [2 / 3, 1 / 2, 3 / 4]  # P == R per class, so F1 == P
    assert m["f1"] == pytest.approx(sum(f1s) / 3)
    assert "auc" not in m  # no scores given


def test_auc_matches_sklearn_multiclass_ovr() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs.argmax(1), scores=probs)
    expected = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert m["auc"] == pytest.approx(expected, abs=1e-12)
    assert 0.5 < m["auc"] < 1.0


def test_auc_binary_two_columns_and_one_column() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=200)
    p1 = np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    expected = skm.roc_auc_score(y, p1)
    assert classification_metrics(y, p1 > 0.5, scores=probs)["auc"] == pytest.approx(expected)
    assert classification_metrics(y, (p1 > 0.5).astype(int), scores=p1)["auc"] == pytest.approx(
        expected
    )


def test_auc_left_out_when_a_class_is_missing() -> None:
    y = np.array([0, 0, 1, 1])
    scores = np.full((4, 3), 1 / 3)
    m = classification_metrics(y, [0, 1, 1, 1], scores=scores)
    assert "auc" not in m
    assert m["accuracy"] == pytest.approx(0.75)


def test_classification_rejects_labels_outside_num_classes() -> None:
    with pytest.raises(ValueError, match="outside classes 0..1"):
        classification_metrics([0, 1, 2], [0, 1, 1], num_classes=2)
