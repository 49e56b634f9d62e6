"""Recording runs in an MLflow store and reading them back.

The store is ``tracking_uri`` from the configuration, else ``$MLFLOW_TRACKING_URI``, else a SQLite file
``mlflow.db`` in the working folder; runs in a SQLite store keep their files in ``mlruns/`` beside it.
mlflow is imported only here, when a run is recorded or read.

With ``tracking_background`` (the default) a finished run is queued as a JSON record in
``$IMGCLF_CACHE/tracking/<store>/``, with a snapshot of its files (hard links), and a detached process
writes it to MLflow, so a command does not wait for MLflow's start-up, and a next run into the same
folder cannot change what is recorded. Whoever holds the queue's lock drains it; every reader drains it
first, so a listing or comparison always includes the runs that finished before it. A run recorded
in-process takes the same lock (after draining the queue), so that processes creating one new store never
race through its schema migrations. Each run carries its record's id (tag ``record_id``), so that a record
tried again (its writer killed, the store's disk full) completes the run it began instead of writing another.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

from imgclf import __version__
from imgclf.config import Config, TrackingConfig
from imgclf.utils import atomic_write_text, default_cache_dir

if TYPE_CHECKING:
    from filelock import FileLock
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from imgclf.pipeline import RunResult

log = logging.getLogger("imgclf")

DEFAULT_URI = "sqlite:///mlflow.db"
_SCHEME = re.compile(r"^(?!file:)[A-Za-z][A-Za-z0-9+.-]+:")  # a URI scheme; not "C:", a Windows drive
ARTIFACT_FOLDER = "mlruns"
# Run-folder files recorded as artifacts, besides the model/ bundle (checkpoints and temporary files are not).
ARTIFACT_SUFFIXES = frozenset({".csv", ".json", ".html", ".md", ".png", ".svg", ".txt"})
RECORD_TAG = "record_id"  # tag of a run: the id of the record it was written from
# OS errors of a store whose disk is full (or over quota): passing, like a store out of reach
_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL: "database or disk is full"
_BATCH = 100  # most parameters per MLflow log_batch call
_SEARCH_MAX = 50000  # most runs one MLflow search returns (it refuses to be asked for more)
_WRITER_LOG_MAX = 1 << 20  # writer.log is moved to writer.log.1 (replacing it) beyond this many bytes
LOCK_WAIT_S = 15.0  # how long a command waits for another process writing to the same store to write a record
# MLflow's limits, in characters: metric, parameter and tag names, and run names (a column of 250 characters in
# a database store); parameter values; tag values
NAME_MAX, PARAM_VALUE_MAX, TAG_VALUE_MAX = 250, 6000, 8000
_DIGEST = 10  # hex digits of the digest that ends a shortened text
_CHECK_SERVER = (
    "check the address and that the server runs; MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT "
    "set how long it is tried"
)
# MLflow's HTTP requests, where not set: seconds, not MLflow's 4 minutes (18 for a server that never answers), for
# a store that does not answer
QUICK_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_META = "meta.yaml"  # MLflow's file store: an experiment's and a run's description


class TrackingError(ValueError):
    """The run store cannot be read or has no such run; the message says why."""


class ExperimentDeleted(TrackingError):
    """The experiment was deleted in MLflow: neither read nor recorded into (restoring it is the user's choice)."""


@contextlib.contextmanager
def quick_http() -> Iterator[None]:
    """The environment variables of ``QUICK_HTTP`` that are not set, for the duration of the block only."""
    added = {name: value for name, value in QUICK_HTTP.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def tracking_uri(cfg: TrackingConfig) -> str:
    """The store: configured URI, else $MLFLOW_TRACKING_URI, else the local SQLite default.

    A plain folder or ``file:`` URI (MLflow's file store, which MLflow now refuses) names a SQLite store in
    that folder, ``FOLDER/mlflow.db`` with the files in ``FOLDER/mlruns``, unless MLFLOW_ALLOW_FILE_STORE
    asks for the file store itself. A path ending in ``.db`` is the SQLite file. ``~`` at the start of a path
    (``~/runs``, ``sqlite:///~/runs/mlflow.db``) is the home folder.
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri != cfg.tracking_uri and (problem := TrackingConfig.password_problem(uri)):  # checked when configured
        raise TrackingError(f"MLFLOW_TRACKING_URI: {problem}")
    if uri.startswith("~"):
        uri = os.path.expanduser(uri)
    elif uri.startswith("sqlite:///~"):
        uri = "sqlite:///" + os.path.expanduser(uri.removeprefix("sqlite:///"))
    if (
        _SCHEME.match(uri)
        or uri == "databricks"
        or os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")
    ):
        return uri
    parts = urlparse(uri) if uri.startswith("file:") else None
    if parts and parts.netloc not in ("", "localhost"):  # file://runs/db: "runs" is a host, the store /db
        raise TrackingError(
            f"{uri}: a file URI names a host ({parts.netloc}), not a folder; give file:///absolute/path or the "
            "folder's path alone (runs/db)"
        )
    path = Path(url2pathname(parts.path) if parts else uri)
    return f"sqlite:///{(path if path.suffix == '.db' else path / 'mlflow.db').as_posix()}"


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute (so it names the same store from anywhere)."""
    db = sqlite_file(uri)
    return f"sqlite:///{db.resolve()}" if db is not None and not db.is_absolute() else uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working folder), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def fit(text: str, limit: int) -> str:
    """``text``, or where it is longer than ``limit`` characters, its start, ``...`` and a digest of the whole:
    ``limit`` characters, the same for the same text, and apart from another text of the same start."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode(errors="surrogatepass")).hexdigest()[:_DIGEST]
    return f"{text[: limit - _DIGEST - 3]}...{digest}"


def param_value(value: Any) -> str:
    """A configuration value as an MLflow parameter string (JSON for everything but strings), within MLflow's
    length limit."""
    return fit(value if isinstance(value, str) else json.dumps(value), PARAM_VALUE_MAX)


def flat_params(cfg: Config) -> dict[str, str]:
    """The configuration as a run records it (:meth:`~imgclf.config.Config.record`), by flat parameter name, as
    strings."""
    return {name: param_value(value) for section in cfg.record().values() for name, value in section.items()}


def metric_name(name: str) -> str:
    """``name`` with characters MLflow refuses in metric names replaced by ``_``, and cut to MLflow's length
    limit (a digest of the whole name at its end) where longer."""
    return fit(re.sub(r"[^\w.\- ]", "_", name), NAME_MAX)


def _run_level(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """The numbers of a whole run in a ``metrics.json`` by metric name; None where it has none."""
    auc = metrics.get("auc", {})
    return [
        *((k, metrics.get(k)) for k in ("overall_accuracy", "class_averaged_accuracy", "n_train", "n_test")),
        ("n_skipped", len(metrics.get("skipped", []))),
        ("auc_micro", auc.get("micro")),
        ("auc_macro", auc.get("macro")),
        *((f"time_{k}", v) for k, v in metrics.get("timings_s", {}).items()),
        *((f"finetune_{k}", metrics.get("finetune", {}).get(k)) for k in ("kept_epoch", "epochs_trained")),
        ("svm_c", metrics.get("svm_c")),
        ("svm_cv_accuracy", _number((metrics.get("svm_cv") or {}).get("accuracy"))),
    ]


def _number(value: Any) -> float | None:
    """``value`` where it is a number (not a bool), else None."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _by_class(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The accuracy (``acc``) and AUC (``auc``) of each class in a ``metrics.json``; None where it has none."""
    auc = metrics.get("auc", {})
    # metrics.json of older runs: the averages among the classes in one dictionary
    per_class_auc = auc.get("per_class", {c: v for c, v in auc.items() if c not in ("micro", "macro")})
    return {"acc": metrics.get("per_class_accuracy", {}), "auc": per_class_auc}


def run_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a whole run in a ``metrics.json``: accuracies, counts, ``auc_micro``, ``auc_macro``,
    ``time_<step>``, ``finetune_kept_epoch`` and ``finetune_epochs_trained`` of a fine-tuned run, ``svm_c`` and
    ``svm_cv_accuracy`` (``svm_cv``'s ``accuracy``) of an SVM."""
    return {name: float(v) for name, v in _run_level(metrics) if v is not None}


def class_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The accuracy (``acc``) and AUC (``auc``) of each class in a ``metrics.json``, by class name as written."""
    return {kind: {c: float(v) for c, v in by.items() if v is not None} for kind, by in _by_class(metrics).items()}


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.json`` by MLflow name: those of the run (``run_metrics``), ``acc_<class>``,
    ``auc_<class>``.

    Names that come out the same once made valid for MLflow (classes ``a:b`` and ``a?b``, a class ``micro``)
    stay apart: the later one gets ``_2`` (``_3``, ...). That number depends on the run's other classes, so
    ``runs compare`` lines classes up by their names in ``metrics.json`` instead.
    """
    named = [
        *_run_level(metrics),
        *((f"{kind}_{c}", v) for kind, by in _by_class(metrics).items() for c, v in by.items()),
    ]
    out: dict[str, Any] = {}
    for name, value in named:  # a name is taken even without a value, so that runs number classes alike
        key, n = metric_name(name), 1
        while key in out:
            n += 1
            key = metric_name(f"{name}_{n}")
        out[key] = value
    return {k: float(v) for k, v in out.items() if v is not None}


def run_tags(kind: str, cfg: Config, result: RunResult, on_train: bool) -> dict[str, str]:
    """Searchable facts of a run: what it did, on which data, with which model, where its folder is (each
    within MLflow's length limit)."""
    bundle = result.bundle
    tags = {
        "kind": kind,
        "split": "train" if on_train else "test",
        "dataset": Path(cfg.data.data_root or "").name,
        "data_root": str(cfg.data.data_root or ""),
        "classifier": bundle.classifier,
        "backbone": bundle.backbone_spec["name"],
        "resolution": str(bundle.preprocess.resolution),
        "run_dir": str(Path(result.run_dir).resolve()),
        "model_id": bundle.model_id,
        "imgclf_version": __version__,
    }
    return {name: fit(value, TAG_VALUE_MAX) for name, value in tags.items()}


def connect(cfg: TrackingConfig) -> MlflowClient:
    """A client of the configured store; TrackingError when mlflow is not installed."""
    try:
        from mlflow import MlflowClient
    except ModuleNotFoundError as e:
        raise TrackingError("run tracking needs mlflow: pip install mlflow (or pass --no-tracking)") from e
    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new SQLite store
    # MLflow logs each database error it re-raises with ~90 lines of traceback (a read-only store); imgclf says
    # what failed and what stays queued itself
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    if _file_store_root(tracking_uri(cfg)) is not None:
        _skip_damaged_runs(client)
    return client


def _skip_damaged_runs(client: MlflowClient) -> None:
    """In MLflow's file store, a run whose ``meta.yaml`` is damaged (empty, not YAML) is left out with a warning
    naming the file, as MLflow leaves out one without it; MLflow failed every listing of the store instead."""
    import yaml
    from mlflow.exceptions import MissingConfigException
    from mlflow.store.tracking.file_store import FileStore

    store = client._tracking_client.store  # MLflow offers no other way to its file store's run reader
    if not isinstance(store, FileStore) or "_get_run_info_from_dir" in vars(store):  # a store MLflow kept: wrapped
        return
    read = store._get_run_info_from_dir

    def read_or_skip(run_dir: str) -> Any:
        try:
            return read(run_dir)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError, KeyError) as e:  # an empty file: None.copy()
            meta = Path(run_dir) / _META
            log.warning("runs left out, their files damaged (repair or remove them): %s", meta)
            raise MissingConfigException(f"{meta} is damaged: {e}") from e

    store._get_run_info_from_dir = read_or_skip


@contextlib.contextmanager
def reading(cfg: TrackingConfig) -> Iterator[None]:
    """Turn a store that cannot be read (unreachable server, broken database) into a TrackingError."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as e:
        uri = tracking_uri(cfg)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(f"cannot read the run store {uri}: {first[:300]}{advice(uri)}") from e


def advice(uri: str) -> str:
    """What to check, said after the reason, where the store ``uri`` cannot be read: a server's address, or a
    local store's file (the damaged ``meta.yaml`` of a file store, found by reading each)."""
    if (db := sqlite_file(uri)) is not None:
        return f" (the store's file may be damaged: {db}); repair it, or move it away to start a new store"
    root = _file_store_root(uri)
    if root is None:
        return f" ({_CHECK_SERVER})"
    damaged = [str(meta) for meta in sorted([*root.glob(f"*/{_META}"), *root.glob(f"*/*/{_META}")]) if _damaged(meta)]
    files = ", ".join(damaged) or f"a {_META} in {root}"
    return f" (the store's file may be damaged: {files}); repair it, or remove the folder holding it"


def _file_store_root(uri: str) -> Path | None:
    """The folder of MLflow's file store ``uri`` (``file:`` or a path), else None."""
    if uri.startswith("file:"):
        return Path(url2pathname(urlparse(uri).path))
    return None if _SCHEME.match(uri) or uri == "databricks" else Path(uri)


def _damaged(meta: Path) -> bool:
    """Whether ``meta`` (a ``meta.yaml``) is not a YAML mapping."""
    import yaml

    try:
        return not isinstance(yaml.safe_load(meta.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError, yaml.YAMLError):
        return True


def store_exists(cfg: TrackingConfig) -> bool:
    """False for a local SQLite store that has no database file yet (reading it would create one)."""
    db = sqlite_file(tracking_uri(cfg))
    return db is None or db.is_file()


def experiment_id(client: MlflowClient, cfg: TrackingConfig, create: bool = False) -> str | None:
    """Id of the configured experiment (created when ``create``), None when absent; ExperimentDeleted where it was
    deleted (restoring it would bring back every run it held, those deleted one by one too: the user's choice)."""
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        if not create:
            return None
        db = sqlite_file(tracking_uri(cfg))
        location = (db.resolve().parent / ARTIFACT_FOLDER).as_uri() if db else None
        return client.create_experiment(cfg.experiment, artifact_location=location)
    if exp.lifecycle_stage == "deleted":
        raise ExperimentDeleted(deleted_experiment(tracking_uri(cfg), exp.name, exp.experiment_id))
    return exp.experiment_id


def _with_store(uri: str, command: str) -> str:
    """The shell command ``command`` run on the store ``uri``."""
    return f"MLFLOW_TRACKING_URI={shlex.quote(uri)} {command}"


def deleted_experiment(uri: str, name: str, exp_id: str) -> str:
    """What to say of the experiment ``name`` deleted in the store ``uri``."""
    restore = _with_store(uri, f"mlflow experiments restore --experiment-id {exp_id}")
    return f"experiment {name!r} in {uri} was deleted (restore it: {restore})"


def deleted_run(uri: str, run_id: str) -> str:
    """What to say of the run ``run_id`` deleted in the store ``uri``."""
    return f"run {run_id} was deleted (restore it: {_with_store(uri, f'mlflow runs restore --run-id {run_id}')})"


def run_record(kind: str, cfg: Config, result: RunResult, on_train: bool) -> dict[str, Any]:
    """Everything MLflow is told about a run, as JSON: its id, store, names, times, tags, parameters, metrics,
    files.

    The run ends now, when it is recorded; it began its measured duration earlier (``evaluate_s`` of an
    evaluation, ``total_s`` of a training), so MLflow shows when it ran and how long it took.
    """
    run_dir = Path(result.run_dir).resolve()
    end = time.time()
    took = float((result.metrics.get("timings_s") or {}).get("evaluate_s" if kind == "evaluate" else "total_s", 0))
    return {
        "id": uuid.uuid4().hex,
        "uri": absolute_uri(tracking_uri(cfg.tracking)),
        "experiment": cfg.tracking.experiment,
        "run_name": fit(f"{run_dir.name} {kind}" + (" on train" if on_train else ""), NAME_MAX),
        "start_ms": int((end - took) * 1000),
        "end_ms": int(end * 1000),
        "tags": run_tags(kind, cfg, result, on_train),
        "params": flat_params(cfg),
        "metrics": flat_metrics(result.metrics),
        "run_dir": str(run_dir),
    }


def _artifact_files(folder: Path) -> list[Path]:
    return [
        f
        for f in sorted(folder.iterdir())
        if f.is_file() and f.suffix.lower() in ARTIFACT_SUFFIXES and not f.name.startswith(".")
    ]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # run-folder files are replaced by rename, never rewritten: the link keeps this version
    except OSError:
        shutil.copy2(src, dst)


def snapshot(run_dir: Path, dest: Path) -> None:
    """The run folder's recorded files as they are now, in ``dest`` (hard links, else copies), so that a
    later run into the same folder cannot change what a queued record logs."""
    dest.mkdir(parents=True)
    for f in _artifact_files(run_dir):
        _link_or_copy(str(f), str(dest / f.name))
    if (run_dir / "model").is_dir():
        shutil.copytree(run_dir / "model", dest / "model", copy_function=_link_or_copy)


class StoreUnavailable(Exception):
    """The store could not be reached, read or written to (its disk full): the record is to be tried again,
    which completes the run it began, if any."""


class StoreUnreadable(StoreUnavailable):
    """The store could not even be read (a server that does not answer, a damaged database)."""


class ExperimentUnavailable(StoreUnavailable):
    """The record's experiment was deleted: the record waits for it to be restored, the store's other records
    are written."""


def _first_line(e: BaseException) -> str:
    """What went wrong, in a line: the database's own error where one lies beneath (MLflow's first line can be
    SQLAlchemy's "raised as a result of Query-invoked autoflush"), without SQLAlchemy's SQL."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(getattr(cause, "orig", None), Exception):  # SQLAlchemy's wrapper of the driver's error
            e = cause.orig
            break
        cause = cause.__cause__
    return (str(e).splitlines() or [type(e).__name__])[0]


def _disk_full(e: BaseException) -> BaseException | None:
    """``e``, or the error it arose from, that says a disk is full or over quota (OS or SQLite); else None."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if (isinstance(cause, OSError) and cause.errno in _DISK_FULL) or (
            getattr(cause, "sqlite_errorcode", None) == _SQLITE_FULL
        ):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _begun_run(client: MlflowClient, exp: str, record_id: str) -> Run | None:
    """The run an earlier try of the record ``record_id`` wrote or began (a writer killed midway), if any."""
    runs = client.search_runs([exp], filter_string=f"tags.{RECORD_TAG} = '{record_id}'", max_results=1)
    return runs[0] if runs else None


def _record(rec: dict[str, Any]) -> str:
    """Write one run record to its store; returns the MLflow run id.

    A run an earlier try of the record began is completed rather than a second one written; a finished one
    is the record written. A full disk raises StoreUnavailable, its run marked FAILED until the next try.
    """
    from mlflow.entities import Metric, Param

    store = TrackingConfig(tracking_uri=rec["uri"], experiment=rec["experiment"])
    try:
        if (db := sqlite_file(rec["uri"])) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)  # a new store in a new folder
        client = connect(store)
        experiment_id(client, store)  # a read first: a store out of reach is told from one refusing the record
    except ExperimentDeleted as e:
        raise ExperimentUnavailable(str(e)) from e
    except Exception as e:
        raise StoreUnreadable(_first_line(e)) from e
    try:
        exp = experiment_id(client, store, create=True)
        run = _begun_run(client, exp, rec["id"]) or client.create_run(
            exp, start_time=rec["start_ms"], tags={**rec["tags"], RECORD_TAG: rec["id"]}, run_name=rec["run_name"]
        )
    except Exception as e:  # a run created here is found by the next try
        raise StoreUnavailable(_first_line(_disk_full(e) or e)) from e
    run_id = run.info.run_id
    if run.info.status == "FINISHED":  # written by a writer stopped before the record left the queue
        return run_id
    files = Path(rec.get("files") or rec["run_dir"])  # the snapshot of a queued record
    end_ms = rec.get("end_ms")  # records queued by older versions: now
    try:
        params = [Param(k, v) for k, v in rec["params"].items()]
        metrics = [Metric(k, v, rec["start_ms"], 0) for k, v in rec["metrics"].items()]
        for i in range(0, max(len(params), len(metrics)), _BATCH):  # again, in a run begun before: no change
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH], params=params[i : i + _BATCH])
        for f in _artifact_files(files):
            client.log_artifact(run_id, str(f))
        if (files / "model").is_dir():
            client.log_artifacts(run_id, str(files / "model"), "model")
        client.set_terminated(run_id, "FINISHED", end_time=end_ms)
    except BaseException as e:
        with contextlib.suppress(Exception):  # a disk still full may refuse this too
            client.set_terminated(run_id, "FAILED", end_time=end_ms)
        if (full := _disk_full(e)) is not None:
            raise StoreUnavailable(_first_line(full)) from e
        raise
    return run_id


