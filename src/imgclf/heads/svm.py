"""Linear SVM on frozen features, C chosen by cross-validation on the training data, calibrated scores.

Calibration is temperature scaling: the softmax of the SVM's decision values divided by one temperature,
the one with the lowest cross-entropy on the out-of-fold decision values against Platt's targets (a class
of n images: (n + 1) / (n + 2), not 1, so that separable data do not make every score 0 or 1). It changes
how sure the scores are, never which class wins, so the model shipped is the one cross-validated. (A multinomial logistic regression
over all decision values, used before, could reorder the classes on small data sets: six images a class
gave a head that scored 33 % on its own training images.) Both stages are linear, so the whole head folds
into one linear layer + softmax (:meth:`LinearSVMHead.linear`), which is what bundles store and exporters
write.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from numbers import Integral, Real

import numpy as np
from joblib import Parallel, delayed
from scipy.optimize import minimize_scalar
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC
from sklearn.utils import check_random_state
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import unique_labels
from sklearn.utils.validation import check_consistent_length, check_is_fitted, validate_data
from tqdm import tqdm

from imgclf.heads.linear import l2_normalize, softmax
from imgclf.utils import cpu_count

TEMPERATURES = (1e-3, 1e3)  # the range the calibration's temperature is chosen in
# cross-validations smaller than this (images x features x fits) run in this process: starting worker
# processes costs seconds, more than the whole fit of a few hundred images
IN_PROCESS_WORK = 2e7


class LinearSVMHead(ClassifierMixin, BaseEstimator):
    """Linear SVM with C picked by stratified k-fold CV on the data given to ``fit`` and calibrated scores.

    ``fit(X, y, groups)``: images of one group (burst shots, one object) are never split between the fitting
    and the held-out side of a fold; a class with a single group stays on the fitting side.

    Parameters
    ----------
    c_grid: C values tried.
    cv_folds: folds for choosing C and for the out-of-fold calibration data.
    l2_normalize: scale every feature vector to unit length first.
    class_weight: None or "balanced" (then C is chosen by the class-averaged accuracy).
    random_state: seed of the fold assignment (an int, None or a ``numpy.random.RandomState``).
    n_jobs: processes for the cross-validation fits (None: one per CPU core; a small cross-validation runs
        in this process).
    verbose: show a progress bar of the cross-validation fits.
    """

    def __init__(
        self,
        c_grid: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
        cv_folds: int = 5,
        l2_normalize: bool = True,
        class_weight: str | None = None,
        random_state: int | np.random.RandomState | None = 0,
        n_jobs: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.c_grid = c_grid
        self.cv_folds = cv_folds
        self.l2_normalize = l2_normalize
        self.class_weight = class_weight
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.verbose = verbose

    def _prep(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return l2_normalize(X) if self.l2_normalize else X

    def _svc(self, c: float) -> LinearSVC:
        return LinearSVC(C=c, class_weight=self.class_weight, max_iter=20000, random_state=self.random_state)

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> LinearSVMHead:
        """Choose C by cross-validation over ``c_grid`` (folds keep ``groups`` whole where given), fit on all of
        ``X``, ``y`` and calibrate the scores (a temperature fitted to the out-of-fold decisions)."""
        if np.ndim(self.c_grid) != 1 or not len(self.c_grid):
            raise ValueError(f"c_grid: give a list of one or more C values, not {self.c_grid!r}")
        if not all(isinstance(c, Real) and c > 0 for c in self.c_grid):
            raise ValueError(f"c_grid: every C value must be a number above 0, got {list(self.c_grid)!r}")
        if not isinstance(self.cv_folds, Integral) or self.cv_folds < 2:
            raise ValueError(f"cv_folds: at least 2 folds choose C and calibrate the scores, got {self.cv_folds!r}")
        X, y = validate_data(self, X, y)
        self.classes_ = unique_labels(y)
        if len(self.classes_) < 2:
            raise ValueError("the training data holds 1 class; a classifier needs at least two")
        Xp = self._prep(X)
        counts = np.bincount(np.searchsorted(self.classes_, y))
        if groups is None:
            # a class with one image cannot be split: it stays on the fitting side of every fold
            single = np.isin(y, self.classes_[counts == 1])
            splittable = counts[counts > 1]
            self.cv_folds_ = int(min(self.cv_folds, splittable.min())) if len(splittable) else 0
            rest, always = np.flatnonzero(~single), np.flatnonzero(single)
            if self.cv_folds_:
                kfold = StratifiedKFold(self.cv_folds_, shuffle=True, random_state=self.random_state)
                folds = kfold.split(Xp[rest], y[rest])
                splits = [(np.sort(np.r_[rest[tr], always]), rest[te]) for tr, te in folds]
        else:
            check_consistent_length(y, groups)
            seed = self.random_state
            if not isinstance(seed, int | np.integer):  # None or a RandomState, as scikit-learn takes them
                seed = int(check_random_state(seed).randint(2**31 - 1))
            splits = _group_splits(y, np.asarray(groups), self.cv_folds, int(seed))
            self.cv_folds_ = len(splits)
            single = np.ones(len(y), bool)  # held out by no fold: their decision values are in-sample
            for _, te in splits:
                single[te] = False
            rest = np.flatnonzero(~single)
        if self.cv_folds_:
            oof_by_c = {
                c: np.zeros((len(y), 1 if len(self.classes_) == 2 else len(self.classes_))) for c in self.c_grid
            }

            tasks = [(c, tr, te) for c in self.c_grid for tr, te in splits]
            # processes, not threads: liblinear draws from one process-wide random state, which fits
            # running in threads of one process interleave, so their solutions would vary from run to run
            small = len(y) * X.shape[1] * len(tasks) < IN_PROCESS_WORK
            fits = Parallel(n_jobs=1 if small else self.n_jobs or cpu_count(), return_as="generator")(
                delayed(_fold_decision)(self._svc(c), Xp, y, tr, te) for c, tr, te in tasks
            )
            bar = tqdm(fits, total=len(tasks), desc="SVM C by cross-validation", unit="fit", disable=not self.verbose)
            decisions = list(bar)
            for (c, _, te), d in zip(tasks, decisions, strict=True):
                oof_by_c[c][te] = d
            # balanced weights aim at the class-averaged accuracy: C is chosen by it too
            score = balanced_accuracy_score if self.class_weight == "balanced" else accuracy_score
            self.cv_scores_ = {
                c: float(score(y[rest], self.classes_[_argmax_decision(oof_by_c[c][rest])])) for c in self.c_grid
            }
            # best CV accuracy; ties go to the smaller (more regularised) C
            self.C_ = max(self.c_grid, key=lambda c: (self.cv_scores_[c], -c))
            oof = oof_by_c[self.C_]
        else:  # too few images per class to cross-validate
            self.C_, self.cv_scores_ = 1.0, {}
            oof = None
        with _quiet_small_classes():
            self.svm_ = self._svc(self.C_).fit(Xp, y)
        decision = self.svm_.decision_function(Xp).reshape(len(y), -1)  # in-sample: only where no fold held it out
        if oof is not None:
            decision[~single] = oof[~single]
        # weighted as the SVM was: else calibration would undo class_weight="balanced"
        weight = compute_sample_weight("balanced", y) if self.class_weight == "balanced" else np.ones(len(y))
        self.temperature_ = _temperature(_logits_of(decision), np.searchsorted(self.classes_, y), weight)
        self.coef_, self.intercept_ = self._fold()
        return self

    def _fold(self) -> tuple[np.ndarray, np.ndarray]:
        """Compose SVM and temperature into one (n_classes, n_features) layer whose softmax gives the scores."""
        w, b = self.svm_.coef_ / self.temperature_, self.svm_.intercept_ / self.temperature_
        if len(self.classes_) == 2:  # binary: one logit for classes_[1]; softmax over [0, z]
            w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
        return w, b

    def _logits(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self._prep(X) @ self.coef_.T + self.intercept_

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Calibrated class scores before the softmax; with two classes, scikit-learn's single column
        (above 0: ``classes_[1]``)."""
        z = self._logits(X)
        return z[:, 1] - z[:, 0] if len(self.classes_) == 2 else z

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class scores (n, k) summing to 1, columns in the order of ``classes_``."""
        return softmax(self._logits(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Labels (n,), values of ``classes_``."""
        z = self._logits(X)  # first: it checks that the head is fitted
        return self.classes_[np.argmax(z, axis=1)]

    def linear(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) with ``scores = softmax(normalise(x) @ W.T + b)``."""
        check_is_fitted(self)
        return self.coef_.astype(np.float32), self.intercept_.astype(np.float32)


def _group_splits(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, held-out) folds that keep each group whole: every class's groups, shuffled, are dealt to the folds
    in turn, so a class with two groups or more is on the fitting side of every fold; a class with one group
    is never held out. Folds that hold nothing out are dropped."""
    rng = np.random.default_rng([seed, 0x6A0])
    fold = np.full(len(y), -1)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        names = sorted({str(g) for g in groups[members]})
        if len(names) < 2:
            continue
        dealt = {name: k % n_folds for k, name in enumerate(names[i] for i in rng.permutation(len(names)))}
        fold[members] = [dealt[str(g)] for g in groups[members]]
    everything = np.arange(len(y))
    return [(everything[fold != k], everything[fold == k]) for k in range(n_folds) if (fold == k).any()]


