"""Runs side by side, given as MLflow run ids or run folders: parameters, metrics, per-class accuracy and AUC,
and a paired test of each run against the first on the same test images."""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from imgclf.config import TrackingConfig, field_index
from imgclf.evaluation.report import fmt_fraction, md_cell
from imgclf.tracking.store import (
    ExperimentDeleted,
    TrackingError,
    class_metrics,
    connect,
    deleted_experiment,
    deleted_run,
    drain_pending,
    experiment_id,
    param_value,
    reading,
    run_metrics,
    store_exists,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

T = TypeVar("T")
SECTIONS = ("parameter", "metric", "class accuracy", "class AUC")
TITLES = {
    "parameter": "Parameters",
    "metric": "Metrics",
    "class accuracy": "Accuracy per class",
    "class AUC": "AUC per class",
}
CLASS_SECTIONS = {"acc": "class accuracy", "auc": "class AUC"}  # a per-class metric's section
ACCURACIES = ("overall_accuracy", "class_averaged_accuracy", "svm_cv_accuracy")  # the run's metrics shown in percent
DIGITS_MAX = 17  # most decimals a cell gets to tell values apart
SAME_REL = 1e-12  # values closer than this (relative) are one value: 7/9 summed in another order is still 7/9
COUNTS = ("n_", "finetune_")  # metrics that count images or epochs: shown as integers, never ranked
SETTINGS = ("svm_c",)  # metrics that are choices made in training, not scores: never ranked
TIME_DIGITS = 3  # significant digits of a time shown (and ranked: more tell noise apart)
ID_LENGTH = 32  # characters of a full MLflow run id; shorter references are prefixes
RUN_COLUMNS = ("kind", "split", "dataset", "classifier", "backbone", "run_dir")  # tags shown for each run


@dataclass
class RunRecord:
    """One run as compared: a short label, its parameters (strings), metrics of the whole run, tags, and the
    metrics of each class (``acc``, ``auc``: class name -> value)."""

    label: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    predictions: dict[str, tuple[str, str]] | None = None  # test image -> (true, predicted label)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def split(self) -> str:
        """The split the run scored: test, or train (``evaluate --on-train``)."""
        return self.tags.get("split", "")


@dataclass
class PairedTest:
    """A run against the first on the same test images: exact McNemar test of the images only one gets right."""

    label: str
    n: int  # test images both runs scored
    gained: int  # right in this run, wrong in the first
    lost: int  # wrong in this run, right in the first
    p_value: float  # two-sided: how often chance alone splits gained + lost this unevenly or more


def read_predictions(text: str) -> dict[str, tuple[str, str]]:
    """``predictions.csv`` as test image -> (true, predicted label), in Unicode's composed form (a run of an
    earlier version kept a macOS copy's decomposed names)."""
    from imgclf.data.dataset import composed

    rows = csv.DictReader(io.StringIO(text))
    return {composed(r["path"]): (composed(r["true_label"]), composed(r["predicted_label"])) for r in rows}


@dataclass
class Row:
    """One compared quantity: its values per run (None where absent) and which cells stand out.

    A parameter row is marked everywhere when the runs differ; a metric row marks its best value(s).
    """

    section: str
    name: str
    values: list[str | float | None]
    marked: list[bool]


def _from_folder(folder: Path) -> RunRecord:
    """A run folder's ``config.json`` (read as saved, so older runs compare too) and ``metrics.json`` (its test
    split's); refused while a train into it has not finished."""
    from imgclf.bundle import unfinished_train

    if why := unfinished_train(folder, "it is not compared"):
        raise TrackingError(why)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TrackingError(f"{folder} is not a finished run folder (no {Path(e.filename).name})") from e
    params = {name: param_value(v) for section in config.values() for name, v in section.items()}
    tags = {k: str(metrics.get(k, "")) for k in ("classifier", "backbone")}
    tags |= {"kind": "folder", "split": "test", "dataset": Path(config["data"].get("data_root") or "").name}
    tags["run_dir"] = str(folder.resolve())
    preds = folder / "predictions.csv"
    predictions = read_predictions(preds.read_text(encoding="utf-8")) if preds.is_file() else None
    return RunRecord(folder.name, params, run_metrics(metrics), tags, predictions, class_metrics(metrics))


def _by_mlflow_name(recorded: dict[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """A run's MLflow metrics as the run's own and those of each class, by the class names in the MLflow names
    (``acc_<class>``, ``auc_<class>``): made valid for MLflow, numbered where they collided, cut where long."""
    own: dict[str, float] = {}
    per_class: dict[str, dict[str, float]] = {kind: {} for kind in CLASS_SECTIONS}
    for name, value in recorded.items():
        kind, _, cls = name.partition("_")
        if kind in per_class and cls and name not in ("auc_micro", "auc_macro"):
            per_class[kind][cls] = value
        else:
            own[name] = value
    return own, per_class


def load_runs(refs: Sequence[str | Path], cfg: TrackingConfig | None = None) -> list[RunRecord]:
    """``load_run`` of each reference, labelled apart: run folders of one name by as much of their paths as
    tells them apart (``a/run`` and ``b/run``), a run given twice numbered (``run``, ``run #2``)."""
    records = [load_run(ref, cfg) for ref in refs]
    for label in {r.label for r in records}:
        same = [r for r in records if r.label == label]
        paths = [Path(r.tags.get("run_dir") or r.label).parts for r in same]
        for n in range(2, max(map(len, paths)) + 1) if len(set(paths)) > 1 else ():
            longer = ["/".join(p[-n:]) for p in paths]
            if len(set(longer)) == len(set(paths)):  # a run given twice keeps its label, numbered below
                for r, text in zip(same, longer, strict=True):
                    r.label = text
                break
    seen: dict[str, int] = {}
    for r in records:
        seen[r.label] = seen.get(r.label, 0) + 1
        r.label += f" #{seen[r.label]}" if seen[r.label] > 1 else ""
    return records


def load_run(ref: str | Path, cfg: TrackingConfig | None = None) -> RunRecord:
    """A run folder (read directly) or an MLflow run id or id prefix (read from the store)."""
    if Path(ref).is_dir():
        return _from_folder(Path(ref))
    ref, cfg = str(ref), cfg or TrackingConfig()
    missing = TrackingError(
        f"{ref}: neither a run folder nor the id of a run of the experiment {cfg.experiment!r} in {tracking_uri(cfg)} "
        "(a run of another experiment: add --experiment NAME)"
    )
    drain_pending(cfg)
    if not store_exists(cfg):
        raise missing
    with reading(cfg):
        client = connect(cfg)
        from mlflow.exceptions import MlflowException

        if len(ref) == ID_LENGTH:
            try:
                run = client.get_run(ref)
            except MlflowException as e:
                if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise
                raise missing from e
            exp = client.get_experiment(run.info.experiment_id)
            if exp.lifecycle_stage == "deleted":
                raise ExperimentDeleted(deleted_experiment(tracking_uri(cfg), exp.name, exp.experiment_id))
        else:
            from mlflow.entities import ViewType

            exp = experiment_id(client, cfg) if ref.isalnum() else None
            where = f"attributes.run_id LIKE '{ref}%'"
            found = client.search_runs([exp], where, ViewType.ALL, max_results=2) if exp else []  # deleted: said
            if len(found) > 1:
                raise TrackingError(f"{ref}: several runs have ids starting so; give more characters")
            if not found:
                raise missing
            run = found[0]
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(deleted_run(tracking_uri(cfg), run.info.run_id))
        prefix = "train_" if run.data.tags.get("split") == "train" else ""  # the files of the split it scored
        with tempfile.TemporaryDirectory() as tmp:
            predictions = _artifact(client, run.info.run_id, f"{prefix}predictions.csv", tmp, read_predictions)
            scored = _artifact(client, run.info.run_id, f"{prefix}metrics.json", tmp, json.loads)
    data = run.data
    if scored is None:  # recorded without its files (no paired test either): classes by their MLflow names
        metrics, per_class = _by_mlflow_name(dict(data.metrics))
    else:  # the class names as written, which MLflow's names may not tell apart, or may cut
        metrics, per_class = run_metrics(scored), class_metrics(scored)
    return RunRecord(run.info.run_id[:8], dict(data.params), metrics, dict(data.tags), predictions, per_class)


def _artifact(client: MlflowClient, run_id: str, name: str, tmp: str, read: Callable[[str], T]) -> T | None:
    """The run's file ``name`` as ``read`` makes of its text; None where the run was recorded without it."""
    from mlflow.exceptions import MlflowException

    try:
        return read(Path(client.download_artifacts(run_id, name, tmp)).read_text(encoding="utf-8"))
    except (MlflowException, OSError, ValueError):
        return None


def paired_tests(records: Sequence[RunRecord]) -> tuple[list[PairedTest], list[str]]:
    """Every later run against the first, where both scored the same test images with the same labels;
    and a note for each run that cannot be paired (no predictions, or another split)."""
    from scipy.stats import binomtest

    base, tests, notes = records[0], [], []
    truth = {k: t for k, (t, _) in (base.predictions or {}).items()}
    right_base = {k for k, (t, p) in (base.predictions or {}).items() if t == p}
    for r in records[1:]:
        if base.predictions is None or r.predictions is None:
            notes.append(f"{r.label}: no predictions.csv for a paired test with {base.label}")
            continue
        if {k: t for k, (t, _) in r.predictions.items()} != truth:
            notes.append(f"{r.label}: scored other test images than {base.label} (another split or data): not paired")
            continue
        right = {k for k, (t, p) in r.predictions.items() if t == p}
        gained, lost = len(right - right_base), len(right_base - right)
        p_value = float(binomtest(gained, gained + lost).pvalue) if gained + lost else 1.0
        tests.append(PairedTest(r.label, len(r.predictions), gained, lost, p_value))
    return tests, notes


def paired_markdown(tests: Sequence[PairedTest], base: str) -> str:
    """The paired tests as a Markdown table."""
    lines = [
        f"### Paired test against {md_cell(base)} (same test images, exact McNemar)",
        "",
        "| run | test images | right only here | right only in the first | p |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {md_cell(t.label)} | {t.n} | {t.gained} | {t.lost} | {t.p_value:.3g} |" for t in tests]
    return "\n".join(lines) + "\n"


def _lower_is_better(name: str) -> bool | None:
    """Direction of a metric: times lower, counts (of images, of epochs) and settings (the SVM's C) neither,
    accuracies and AUCs higher."""
    if name.startswith("time_"):
        return True
    return None if name.startswith(COUNTS) or name in SETTINGS else False


def _best(name: str, values: list[float | None]) -> list[bool]:
    if name.startswith("time_"):  # ranked as shown: 1.231 and 1.234 s are one time
        values = [None if v is None else float(_time_text(v)) for v in values]
    present = [v for v in values if v is not None]
    lower = _lower_is_better(name)
    if lower is None or len(present) < 2 or all(_same(v, present[0]) for v in present):
        return [False] * len(values)
    best = min(present) if lower else max(present)
    return [v is not None and _same(v, best) for v in values]


def _metric_order(name: str) -> tuple[int, str]:
    ranks = {"overall_accuracy": 0, "class_averaged_accuracy": 1, "auc_macro": 2, "auc_micro": 3}
    group = next((i for i, p in enumerate(("auc_", "n_", "time_"), start=5) if name.startswith(p)), 4)
    return ranks.get(name, group), name


def _best_per_split(name: str, values: list[float | None], splits: list[str]) -> list[bool]:
    """The best values among the runs that scored the same split: a score on the images a model was fitted
    to is never ranked against test scores."""
    marked = [False] * len(values)
    for split in set(splits):
        runs = [i for i, s in enumerate(splits) if s == split]
        for i, best in zip(runs, _best(name, [values[i] for i in runs]), strict=True):
            marked[i] = best
    return marked


def runs_table(records: Sequence[RunRecord]) -> list[dict[str, str]]:
    """What each compared run is: its label and the tags of ``RUN_COLUMNS``."""
    return [{"run": r.label, **{k: r.tags.get(k, "") for k in RUN_COLUMNS}} for r in records]


def compare(records: Sequence[RunRecord], all_params: bool = False) -> list[Row]:
    """Rows of parameters (only those that differ unless ``all_params``), metrics, and accuracies and AUCs per
    class (by class name); metrics marked best among the runs of the same split."""
    rows: list[Row] = []
    order = {name: i for i, name in enumerate(field_index())}
    names = sorted({n for r in records for n in r.params}, key=lambda n: (order.get(n, len(order)), n))
    for name in names:
        values: list[str | float | None] = [r.params.get(name) for r in records]
        differs = len(set(values)) > 1
        if differs or all_params:
            rows.append(Row("parameter", name, values, [differs] * len(records)))
    splits = [r.split for r in records]
    for name in sorted({n for r in records for n in r.metrics}, key=_metric_order):
        nums = [_metric(r, name) for r in records]
        rows.append(Row("metric", name, list(nums), _best_per_split(name, nums, splits)))
    for kind, section in CLASS_SECTIONS.items():
        for cls in sorted({c for r in records for c in r.per_class.get(kind, {})}):
            nums = [r.per_class.get(kind, {}).get(cls) for r in records]
            rows.append(Row(section, cls, list(nums), _best_per_split(kind, nums, splits)))
    return rows


def _metric(record: RunRecord, name: str) -> float | None:
    """The metric ``name`` of ``record``; None where it has none, and for a ``dnn``'s ``time_fit_s`` (its head
    comes trained with the network: the ~1 µs measured is no fit step)."""
    if name == "time_fit_s" and record.tags.get("classifier") == "dnn":
        return None
    return record.metrics.get(name)


def _time_text(seconds: float) -> str:
    """``seconds`` with ``TIME_DIGITS`` significant digits, as a plain number (1234, not 1.23e+03)."""
    if seconds == 0 or not math.isfinite(seconds):
        return f"{seconds:g}"
    return f"{seconds:.{max(0, TIME_DIGITS - 1 - math.floor(math.log10(abs(seconds))))}f}"


def format_value(row: Row, value: str | float | None, digits: int = 0) -> str:
    """A cell as shown: accuracies in percent with one decimal and AUCs with three (more where rounding would
    show an imperfect value as perfect or a non-zero one as 0, as the report does), counts as integers, seconds
    with ``TIME_DIGITS`` significant digits, settings as given; numbers with ``digits`` decimals at least."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if row.section == "metric" and row.name.startswith(COUNTS):
        return str(int(value))
    if row.section == "metric" and row.name in SETTINGS:
        return f"{value:g}"
    if row.section == "metric" and row.name.startswith("time_"):
        return _time_text(value)
    pct = row.section == "class accuracy" or row.name in ACCURACIES
    if pct or row.section == "class AUC" or row.name.startswith("auc_"):
        text = fmt_fraction(value, pct)
    else:
        text = f"{value:.3f}"
    x, unit = (100 * value, " %") if pct else (value, "")
    return text if len(text.removesuffix(unit).partition(".")[2]) >= digits else f"{x:.{digits}f}{unit}"


def format_row(row: Row) -> list[str]:
    """The cells of ``row`` as shown (``format_value``), with as many more decimals as it takes for values that
    differ to print differently; times as measured, to ``TIME_DIGITS`` significant digits (ranked so too)."""
    if row.section == "metric" and row.name.startswith("time_"):
        return [format_value(row, v) for v in row.values]
    digits = 0
    while True:
        cells = [format_value(row, v, digits) for v in row.values]
        seen: dict[str, str | float | None] = {}
        if digits >= DIGITS_MAX or all(_same(seen.setdefault(c, v), v) for c, v in zip(cells, row.values, strict=True)):
            return cells
        # more decimals than any cell shows; a cell that takes none (a count) cannot hold the loop
        digits = max(digits, *(len(c.partition(".")[2].removesuffix(" %")) for c in cells)) + 1


def _same(a: str | float | None, b: str | float | None) -> bool:
    """Equal values (numbers to ``SAME_REL``), NaN equal to NaN (they print alike)."""
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=SAME_REL) or (a != a and b != b)
    return a == b


def _note(row: Row, labels: Sequence[str]) -> str:
    if row.section == "parameter":
        return "differs" if any(row.marked) else ""
    best = [label for label, m in zip(labels, row.marked, strict=True) if m]
    return f"best: {', '.join(best)}" if best else ""


def to_csv(rows: Sequence[Row], labels: Sequence[str]) -> str:
    """CSV: section, name, one raw value per run, note (``differs`` or ``best: <label>``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "name", *labels, "note"])
    for row in rows:
        w.writerow([row.section, row.name, *("" if v is None else v for v in row.values), _note(row, labels)])
    return buf.getvalue()


def to_markdown(rows: Sequence[Row], labels: Sequence[str]) -> str:
    """One Markdown table per section; differing parameters and best values in bold."""
    parts = []
    for section in SECTIONS:
        chosen = [r for r in rows if r.section == section]
        if not chosen:
            continue
        lines = [
            f"### {TITLES[section]}",
            "",
            "| name | " + " | ".join(map(md_cell, labels)) + " |",
            "|---" * (len(labels) + 1) + "|",
        ]
        for row in chosen:
            cells = [md_cell(c) for c in format_row(row)]
            cells = [f"**{c}**" if m else c for c, m in zip(cells, row.marked, strict=True)]
            lines.append(f"| {md_cell(row.name)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def table_csv(records: Sequence[dict[str, object]]) -> str:
    """CSV of dictionaries sharing the same keys (``runs list``)."""
    buf = io.StringIO()
    if records:
        w = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(records)
    return buf.getvalue()


def list_cell(value: object) -> str:
    """A ``runs list`` value as shown: a fraction as a percentage (99.96 %, never 100.0 %), none as ``-``."""
    if value is None:
        return "-"
    return fmt_fraction(value) if isinstance(value, float) else str(value)


def table_markdown(records: Sequence[Mapping[str, object]]) -> str:
    """A Markdown table of dictionaries sharing the same keys (``runs list``), values shown as on the terminal."""
    if not records:
        return ""
    keys = list(records[0])
    lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    for r in records:
        lines.append("| " + " | ".join(md_cell(list_cell(r[k])) for k in keys) + " |")
    return "\n".join(lines) + "\n"
