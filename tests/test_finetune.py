"""Fine-tuning: end to end on tiny generated data, resume after interruption, validation part, bundles."""

from __future__ import annotations

import csv
import functools
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import imgclf.finetune
from imgclf.config import Config
from imgclf.data.dataset import load_split
from imgclf.data.demo import generate_demo_dataset
from imgclf.data.io import Preprocess
from imgclf.finetune import split_validation
from imgclf.finetune.trainer import eval_preprocess, within_noise
from imgclf.pipeline import predict, train


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


def test_dnn_end_to_end(demo: Path, tmp_path: Path) -> None:
    res = train(_cfg(demo, tmp_path / "run"))
    run = res.run_dir
    rows = _log(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_error", "val_loss", "val_error", "img_per_s", "seconds"}
    lr = res.bundle.config["finetune"]["lr"]
    assert all(0 < float(r["lr"]) <= lr for r in rows)  # the mean rate each epoch used, the last one's too
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
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"])) and math.isfinite(float(rows[0]["val_loss"]))
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
    monkeypatch.setattr(imgclf.finetune, "finetune", original)
    with pytest.raises(ValueError, match=r"another fine-tuning run \(epochs 3 -> 4, lr 0.001 -> 0.002\)"):
        train(cfg.updated(resume=True, epochs=4, lr=0.002))  # the schedule depends on both: no continuing
    state = torch.load(tmp_path / "run" / "finetune_ckpt.pt", weights_only=False)["model"]
    torch.save(
        {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}, tmp_path / "w.pt"
    )
    with pytest.raises(ValueError, match=r"another fine-tuning run \(weights pypi:.* -> file:"):
        train(cfg.updated(resume=True, weights=tmp_path / "w.pt"))  # not blamed on the images
    (tmp_path / "run" / "leaks.csv").write_text("left by an earlier run\n")
    res = train(cfg.updated(resume=True))
    rows = _log(res.run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and not (tmp_path / "run" / "leaks.csv").exists()
    _, preds = predict(res.run_dir, [demo])
    assert all(p.scores is not None for p in preds)


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
    assert [int(r["epoch"]) for r in _log(res.run_dir)] == [1, 2]  # stopped two epochs past epoch 0
    assert "early stopping: no validation gain for 2 epochs" in caplog.text
    assert "fine-tuning: best epoch 0 of 2" in caplog.text
    assert res.metrics["overall_accuracy"] >= 4 / 6  # the probe's network, not the diverged one


@pytest.mark.parametrize("mode", ["svm", "dnn", "svm_on_refined"])
def test_bundles_of_all_modes_predict(demo: Path, tmp_path: Path, mode: str) -> None:
    res = train(_cfg(demo, tmp_path / mode, classifier=mode, epochs=1))
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
        build_image_cache(paths, 64, "bilinear", folder, 1, progress=False)
    assert e.value.errno == errno.ENOSPC and [p.name for p in folder.iterdir() if p.suffix != ".lock"] == []
    monkeypatch.undo()
    cache = build_image_cache(paths, 64, "bilinear", folder, 1, progress=False)
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
        FileLock(folder / f".images-{_key(paths, 64, 'bilinear')}.lock"),
    ):
        worker = threading.Thread(target=lambda: built.append(build_image_cache(paths, 64, "bilinear", folder, 1)))
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