def _logits_of(decision: np.ndarray) -> np.ndarray:
    """Decision values as one logit per class (binary: 0 for ``classes_[0]``, the decision for ``classes_[1]``)."""
    return np.hstack([np.zeros_like(decision), decision]) if decision.shape[1] == 1 else decision


def _temperature(logits: np.ndarray, y: np.ndarray, weight: np.ndarray) -> float:
    """The temperature T within :data:`TEMPERATURES` whose ``softmax(logits / T)`` has the lowest weighted
    cross-entropy against Platt's targets: (n + 1) / (n + 2) for an image's own class of n images, the rest
    shared among the others. With hard 0/1 targets, decision values that separate the classes perfectly
    drive T to its bound and every score, a wrong one's too, to 0 or 1; these targets stop where the
    evidence does (the loss is unimodal in log T)."""
    k = logits.shape[1]
    n = np.bincount(y, minlength=k)
    own = (n + 1.0) / (n + 2.0)
    target = np.repeat(((1.0 - own[y]) / (k - 1))[:, None], k, axis=1)
    target[np.arange(len(y)), y] = own[y]

    def loss(log_t: float) -> float:
        z = logits / np.exp(log_t)
        log_p = z - z.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        return float(-(weight * (target * log_p).sum(axis=1)).sum() / weight.sum())

    bounds = (float(np.log(TEMPERATURES[0])), float(np.log(TEMPERATURES[1])))
    return float(np.exp(minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": 1e-4}).x))


@contextmanager
def _quiet_small_classes() -> Iterator[None]:
    """Without scikit-learn's warning that many classes of few images look like a regression target: imgclf
    notes such classes itself. Entered where the fits run, worker processes too (filters stay in a process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The number of unique classes is greater than 50%", UserWarning)
        yield


def _fold_decision(svc: LinearSVC, X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
    """Out-of-fold decision values: fit on rows ``tr``, score rows ``te``."""
    with _quiet_small_classes():
        return svc.fit(X[tr], y[tr]).decision_function(X[te]).reshape(len(te), -1)


def _argmax_decision(d: np.ndarray) -> np.ndarray:
    return (d[:, 0] > 0).astype(int) if d.shape[1] == 1 else np.argmax(d, axis=1)
