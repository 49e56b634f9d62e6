import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from imgclf.evaluation.metrics import compute_metrics, roc_curves


def _kept_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures saved from now on (to look into once drawn)."""
    figs: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figs.append(fig) or save(fig, *a, **k))
    return figs


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
    from imgclf.evaluation.report import evaluation_figure

    rng = np.random.default_rng(0)
    figs = _kept_figures(monkeypatch)
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
    from imgclf.evaluation.report import evaluation_figure

    classes = ["cash$$", "$100_$200", "$x^2$", "_tmp", "micro", "macro"]
    y = np.repeat(np.arange(len(classes)), 2)
    scores = np.random.default_rng(0).dirichlet(np.ones(len(classes)), len(y)) + np.eye(len(classes))[y]
    scores /= scores.sum(1, keepdims=True)
    m = compute_metrics(y, scores, classes)
    figs = _kept_figures(monkeypatch)
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


def test_report_md_shows_class_names_as_written():
    """A ``|`` ended the cell, and ``<tag>``, ``&amp;``, backticks, ``*``, ``~~``, a leading ``_`` and ``[a](b)`` were
    read as HTML, an entity, code, emphasis, strikethrough and a link; report.html keeps escaping them its way."""
    from imgclf.evaluation.report import md_cell, render_reports

    classes = ["a|b", "class with spaces & ampersand <tag>", "&amp; `c`", "*x* ~~y~~ _z_", "[a](b) C:\\d", "run_dir"]
    y = np.repeat(np.arange(len(classes)), 2)
    scores = np.eye(len(classes))[y]
    m = {**compute_metrics(y, scores, classes), "n_train": 4, "n_test": len(y)}
    reports = render_reports(y, scores, m, {})
    rows = [line for line in reports["report.md"].decode().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| a\\|b",
        "| class with spaces &amp; ampersand &lt;tag&gt;",
        "| &amp;amp; \\`c\\`",
        "| \\*x\\* \\~\\~y\\~\\~ \\_z\\_",
        "| [a\\](b) C:\\\\d",
        "| run_dir",  # an underscore inside a word is no emphasis: left as it is
    ]
    assert rows[1] == "| a\\|b | 100.0 % | 2 | 1.000 |"
    assert md_cell("two\nlines") == "two&#10;lines"  # a line break would end the table row
    assert "<td>class with spaces &amp; ampersand &lt;tag&gt;</td>" in reports["report.html"].decode()


def test_report_md_shows_skipped_paths_and_reasons_as_written():
    """A path with a backtick broke its code span and a reason with ``<tag>`` or ``*`` was read as HTML or
    emphasis: Markdown renders each skipped file's path and reason as written (checked with a CommonMark parser)."""
    from markdown_it import MarkdownIt

    from imgclf.evaluation.report import render_reports

    skipped = [
        {"path": "data/a`b/x.jpg", "reason": "not an image <tag> *starred* (re-save it)"},
        {"path": "`leading.png", "reason": "truncated | cut"},
        {"path": "data/``two``.jpg", "reason": "a_b _c_"},
        {"path": " both ends.jpg ", "reason": "spaces"},
    ]
    y = np.array([0, 0, 1, 1])
    m = {**compute_metrics(y, np.eye(2)[y], ["a", "b"]), "n_train": 4, "n_test": 4, "skipped": skipped}
    m["notes"] = [{"path": "n`1.jpg", "note": "rotated <90>"}]
    md = render_reports(y, np.eye(2)[y], m, {})["report.md"].decode()
    items = [
        t
        for t in MarkdownIt("commonmark").parse(md)
        if t.type == "inline" and t.map and "`" in md.splitlines()[t.map[0]]
    ]
    shown = [[(c.type, c.content) for c in t.children if c.content] for t in items]
    assert shown == [
        [("code_inline", s["path"]), ("text", ": " + s["reason"])]
        for s in [*skipped, {"path": "n`1.jpg", "reason": "rotated <90>"}]
    ]


LONG = "a_very_long_class_name_" + "L" * 150  # 173 characters: a folder name can be that long


def _figure(classes: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Figure, bytes, list[str]]:
    """The evaluation figure of ``classes``, its PNG and the warnings drawing it raised."""
    from imgclf.evaluation.report import evaluation_figure

    k = len(classes)
    y = np.repeat(np.arange(k), 3)
    scores = np.random.default_rng(0).dirichlet(np.ones(k), len(y)) + np.eye(k)[y]
    scores /= scores.sum(1, keepdims=True)
    with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        figs = _kept_figures(patch)
        warnings.simplefilter("always")
        png = evaluation_figure(y, scores, compute_metrics(y, scores, classes))
    return figs[0], png, [str(w.message) for w in caught]


