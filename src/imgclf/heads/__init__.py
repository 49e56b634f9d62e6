"""Classifier heads on top of backbone features; every trained head folds into one linear layer."""

from __future__ import annotations

from imgclf.config import ClassifierConfig
from imgclf.heads.linear import LinearHead
from imgclf.heads.svm import LinearSVMHead, l2_normalize, softmax


def create_head(cfg: ClassifierConfig, seed: int = 0) -> LinearSVMHead:
    """The feature classifier named by the configuration (``svm`` and ``svm_on_refined`` use a linear SVM)."""
    if cfg.classifier in ("svm", "svm_on_refined"):
        return LinearSVMHead(
            tuple(cfg.svm_c_grid),
            cfg.cv_folds,
            cfg.l2_normalize,
            None if cfg.class_weight == "none" else cfg.class_weight,
            seed,
        )
    raise ValueError(f"classifier {cfg.classifier!r} is not a feature head")


__all__ = ["LinearHead", "LinearSVMHead", "create_head", "l2_normalize", "softmax"]