def _record_or_warn(rec: dict[str, Any], keep: bool = False) -> str | None:
    """``_record``, a failure logged as a warning; ``keep``: a StoreUnavailable is raised instead."""
    try:
        run_id = _record(rec)
    except Exception as e:  # tracking must never break a run
        if keep and isinstance(e, StoreUnavailable):
            raise
        log.warning("run %s not recorded in %s: %s", rec["run_dir"], rec["uri"], e)
        return None
    log.info("recorded as MLflow run %s in %s (`%s` lists it)", run_id, rec["uri"], _list_command(rec))
    return run_id


def _list_command(rec: dict[str, Any]) -> str:
    """The ``imgclf runs list`` command showing the store and experiment of the record ``rec``."""
    cmd = "imgclf runs list"
    if rec["uri"] != absolute_uri(DEFAULT_URI):
        cmd += f" --tracking-uri {shlex.quote(rec['uri'])}"
    if rec["experiment"] != TrackingConfig.model_fields["experiment"].default:
        cmd += f" --experiment {shlex.quote(rec['experiment'])}"
    return cmd


def queue_dir(uri: str) -> Path:
    """Folder of the records waiting for the store ``uri``."""
    return default_cache_dir() / "tracking" / hashlib.sha256(absolute_uri(uri).encode()).hexdigest()[:16]


