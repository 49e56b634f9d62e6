"""Run history: runs recorded offline in a local MLflow store or on an MLflow server, listed and compared."""

from __future__ import annotations

import contextlib
import csv
import errno
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import make_folder

from imgclf.cli import main
from imgclf.config import Config, TrackingConfig
from imgclf.evaluation.report import fmt_fraction
from imgclf.pipeline import RunResult, evaluate, train
from imgclf.tracking import TrackingError, drain_pending, log_run
from imgclf.tracking.store import drain, queue_dir, tracking_uri

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of an `mlflow server` on a free local port; started first so that it boots while runs train."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(root / "server.log", "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    yield f"http://127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, server: str) -> Iterator[Path]:
    """Working folder of the default local store (mlflow.db, mlruns/); MLFLOW_TRACKING_URI unset."""
    root = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield root


@pytest.fixture(scope="module")
def base_cfg(work: Path) -> Config:
    data = make_folder(work / "data", n=8)
    return Config().updated(
        data_root=data,
        resolution=96,
        cache_dir=work / "cache",
        flip_tta=False,
        svm_c_grid=[1.0],
        cv_folds=2,
        progress=False,
    )


@pytest.fixture(scope="module")
def two_runs(base_cfg: Config, work: Path) -> tuple[RunResult, RunResult]:
    a = train(base_cfg.updated(out=work / "runs" / "a"))
    b = train(base_cfg.updated(out=work / "runs" / "b", l2_normalize=False, svm_c_grid=[0.5]))
    return a, b


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str) -> list:
    drain_pending(TrackingConfig(tracking_uri=uri))  # runs still queued for the background writer
    client = _client(uri)
    exp = client.get_experiment_by_name("imgclf")
    order = ["attributes.start_time ASC"]
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=order)


def test_train_and_evaluate_land_in_local_store(
    two_runs: tuple[RunResult, RunResult], work: Path, monkeypatch: pytest.MonkeyPatch
):
    evaluate(two_runs[0].run_dir, on_train=True)
    runs = _runs("sqlite:///mlflow.db")
    assert (work / "mlflow.db").is_file() and (work / "mlruns").is_dir()
    assert [r.data.tags["kind"] for r in runs] == ["train", "train", "evaluate"]
    run = runs[0]
    assert run.data.params["l2_normalize"] == "true" and run.data.params["svm_c_grid"] == "[1.0]"
    assert run.data.params["train_fraction"] == "0.75"
    recorded = json.loads((two_runs[0].run_dir / "config.json").read_text(encoding="utf-8"))
    assert set(run.data.params) == {name for section in recorded.values() for name in section}  # no resume
    assert {
        "overall_accuracy",
        "class_averaged_accuracy",
        "acc_circles",
        "auc_macro",
        "auc_squares",
        "n_train",
        "n_test",
        "time_total_s",
    } <= set(run.data.metrics)
    assert run.data.metrics["n_test"] == two_runs[0].metrics["n_test"]
    tags = run.data.tags
    assert (tags["dataset"], tags["classifier"], tags["backbone"]) == ("data", "svm", "efficientnet_lite0")
    assert tags["run_dir"] == str((work / "runs" / "a").resolve())
    client = _client("sqlite:///mlflow.db")
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "report.md", "evaluation.png", "predictions.csv", "split.csv", "model"} <= files
    assert "model/bundle.json" in {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert runs[2].data.tags["split"] == "train"
    assert runs[2].data.metrics["n_test"] == runs[2].data.metrics["n_train"]
    from imgclf.tracking.compare import load_run

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)  # as a notebook's process has it
    on_train = load_run(runs[2].info.run_id[:8], TrackingConfig())  # pairs its training-split predictions
    assert on_train.predictions is not None and len(on_train.predictions) == runs[2].data.metrics["n_train"]
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # the caller's MLflow keeps its bars


