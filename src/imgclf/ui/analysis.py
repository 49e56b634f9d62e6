"""The heavy part of the review app, run once in a background thread: features of every image, out-of-fold
probabilities of the labelled ones (suspected label errors) and scores of the unlabeled ones (active learning)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.backbones import Backbone
from imgclf.config import Config
from imgclf.data.dataset import UNLABELED_DIR
from imgclf.features import FeatureExtractor
from imgclf.heads import create_head
from imgclf.ui.labels import ALONE, cross_checkable, label_error_order, list_images, margins, out_of_fold_proba

log = logging.getLogger("imgclf")


@dataclass
class AnalysisResult:
    """Suspected label errors (most suspect first), unlabeled images (least confident first), images not read
    (``skipped``) and labelled images that cannot be cross-checked (``unchecked``), with why."""

    classes: list[str]
    suspects: list[dict[str, Any]] = field(default_factory=list)
    unlabeled: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unchecked: dict[str, str] = field(default_factory=dict)


def analyse(root: Path, cfg: Config, backbone: Backbone | None = None, c: float | None = None) -> AnalysisResult:
    """Score every image under ``root`` (class folders + ``unlabeled/``) with the configured backbone and head.

    ``c``: the SVM's C (a run's chosen one); None: chosen once, by the head's cross-validation on all labelled
    images. Every fold's head then fits that C alone (a search of the C grid in every fold took 3-6 times as long).
    """
    folders = list_images(root)
    classes = sorted(k for k in folders if k != UNLABELED_DIR and folders[k])
    if len(classes) < 2:
        raise ValueError(f"{root}: label errors need at least two class folders with images")
    rels = [r for c in classes for r in folders[c]]
    y_all = np.array([i for i, c in enumerate(classes) for _ in folders[c]])
    unl = folders.get(UNLABELED_DIR, [])
    fx = FeatureExtractor.from_config(cfg, backbone)
    res = fx.extract([root / r for r in [*rels, *unl]], desc="review features")
    all_rels = [*rels, *unl]
    out = AnalysisResult(classes, skipped={all_rels[i]: reason for i, reason in res.errors.items()})
    ok_l, ok_u = res.ok[: len(rels)], res.ok[len(rels) :]
    x, y = res.features[: len(rels)][ok_l], y_all[ok_l]
    kept = [r for r, k in zip(rels, ok_l, strict=True) if k]

    # the SVM's settings whatever the run's classifier (a fine-tuned run gives its backbone, not a feature head)
    svm = cfg.classifier.model_copy(update={"classifier": "svm"})
    head = None
    if c is None:
        head = create_head(svm, cfg.output.seed).fit(x, y)
        c = float(head.C_)
    one_c = svm.model_copy(update={"svm_c_grid": [c]})

    def make_head() -> Any:
        return create_head(one_c, cfg.output.seed)

    proba = out_of_fold_proba(x, y, len(classes), make_head, cfg.classifier.cv_folds, cfg.output.seed)
    checkable = cross_checkable(y)
    out.unchecked = {kept[i]: ALONE for i in np.flatnonzero(~checkable)}
    if out.unchecked:
        log.info(
            "label errors: %d image(s) not cross-checked, each the only image of its class (add images to it): %s",
            len(out.unchecked),
            ", ".join(sorted(out.unchecked)[:5]) + (", ..." if len(out.unchecked) > 5 else ""),
        )
    for rank, i in enumerate(i for i in label_error_order(proba, y) if checkable[i]):
        suggested = int(np.argmax(proba[i]))
        out.suspects.append(
            {
                "path": kept[i],
                "rank": rank + 1,
                "label": classes[y[i]],
                "suggested": classes[suggested],
                "p_label": round(float(proba[i, y[i]]), 6),
                "scores": [round(float(p), 6) for p in proba[i]],
            }
        )
    if unl and ok_u.any():
        if head is None:
            head = make_head().fit(x, y)
        pu = np.zeros((int(ok_u.sum()), len(classes)))
        pu[:, head.classes_] = head.predict_proba(res.features[len(rels) :][ok_u])
        m = margins(pu)
        unl_kept = [r for r, k in zip(unl, ok_u, strict=True) if k]
        for i in np.argsort(m, kind="stable"):
            out.unlabeled.append(
                {
                    "path": unl_kept[i],
                    "suggested": classes[int(np.argmax(pu[i]))],
                    "margin": round(float(m[i]), 6),
                    "scores": [round(float(p), 6) for p in pu[i]],
                }
            )
    return out


class Analyzer:
    """Runs :func:`analyse` in a background thread; ``status()`` says where it stands, ``result`` holds the output."""

    def __init__(self, root: Path, cfg: Config, backbone: Backbone | None = None, c: float | None = None) -> None:
        self.root, self.cfg, self.backbone, self.c = root, cfg, backbone, c
        self.result: AnalysisResult | None = None
        self.state, self.error, self.started, self.finished = "idle", "", 0.0, 0.0
        self.runs = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start a (re)computation unless one is running; True if started."""
        with self._lock:
            if self.state == "running":
                return False
            self.state, self.error, self.started = "running", "", time.time()
            self._thread = threading.Thread(target=self._run, name="imgclf-ui-analysis", daemon=True)
            self._thread.start()
            return True

    def _run(self) -> None:
        try:
            result = analyse(self.root, self.cfg, self.backbone, self.c)
        except Exception as e:  # reported through status(), the thread must not die silently
            log.exception("review analysis failed")
            with self._lock:
                self.state, self.error, self.finished = "error", f"{type(e).__name__}: {e}", time.time()
            return
        with self._lock:
            self.result, self.state, self.finished = result, "done", time.time()
            self.runs += 1

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        with self._lock:
            r = self.result
            return {
                "state": self.state,
                "error": self.error,
                "runs": self.runs,
                "seconds": round((self.finished if self.state != "running" else time.time()) - self.started, 1)
                if self.started
                else 0.0,
                "n_suspects": len(r.suspects) if r else 0,
                "n_unlabeled": len(r.unlabeled) if r else 0,
                "n_skipped": len(r.skipped) if r else 0,
                "n_unchecked": len(r.unchecked) if r else 0,
            }
