"""Test helpers: small generated image folders and the shared real data sets."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real data sets live in ../shared/datasets)")
    return path


def draw_image(kind: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A small synthetic photo: 'circles', 'stripes' or 'squares' on a noisy background."""
    base = rng.integers(0, 255, 3)
    arr = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    colour = tuple(int(c) for c in rng.integers(0, 255, 3))
    for _ in range(6):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(5, 14))
        if kind == "circles":
            d.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif kind == "squares":
            d.rectangle((x - r, y - r, x + r, y + r), fill=colour)
        else:
            d.rectangle((0, y, size, y + r // 2), fill=colour)
    return im


def make_folder(
    root: Path,
    classes: tuple[str, ...] = ("circles", "squares", "stripes"),
    n: int = 12,
    seed: int = 0,
    ext: str = ".jpg",
) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            draw_image(c, rng).save(root / c / f"{c}_{i:02d}{ext}")
    return root


CHROMIUM = Path("/usr/bin/chromium")  # Debian's, installed by .ci/install-browser
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def make_bundle(run_dir: Path, config: dict | None = None):
    """A real efficientnet_lite0 bundle with a fixed random head over three classes, saved in ``run_dir``."""
    from imgclf.backbones import create_backbone
    from imgclf.bundle import Bundle
    from imgclf.heads.linear import LinearHead

    w = np.random.default_rng(0).normal(0, 4, (3, 1280)).astype(np.float32)
    bundle = Bundle(
        ["cat", "dog", "fish"],
        create_backbone("efficientnet_lite0").spec(),
        LinearHead(w, np.zeros(3, np.float32), True),
        "svm",
        config or {},
        metrics={"overall_accuracy": 0.5},
    )
    bundle.save(run_dir)
    return bundle


def refuse_listing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make every folder called ``name`` unlistable (permission denied), as chmod 000 would for a user
    other than root, whom tests may run as."""
    real_scandir = os.scandir

    def scandir(path: str | os.PathLike[str] = ".") -> object:
        if Path(os.fsdecode(path)).name == name:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def count_concurrent_loads(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[int]:
    """Watch Pillow's decoding: the list's one item becomes the most decodes seen at once (set it to 0 to watch
    again); each decode lasts ``seconds`` longer, long enough for threads that may overlap to do so."""
    from PIL import ImageFile

    loading, peak, lock = [0], [0], threading.Lock()
    real_load = ImageFile.ImageFile.load

    def load(im: ImageFile.ImageFile) -> object:
        with lock:
            loading[0] += 1
            peak[0] = max(peak[0], loading[0])
        try:
            time.sleep(seconds)
            return real_load(im)
        finally:
            with lock:
                loading[0] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return peak


@contextlib.contextmanager
def held_elsewhere(root: Path) -> Iterator[None]:
    """``root`` held with ``moving_lock`` by another thread, as by another imgclf process, while the block runs
    (the thread that holds a folder may hold it again)."""
    from imgclf.datatools.journal import moving_lock

    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with moving_lock(root):
            taken.set()
            done.wait(60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(60)
    try:
        yield
    finally:
        done.set()
        holder.join(60)