def _queued_jobs(uri: str) -> set[str]:
    """The names of the records waiting for the store ``uri``."""
    return {job.name for job in queue_dir(uri).glob("*.json")}


def _queued(uri: str) -> int:
    return len(_queued_jobs(uri))


@contextlib.contextmanager
def _locked(uri: str, wait: float = 0.0) -> Iterator[bool]:
    """Hold the lock of the store ``uri``'s queue: one process writes to a store at a time. A process holding it
    is waited for, after saying so, while it writes a queued record at least every ``wait`` seconds (0: not
    waited for); else False is yielded, the lock not held (a writer stuck on a store that does not answer)."""
    from filelock import FileLock, Timeout

    folder = queue_dir(uri)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait or not _acquire_while_writing(lock, uri, wait):
            yield False
            return
    try:
        yield True
    finally:
        lock.release()


def _acquire_while_writing(lock: FileLock, uri: str, wait: float) -> bool:
    """Acquire ``lock``, held by another process, waiting while it writes a record queued for ``uri`` every
    ``wait`` seconds."""
    from filelock import Timeout

    log.info("another imgclf process is writing runs to %s: waiting for it", uri)
    left, deadline = _queued_jobs(uri), time.monotonic() + wait
    while time.monotonic() < deadline:
        with contextlib.suppress(Timeout):
            lock.acquire(timeout=min(1.0, wait))
            return True
        now = _queued_jobs(uri)
        if left - now:  # one written (whatever others queued meanwhile): it is not stuck
            deadline = time.monotonic() + wait
        left = now
    return False


