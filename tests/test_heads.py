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


@pytest.mark.filterwarnings("ignore:Skipping check check_array_api_input")  # array API checks: not applicable
def test_passes_scikit_learns_estimator_checks():
    """fit/predict/predict_proba/decision_function and class_weight as scikit-learn's own checks expect
    (among them: "balanced" weights still favour the small classes after calibration)."""
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(LinearSVMHead(c_grid=(0.1, 1.0), cv_folds=2, n_jobs=1), on_fail=None)
    assert len(results) > 40
    assert {r["check_name"]: str(r["exception"])[:300] for r in results if r["status"] == "failed"} == {}


def test_balanced_weights_choose_c_by_the_class_averaged_accuracy():
    """With class_weight="balanced" the CV score of each C is the class-averaged accuracy of the out-of-fold
    predictions (plain accuracy otherwise), recomputed here with scikit-learn's own parts."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import LinearSVC

    x, y = _blobs(3, n=30, seed=4)
    keep = (y != 2) | (np.arange(len(y)) % 10 == 0)  # classes of 30, 30 and 3 images
    x, y = x[keep], y[keep]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for weight, score in ((None, accuracy_score), ("balanced", balanced_accuracy_score)):
        head = LinearSVMHead(c_grid=(0.01, 1.0), cv_folds=3, class_weight=weight, n_jobs=1).fit(x, y)
        for c in (0.01, 1.0):
            oof = np.zeros(len(y), int)
            for tr, te in StratifiedKFold(3, shuffle=True, random_state=0).split(xn, y):
                svc = LinearSVC(C=c, class_weight=weight, max_iter=20000, random_state=0).fit(xn[tr], y[tr])
                oof[te] = svc.predict(xn[te])
            assert head.cv_scores_[c] == pytest.approx(score(y, oof))


def test_c_chosen_on_training_data_only_and_fits_repeat_exactly():
    """Parallel CV fits give the same solution every time (liblinear's random state is per process)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    x = np.abs(rng.normal(0, 0.3, (3, 256))[y] + rng.normal(0, 1.0, (len(y), 256)))  # overlapping classes
    a, b = (LinearSVMHead(n_jobs=2).fit(x, y) for _ in range(2))
    assert a.C_ == b.C_ and np.array_equal(a.coef_, b.coef_) and np.array_equal(a.intercept_, b.intercept_)
    assert a.cv_scores_[a.C_] == max(a.cv_scores_.values())


def test_tiny_classes_fall_back_without_cv_and_estimator_protocol():
    x, y = _blobs(2, n=1)
    head = LinearSVMHead().fit(x, y)
    assert head.cv_scores_ == {} and head.C_ == 1.0 and head.cv_folds_ == 0
    params = LinearSVMHead(c_grid=(1.0,), class_weight="balanced").get_params()
    assert params["class_weight"] == "balanced"
    assert clone(LinearSVMHead(cv_folds=3)).cv_folds == 3
    with pytest.raises(ValueError, match="1 class"):
        LinearSVMHead().fit(x, np.zeros(len(x)))


def test_single_image_classes_stay_in_training_and_c_is_still_cross_validated():
    """A class with one image is fitted in every fold; the others decide C, as many folds as they allow."""
    x, y = _blobs(3, n=12, seed=2)
    grid = (0.01, 1.0, 100.0)
    plain = LinearSVMHead(c_grid=grid, cv_folds=4).fit(x, y)
    xs, ys = np.vstack([x, x[:1] + 5.0]), np.r_[y, 3]  # plus class 3, a single image
    head = LinearSVMHead(c_grid=grid, cv_folds=4).fit(xs, ys)
    assert head.cv_folds_ == 4 and set(head.cv_scores_) == set(grid) and list(head.classes_) == [0, 1, 2, 3]
    # held out: only the images of the classes that can be split, so C is chosen as without the single one
    assert head.C_ == plain.C_
    p = head.predict_proba(xs)
    assert p.shape == (len(ys), 4) and p[-1, 3] > p[:-1, 3].max()  # ranked above every other image
    few = np.r_[np.flatnonzero(y == 0)[:3], np.flatnonzero(y == 1)[:2], np.flatnonzero(y == 2)]
    assert LinearSVMHead(cv_folds=5).fit(x[few], y[few]).cv_folds_ == 2  # the smallest splittable class: 2


def test_calibration_sharpens_or_softens_scores_but_never_changes_the_winner(monkeypatch: pytest.MonkeyPatch):
    """15 images a class, perfectly separable: a fixed temperature (1) gave the right class about 0.6 on
    average; fitted on the out-of-fold decision values, the scores say how sure the head is. On overlapping
    classes the scores soften; in both, the class that wins is the SVM's (a logistic regression over all
    decision values could reorder them: six images a class scored 33 % on their own training images)."""
    import imgclf.heads.svm as svm

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32)) * 0.5
    x = np.concatenate([c + rng.normal(size=(15, 32)) * 0.3 for c in centres])
    x_test = np.concatenate([c + rng.normal(size=(20, 32)) * 0.3 for c in centres])
    y, y_test = np.repeat(np.arange(3), 15), np.repeat(np.arange(3), 20)
    head = LinearSVMHead(random_state=0).fit(x, y)
    p = head.predict_proba(x_test)
    assert (p.argmax(1) == y_test).all() and p.max(1).mean() > 0.9 and head.temperature_ < 1
    # separable out-of-fold values drove the temperature to its bound: every score 0 or 1, a wrong one's too
    assert p.max() < 0.995 and head.predict_proba((centres[:1] + centres[1:2]) / 2).max() < 0.9
    assert np.array_equal(head.predict(x_test), head.svm_.predict(head._prep(x_test)))
    near = rng.normal(size=(4, 16)) * 0.4  # overlapping classes, six images each (as the failure above)
    x4, y4 = np.concatenate([c + rng.normal(size=(6, 16)) for c in near]), np.repeat(np.arange(4), 6)
    x4_test, y4_test = np.concatenate([c + rng.normal(size=(50, 16)) for c in near]), np.repeat(np.arange(4), 50)
    noisy = LinearSVMHead(random_state=0).fit(x4, y4)
    assert np.array_equal(noisy.predict(x4_test), noisy.svm_.predict(noisy._prep(x4_test)))
    sure, right = noisy.predict_proba(x4_test).max(1).mean(), np.mean(noisy.predict(x4_test) == y4_test)
    assert sure < 0.8 and right < 0.6  # not sure where it is often wrong
    assert np.mean(noisy.predict(x4) == y4) == 1.0  # its own training images (the regression: half of them)
    monkeypatch.setattr(svm, "TEMPERATURES", (1.0, 1.0))  # the decision values as they are
    assert LinearSVMHead(random_state=0).fit(x, y).predict_proba(x_test).max(1).mean() < 0.7


