"""Classifier heads on top of backbone features; every trained head folds into one linear layer.

scikit-learn is imported only when a head is fitted: ``LinearSVMHead`` loads on first access.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf.config import ClassifierConfig
from imgclf.heads.linear import LinearHead, l2_normalize, softmax
from imgclf.utils import Memo

if TYPE_CHECKING:
    from imgclf.heads.svm import LinearSVMHead


def create_head(cfg: ClassifierConfig, seed: int = 0, progress: bool = False) -> LinearSVMHead:
    """The feature classifier named by the configuration (``svm`` and ``svm_on_refined`` use a linear SVM);
    ``progress``: a bar over its cross-validation fits."""
    from imgclf.heads.svm import LinearSVMHead

    if cfg.classifier in ("svm", "svm_on_refined"):
        return LinearSVMHead(
            tuple(cfg.svm_c_grid),
            cfg.cv_folds,
            cfg.l2_normalize,
            None if cfg.class_weight == "none" else cfg.class_weight,
            seed,
            verbose=progress,
        )
    raise ValueError(f"classifier {cfg.classifier!r} is not a feature head")


@dataclass
class FittedHead:
    """A fitted feature head in its deployed form, with the C chosen, its cross-validated accuracy and that of
    every C tried (empty where not cross-validated)."""

    head: LinearHead
    C: float
    cv_accuracy: float
    cv_folds: int  # folds actually used (0: too few images per class to cross-validate)
    cv_scores: dict[float, float] = field(default_factory=dict)  # C -> its cross-validated accuracy
    reused: bool = False


ABSENT_CLASS_BIAS = -1e4  # a class without training features: a score of 0, never predicted


def fit_head(
    cfg: ClassifierConfig,
    x: np.ndarray,
    y: np.ndarray,
    seed: int = 0,
    memo: Memo | None = None,
    n_classes: int | None = None,
    groups: Sequence[str] | None = None,
    progress: bool = False,
) -> FittedHead:
    """Fit the configured head on (x, y) and fold it into a :class:`LinearHead` of ``n_classes`` rows (default:
    up to the largest label); a class absent from ``y`` gets a row that never wins. ``groups``: one per row;
    the cross-validation keeps each group whole. ``progress``: a bar over the cross-validation fits.

    With ``memo``, an identical earlier fit (same features, labels, settings, seed, code and scikit-learn
    version) is read back instead of cross-validated again.
    """
    memo = memo or Memo(None, "heads")
    key = Memo.key(
        "svm",
        cfg.model_dump(mode="json"),
        seed,
        version("scikit-learn"),
        Path(__file__),  # this fold into rows, and the fit itself
        Path(__file__).parent / "svm.py",
        np.asarray(x, np.float32),
        np.asarray(y, np.int64),
        n_classes,
        None if groups is None else list(groups),
    )
    if (data := memo.get(key)) is not None:  # whole (Memo checks): written by this code, as the key holds it
        with np.load(io.BytesIO(data)) as z:
            head = LinearHead(z["weight"], z["bias"], bool(z["l2_normalize"]))
            scores = dict(zip(z["cv_c"].tolist(), z["cv_scores"].tolist(), strict=True))
            return FittedHead(head, float(z["C"]), float(z["cv_accuracy"]), int(z["cv_folds"]), scores, reused=True)
    svm = create_head(cfg, seed, progress).fit(x, y, None if groups is None else np.asarray(groups))
    w, b = svm.linear()
    n_classes = int(svm.classes_.max()) + 1 if n_classes is None else n_classes
    if len(svm.classes_) < n_classes:
        w_all, b_all = np.zeros((n_classes, w.shape[1]), w.dtype), np.full(n_classes, ABSENT_CLASS_BIAS, b.dtype)
        w_all[svm.classes_], b_all[svm.classes_] = w, b
        w, b = w_all, b_all
    cv_accuracy = svm.cv_scores_.get(svm.C_, float("nan"))
    scores = {float(c): float(a) for c, a in svm.cv_scores_.items()}
    fitted = FittedHead(LinearHead(w, b, svm.l2_normalize), svm.C_, cv_accuracy, svm.cv_folds_, scores)
    buf = io.BytesIO()
    np.savez(
        buf,
        weight=w,
        bias=b,
        l2_normalize=svm.l2_normalize,
        C=fitted.C,
        cv_accuracy=fitted.cv_accuracy,
        cv_folds=fitted.cv_folds,
        cv_c=np.array(list(scores), np.float64),
        cv_scores=np.array(list(scores.values()), np.float64),
    )
    memo.put(key, buf.getvalue())
    return fitted


def __getattr__(name: str) -> Any:
    if name == "LinearSVMHead":
        from imgclf.heads.svm import LinearSVMHead

        return LinearSVMHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FittedHead", "LinearHead", "LinearSVMHead", "create_head", "fit_head", "l2_normalize", "softmax"]
