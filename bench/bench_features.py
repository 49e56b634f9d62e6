"""Feature extraction end to end (JPEG files in, features out): imgclf vs a plain PyTorch baseline.

Baseline: ``ImageFolder``'s image loading + ``DataLoader`` + the same model in eager fp32 at the same
resolution (timm's eval transform). Both run in this process on the same files, the images imgclf's scan
lists (not ``unlabeled/`` or hidden folders; ``.jfif`` files too), imgclf with a cold feature cache and
its runtime built beforehand (like the baseline's model; the one-time conversion time is printed
separately). The script prints images/s for each (median of ``--repeats`` runs), their ratio, and the
SVM accuracy each set of features gives over split seeds, so speed never comes at the cost of accuracy.

    python bench/bench_features.py ../shared/datasets/flowers5 [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import default_loader

from imgclf.backbones import create_backbone
from imgclf.cli import non_negative_int, positive_int
from imgclf.config import Config
from imgclf.data.dataset import DatasetError, make_split, scan_dataset
from imgclf.features import FeatureExtractor
from imgclf.heads import LinearSVMHead


class ImageFiles(torch.utils.data.Dataset):
    """The given image files, loaded as ``ImageFolder`` loads them (torchvision's ``default_loader``)."""

    def __init__(self, paths: list[Path], transform: Callable) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(default_loader(str(self.paths[i])))


def baseline_features(paths: list[Path], model: torch.nn.Module, cfg: dict, threads: int) -> np.ndarray:
    """ImageFolder's loading + DataLoader + eager fp32 model over ``paths`` (imgclf's images), in that order."""
    from timm.data import create_transform

    ds = ImageFiles(paths, create_transform(**cfg, is_training=False))
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=threads, shuffle=False)
    with torch.inference_mode():
        return np.concatenate([model(x).numpy() for x in loader])


def svm_accuracy(x: np.ndarray, ds, seeds: list[int]) -> float:
    accs = []
    for seed in seeds:
        split = make_split(ds, Config().updated(data_root=ds.root, split_seed=seed).data)
        tr, te = split == "train", split == "test"
        head = LinearSVMHead().fit(x[tr], ds.labels[tr])
        accs.append(float(np.mean(head.predict(x[te]) == ds.labels[te])))
    return float(np.mean(accs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    cfg = Config().updated(data_root=args.data, progress=False, workers=args.threads)
    try:
        ds = scan_dataset(cfg.data)
    except DatasetError as e:
        parser.error(str(e))
    torch.set_num_threads(args.threads)
    paths = [ds.path(s) for s in ds.samples]
    bb = create_backbone(cfg.backbone.backbone)
    timm_cfg = {
        "input_size": (3, bb.preprocess.resolution, bb.preprocess.resolution),
        "crop_pct": bb.preprocess.crop_pct,
        "interpolation": bb.preprocess.interpolation,
        "mean": bb.mean,
        "std": bb.std,
    }

    ours, theirs, setup = [], [], []
    x_ours = x_base = None
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:  # cold feature cache every time: nothing reused
            fx = FeatureExtractor.from_config(cfg.updated(cache_dir=Path(cache)), bb)
            t = time.perf_counter()
            fx.runtime  # noqa: B018 - one-time model conversion, like building the baseline's model
            setup.append(time.perf_counter() - t)
            t = time.perf_counter()
            x_ours = fx.extract(paths).features
            ours.append(len(paths) / (time.perf_counter() - t))
        t = time.perf_counter()
        x_base = baseline_features(paths, bb.model.eval(), timm_cfg, args.threads)
        theirs.append(len(paths) / (time.perf_counter() - t))
        print(f"run {r + 1}: imgclf {ours[-1]:.1f} img/s, baseline {theirs[-1]:.1f} img/s", flush=True)
    fx = FeatureExtractor.from_config(cfg, bb)
    med_ours, med_base = statistics.median(ours), statistics.median(theirs)
    print(f"\n{len(paths)} images, {cfg.backbone.backbone} @ {bb.preprocess.resolution}, {args.threads} threads")
    print(f"imgclf   ({fx.runtime_name} {fx.precision}, flip_tta={fx.flip_tta}): {med_ours:.1f} img/s (median)")
    print(f"baseline (ImageFolder loading + DataLoader + eager fp32): {med_base:.1f} img/s (median)")
    print(f"speed-up: {med_ours / med_base:.2f}x")
    print(
        f"one-time runtime set-up (model conversion, cached on disk after the first run): "
        f"{statistics.median(setup):.1f} s (median), not counted above"
    )
    acc_ours, acc_base = svm_accuracy(x_ours, ds, args.seeds), svm_accuracy(x_base, ds, args.seeds)
    print(
        f"SVM accuracy, mean over split seeds {args.seeds}: imgclf features {acc_ours:.4f}, "
        f"baseline features {acc_base:.4f}, difference {100 * (acc_ours - acc_base):+.2f} points"
    )


if __name__ == "__main__":
    main()