def test_fit_head_rows_follow_the_labels_and_misuse_is_named():
    """Labels {0, 2, 5} without n_classes: row k scores label k (rows 0..2 scored 0, 2 and 5 before)."""
    from imgclf.config import ClassifierConfig
    from imgclf.heads import fit_head

    x, y = _blobs(3)
    labels = np.array([0, 2, 5])[y]
    head = fit_head(ClassifierConfig(svm_c_grid=[1.0]), x, labels).head
    assert head.weight.shape[0] == 6 and np.mean(head.predict(x) == labels) > 0.9
    with pytest.raises(ValueError, match=r"this head takes \(n, 16\): features of another backbone"):
        head.predict_proba(np.zeros((2, 1000)))
    with pytest.raises(ValueError, match=r"c_grid: give a list of one or more C values, not \(\)"):
        LinearSVMHead(c_grid=()).fit(x, y)
    # the library's own settings (the configuration refuses them): an error naming the parameter, not
    # a TypeError from len(), nor cv_folds 0 fitting without any cross-validation
    with pytest.raises(ValueError, match=r"c_grid: give a list of one or more C values, not 1\.0"):
        LinearSVMHead(c_grid=1.0).fit(x, y)
    with pytest.raises(ValueError, match="every C value must be a number above 0"):
        LinearSVMHead(c_grid=(1.0, -1)).fit(x, y)
    for folds in (0, 1):
        with pytest.raises(ValueError, match=f"cv_folds: at least 2 folds .*, got {folds}"):
            LinearSVMHead(cv_folds=folds).fit(x, y, groups=np.arange(len(y)))


def test_a_heads_memo_entry_cut_short_is_fitted_again(tmp_path):
    """A crash can truncate a memo entry (written without fsync): every later fit raised BadZipFile on it."""
    from imgclf.config import ClassifierConfig
    from imgclf.heads import fit_head
    from imgclf.utils import Memo

    x, y = _blobs(3, n=10)
    memo, cfg = Memo(tmp_path, "heads"), ClassifierConfig(svm_c_grid=[1.0], cv_folds=2)
    first = fit_head(cfg, x, y, memo=memo)
    (entry,) = (tmp_path / "heads").iterdir()
    entry.write_bytes(entry.read_bytes()[:-300])
    again = fit_head(cfg, x, y, memo=memo)
    assert not again.reused and np.array_equal(again.head.weight, first.head.weight)
    assert fit_head(cfg, x, y, memo=memo).reused  # the whole entry written back