def _drain_locked(uri: str) -> int:
    """Write every queued record of ``uri``, oldest first, holding its lock, until none is left (those queued
    meanwhile too) but those of deleted experiments, which stay queued, with a warning (one of them blocked every
    later record of the store); their number. StoreUnavailable where the store cannot be reached, read or written
    to, or its disk is full (the records stay queued)."""
    kept: set[Path] = set()
    while jobs := [job for job in sorted(queue_dir(uri).glob("*.json")) if job not in kept]:
        job = jobs[0]
        with contextlib.suppress(FileNotFoundError, ValueError):  # gone, or not a record: it leaves the queue
            rec = json.loads(job.read_text(encoding="utf-8"))
            if not isinstance(rec, dict):
                raise ValueError(f"{job} is not a record")
            try:
                _record_or_warn({"id": job.stem, **rec}, keep=True)  # records queued by older versions: no id
            except ExperimentUnavailable as e:
                log.warning("run %s not recorded in %s yet: %s; its record stays queued", rec["run_dir"], uri, e)
                kept.add(job)
                continue
        job.unlink(missing_ok=True)
        shutil.rmtree(job.with_suffix(".files"), ignore_errors=True)
    return len(kept)


def _warn_queued(uri: str, e: StoreUnavailable) -> None:
    log.warning(
        "runs not recorded in %s yet (%s)%s: %d record(s) stay queued in %s, written by the next imgclf train, "
        "evaluate or runs command",
        uri,
        e,
        advice(uri) if isinstance(e, StoreUnreadable) else "",
        _queued(uri),
        queue_dir(uri),
    )


