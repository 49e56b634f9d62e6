"""Decode every training image once into a uint8 memmap, so that later epochs decode no JPEG."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imgclf.data.io import ImageError, Preprocess, load_for_model
from imgclf.utils import atomic_write_text

log = logging.getLogger("imgclf")


@dataclass
class ImageCache:
    """``images[i]`` is image i resized (shorter side = ``side``) and centre-cropped to side x side."""

    images: np.ndarray  # (n, side, side, 3) uint8, a read-only memmap
    ok: np.ndarray  # (n,) bool: False where decoding failed
    side: int
    errors: dict[int, str] = field(default_factory=dict)  # why image i failed to decode


def _key(paths: Sequence[Path], pre: Preprocess) -> str:
    h = hashlib.sha256(f"{pre.resolution}:{pre.resize_to}:{pre.interpolation}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"\0{p}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}".encode())  # ctime: mtime put back
    return h.hexdigest()[:20]


def whole_square(pre: Preprocess) -> Preprocess:
    """The resized square that ``pre`` centre-crops its view from: the training views are drawn from all of it."""
    return Preprocess(pre.resize_to, 1.0, pre.interpolation)


def build_image_cache(
    paths: Sequence[Path],
    pre: Preprocess,
    folder: Path,
    workers: int,
    max_pixels: int | None = None,
    progress: bool = True,
) -> ImageCache:
    """Decode ``paths`` as ``pre`` prepares them for a network (EXIF-oriented, squares of ``pre.resolution``)
    into ``folder/images-<key>.u8``; reused while the files are unchanged.

    Images that fail to decode are zero-filled, marked not ``ok`` and logged as warnings. One process
    decodes a given cache at a time; another that needs it waits, then reuses it.
    """
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    key = _key(paths, pre)
    data, meta = folder / f"images-{key}.u8", folder / f"images-{key}.json"
    side = pre.resolution
    shape = (len(paths), side, side, 3)
    lock = FileLock(folder / f".images-{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another imgclf process that is decoding the same images into %s", folder)
        lock.acquire()
    try:
        if data.exists() and meta.exists():
            info = json.loads(meta.read_text(encoding="utf-8"))
            errors = {int(i): why for i, why in info.get("errors", {}).items()}
            images = np.memmap(data, np.uint8, "r", shape=shape)
            return ImageCache(images, np.array(info["ok"], dtype=bool), side, errors)
        tmp = data.with_name(f".{data.name}.tmp")
        try:
            _allocate(tmp, int(np.prod(shape)))
            return _decode_into(tmp, data, meta, paths, shape, pre, workers, max_pixels, progress)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        lock.release()


def _allocate(path: Path, size: int) -> None:
    """Create ``path`` with ``size`` bytes of disk reserved: writing into a memory map of a file the disk
    cannot hold kills the process (SIGBUS) instead of raising an error."""
    with open(path, "wb") as f:
        try:
            if hasattr(os, "posix_fallocate"):  # not on macOS or Windows: the free-space check below instead
                os.posix_fallocate(f.fileno(), 0, size)
                return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # those: the file system cannot reserve
                raise _no_room(e.errno or errno.ENOSPC, size, path) from None
        if shutil.disk_usage(path.parent).free < size:
            raise _no_room(errno.ENOSPC, size, path)
        f.truncate(size)


def _no_room(code: int, size: int, path: Path) -> OSError:
    return OSError(code, f"{os.strerror(code)} for the {size / 1e6:.0f} MB fine-tuning image cache", str(path))


def _decode_into(
    tmp: Path,
    data: Path,
    meta: Path,
    paths: Sequence[Path],
    shape: tuple[int, ...],
    pre: Preprocess,
    workers: int,
    max_pixels: int | None,
    progress: bool,
) -> ImageCache:
    """Decode into the reserved file ``tmp``, then move it to ``data`` and write ``meta``."""
    out = np.memmap(tmp, np.uint8, "r+", shape=shape)
    ok = np.ones(len(paths), dtype=bool)
    errors: dict[int, str] = {}

    def load(path: Path) -> np.ndarray | str:
        try:
            return load_for_model(path, pre, max_pixels)
        except ImageError as e:
            return str(e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        decoded = pool.map(load, paths)
        for i, img in enumerate(
            tqdm(decoded, total=len(paths), desc="decode (once)", unit="img", disable=not progress, leave=False)
        ):
            if isinstance(img, str):
                ok[i], errors[i] = False, img
                log.warning("fine-tuning skips %s: %s", paths[i], img)
            else:
                out[i] = img
    out.flush()
    del out
    tmp.replace(data)
    atomic_write_text(meta, json.dumps({"side": pre.resolution, "n": len(paths), "ok": ok.tolist(), "errors": errors}))
    return ImageCache(np.memmap(data, np.uint8, "r", shape=shape), ok, pre.resolution, errors)
