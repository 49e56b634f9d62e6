"""Recording runs in an MLflow store and reading them back.

The store is ``tracking_uri`` from the configuration, else ``$MLFLOW_TRACKING_URI``, else a SQLite file
``mlflow.db`` in the working folder; runs in a SQLite store keep their files in ``mlruns/`` beside it.
mlflow is imported only here, when a run is recorded or read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imgclf import __version__
from imgclf.config import Config, TrackingConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from imgclf.pipeline import RunResult

log = logging.getLogger("imgclf")

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACT_FOLDER = "mlruns"
# Run-folder files recorded as artifacts, besides the model/ bundle (checkpoints and temporary files are not).
ARTIFACT_SUFFIXES = frozenset({".csv", ".json", ".html", ".md", ".png", ".svg", ".txt"})
_BATCH = 100  # most parameters per MLflow log_batch call


class TrackingError(ValueError):
    """The run store cannot be read or has no such run; the message says why."""


def tracking_uri(cfg: TrackingConfig) -> str:
    """The store: configured URI, else $MLFLOW_TRACKING_URI, else the local SQLite default."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


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
    """The numbers of a ``metrics.json``: accuracies, ``acc_<class>``, ``auc_<class|micro|macro>``, counts,
    ``time_<step>_s``."""
    keys = ("overall_accuracy", "class_averaged_accuracy", "n_train", "n_test")
    out: dict[str, Any] = {k: metrics.get(k) for k in keys}
    out["n_skipped"] = len(metrics.get("skipped", []))
    out |= {f"acc_{c}": v for c, v in metrics.get("per_class_accuracy", {}).items()}
    out |= {f"auc_{c}": v for c, v in metrics.get("auc", {}).items()}
    out |= {f"time_{k}": v for k, v in metrics.get("timings_s", {}).items()}
    return {metric_name(k): float(v) for k, v in out.items() if v is not None}


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


def _record(kind: str, cfg: Config, result: RunResult, on_train: bool) -> str:
    from mlflow.entities import Metric, Param

    client = connect(cfg.tracking)
    exp = experiment_id(client, cfg.tracking, create=True)
    run_dir = Path(result.run_dir)
    run_name = f"{run_dir.name} {kind}" + (" on train" if on_train else "")
    run_id = client.create_run(exp, tags=run_tags(kind, cfg, result, on_train), run_name=run_name).info.run_id
    status = "FAILED"
    try:
        now = int(time.time() * 1000)
        params = [Param(k, v) for k, v in flat_params(cfg).items()]
        metrics = [Metric(k, v, now, 0) for k, v in flat_metrics(result.metrics).items()]
        for i in range(0, max(len(params), len(metrics)), _BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH], params=params[i : i + _BATCH])
        for f in sorted(run_dir.iterdir()):
            if f.is_file() and f.suffix.lower() in ARTIFACT_SUFFIXES and not f.name.startswith("."):
                client.log_artifact(run_id, str(f))
        if (run_dir / "model").is_dir():
            client.log_artifacts(run_id, str(run_dir / "model"), "model")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def log_run(
    kind: Literal["train", "evaluate"], cfg: Config, result: RunResult, *, on_train: bool = False
) -> str | None:
    """Record a run (configuration, metrics, run-folder files, tags); its MLflow id, None when that failed.

    Never raises: a run is complete without its record, so a tracking failure only logs a warning.
    """
    try:
        run_id = _record(kind, cfg, result, on_train)
    except Exception as e:  # noqa: BLE001 - tracking must never break a run
        log.warning("run not recorded in %s: %s", tracking_uri(cfg.tracking), e)
        return None
    log.info("recorded as MLflow run %s in %s (imgclf runs list)", run_id, tracking_uri(cfg.tracking))
    return run_id


def list_runs(cfg: TrackingConfig, limit: int = 20) -> list[dict[str, Any]]:
    """The experiment's latest runs: id, date, kind, data set, classifier, backbone, accuracies."""
    if not store_exists(cfg):
        return []
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
            "accuracy": r.data.metrics.get("overall_accuracy"),
            "class_averaged_accuracy": r.data.metrics.get("class_averaged_accuracy"),
        }
        for r in runs
    ]
