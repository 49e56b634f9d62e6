from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from imgclf.evaluation.metrics import compute_metrics, roc_curves


def test_known_values():
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    scores = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = compute_metrics(y, scores, classes)
    assert m["overall_accuracy"] == pytest.approx(6 / 8)
    lo, hi = m["overall_accuracy_ci95"]  # Wilson: (p + z²/2n -+ z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    assert (lo, hi) == pytest.approx((0.4093, 0.9285), abs=1e-4)
    assert m["per_class_accuracy"] == {"a": 0.75, "b": 0.5, "c": 1.0}
    assert m["class_averaged_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert m["auc"]["per_class"]["c"] == 1.0 and 0.5 < m["auc"]["micro"] < 1.0
    assert m["auc"]["macro"] == pytest.approx(np.mean([m["auc"]["per_class"][c] for c in classes]))


def test_binary_and_missing_class():
    y = np.array([0, 0, 1, 1])
    scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = compute_metrics(y, scores, ["ants", "bees"])
    assert m["auc"]["per_class"]["bees"] == 1.0 and m["overall_accuracy"] == 0.75
    assert m["auc"]["micro"] == m["auc"]["macro"] == 1.0  # two classes: one AUC (pooling both columns gave 0.81)
    curves, micro = roc_curves(y, scores, ["ants", "bees"])
    assert list(curves) == ["bees"] and micro is None  # one curve, not the same one twice plus a "micro" one
    m = compute_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["ants", "bees"])
    assert m["per_class_accuracy"]["bees"] is None and m["auc"]["micro"] is None
    # a class with no test image adds no easy negatives to the micro average
    y3 = np.array([0, 0, 1, 1])
    s3 = np.array([[0.5, 0.45, 0.05], [0.3, 0.65, 0.05], [0.6, 0.35, 0.05], [0.2, 0.75, 0.05]])
    m3 = compute_metrics(y3, s3, ["a", "b", "c"])
    present = np.eye(3)[y3][:, :2]  # one vs rest for a and b only
    assert m3["auc"]["micro"] == pytest.approx(roc_auc_score(present.ravel(), s3[:, :2].ravel()))
    assert m3["auc"]["micro"] < roc_auc_score(np.eye(3)[y3].ravel(), s3.ravel())  # what pooling c too gave
    assert m3["auc"]["per_class"]["c"] is None


def test_evaluation_figure_stays_readable_with_many_classes(monkeypatch: pytest.MonkeyPatch):
    """Above a dozen classes only the five lowest-AUC ROC curves get a legend entry, and the figure grows."""
    import matplotlib.pyplot as plt

    from imgclf.evaluation.report import evaluation_figure

    rng = np.random.default_rng(0)
    figs: list = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figures to look into
    for k in (3, 20):
        classes = [f"class{i:02d}" for i in range(k)]
        y = np.repeat(np.arange(k), 4)
        scores = rng.dirichlet(np.ones(k), len(y)) + 2 * np.eye(k)[y] * rng.random((len(y), 1))
        scores /= scores.sum(1, keepdims=True)
        m = compute_metrics(y, scores, classes)
        assert evaluation_figure(y, scores, m) == evaluation_figure(y, scores, m)  # deterministic
        legend = [t.get_text() for t in figs[-1].axes[0].get_legend().get_texts()]
        auc = m["auc"]["per_class"]
        weakest = sorted(classes, key=lambda c: (auc[c], c))[:5]
        expected = classes if k == 3 else sorted(weakest)
        assert legend == [f"{c} (AUC {auc[c]:.3f})" for c in expected] + [
            f"micro-average (AUC {m['auc']['micro']:.3f})"
        ]
    small, large = (f.get_size_inches() for f in figs[::2])
    assert large[0] > small[0] and large[1] > small[1]
    for f in figs:
        close(f)


def test_printed_summary_lists_the_least_accurate_classes_when_there_are_many():
    from imgclf.evaluation.report import summary_lines

    for k in (3, 30):
        classes = [f"c{i:02d}" for i in range(k)]
        y = np.repeat(np.arange(k), 2)
        scores = np.eye(k)[y]
        scores[5] = np.eye(k)[0]  # c02's second image is taken for c00
        m = {**compute_metrics(y, scores, classes), "n_test": len(y)}
        lines = summary_lines(m, max_classes=20)
        listed = [line.split()[1].rstrip(":") for line in lines if line.startswith("Class ")]
        assert listed == (classes if k == 3 else ["c02", *classes[:2], *classes[3:10]])
        assert lines[len(listed) + (k > 20)].startswith("Overall accuracy")
        assert (lines[0] == "The 10 least accurate of 30 classes (all in report.html):") == (k > 20)