def drain(uri: str) -> None:
    """Write every queued record of the store ``uri``, oldest first, unless another process is doing it (it
    writes this process's records too: a writer for each train, all waiting on a server that does not answer,
    made a queue of processes).

    While the store cannot be reached or read (a server offline, a damaged database) or its disk is full, the
    records stay queued for the next drain: nothing is lost. A record that fails otherwise once the store is
    reached is logged as a warning and leaves the queue (MLflow shows its run as failed; its run folder is
    untouched).
    """
    kept = 0
    while _queued(uri) > kept:  # again after the lock's release: a record queued just before it found it held
        with _locked(uri) as held:
            if not held:
                return
            try:
                kept = _drain_locked(uri)
            except StoreUnavailable as e:
                _warn_queued(uri, e)
                return


def drain_pending(cfg: TrackingConfig) -> None:
    """Record the runs still queued for the configured store (called before reading it).

    Raises TrackingError when the store cannot be reached or read (the records stay queued), so that it is not
    tried a second time. Another process writing to the store is waited for while it writes a record at least
    every ``LOCK_WAIT_S`` seconds; then its runs are left to it, with a warning that they are not shown yet.
    """
    uri = tracking_uri(cfg)
    if not queue_dir(uri).is_dir():
        return
    with _locked(uri, LOCK_WAIT_S) as held:
        if not held:
            log.warning(
                "%d queued run(s) not shown: another imgclf process (the background writer of a train or "
                "evaluate) is still writing to %s, and has not written one for %.0f s; they are there once it is done",
                _queued(uri),
                uri,
                LOCK_WAIT_S,
            )
            return
        try:
            kept = _drain_locked(uri)
        except StoreUnreadable as e:
            answer = "does not answer" if uri.startswith(("http://", "https://")) else "cannot be read"
            raise TrackingError(
                f"the run store {uri} {answer}: {str(e)[:300]}{advice(uri)}; {_queued(uri)} run(s) stay queued in "
                f"{queue_dir(uri)}, written by the next imgclf command that reaches it"
            ) from e
        except StoreUnavailable as e:  # it answers but refuses the records: what it holds can still be read
            _warn_queued(uri, e)
            return
    if _queued(uri) > kept:  # queued while the lock was held: its writer found it held and left it to this one
        drain(uri)