def test_figure_labels_of_long_class_names_are_shortened_and_unique(monkeypatch: pytest.MonkeyPatch):
    """A 173-character class name ran off the figure: class names are shortened in the middle, to 24 columns
    (a CJK character takes two), and names alike at both ends keep more of the middle until they differ."""
    from imgclf.evaluation.report import LABEL_COLUMNS, short_labels

    alike = [LONG + "_A" + "x" * 20, LONG + "_B" + "x" * 20]  # the same but for one character in the middle
    names = ["cat", LONG, "日本語クラス" * 4, "emoji_🐝_bee", "x" * 30 + "e\u0301" * 20, *alike]
    short = short_labels(names)
    assert short[0] == "cat" and short[3] == "emoji_🐝_bee"  # short names stay as they are
    assert short[1] == "a_very_long_…LLLLLLLLLLL" and len(short[1]) == LABEL_COLUMNS
    assert short[2] == "日本語クラス…本語クラス"  # 12 + 1 + 10 columns
    assert short[4] == "x" * 12 + "…" + "e\u0301" * 11  # an accent takes no column, nor is torn from its letter
    assert short[5] != short[6] and short[5].startswith("a_very_long") and short[5].endswith("x")
    assert len(set(short)) == len(names)
    fig, _, _ = _figure(names, monkeypatch)
    ax_roc, ax_cm = fig.axes
    ticks = [t.get_text() for t in ax_cm.get_xticklabels()]
    assert ticks == [t.get_text() for t in ax_cm.get_yticklabels()] == short
    legend = [t.get_text() for t in ax_roc.get_legend().get_texts()]
    assert [entry.rsplit(" (AUC", 1)[0] for entry in legend] == [*short, "micro-average"]


@pytest.mark.parametrize("k", [3, 40])
def test_figure_panels_do_not_overlap_and_draw_without_warnings(k: int, monkeypatch: pytest.MonkeyPatch):
    """Long and CJK class names: tight_layout gave up ("Tight layout not applied"), the legend ran off the left
    edge and the matrix's class names into the ROC panel, and each character DejaVu Sans lacks was a warning."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    names = [LONG, "日本語クラス", "emoji_🐝_bee", *(f"class_{i:03d}_" + "z" * i for i in range(k - 3))]
    fig, png, caught = _figure(names, monkeypatch)
    assert caught == []
    renderer = FigureCanvasAgg(fig).get_renderer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # measuring lays out the text again: the missing glyphs again
        roc, cm = [ax.get_tightbbox(renderer) for ax in fig.axes]  # with tick labels, titles and the legend
    assert roc.x0 >= 0 and roc.x1 < cm.x0 and cm.x1 <= fig.bbox.x1
    assert min(roc.y0, cm.y0) >= 0 and max(roc.y1, cm.y1) <= fig.bbox.y1
    ax_roc, ax_cm = fig.axes
    assert ax_roc.get_window_extent().width >= 0.4 * ax_cm.get_window_extent().width  # the ROC panel stays usable
    assert png.startswith(b"\x89PNG")


def test_figure_falls_back_to_installed_fonts_for_cjk_and_emoji(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Characters DejaVu Sans lacks are taken from the first installed fallback font that has them (STIX, shipped
    with matplotlib, stands in for Noto Sans CJK here); a font not installed is left out without a warning, and
    characters no font has are named in one log line instead of a warning each."""
    from imgclf.evaluation import report

    names = ["script_\u210a", "日本語クラス", "plain"]  # U+210A SCRIPT SMALL G: in STIX, not in DejaVu Sans
    monkeypatch.setattr(report, "FALLBACK_FONTS", ())
    with caplog.at_level(logging.INFO, logger="imgclf"):
        fig, without, caught = _figure(names, monkeypatch)
    assert caught == [] and "no installed font has \u210a ク ス ラ 日 本 語 (drawn as boxes)" in caplog.text
    caplog.clear()
    monkeypatch.setattr(report, "FALLBACK_FONTS", ("No Such Font", "STIXGeneral"))
    assert report.font_families() == ["DejaVu Sans", "STIXGeneral"]
    with caplog.at_level(logging.INFO, logger="imgclf"):
        fig, png, caught = _figure(names, monkeypatch)
    assert caught == [] and "findfont" not in caplog.text
    assert "no installed font has ク ス ラ 日 本 語 (drawn" in caplog.text  # \u210a is drawn from STIX
    assert fig.axes[1].get_xticklabels()[0].get_fontfamily() == ["DejaVu Sans", "STIXGeneral"]
    assert png != without  # the glyph drawn, not a box


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


