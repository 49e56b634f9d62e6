"""Accuracy and wall time of `imgclf train --classifier dnn` against fastai (`vision_learner` + `fine_tune`),
with the same backbone and weights (efficientnet_lite0 from its pip package, in a timm model), the same
train/test split and the same epoch budget (fastai: 1 frozen epoch + epochs-1 unfrozen).

    python bench/bench_fastai.py ../shared/datasets/flowers5 [--split-seed 0] [--epochs 6] [--threads 2]
                                 [-- IMGCLF_TRAIN_FLAGS ...]

Arguments after ``--`` go to ``imgclf train`` alone (fastai's side never sees them); any other unknown
argument is an error.

fastai is a benchmark-only dependency (pip install fastai); without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imgclf.backbones import create_backbone
from imgclf.cli import main as imgclf_main
from imgclf.cli import non_negative_int, positive_int
from imgclf.config import Config
from imgclf.data.dataset import make_split, scan_dataset
from imgclf.utils import cpu_count


def run_imgclf(data: Path, out: Path, seed: int, epochs: int, extra: list[str]) -> tuple[float, float]:
    t = time.perf_counter()
    argv = [
        "train",
        str(data),
        "--classifier",
        "dnn",
        "--out",
        str(out),
        "--split-seed",
        str(seed),
        "--epochs",
        str(epochs),
        "--no-progress",
        *extra,
    ]
    if imgclf_main(argv) != 0:
        sys.exit("imgclf train failed")
    acc = json.loads((out / "metrics.json").read_text())["overall_accuracy"]
    return acc, time.perf_counter() - t


def run_fastai(data: Path, seed: int, epochs: int, backbone_name: str) -> tuple[float, float]:
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        set_seed,
        vision_learner,
    )

    cfg = Config().updated(data_root=data, split_seed=seed)
    ds = scan_dataset(cfg.data)
    split = make_split(ds, cfg.data)
    items = [ds.path(s) for s in ds.samples]
    label = {p: ds.classes[s.label] for p, s in zip(items, ds.samples, strict=True)}
    test = [i for i in range(len(items)) if split[i] == "test"]
    train = [i for i in range(len(items)) if split[i] == "train"]
    bb = create_backbone(backbone_name)
    res = bb.preprocess.resolution

    def get_y(path: Path) -> str:
        return label[path]

    set_seed(seed, reproducible=True)  # fastai's shuffling and augmentation draw from Python's random too
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=lambda _: items,
        get_y=get_y,
        splitter=lambda _: (train, test),
        item_tfms=Resize(bb.preprocess.resize_to),
        batch_tfms=[*aug_transforms(size=res), Normalize.from_stats(bb.mean, bb.std)],
    )
    dls = block.dataloaders(data, bs=min(32, max(2, len(train) // 2)), num_workers=0)

    def arch(pretrained: bool = True) -> torch.nn.Module:
        return create_backbone(backbone_name).model  # the packaged ImageNet weights, as imgclf uses them

    torch.manual_seed(seed)
    t = time.perf_counter()
    learn = vision_learner(dls, arch, metrics=accuracy, cut=-2, normalize=False)
    learn.fine_tune(epochs - 1, freeze_epochs=1)
    acc = float(learn.validate()[1])
    return acc, time.perf_counter() - t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options; everything after the first ``--`` goes to ``imgclf train`` (``train_args``)."""
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(
        usage="%(prog)s [-h] [--split-seed N] [--epochs N] [--backbone NAME] [--threads N] data "
        "[-- IMGCLF_TRAIN_FLAGS ...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("data", type=Path)
    ap.add_argument("--split-seed", type=non_negative_int, default=0)
    ap.add_argument("--epochs", type=positive_int, default=Config().finetune.epochs)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="CPU threads (0 = all cores)")
    args = ap.parse_args(argv[:cut])
    args.train_args = argv[cut + 1 :]
    return args


def main() -> None:
    args = parse_args()
    try:
        import fastai  # noqa: F401
    except ImportError:
        print("fastai is not installed (pip install fastai); nothing to compare against.")
        return
    threads = args.threads or cpu_count()  # a container's quota too; both sides (imgclf's --workers: its threads)
    torch.set_num_threads(threads)
    np.random.seed(args.split_seed)
    with tempfile.TemporaryDirectory() as tmp:
        train_args = ["--backbone", args.backbone, "--workers", str(threads), *args.train_args]
        ours = run_imgclf(args.data, Path(tmp) / "imgclf", args.split_seed, args.epochs, train_args)
    theirs = run_fastai(args.data, args.split_seed, args.epochs, args.backbone)
    print(
        f"{'':8} {'accuracy':>9} {'wall s':>8}   ({args.backbone}, split seed {args.split_seed}, {args.epochs} epochs, "
        f"CPU, {threads} threads)"
    )
    for name, (acc, secs) in (("imgclf", ours), ("fastai", theirs)):
        print(f"{name:8} {acc:9.4f} {secs:8.1f}")


if __name__ == "__main__":
    main()
