"""Run outputs for people: ROC + confusion-matrix figure, HTML and Markdown reports, a printed summary."""

from __future__ import annotations

import base64
import html
import io
import logging
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.config import Config
from imgclf.evaluation.metrics import roc_curves
from imgclf.utils import Memo

log = logging.getLogger("imgclf")


_MD_CELL = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\n": "&#10;", "\r": "&#13;"} | {c: "\\" + c for c in "\\`*~|"}
)


def md_cell(text: str) -> str:
    """``text`` for a Markdown table cell, shown as written: a ``|`` does not end the cell, and no HTML, code,
    emphasis, strikethrough or link starts (``_`` inside a word, which cannot, stays as it is)."""
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", lambda m: m[0].replace("_", "\\_"), text.translate(_MD_CELL))
    return text.replace("](", "\\](")


def _md_table_code(text: str) -> str:
    """``text`` as a code span in a Markdown table cell: a ``|`` in it escaped (GFM ends the cell there)."""
    return md_code(text).replace("|", "\\|")


def md_code(text: str) -> str:
    """``text`` (not empty) as a Markdown code span shown as written, line breaks as spaces: the backtick fence
    is longer than any run of backticks inside, padded with a space where the text starts or ends with a
    backtick, or with a space at both ends (CommonMark strips one there)."""
    text = text.replace("\r", " ").replace("\n", " ")
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    spaced = text[:1] == text[-1:] == " " and text.strip(" ")
    pad = " " if text[:1] == "`" or text[-1:] == "`" or spaced else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def fmt_fraction(v: float | None, pct: bool = True) -> str:
    """A fraction as a percentage with one decimal (an AUC with three); more decimals where rounding would
    show an imperfect value as perfect (2499 of 2500 is 99.96 %, not 100.0 %) or a non-zero one as 0."""
    if v is None:
        return "n/a"
    x, unit, digits, top = (100 * v, " %", 1, 100.0) if pct else (v, "", 3, 1.0)
    while digits < 6 and (float(f"{x:.{digits}f}") in (0.0, top)) and 0 < x < top:
        digits += 1
    return f"{x:.{digits}f}{unit}"


DISPLAY_ONLY = {"progress"}  # parameters of how a command shows its work, not of the results: not listed as changed
SUMMARY_CLASSES_MAX = 20  # above this, the printed summary lists the least accurate half of this many classes
MANY_CLASSES = 12  # above this, the figure labels only the weakest ROC curves and writes counts smaller
LABEL_COLUMNS = 24  # a longer class name is shortened in the figure (a wide CJK character takes two columns)
# Fonts tried after DejaVu Sans for characters it lacks (CJK, emoji), where matplotlib finds them installed.
# Not Noto Color Emoji: matplotlib draws outlines only, and that font has bitmaps (not loaded) or COLRv1 (blank).
FALLBACK_FONTS = (
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "Noto Sans JP",
    "Noto Sans SC",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "Hiragino Sans",
    "Microsoft YaHei",
    "Malgun Gothic",
    "Noto Emoji",
    "Segoe UI Emoji",
    "Symbola",
    "Noto Sans Symbols 2",
)


