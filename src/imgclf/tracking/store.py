"""Recording runs in an MLflow store and reading them back.

The store is ``tracking_uri`` from the configuration, else ``$MLFLOW_TRACKING_URI``, else a SQLite file
``mlflow.db`` in the working folder; runs in a SQLite store keep their files in ``mlruns/`` beside it.
mlflow is imported only here, when a run is recorded or read.

With ``tracking_background`` (the default) a finished run is queued as a JSON record in
``$IMGCLF_CACHE/tracking/<store>/``, with a snapshot of its files (hard links), and a detached process
writes it to MLflow, so a command does not wait for MLflow's start-up, and a next run into the same
folder cannot change what is recorded. Whoever holds the queue's lock drains it; every reader drains it
first, so a listing or comparison always includes the runs that finished before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
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
    from mlflow import MlflowClient

    from imgclf.pipeline import RunResult

log = logging.getLogger("imgclf")

DEFAULT_URI = "sqlite:///mlflow.db"
_SCHEME = re.compile(r"^(?!file:)[A-Za-z][A-Za-z0-9+.-]+:")  # a URI scheme; not "C:", a Windows drive
ARTIFACT_FOLDER = "mlruns"
# Run-folder files recorded as artifacts, besides the model/ bundle (checkpoints and temporary files are not).
ARTIFACT_SUFFIXES = frozenset({".csv", ".json", ".html", ".md", ".png", ".svg", ".txt"})
_BATCH = 100  # most parameters per MLflow log_batch call
_WRITER_LOG_MAX = 1 << 20  # writer.log is moved to writer.log.1 (replacing it) beyond this many bytes


class TrackingError(ValueError):
    """The run store cannot be read or has no such run; the message says why."""


def tracking_uri(cfg: TrackingConfig) -> str:
    """The store: configured URI, else $MLFLOW_TRACKING_URI, else the local SQLite default.

    A plain folder or ``file:`` URI (MLflow's file store, which MLflow now refuses) names a SQLite store in
    that folder, ``FOLDER/mlflow.db`` with the files in ``FOLDER/mlruns``, unless MLFLOW_ALLOW_FILE_STORE
    asks for the file store itself. A path ending in ``.db`` is the SQLite file.
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if (
        _SCHEME.match(uri)
        or uri == "databricks"
        or os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true")
    ):
        return uri
    path = Path(url2pathname(urlparse(uri).path) if uri.startswith("file:") else uri)
    return f"sqlite:///{(path if path.suffix == '.db' else path / 'mlflow.db').as_posix()}"


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute (so it names the same store from anywhere)."""
    db = sqlite_file(uri)
    return f"sqlite:///{db.resolve()}" if db is not None and not db.is_absolute() else uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working folder), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def param_value(value: Any) -> str:
    """A configuration value as an MLflow parameter string (JSON for everything but strings)."""
    return value if isinstance(value, str) else json.dumps(value)


def flat_params(cfg: Config) -> dict[str, str]:
    """The whole configuration by flat parameter name, as strings."""
    return {name: param_value(value) for name, value in cfg.flat().items()}


def metric_name(name: str) -> str:
    """``name`` with characters MLflow refuses in metric names replaced by ``_``."""
    return re.sub(r"[^\w.\- ]", "_", name)


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.json``: accuracies, counts, ``auc_micro``, ``auc_macro``, ``acc_<class>``,
    ``auc_<class>``, ``time_<step>_s``.

    Names that come out the same once made valid for MLflow (classes ``a:b`` and ``a?b``, a class ``micro``)
    stay apart: the later one gets ``_2`` (``_3``, ...).
    """
    auc = metrics.get("auc", {})
    # metrics.json of older runs: the averages among the classes in one dictionary
    per_class_auc = auc.get("per_class", {c: v for c, v in auc.items() if c not in ("micro", "macro")})
    named = [
        *((k, metrics.get(k)) for k in ("overall_accuracy", "class_averaged_accuracy", "n_train", "n_test")),
        ("n_skipped", len(metrics.get("skipped", []))),
        ("auc_micro", auc.get("micro")),
        ("auc_macro", auc.get("macro")),
        *((f"acc_{c}", v) for c, v in metrics.get("per_class_accuracy", {}).items()),
        *((f"auc_{c}", v) for c, v in per_class_auc.items()),
        *((f"time_{k}", v) for k, v in metrics.get("timings_s", {}).items()),
    ]
    out: dict[str, Any] = {}
    for name, value in named:  # a name is taken even without a value, so that runs number classes alike
        key = base = metric_name(name)
        n = 1
        while key in out:
            n += 1
            key = f"{base}_{n}"
        out[key] = value
    return {k: float(v) for k, v in out.items() if v is not None}


def run_tags(kind: str, cfg: Config, result: RunResult, on_train: bool) -> dict[str, str]:
    """Searchable facts of a run: what it did, on which data, with which model, where its folder is."""
    bundle = result.bundle
    return {
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


def connect(cfg: TrackingConfig) -> MlflowClient:
    """A client of the configured store; TrackingError when mlflow is not installed."""
    try:
        from mlflow import MlflowClient
    except ModuleNotFoundError as e:
        raise TrackingError("run tracking needs mlflow: pip install mlflow (or pass --no-tracking)") from e
    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations of a new SQLite store
    return MlflowClient(tracking_uri=tracking_uri(cfg))


@contextlib.contextmanager
def reading(cfg: TrackingConfig) -> Iterator[None]:
    """Turn a store that cannot be read (unreachable server, broken database) into a TrackingError."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(
            f"cannot read the run store {tracking_uri(cfg)}: {first[:300]} (check the address and that the server "
            "runs; MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT set how long it is tried)"
        ) from e


def store_exists(cfg: TrackingConfig) -> bool:
    """False for a local SQLite store that has no database file yet (reading it would create one)."""
    db = sqlite_file(tracking_uri(cfg))
    return db is None or db.is_file()


def experiment_id(client: MlflowClient, cfg: TrackingConfig, create: bool = False) -> str | None:
    """Id of the configured experiment (created or restored when ``create``), None when absent."""
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        if not create:
            return None
        db = sqlite_file(tracking_uri(cfg))
        location = (db.resolve().parent / ARTIFACT_FOLDER).as_uri() if db else None
        return client.create_experiment(cfg.experiment, artifact_location=location)
    if exp.lifecycle_stage == "deleted" and create:
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def run_record(kind: str, cfg: Config, result: RunResult, on_train: bool) -> dict[str, Any]:
    """Everything MLflow is told about a run, as JSON: store, names, tags, parameters, metrics, files."""
    run_dir = Path(result.run_dir).resolve()
    return {
        "uri": absolute_uri(tracking_uri(cfg.tracking)),
        "experiment": cfg.tracking.experiment,
        "run_name": f"{run_dir.name} {kind}" + (" on train" if on_train else ""),
        "start_ms": int(time.time() * 1000),
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
    """The store could not be reached, read or written to: nothing of the record was written."""


def _record(rec: dict[str, Any]) -> str:
    """Write one run record to its store; returns the MLflow run id."""
    from mlflow.entities import Metric, Param

    store = TrackingConfig(tracking_uri=rec["uri"], experiment=rec["experiment"])
    try:
        if (db := sqlite_file(rec["uri"])) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)  # a new store in a new folder
        client = connect(store)
        exp = experiment_id(client, store, create=True)
        run = client.create_run(exp, start_time=rec["start_ms"], tags=rec["tags"], run_name=rec["run_name"])
    except Exception as e:  # any failure here wrote nothing
        raise StoreUnavailable((str(e).splitlines() or [type(e).__name__])[0]) from e  # not SQLAlchemy's SQL
    run_id = run.info.run_id
    files = Path(rec.get("files") or rec["run_dir"])  # the snapshot of a queued record
    status = "FAILED"
    try:
        params = [Param(k, v) for k, v in rec["params"].items()]
        metrics = [Metric(k, v, rec["start_ms"], 0) for k, v in rec["metrics"].items()]
        for i in range(0, max(len(params), len(metrics)), _BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH], params=params[i : i + _BATCH])
        for f in _artifact_files(files):
            client.log_artifact(run_id, str(f))
        if (files / "model").is_dir():
            client.log_artifacts(run_id, str(files / "model"), "model")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
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
    log.info("recorded as MLflow run %s in %s (imgclf runs list)", run_id, rec["uri"])
    return run_id


def queue_dir(uri: str) -> Path:
    """Folder of the records waiting for the store ``uri``."""
    return default_cache_dir() / "tracking" / hashlib.sha256(absolute_uri(uri).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def drain(uri: str) -> None:
    """Write every queued record of the store ``uri`` (waiting for a process already doing it), oldest first.

    While the store cannot be reached or read (a server offline, a damaged database), the records stay
    queued for the next drain: nothing is lost. A record that fails once the store is reached is logged as
    a warning and leaves the queue (MLflow shows its run as failed; its run folder is untouched).
    """
    folder = queue_dir(uri)
    if not folder.is_dir():
        return
    with _locked(folder):
        for job in sorted(folder.glob("*.json")):
            try:
                _record_or_warn(json.loads(job.read_text(encoding="utf-8")), keep=True)
            except (FileNotFoundError, ValueError):
                pass
            except StoreUnavailable as e:
                log.warning(
                    "runs not recorded in %s yet (%s): %d record(s) stay queued in %s, written by the next "
                    "imgclf train, evaluate or runs command",
                    uri,
                    e,
                    sum(1 for _ in folder.glob("*.json")),
                    folder,
                )
                return
            job.unlink(missing_ok=True)
            shutil.rmtree(job.with_suffix(".files"), ignore_errors=True)


def drain_pending(cfg: TrackingConfig) -> None:
    """Record the runs still queued for the configured store (called before reading it)."""
    drain(tracking_uri(cfg))


def _queue(rec: dict[str, Any]) -> bool:
    """Queue ``rec`` and start a detached writer; False where that is impossible (then record in-process)."""
    if sys.platform == "win32":
        return False
    folder = queue_dir(rec["uri"])
    job = folder / f"{rec['start_ms']:015d}-{uuid.uuid4().hex[:8]}.json"
    try:
        snapshot(Path(rec["run_dir"]), job.with_suffix(".files"))
        atomic_write_text(job, json.dumps({**rec, "files": str(job.with_suffix(".files"))}))
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
    except OSError as e:
        if not job.exists():
            shutil.rmtree(job.with_suffix(".files"), ignore_errors=True)
        log.warning("cannot record in the background (%s); recording now", e)
        return False
    return True


def log_run(
    kind: Literal["train", "evaluate"], cfg: Config, result: RunResult, *, on_train: bool = False
) -> str | None:
    """Record a run (configuration, metrics, run-folder files, tags); its MLflow id, None when that failed
    or when the record was queued for the background writer.

    Never raises: a run is complete without its record, so a tracking failure only logs a warning.
    """
    try:
        rec = run_record(kind, cfg, result, on_train)
    except Exception as e:  # noqa: BLE001 - tracking must never break a run
        log.warning("run not recorded in %s: %s", tracking_uri(cfg.tracking), e)
        return None
    if cfg.tracking.tracking_background and _queue(rec):
        log.info("run queued for MLflow (%s); `imgclf runs list` shows it", rec["uri"])
        return None
    return _record_or_warn(rec)


def list_runs(cfg: TrackingConfig, limit: int = 20) -> list[dict[str, Any]]:
    """The experiment's latest runs: id, date, kind, data set, classifier, backbone, split scored, accuracies."""
    drain_pending(cfg)
    if not store_exists(cfg):
        return []
    with reading(cfg):
        client = connect(cfg)
        exp = experiment_id(client, cfg)
        if exp is None:
            return []
        runs = client.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=limit)
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
        }
        for r in runs
    ]