def test_runs_list_and_compare(two_runs: tuple[RunResult, RunResult], work: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["runs", "list", "--csv", "list.csv", "--markdown", "list.md"]) == 0
    ids = [line.split(",")[0] for line in (work / "list.csv").read_text().splitlines()[1:]]
    listed_runs = list(csv.DictReader((work / "list.csv").open()))
    md_rows = [line.split(" | ") for line in (work / "list.md").read_text().splitlines()[2:]]
    accuracy = list((work / "list.md").read_text().splitlines()[0].split(" | ")).index("accuracy")
    # the CSV keeps the fraction; the Markdown table shows it as the terminal does (it wrote 0.8888888888888888)
    assert [r[accuracy] for r in md_rows] == [fmt_fraction(float(r["accuracy"])) for r in listed_runs]
    assert {r["split"] for r in listed_runs if r["kind"] == "train"} == {"test"}  # evaluate --on-train: "train"
    train_a = _runs("sqlite:///mlflow.db")[0].info.run_id
    assert train_a in ids
    listed = capsys.readouterr().out  # into a pipe: whole names, not rich's 80 columns of "effi…"
    assert "every run: data set data, classifier svm, backbone efficientnet_lite0" in listed  # said once
    # A run id prefix (as `runs list` shows it) and a run folder.
    assert (
        main(["runs", "compare", train_a[:8], str(work / "runs" / "b"), "--markdown", "cmp.md", "--csv", "cmp.csv"])
        == 0
    )
    out, err = capsys.readouterr()
    assert "Downloading artifacts" not in err  # MLflow's progress bar, one per run compared
    assert "l2_normalize" in out and "svm_c_grid" in out and "train_fraction" not in out
    assert "circles" in out and "overall_accuracy" in out
    md = (work / "cmp.md").read_text()
    assert "| l2_normalize | **true** | **false** |" in md
    assert "| svm_c_grid | **[1.0]** | **[0.5]** |" in md
    assert "### Accuracy per class" in md and "| stripes |" in md
    n_test = two_runs[1].metrics["n_test"]  # the stored run's predictions.csv paired with the folder's
    assert "Paired test against" in out and f"### Paired test against {train_a[:8]}" in md
    assert f"| b | {n_test} |" in md
    assert "wrote cmp.csv" in err and "wrote" not in out  # standard output holds the tables alone
    rows = (work / "cmp.csv").read_text().splitlines()
    assert rows[0] == f"section,name,{train_a[:8]},b,note"
    # `-`: that table on standard output, the rest on standard error (it wrote a file "-")
    assert main(["runs", "compare", train_a[:8], str(work / "runs" / "b"), "--csv", "-"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == rows and "Paired test against" in err and not (work / "-").exists()
    assert main(["runs", "list", "--markdown", "-", "--csv", "list2.csv"]) == 0  # one listing, both forms
    listed_md = capsys.readouterr().out
    ids = [line.split(",")[0] for line in (work / "list2.csv").read_text().splitlines()[1:]]
    assert listed_md.startswith("| id |") and len(listed_md.splitlines()) == len(ids) + 2
    assert all(run_id in listed_md for run_id in ids)
    assert main(["runs", "list", "--markdown", "-", "--csv", "-"]) == 2
    assert "both write to standard output" in capsys.readouterr().err
    assert "parameter,l2_normalize,true,false,differs" in rows
    assert any(r.startswith("class accuracy,circles,") for r in rows)


def test_no_tracking_and_failures_never_break_runs(
    two_runs: tuple[RunResult, RunResult], base_cfg: Config, work: Path, caplog: pytest.LogCaptureFixture
):
    before = len(_runs("sqlite:///mlflow.db"))
    train(base_cfg.updated(out=work / "runs" / "off", tracking=False))
    assert len(_runs("sqlite:///mlflow.db")) == before
    bad = base_cfg.updated(tracking_uri="nosuchstore://nowhere", tracking_background=False)
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert log_run("train", bad, two_runs[0]) is None
    assert "not recorded" in caplog.text


def test_a_folder_as_store_is_a_sqlite_store_in_it(
    two_runs: tuple[RunResult, RunResult], base_cfg: Config, work: Path, monkeypatch: pytest.MonkeyPatch
):
    """MLflow refuses its old plain-folder store; a folder given as the store holds a SQLite one instead."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert tracking_uri(TrackingConfig(tracking_uri="runs/mlruns")) == "sqlite:///runs/mlruns/mlflow.db"
    assert tracking_uri(TrackingConfig(tracking_uri="file:///srv/a%20b")) == "sqlite:////srv/a b/mlflow.db"
    assert tracking_uri(TrackingConfig(tracking_uri="team.db")) == "sqlite:///team.db"
    for kept in ("http://mlflow.example.org:5000", "sqlite:///x.db", "databricks"):
        assert tracking_uri(TrackingConfig(tracking_uri=kept)) == kept
    folder = work / "new" / "store"  # does not exist yet
    cfg = base_cfg.updated(tracking_uri=str(folder), tracking_background=False)
    run_id = log_run("train", cfg, two_runs[0])
    assert run_id is not None and (folder / "mlflow.db").is_file() and (folder / "mlruns").is_dir()
    assert [r.info.run_id for r in _runs(f"sqlite:///{folder / 'mlflow.db'}")] == [run_id]


def test_unreachable_store_is_a_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    from imgclf.tracking import list_runs

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(TrackingError, match=r"cannot read the run store http://127\.0\.0\.1:9"):
        list_runs(TrackingConfig(tracking_uri="http://127.0.0.1:9"))
    assert main(["runs", "compare", "0" * 32, "1" * 8, "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "cannot read the run store" in capsys.readouterr().err


def test_background_writer_records_runs_and_reports_failures(
    two_runs: tuple[RunResult, RunResult], base_cfg: Config, work: Path, caplog: pytest.LogCaptureFixture
):
    uri = f"sqlite:///{work / 'background.db'}"
    cfg = base_cfg.updated(tracking_uri=uri)
    assert cfg.tracking.tracking_background
    assert log_run("train", cfg, two_runs[0]) is None  # queued: the id is not known yet
    deadline = time.monotonic() + 120
    while any(queue_dir(uri).glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the detached writer drains the queue on its own
    runs = _runs(uri)
    assert [r.data.tags["run_dir"] for r in runs] == [str((work / "runs" / "a").resolve())]
    assert runs[0].data.metrics["overall_accuracy"] == two_runs[0].metrics["overall_accuracy"]
    # While the store cannot be read, whoever drains the queue says so and the record stays queued;
    # once the store is mended, the next drain writes it.
    broken = work / "broken.db"
    broken.write_text("not a database")
    bad = base_cfg.updated(tracking_uri=f"sqlite:///{broken}")
    errors = queue_dir(bad.tracking.tracking_uri) / "writer.log"
    errors.parent.mkdir(parents=True, exist_ok=True)
    errors.write_bytes(b"old warning\n" * 20)
    monkey = pytest.MonkeyPatch()
    monkey.setattr("imgclf.tracking.store.subprocess.Popen", lambda *a, **k: None)  # no writer: drain here
    monkey.setattr("imgclf.tracking.store._WRITER_LOG_MAX", 100)
    try:
        assert log_run("train", bad, two_runs[0]) is None
    finally:
        monkey.undo()
    assert errors.with_name("writer.log.1").read_bytes() == b"old warning\n" * 20  # the writer's log is capped
    assert errors.stat().st_size == 0
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        drain(bad.tracking.tracking_uri)  # the background writer
    assert "runs not recorded in" in caplog.text and "1 record(s) stay queued in" in caplog.text
    with pytest.raises(TrackingError, match=r"cannot be read: .*; 1 run\(s\) stay queued in"):
        drain_pending(bad.tracking)  # a reader: the store is not tried a second time
    assert len(list(queue_dir(bad.tracking.tracking_uri).glob("*.json"))) == 1
    broken.unlink()  # mended; a new process drains (MLflow keeps a store's first connection per process)
    subprocess.run([sys.executable, "-m", "imgclf.tracking.writer", bad.tracking.tracking_uri], check=True)
    with contextlib.closing(sqlite3.connect(broken)) as db:  # this process's MLflow still sees the broken file
        tags = db.execute("SELECT value FROM tags WHERE key = 'run_dir'").fetchall()
        (accuracy,) = db.execute("SELECT value FROM metrics WHERE key = 'overall_accuracy'").fetchone()
    assert tags == [(str((work / "runs" / "a").resolve()),)]
    assert accuracy == pytest.approx(two_runs[0].metrics["overall_accuracy"])
    assert not any(queue_dir(bad.tracking.tracking_uri).glob("*.json"))


def test_a_queued_run_keeps_its_own_files(
    two_runs: tuple[RunResult, RunResult], base_cfg: Config, work: Path, monkeypatch: pytest.MonkeyPatch
):
    """The next run into the same folder (runs/latest) must not change what a queued record logs."""
    import shutil

    from imgclf.utils import atomic_dir, atomic_write_text

    run_dir = work / "runs" / "snapshot"
    shutil.copytree(two_runs[0].run_dir, run_dir)
    (run_dir / "leaks.csv").write_text("left by an earlier run\n")
    (run_dir / "notes.txt").write_text("the user's own file\n")
    first = train(base_cfg.updated(out=run_dir, tracking=False))
    assert not (run_dir / "leaks.csv").exists() and (run_dir / "notes.txt").is_file()  # only stale results go
    uri = f"sqlite:///{work / 'snapshot.db'}"
    monkeypatch.setattr("imgclf.tracking.store.subprocess.Popen", lambda *a, **k: None)  # no writer: drain below
    assert log_run("train", base_cfg.updated(tracking_uri=uri), first) is None
    monkeypatch.undo()  # MLflow itself starts processes
    config = (run_dir / "config.json").read_bytes()
    atomic_write_text(run_dir / "config.json", "{}")  # a next run replaces the files, as every run does
    with atomic_dir(run_dir / "model") as tmp:
        (tmp / "bundle.json").write_text("{}")
    (run,) = _runs(uri)
    client = _client(uri)
    got = Path(client.download_artifacts(run.info.run_id, "config.json", str(work / "downloaded")))
    assert got.read_bytes() == config
    assert "model/head.npz" in {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert {p.name for p in queue_dir(uri).iterdir()} == {".lock", "writer.log"}  # record and snapshot gone


def test_runs_land_on_tracking_server(server: str, base_cfg: Config, work: Path, monkeypatch: pytest.MonkeyPatch):
    _wait_for(server)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    result = train(base_cfg.updated(out=work / "runs" / "remote"))
    (run,) = _runs(server)
    assert run.data.tags["run_dir"] == str(result.run_dir.resolve())
    assert run.data.metrics["overall_accuracy"] == result.metrics["overall_accuracy"]
    assert "report.html" in {f.path for f in _client(server).list_artifacts(run.info.run_id)}


def test_mlflow_is_imported_lazily():
    code = "import sys, imgclf.cli, imgclf.tracking; imgclf.cli.build_parser(); sys.exit('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_paired_test_counts_the_images_only_one_run_gets_right():
    from imgclf.tracking.compare import RunRecord, paired_tests

    truth = {f"x/{i}.jpg": "x" for i in range(20)}

    def run(label: str, wrong: set[int], paths: dict[str, str] = truth) -> RunRecord:
        preds = {p: (t, "y" if int(p[2:-4]) in wrong else t) for p, t in paths.items()}
        return RunRecord(label, {}, {}, {}, preds)

    base = run("base", wrong=set(range(9)))  # 9 wrong
    better = run("better", wrong={0})  # 8 gained, none lost
    mixed = run("mixed", wrong={0, 1, 2, 9, 10})  # 6 gained, 2 lost
    other = run("other", set(), {f"x/{i}.jpg": "x" for i in range(19)})
    tests, notes = paired_tests([base, better, mixed, other, RunRecord("bare", {}, {}, {})])
    assert [(t.label, t.n, t.gained, t.lost) for t in tests] == [("better", 20, 8, 0), ("mixed", 20, 6, 2)]
    assert tests[0].p_value == pytest.approx(2 / 2**8)  # all 8 discordant images one way, either way
    assert tests[1].p_value == pytest.approx(2 * (1 + 8 + 28) / 2**8)  # at most 2 of 8 one way, either way
    assert "other: scored other test images" in notes[0] and "bare: no predictions.csv" in notes[1]


def test_runs_of_a_decomposed_copy_pair_with_composed_ones():
    """A run of an earlier version kept a macOS copy's decomposed names (e + accent): the same test images,
    compared with a later run's composed ones, were taken for another split."""
    from imgclf.tracking.compare import RunRecord, paired_tests, read_predictions

    def csv_of(form: str) -> str:
        import unicodedata

        rows = ["path,true_label,predicted_label"] + [f"café/{i}.jpg,café,café" for i in range(5)]
        return unicodedata.normalize(form, "\n".join(rows) + "\n")

    old, new = (RunRecord(form, {}, {}, {}, read_predictions(csv_of(form))) for form in ("NFD", "NFC"))
    tests, notes = paired_tests([old, new])
    assert [(t.n, t.gained, t.lost) for t in tests] == [(5, 0, 0)] and not notes


def test_metric_keys_stay_apart_when_class_names_do_not():
    """MLflow refuses ':' and '?' in metric names: both become '_', and the later name gets a number."""
    import numpy as np

    from imgclf.evaluation.metrics import compute_metrics
    from imgclf.tracking.store import flat_metrics

    classes = ["a:b", "a?b", "a_b_2", "micro"]
    y = np.repeat(np.arange(4), 3)
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 0, 0, 0, 0, 0])  # 3, 2, 1 and 0 of 3 right
    scores = np.eye(4)[pred] + np.random.default_rng(0).random((len(y), 4))
    m = compute_metrics(y, scores, classes)
    flat = flat_metrics(m)
    acc = m["per_class_accuracy"]
    assert len(set(acc.values())) == 4  # else a value under the wrong key could go unnoticed
    assert {k: v for k, v in flat.items() if k.startswith("acc_")} == {
        "acc_a_b": acc["a:b"],
        "acc_a_b_2": acc["a?b"],
        "acc_a_b_2_2": acc["a_b_2"],
        "acc_micro": acc["micro"],
    }
    auc = m["auc"]["per_class"]
    assert len({*auc.values(), m["auc"]["micro"]}) == 5
    assert (flat["auc_micro"], flat["auc_macro"]) == (m["auc"]["micro"], m["auc"]["macro"])
    assert (flat["auc_a_b"], flat["auc_a_b_2"], flat["auc_micro_2"]) == (auc["a:b"], auc["a?b"], auc["micro"])
    old = {"auc": {"a": 0.7, "micro": 0.6, "macro": 0.7}}  # metrics.json of older runs: one dictionary
    assert flat_metrics(old) == {"n_skipped": 0, "auc_micro": 0.6, "auc_macro": 0.7, "auc_a": 0.7}
    tuned = {"finetune": {"kept_epoch": 2, "epochs_trained": 5, "kept_val_error": None}}
    assert flat_metrics(tuned) == {"n_skipped": 0, "finetune_kept_epoch": 2, "finetune_epochs_trained": 5}