def test_class_names_are_drawn_literally(monkeypatch: pytest.MonkeyPatch):
    """Dollar signs (mathtext), a leading underscore (matplotlib's "leave out of the legend") and the
    averages' own names are drawn as written, as every other class name."""
    import matplotlib.pyplot as plt

    from imgclf.evaluation.report import evaluation_figure

    classes = ["cash$$", "$100_$200", "$x^2$", "_tmp", "micro", "macro"]
    y = np.repeat(np.arange(len(classes)), 2)
    scores = np.random.default_rng(0).dirichlet(np.ones(len(classes)), len(y)) + np.eye(len(classes))[y]
    scores /= scores.sum(1, keepdims=True)
    m = compute_metrics(y, scores, classes)
    figs: list = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figs.append)
    evaluation_figure(y, scores, m)  # drawn, not a ParseException
    ax_roc, ax_cm = figs[0].axes
    legend = ax_roc.get_legend().get_texts()
    per_class = m["auc"]["per_class"]
    assert [t.get_text() for t in legend] == [f"{c} (AUC {per_class[c]:.3f})" for c in classes] + [
        f"micro-average (AUC {m['auc']['micro']:.3f})"
    ]
    ticks = [*ax_cm.get_xticklabels(), *ax_cm.get_yticklabels()]
    assert [t.get_text() for t in ticks] == classes * 2
    assert not any(t.get_parse_math() for t in [*legend, *ticks])
    close(figs[0])


def test_classes_named_micro_and_macro_keep_their_own_auc():
    from sklearn.metrics import roc_auc_score

    from imgclf.evaluation.report import summary_lines

    classes = ["micro", "macro", "c"]
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    scores = np.random.default_rng(1).dirichlet(np.ones(3), len(y))
    m = {**compute_metrics(y, scores, classes), "n_test": len(y)}
    own = {c: roc_auc_score(y == i, scores[:, i]) for i, c in enumerate(classes)}
    micro = roc_auc_score(np.eye(3)[y].ravel(), scores.ravel())
    assert own["micro"] != pytest.approx(micro)  # else the test could not tell them apart
    assert m["auc"]["per_class"] == pytest.approx(own)
    assert m["auc"]["micro"] == pytest.approx(micro)
    assert m["auc"]["macro"] == pytest.approx(np.mean(list(own.values())))
    lines = summary_lines(m)
    assert f"AUC {own['micro']:.3f})" in lines[0] and f"AUC {own['macro']:.3f})" in lines[1]


def test_report_md_escapes_pipes_in_class_names():
    from imgclf.evaluation.report import render_reports

    y = np.array([0, 0, 1, 1])
    scores = np.eye(2)[y]
    m = {**compute_metrics(y, scores, ["a|b", "c"]), "n_train": 4, "n_test": 4}
    md = render_reports(y, scores, m, {})["report.md"].decode()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| a\\|b | 100.0 % | 2 | 1.000 |", "| c | 100.0 % | 2 | 1.000 |"]


def test_an_imperfect_result_is_never_shown_as_perfect():
    from imgclf.evaluation.report import summary_lines

    y = np.repeat([0, 1], 1250)
    scores = np.eye(2)[y] * 0.9 + 0.05
    scores[0] = [0.1, 0.9]  # one of 2500 wrong
    text = "\n".join(summary_lines({**compute_metrics(y, scores, ["cat", "dog"]), "n_test": 2500}))
    assert "Overall accuracy       : 99.96 %" in text and "100.0 %" not in text.split("Class dog")[0]
    assert "Class dog: accuracy  100.0 %" in text  # a perfect class stays as it is


def test_a_metrics_memo_entry_cut_short_is_computed_again(tmp_path: Path):
    """A crash can truncate a memo entry (written without fsync): it was parsed, and every later train with
    the same scores failed on it (``Expecting value``)."""
    from imgclf.utils import Memo

    y = np.array([0, 0, 1, 1, 2, 2])
    scores = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.1
    memo = Memo(tmp_path, "metrics")
    first = compute_metrics(y, scores, ["a", "b", "c"], memo)
    (entry,) = (tmp_path / "metrics").iterdir()
    whole = entry.read_bytes()
    entry.write_bytes(whole[:200])
    assert compute_metrics(y, scores, ["a", "b", "c"], memo) == first
    assert entry.read_bytes() == whole  # replaced by a whole one