def _enqueue(rec: dict[str, Any]) -> Path:
    """Queue ``rec`` with a snapshot of its files; the record's file. OSError where it cannot be written."""
    job = queue_dir(rec["uri"]) / f"{rec['start_ms']:015d}-{uuid.uuid4().hex[:8]}.json"
    try:
        snapshot(Path(rec["run_dir"]), job.with_suffix(".files"))
        atomic_write_text(job, json.dumps({**rec, "files": str(job.with_suffix(".files"))}))
    except OSError:
        shutil.rmtree(job.with_suffix(".files"), ignore_errors=True)
        raise
    return job


def _queue(rec: dict[str, Any]) -> bool:
    """Queue ``rec`` and start a detached writer; False where that is impossible (then record in-process)."""
    if sys.platform == "win32":
        return False
    folder = queue_dir(rec["uri"])
    try:
        _enqueue(rec)
        errors_path = folder / "writer.log"
        with contextlib.suppress(FileNotFoundError):
            if errors_path.stat().st_size > _WRITER_LOG_MAX:
                os.replace(errors_path, folder / "writer.log.1")
        with open(errors_path, "ab") as errors:  # the child keeps its own copy of the handle
            subprocess.Popen(
                [sys.executable, "-m", "imgclf.tracking.writer", rec["uri"]],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
                close_fds=True,
            )
    except OSError as e:  # a record queued all the same is written first, as its run (by its id): once
        log.warning("cannot record in the background (%s); recording now", e)
        return False
    return True