def test_groups_stay_whole_in_the_cross_validation():
    """Near-duplicates (bursts of one scene) under a label drawn per scene: folds that split the bursts
    score them by their twins; folds that keep them whole score what generalises (here: nothing)."""
    from imgclf.heads.svm import _group_splits

    rng = np.random.default_rng(0)
    scenes = rng.normal(0, 1, (40, 256))
    x = np.repeat(scenes, 4, axis=0) + rng.normal(0, 0.01, (160, 256))
    y, groups = np.repeat(np.arange(40) % 2, 4), np.repeat([f"scene{i}" for i in range(40)], 4)
    leaky = LinearSVMHead(c_grid=(10.0,), n_jobs=1).fit(x, y)
    whole = LinearSVMHead(c_grid=(10.0,), n_jobs=1).fit(x, y, groups)
    assert leaky.cv_scores_[10.0] > 0.9 and whole.cv_scores_[10.0] < 0.7 and whole.cv_folds_ == 5
    # no group on both sides; a class of one group (label 2) is never held out
    y3, g3 = np.r_[y, 2, 2], np.concatenate([groups, ["lone", "lone"]])
    splits = _group_splits(y3, g3, 5, 0)
    for fit, held in splits:
        assert not set(g3[fit]) & set(g3[held]) and set(y3[fit]) == {0, 1, 2} and 2 not in set(y3[held])
    assert sorted(np.concatenate([held for _, held in splits])) == list(range(160))


def test_svm_takes_scikit_learn_random_states_with_groups_and_checks_their_length():
    """random_state=None or a RandomState failed with groups (TypeError); groups of the wrong length gave an
    IndexError."""
    from imgclf.heads.svm import LinearSVMHead

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(24, 5)), np.repeat([0, 1], 12)
    X[y == 1] += 5
    groups = np.arange(24) // 2
    for state in (None, np.random.RandomState(3), 4):
        head = LinearSVMHead(c_grid=(0.1, 1.0), cv_folds=3, random_state=state).fit(X, y, groups)
        assert head.cv_folds_ == 3 and head.score(X, y) > 0.9
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        LinearSVMHead(cv_folds=3).fit(X, y, groups[:10])


def test_svm_cross_validation_shows_its_progress_when_asked(capsys: pytest.CaptureFixture[str]):
    """The cross-validation of a large training split ran for about a minute with no sign of progress."""
    from imgclf.heads.svm import LinearSVMHead

    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(30, 4)), np.repeat([0, 1, 2], 10)
    quiet = LinearSVMHead(c_grid=(0.1, 1.0), cv_folds=3).fit(X, y)
    assert "SVM C by cross-validation" not in capsys.readouterr().err
    shown = LinearSVMHead(c_grid=(0.1, 1.0), cv_folds=3, verbose=True).fit(X, y)
    err = capsys.readouterr().err
    assert "SVM C by cross-validation" in err and "6/6" in err
    assert np.array_equal(quiet.coef_, shown.coef_)


def test_many_tiny_classes_fit_without_scikit_learns_regression_warning():
    """30 images in 25 classes: scikit-learn warned that y 'could represent a regression problem' at every fit,
    in the worker processes of the cross-validation too (imgclf notes small classes itself)."""
    import subprocess
    import sys

    code = """
import numpy as np
import imgclf.heads.svm as svm
svm.IN_PROCESS_WORK = 0  # the cross-validation runs in worker processes, as a large one does
rng = np.random.default_rng(0)
y = np.r_[np.arange(25), np.arange(5)]
head = svm.LinearSVMHead(c_grid=(0.1, 1.0), cv_folds=2, n_jobs=2).fit(rng.normal(size=(30, 8)) + y[:, None], y)
print("folds", head.cv_folds_)
"""
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "folds 2" in out.stdout, out.stderr
    assert "regression problem" not in out.stderr


def test_a_memoised_fit_keeps_the_cv_accuracy_of_every_c(tmp_path):
    """train records the cross-validated accuracy of every C tried (metrics.json's svm_cv): a fit read back
    from the memo has them too."""
    from imgclf.config import ClassifierConfig
    from imgclf.heads import fit_head
    from imgclf.utils import Memo

    x, y = _blobs(3, n=10)
    memo, cfg = Memo(tmp_path, "heads"), ClassifierConfig(svm_c_grid=[0.1, 1.0], cv_folds=2)
    first, again = fit_head(cfg, x, y, memo=memo), fit_head(cfg, x, y, memo=memo)
    assert not first.reused and again.reused
    assert first.cv_scores == again.cv_scores == LinearSVMHead(c_grid=(0.1, 1.0), cv_folds=2).fit(x, y).cv_scores_
    assert first.cv_scores[first.C] == first.cv_accuracy and first.cv_folds == 2
