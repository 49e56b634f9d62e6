import numpy as np
import pytest
from sklearn.base import clone

from imgclf.heads import LinearHead, LinearSVMHead


def _blobs(n_classes: int, n: int = 40, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (n_classes, d))
    y = np.repeat(np.arange(n_classes), n)
    return centers[y] + rng.normal(0, 1.5, (len(y), d)), y


@pytest.mark.parametrize("n_classes", [2, 4])
def test_fit_predict_proba_and_linear_fold(n_classes: int):
    x, y = _blobs(n_classes)
    head = LinearSVMHead(c_grid=(0.01, 1.0, 100.0), cv_folds=4).fit(x, y)
    assert head.C_ in (0.01, 1.0, 100.0) and set(head.cv_scores_) == {0.01, 1.0, 100.0}
    p = head.predict_proba(x)
    assert p.shape == (len(y), n_classes) and np.allclose(p.sum(1), 1)
    assert np.mean(head.predict(x) == y) > 0.9
    # the deployed linear layer gives exactly the estimator's scores
    w, b = head.linear()
    assert np.allclose(LinearHead(w, b, True).predict_proba(x), p, atol=1e-5)
    # calibrated: the mean top score is close to the (out-of-fold) accuracy, not pinned at 1
    assert 0.5 < p.max(1).mean() <= 1.0


def test_c_chosen_on_training_data_only():
    x, y = _blobs(3, seed=1)
    a = LinearSVMHead(c_grid=(0.001, 0.1, 10.0)).fit(x, y)
    b = LinearSVMHead(c_grid=(0.001, 0.1, 10.0)).fit(x, y)
    assert a.C_ == b.C_ and np.allclose(a.coef_, b.coef_)  # deterministic
    assert a.cv_scores_[a.C_] == max(a.cv_scores_.values())


def test_tiny_classes_fall_back_without_cv_and_estimator_protocol():
    x, y = _blobs(2, n=1)
    head = LinearSVMHead().fit(x, y)
    assert head.cv_scores_ == {} and head.C_ == 1.0
    params = LinearSVMHead(c_grid=(1.0,), class_weight="balanced").get_params()
    assert params["class_weight"] == "balanced"
    assert clone(LinearSVMHead(cv_folds=3)).cv_folds == 3
    with pytest.raises(ValueError, match="single class"):
        LinearSVMHead().fit(x, np.zeros(len(x)))
