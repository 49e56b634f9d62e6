"""Benchmark scripts run end to end (tiny settings; throughput numbers are not checked here)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from helpers import make_folder

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str) -> ModuleType:
    """``bench/NAME.py``, imported (the bench folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(script: str, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python bench/SCRIPT ARGS`` (with its own feature cache where given), its output captured."""
    env = {**os.environ, "IMGCLF_CACHE": str(cache)} if cache is not None else None
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=600, env=env)


def test_bench_rerun_passes_what_follows_double_dash_to_train() -> None:
    parse_args = bench_module("bench_rerun").parse_args
    args = parse_args(["tiny", "--repeats", "1", "--warm", "1", "--", "--classifier", "svm"])  # as its docstring
    assert (str(args.data), args.repeats, args.warm, args.train_args) == ("tiny", 1, 1, ["--classifier", "svm"])
    assert parse_args(["tiny"]).train_args == []


def test_bench_features_baseline_decodes_the_images_imgclf_uses(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "d", n=3)
    for extra in ("unlabeled", ".originals"):  # not used by imgclf, so not by the baseline either
        shutil.copytree(data / "circles", data / extra)
    shutil.copy(data / "squares" / "squares_00.jpg", data / "circles" / "phone.jfif")  # imgclf's, not ImageFolder's
    done = run_bench(
        "bench_features.py", str(data), *("--repeats", "1", "--threads", "1", "--seeds", "0"), cache=tmp_path / "cache"
    )
    assert done.returncode == 0, done.stderr
    assert "\n10 images," in done.stdout and re.search(r"speed-up: [\d.]+x", done.stdout), done.stdout


def test_bench_finetune_runs() -> None:
    bf16 = ("--precision", "bf16")  # the GPU's autocast path, run on the CPU
    done = run_bench(
        "bench_finetune.py",
        *("--batch", "4", "--batches", "1", "--repeats", "2", "--threads", "1"),
        *("--epochs", "2", *bf16),
    )
    assert done.returncode == 0, done.stderr
    assert "cpu bf16" in done.stdout and "1 steps x 2" in done.stdout and "(medians)" in done.stdout, done.stdout
    assert re.search(r"trainer, 2 epochs of 4 images: epoch 2 onward +[\d.]+ img/s", done.stdout), done.stdout


def test_bench_accuracy_cross_validates(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "d", n=6)
    done = run_bench(
        "accuracy.py",
        str(data),
        *("--cv", "3", "--"),
        *("--resolution", "64", "--no-tracking", "--cv-folds", "2"),
        cache=tmp_path / "cache",
    )
    assert done.returncode == 0, done.stderr
    folds = re.findall(r"fold \d: (\d+) of (\d+) right", done.stdout)
    assert [int(n) for _, n in folds] == [6, 6, 6], done.stdout  # 18 images, each tested once, 2 a class a fold
    right = sum(int(r) for r, _ in folds)
    assert f"3-fold cross-validation: {right} of 18 right" in done.stdout, done.stdout
    assert right >= 10, done.stdout  # chance is 6 of 18; four training images a class at 64 px give 14


def test_bench_accuracy_refuses_split_seeds_on_a_data_set_with_its_own_split(tmp_path: Path) -> None:
    data = tmp_path / "d"
    make_folder(data / "train", n=3)
    make_folder(data / "val", n=2, seed=1)
    done = run_bench("accuracy.py", str(data), "--seeds", "0", "1", cache=tmp_path / "cache")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "every split seed gives the same test split" in done.stderr and "--cv K" in done.stderr, done.stderr
    fixed_split = bench_module("accuracy").fixed_split
    assert fixed_split(str(data), []) == f"{data} has its own split (train/, val/)"
    assert fixed_split(str(data), ["--split-mode", "random"]) is None
    assert fixed_split(str(data / "train"), []) is None


def test_bench_dedup_agrees_with_the_pair_by_pair_baseline() -> None:
    done = run_bench("bench_dedup.py", "--n", "500", "--baseline-n", "200", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    assert "200 hashes, max_distance 4: 20 groups found by both" in done.stdout, done.stdout
    assert re.search(
        r"imgclf, 500 hashes: max_distance 4 [\d.]+ s; max_distance 0 [\d.]+ s \(the exact copy found\)", done.stdout
    ), done.stdout
