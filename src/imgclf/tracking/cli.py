"""``imgclf runs list | compare | ui``: the run history recorded with MLflow."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.cli import add_config_args, config_from_args, console, port_number, positive_int, user_path
from imgclf.config import TrackingConfig
from imgclf.tracking.store import quick_http
from imgclf.utils import atomic_write_text, check_output_file, ensure_port_free

if TYPE_CHECKING:
    from rich.console import Console

    from imgclf.tracking.compare import Row

ID_SHOWN = 8  # run id characters shown by `runs list`; `runs compare` accepts such prefixes
NAME_MIN = 16  # characters of a quantity's name `runs compare` shows, however many runs share the width
VALUE_WIDTH = 24  # characters of a run's label or parameter value `runs compare` shows on a line (longer: folded)
# `runs list`'s columns by header; those kept whole on a narrow console (the others fold)
LIST_HEADERS = {
    "id": "id",
    "date": "date",
    "kind": "kind",
    "dataset": "data set",
    "classifier": "classifier",
    "backbone": "backbone",
    "split": "split",
    "accuracy": "acc",
    "class_averaged_accuracy": "class\navg acc",
    "status": "status",
    "run_dir": "folder",
}
LIST_WHOLE = ("id", "date", "accuracy", "class_averaged_accuracy", "status")
LIST_SHARED = ("kind", "dataset", "classifier", "backbone", "split")  # said once below the table where alike
UI_RUNS = "/#/experiments/{}/runs?workflowType=machine_learning"  # MLflow 3 opens on its GenAI view: no runs


def _quick_http(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` with the environment variables of ``QUICK_HTTP`` that are not set, for its duration only."""

    @functools.wraps(command)
    def quick(args: argparse.Namespace) -> int:
        with quick_http():
            return command(args)

    return quick


def _check_outputs(args: argparse.Namespace) -> bool:
    """``--csv`` and ``--markdown`` checked before the work (:func:`check_output_file`); whether one of them
    is ``-``, standard output, where the tables then give way (to standard error)."""
    if args.csv == args.markdown == "-":
        raise ValueError("--csv - and --markdown - both write to standard output: give one of them a file")
    for flag, path in (("--csv", args.csv), ("--markdown", args.markdown)):
        if path and path != "-":
            check_output_file(Path(path), flag)
    return "-" in (args.csv, args.markdown)


def _write_outputs(args: argparse.Namespace, csv_text: str, markdown: str) -> None:
    for path, text in ((args.csv, csv_text), (args.markdown, markdown)):
        if path == "-":
            sys.stdout.write(text)
        elif path:
            atomic_write_text(Path(path), text)
            print(f"wrote {path}", file=sys.stderr)  # standard output holds the tables alone


