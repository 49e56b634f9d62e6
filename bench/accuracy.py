"""Overall accuracy of `imgclf train` over several split seeds (the feature cache makes later seeds cheap).

python bench/accuracy.py ../shared/datasets/flowers5 --seeds 0 1 2 3 4 [-- extra train flags]

A data set with its own split (``train/`` + ``val/`` or ``test/``) has one test split whatever the seed:
several seeds are refused there (one is run, with a note).

With ``--cv K`` it cross-validates instead: the images of DATA (a folder per class) are dealt into K
stratified folds, and each fold is the test split of one run trained on the others. Point it at a
training folder (``hymenoptera/train``) to compare settings without touching a data set's test split.

python bench/accuracy.py ../shared/datasets/hymenoptera/train --cv 4 [-- extra train flags]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imgclf.cli import build_parser, config_from_args, non_negative_int
from imgclf.cli import main as imgclf_main
from imgclf.config import DataConfig
from imgclf.data.dataset import DatasetError, scan_dataset, split_folders


def _train(argv: list[str], out: Path) -> dict:
    if imgclf_main(["train", *argv, "--out", str(out), "--no-progress"]) != 0:
        sys.exit(f"train failed: {' '.join(argv)}")
    return json.loads((out / "metrics.json").read_text())


def run(data: str, seeds: list[int], extra: list[str]) -> list[float]:
    accs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            t = time.perf_counter()
            accs.append(
                _train([data, "--split-seed", str(seed), *extra], Path(tmp) / f"seed{seed}")["overall_accuracy"]
            )
            print(f"seed {seed}: overall accuracy {accs[-1]:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return accs


def fixed_split(data: str, extra: list[str]) -> str | None:
    """Why ``imgclf train DATA EXTRA`` ignores ``--split-seed`` (its test split is fixed), or None."""
    mode = config_from_args(build_parser().parse_args(["train", data, *extra])).data.split_mode
    if mode == "list":
        return "its test split is the --test-list"
    folders = split_folders(Path(data)) if mode in ("auto", "predefined") and Path(data).is_dir() else []
    return f"{data} has its own split ({', '.join(f + '/' for f in folders)})" if folders else None


def cv_folds(data: str, k: int, seed: int) -> list[list[str]]:
    """Relative paths of the images of ``data`` dealt into ``k`` folds, class by class, in seeded random order."""
    ds = scan_dataset(DataConfig(data_root=Path(data)))
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(k)]
    for label in range(len(ds.classes)):
        rels = [s.rel for s in ds.samples if s.label == label]
        for j, i in enumerate(rng.permutation(len(rels))):
            folds[j % k].append(rels[i])
    return [sorted(f) for f in folds]


def cross_validate(data: str, k: int, seed: int, extra: list[str]) -> tuple[int, int, int]:
    """Images right, images dealt into the folds, and those of them no fold scored (train left them out: a class
    with no training image in that fold, an unreadable file), which count as wrong."""
    right = total = 0
    folds = cv_folds(data, k, seed)
    with tempfile.TemporaryDirectory() as tmp:
        for i, fold in enumerate(folds):
            listing = Path(tmp) / f"fold{i}.txt"
            listing.write_text("\n".join(fold) + "\n")
            t = time.perf_counter()
            m = _train([data, "--split-mode", "list", "--test-list", str(listing), *extra], Path(tmp) / f"fold{i}")
            n_right = round(m["overall_accuracy"] * m["n_test"])
            right, total = right + n_right, total + m["n_test"]
            print(f"fold {i}: {n_right} of {m['n_test']} right ({time.perf_counter() - t:.0f} s)", flush=True)
    listed = sum(map(len, folds))
    return right, listed, listed - total


def main() -> None:
    parser = argparse.ArgumentParser(  # no abbreviations: `--seed 3` (train's seed, passed on) is not --seeds
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("data")
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--cv", type=non_negative_int, default=0, metavar="K", help="K-fold cross-validation over DATA instead"
    )
    parser.add_argument("--cv-seed", type=non_negative_int, default=0, help="Seed of the fold assignment.")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.cv and args.cv < 2:
        parser.error("--cv needs at least 2 folds")
    if args.cv:
        if folders := split_folders(Path(args.data)) if Path(args.data).is_dir() else []:
            parser.error(  # its folds would hold the test split's images: settings chosen on them
                f"{args.data} has its own split ({', '.join(folders)}/): give its training folder to --cv "
                f"({Path(args.data) / folders[0]})"
            )
        try:
            right, total, unscored = cross_validate(args.data, args.cv, args.cv_seed, extra)
        except DatasetError as e:
            parser.error(str(e))
        left = f"; {unscored} not scored (left out by train: see the folds' logs), counted as wrong" if unscored else ""
        print(f"{args.cv}-fold cross-validation: {right} of {total} right ({right / total:.4f}){left}")
        return
    if (why := fixed_split(args.data, extra)) and len(set(args.seeds)) > 1:
        parser.error(
            f"every split seed gives the same test split: {why}; compare settings with --cv K on its training "
            "folder (DATA/train), measure that one split with --seeds 0, or pool and re-split with -- --split-mode random"
        )
    if why:
        print(f"note: the split seed has no effect: {why}", flush=True)
    accs = run(args.data, args.seeds, extra)
    print(f"overall accuracy per seed: {[round(a, 4) for a in accs]}")
    print(f"mean {statistics.mean(accs):.4f}  median {statistics.median(accs):.4f}  min {min(accs):.4f}")


if __name__ == "__main__":
    main()
