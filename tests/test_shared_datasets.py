"""Integration on the real photos in ../shared/datasets (skipped when absent)."""

import json

import pytest
from helpers import shared_dataset

from imgclf.cli import main

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def test_hymenoptera_predefined_split_accuracy(tmp_path):
    data = shared_dataset("hymenoptera")
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--no-progress", "--no-tracking"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n_train"], m["n_test"]) == (244, 153)  # the data set's own train/val split, as given
    assert m["skipped"] == []
    assert m["overall_accuracy"] >= 0.93
