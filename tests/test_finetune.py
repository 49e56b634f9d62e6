"""Fine-tuning: end to end on tiny generated data, resume after interruption, validation part, bundles."""

from __future__ import annotations

import csv
import dataclasses
import errno
import functools
import itertools
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from PIL import Image

import imgclf.finetune
import imgclf.pipeline
from imgclf.config import Config
from imgclf.data.dataset import load_split
from imgclf.data.demo import generate_demo_dataset
from imgclf.data.io import Preprocess
from imgclf.finetune import split_validation
from imgclf.finetune.trainer import eval_preprocess, within_noise
from imgclf.pipeline import evaluate, predict, train


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(
        tmp_path_factory.mktemp("demo") / "data", n_per_class=8, seed=0, size=96, progress=False
    )


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _cfg(data: Path, out: Path, **kw: object) -> Config:
    base = dict(
        data_root=data,
        out=out,
        classifier="dnn",
        epochs=2,
        resolution=64,
        ft_batch_size=8,
        cache_dir=out.parent / "cache",
        progress=False,
        workers=1,
        runtime="torch",
        flip_tta=False,
        cv_folds=2,
        svm_c_grid=[1.0],
    )
    return Config().updated(**{**base, **kw})


def _log(run: Path) -> list[dict[str, str]]:
    with open(run / "finetune_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _full_for(fdopen: Callable[..., IO[bytes]], full: Callable[[str], bool]) -> Callable[..., IO[bytes]]:
    """``os.fdopen`` whose files fail to be written, as on a full disk, where ``full(their path)``."""

    def opened(fd: int, *args: object, **kwargs: object) -> IO[bytes]:
        f = fdopen(fd, *args, **kwargs)
        if full(os.readlink(f"/proc/self/fd/{fd}")):
            f.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return f

    return opened


def test_dnn_end_to_end(demo: Path, tmp_path: Path) -> None:
    res = train(_cfg(demo, tmp_path / "run"))
    run = res.run_dir
    rows = _log(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # epoch 0: the linear probe, validated only
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_error", "val_loss", "val_error", "img_per_s", "seconds"}
    assert math.isfinite(float(rows[0]["val_loss"])) and math.isnan(float(rows[0]["train_loss"]))
    lr = res.bundle.config["finetune"]["lr"]
    assert all(0 < float(r["lr"]) <= lr for r in rows[1:])  # the mean rate each epoch used, the last one's too
    assert (run / "finetune_curves.png").stat().st_size > 0
    assert not (run / "finetune_cache").exists()
    assert res.metrics["overall_accuracy"] >= 4 / 6  # three textures, two test images each (chance: 1/3)
    preds = {r["path"]: r for r in csv.DictReader((run / "predictions.csv").open())}
    assert sum(r["true_label"] == r["predicted_label"] for r in preds.values()) == round(
        6 * res.metrics["overall_accuracy"]
    )
    assert res.bundle.backbone_spec["weights_id"].startswith("finetuned:")
    assert res.bundle.preprocess.resolution == 72  # trained at 64, deployed at 64 x test_scale 1.15, rounded to 8
    assert "dnn on efficientnet_lite0, 72 px input" in (run / "report.md").read_text()
    kept = res.metrics["finetune"]  # the epoch restored, with its validation error as the log shows it
    assert kept["epochs_trained"] == 2 and kept["kept_val_error"] == float(rows[kept["kept_epoch"]]["val_error"])
    assert kept["cpu_threads"] == 1  # --workers 1: what makes two machines' weights the same
    evaluate(run)  # the rewritten report keeps the fine-tuning curves, metrics.json the kept epoch
    assert "![Fine-tuning curves](finetune_curves.png)" in (run / "report.md").read_text()
    assert json.loads((run / "metrics.json").read_text())["finetune"] == kept
    import shutil

    from imgclf.bundle import Bundle, BundleError

    copy = shutil.copytree(run / "model", tmp_path / "copied")
    with open(copy / "backbone.pt", "r+b") as f:  # one byte changed, as a bad copy might
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match=r"backbone.pt is damaged or incomplete \(ValueError: its checksum differs"):
        Bundle.load(copy)


def test_bf16_autocast_trains_on_cpu(demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--precision bf16 runs the GPU's mixed-precision training path on the CPU."""
    with caplog.at_level(logging.INFO, logger="imgclf"):
        res = train(_cfg(demo, tmp_path / "run", precision="bf16", epochs=1))
    assert "training precision: bf16 autocast" in caplog.text
    assert "validation images choose the best epoch and stop early" in caplog.text  # the demo's few images
    rows = _log(res.run_dir)
    assert len(rows) == 2 and math.isfinite(float(rows[1]["train_loss"])) and math.isfinite(float(rows[1]["val_loss"]))
    _, preds = predict(res.run_dir, [demo])
    probs = np.array([p.scores for p in preds])
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1.0, atol=1e-3)


def test_eval_preprocess_scales_and_rounds() -> None:
    train_pre = Preprocess(224, 0.875, "bicubic")
    assert eval_preprocess(train_pre, 1.15) == Preprocess(256, 0.875, "bicubic")
    assert eval_preprocess(train_pre, 1.0) == train_pre
    assert eval_preprocess(Preprocess(260), 1.0).resolution == 260  # efficientnet_lite2's side, not a multiple of 8
    assert eval_preprocess(Preprocess(448), 1.15).resolution == 512


def test_every_training_image_is_in_a_batch_of_two_or_more() -> None:
    """A last batch of one image joins the one before it (batch norm cannot train on one image)."""
    from pydantic import ValidationError

    from imgclf.finetune.trainer import CacheLoader

    loader = CacheLoader(None, np.arange(17), np.zeros(17, np.int64), torch.device("cpu"))  # type: ignore[arg-type]
    for balance in (False, True):
        batches = loader.epoch_batches(8, torch.Generator().manual_seed(0), balance)
        assert [len(b) for b in batches] == [8, 9]
    assert sorted(np.concatenate(loader.epoch_batches(8, torch.Generator(), False))) == list(range(17))
    with pytest.raises(ValidationError, match="ft_batch_size"):
        Config().updated(ft_batch_size=1)


def test_balanced_classes_validate_by_the_class_averaged_error(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imgclf.finetune.trainer as trainer

    y, pred = np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])
    assert trainer.error_rate(y, pred) == 0.25 and trainer.error_rate(y, pred, balanced=True) == 0.5
    asked: list[bool] = []
    real = trainer.error_rate

    def spy(y_true: np.ndarray, y_pred: np.ndarray, balanced: bool = False) -> float:
        asked.append(balanced)
        return real(y_true, y_pred, balanced)

    monkeypatch.setattr(trainer, "error_rate", spy)
    train(_cfg(demo, tmp_path / "run", epochs=1, balance_classes=True))
    train(_cfg(demo, tmp_path / "plain", epochs=1))
    assert asked and set(asked[: len(asked) // 2]) == {True} and set(asked[len(asked) // 2 :]) == {False}


def test_one_image_is_within_noise() -> None:
    """One image more than a zero (or one) error minimum is noise on a small validation part; two are not."""
    assert within_noise(1 / 18, 0.0, 18, 1.0)
    assert not within_noise(2 / 18, 0.0, 18, 1.0)
    assert within_noise(2 / 24, 1 / 24, 24, 1.0)
    assert not within_noise(1 / 18, 0.0, 18, 0.0)
    # 10 of 75 wrong against a best of 8: the binomial standard error (2.7 images) decides
    assert within_noise(10 / 75, 8 / 75, 75, 1.0)
    assert not within_noise(11 / 75, 8 / 75, 75, 1.0)


def test_test_scale_one_deploys_the_training_side(demo: Path, tmp_path: Path) -> None:
    res = train(_cfg(demo, tmp_path / "run", epochs=1, test_scale=1.0))
    assert res.bundle.preprocess.resolution == 64


def test_no_validation_part_keeps_the_last_epoch(demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="imgclf"):
        res = train(_cfg(demo, tmp_path / "run", val_fraction=0.0))
    assert "epoch 2/2: train loss" in caplog.text and "| no validation part |" in caplog.text
    assert "choose the best epoch" not in caplog.text
    assert "training precision: fp32" in caplog.text  # precision auto on the CPU
    rows = _log(res.run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isnan(float(r["val_error"])) for r in rows)
    assert res.bundle.preprocess.resolution == 72
    _, preds = predict(res.run_dir, [demo])
    assert all(p.scores is not None for p in preds)


def test_train_groups_leave_the_lower_groups_as_they_were(demo: Path, tmp_path: Path) -> None:
    """--train-groups 1 --no-freeze-bn: the last group trains, batch-norm statistics included; the lower
    groups keep their weights and their statistics."""
    from imgclf.backbones import create_backbone
    from imgclf.finetune.trainer import layer_groups

    res = train(_cfg(demo, tmp_path / "run", epochs=1, val_fraction=0.0, train_groups=1, freeze_bn=False))
    pretrained = create_backbone("efficientnet_lite0").model
    before, after = pretrained.state_dict(), res.bundle.backbone_state
    assert after is not None
    groups = layer_groups(pretrained)
    modules = [{name.rsplit(".", 1)[0] for name in group} for group in (groups[0], groups[-1])]
    first, last = ([k for k in before if k.rsplit(".", 1)[0] in m] for m in modules)
    assert any(k.endswith("running_mean") for k in first) and any(k.endswith("running_mean") for k in last)
    assert all(torch.equal(before[k], after[k]) for k in first)
    assert not all(torch.equal(before[k], after[k]) for k in last if k.endswith(("weight", "running_mean")))


def test_resume_without_a_fine_tuning_classifier_keeps_the_checkpoint(demo: Path, tmp_path: Path) -> None:
    """--resume without --classifier dnn (the default svm) was ignored: the interrupted fine-tuning's checkpoint
    was removed as an earlier run's output and an SVM trained in its place."""
    from imgclf.finetune.trainer import CKPT_NAME

    run = tmp_path / "run"
    run.mkdir()
    (run / CKPT_NAME).write_bytes(b"hours of fine-tuning")
    with pytest.raises(ValueError, match="--resume continues an interrupted fine-tuning: give the --classifier"):
        train(Config().updated(data_root=demo, out=run, resume=True, progress=False, tracking=False))
    assert (run / CKPT_NAME).read_bytes() == b"hours of fine-tuning" and len(list(run.iterdir())) == 1


def test_resume_after_interruption(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(epoch: int, row: dict[str, float]) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    original = imgclf.finetune.finetune
    monkeypatch.setattr(imgclf.finetune, "finetune", functools.partial(original, on_epoch_end=crash))
    cfg = _cfg(demo, tmp_path / "run", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert (tmp_path / "run" / "finetune_ckpt.pt").exists()
    assert any((tmp_path / "run" / "finetune_cache").iterdir())  # kept for --resume (docs/finetuning.md, step 2)
    # another train into the folder, stopped before it began: the checkpoint there is not its own to resume
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt) as stopped:
        m.setattr(imgclf.pipeline, "scan_dataset", Mock(side_effect=KeyboardInterrupt))
        train(cfg.updated(lr=0.002, resume=False))  # without either: refused (test_an_interrupted_fine_tuning_...)
    assert imgclf.pipeline.RESUMABLE not in getattr(stopped.value, "__notes__", ())
    monkeypatch.setattr(imgclf.finetune, "finetune", original)
    with pytest.raises(ValueError, match=r"another fine-tuning run \(epochs 3 -> 4, lr 0.001 -> 0.002\)"):
        train(cfg.updated(resume=True, epochs=4, lr=0.002))  # the schedule depends on both: no continuing
    state = torch.load(tmp_path / "run" / "finetune_ckpt.pt", weights_only=False)["model"]
    torch.save(
        {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}, tmp_path / "w.pt"
    )
    with pytest.raises(ValueError, match=r"another fine-tuning run \(weights pypi:.* -> file:"):
        train(cfg.updated(resume=True, weights=tmp_path / "w.pt"))  # not blamed on the images
    # the disk full when the model is saved, after all the training: torch's RuntimeError ("unexpected pos")
    # was a traceback; an OSError naming the file, which says that --resume finishes the run
    with monkeypatch.context() as m, pytest.raises(OSError) as full:
        m.setattr(os, "fdopen", _full_for(os.fdopen, lambda name: "/.backbone.pt." in name))
        train(cfg.updated(resume=True))
    assert (full.value.errno, full.value.filename) == (errno.ENOSPC, str(tmp_path / "run" / "model" / "backbone.pt"))
    assert imgclf.pipeline.RESUMABLE in full.value.__notes__
    assert not list((tmp_path / "run").glob(".model.*"))  # its temporary folder gone too
    (tmp_path / "run" / "leaks.csv").write_text("left by an earlier run\n")
    res = train(cfg.updated(resume=True))
    rows = _log(res.run_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3] and not (tmp_path / "run" / "leaks.csv").exists()
    _, preds = predict(res.run_dir, [demo])
    assert all(p.scores is not None for p in preds)


def test_a_run_stopped_after_its_last_checkpoint_resumes_without_leaving_its_image_cache(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped between the last epoch's checkpoint and the cache's removal, a resumed run finished with the
    decoded images (about 200 kB each) left in the run folder."""

    def stop(epoch: int, row: dict[str, float]) -> None:
        raise KeyboardInterrupt

    original = imgclf.finetune.finetune
    cfg = _cfg(demo, tmp_path / "run", epochs=1)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(imgclf.finetune, "finetune", functools.partial(original, on_epoch_end=stop))
        train(cfg)
    assert any((tmp_path / "run" / "finetune_cache").iterdir())
    with pytest.raises(FileExistsError, match=r"interrupted fine-tuning \(epoch 1 of 1, its model not saved\)"):
        train(cfg)  # trained to the end, yet its model is in its checkpoint only
    train(cfg.updated(resume=True))
    assert not (tmp_path / "run" / "finetune_cache").exists()


@pytest.mark.parametrize(
    "extra", [{}, {"ema_decay": 0.9, "clip_grad": 1.0, "drop_path": 0.2}], ids=["plain", "ema+clip+drop_path"]
)
def test_resume_matches_uninterrupted(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, float]
) -> None:
    full = train(_cfg(demo, tmp_path / "full", epochs=2, **extra))

    def crash(epoch: int, row: dict[str, float]) -> None:
        raise KeyboardInterrupt

    original = imgclf.finetune.finetune
    monkeypatch.setattr(imgclf.finetune, "finetune", functools.partial(original, on_epoch_end=crash))
    cfg = _cfg(demo, tmp_path / "cut", epochs=2, **extra)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(imgclf.finetune, "finetune", original)
    resumed = train(cfg.updated(resume=True))
    np.testing.assert_allclose(resumed.bundle.head.weight, full.bundle.head.weight, atol=1e-5)
    # recorded as not resuming (it was recorded as resuming): training again from them starts afresh
    bundle_json = json.loads((resumed.run_dir / "model" / "bundle.json").read_text())
    assert "resume" not in bundle_json["config"]["finetune"] and "resume" not in resumed.bundle.config["finetune"]
    assert "resume" not in json.loads((resumed.run_dir / "config.json").read_text())["finetune"]
    assert not Config.from_file(resumed.run_dir / "config.json").finetune.resume


def test_validation_part_never_overlaps_test(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the pipeline hands the trainer is the training split, and the validation part is carved from it."""
    import imgclf.finetune.trainer as trainer

    used: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    real = trainer.split_validation

    def recorded(labels: np.ndarray, idx: np.ndarray, *args: object) -> tuple[np.ndarray, np.ndarray]:
        fit, val = real(labels, idx, *args)
        used.append((idx, fit, val))
        return fit, val

    monkeypatch.setattr(trainer, "split_validation", recorded)
    train(_cfg(demo, tmp_path / "run", epochs=1, val_fraction=0.3))
    ds, split = load_split(tmp_path / "run" / "split.csv", demo, sorted(p.name for p in demo.iterdir() if p.is_dir()))
    train_idx, test_idx = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    ((given, fit, val),) = used
    assert sorted(given) == sorted(train_idx) and len(test_idx) == 6
    assert len(val) > 0 and not set(val) & set(test_idx) and not set(val) & set(fit)
    assert sorted([*fit, *val]) == sorted(train_idx)
    assert set(ds.labels[val]) == set(ds.labels[train_idx])  # stratified


def test_a_diverged_run_keeps_the_linear_probe_and_stops_early(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/finetuning.md step 5: an epoch clearly worse than the best is never kept; `early_stopping`
    epochs past the kept one end the run."""
    with caplog.at_level(logging.INFO, logger="imgclf"):
        res = train(_cfg(demo, tmp_path / "run", epochs=5, lr=50.0, early_stopping=2, val_fraction=0.3))
    assert [int(r["epoch"]) for r in _log(res.run_dir)] == [0, 1, 2]  # stopped two epochs past epoch 0
    assert "early stopping: no validation gain for 2 epochs" in caplog.text
    assert "fine-tuning: best epoch 0 of 2" in caplog.text
    assert res.metrics["overall_accuracy"] >= 4 / 6  # the probe's network, not the diverged one


@pytest.mark.parametrize("mode", ["svm", "dnn", "svm_on_refined"])
def test_bundles_of_all_modes_predict(demo: Path, tmp_path: Path, mode: str) -> None:
    res = train(_cfg(demo, tmp_path / mode, classifier=mode, epochs=1))
    cv = res.metrics.get("svm_cv")  # an SVM's cross-validation (svm_on_refined's: optimistic, docs/finetuning.md)
    assert (
        cv is None
        if mode == "dnn"
        else cv == {"folds": 2, "accuracy": cv["accuracy"], "accuracy_by_c": {"1.0": cv["accuracy"]}}
    )
    assert mode == "dnn" or 0 < cv["accuracy"] <= 1
    classes, preds = predict(res.run_dir, [demo])
    assert len(classes) == 3 and len(preds) == 24
    assert all(p.scores is not None and abs(p.scores.sum() - 1) < 1e-5 for p in preds)


def test_undecodable_training_images_are_reported(demo: Path, tmp_path: Path) -> None:
    """A truncated JPEG passes the scan (its header is fine) but fails to decode: wherever the split puts
    it, the run reports it in metrics.json and goes on."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo, data)
    broken = []
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        good = sorted(cls.glob("*.jpg"))[0].read_bytes()
        for i in range(2):
            f = cls / f"truncated_{i}.jpg"
            f.write_bytes(good[: len(good) // 2])
            broken.append(str(f))
    res = train(_cfg(data, tmp_path / "run", epochs=1))
    reported = {s["path"] for s in res.metrics["skipped"]}
    assert set(broken) <= reported
    assert res.metrics["n_train"] + res.metrics["n_test"] == 3 * 8
    again = train(_cfg(data, tmp_path / "run", epochs=1, resume=True))  # finished: resuming only reports
    assert again.metrics["skipped"] == res.metrics["skipped"] and again.metrics["n_train"] == res.metrics["n_train"]


@pytest.mark.parametrize("check", ["fallocate", "free_space"])
def test_image_cache_without_room_is_an_error_not_a_crash(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check: str
) -> None:
    """Writing into a memory map that the disk cannot hold kills the process (SIGBUS, no message): the cache
    reserves its space first, so a full disk is an error naming the cache, with no file left behind."""
    import errno
    import os
    import shutil
    import types

    from imgclf.finetune.imagecache import build_image_cache

    if check == "fallocate":
        if not hasattr(os, "posix_fallocate"):
            pytest.skip("no posix_fallocate here")

        def full(fd: int, offset: int, size: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", full)
    else:  # macOS, Windows
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    paths, folder = sorted(demo.rglob("*.jpg"))[:3], tmp_path / "cache"
    with pytest.raises(OSError, match="for the 0 MB fine-tuning image cache") as e:
        build_image_cache(paths, Preprocess(64, 1.0, "bilinear"), folder, 1, progress=False)
    assert e.value.errno == errno.ENOSPC and [p.name for p in folder.iterdir() if p.suffix != ".lock"] == []
    monkeypatch.undo()
    cache = build_image_cache(paths, Preprocess(64, 1.0, "bilinear"), folder, 1, progress=False)
    assert cache.ok.all() and cache.images.shape == (3, 64, 64, 3) and cache.images.any()


def test_one_process_at_a_time_decodes_an_image_cache(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two runs building the same cache at once wrote one shared file: the first died of SIGBUS when the
    second truncated it. The second now waits for the first and reuses its cache."""
    import threading

    from filelock import FileLock

    from imgclf.finetune.imagecache import _key, build_image_cache

    paths, folder = sorted(demo.rglob("*.jpg"))[:3], tmp_path / "cache"
    folder.mkdir()
    built: list = []
    with (
        caplog.at_level(logging.INFO, logger="imgclf"),
        FileLock(folder / f".images-{_key(paths, Preprocess(64, 1.0, 'bilinear'))}.lock"),
    ):
        worker = threading.Thread(
            target=lambda: built.append(build_image_cache(paths, Preprocess(64, 1.0, "bilinear"), folder, 1))
        )
        worker.start()
        waiting = "waiting for another imgclf process that is decoding the same images"
        for _ in range(600):  # until it says it waits (a busy machine can take seconds to get there)
            if waiting in caplog.text:
                break
            worker.join(0.05)
        assert waiting in caplog.text
        assert worker.is_alive() and not any(p.suffix in (".u8", ".tmp") for p in folder.iterdir())
    worker.join(60)
    assert built[0].ok.all() and built[0].images.any()


def test_many_small_classes_still_get_a_validation_part() -> None:
    labels = np.repeat(np.arange(250), 3)  # 250 classes of three training images
    fit, val = split_validation(labels, np.arange(750), 0.1, seed=0)
    assert len(val) == 75 and np.bincount(labels[val]).max() == 1  # one image from each of 75 classes
    assert set(labels[fit]) == set(range(250))  # every class keeps its fitting images
    balanced = np.repeat(np.arange(2), [124, 120])  # hymenoptera's training split: 12 + 12, as before
    assert np.bincount(balanced[split_validation(balanced, np.arange(244), 0.1, seed=0)[1]]).tolist() == [12, 12]


def test_the_validation_part_holds_out_whole_groups() -> None:
    """--split-mode group: bursts of one scene are all fitted on or all held out; each class keeps a group."""
    labels = np.repeat([0, 1, 2], [40, 40, 6])
    groups = [f"{c}/burst{i // 4}" for c, i in zip(labels, range(86), strict=True)]
    groups[80:] = ["2/only"] * 6  # a class of one group
    fit, val = split_validation(labels, np.arange(86), 0.1, seed=0, groups=groups)
    assert not {groups[i] for i in fit} & {groups[i] for i in val} and len(val) == 8
    assert set(labels[fit]) == {0, 1, 2} and 2 not in set(labels[val])
    assert np.array_equal(val, split_validation(labels, np.arange(86), 0.1, seed=0, groups=groups)[1])


def test_time_left_reads_easily() -> None:
    from imgclf.finetune.trainer import _duration

    assert [_duration(s) for s in (7.4, 89, 95, 3599, 3900)] == ["7 s", "89 s", "2 min", "1 h 00 min", "1 h 05 min"]


# Validation (error, loss) of the default `dnn` run on hymenoptera (24 validation images, 12 per class), per
# epoch from 0 (the linear probe, from the run's log) to 8: /tmp/exp11 and /tmp/exp14 logged the same numbers.
HYMENOPTERA_SCORES = [
    (0.0, 0.038),
    (0.0, 0.0189075),
    (0.0, 0.0140324),
    (0.0, 0.0123317),
    (0.0, 0.0125529),
    (0.0, 0.0095462),
    (0.0, 0.0156238),
    (0.0, 0.0193725),
    (0.0, 0.0192913),
]


def _noise_rule(scores: list[tuple[float, float]], n: int, tolerance: float) -> int:
    """The best-epoch rule as it was: the latest epoch within noise of the lowest error."""
    low = min(error for error, _ in scores)
    return max(i for i, (error, _) in enumerate(scores) if within_noise(error, low, n, tolerance))


def test_the_best_epoch_is_chosen_as_before_on_real_validation_parts() -> None:
    """Validation parts of 24-100 images, errors far below chance, finite losses: the choice is the latest
    epoch within noise of the lowest error, as it was."""
    from imgclf.finetune.trainer import choose_epoch

    for scores in (HYMENOPTERA_SCORES, HYMENOPTERA_SCORES[1:]):  # with the probe, and without (as logged)
        chosen = [choose_epoch(scores[:k], 24, 1.0, 0.5, 2) for k in range(1, len(scores) + 1)]
        assert chosen == list(range(len(scores)))  # each epoch kept as it came: epoch 8 at the end, no early stop
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n, n_classes = int(rng.integers(24, 101)), int(rng.choice([2, 5]))
        errors = rng.binomial(n, rng.uniform(0, 0.15), size=int(rng.integers(2, 10))) / n
        # losses within twice the lowest (hymenoptera's: up to 2.03x), or within 0.15 of it
        low = rng.uniform(0.005, 0.6)
        losses = low * rng.uniform(1, 2, len(errors)) if low > 0.15 else low + rng.uniform(0, 0.15, len(errors))
        scores = [(float(e), float(loss)) for e, loss in zip(errors, losses, strict=True)]
        assert choose_epoch(scores, n, 1.0, 1 - 1 / n_classes, n_classes) == _noise_rule(scores, n, 1.0)


def test_a_diverged_epoch_is_never_within_noise_of_a_better_one() -> None:
    """docs/finetuning.md step 5: on 2-3 validation images one image of slack is chance level; an epoch
    there, or with a loss far above the best one's or not finite, is not kept in place of a better one."""
    from imgclf.finetune.trainer import chance_error, choose_epoch

    # the demo run (12 images a class, --lr 0.01) kept epoch 1 and tested at 66.7 %; --lr 0.001: 100 %
    assert choose_epoch([(0.0, 0.299), (1 / 3, 5.247), (2 / 3, 2.1)], 3, 1.0, 2 / 3, 3) == 0
    assert choose_epoch([(0.0, 0.246), (1 / 3, 0.797), (1 / 3, 0.72)], 3, 1.0, 2 / 3, 3) == 0  # another demo set
    assert choose_epoch([(0.0, 0.114), (0.5, 3.3e7), (0.5, 1.0e6)], 2, 1.0, 0.5, 2) == 0  # sgd --lr 1e30
    assert choose_epoch([(0.0, 0.114), (0.5, 0.4)], 2, 1.0, 0.5, 2) == 0  # at chance, even with a low loss
    assert choose_epoch([(0.0, 0.2), (0.0, math.nan), (0.0, math.inf)], 24, 1.0, 0.5, 2) == 0
    assert choose_epoch([(0.5, math.nan)], 2, 1.0, 0.5, 2) is None
    assert choose_epoch([(0.0, 0.364), (0.25, 0.662)], 4, 1.0, 0.5, 3) == 1  # one image of 4: noise still
    assert choose_epoch([(0.1, 0.3), (0.05, 2.0)], 40, 1.0, 0.5, 2) == 1  # a lower error wins, whatever its loss
    # a validation part of one class (chance 0): perfect epochs tie, the latest is kept (it kept the first)
    assert choose_epoch([(0.0, 0.69), (0.0, 0.513), (0.0, 0.551)], 1, 1.0, 0.0, 2) == 2
    assert chance_error(np.array([0, 0, 1])) == pytest.approx(1 / 3)
    assert chance_error(np.array([0, 0, 1]), balanced=True) == 0.5
    # the trainer keeps only the latest state: an added epoch is chosen or leaves the choice as it was
    rng = np.random.default_rng(1)
    for _ in range(2000):
        n, n_classes = int(rng.integers(2, 30)), int(rng.integers(2, 6))
        losses = rng.choice([0.05, 0.5, 2.0, 8.0, math.nan, math.inf], size=8) * rng.uniform(0.5, 1.5, 8)
        scores = [(float(e), float(loss)) for e, loss in zip(rng.integers(0, n + 1, 8) / n, losses, strict=True)]
        chosen = [choose_epoch(scores[:k], n, 1.0, 1 - 1 / n_classes, n_classes) for k in range(1, 9)]
        assert all(now in (before, k) for k, (before, now) in enumerate(itertools.pairwise(chosen), 1))


def test_a_tiny_validation_part_keeps_the_probe_and_logs_it(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The demo run's validation scores (3 images, one a class), replayed: the probe is kept. Epoch 0 is in
    the log and the plot; the training loss is logged without label smoothing, like the validation loss."""
    import imgclf.finetune.trainer as trainer

    scores = iter([(0.299, 0.0), (5.247, 1 / 3), (2.1, 2 / 3)])  # (loss, error) per epoch, the probe first
    monkeypatch.setattr(trainer, "_evaluate", lambda *args: next(scores))
    drawn: list[tuple[list[dict[str, float]], int]] = []
    plot = trainer._plot
    monkeypatch.setattr(trainer, "_plot", lambda path, h, best: drawn.append((h, best)) or plot(path, h, best))
    with caplog.at_level(logging.INFO, logger="imgclf"):
        res = train(_cfg(demo, tmp_path / "run", val_fraction=0.17, label_smoothing=0.9))
    assert "validating on 3 (" in caplog.text
    assert "fine-tuning: best epoch 0 of 2" in caplog.text
    rows = _log(res.run_dir)
    assert [(int(r["epoch"]), float(r["val_loss"])) for r in rows] == [(0, 0.299), (1, 5.247), (2, 2.1)]
    assert [h["epoch"] for h in drawn[0][0]] == [0, 1, 2] and drawn[0][1] == 0
    # smoothed by 0.9 over 3 classes the loss is at least the smoothed targets' entropy, 1.089
    assert all(float(r["train_loss"]) < 1.0 for r in rows[1:])


@pytest.mark.parametrize("val_fraction", [0.1, 0.0], ids=["validated", "no validation part"])
def test_non_finite_training_stops_and_keeps_the_probe(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, val_fraction: float
) -> None:
    """A non-finite loss ends fine-tuning with a message; the last finite weights (here the probe's) are kept
    and the run finishes (it crashed in scikit-learn on NaN scores)."""
    with caplog.at_level(logging.INFO, logger="imgclf"):
        res = train(_cfg(demo, tmp_path / "run", optimizer="sgd", lr=1e30, epochs=3, val_fraction=val_fraction))
    assert "fine-tuning diverged in epoch 1 (training loss nan): stopped; epoch 0 is kept; lower --lr" in caplog.text
    assert int(_log(res.run_dir)[-1]["epoch"]) == 1
    assert res.metrics["overall_accuracy"] >= 4 / 6


def test_resuming_ignores_settings_that_change_no_number() -> None:
    """--compile changes neither the schedule, the data order nor the numbers: a checkpoint made without it
    resumes with it."""
    from imgclf.backbones import create_backbone
    from imgclf.finetune.trainer import _differences, _identity

    backbone, cfg, rels = create_backbone("efficientnet_lite0"), Config(), ["a/1.jpg", "b/2.jpg"]
    fingerprint = _identity(cfg, backbone, rels)["fingerprint"]
    assert _identity(cfg.updated(compile=True), backbone, rels)["fingerprint"] == fingerprint
    assert _identity(cfg.updated(lr=0.002), backbone, rels)["fingerprint"] != fingerprint
    assert _differences({"compile": False, "lr": 0.001}, {"lr": 0.001}) == "made by an earlier version of imgclf"
    assert _differences({"lr": 0.001}, {"lr": 0.002, "weights": "pypi:x"}) == "made by an earlier version of imgclf"
    assert _differences({"lr": 0.001}, {"lr": 0.002}) == "lr 0.001 -> 0.002"


def test_a_checkpoint_that_cannot_be_resumed_leaves_the_run_whole(demo: Path, tmp_path: Path) -> None:
    """`--resume` on a finished run whose checkpoint an earlier imgclf wrote was refused after the run folder
    was marked unfinished: its model became unusable."""
    cfg = _cfg(demo, tmp_path / "run", epochs=1)
    train(cfg)
    ckpt_path = tmp_path / "run" / "finetune_ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["fingerprint"], ckpt["settings"]["compile"] = "0" * 16, False  # as an earlier version wrote it
    torch.save(ckpt, ckpt_path)
    with pytest.raises(ValueError, match=r"made by an earlier version of imgclf, which this one cannot continue"):
        train(cfg.updated(resume=True))
    _, preds = predict(tmp_path / "run", [demo])
    assert all(p.scores is not None for p in preds)


def test_warm_up_leaves_the_rate_room_to_decay(caplog: pytest.LogCaptureFixture) -> None:
    """The default schedule is as it was; a warm-up of half the run or more is shortened to half, with a
    note (not a warning: `--epochs 1` meets it with the default warm-up), so that the rate peaks and decays."""
    from imgclf.config import FinetuneConfig
    from imgclf.finetune.schedule import lr_factor

    default = lr_factor(FinetuneConfig(), 10)  # 8 epochs of 10 steps, 1 of warm-up
    expected = [(s + 1) / 10 if s < 10 else 0.5 * (1 + math.cos(math.pi * ((s - 10) / 70))) for s in range(80)]
    assert [default(s) for s in range(80)] == expected
    assert 0 < default(79) < 1e-3 and default(80) == pytest.approx(0.0, abs=1e-12)  # 0 one step past the last
    assert "no time to decay" not in caplog.text
    for epochs, warmup in ((1, 1.0), (2, 3.0)):
        with caplog.at_level(logging.INFO, logger="imgclf"):
            factor = lr_factor(FinetuneConfig(epochs=epochs, warmup_epochs=warmup), 10)
        total = 10 * epochs
        assert f"no time to decay: it takes {total // 2} of the {total} steps (half the run)" in caplog.text
        rates = [factor(s) for s in range(total)]
        assert max(rates) == 1.0 == rates[total // 2 - 1] and rates[-1] < 0.1


def test_head_warm_up_over_the_whole_run_warns(demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        train(_cfg(demo, tmp_path / "run", epochs=1, head_warmup_epochs=1, val_fraction=0.0))
    assert "--head-warmup-epochs 1 covers all 1 epochs: only the new last layer trains" in caplog.text


def test_settings_that_others_make_void_are_named(demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """--freeze-backbone with --backbone-lr-mult, --schedule step with --warmup-epochs, adamw with --momentum
    were accepted without a word and recorded as if they took effect."""
    from imgclf.config import FinetuneConfig
    from imgclf.finetune.trainer import settings_without_effect

    assert settings_without_effect(FinetuneConfig()) == []
    assert settings_without_effect(FinetuneConfig(optimizer="sgd", momentum=0.5, schedule="step", step_epochs=2)) == []
    void = FinetuneConfig(freeze_backbone=True, backbone_lr_mult=0.5, schedule="step", warmup_epochs=3, momentum=0.5)
    assert settings_without_effect(void) == [
        "backbone_lr_mult = 0.5 (--freeze-backbone trains the new last layer only)",
        "warmup_epochs = 3.0 (the warm-up is the cosine schedule's)",
        "momentum = 0.5 (of --optimizer sgd only)",
    ]
    unvalidated = FinetuneConfig(val_fraction=0, early_stopping=1, head_init="random", probe_c=2.0)
    assert settings_without_effect(unvalidated) == [
        "probe_c = 2.0 (of --head-init linear_probe only)",
        "early_stopping = 1 (no validation part with --val-fraction 0)",
    ]
    off = FinetuneConfig(val_fraction=0, early_stopping=0, freeze_backbone=True, backbone_lr_mult=0, momentum=0)
    assert settings_without_effect(off) == []  # switched off as well: nothing void to name
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        train(_cfg(demo, tmp_path / "run", epochs=1, freeze_backbone=True, train_groups=2, val_fraction=0.0))
    assert "settings with no effect in this run: train_groups = 2 (--freeze-backbone" in caplog.text


def test_train_groups_are_the_stages_of_torchvision_networks(caplog: pytest.LogCaptureFixture) -> None:
    """torchvision networks are split at their stages (the stem a group of its own), not at their top-level
    children (convnext_tiny: 2, the second a LayerNorm; efficientnet_b0: 1); without stages, a warning."""
    import torchvision
    from torch import nn

    from imgclf.finetune.trainer import layer_groups

    def prefixes(name: str) -> list[set[str]]:
        groups = layer_groups(torchvision.models.get_model(name, weights=None))
        return [{".".join(n.split(".")[:2]) for n in group} for group in groups]

    resnet = prefixes("resnet18")
    assert resnet[0] == {"conv1.weight", "bn1.weight", "bn1.bias"} and resnet[1:] == [
        {"layer1.0", "layer1.1"},
        {"layer2.0", "layer2.1"},
        {"layer3.0", "layer3.1"},
        {"layer4.0", "layer4.1", "fc.weight", "fc.bias"},
    ]
    assert prefixes("efficientnet_b0")[:-1] == [{f"features.{i}"} for i in range(8)]  # stem, 7 stages
    # the classifier's LayerNorm (and its class layer, which create_backbone takes off) join the last stage
    convnext = prefixes("convnext_tiny")
    assert convnext == [{f"features.{i}"} for i in range(7)] + [{"features.7", "classifier.0", "classifier.2"}]
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert layer_groups(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))) == [
            ["0.weight", "0.bias"],
            ["2.weight", "2.bias"],
        ]
    assert "no stages known for Sequential" in caplog.text


def test_one_readable_class_is_a_clear_error(demo: Path, tmp_path: Path) -> None:
    """Every image of the other class fails to decode: the svm's message, not scikit-learn's."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo / "dotted", data / "dotted")
    (data / "striped").mkdir()
    for f in sorted((demo / "striped").glob("*.jpg")):
        (data / "striped" / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"class 'striped': no training image could be read \(e\.g\. .*striped.*\); "):
        train(_cfg(data, tmp_path / "run"))


def test_training_leaves_the_callers_random_generators_alone(demo: Path, tmp_path: Path) -> None:
    np.random.seed(123)
    torch.manual_seed(123)
    train(_cfg(demo, tmp_path / "run", epochs=1, val_fraction=0.0))
    assert np.random.rand() == np.random.RandomState(123).rand()
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(123)).item()


def test_finetune_from_python_leaves_the_callers_thread_count(demo: Path, tmp_path: Path) -> None:
    """`finetune()` called directly set PyTorch's thread count to --workers and left it so (train kept it)."""
    from imgclf.backbones import create_backbone
    from imgclf.data.dataset import make_split, scan_dataset
    from imgclf.finetune import finetune

    cfg = _cfg(demo, tmp_path / "run", epochs=1, val_fraction=0.0, workers=2)
    ds = scan_dataset(cfg.data)
    (tmp_path / "run").mkdir()
    train_idx = np.flatnonzero(make_split(ds, cfg.data) == "train")
    finetune(cfg, ds, train_idx, create_backbone("efficientnet_lite0", resolution=64), tmp_path / "run")
    assert torch.get_num_threads() == 1  # as _one_thread set it


def test_a_network_built_before_fine_tuning_trains_the_same(demo: Path, tmp_path: Path) -> None:
    """Building the network (timm's random initialisation, before its weights are loaded) drew from the seeded
    stream: a network read before fine-tuning (its layers listed, say) trained to other weights."""
    from imgclf.backbones import create_backbone
    from imgclf.data.dataset import make_split, scan_dataset
    from imgclf.finetune import finetune

    cfg = _cfg(demo, tmp_path / "run", epochs=1, val_fraction=0.0, dropout=0.5)
    ds = scan_dataset(cfg.data)
    train_idx = np.flatnonzero(make_split(ds, cfg.data) == "train")
    heads = []
    for early in (False, True):
        backbone = create_backbone("efficientnet_lite0", resolution=64)
        if early:
            list(backbone.model.modules())
        (run := tmp_path / f"run{early}").mkdir()
        heads.append(finetune(cfg, ds, train_idx, backbone, run).head.weight)
    np.testing.assert_array_equal(*heads)


def test_the_validation_part_is_scored_on_the_test_time_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The validation views were cropped from the training square, a pixel off the test-time centre crop
    along the long side where the margins are odd (150x100 at 64 px: 23 against 22)."""
    from imgclf.data.io import load_for_model
    from imgclf.finetune import trainer

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / c / f"{i}.png")
    loaders: list[trainer.CacheLoader] = []
    real = trainer.CacheLoader
    monkeypatch.setattr(trainer, "CacheLoader", lambda *a: loaders.append(real(*a)) or loaders[-1])
    result = train(_cfg(tmp_path / "data", tmp_path / "run", epochs=1, test_scale=1.0, val_fraction=0.5))
    pre = result.bundle.preprocess
    test_time = [load_for_model(p, pre) for p in sorted((tmp_path / "data").rglob("*.png"))]
    val = loaders[1]
    side, r = val.cache.side, pre.resolution
    o = (side - r) // 2  # as Normalizer.center crops
    views = val.cache.images[val.rows][:, o : o + r, o : o + r]
    assert len(views) >= 2
    assert all(any(np.array_equal(v, t) for t in test_time) for v in views)


def _step_memory(resolution: int) -> Callable[[int, int], object]:
    """The step memory estimate of the demo's network at ``resolution``, with the memory there said to be
    ``(available, total)``."""
    from imgclf.backbones import create_backbone
    from imgclf.finetune import trainer

    bb = create_backbone("efficientnet_lite0", resolution=resolution, pretrained=False)
    model = trainer.Classifier(bb.model, bb.num_features, 3, 0.2)
    mem = trainer.step_memory(model, resolution, False, torch.device("cpu"))
    return lambda available, total: trainer.StepMemory(mem.per_image, mem.fixed, resolution, available, total)


def test_the_step_memory_estimate_scales_with_pixels_and_batch() -> None:
    """Measured on the CPU (docs/finetuning.md): lite0 keeps about 1.6 kB a pixel of each image for the backward
    pass; a step of 32 images at 896 px needs about 45 GB, of 8 at 448 px about 3 GB."""
    at_224, at_448 = _step_memory(224)(None, None), _step_memory(448)(None, None)
    assert 1400 < at_224.per_image / 224**2 < 2000 and 3.5 < at_448.per_image / at_224.per_image < 4.5
    assert 2.6e9 < at_448.need(8) < 3.4e9  # measured: 2.9 GB above the process's memory before training
    assert at_224.fixed == at_448.fixed < 0.3e9
    from imgclf.backbones import create_backbone
    from imgclf.finetune import trainer

    bb = create_backbone("efficientnet_lite0", resolution=224, pretrained=False)
    frozen = trainer.Classifier(bb.model.requires_grad_(False), bb.num_features, 3, 0.2)
    mem = trainer.step_memory(frozen, 224, False, torch.device("cpu"))
    assert mem.per_image < 0.01 * at_224.per_image  # --freeze-backbone: no backward through it
    assert mem.fixed < 0.3 * at_224.fixed  # nor gradients and AdamW's moments (counted: a ViT-B refused at 2.4 GB)
    short = dataclasses.replace(mem, available=mem.fixed // 2)  # the network alone does not fit: no division by 0
    assert short.advice(32) == "the network itself does not fit: a smaller --backbone, or --freeze-backbone"


def test_a_step_that_cannot_fit_is_refused_and_one_that_may_not_warns(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At 896 px a batch of 32 needs about 45 GB: Linux killed the run ("Killed", no message), perhaps after its
    slow first pass decoding the images. Before that: a warning naming the batch size that fits, or a refusal
    where no other program closed could make room."""
    from imgclf.cli import _user_message
    from imgclf.finetune import trainer

    memory = _step_memory(64)
    need = memory(None, None).need(8)
    per_image = memory(None, None).per_image
    fits = memory(need - 3 * per_image, 64 * 10**9).advice(8)
    assert fits == "--ft-batch-size 5 fits (or lower --resolution)"
    available = {"now": (need - 3 * per_image, need * 2)}
    monkeypatch.setattr(trainer, "available_memory", lambda device: available["now"])
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        train(_cfg(demo, tmp_path / "warned", epochs=1))
    mb = f"{need / 1e6:.0f} MB"
    assert f"a training step of 8 images at 64 px needs about {mb} of memory and " in caplog.text
    assert "--ft-batch-size 5 fits (or lower --resolution), or close other programs" in caplog.text
    fixed = memory(None, None).fixed
    earlier = train(_cfg(demo, tmp_path / "refused", classifier="svm")).run_dir  # a finished run in that --out
    kept = {p: p.read_bytes() for p in sorted(earlier.rglob("*")) if p.is_file()}
    available["now"] = (fixed + per_image, need - 1)  # room for one image, and a machine too small for eight
    with pytest.raises(trainer.FinetuneMemoryError) as refused:
        train(_cfg(demo, tmp_path / "refused", epochs=1))
    assert {p: p.read_bytes() for p in sorted(earlier.rglob("*")) if p.is_file()} == kept  # not marked unfinished
    assert str(refused.value) == (
        f"a training step of 8 images at 64 px needs about {mb} of memory, more than the {(need - 1) / 1e6:.0f} MB "
        "there is: even --ft-batch-size 2 does not fit: lower --resolution (--resolution 32 fits with "
        "--ft-batch-size 2)"  # 64 px x sqrt(1/2), down to a multiple of 32
    )
    assert _user_message(refused.value, "train") == str(refused.value)  # printed, without a traceback
    assert not (tmp_path / "refused" / "finetune_cache").exists()  # before the images were decoded


def test_out_of_memory_while_training_says_what_to_change_and_resumes(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's CPU allocator raised a RuntimeError ("DefaultCPUAllocator: can't allocate memory") with a
    traceback; now the message says what to lower, and --resume continues from the last finished epoch."""
    from imgclf.cli import _user_message
    from imgclf.finetune import trainer

    finished: list[int] = []  # the epochs
    random = trainer.Normalizer.random

    def short_of_memory(self: object, *args: object) -> torch.Tensor:
        if finished:  # in epoch 2
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                "to allocate 60940800 bytes. Error code 12 (Cannot allocate memory)"
            )
        return random(self, *args)

    original = imgclf.finetune.finetune
    cfg = _cfg(demo, tmp_path / "run", epochs=2)
    with monkeypatch.context() as m, pytest.raises(trainer.FinetuneMemoryError) as e:
        m.setattr(trainer.Normalizer, "random", short_of_memory)
        m.setattr(
            imgclf.finetune, "finetune", functools.partial(original, on_epoch_end=lambda i, _: finished.append(i))
        )
        m.setattr(trainer, "available_memory", lambda device: (10**12, 10**12))
        train(cfg)
    assert str(e.value).startswith("out of memory while fine-tuning (a step of 8 images at 64 px needs about ")
    assert str(e.value).endswith(
        "1000.0 GB was available): lower --ft-batch-size (now 8) or --resolution, or close other programs; "
        f"{tmp_path / 'run' / 'finetune_ckpt.pt'} holds the last finished epoch: with the same settings --resume "
        "continues from it"
    )
    assert _user_message(e.value, "train") == str(e.value)
    res = train(cfg.updated(resume=True))
    assert [int(r["epoch"]) for r in _log(res.run_dir)] == [0, 1, 2]


def test_only_out_of_memory_errors_are_taken_for_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgclf.finetune import trainer

    assert trainer._out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert trainer._out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"))
    assert trainer._out_of_memory(MemoryError())
    assert not trainer._out_of_memory(RuntimeError("Given groups=1, weight of size [32, 3, 3, 3], expected input"))
    (tmp_path / "memory.max").write_text("2000000000\n")  # a container's limit, under the machine's memory
    (tmp_path / "memory.current").write_text("1500000000\n")
    (tmp_path / "memory.stat").write_text("anon 1000000000\ninactive_file 400000000\n")
    monkeypatch.setattr(trainer, "CGROUP", tmp_path)
    available, total = trainer.available_memory(torch.device("cpu"))
    assert (available, total) == (900_000_000, 2_000_000_000)


def test_a_network_of_one_input_size_is_refused_other_sizes_before_training(demo: Path, tmp_path: Path) -> None:
    """A ViT fine-tuned at 224 px failed after its training, at the first test image (256 px: the default
    --test-scale): the sizes it does not take are refused before anything is decoded or written."""
    import timm

    weights = tmp_path / "vit.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), weights)
    cfg = _cfg(demo, tmp_path / "run", backbone="vit_tiny_patch16_224", weights=weights, resolution=224)
    with pytest.raises(ValueError) as refused:
        train(cfg)
    assert str(refused.value) == (
        "vit_tiny_patch16_224 takes 224 px inputs only: give --resolution 224 and --test-scale 1 (now 224 px in "
        "training, 256 px at test time)"
    )
    assert not (tmp_path / "run").exists()
    from imgclf.backbones import create_backbone
    from imgclf.finetune.trainer import check_input_size

    check_input_size(create_backbone("vit_tiny_patch16_224", weights=weights, resolution=224), 1.0)  # taken
    check_input_size(create_backbone("efficientnet_lite0", resolution=96), 1.15)  # any size: no refusal


def _stop_at_first_epoch(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train ``cfg``, stopped (as by Ctrl-C) once epoch 1 is checkpointed."""

    def stop(epoch: int, row: dict[str, float]) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(imgclf.finetune, "finetune", functools.partial(imgclf.finetune.finetune, on_epoch_end=stop))
        train(cfg)


def test_an_interrupted_fine_tuning_is_kept_unless_resume_is_given_either_way(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same train again without --resume, into the folder of an interrupted fine-tuning, removed its
    checkpoint (hours of training on a CPU) without a word: refused now unless --resume or --no-resume says
    which; a finished run's checkpoint is no reason to refuse."""
    from imgclf.cli import main
    from imgclf.finetune.trainer import CKPT_NAME

    assert imgclf.pipeline.FINETUNE_CKPT == CKPT_NAME  # the pipeline names it without importing torch
    run = tmp_path / "run"
    cfg = _cfg(demo, run, epochs=3)
    _stop_at_first_epoch(cfg, monkeypatch)
    kept = (run / CKPT_NAME).read_bytes()
    with pytest.raises(FileExistsError) as refused:
        train(cfg)
    assert str(refused.value) == (
        f"{run} holds an interrupted fine-tuning (epoch 1 of 3): --resume (resume=True) to go on from it, "
        f"--no-resume (resume=False) to start again, which removes its checkpoint {run / CKPT_NAME}"
    )
    assert main(["train", str(demo), "--out", str(run), "--no-tracking", "--no-progress"]) == 2  # an svm train
    assert (
        "(epoch 1 of 3): --resume (resume=True) with the --classifier it trains (dnn or svm_on_refined) to go on"
        in (capsys.readouterr().err)
    )
    assert (run / CKPT_NAME).read_bytes() == kept
    again = ["train", str(demo), "--config", str(run / "config.json"), "--out", str(run), "--no-tracking"]
    assert main(again) == 2  # the run's record says nothing of resume: a config.json saying false removed it
    assert "holds an interrupted fine-tuning (epoch 1 of 3)" in capsys.readouterr().err
    assert (run / CKPT_NAME).read_bytes() == kept
    train(cfg.updated(resume=False, epochs=1))  # said so: the fine-tuning starts again
    assert [int(r["epoch"]) for r in _log(run)] == [0, 1]
    train(cfg.updated(epochs=1))  # into a finished fine-tuning's folder: replaced, as any finished run is


def test_the_checkpoint_is_written_before_the_log_and_resume_puts_the_log_right(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An epoch's log row was written before its checkpoint: a run stopped between the two had a row for an
    epoch its checkpoint lacked (trained again by --resume). The checkpoint comes first now, and a resumed run
    writes the log its checkpoint holds: one stopped after its last checkpoint lacked that epoch's row."""
    import imgclf.finetune.trainer as trainer
    from imgclf.finetune.trainer import CKPT_NAME

    run = tmp_path / "run"
    cfg = _cfg(demo, run, epochs=2)

    def stopped_at_epoch_2(write: Callable[[Path, object], None], epoch_of: Callable[[object], int]) -> object:
        def stopped(path: Path, what: object) -> None:
            if epoch_of(what) == 2:  # Ctrl-C just before it is written
                raise KeyboardInterrupt
            write(path, what)

        return stopped

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(trainer, "_save_ckpt", stopped_at_epoch_2(trainer._save_ckpt, lambda ckpt: ckpt["epoch"]))
        train(cfg)
    assert torch.load(run / CKPT_NAME, weights_only=False)["epoch"] == 1
    assert [int(r["epoch"]) for r in _log(run)] == [0, 1]
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(trainer, "_write_log", stopped_at_epoch_2(trainer._write_log, lambda rows: rows[-1]["epoch"]))
        train(cfg.updated(resume=True))
    assert torch.load(run / CKPT_NAME, weights_only=False)["done"]
    assert [int(r["epoch"]) for r in _log(run)] == [0, 1]
    res = train(cfg.updated(resume=True))  # nothing left to train
    assert [int(r["epoch"]) for r in _log(run)] == [0, 1, 2] and res.metrics["finetune"]["epochs_trained"] == 2


def test_the_decoded_images_of_a_run_stopped_before_its_first_checkpoint_are_reused(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped in epoch 1, before its first checkpoint, a fine-tuning left its decoded images in
    finetune_cache; the train again (with --resume, or the same command as the command line advises) removed
    them and decoded every image anew."""
    import imgclf.finetune.imagecache as imagecache
    import imgclf.finetune.trainer as trainer

    run = tmp_path / "run"
    cfg = _cfg(demo, run, epochs=1)
    decoded = Mock(side_effect=imagecache._decode_into)
    monkeypatch.setattr(imagecache, "_decode_into", decoded)
    for again in (cfg, cfg.updated(resume=True)):
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(trainer, "_save_ckpt", Mock(side_effect=KeyboardInterrupt))
            train(again)
        assert any((run / "finetune_cache").iterdir()) and not (run / "finetune_ckpt.pt").exists()
    assert decoded.call_count == 2  # the training images and the validation part, once each
    train(cfg)
    assert decoded.call_count == 2 and not (run / "finetune_cache").exists()