def test_reports_list_the_wrong_predictions_most_confident_first():
    """The reports named no misclassified image: the reader had to open predictions.csv or the review app."""
    from markdown_it import MarkdownIt

    from imgclf.evaluation.report import WRONG_SHOWN, render_reports

    y = np.array([0, 0, 1, 1, 1])
    scores = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4], [0.95, 0.05]])
    m = {**compute_metrics(y, scores, ["ant", "bee"]), "n_train": 4, "n_test": 5}
    paths = ["ant/a.jpg", "ant/b|c.jpg", "bee/c.jpg", "bee/<d>.jpg", "bee/e.jpg"]
    reports = render_reports(y, scores, m, {}, paths=paths)
    md = reports["report.md"].decode()
    assert "## Wrong predictions (3)" in md
    shown = MarkdownIt("commonmark").enable("table").render(md.split("## Wrong predictions (3)")[1])
    assert re.findall(r"<td>(.*?)</td>", shown.split("</table>")[0]) == [  # image, true, predicted, scores
        "<code>bee/e.jpg</code>", "bee", "ant", "0.950", "0.050",
        "<code>ant/b|c.jpg</code>", "ant", "bee", "0.700", "0.300",
        "<code>bee/&lt;d&gt;.jpg</code>", "bee", "ant", "0.600", "0.400",
    ]  # fmt: skip
    page = reports["report.html"].decode()
    assert "<h2>Wrong predictions (3)</h2>" in page and "<code>bee/&lt;d&gt;.jpg</code>" in page
    assert "Wrong predictions" not in render_reports(y, np.eye(2)[y], m, {}, paths=paths)["report.md"].decode()
    n = WRONG_SHOWN + 7
    many = render_reports(np.zeros(n, int), np.tile([0.2, 0.8], (n, 1)), m, {}, paths=[f"{i}.jpg" for i in range(n)])
    assert "7 more in predictions.csv" in many["report.md"].decode()
    assert many["report.md"].decode().count("| bee | 0.800 |") == WRONG_SHOWN


def test_report_html_reads_without_the_picture():
    """report.html had no language, no viewport (phones laid it out 980 px wide) and no <main>; its confusion
    matrix was only a picture (a screen reader, or 120 classes shrunk to 1,100 px, could not read the counts);
    the parameters table had no header."""
    from imgclf.evaluation.report import render_reports

    classes = ["ant", "bee", "two  spaces"]
    y = np.array([0, 0, 1, 1, 2, 2])
    scores = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    m = {**compute_metrics(y, scores, classes), "n_train": 6, "n_test": 6}
    page = render_reports(y, scores, m, {"svm_c": 1.0})["report.html"].decode()
    assert '<html lang="en">' in page and 'name="viewport"' in page and "<main>" in page and "</main>" in page
    table = page.split("<summary>Confusion matrix as a table</summary>")[1].split("</table>")[0]
    cells = re.findall(r"<th scope='row'>(.*?)</th>((?:<td>\d+</td>)+)", table)
    assert [(c, re.findall(r"\d+", n)) for c, n in cells] == [
        ("ant", ["1", "1", "0"]), ("bee", ["0", "2", "0"]), ("two  spaces", ["1", "0", "1"])
    ]  # fmt: skip
    assert "<a href='evaluation.png' title='full size'>" in page
    assert "<table><tr><th>parameter</th><th>value</th></tr><tr><td>svm_c</td>" in page
    assert "white-space:pre-wrap" in page  # two spaces in a name stay two


def test_drawing_leaves_the_callers_matplotlib_backend_alone(tmp_path: Path):
    """train() in a notebook switched matplotlib to Agg for the whole process: plt.show() showed nothing after."""
    import matplotlib

    from imgclf.evaluation.report import evaluation_figure
    from imgclf.finetune.trainer import _plot

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # the caller's: any backend but Agg
    try:
        y = np.array([0, 0, 1, 1])
        scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
        assert evaluation_figure(y, scores, compute_metrics(y, scores, ["a", "b"])).startswith(b"\x89PNG")
        row = {"train_loss": 0.5, "train_error": 0.2, "val_loss": 0.4, "val_error": 0.1}
        _plot(tmp_path / "curves.png", [{"epoch": 1, **row}, {"epoch": 2, **row}], 2)
        assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