def _record_now(rec: dict[str, Any]) -> str | None:
    """Record ``rec`` in this process, after the runs queued before it, holding the queue's lock; queued for a
    background writer instead while another process keeps writing to the store, and queued (no writer started)
    where the store cannot take it now. MLflow's HTTP requests are tried for seconds (``QUICK_HTTP``)."""
    uri = rec["uri"]
    with quick_http():
        kept, run_id = 0, None
        with _locked(uri, LOCK_WAIT_S) as held:
            if held:
                try:
                    kept = _drain_locked(uri)
                    run_id = _record_or_warn(rec, keep=True)
                except ExperimentUnavailable as e:  # its experiment deleted: the store takes the others
                    _keep_queued(rec, e)
                    kept += 1
                except StoreUnavailable as e:  # out of reach, its disk full: tried again later
                    _keep_queued(rec, e)
                    return None
        if held:
            if _queued(uri) > kept:  # queued while the lock was held: its writer found it held and left it to us
                drain(uri)
            return run_id
    if _queue(rec):
        log.info("another imgclf process is still writing to %s: this run is queued for it instead", uri)
        return None
    with quick_http():
        return _record_or_warn(rec)


def _keep_queued(rec: dict[str, Any], e: StoreUnavailable) -> None:
    """Queue ``rec``, which the store could not take (``e``), for the next imgclf command that reaches it."""
    uri = rec["uri"]
    try:
        job = _enqueue(rec)
    except OSError as queueing:
        log.warning("run %s not recorded in %s: %s; nor queued: %s", rec["run_dir"], uri, e, queueing)
        return
    if isinstance(e, StoreUnreadable):
        _warn_queued(uri, e)
    else:
        log.warning(
            "run %s not recorded in %s: %s; its record stays queued in %s, written by the next imgclf train, "
            "evaluate or runs command that can",
            rec["run_dir"],
            uri,
            e,
            job.parent,
        )