def _folder_run(folder: Path, data_root: str, lr: float, predictions: bool = True, **metrics: Any) -> Path:
    """A finished run folder as `runs compare` reads it: config.json, metrics.json (``metrics`` added),
    predictions.csv."""
    folder.mkdir(parents=True)
    config = {"data": {"data_root": data_root}, "train": {"lr": lr}}
    base = {"overall_accuracy": lr, "per_class_accuracy": {"x": 0.5}, "classifier": "svm", "backbone": "b[i]"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text(json.dumps(base | metrics))
    if predictions:
        (folder / "predictions.csv").write_text("path,true_label,predicted_label\nx/1.jpg,x,x\n")
    return folder


def test_runs_tables_show_names_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """Brackets in data set names, run folders and parameters are text, not rich markup."""
    run = {"id": "0" * 32, "date": "2024-01-01 00:00", "kind": "train", "dataset": "photos [v2]"}
    run |= {"classifier": "svm", "backbone": "misc[/old]", "accuracy": 0.5, "class_averaged_accuracy": None}
    run |= {"split": "test", "status": "FINISHED", "run_dir": "/runs/a"}
    monkeypatch.setattr("imgclf.tracking.store.list_runs", lambda cfg, limit: [run])
    assert main(["runs", "list"]) == 0
    out = capsys.readouterr().out
    assert "photos [v2]" in out and "misc[/old]" in out
    a = _folder_run(tmp_path / "misc[" / "old]", "/data/photos [v2]", 0.1)
    b = _folder_run(tmp_path / "[bold]b", "/data/photos [v3]", 0.2)
    c = _folder_run(tmp_path / "[i]c", "/data/photos [v3]", 0.2, predictions=False)
    assert main(["runs", "compare", str(a), str(b), str(c)]) == 0
    out = capsys.readouterr().out
    for text in (
        "misc[/old]",  # run_dir
        "[bold]b",  # run label and folder
        "photos [v2]",  # dataset
        "/data/photos [v3]",  # parameter
        "b[i]",  # backbone
        "Paired test against old] on the same test images",
        "[i]c: no predictions.csv for a paired test with old]",
    ):
        assert text in out


def test_runs_ui_stopped_by_sigterm_stops_its_server(tmp_path: Path):
    """mlflow ui runs its server in child processes: stopping `imgclf runs ui` (a service manager's
    SIGTERM) stops them too; they went on serving the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    health = f"http://127.0.0.1:{port}/health"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(health, timeout=2):
                return True
        except OSError:
            return False

    cmd = [sys.executable, "-m", "imgclf", "runs", "ui", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    with open(tmp_path / "ui.log", "wb") as log:
        proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not answers():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "ui.log").read_text()[-2000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        deadline = time.monotonic() + 15
        while answers():
            assert time.monotonic() < deadline, "the MLflow server outlived `imgclf runs ui`"
            time.sleep(0.5)
    finally:
        proc.kill()


def _result(run_dir: Path, accuracy: float = 0.5, **metrics: Any) -> RunResult:
    """A finished run as log_run sees it, without training one (metrics.json, ``metrics`` added, and a 3-second
    training)."""
    from types import SimpleNamespace

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"overall_accuracy": accuracy, "timings_s": {"total_s": 3.0}, **metrics}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    bundle = SimpleNamespace(
        classifier="svm", backbone_spec={"name": "b"}, preprocess=SimpleNamespace(resolution=64), model_id="m"
    )
    return RunResult(run_dir, metrics, bundle)  # type: ignore[arg-type]


def _queue_without_writer(monkeypatch: pytest.MonkeyPatch, cfg: Config, result: RunResult) -> None:
    """Queue a record as a background train does, starting no writer (the test drains)."""
    with monkeypatch.context() as m:
        m.setattr("imgclf.tracking.store.subprocess.Popen", lambda *a, **k: None)
        assert log_run("train", cfg, result) is None
    assert len(list(queue_dir(tracking_uri(cfg.tracking)).glob("*.json"))) == 1


@contextlib.contextmanager
def _lock_held_elsewhere(uri: str, seconds: float) -> Iterator[None]:
    """The queue's lock of the store ``uri`` held by another process, for at most ``seconds``."""
    hold = "import sys, time, filelock; f = filelock.FileLock(sys.argv[1]); f.acquire(); print(flush=True); "
    hold += f"time.sleep({seconds})"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(queue_dir(uri) / ".lock")], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # the lock is held
        yield
    finally:
        holder.kill()
        holder.wait()


