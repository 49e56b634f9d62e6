import numpy as np
import pytest

from imgclf.evaluation.metrics import compute_metrics


def test_known_values():
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    scores = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = compute_metrics(y, scores, classes)
    assert m["overall_accuracy"] == pytest.approx(6 / 8)
    assert m["per_class_accuracy"] == {"a": 0.75, "b": 0.5, "c": 1.0}
    assert m["class_averaged_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert m["auc"]["c"] == 1.0 and 0.5 < m["auc"]["micro"] < 1.0
    assert m["auc"]["macro"] == pytest.approx(np.mean([m["auc"][c] for c in classes]))


def test_binary_and_missing_class():
    y = np.array([0, 0, 1, 1])
    scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = compute_metrics(y, scores, ["ants", "bees"])
    assert m["auc"]["bees"] == 1.0 and m["overall_accuracy"] == 0.75
    m = compute_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["ants", "bees"])
    assert m["per_class_accuracy"]["bees"] is None and m["auc"]["micro"] is None