def log_run(
    kind: Literal["train", "evaluate"], cfg: Config, result: RunResult, *, on_train: bool = False
) -> str | None:
    """Record a run (configuration, metrics, run-folder files, tags); its MLflow id, None when that failed
    or when the record was queued for the background writer.

    Never raises: a run is complete without its record, so a tracking failure only logs a warning.
    """
    try:
        rec = run_record(kind, cfg, result, on_train)
        if cfg.tracking.tracking_background and _queue(rec):
            log.info(
                "run queued for the run store %s: written in the background, or by the next imgclf command once "
                "the store answers; `%s` lists it",
                rec["uri"],
                _list_command(rec),
            )
            return None
        return _record_now(rec)
    except Exception as e:  # noqa: BLE001 - tracking must never break a run
        log.warning("run %s not recorded: %s", result.run_dir, e)
        return None


def list_runs(cfg: TrackingConfig, limit: int = 20) -> list[dict[str, Any]]:
    """The experiment's ``limit`` latest runs (``_SEARCH_MAX`` at most): id, date, kind, data set, classifier,
    backbone, split scored, accuracies, MLflow status, run folder."""
    drain_pending(cfg)
    if not store_exists(cfg):
        return []
    with reading(cfg):
        client = connect(cfg)
        exp = experiment_id(client, cfg)
        if exp is None:
            return []
        runs = client.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=min(limit, _SEARCH_MAX))
    return [
        {
            "id": r.info.run_id,
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)),
            "kind": r.data.tags.get("kind", ""),
            "dataset": r.data.tags.get("dataset", ""),
            "classifier": r.data.tags.get("classifier", ""),
            "backbone": r.data.tags.get("backbone", ""),
            "split": r.data.tags.get("split", ""),  # evaluate --on-train scores the training split
            "accuracy": r.data.metrics.get("overall_accuracy"),
            "class_averaged_accuracy": r.data.metrics.get("class_averaged_accuracy"),
            "status": r.info.status,  # FAILED: not all recorded; RUNNING: being written, or its writer was stopped
            "run_dir": r.data.tags.get("run_dir", ""),
        }
        for r in runs
    ]