@_quick_http
def _list(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from imgclf.tracking.compare import list_cell, table_csv, table_markdown
    from imgclf.tracking.store import list_runs, store_exists, tracking_uri

    cfg = config_from_args(args).tracking
    piped = _check_outputs(args)
    runs = list_runs(cfg, args.limit + 1)  # one more than shown: whether there are more
    more, runs = len(runs) > args.limit, runs[: args.limit]
    if not runs:
        nothing = (
            "no run store there yet: nothing recorded (a mistyped --tracking-uri?)" if not store_exists(cfg) else ""
        )
        print(
            f"no runs recorded in {tracking_uri(cfg)} (experiment {cfg.experiment!r}){'; ' + nothing if nothing else ''}",
            file=sys.stderr if piped else sys.stdout,
        )
        return 0
    columns, shared = _list_columns(runs)
    years = {run["date"][:4] for run in runs}
    year = years.pop() if len(years) == 1 else None  # said once, in the header
    table = Table(title=f"Latest runs in {escape(tracking_uri(cfg))}")
    for col in columns:
        header = f"date ({year})" if col == "date" and year else LIST_HEADERS.get(col, col)
        whole = col in LIST_WHOLE  # on a narrow console the others fold (rich cut every column to "e…")
        justify = "right" if "accuracy" in col else "left"
        table.add_column(escape(header), justify=justify, no_wrap=whole, overflow="ellipsis" if whole else "fold")
    for run in runs:
        shown = {**run, "id": run["id"][:ID_SHOWN], "run_dir": Path(run["run_dir"]).name}  # the files: the path
        shown["date"] = run["date"][5:] if year else run["date"]
        shown["status"] = "" if run["status"] == "FINISHED" else run["status"]  # the unusual one stands out
        style = None if run["status"] == "FINISHED" else "yellow"
        table.add_row(*(escape(list_cell(shown[col])) for col in columns), style=style)
    out = console(stderr=piped)
    out.print(table)
    if shared:
        out.print(escape(f"every run: {', '.join(shared)}"))
    if more:
        out.print(f"the {args.limit} newest runs of more than {args.limit}: --limit N shows more")
    _write_outputs(args, table_csv(runs), table_markdown(runs))
    return 0


def _list_columns(runs: Sequence[Mapping[str, object]]) -> tuple[list[str], list[str]]:
    """The columns ``runs list`` shows, and what every run shares, said once instead: a column of
    ``LIST_SHARED`` alike in every run (of two or more), the class-averaged accuracy where it is the accuracy as
    shown; the status is left out where every run is ``FINISHED``."""
    from imgclf.tracking.compare import list_cell

    columns, shared = list(runs[0]), []
    if len(runs) > 1:
        for col in LIST_SHARED:
            values = {list_cell(run[col]) or "-" for run in runs}
            if len(values) == 1:
                columns.remove(col)
                shared.append(f"{LIST_HEADERS[col]} {values.pop()}")
        if all(list_cell(run["class_averaged_accuracy"]) == list_cell(run["accuracy"]) for run in runs):
            columns.remove("class_averaged_accuracy")
            shared.append("class-averaged accuracy = acc")
    if all(run["status"] == "FINISHED" for run in runs):
        columns.remove("status")
    return columns, shared


@_quick_http
def _compare(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from imgclf.tracking.compare import (
        SECTIONS,
        TITLES,
        compare,
        load_runs,
        paired_markdown,
        paired_tests,
        runs_table,
        table_markdown,
        to_csv,
        to_markdown,
    )

    if len(args.runs) < 2:
        raise ValueError("runs compare needs at least two runs")
    cfg = config_from_args(args).tracking
    piped = _check_outputs(args)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per run's file: noise here
    records = load_runs(args.runs, cfg)
    labels = [r.label for r in records]
    out = console(stderr=piped)
    described = runs_table(records)
    runs = Table(title="runs")
    for col in described[0]:  # on a narrow console the short columns whole, the others folded, never cut
        runs.add_column(col, no_wrap=col in ("kind", "split"), overflow="fold")
    for run in described:
        runs.add_row(*(escape(v) for v in run.values()))
    out.print(runs)
    split_note = ""
    if len({r.split for r in records}) > 1:
        split_note = "best values are marked among the runs that scored the same split (train or test) only"
        out.print(split_note)
    rows = compare(records, all_params=args.all_params)
    titles = {section: f"{title} (best ★)" for section, title in TITLES.items()}
    titles["parameter"] = "Parameters (differing ones highlighted)" if args.all_params else "Parameters that differ"
    for section in SECTIONS:
        chosen = [r for r in rows if r.section == section]
        if chosen:
            _print_section(out, titles[section], chosen, labels)
        elif section == "parameter":
            out.print("the runs have the same parameters")
    tests, notes = paired_tests(records)
    if tests:
        base = escape(labels[0])
        table = Table(title=f"Paired test against {base} on the same test images (exact McNemar)")
        for col in ("run", "test images", f"right here, wrong in {base}", "wrong here, right there", "p"):
            table.add_column(col, justify="left" if col == "run" else "right")
        table.add_column("verdict")
        for t in tests:
            verdict = "a clear difference" if t.p_value < 0.05 else "within chance (p >= 0.05)"
            table.add_row(escape(t.label), str(t.n), str(t.gained), str(t.lost), f"{t.p_value:.3g}", verdict)
        out.print(table)
    for note in notes:
        out.print(f"paired test: {escape(note)}")
    markdown = "### Runs\n\n" + table_markdown(described) + (f"\n{split_note}\n" if split_note else "")
    markdown += "\n" + to_markdown(rows, labels) + (f"\n{paired_markdown(tests, labels[0])}" if tests else "")
    _write_outputs(args, to_csv(rows, labels), markdown)
    return 0


def _print_section(out: Console, title: str, rows: list[Row], labels: list[str]) -> None:
    """A section of ``runs compare``, a row per quantity and a column per run: in tables of as many runs as fit
    the console's width, each with the name column, where all do not (rich cut every cell of 30 runs to one or
    two characters)."""
    from rich.cells import cell_len
    from rich.markup import escape
    from rich.table import Table

    from imgclf.tracking.compare import format_row

    params = rows[0].section == "parameter"
    shown = [format_row(row) for row in rows]
    # a run's column: its widest cell (" ★" included), its label folded beyond VALUE_WIDTH, and so a parameter's
    # long value (a path, a list): runs stay side by side rather than take a table each
    content = [0] * len(labels)
    for row, cells in zip(rows, shown, strict=True):
        for i, (cell, marked) in enumerate(zip(cells, row.marked, strict=True)):
            content[i] = max(content[i], cell_len(cell) + 2 * (marked and not params))
    widths = [
        max(min(cell_len(label), VALUE_WIDTH), min(c, VALUE_WIDTH) if params else c)
        for label, c in zip(labels, content, strict=True)
    ]
    longest = max(cell_len("name"), *(cell_len(r.name) for r in rows))
    name_width = min(longest, max(NAME_MIN, out.width // 3))
    chunks = _chunks(widths, out.width - name_width - 4)  # 4: the name column's padding and borders, the edge
    for chunk in chunks:
        shown_runs = f"{chunk.start + 1}-{chunk.stop}" if len(chunk) > 1 else f"{chunk.start + 1}"
        part = f", runs {shown_runs} of {len(labels)}" if len(chunks) > 1 else ""
        table = Table(title=title + part)
        table.add_column("name", no_wrap=True, min_width=name_width)
        for i in chunk:
            table.add_column(
                escape(labels[i]), justify="left" if params else "right", max_width=widths[i], overflow="fold"
            )
        for row, cells in zip(rows, shown, strict=True):
            if params:
                table.add_row(
                    escape(row.name),
                    *(escape(cells[i]) for i in chunk),
                    style="bold yellow" if any(row.marked) else None,
                )
            else:
                marked = (f"[bold green]{escape(cells[i])} ★[/]" if row.marked[i] else escape(cells[i]) for i in chunk)
                table.add_row(escape(row.name), *marked)
        out.print(table)


def _chunks(widths: list[int], room: int) -> list[range]:
    """Consecutive columns of ``widths`` characters in as few ranges as fit ``room`` each (one column at least)
    with a rich table's padding and border, 3 characters a column; as even in size as that allows (a last table
    of two runs wrapped its title)."""
    greedy, start, used = [], 0, 0
    for i, width in enumerate(widths):
        if i > start and used + width + 3 > room:
            greedy.append(range(start, i))
            start, used = i, 0
        used += width + 3
    greedy.append(range(start, len(widths)))
    size = -(-len(widths) // len(greedy))
    even = [range(i, min(i + size, len(widths))) for i in range(0, len(widths), size)]
    fit = all(len(r) == 1 or sum(widths[i] + 3 for i in r) <= room for r in even)
    return even if fit and len(even) == len(greedy) else greedy


def _ui_command(uri: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line serving a store on 127.0.0.1, to one person: one worker process (MLflow's
    four took 41-44 s to answer and 2.0-2.2 GB on 2 cores, one 14-19 s and 1.0 GB)."""
    from imgclf.tracking.store import ARTIFACT_FOLDER, sqlite_file

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    db = sqlite_file(uri)
    if db is not None:
        cmd += ["--default-artifact-root", (db.resolve().parent / ARTIFACT_FOLDER).as_uri()]
    return cmd


def ui_environment() -> dict[str, str]:
    """The environment of ``mlflow ui``: MLflow's background job runner off unless the user turned it on (it
    took eight more processes, 2.0 GB against 0.56 GB in all, and left a folder in /dev/shm; imgclf starts no
    MLflow jobs)."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | dict(os.environ)


@_quick_http
def _ui(args: argparse.Namespace) -> int:
    from imgclf.tracking.store import drain_pending, tracking_uri

    cfg = config_from_args(args).tracking
    uri = tracking_uri(cfg)
    remote = uri.startswith(("http://", "https://"))
    if not remote:
        ensure_port_free("127.0.0.1", args.port)  # before the drain: a busy port is said at once
    drain_pending(cfg)
    if remote:
        print(f"the runs are on a tracking server: open {uri} in a browser")
        return 0
    print(f"serving {uri} at {ui_address(cfg, args.port)} (Ctrl-C stops it)")
    return run_until_stopped(_ui_command(uri, args.port), ui_environment())


def ui_address(cfg: TrackingConfig, port: int) -> str:
    """The address ``runs ui`` prints: the page of the experiment's runs (MLflow 3's UI opens on its GenAI view,
    which shows none of them), or the UI's own before the experiment exists (or while it is deleted)."""
    from imgclf.tracking.store import connect, reading, store_exists

    base = f"http://127.0.0.1:{port}"
    if not store_exists(cfg):
        return base
    with reading(cfg):
        exp = connect(cfg).get_experiment_by_name(cfg.experiment)
    return base if exp is None or exp.lifecycle_stage == "deleted" else base + UI_RUNS.format(exp.experiment_id)


def run_until_stopped(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` in a process group of its own (mlflow ui runs its server in child processes) and stop the
    whole group when this command is stopped, by Ctrl-C or SIGTERM (which left the server running; ``main``
    turns SIGTERM into KeyboardInterrupt)."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        for sig, wait in ((signal.SIGTERM, 10.0), (getattr(signal, "SIGKILL", signal.SIGTERM), None)):
            with contextlib.suppress(ProcessLookupError):
                if hasattr(os, "killpg"):
                    os.killpg(proc.pid, sig)
                else:  # Windows: no process groups to signal
                    proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
                break
        return 0


STORE_FIELDS = ("tracking.tracking_uri", "tracking.experiment")  # what the runs commands read; not whether to record


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="Run history recorded with MLflow: list, compare, browse.")
    actions = p.add_subparsers(dest="runs_command", required=True, metavar="ACTION")

    q = actions.add_parser("list", help="Latest runs: id, date, data set, classifier, backbone, accuracy, status.")
    q.add_argument("--limit", type=positive_int, default=20, help="Most runs shown, newest first. [default: 20]")
    _output_args(q)
    add_config_args(q, STORE_FIELDS)
    q.set_defaults(func=_list)

    q = actions.add_parser("compare", help="Differing parameters, metrics, per-class accuracy side by side.")
    q.add_argument("runs", nargs="+", metavar="RUN", help="MLflow run ids (imgclf runs list) or run folders.")
    q.add_argument("--all-params", action="store_true", help="Show every parameter, not only differing ones.")
    _output_args(q)
    add_config_args(q, STORE_FIELDS)
    q.set_defaults(func=_compare)

    q = actions.add_parser("ui", help="Browse the runs in the MLflow web UI (mlflow ui on 127.0.0.1).")
    q.add_argument("--port", type=port_number, default=5000, help="Port of the web UI. [default: 5000]")
    add_config_args(q, STORE_FIELDS)
    q.set_defaults(func=_ui)


def _output_args(p: argparse.ArgumentParser) -> None:
    also = "; - writes it to standard output, the tables to standard error"
    p.add_argument("--csv", type=user_path, metavar="FILE", help=f"Also write the table(s) to this CSV file{also}.")
    p.add_argument(
        "--markdown", type=user_path, metavar="FILE", help=f"Also write the table(s) to this Markdown file{also}."
    )
