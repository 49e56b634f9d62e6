"""Run history: every train and evaluate run recorded in MLflow, listed and compared side by side.

mlflow is imported only when a run is recorded or read, so ``import imgclf`` stays fast without it.
"""

from imgclf.tracking.compare import Row, RunRecord, compare, load_run, table_markdown, to_csv, to_markdown
from imgclf.tracking.store import TrackingError, drain_pending, list_runs, log_run, tracking_uri

__all__ = [
    "Row",
    "RunRecord",
    "TrackingError",
    "compare",
    "drain_pending",
    "list_runs",
    "load_run",
    "log_run",
    "table_markdown",
    "to_csv",
    "to_markdown",
    "tracking_uri",
]
