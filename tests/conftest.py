"""Shared fixtures: a private feature cache and a small generated data set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import make_folder

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network
os.environ.pop("IMGCLF_API_KEY", None)  # a developer's key would lock the servers the tests start


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["IMGCLF_CACHE"] = str(tmp_path_factory.mktemp("imgclf-cache"))
    store = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"  # never a store of the developer's


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")
