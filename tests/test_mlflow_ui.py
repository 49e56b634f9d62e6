"""Recorded runs in the real MLflow web UI (`imgclf runs ui`), opened in Debian's headless Chromium.

Two tiny SVM runs that differ in ``svm_c_grid`` are recorded in a private SQLite store, the store is served with
the command line of ``imgclf runs ui``, the address it prints must show both runs (MLflow 3 opens on its GenAI
view, which shows none), and MLflow's compare-runs page for both runs must show their names, the differing
parameter and a per-class accuracy metric. The screenshot goes to $IMGCLF_TEST_ARTIFACTS (default: the
test's tmp_path).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import CHROMIUM, CHROMIUM_ARGS, make_folder

from imgclf.config import Config
from imgclf.pipeline import train
from imgclf.tracking import drain_pending
from imgclf.tracking.cli import _ui_command, ui_address, ui_environment

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (install it with .ci/install-browser)", allow_module_level=True)
if importlib.util.find_spec("mlflow") is None:
    pytest.skip("mlflow is not installed", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (run .ci/install-browser)")

pytestmark = pytest.mark.slow


def _process_group_serving(store: str) -> list[str]:
    """The command lines of the processes in the process group of the ``mlflow ui`` serving ``store``."""
    import psutil

    def group(proc: psutil.Process) -> int | None:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            return os.getpgid(proc.pid)
        return None

    def line(proc: psutil.Process) -> str:
        with contextlib.suppress(psutil.Error):
            return " ".join(proc.cmdline())
        return ""

    procs = list(psutil.process_iter())
    servers = {group(p) for p in procs if store in line(p) and " ui " in line(p)} - {None}
    return [line(p) for p in procs if group(p) in servers]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow ui exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow ui did not answer in {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def ui(tmp_path: Path, store: str) -> Iterator[Callable[[], str]]:
    """Starts `mlflow ui` as `imgclf runs ui` does, once the runs are recorded (a server creating the
    store's tables while a run logs to it can lock the SQLite file), and gives its URL."""
    port = _free_port()
    log = tmp_path / "mlflow-ui.log"
    procs: list[subprocess.Popen] = []

    def start() -> str:
        with open(log, "wb") as log_file:
            procs.append(
                subprocess.Popen(
                    _ui_command(store, port),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=tmp_path,
                    env=ui_environment(),
                )
            )
        url = f"http://127.0.0.1:{port}"
        _wait_for(url, procs[0], log)
        return url

    try:
        yield start
    finally:
        # The whole process group: mlflow ui runs uvicorn in child processes.
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("IMGCLF_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_runs_compared_in_mlflow_ui(ui: Callable[[], str], store: str, tmp_path: Path, artifacts: Path) -> None:
    from mlflow import MlflowClient

    base = Config().updated(
        data_root=make_folder(tmp_path / "data", n=8),
        resolution=64,
        cache_dir=tmp_path / "cache",
        flip_tta=False,
        cv_folds=2,
        progress=False,
        tracking_uri=store,
    )
    train(base.updated(out=tmp_path / "runs" / "svm-c1", svm_c_grid=[1.0]))
    train(base.updated(out=tmp_path / "runs" / "svm-c05", svm_c_grid=[0.5]))
    drain_pending(base.tracking)  # as `imgclf runs ui` does before it starts the server
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("imgclf")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["svm-c05 train", "svm-c1 train"]
    assert {r.data.params["svm_c_grid"] for r in runs} == {"[1.0]", "[0.5]"}
    assert "acc_circles" in runs[0].data.metrics

    url = ui()
    group = _process_group_serving(store)  # one worker, no job runner (MLflow's took 8 more processes, 1.5 GB)
    assert 1 <= len(group) <= 3, group
    ids = json.dumps([r.info.run_id for r in runs])
    query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([exp.experiment_id])})
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(ui_address(base.tracking, urllib.parse.urlparse(url).port))  # as `imgclf runs ui` prints it
            for run in runs:
                expect(page.get_by_text(run.info.run_name, exact=True).first).to_be_visible(timeout=60_000)
            page.screenshot(path=str(artifacts / "mlflow-runs.png"))
            page.goto(f"{url}/#/compare-runs?{query}")
            for text in ("svm-c1 train", "svm-c05 train", "svm_c_grid", "acc_circles"):
                # MLflow's page loads a large script first: on a busy machine it took longer than expect's 5 s
                expect(page.get_by_text(text, exact=True).first).to_be_attached(timeout=30_000)
            expect(page.get_by_text("svm_c_grid", exact=True).first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(artifacts / "mlflow-compare-runs.png"))
            # The page scrolls inside a pane: bring the parameter and metric tables into view.
            page.get_by_text("acc_circles", exact=True).last.scroll_into_view_if_needed()
            page.screenshot(path=str(artifacts / "mlflow-compare-tables.png"))
            body = page.locator("body").inner_text()
        finally:
            browser.close()
    for run in runs:
        assert run.info.run_name in body
    assert "svm_c_grid" in body and "acc_circles" in body
