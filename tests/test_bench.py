"""Benchmark scripts run end to end (tiny settings; throughput numbers are not checked here)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from helpers import make_folder

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str) -> ModuleType:
    """``bench/NAME.py``, imported (the bench folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
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


def test_bench_rerun_shows_why_train_failed(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    done = run_bench("bench_rerun.py", str(missing), "--repeats", "1", "--warm", "1", cache=tmp_path / "cache")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"imgclf: error: data folder not found: {missing}" in done.stderr, done.stderr
    assert "train failed (exit 2): imgclf train" in done.stderr and "Traceback" not in done.stderr, done.stderr


def bench_main(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> int | str | None:
    """``python bench/SCRIPT ARGS`` run in this process until it exits (the tests of what is refused before any
    work, without a fresh interpreter's seconds of imports each): its exit code."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as e:
        bench_module(script.removesuffix(".py")).main()
    return e.value.code


@pytest.mark.parametrize(("script", "args"), [("bench_features.py", []), ("bench_finetune.py", ["--data"])])
def test_bench_refuses_a_missing_data_folder(
    tmp_path: Path, script: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    assert bench_main(script, [*args, str(missing)], monkeypatch) == 2  # was: a DatasetError traceback
    assert f"{script}: error: data folder not found: {missing}" in capsys.readouterr().err


def test_accuracy_cv_refuses_a_test_split_a_missing_folder_and_abbreviations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--cv` on a data set's root cross-validated over its val/ (test) images; on a missing folder it gave a
    traceback; `--seed 3` (train's seed) was taken as --seeds 3."""
    data = tmp_path / "hym"
    for part in ("train", "val"):
        make_folder(data / part, classes=("a", "b"), n=2)
    assert bench_main("accuracy.py", [str(data), "--cv", "2"], monkeypatch) == 2
    assert f"has its own split (train, val/): give its training folder to --cv ({data / 'train'})" in (
        capsys.readouterr().err
    )
    assert bench_main("accuracy.py", [str(tmp_path / "missing"), "--cv", "2"], monkeypatch) == 2
    assert "accuracy.py: error: data folder not found" in capsys.readouterr().err
    accuracy = bench_module("accuracy")  # an image train leaves out (the one image of a class) counts as wrong
    monkeypatch.setattr(accuracy, "_train", lambda argv, out: {"overall_accuracy": 1.0, "n_test": 2})
    monkeypatch.setattr(sys, "argv", ["accuracy.py", str(data / "train"), "--cv", "2"])
    make_folder(data / "train", classes=("solo",), n=1)
    accuracy.main()
    assert "2-fold cross-validation: 4 of 5 right (0.8000); 1 not scored (left out by train" in capsys.readouterr().out
    runs: list[tuple[list[int], list[str]]] = []
    monkeypatch.setattr(accuracy, "run", lambda data, seeds, extra: runs.append((seeds, extra)) or [0.5] * len(seeds))
    monkeypatch.setattr(sys, "argv", ["accuracy.py", str(data / "train"), "--seed", "3"])
    accuracy.main()
    assert runs == [([0, 1, 2, 3, 4], ["--seed", "3"])]  # passed on to train, not read as --seeds


@pytest.mark.parametrize(
    ("script", "flag", "args"),
    [
        ("bench_rerun.py", "--warm", ["DATA", "--repeats", "1", "--warm", "0"]),  # was: a cold train, then a crash
        ("bench_rerun.py", "--repeats", ["DATA", "--repeats", "0"]),
        ("bench_features.py", "--repeats", ["DATA", "--repeats", "0", "--threads", "1", "--seeds", "0"]),
        ("bench_finetune.py", "--repeats", ["--repeats", "0", "--batch", "2", "--batches", "1", "--epochs", "0"]),
        ("bench_finetune.py", "--batch", ["--batch", "1"]),  # was: a demo set made, then a ValidationError
        ("bench_serving.py", "--single", ["RUN", "--single", "0"]),
        ("bench_dedup.py", "--repeats", ["--n", "20", "--baseline-n", "20", "--repeats", "0"]),
        ("bench_fastai.py", "--epochs", ["DATA", "--epochs", "0"]),
        ("accuracy.py", "--seeds", ["DATA", "--seeds", "-1"]),
    ],
)
def test_bench_count_options_are_checked_before_any_work(
    tmp_path: Path,
    script: str,
    flag: str,
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = make_folder(tmp_path / "d", n=3)
    assert bench_main(script, [str(data) if a == "DATA" else a for a in args], monkeypatch) == 2
    assert re.search(f"error: argument {flag}: expected a whole number of [012] or more", capsys.readouterr().err)


def test_bench_fastai_refuses_unknown_arguments_and_forwards_those_after_double_dash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parse_args = bench_module("bench_fastai").parse_args
    args = parse_args(["tiny", "--epochs", "2", "--", "--lr", "0.01"])
    assert (str(args.data), args.epochs, args.train_args) == ("tiny", 2, ["--lr", "0.01"])
    with pytest.raises(SystemExit) as e:
        parse_args(["tiny", "--split_seed", "1"])  # a typo, once passed on to imgclf train unseen
    assert e.value.code == 2 and "unrecognized arguments: --split_seed 1" in capsys.readouterr().err


def test_bench_serving_prints_the_end_of_a_failed_servers_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serving = bench_module("bench_serving")
    log = tmp_path / "service.log"
    with pytest.raises(SystemExit) as e:
        serving.start([sys.executable, "-c", "print('no bundle here'); raise SystemExit(2)"], "http://127.0.0.1:9", log)
    assert str(e.value) == "server exited with 2; the end of its log:\nno bundle here"  # its folder is gone by then
    logged = SimpleNamespace(monotonic=lambda: 1000.0 * (log.stat().st_size > 0), sleep=time.sleep)
    monkeypatch.setattr(serving, "time", logged)  # the deadline is set at 0 and passed once the server logged
    slow = "import time; print('loading', flush=True); time.sleep(30)"  # never ready, exits after 30 s
    with pytest.raises(SystemExit) as e:
        serving.start([sys.executable, "-c", slow], "http://127.0.0.1:9", log)
    assert str(e.value) == "server did not start in 10 minutes; the end of its log:\nloading"


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


def test_bench_decode_memory_compares_both_modes() -> None:
    done = run_bench("bench_decode_memory.py", "--images", "2", "--megapixels", "4", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    assert re.search(r"bounded: 2 x 4 Mpx PNG at once: memory peak \+\d+ MB, after \+-?\d+ MB", done.stdout)
    assert re.search(r"bounded / unbounded: peak [\d.]+, after -?[\d.]+", done.stdout), done.stdout


def test_bench_finetune_runs() -> None:
    done = run_bench(
        "bench_finetune.py",
        *("--batch", "4", "--batches", "1", "--repeats", "2", "--threads", "1"),
        *("--epochs", "2", "--precision", "fp32"),
    )
    assert done.returncode == 0, done.stderr
    assert "cpu fp32" in done.stdout and "1 steps x 2" in done.stdout and "(medians)" in done.stdout, done.stdout
    assert re.search(r"trainer, 2 epochs of 4 images: epoch 2 onward +[\d.]+ img/s", done.stdout), done.stdout
    assert "warning" not in done.stderr, done.stderr


def test_bench_finetune_step_trains_under_bf16_autocast() -> None:
    """The GPU's bf16 path of the bench's training step, on the CPU with a small network: the whole bench in
    bf16 took 104 s here, where the CPU emulates bf16."""
    import torch
    from torch import nn

    from imgclf.finetune.trainer import Classifier

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = Classifier(backbone, 8, 3, 0.0).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    bench_module("bench_finetune")._step(model, model.backbone, opt, x, y, True)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


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