def _columns(text: str) -> int:
    """Display width: two columns for a wide East Asian character, none for combining and format ones."""
    return sum(
        0 if unicodedata.category(c) in ("Mn", "Me", "Cf") else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def _ellipsize(name: str, columns: int) -> str:
    """``name`` where it fits ``columns``, else its start and its end around a "…"."""
    if _columns(name) <= columns:
        return name
    head = tail = ""
    for c in name:
        if _columns(head + c) > columns // 2:
            break
        head += c
    for c in reversed(name[len(head) :]):
        if _columns(head + tail + c) >= columns:
            break
        tail = c + tail
    while tail and unicodedata.category(tail[0]) in ("Mn", "Me"):  # no mark without the letter it was on
        tail = tail[1:]
    return f"{head}…{tail}"


def short_labels(names: Sequence[str], columns: int = LABEL_COLUMNS) -> list[str]:
    """``names`` shortened for a figure (``_ellipsize``); names that would look alike keep more until they differ."""
    labels = [_ellipsize(n, columns) for n in names]
    for wider in range(columns + 1, max(map(_columns, names), default=0) + 1):
        alike = {label for label, n in Counter(labels).items() if n > 1}
        if not alike:
            break
        labels = [_ellipsize(n, wider) if label in alike else label for n, label in zip(names, labels, strict=True)]
    return labels


def font_families() -> list[str]:
    """DejaVu Sans, then the installed ``FALLBACK_FONTS``: matplotlib takes a character from the first that has it."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(f for f in FALLBACK_FONTS if f in installed)]


def _missing_glyphs(text: str, families: Sequence[str]) -> list[str]:
    """The characters of ``text`` that none of ``families`` has (drawn as boxes)."""
    from matplotlib import font_manager

    fonts = [font_manager.get_font(font_manager.findfont(f, fallback_to_default=False)) for f in families]
    return sorted(
        c
        for c in set(text)
        if unicodedata.category(c)[0] not in "CZM" and not any(f.get_char_index(ord(c)) for f in fonts)
    )


def evaluation_figure(y_true: np.ndarray, scores: np.ndarray, metrics: dict[str, Any]) -> bytes:
    """PNG bytes: ROC curves with AUC (left, its legend beside it) and the confusion matrix (right), sized to
    the number of classes. Long class names are shortened (``short_labels``); characters DejaVu Sans lacks
    come from an installed ``FALLBACK_FONTS`` font, and are boxes (one log line, no warnings) without one."""
    import matplotlib

    classes = metrics["classes"]
    short = dict(zip(classes, short_labels(classes), strict=True))
    families = font_families()
    side = max(4.0, 0.2 * len(classes) + 1.0)  # the confusion matrix gets about 0.2 inch a class
    roc = max(4.5, 0.45 * side)  # the ROC panel grows with it, less, and its text with it
    with warnings.catch_warnings(), matplotlib.rc_context({"font.family": families, "font.size": 10 * roc / 4.5}):
        warnings.filterwarnings("ignore", "Glyph .* missing from font")  # told once below
        png = _draw(y_true, scores, metrics, short, (side, roc))
    if missing := _missing_glyphs("".join(short.values()), families):
        log.info(
            "evaluation.png: no installed font has %s (drawn as boxes); fonts such as Noto Sans CJK or Noto Emoji do",
            " ".join(missing[:10]) + (" …" if len(missing) > 10 else ""),
        )
    return png


def _draw(
    y_true: np.ndarray,
    scores: np.ndarray,
    metrics: dict[str, Any],
    short: dict[str, str],
    sizes: tuple[float, float],
) -> bytes:
    """``evaluation_figure``'s drawing: class names as ``short`` has them, ``sizes`` the sides of the confusion
    matrix and the ROC panel in inches, text of ``font.size`` (but the matrix's labels) scaled with the latter."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend (a notebook's) stays as it is

    classes = metrics["classes"]
    k = len(classes)
    cm = np.asarray(metrics["confusion_matrix"])
    side, roc = sizes
    scale = roc / 4.5
    # Widths: the panels, the ROC axis labels and legend, the matrix's class names (at most LABEL_COLUMNS, at 6 to
    # 8 points). Both panels hang from the top, as wide as that allows: the space left below is cut off when saved.
    fig = Figure(figsize=(roc + side + 3.6 * scale + 2.0, 1.5 * max(roc, side) + 4), layout="constrained")
    ax_roc, ax_cm = fig.subplots(1, 2, width_ratios=[roc, side])
    curves, micro = roc_curves(y_true, scores, classes)
    auc = metrics["auc"]["per_class"]
    labelled = set(curves)
    if k > MANY_CLASSES:  # a legend of every class is unreadable: label the five weakest, draw the rest faintly
        labelled = set(sorted(labelled, key=lambda c: (auc[c], c))[:5])
    # Legend entries are given explicitly: matplotlib leaves out a label starting with "_" (a class name too).
    handles: list[Any] = []
    labels: list[str] = []
    for name, (fpr, tpr) in curves.items():
        if name in labelled:
            handles += ax_roc.plot(fpr, tpr, linewidth=1.5 * scale)
            labels.append(f"{short[name]} (AUC {fmt_fraction(auc[name], False)})")
        else:
            ax_roc.plot(fpr, tpr, color="tab:blue", alpha=0.25, linewidth=0.8 * scale)
    if micro is not None:
        handles += ax_roc.plot(*micro, linestyle="--", color="black", linewidth=1.5 * scale, zorder=3)
        labels.append(f"micro-average (AUC {fmt_fraction(metrics['auc']['micro'], False)})")
    ax_roc.plot([0, 1], [0, 1], color="grey", linewidth=0.8 * scale)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    title = f"ROC ({short[classes[1]]} vs {short[classes[0]]})" if k == 2 else "ROC (one vs rest)"
    ax_roc.set_title(title + (f"; the {len(labelled)} lowest AUC labelled" if k > MANY_CLASSES else ""))
    ax_roc.set_box_aspect(1)
    legend = ax_roc.legend(
        handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize="small"
    )
    for text in [*legend.get_texts(), ax_roc.title]:
        text.set_parse_math(False)  # class names as written: a "$" is no mathtext
    ax_cm.imshow(cm, cmap="Blues")
    ax_cm.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title="confusion matrix")
    for ax in (ax_roc, ax_cm):
        ax.set_anchor("N")
    font = 8 if k <= MANY_CLASSES else 6
    ticks = [short[c] for c in classes]
    ax_cm.set_xticklabels(ticks, rotation=45 if k <= MANY_CLASSES else 90, ha="right", fontsize=font, parse_math=False)
    ax_cm.set_yticklabels(ticks, fontsize=font, parse_math=False)
    for i in range(k):
        for j in range(k):
            if cm[i, j] or k <= MANY_CLASSES:  # many classes: zeros left blank
                color = "white" if cm[i, j] > cm.max() / 2 else "black"
                ax_cm.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=font + 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.1)
    return buf.getvalue()


