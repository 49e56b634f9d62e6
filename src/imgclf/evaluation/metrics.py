"""Accuracy (overall with its 95 % interval, per class, class-averaged), ROC AUC (per class, micro, macro) and the confusion matrix."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.utils import Memo


def compute_metrics(
    y_true: np.ndarray, scores: np.ndarray, classes: list[str], memo: Memo | None = None
) -> dict[str, Any]:
    """Metrics of class scores (n x n_classes) against true class ids; accuracies are fractions 0..1.

    ``auc`` holds the averages ``micro`` and ``macro`` apart from ``per_class``, so that no class name can
    take an average's place. The micro average pools the classes present among the test images (a class
    without any would only add easy negatives); with two classes it is the one AUC there is.

    With ``memo``, metrics of identical labels and scores are read back (scikit-learn is not even imported).
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    memo = memo or Memo(None, "metrics")
    key = Memo.key("metrics", list(classes), y_true.astype(np.int64), scores, Path(__file__), version("scikit-learn"))
    return json.loads(memo.compute(key, lambda: json.dumps(_compute(y_true, scores, classes)).encode()))


def _compute(y_true: np.ndarray, scores: np.ndarray, classes: list[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, roc_auc_score
    from sklearn.preprocessing import label_binarize

    y_pred = np.argmax(scores, axis=1)
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(k)))
    support = cm.sum(axis=1)
    per_class = {c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    onehot = label_binarize(y_true, classes=list(range(k)))
    if k == 2:
        onehot = np.hstack([1 - onehot, onehot])
    per_class_auc: dict[str, float | None] = {}
    for i, c in enumerate(classes):
        both = 0 < onehot[:, i].sum() < len(y_true)
        per_class_auc[c] = float(roc_auc_score(onehot[:, i], scores[:, i])) if both else None
    present_auc = [v for v in per_class_auc.values() if v is not None]
    pooled = _pooled(onehot, scores)
    auc = {
        "micro": float(roc_auc_score(*pooled)) if pooled is not None else None,
        "macro": float(np.mean(present_auc)) if present_auc else None,
        "per_class": per_class_auc,
    }
    right = int(np.sum(y_pred == y_true))
    return {
        "overall_accuracy": right / len(y_true),
        "overall_accuracy_ci95": accuracy_interval(right, len(y_true)),
        "class_averaged_accuracy": float(np.mean(present)) if present else None,
        "per_class_accuracy": per_class,
        "per_class_support": {c: int(s) for c, s in zip(classes, support, strict=True)},
        "auc": auc,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def accuracy_interval(right: int, n: int, confidence: float = 0.95) -> list[float]:
    """Wilson score interval of an accuracy of ``right`` of ``n``: where the accuracy on all such images
    lies, at this confidence, given that only ``n`` were tested."""
    from scipy.stats import binomtest

    ci = binomtest(right, n).proportion_ci(confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


Curve = tuple[np.ndarray, np.ndarray]  # (false positive rate, true positive rate)


def _pooled(onehot: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, scores) of the micro average: every class present in the test images, one vs rest; with two
    classes the second one's alone (its curve is the first's too); None with a single class present."""
    present = np.flatnonzero(onehot.sum(axis=0))
    if len(present) < 2:
        return None
    if onehot.shape[1] == 2:
        return onehot[:, 1], scores[:, 1]
    return onehot[:, present].ravel(), scores[:, present].ravel()


def roc_curves(y_true: np.ndarray, scores: np.ndarray, classes: list[str]) -> tuple[dict[str, Curve], Curve | None]:
    """ROC curves per class (one vs rest; classes with no or only positives left out) and micro-averaged
    (None with a single true class). Two classes have one curve, under the second class's name, and no
    average."""
    from sklearn.metrics import roc_curve
    from sklearn.preprocessing import label_binarize

    k = len(classes)
    onehot = label_binarize(y_true, classes=list(range(k)))
    if k == 2:
        onehot = np.hstack([1 - onehot, onehot])
    curves = {}
    for i, c in enumerate(classes):
        if 0 < onehot[:, i].sum() < len(y_true) and not (k == 2 and i == 0):
            fpr, tpr, _ = roc_curve(onehot[:, i], scores[:, i])
            curves[c] = (fpr, tpr)
    pooled = _pooled(onehot, scores)
    if pooled is None or k == 2:
        return curves, None
    fpr, tpr, _ = roc_curve(*pooled)
    return curves, (fpr, tpr)
