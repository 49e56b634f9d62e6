"""Fine-tuning throughput (img/s) against the same model trained on synthetic tensors in the same run, on
CPU and on the GPU when there is one.

    python bench/bench_finetune.py [--data FOLDER] [--batches N] [--epochs 3] [--repeats 3] [--threads 2]
                                   [--precision auto] [--compile] [--devices all|cpu|cuda]

Without --data, a small generated demo data set is used. Three numbers per device, each against the
synthetic-tensor rate of the same model, optimiser, precision and batch size:

- *cached+augmented*: ``--batches`` training steps on cached, augmented images (the data pipeline alone,
  after the cache is built), medians over ``--repeats``;
- *trainer*: the median img/s of epochs 2 onward of a real ``finetune`` run of ``--epochs`` epochs of
  ``--batches`` steps each (its per-epoch log: prefetching, progress bar, bookkeeping included; the data
  set's images are repeated to fill the epochs). This is the issue's GPU criterion: epoch 2 onward >= 0.8.

A ratio near 1 means training never waits for data. Precision follows the trainer's rule: auto = bf16
autocast on GPUs with native bf16 (Ampere and newer), fp32 on the CPU and older GPUs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.backbones import create_backbone
from imgclf.cli import non_negative_int, positive_int
from imgclf.config import Config, DataConfig
from imgclf.data.dataset import Dataset, DatasetError, scan_dataset
from imgclf.features.runtimes import resolve_precision
from imgclf.finetune import finetune
from imgclf.finetune.augment import Augment, Normalizer
from imgclf.finetune.imagecache import build_image_cache, whole_square
from imgclf.finetune.trainer import CacheLoader, Classifier, build_optimizer
from imgclf.utils import cpu_count


def _step(
    model: Classifier,
    forward: Callable[[torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool,
) -> None:
    """One training step as the trainer takes it (backbone, dropout, new layer; loss in fp32)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model.fc(model.dropout(forward(x))).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(
    device: torch.device,
    ds: Dataset,
    cfg: Config,
    batches: int,
    repeats: int,
    epochs: int,
    tmp: Path,
) -> None:
    prec = resolve_precision(cfg.features.precision, "torch", device.type)
    bf16 = prec == "bf16"
    name, batch = cfg.backbone.backbone, cfg.finetune.ft_batch_size
    bb = create_backbone(name, drop_path_rate=cfg.finetune.drop_path)  # trained as with the defaults
    res = bb.preprocess.resolution  # fine-tuning trains at the backbone's resolution
    t = time.perf_counter()
    pre = bb.preprocess
    cache = build_image_cache(
        [ds.path(s) for s in ds.samples], whole_square(pre), tmp / "cache", cpu_count(), progress=False
    )
    decode_s = time.perf_counter() - t
    model = Classifier(bb.model, bb.num_features, len(ds.classes), cfg.finetune.dropout)
    model.to(device, memory_format=torch.channels_last).train()
    forward = torch.compile(model.backbone) if cfg.finetune.compile else model.backbone
    opt = build_optimizer(model, cfg.finetune)  # the trainer's optimiser and parameter groups
    norm = Normalizer(bb.preprocess.resolution, bb.mean, bb.std, device)
    loader = CacheLoader(cache, np.arange(len(ds.samples)), ds.labels, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(ds.classes), (batch,), device=device)
    ft = cfg.finetune
    aug = Augment(ft.aug_crop, ft.aug_flip, ft.aug_color, ft.aug_rotate)
    for _ in range(2):  # warm-up (and compilation)
        _step(model, forward, opt, x, y, bf16)
    _sync(device)
    rounds = 1 + batches * batch // max(1, len(ds.samples))  # epochs of batches one measurement needs
    synthetic, real = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(batches):
            _step(model, forward, opt, x, y, bf16)
        _sync(device)
        synthetic.append(batches * batch / (time.perf_counter() - t))
        todo = [b for _ in range(rounds) for b in loader.epoch_batches(batch, gen, False)][:batches]
        t = time.perf_counter()
        n = 0
        for idx in todo:
            xb, yb = loader(idx)
            _step(model, forward, opt, norm.random(xb, aug, gen, res), yb, bf16)
            n += len(yb)
        _sync(device)
        real.append(n / (time.perf_counter() - t))
    synthetic_s = float(np.median(synthetic))
    print(
        f"{device.type:>4} {prec} {name} @{res} batch {batch}, {batches} steps x {repeats}: "
        f"synthetic {synthetic_s:7.1f} img/s | cached+augmented {np.median(real):7.1f} img/s | "
        f"ratio {np.median(np.array(real) / np.array(synthetic)):.2f} (medians) | "
        f"one-off decode of {len(ds.samples)} images {decode_s:.1f} s"
    )
    if epochs < 2:
        return
    del model, opt, forward
    n_img = batches * batch  # one epoch: the data set's images repeated as needed
    repeated = Dataset(ds.root, ds.classes, (ds.samples * (1 + n_img // len(ds.samples)))[:n_img])
    run_cfg = cfg.updated(epochs=epochs, early_stopping=0, val_fraction=0.0, head_init="random", progress=False)
    history = finetune(run_cfg, repeated, np.arange(n_img), create_backbone(name), tmp / "run").history
    trainer = float(np.median([h["img_per_s"] for h in history[1:]]))
    print(
        f"{device.type:>4} {prec} trainer, {epochs} epochs of {n_img} images: epoch 2 onward {trainer:7.1f} img/s "
        f"(median) | ratio to synthetic {trainer / synthetic_s:.2f} | per epoch "
        + ", ".join(f"{h['img_per_s']:.1f}" for h in history)
    )


def batch_size(text: str) -> int:
    """argparse type: a training batch of 2 or more images (batch norm needs two)."""
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"expected a whole number of 2 or more, got {text!r}")
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="image folder (default: a generated demo set)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch", type=batch_size, default=Config().finetune.ft_batch_size, help="2 or more")
    ap.add_argument(
        "--batches",
        type=non_negative_int,
        default=0,
        help="timed training steps per measurement (0: 8 on the CPU, 200 on a GPU)",
    )
    ap.add_argument(
        "--epochs", type=non_negative_int, default=3, help="epochs of the trainer run (below 2: no trainer run)"
    )
    ap.add_argument("--repeats", type=positive_int, default=3, help="measurements per device; medians are printed")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="CPU threads (0 = all cores)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="training precision")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone (as --compile in training)")
    ap.add_argument("--devices", choices=["all", "cpu", "cuda"], default="all", help="all: the CPU, then a GPU if any")
    args = ap.parse_args()
    try:
        ds = scan_dataset(DataConfig(data_root=args.data)) if args.data else None
    except DatasetError as e:
        ap.error(str(e))
    threads = args.threads or cpu_count()  # a container's quota too; the trainer's also (its --workers)
    torch.set_num_threads(threads)
    devices = [torch.device("cpu")] if args.devices in ("all", "cpu") else []
    if args.devices in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        ap.error("no CUDA device here")
    with tempfile.TemporaryDirectory() as tmp:
        if ds is None:
            from imgclf.data.demo import generate_demo_dataset

            demo = generate_demo_dataset(Path(tmp) / "demo", n_per_class=40, seed=0, size=320, progress=False)
            ds = scan_dataset(DataConfig(data_root=demo))
        for device in devices:
            cfg = Config().updated(
                backbone=args.backbone,
                ft_batch_size=args.batch,
                precision=args.precision,
                device=device.type,
                compile=args.compile,
                workers=threads,
                out=Path(tmp) / "run",
            )
            batches = args.batches or (8 if device.type == "cpu" else 200)
            bench(device, ds, cfg, batches, args.repeats, args.epochs, Path(tmp) / device.type)


if __name__ == "__main__":
    main()