def summary_lines(metrics: dict[str, Any], max_classes: int = SUMMARY_CLASSES_MAX) -> list[str]:
    """The tutorial's printed summary: one line per class, then overall and class-averaged accuracy.

    Beyond ``max_classes`` classes, only the ``max_classes // 2`` least accurate are listed (ties by name).
    """
    lines = []
    classes = list(metrics["classes"])
    acc, auc = metrics["per_class_accuracy"], metrics["auc"]["per_class"]
    if len(classes) > max_classes:
        classes = sorted(classes, key=lambda c: (acc[c] if acc[c] is not None else 2.0, c))[: max_classes // 2]
        lines.append(f"The {len(classes)} least accurate of {len(metrics['classes'])} classes (all in report.html):")
    width = max(len(c) for c in classes)
    for c in classes:
        n = metrics["per_class_support"][c]
        lines.append(
            f"Class {c:<{width}}: accuracy {fmt_fraction(acc[c]):>8} (n={n}, AUC {fmt_fraction(auc[c], False)})"
        )
    overall, micro, macro = (
        fmt_fraction(metrics["overall_accuracy"]),
        fmt_fraction(metrics["auc"]["micro"], False),
        fmt_fraction(metrics["auc"]["macro"], False),
    )
    lines.append(f"Overall accuracy       : {overall} (n={metrics['n_test']}{_interval(metrics)})")
    lines.append(f"Class-averaged accuracy: {fmt_fraction(metrics['class_averaged_accuracy'])}")
    lines.append(f"AUC micro / macro      : {micro} / {macro}")
    if "classifier" in metrics:
        lines.append(f"Model                  : {_model(metrics)}")
    return lines


def _interval(metrics: dict[str, Any]) -> str:
    ci = metrics.get("overall_accuracy_ci95")
    return f"; 95 % interval {ci[0] * 100:.1f} to {ci[1] * 100:.1f} %" if ci else ""


def _model(metrics: dict[str, Any]) -> str:
    return f"{metrics['classifier']} on {metrics['backbone']}, {metrics['resolution']} px input"


SKIPPED_OPEN_MAX = 20  # a longer list of skipped files starts folded in report.html
MATRIX_OPEN_MAX = 10  # the confusion matrix of more classes starts folded as a table in report.html
WRONG_SHOWN = 50  # wrong predictions listed in the reports, the most confident first (predictions.csv has all)


def wrong_predictions(
    paths: Sequence[str], y_true: np.ndarray, scores: np.ndarray, classes: Sequence[str]
) -> list[tuple[str, str, str, float, float]]:
    """(path, true class, predicted class, its score, the true class's score) of each wrongly classified
    image, the most confident mistakes first (ties by path)."""
    pred = scores.argmax(1)
    wrong = np.flatnonzero(pred != y_true)
    rows = [
        (paths[i], classes[y_true[i]], classes[pred[i]], float(scores[i, pred[i]]), float(scores[i, y_true[i]]))
        for i in wrong
    ]
    return sorted(rows, key=lambda r: (-r[3], r[0]))


def render_reports(
    y_true: np.ndarray,
    scores: np.ndarray,
    metrics: dict[str, Any],
    params: dict[str, Any],
    extra_figures: dict[str, Path] | None = None,
    memo: Memo | None = None,
    paths: Sequence[str] | None = None,
) -> dict[str, bytes]:
    """The content of ``evaluation.png``, ``report.html`` and ``report.md`` by file name (the caller writes
    them, with the run's other results, as one unit).

    With ``memo``, the figure of identical labels and scores is read back instead of drawn again. With
    ``paths`` (the scored images, in the order of ``y_true``), the reports list the wrong predictions.
    """
    memo = memo or Memo(None, "figures")
    shown = {k: metrics[k] for k in ("classes", "auc", "confusion_matrix")}
    key = Memo.key(
        "figure", shown, np.asarray(y_true, np.int64), np.asarray(scores), Path(__file__), version("matplotlib")
    )
    png = memo.compute(key, lambda: evaluation_figure(y_true, scores, metrics))
    figures = {
        "ROC curves and confusion matrix": ("evaluation.png", png),
        **{title: (p.name, p.read_bytes()) for title, p in (extra_figures or {}).items()},
    }
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{fmt_fraction(metrics['per_class_accuracy'][c])}</td>"
        f"<td>{metrics['per_class_support'][c]}</td><td>{fmt_fraction(metrics['auc']['per_class'][c], False)}</td></tr>"
        for c in metrics["classes"]
    )
    skipped = metrics.get("skipped", [])
    notes = metrics.get("notes", [])
    notes_html = "".join(f"<li><code>{html.escape(n['path'])}</code>: {html.escape(n['note'])}</li>" for n in notes)
    skipped_html = "".join(
        f"<li><code>{html.escape(s['path'])}</code>: {html.escape(s['reason'])}</li>" for s in skipped
    )
    figs_html = "".join(  # in the page (it travels alone), and a link to the file beside it at full size
        f"<h2>{html.escape(title)}</h2><a href='{html.escape(name)}' title='full size'><img alt='{html.escape(title)}"
        f"{' (the confusion matrix also as a table below)' if name == 'evaluation.png' else ''}' style='max-width:100%' "
        f"src='data:image/png;base64,{base64.b64encode(data).decode()}'></a>"
        for title, (name, data) in figures.items()
    )
    classes = [html.escape(c) for c in metrics["classes"]]
    matrix_rows = "".join(
        f"<tr><th scope='row'>{c}</th>{''.join(f'<td>{n}</td>' for n in row)}</tr>"
        for c, row in zip(classes, metrics["confusion_matrix"], strict=True)
    )
    matrix_html = (
        f"<details{' open' if len(classes) <= MATRIX_OPEN_MAX else ''}><summary>Confusion matrix as a table</summary>"
        "<table><caption>test images by true class (rows) and predicted class (columns)</caption>"
        f"<tr><th scope='col'>true \\ predicted</th>{''.join(f'<th scope=col>{c}</th>' for c in classes)}</tr>"
        f"{matrix_rows}</table></details>"
    )
    param_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in params.items())
    defaults = Config().flat()
    changed = [k for k, v in params.items() if k in defaults and defaults[k] != v and k not in DISPLAY_ONLY]
    changed_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(params[k]))}</td><td>{html.escape(str(defaults[k]))}</td></tr>"
        for k in changed
    )
    many = len(skipped) > SKIPPED_OPEN_MAX
    wrong = [] if paths is None else wrong_predictions(paths, y_true, scores, metrics["classes"])
    more_wrong = (  # own text with a command in backticks: Markdown as is, HTML with <code>
        f"{len(wrong) - WRONG_SHOWN} more in predictions.csv; `imgclf ui DATA --run RUN` shows all with their images"
        if len(wrong) > WRONG_SHOWN
        else "`imgclf ui DATA --run RUN` shows them with their images"
    )
    more_wrong_html = re.sub("`(.*?)`", r"<code>\1</code>", more_wrong)
    wrong_html = "".join(
        f"<tr><td><code>{html.escape(p)}</code></td><td>{html.escape(t)}</td><td>{html.escape(q)}</td>"
        f"<td>{sq:.3f}</td><td>{st:.3f}</td></tr>"
        for p, t, q, sq, st in wrong[:WRONG_SHOWN]
    )
    wrong_section = (
        f"<h2>Wrong predictions ({len(wrong)})</h2><details{' open' if len(wrong) <= SKIPPED_OPEN_MAX else ''}>"
        f"<summary>the most confident first; {more_wrong_html}</summary><table><tr><th>image</th><th>true</th>"
        f"<th>predicted</th><th>its score</th><th>true class's score</th></tr>{wrong_html}</table>"
        "</details>"
        if wrong
        else ""
    )
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>imgclf report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;white-space:pre-wrap}}
details{{overflow-x:auto}}caption{{text-align:left;color:#555}}</style></head><body><main>
<h1>imgclf report</h1>
<p>Overall accuracy <b>{fmt_fraction(metrics["overall_accuracy"])}</b> (n={metrics["n_test"]}{_interval(metrics)}),
class-averaged accuracy
<b>{fmt_fraction(metrics["class_averaged_accuracy"])}</b>, AUC micro {fmt_fraction(metrics["auc"]["micro"], False)} /
macro {fmt_fraction(metrics["auc"]["macro"], False)}; {metrics["n_train"]} training and {metrics["n_test"]} test images.
{f"Model: {html.escape(_model(metrics))}." if "classifier" in metrics else ""}</p>
<table><tr><th>class</th><th>accuracy</th><th>test images</th><th>AUC</th></tr>{rows}</table>
{figs_html}
{matrix_html}
{wrong_section}
<h2>Skipped files ({len(skipped)})</h2>
{"<details><summary>show them</summary>" if many else ""}<ul>{skipped_html or "<li>none</li>"}</ul>{"</details>" if many else ""}
{f"<h2>Notes ({len(notes)})</h2><ul>{notes_html}</ul>" if notes else ""}
<h2>Parameters</h2>
<p>Differing from this imgclf's defaults ({len(changed)}):</p>
<table><tr><th>parameter</th><th>value</th><th>default</th></tr>{changed_rows}</table>
<details><summary>All {len(params)} parameters</summary><table><tr><th>parameter</th><th>value</th></tr>{param_rows}</table>
</details></main></body></html>"""
    md = [
        "# imgclf report",
        "",
        "```",
        *summary_lines(metrics),
        "```",
        "",
        "| class | accuracy | test images | AUC |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {md_cell(c)} | {fmt_fraction(metrics['per_class_accuracy'][c])} | {metrics['per_class_support'][c]} | "
        f"{fmt_fraction(metrics['auc']['per_class'][c], False)} |"
        for c in metrics["classes"]
    ]
    md += ["", *[f"![{title}]({file})" for title, (file, _) in figures.items()]]
    if wrong:
        md += ["", f"## Wrong predictions ({len(wrong)})", "", f"The most confident first; {more_wrong}.", ""]
        md += ["| image | true | predicted | its score | true class's score |", "|---|---|---|---|---|"]
        md += [
            f"| {_md_table_code(p)} | {md_cell(t)} | {md_cell(q)} | {sq:.3f} | {st:.3f} |"
            for p, t, q, sq, st in wrong[:WRONG_SHOWN]
        ]
    md += ["", f"## Skipped files ({len(skipped)})", ""]
    md += [f"- {md_code(s['path'])}: {md_cell(s['reason'])}" for s in skipped] or ["none"]
    if notes:
        md += ["", f"## Notes ({len(notes)})", "", *[f"- {md_code(n['path'])}: {md_cell(n['note'])}" for n in notes]]
    md += ["", "## Parameters", "", f"Differing from this imgclf's defaults ({len(changed)}; all in config.json):", ""]
    md += ["| parameter | value | default |", "|---|---|---|"] if changed else ["none"]
    md += [f"| {k} | {md_cell(str(params[k]))} | {md_cell(str(defaults[k]))} |" for k in changed]
    return {"evaluation.png": png, "report.html": page.encode(), "report.md": ("\n".join(md) + "\n").encode()}
