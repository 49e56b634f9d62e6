"""Fine-tuning throughput (img/s): the real data pipeline (uint8 cache + batched augmentation) against the
same model trained on synthetic tensors in the same run, on CPU and on the GPU when there is one.

    python bench/bench_finetune.py [--data FOLDER] [--batches N] [--repeats 3] [--threads 2] [--precision auto]

Without --data, a small generated demo data set is used. Each repeat times ``--batches`` training steps
on synthetic tensors, then as many on cached, augmented images (later epochs: the cache is built once,
before timing); medians over the repeats are printed. A ratio near 1 means the data pipeline keeps the
device fed; well below 1, training waits for data. Precision follows the trainer's rule: auto = bf16
autocast on GPUs with native bf16 (Ampere and newer), fp32 on the CPU and older GPUs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.backbones import create_backbone
from imgclf.config import Config
from imgclf.data.dataset import scan_dataset
from imgclf.features.runtimes import resolve_precision
from imgclf.finetune.augment import Augment, Normalizer
from imgclf.finetune.imagecache import build_image_cache
from imgclf.finetune.trainer import CacheLoader, Classifier
from imgclf.utils import cpu_count


def _step(model: Classifier, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(
    device: torch.device,
    data: Path,
    backbone_name: str,
    batch: int,
    batches: int,
    repeats: int,
    cache_dir: Path,
    precision: str,
) -> None:
    prec = resolve_precision(precision, "torch", device.type)
    bf16 = prec == "bf16"
    cfg = Config()
    bb = create_backbone(backbone_name, drop_path_rate=cfg.finetune.drop_path)  # trained as with the defaults
    res = bb.preprocess.resolution  # fine-tuning trains at the backbone's resolution
    ds = scan_dataset(cfg.data, data)
    t = time.perf_counter()
    pre = bb.preprocess
    cache = build_image_cache(
        [ds.path(s) for s in ds.samples], pre.resize_to, pre.interpolation, cache_dir, cpu_count(), progress=False
    )
    decode_s = time.perf_counter() - t
    model = Classifier(bb.model, bb.num_features, len(ds.classes), cfg.finetune.dropout)
    model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    norm = Normalizer(bb.preprocess.resolution, bb.mean, bb.std, device)
    loader = CacheLoader(cache, np.arange(len(ds.samples)), ds.labels, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(ds.classes), (batch,), device=device)
    aug = Augment(rotate_deg=10.0)
    for _ in range(2):  # warm-up
        _step(model, opt, x, y, bf16)
    _sync(device)
    epochs = 1 + batches * batch // max(1, len(ds.samples))  # epochs of batches one measurement needs
    synthetic, real = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(batches):
            _step(model, opt, x, y, bf16)
        _sync(device)
        synthetic.append(batches * batch / (time.perf_counter() - t))
        todo = [b for _ in range(epochs) for b in loader.epoch_batches(batch, gen, False)][:batches]
        t = time.perf_counter()
        n = 0
        for idx in todo:
            xb, yb = loader(idx)
            _step(model, opt, norm.random(xb, aug, gen, res), yb, bf16)
            n += len(yb)
        _sync(device)
        real.append(n / (time.perf_counter() - t))
    ratio = float(np.median(np.array(real) / np.array(synthetic)))
    print(
        f"{device.type:>4} {prec} {backbone_name} @{res} batch {batch}, {batches} steps x {repeats}: "
        f"synthetic {np.median(synthetic):7.1f} img/s | cached+augmented {np.median(real):7.1f} img/s | "
        f"ratio {ratio:.2f} (medians) | one-off decode of {len(ds.samples)} images {decode_s:.1f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="image folder (default: a generated demo set)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--batches", type=int, default=0, help="timed training steps per measurement (0: 8 on the CPU, 200 on a GPU)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="measurements per device; medians are printed")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="training precision")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from imgclf.data.demo import generate_demo_dataset

            data = generate_demo_dataset(Path(tmp) / "demo", n_per_class=40, seed=0, size=320, progress=False)
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        cache = Path(tmp) / "cache"
        for device in devices:
            batches = args.batches or (8 if device.type == "cpu" else 200)
            bench(device, data, args.backbone, args.batch, batches, args.repeats, cache, args.precision)


if __name__ == "__main__":
    main()
