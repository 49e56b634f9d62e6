"""Run history: every train and evaluate run recorded in MLflow, listed and compared side by side.

mlflow is imported only when a run is recorded or read, so ``import imgclf`` stays fast without it.
"""

import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():  # MLflow imports tqdm.auto, which in Jupyter without ipywidgets warns in red
    warnings.simplefilter("ignore", TqdmWarning)  # "IProgress not found" in every notebook: imported once, quietly
    import tqdm.auto  # noqa: F401

from imgclf.tracking.compare import Row, RunRecord, compare, load_run, load_runs, table_markdown, to_csv, to_markdown
from imgclf.tracking.store import TrackingError, drain_pending, list_runs, log_run, tracking_uri

__all__ = [
    "Row",
    "RunRecord",
    "TrackingError",
    "compare",
    "drain_pending",
    "list_runs",
    "load_run",
    "load_runs",
    "log_run",
    "table_markdown",
    "to_csv",
    "to_markdown",
    "tracking_uri",
]
