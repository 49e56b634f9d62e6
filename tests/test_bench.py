"""Benchmark scripts run end to end (tiny settings; throughput numbers are not checked here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import make_folder

ROOT = Path(__file__).resolve().parents[1]


def test_bench_finetune_runs() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_finetune.py"),
            *("--batch", "4", "--batches", "1", "--repeats", "2", "--threads", "1", "--epochs", "2"),
            *("--precision", "bf16"),  # the GPU's autocast path, run on the CPU
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "cpu bf16" in done.stdout and "1 steps x 2" in done.stdout and "(medians)" in done.stdout, done.stdout
    assert re.search(r"trainer, 2 epochs of 4 images: epoch 2 onward +[\d.]+ img/s", done.stdout), done.stdout


def test_bench_accuracy_cross_validates(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "d", n=6)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "accuracy.py"),
            str(data),
            *("--cv", "3", "--"),
            *("--resolution", "64", "--no-tracking", "--cv-folds", "2"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={**os.environ, "IMGCLF_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    folds = re.findall(r"fold \d: (\d+) of (\d+) right", done.stdout)
    assert [int(n) for _, n in folds] == [6, 6, 6], done.stdout  # 18 images, each tested once, 2 a class a fold
    right = sum(int(r) for r, _ in folds)
    assert f"3-fold cross-validation: {right} of 18 right" in done.stdout, done.stdout
    assert right >= 10, done.stdout  # chance is 6 of 18; four training images a class at 64 px give 14


def test_bench_dedup_agrees_with_the_pair_by_pair_baseline() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_dedup.py"), "--n", "500", "--baseline-n", "200", "--repeats", "1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "200 hashes, max_distance 4: 20 groups found by both" in done.stdout, done.stdout
    assert re.search(r"imgclf, 500 hashes: max_distance 4 [\d.]+ s; max_distance 0 [\d.]+ s", done.stdout)