def test_compare_refuses_a_run_folder_whose_train_did_not_finish(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """An interrupted train leaves the new config.json beside the old run's metrics: not one run."""
    from imgclf.bundle import INCOMPLETE

    a = _folder_run(tmp_path / "a", "/data/x", 0.1)
    b = _folder_run(tmp_path / "b", "/data/x", 0.2)
    (b / INCOMPLETE).touch()
    assert main(["runs", "compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert f"the last `imgclf train` into {b} did not finish (it failed or was interrupted)" in err
    assert "its files mix two runs" in err


def test_in_process_records_into_one_new_store_at_once(tmp_path: Path):
    """Trains with --no-tracking-background creating the same new store at once: each run is recorded (they
    raced through MLflow's schema migrations: 'duplicate column name', runs lost)."""
    import multiprocessing

    folder = tmp_path / "new-store"
    cfg = Config().updated(tracking_uri=str(folder), tracking_background=False)
    results = [_result(tmp_path / f"run{i}", 0.1 * i) for i in range(3)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=log_run, args=("train", cfg, r)) for r in results]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    runs = _runs(f"sqlite:///{folder / 'mlflow.db'}")
    assert sorted(r.data.tags["run_dir"] for r in runs) == [str(r.run_dir.resolve()) for r in results]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_home_folder_in_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`tracking_uri = "~/hist"` in a configuration file (or a quoted flag) is the home folder, not ./~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[tracking]\ntracking_uri = "~/hist"\n')
    assert tracking_uri(Config.from_file(cfg_file).tracking) == f"sqlite:///{tmp_path}/hist/mlflow.db"
    assert tracking_uri(TrackingConfig(tracking_uri="~/t.db")) == f"sqlite:///{tmp_path}/t.db"
    assert tracking_uri(TrackingConfig(tracking_uri="sqlite:///~/t.db")) == f"sqlite:///{tmp_path}/t.db"
    # file://runs/db named the store /db ("runs" is the URI's host): refused, not written at the root
    with pytest.raises(TrackingError, match=r"file://runs/db: a file URI names a host \(runs\)"):
        tracking_uri(TrackingConfig(tracking_uri="file://runs/db"))
    assert tracking_uri(TrackingConfig(tracking_uri="file://localhost/h")) == "sqlite:////h/mlflow.db"


def test_best_values_are_marked_among_runs_of_the_same_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """A score on the training split (evaluate --on-train) is never starred against test scores."""
    from imgclf.tracking.compare import RunRecord, compare

    def run(label: str, split: str, accuracy: float) -> RunRecord:
        return RunRecord(label, {}, {"overall_accuracy": accuracy}, {"split": split, "kind": "evaluate"})

    records = [run("on-train", "train", 1.0), run("a", "test", 0.8), run("b", "test", 0.7)]
    (row,) = compare(records)
    assert row.marked == [False, True, False]
    monkeypatch.chdir(tmp_path)
    a = _folder_run(tmp_path / "a", "/data/x", 0.1)
    b = _folder_run(tmp_path / "b", "/data/x", 0.2)
    assert main(["runs", "compare", str(a), str(b), "--markdown", "cmp.md"]) == 0
    assert "split" in capsys.readouterr().out
    md = (tmp_path / "cmp.md").read_text()
    assert "### Runs" in md and "| run | kind | split | dataset | classifier | backbone | run_dir |" in md
    assert f"| a | folder | test | x | svm | b[i] | {a.resolve()} |" in md


def test_a_password_in_the_tracking_uri_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
):
    """It went into log lines, the background writer's command line, MLflow parameters and config.json."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") as e:
        TrackingConfig(tracking_uri="http://alice:s3cret@mlflow.example.org:5000")
    assert "http://alice:***@mlflow.example.org:5000 holds a password" in str(e.value)
    assert TrackingConfig(tracking_uri="http://alice@mlflow.example.org").tracking_uri  # a user name alone is kept
    assert main(["runs", "list", "--tracking-uri", "https://alice:s3cret@mlflow.example.org"]) == 2
    err = capsys.readouterr().err
    assert "MLFLOW_TRACKING_PASSWORD" in err and "s3cret" not in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:9")
    with pytest.raises(TrackingError, match=r"MLFLOW_TRACKING_URI: http://alice:\*\*\*@127.0.0.1:9 holds a password"):
        tracking_uri(TrackingConfig())
    with caplog.at_level(logging.INFO, logger="imgclf"):
        assert log_run("train", Config(), _result(tmp_path / "run")) is None  # not recorded; the run is fine
    assert "holds a password" in caplog.text and "s3cret" not in caplog.text


def test_unreachable_store_with_queued_runs_is_said_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """`runs list` with a run queued for a server that is down: one try of the store, bounded by the command
    itself (it took 8 minutes: MLflow's retries while draining, then again while reading)."""
    import imgclf.tracking.store as store

    for name in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    uri = "http://127.0.0.1:9"
    _queue_without_writer(monkeypatch, Config().updated(tracking_uri=uri), _result(tmp_path / "run"))
    connect, connects = store.connect, []
    monkeypatch.setattr(store, "connect", lambda cfg: connects.append(cfg) or connect(cfg))
    started = time.monotonic()
    assert main(["runs", "list", "--tracking-uri", uri]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"the run store {uri} does not answer" in err and "1 run(s) stay queued in" in err
    assert len(connects) == 1  # not read a second time
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # bounded for the command only


def test_a_busy_writer_is_said_and_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """While a train's background writer holds the store's queue without writing (a server that does not
    answer), a reader says so and goes on after LOCK_WAIT_S instead of waiting silently for minutes; an
    in-process record queues its run for the writer."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config().updated(tracking_uri=uri)
    _queue_without_writer(monkeypatch, cfg, _result(tmp_path / "run"))
    monkeypatch.setattr("imgclf.tracking.store.LOCK_WAIT_S", 0.5)
    with _lock_held_elsewhere(uri, 8), caplog.at_level(logging.INFO, logger="imgclf"):
        started = time.monotonic()
        drain_pending(cfg.tracking)
        assert time.monotonic() - started < 4
        assert "another imgclf process is writing runs to" in caplog.text
        assert "1 queued run(s) not shown: another imgclf process (the background writer" in caplog.text
        monkeypatch.setattr("imgclf.tracking.store.subprocess.Popen", lambda *a, **k: None)
        assert log_run("train", cfg.updated(tracking_background=False), _result(tmp_path / "b")) is None
        assert time.monotonic() - started < 6
    assert "this run is queued for it instead" in caplog.text
    assert len(list(queue_dir(uri).glob("*.json"))) == 2


def test_queued_message_names_the_command_that_lists_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    uri = f"sqlite:///{tmp_path / 'my store' / 'm.db'}"
    with caplog.at_level(logging.INFO, logger="imgclf"):
        _queue_without_writer(monkeypatch, Config().updated(tracking_uri=uri, experiment="cats"), _result(tmp_path))
    assert "written in the background, or by the next imgclf command once the store answers" in caplog.text
    assert f"`imgclf runs list --tracking-uri '{uri}' --experiment cats` lists it" in caplog.text


def test_in_process_record_writes_the_queued_runs_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """docs/tracking.md: the next command that finds the store working writes the queued records."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config().updated(tracking_uri=uri)
    first, second = _result(tmp_path / "first"), _result(tmp_path / "second")
    _queue_without_writer(monkeypatch, cfg, first)
    assert log_run("train", cfg.updated(tracking_background=False), second) is not None
    assert not any(queue_dir(uri).glob("*.json"))
    runs = _runs(uri)
    assert [r.data.tags["run_dir"] for r in runs] == [str(first.run_dir.resolve()), str(second.run_dir.resolve())]


def test_mlflow_times_are_those_of_the_run(tmp_path: Path):
    """MLflow's start time and duration are the run's: it ends when recorded, after its measured duration
    (they were the recording's: the end of the training, and the background writer's delay)."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    result = _result(tmp_path / "run")  # a 3-second training
    before = int(time.time() * 1000)
    log_run("train", Config().updated(tracking_uri=uri, tracking_background=False), result)
    (run,) = _runs(uri)
    assert before <= run.info.end_time <= time.time() * 1000
    assert run.info.end_time - run.info.start_time == pytest.approx(3000, abs=2)
    result.metrics["timings_s"]["evaluate_s"] = 0.5  # an evaluation's own duration
    log_run("evaluate", Config().updated(tracking_uri=uri, tracking_background=False), result)
    run = _runs(uri)[-1]
    assert run.data.tags["kind"] == "evaluate"
    assert run.info.end_time - run.info.start_time == pytest.approx(500, abs=2)


def test_runs_ui_refuses_a_busy_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """It printed 'serving ...', then MLflow's 'Address already in use', and exited with 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["runs", "ui", "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    out, err = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err
    assert "serving" not in out


def test_a_run_id_of_another_experiment_names_the_experiment_searched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run_id = log_run("train", Config().updated(tracking_uri=uri, tracking_background=False), _result(tmp_path / "a"))
    assert run_id is not None
    folder = _folder_run(tmp_path / "b", "/data/x", 0.2)
    assert main(["runs", "compare", run_id[:8], str(folder), "--tracking-uri", uri, "--experiment", "other"]) == 2
    err = capsys.readouterr().err
    assert f"{run_id[:8]}: neither a run folder nor the id of a run of the experiment 'other' in {uri}" in err
    assert "add --experiment NAME" in err


def test_a_store_refusing_records_is_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A store that answers but refuses the queued records (read-only permission on a server) still lists its
    runs, with a warning; the records stay queued."""
    from mlflow import MlflowClient

    from imgclf.tracking import list_runs

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config().updated(tracking_uri=uri)
    assert log_run("train", cfg.updated(tracking_background=False), _result(tmp_path / "a")) is not None
    _queue_without_writer(monkeypatch, cfg, _result(tmp_path / "b"))

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError("PERMISSION_DENIED: no right to write")

    monkeypatch.setattr(MlflowClient, "create_run", refused)
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        runs = list_runs(cfg.tracking)
    assert len(runs) == 1 and "PERMISSION_DENIED" in caplog.text and "1 record(s) stay queued" in caplog.text


def test_a_read_only_store_is_said_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """SQLite refusing the write (a read-only store) came with MLflow's ~90-line traceback of each error, and
    the reason given was SQLAlchemy's "raised as a result of Query-invoked autoflush"."""
    from imgclf.tracking import list_runs

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config().updated(tracking_uri=uri)
    assert log_run("train", cfg.updated(tracking_background=False), _result(tmp_path / "a")) is not None
    _queue_without_writer(monkeypatch, cfg, _result(tmp_path / "b"))
    with contextlib.closing(sqlite3.connect(tmp_path / "m.db")) as db:  # refused as a read-only file is (as root)
        db.execute("CREATE TRIGGER ro BEFORE INSERT ON runs BEGIN SELECT RAISE(ABORT, 'readonly database'); END")
        db.commit()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        runs = list_runs(cfg.tracking)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(runs) == 1 and len(said) == 1 and "Traceback" not in caplog.text, said
    assert "yet (readonly database)" in said[0] and "1 record(s) stay queued" in said[0]


def _stored_runs(uri: str) -> list:
    """The runs in the store as they are, the queue not drained."""
    client = _client(uri)
    return client.search_runs([client.get_experiment_by_name("imgclf").experiment_id])


def _drain_killed_after(uri: str, method: str) -> None:
    """A background writer that dies as a killed one does (no clean-up) once its MLflow call ``method`` returns."""
    from mlflow import MlflowClient

    call = getattr(MlflowClient, method)

    def killed(self: MlflowClient, *args: object, **kwargs: object) -> None:
        call(self, *args, **kwargs)
        os._exit(9)

    setattr(MlflowClient, method, killed)
    drain(uri)


@pytest.mark.parametrize(("killed_after", "left"), [("create_run", "RUNNING"), ("set_terminated", "FINISHED")])
def test_a_record_whose_writer_was_killed_is_written_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed_after: str, left: str
):
    """A writer killed once it created the run (left RUNNING and empty) or finished it (the record still
    queued): the next writer completes that run, or drops the record, instead of writing the record again."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    _queue_without_writer(monkeypatch, Config().updated(tracking_uri=uri), _result(tmp_path / "run", 0.75))
    writer = multiprocessing.get_context("fork").Process(target=_drain_killed_after, args=(uri, killed_after))
    writer.start()
    writer.join(120)
    assert writer.exitcode == 9
    (begun,) = _stored_runs(uri)
    assert begun.info.status == left and len(list(queue_dir(uri).glob("*.json"))) == 1
    drain(uri)  # the next writer
    (run,) = _runs(uri)
    assert run.info.run_id == begun.info.run_id and run.info.status == "FINISHED"
    assert run.data.metrics["overall_accuracy"] == 0.75
    assert "metrics.json" in {f.path for f in _client(uri).list_artifacts(run.info.run_id)}
    assert not any(queue_dir(uri).glob("*.json"))


def _database_full(*args: object, **kwargs: object) -> None:
    """MLflow's error where SQLite finds its disk full: SQLite's own error beneath it."""
    from mlflow.exceptions import MlflowException

    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute("PRAGMA max_page_count = 1")
        try:
            db.execute("CREATE TABLE t (x)")
            db.execute("INSERT INTO t VALUES (randomblob(10000))")
        except sqlite3.OperationalError as e:
            raise MlflowException(f"(raised as a result of Query-invoked autoflush)\n({e})") from e


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    ("method", "error", "said"),
    [("log_artifact", _no_space, "[Errno 28] No space left on device"), ("log_batch", _database_full, "disk is full")],
    ids=["files", "database"],
)
def test_a_full_disk_keeps_the_record_queued(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    method: str,
    error: Callable[..., None],
    said: str,
):
    """A full disk at the store is passing, like a store out of reach: the record stays queued (it left the
    queue, its run FAILED for good and listed like any other), `runs list` marks its run FAILED meanwhile,
    and once there is space the next writer completes that run."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config().updated(tracking_uri=uri)
    assert log_run("train", cfg.updated(tracking_background=False), _result(tmp_path / "done")) is not None
    _queue_without_writer(monkeypatch, cfg, _result(tmp_path / "run"))
    with monkeypatch.context() as m:
        m.setattr(MlflowClient, method, error)
        with caplog.at_level(logging.WARNING, logger="imgclf"):
            drain(uri)  # the background writer
        assert f"{said}): 1 record(s) stay queued in" in caplog.text
        assert main(["runs", "list", "--tracking-uri", uri, "--csv", str(tmp_path / "list.csv")]) == 0  # full still
    listed = csv.DictReader((tmp_path / "list.csv").read_text().splitlines())
    assert [r["status"] for r in listed] == ["FAILED", "FINISHED"]
    out = capsys.readouterr().out
    assert "FAILED" in out and "FINISHED" not in out  # only the unusual status is shown
    drain(uri)  # space freed
    runs = _runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert "metrics.json" in {f.path for f in _client(uri).list_artifacts(runs[1].info.run_id)}
    assert not any(queue_dir(uri).glob("*.json"))


def test_runs_compare_lines_classes_up_by_their_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Classes "a&b" and "a_b" are acc_a_b and acc_a_b_2 in MLflow, but a run of "a_b" alone has it as acc_a_b:
    compared by MLflow's names, one row showed one run's "a&b" beside the other's "a_b". A run folder and a
    stored run (its metrics.json) alike give the class names as written; a run recorded without its files,
    MLflow's."""
    from imgclf.tracking.compare import compare, load_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config().updated(tracking_uri=uri, tracking_background=False)

    def run(name: str, accuracy: dict[str, float]) -> tuple[Path, str]:
        auc = {"micro": 0.9, "macro": 0.9, "per_class": {c: 0.5 + a / 2 for c, a in accuracy.items()}}
        result = _result(tmp_path / name, per_class_accuracy=accuracy, auc=auc)
        cfg.save(result.run_dir / "config.json")  # a run folder `runs compare` reads
        run_id = log_run("train", cfg, result)
        assert run_id is not None
        return result.run_dir, run_id

    (dir1, id1), (dir2, id2) = run("x1", {"a&b": 0.25, "a_b": 0.5, "c": 0.75}), run("x2", {"a_b": 1.0, "c": 0.0})
    expected = {
        ("class accuracy", "a&b"): [0.25, None],
        ("class accuracy", "a_b"): [0.5, 1.0],
        ("class accuracy", "c"): [0.75, 0.0],
        ("class AUC", "a&b"): [0.625, None],
        ("class AUC", "a_b"): [0.75, 1.0],
        ("class AUC", "c"): [0.875, 0.5],
    }
    for refs in ((dir1, dir2), (id1, id2), (dir1, id2[:8])):
        rows = compare([load_run(ref, cfg.tracking) for ref in refs])
        assert {(r.section, r.name): r.values for r in rows if r.section.startswith("class")} == expected
        assert {r.name for r in rows if r.section == "metric"} >= {"auc_micro", "auc_macro", "overall_accuracy"}
    csv_file = tmp_path / "cmp.csv"
    assert main(["runs", "compare", id1, id2, "--tracking-uri", uri, "--csv", str(csv_file)]) == 0
    assert "a_b_2" not in capsys.readouterr().out
    assert "class accuracy,a&b,0.25,," in csv_file.read_text().splitlines()
    client = _client(uri)  # a run recorded without its files (a store that refused them): MLflow's names
    bare = client.create_run(client.get_experiment_by_name("imgclf").experiment_id, tags={"split": "test"})
    for name, value in (("overall_accuracy", 0.5), ("auc_micro", 0.9), ("acc_a_b_2", 0.5), ("auc_a_b_2", 0.75)):
        client.log_metric(bare.info.run_id, name, value)
    record = load_run(bare.info.run_id, cfg.tracking)
    assert record.metrics == {"overall_accuracy": 0.5, "auc_micro": 0.9}
    assert record.per_class == {"acc": {"a_b_2": 0.5}, "auc": {"a_b_2": 0.75}}


def test_a_run_with_names_over_mlflow_limits_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A class name of 246 characters or more made auc_<class> longer than MLflow's 250: the run's metrics
    never reached MLflow. Names are cut to a start and a digest of the whole name, and so are parameter values,
    tag values and the run name (MLflow cuts values itself only where MLFLOW_TRUNCATE_LONG_VALUES lets it)."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH as NAME_MAX
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

    from imgclf.tracking.compare import load_run
    from imgclf.tracking.store import flat_metrics

    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")  # as a store that refuses long values
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    accuracy = {"k" * 300 + "a": 0.25, "k" * 300 + "b": 0.75, "k" * 246: 0.5}
    auc = {"micro": 0.9, "macro": 0.9, "per_class": accuracy}
    result = _result(tmp_path / ("r" * 250), per_class_accuracy=accuracy, auc=auc)  # a 250-character folder name
    data_root = "/data/" + "d" * 9000
    cfg = Config().updated(data_root=data_root, tracking_uri=uri, tracking_background=False)
    run_id = log_run("train", cfg, result)
    assert run_id is not None
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED" and len(run.info.run_name) <= NAME_MAX
    names = [k for k in run.data.metrics if k.startswith(("acc_k", "auc_k"))]
    assert len(names) == 6 and all(len(k) <= NAME_MAX for k in names)
    assert sorted(run.data.metrics[k] for k in names) == [0.25, 0.25, 0.5, 0.5, 0.75, 0.75]
    assert list(flat_metrics(result.metrics)) == list(flat_metrics(json.loads(json.dumps(result.metrics))))
    assert all(len(k) <= NAME_MAX and len(v) <= MAX_PARAM_VAL_LENGTH for k, v in run.data.params.items())
    assert run.data.params["data_root"].startswith("/data/ddd")
    assert all(len(k) <= NAME_MAX and len(v) <= MAX_TAG_VAL_LENGTH for k, v in run.data.tags.items())
    assert load_run(run_id, cfg.tracking).per_class["acc"] == accuracy  # compared by the whole names


def test_runs_compare_never_rounds_a_difference_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """auc_macro 0.9996 against 1.0 showed as "1.000 | 1.000 ★": values that differ print differently, with
    more decimals where needed, and an imperfect accuracy or AUC never prints as perfect (the report's rule)."""
    from imgclf.tracking.compare import RunRecord, compare, to_markdown

    def run(label: str, auc: float, accuracy: float, seconds: float) -> RunRecord:
        metrics = {"auc_macro": auc, "overall_accuracy": accuracy, "time_total_s": seconds, "n_test": 2500.0}
        return RunRecord(label, {}, metrics, {"split": "test"})

    md = to_markdown(compare([run("a", 0.9996, 0.9991, 1.231), run("b", 1.0, 0.9994, 1.234)]), ["a", "b"])
    assert "| auc_macro | 0.9996 | **1.000** |" in md
    assert "| overall_accuracy | 99.91 % | **99.94 %** |" in md
    assert "| time_total_s | 1.23 | 1.23 |" in md  # 3 significant digits, ranked as shown
    assert "| n_test | 2500 | 2500 |" in md
    from imgclf.tracking.compare import Row, format_row

    # rows no number of decimals tells apart (NaN, a count recorded with a fraction) end, as they print
    assert format_row(Row("class AUC", "a", [float("nan"), float("nan")], [False, False])) == ["nan", "nan"]
    assert format_row(Row("metric", "n_train", [10.0, 10.5], [False, False])) == ["10", "10"]
    a = _folder_run(tmp_path / "a", "/data/x", 0.9996, per_class_accuracy={"x": 0.5001, "y": 0.25})
    b = _folder_run(tmp_path / "b", "/data/x", 1.0, per_class_accuracy={"x": 0.5004, "y": 0.25})
    assert main(["runs", "compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "99.96 % │ 100.0 % ★" in out and "50.01 % │ 50.04 % ★" in out
    assert re.search(r"│ y +│ +25\.0 % │ +25\.0 % │", out)  # values alike keep one decimal
    listed = {"id": "0" * 32, "date": "2024-01-01 00:00", "kind": "train", "dataset": "d", "classifier": "svm"}
    listed |= {"backbone": "b", "split": "test", "accuracy": 0.9996, "class_averaged_accuracy": 1.0}
    listed["status"] = "FINISHED"
    listed["run_dir"] = "/runs/a"
    monkeypatch.setattr("imgclf.tracking.store.list_runs", lambda cfg, limit: [listed])
    assert main(["runs", "list"]) == 0
    assert "99.96 %" in capsys.readouterr().out


def test_compare_ranks_neither_epoch_counts_nor_rounding_noise(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """finetune_kept_epoch was starred as "higher is better" and shown as 3.000; 7/9 summed in two orders
    (0.7777777777777777 and 0.7777777777777779) was starred and printed with 16 decimals; two run folders named
    alike were two columns of one name."""
    from imgclf.tracking.compare import RunRecord, compare, format_row

    def run(label: str, accuracy: float, epoch: float) -> RunRecord:
        metrics = {"class_averaged_accuracy": accuracy, "finetune_kept_epoch": epoch, "finetune_epochs_trained": 5.0}
        return RunRecord(label, {}, metrics, {"split": "test"})

    seven_ninths = [0.7777777777777777, 0.7777777777777779]
    rows = {r.name: r for r in compare([run("a", seven_ninths[0], 3.0), run("b", seven_ninths[1], 5.0)])}
    assert rows["class_averaged_accuracy"].marked == [False, False]
    assert format_row(rows["class_averaged_accuracy"]) == ["77.8 %", "77.8 %"]
    assert rows["finetune_kept_epoch"].marked == [False, False]
    assert format_row(rows["finetune_kept_epoch"]) == ["3", "5"]
    a = _folder_run(tmp_path / "x" / "run", "/data/x", 0.1, finetune={"kept_epoch": 2})
    b = _folder_run(tmp_path / "y" / "run", "/data/x", 0.2)
    assert main(["runs", "compare", str(a), str(b), str(a), "--csv", str(tmp_path / "c.csv")]) == 0
    header = (tmp_path / "c.csv").read_text().splitlines()[0]
    assert header == "section,name,x/run,y/run,x/run #2,note"
    photo = tmp_path / "photo.jpg"  # --csv or --markdown over an image or a run's file: refused
    photo.write_bytes(b"a photo")
    (a / "model").mkdir()
    (a / "model" / "bundle.json").write_text("{}")
    capsys.readouterr()
    for flag, target in (("--csv", photo), ("--markdown", a / "metrics.json"), ("--csv", a / "model" / "bundle.json")):
        before = target.read_bytes()
        assert main(["runs", "compare", str(a), str(b), flag, str(target)]) == 2
        assert re.search(
            r"named as an image, not written|a file of the run in .*, not overwritten", capsys.readouterr().err
        )
        assert target.read_bytes() == before
    assert main(["runs", "compare", str(a), str(a), "--csv", str(tmp_path / "c.csv")]) == 0
    assert (tmp_path / "c.csv").read_text().splitlines()[0] == "section,name,run,run #2,note"  # not x/run


def test_runs_commands_take_only_the_store_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`runs list --no-tracking` was accepted and did nothing; a mistyped store path read as an empty store."""
    uri = f"sqlite:///{tmp_path / 'typo' / 'mlflow.db'}"
    assert main(["runs", "list", "--tracking-uri", uri]) == 0
    assert "no run store there yet: nothing recorded (a mistyped --tracking-uri?)" in capsys.readouterr().out
    for flag in ("--no-tracking", "--tracking-background"):
        with pytest.raises(SystemExit):
            main(["runs", "list", flag])
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_runs_compare_of_many_runs_prints_them_whole_in_tables_that_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """30 runs side by side were cut to one or two characters a cell (`n…  a…`, `1…`) on a 160-column terminal
    and into a pipe (200): each section comes in tables of as many runs as fit, each with the name column;
    --csv and --markdown keep every run in one table."""
    from rich.cells import cell_len
    from rich.console import Console

    folders = [_folder_run(tmp_path / f"run-{i:02d}", "/data/x", (i + 1) / 100) for i in range(30)]
    labels = [f.name for f in folders]
    for width in (None, 80):  # into a pipe (the code's own 200 columns), and a narrow terminal
        if width:
            monkeypatch.setattr("imgclf.tracking.cli.console", lambda stderr=False: Console(width=80, stderr=stderr))
        md = tmp_path / f"cmp{width}.md"
        args = [*map(str, folders), "--csv", str(tmp_path / f"cmp{width}.csv"), "--markdown", str(md)]
        assert main(["runs", "compare", *args]) == 0
        out = capsys.readouterr().out
        sections = out[out.index("Parameters") :]  # the runs table above may cut a long folder name, as before
        assert "…" not in sections and max(map(cell_len, out.splitlines())) <= (width or 200)
        i, j = out.index("Metrics (best ★)"), out.index("Accuracy per class (best ★)")
        for section in (out[:i], out[i:j], out[j:]):  # the labels over each section's tables: each run once
            headers = [line.split("┃")[2:-1] for line in section.splitlines() if line.startswith("┃ name")]
            assert len(headers) > 1 and [label.strip() for h in headers for label in h] == labels
        cells = [line.split("│")[2:-1] for line in out.splitlines() if line.startswith("│ overall_accuracy")]
        assert [c.strip() for row in cells for c in row] == [f"{i}.0 %" for i in range(1, 30)] + ["30.0 % ★"]
        assert "Metrics (best ★), runs 1-" in out and "of 30" in out
        header = (tmp_path / f"cmp{width}.csv").read_text().splitlines()[0]
        assert header == f"section,name,{','.join(labels)},note"
        assert f"| name | {' | '.join(labels)} |" in md.read_text()


def test_runs_list_says_there_are_more_runs_than_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`runs list` showed the 20 newest of 30 runs and said nothing of the others; runs alike but for their
    folder (--out) were rows alike."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config().updated(tracking_uri=uri, tracking_background=False)
    for name in ("first", "second", "third"):
        assert log_run("train", cfg, _result(tmp_path / name)) is not None
    assert main(["runs", "list", "--tracking-uri", uri, "--limit", "2", "--csv", str(tmp_path / "l.csv")]) == 0
    out = capsys.readouterr().out
    assert "the 2 newest runs of more than 2: --limit N shows more" in out
    assert re.search(r"│ third +│", out) and re.search(r"│ second +│", out) and "first" not in out
    rows = list(csv.DictReader((tmp_path / "l.csv").open()))
    assert [r["run_dir"] for r in rows] == [str((tmp_path / n).resolve()) for n in ("third", "second")]
    for limit in ("3", "50000"):  # one more than 50000: refused by MLflow
        assert main(["runs", "list", "--tracking-uri", uri, "--limit", limit]) == 0
        out = capsys.readouterr().out
        assert "first" in out and "newest" not in out


def test_runs_compare_of_long_names_and_values_on_a_narrow_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """Two runs with 44-character names at 80 columns folded the runs table's other columns to 2-3 characters
    (71 lines); a 62-character data folder put each run's parameters in a table of its own (no side by side); the
    runs table cut run_dir (`/tmp/h27…`) and lost its right border."""
    from rich.console import Console

    monkeypatch.setattr("imgclf.tracking.cli.console", lambda stderr=False: Console(width=80, stderr=stderr))
    long_root = "/data/" + "d" * 56
    folders = [
        _folder_run(tmp_path / f"flowers-efficientnet_lite2-dnn-lr0.001-ep{e}", f"{long_root}{e}", e / 100)
        for e in (10, 30)
    ]
    assert main(["runs", "compare", *map(str, folders)]) == 0
    out = capsys.readouterr().out
    runs_table = out[: out.index("Parameters")]
    assert "│ folder │ test  │" in runs_table, runs_table  # the short columns whole, the long ones folded
    assert "…" not in runs_table, runs_table  # run_dir and the data set folded, not cut
    table = [line for line in runs_table.splitlines() if line[:1] in "┏┃┡│└"]
    assert all(line.endswith(("┓", "┃", "┩", "│", "┘")) for line in table), runs_table
    assert "Parameters that differ, runs" not in out  # one table: the two runs side by side
    assert "│ data_root │ /data/ddd" in out and "│ lr        │ 0.1 " in out


def test_runs_list_fits_a_terminal_of_80_columns(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """`runs list` took ~155 columns: at 80, rich cut columns to one or two characters and wrapped the accuracies.
    Each run's id, date and accuracies stay whole on a line, the other columns fold, and what every run shares
    is said once below the table."""
    from rich.cells import cell_len
    from rich.console import Console

    def run(n: int, kind: str, dataset: str, classifier: str, split: str, acc: float, avg: float) -> dict[str, Any]:
        row = {"id": f"{n}{'f' * 31}", "date": f"2026-12-0{n} 16:02", "kind": kind, "dataset": dataset}
        row |= {"classifier": classifier, "backbone": "efficientnet_lite0", "split": split, "accuracy": acc}
        return row | {"class_averaged_accuracy": avg, "status": "FINISHED", "run_dir": f"/runs/flowers-{classifier}"}

    runs = [
        run(1, "evaluate", "flowers_small", "svm_on_refined", "train", 0.9777, 0.9612),
        run(2, "train", "hymenoptera", "dnn", "test", 0.55, 0.5234),
        run(3, "train", "demo", "svm", "test", 0.9996, 1.0),
    ]
    runs[1]["status"] = "FAILED"
    monkeypatch.setattr("imgclf.tracking.store.list_runs", lambda cfg, limit: runs)
    monkeypatch.setattr("imgclf.tracking.cli.console", lambda stderr=False: Console(width=80, stderr=stderr))
    assert main(["runs", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for r in runs:
        whole = (r["id"][:8], r["date"][5:], fmt_fraction(r["accuracy"]), fmt_fraction(r["class_averaged_accuracy"]))
        assert any(all(text in line for text in whole) for line in lines), out
    assert max(map(cell_len, lines)) <= 80 and "…" not in out and "│ FAILED │" in out
    assert all(line.endswith(("┓", "┃", "┩", "│", "┘")) for line in lines[1:] if line[0] in "┏┃┡│└"), out
    assert "date (2026)" in out and lines[-1] == "every run: backbone efficientnet_lite0"
    runs[1]["status"] = "FINISHED"
    runs[2]["class_averaged_accuracy"] = 0.9996
    for r in runs:
        r["kind"], r["class_averaged_accuracy"] = "train", r["accuracy"]
    assert main(["runs", "list"]) == 0
    out = capsys.readouterr().out
    assert "status" not in out and "avg acc" not in out
    said = "every run: kind train, backbone efficientnet_lite0, class-averaged accuracy = acc"
    assert said in " ".join(out.split())  # wrapped at 80 columns


def test_runs_ui_prints_the_address_of_the_experiments_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """MLflow 3's web UI opens on its GenAI view, which shows none of the runs: `runs ui` prints their page."""
    monkeypatch.setattr("imgclf.tracking.cli.run_until_stopped", lambda cmd, env=None: 0)  # no server started
    uri, port = f"sqlite:///{tmp_path / 'm.db'}", _free_port()
    assert main(["runs", "ui", "--port", str(port), "--tracking-uri", uri]) == 0
    assert f"serving {uri} at http://127.0.0.1:{port} (Ctrl-C stops it)" in capsys.readouterr().out  # no runs yet
    assert log_run("train", Config().updated(tracking_uri=uri, tracking_background=False), _result(tmp_path / "a"))
    exp = _client(uri).get_experiment_by_name("imgclf").experiment_id
    assert main(["runs", "ui", "--port", str(port), "--tracking-uri", uri]) == 0
    page = f"http://127.0.0.1:{port}/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert f"serving {uri} at {page} (Ctrl-C stops it)" in capsys.readouterr().out


def test_an_unreachable_server_keeps_the_record_queued_within_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A run recorded in-process (--no-tracking-background, Windows) tried a closed port with MLflow's retries
    for 259 s (a server that never answers: 18 minutes), then dropped the record; each background writer tried
    for 4 minutes. Both give up within seconds (QUICK_HTTP, where not set), and the record stays queued."""
    quick = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    for name in quick:
        monkeypatch.delenv(name, raising=False)
    uri = f"http://127.0.0.1:{_free_port()}"  # closed: nothing listens there
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        cfg = Config().updated(tracking_uri=uri, tracking_background=False)
        assert log_run("train", cfg, _result(tmp_path / "run")) is None
    assert time.monotonic() - started < 30
    assert len(list(queue_dir(uri).glob("*.json"))) == 1 and "1 record(s) stay queued in" in caplog.text
    assert "check the address and that the server runs" in caplog.text
    assert not set(quick) & set(os.environ)  # for the record only
    started = time.monotonic()
    writer = [sys.executable, "-m", "imgclf.tracking.writer", uri]
    done = subprocess.run(writer, capture_output=True, text=True, timeout=120, check=True)
    assert time.monotonic() - started < 60 and "1 record(s) stay queued in" in done.stderr


def test_a_writer_finding_the_queue_busy_leaves_its_record_to_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Each train's background writer waited for the queue's lock without limit, one process a train, each then
    trying a server that does not answer for minutes. A writer finding the lock held leaves at once; whoever
    holds it writes every record queued until none is left, those queued meanwhile too."""
    import imgclf.tracking.store as store

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config().updated(tracking_uri=uri)
    _queue_without_writer(monkeypatch, cfg, _result(tmp_path / "first"))
    with _lock_held_elsewhere(uri, 30):
        started = time.monotonic()
        drain(uri)  # a background writer
        assert time.monotonic() - started < 5
    assert len(list(queue_dir(uri).glob("*.json"))) == 1  # left to the holder
    record = store._record

    def record_while_another_train_queues(rec: dict[str, Any]) -> str:
        if rec["run_dir"].endswith("first"):  # a train that finds this writer holding the lock
            with monkeypatch.context() as m:
                m.setattr("imgclf.tracking.store.subprocess.Popen", lambda *a, **k: None)
                log_run("train", cfg, _result(tmp_path / "second"))
        return record(rec)

    monkeypatch.setattr(store, "_record", record_while_another_train_queues)
    drain(uri)
    assert not any(queue_dir(uri).glob("*.json"))
    assert sorted(Path(r.data.tags["run_dir"]).name for r in _stored_runs(uri)) == ["first", "second"]


def test_deleted_runs_and_experiments_are_said_and_never_restored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
):
    """A deleted run was compared by its full id (nothing said) and refused by its first characters as "neither a
    run folder nor the id of a run"; a deleted experiment was listed as "no runs recorded", and the next train
    restored it, bringing back every run deleted by hand. Both are said, with what restores them; a run recorded
    into a deleted experiment stays queued until it is restored."""
    from imgclf.tracking.compare import load_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config().updated(tracking_uri=uri, tracking_background=False)
    kept, removed = (log_run("train", cfg, _result(tmp_path / name)) for name in ("kept", "removed"))
    assert kept and removed
    client = _client(uri)
    client.delete_run(removed)
    said = f"run {removed} was deleted (restore it: MLFLOW_TRACKING_URI={uri} mlflow runs restore --run-id {removed})"
    for ref in (removed, removed[:8]):
        with pytest.raises(TrackingError, match=re.escape(said)):
            load_run(ref, cfg.tracking)
    exp = client.get_experiment_by_name("imgclf").experiment_id
    client.delete_experiment(exp)
    said = f"experiment 'imgclf' in {uri} was deleted (restore it: MLFLOW_TRACKING_URI={uri} mlflow experiments "
    said += f"restore --experiment-id {exp})"
    assert main(["runs", "list", "--tracking-uri", uri]) == 2
    assert said in capsys.readouterr().err
    for ref in (kept, kept[:8]):
        with pytest.raises(TrackingError, match=re.escape(said)):
            load_run(ref, cfg.tracking)
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert log_run("train", cfg, _result(tmp_path / "new")) is None
    assert f"{said}; its record stays queued in" in caplog.text
    assert client.get_experiment(exp).lifecycle_stage == "deleted"
    assert client.get_run(removed).info.lifecycle_stage == "deleted"
    assert len(list(queue_dir(uri).glob("*.json"))) == 1
    client.restore_experiment(exp)  # the user's choice: MLflow's restore brings back `removed` too
    drain(uri)
    assert "new" in {Path(r.data.tags["run_dir"]).name for r in _stored_runs(uri)}
    assert not any(queue_dir(uri).glob("*.json"))


def test_a_damaged_local_store_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A damaged mlflow.db was answered with advice for a tracking server; a damaged meta.yaml in MLflow's file
    store with "'NoneType' object has no attribute 'copy'" or "while parsing a flow sequence", naming no file,
    and no run of the store could be listed, compared or recorded. The message names the file; a run whose
    meta.yaml is damaged is left out, with a warning naming it."""
    from imgclf.tracking import list_runs
    from imgclf.tracking.compare import load_run

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 1000)
    with pytest.raises(TrackingError) as e:
        list_runs(TrackingConfig(tracking_uri=f"sqlite:///{db}"))
    assert f"(the store's file may be damaged: {db})" in str(e.value) and "MLFLOW_HTTP" not in str(e.value)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    folder = tmp_path / "files"
    cfg = Config().updated(tracking_uri=folder.as_uri(), tracking_background=False)
    ids = [log_run("train", cfg, _result(tmp_path / f"run{i}", 0.1 * i)) for i in range(3)]
    assert all(ids)
    (meta,) = folder.glob(f"*/{ids[1]}/meta.yaml")
    healthy = meta.read_text()
    for damage in ("run_id: [unclosed\n  : : :\n", ""):
        meta.write_text(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="imgclf"):
            assert [r["id"] for r in list_runs(cfg.tracking)] == [ids[2], ids[0]]
        assert f"runs left out, their files damaged (repair or remove them): {meta}" in caplog.text
        assert load_run(ids[0][:8], cfg.tracking).metrics["overall_accuracy"] == 0
    assert log_run("train", cfg, _result(tmp_path / "run3")) is not None  # recorded beside the damaged run
    meta.write_text(healthy)
    experiment = meta.parent.parent / "meta.yaml"
    experiment.write_text("{{{")
    with pytest.raises(TrackingError, match=re.escape(f"(the store's file may be damaged: {experiment})")):
        list_runs(cfg.tracking)


def test_compare_shows_times_as_measured_and_no_fit_time_for_a_dnn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """A dnn run's time_fit_s (~1 µs: its head comes trained, there is no fit step) was starred over an SVM's;
    times printed with 5-6 decimals; the SVM's C was not recorded. Times show 3 significant digits and are
    ranked as shown, a dnn's fit time is "-", svm_c is recorded and not ranked."""
    from imgclf.tracking.compare import RunRecord, compare, format_row
    from imgclf.tracking.store import flat_metrics

    def run(label: str, classifier: str, fit: float, total: float, **more: float) -> RunRecord:
        metrics = {"time_fit_s": fit, "time_total_s": total, "time_scan_s": 1.231, **more}
        return RunRecord(label, {}, metrics, {"split": "test", "classifier": classifier})

    dnn, svm = run("dnn", "dnn", 7.7e-7, 51.84780355599651), run("svm", "svm", 0.5234, 12.3456, svm_c=10.0)
    rows = {r.name: r for r in compare([dnn, svm, run("svm2", "svm", 0.5231, 1234.5, svm_c=0.1)])}
    assert rows["time_fit_s"].values[0] is None and not any(rows["time_fit_s"].marked)  # 0.523 twice: no best
    assert format_row(rows["time_fit_s"]) == ["-", "0.523", "0.523"]
    assert format_row(rows["time_total_s"]) == ["51.8", "12.3", "1234"] and rows["time_total_s"].marked[1]
    assert format_row(rows["time_scan_s"]) == ["1.23"] * 3 and not any(rows["time_scan_s"].marked)
    assert format_row(rows["svm_c"]) == ["-", "10", "0.1"] and not any(rows["svm_c"].marked)
    assert flat_metrics({"svm_c": 0.5})["svm_c"] == 0.5


def test_svm_c_and_its_cross_validated_accuracy_are_recorded_once():
    """metrics.json's svm_c and svm_cv were not recorded: svm_c and svm_cv's accuracy are metrics (under one name
    each; the accuracy of every C tried stays in metrics.json), shown by `runs compare` unranked and in percent."""
    from imgclf.tracking.compare import RunRecord, compare, format_row
    from imgclf.tracking.store import flat_metrics, run_metrics

    cv = {"folds": 5, "accuracy": 0.875, "accuracy_by_c": {"0.01": 0.5, "1.0": 0.875}}
    flat = flat_metrics({"overall_accuracy": 0.9, "svm_c": 1.0, "svm_cv": cv})
    assert flat == {"overall_accuracy": 0.9, "n_skipped": 0.0, "svm_c": 1.0, "svm_cv_accuracy": 0.875}
    no_cv = {"svm_c": 1.0, "svm_cv": {"folds": 0, "accuracy": None, "accuracy_by_c": {"1.0": None}}}
    assert set(flat_metrics(no_cv)) == {"n_skipped", "svm_c"}
    runs = [RunRecord(c, {}, run_metrics({"svm_c": float(c), "svm_cv": cv}), {"split": "test"}) for c in "12"]
    rows = {r.name: r for r in compare(runs)}
    assert format_row(rows["svm_cv_accuracy"]) == ["87.5 %", "87.5 %"]


def test_a_record_for_a_deleted_experiment_holds_up_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A record queued for a deleted experiment stopped every drain of the store at it: each later run, in any
    experiment, stayed queued behind it, with the deleted experiment's message. It waits alone now."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    scratch = Config().updated(tracking_uri=uri, tracking_background=False, experiment="scratch")
    assert log_run("train", scratch, _result(tmp_path / "a"))
    client = _client(uri)
    client.delete_experiment(client.get_experiment_by_name("scratch").experiment_id)
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert log_run("train", scratch, _result(tmp_path / "b")) is None  # queued: its experiment was deleted
        default = Config().updated(tracking_uri=uri, tracking_background=False)
        assert log_run("train", default, _result(tmp_path / "c"))  # written, past the record queued before it
        monkeypatch.setattr("imgclf.tracking.store.subprocess.Popen", lambda *a, **k: None)  # no writer
        assert log_run("train", default.updated(tracking_background=True), _result(tmp_path / "d")) is None
        drain(uri)  # writes d, keeps b, and ends
    assert [Path(r.data.tags["run_dir"]).name for r in _runs(uri)] == ["c", "d"]
    assert len(list(queue_dir(uri).glob("*.json"))) == 1
    assert f"run {tmp_path / 'b'} not recorded in {uri} yet: experiment 'scratch'" in caplog.text


def test_a_record_queued_while_a_run_is_recorded_in_process_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A train's background writer that finds the queue's lock held leaves its record to the holder; a run
    recorded in-process (or `runs list`) held it, wrote what was queued when it looked, and let go: a record
    queued meanwhile stayed unwritten until some later imgclf command."""
    import imgclf.tracking.store as store

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config().updated(tracking_uri=uri, tracking_background=False)
    drain_locked = store._drain_locked

    def another_train_finishes(at: str) -> int:  # its record queued, its writer gone: the lock is held
        kept = drain_locked(at)
        monkeypatch.setattr(store, "_drain_locked", drain_locked)
        _queue_without_writer(monkeypatch, cfg.updated(tracking_background=True), _result(tmp_path / "queued"))
        return kept

    monkeypatch.setattr(store, "_drain_locked", another_train_finishes)
    assert log_run("train", cfg, _result(tmp_path / "in-process"))
    assert not list(queue_dir(uri).glob("*.json"))  # before _runs, which writes what is queued
    assert sorted(Path(r.data.tags["run_dir"]).name for r in _runs(uri)) == ["in-process", "queued"]


def test_a_record_queued_while_a_deleted_experiments_run_is_kept_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The same, where the in-process run's own experiment was deleted (its record kept queued): the record
    queued meanwhile stayed unwritten. A queue file that holds no record (``[]``) is left out, not in the way."""
    import imgclf.tracking.store as store

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    scratch = Config().updated(tracking_uri=uri, tracking_background=False, experiment="scratch")
    assert log_run("train", scratch, _result(tmp_path / "a"))
    client = _client(uri)
    client.delete_experiment(client.get_experiment_by_name("scratch").experiment_id)
    (queue_dir(uri) / "0-not-a-record.json").write_text("[]")
    drain_locked = store._drain_locked

    def another_train_finishes(at: str) -> int:
        kept = drain_locked(at)
        monkeypatch.setattr(store, "_drain_locked", drain_locked)
        other = scratch.updated(experiment="imgclf", tracking_background=True)
        _queue_without_writer(monkeypatch, other, _result(tmp_path / "queued"))
        return kept

    monkeypatch.setattr(store, "_drain_locked", another_train_finishes)
    assert log_run("train", scratch, _result(tmp_path / "b")) is None  # kept queued: scratch was deleted
    assert len(list(queue_dir(uri).glob("*.json"))) == 1  # b's, before _runs (which writes what is queued)
    assert [Path(r.data.tags["run_dir"]).name for r in _runs(uri)] == ["queued"]
