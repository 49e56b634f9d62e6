"""Thumbnails made once and cached on disk, keyed by image content (SHA-256) and size."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from pathlib import Path

from PIL import Image

from imgclf.data.io import ImageError, open_rgb
from imgclf.features.extract import default_cache_dir
from imgclf.utils import atomic_write_bytes, file_sha256

log = logging.getLogger("imgclf")


class ThumbCache:
    """``root/<sha[:2]>/<sha>-<size>.jpg``: JPEG thumbnails whose longer side is ``size`` pixels at most."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir() / "thumbs"
        self._digests: dict[tuple[str | int, ...], str] = {}  # (path, identity and times of the file) -> sha256
        self._lock = threading.Lock()

    def digest(self, path: Path) -> str:
        """SHA-256 of the file, remembered while it is the same file (device, inode) of the same size and times.

        Size and modification time alone miss a file replaced by another copied with its times kept; the
        change time cannot be set back, and moves in and out change it.
        """
        st = path.stat()
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            known = self._digests.get(key)
        if known is None:
            known = file_sha256(path)
            with self._lock:
                self._digests[key] = known
        return known

    def _file(self, digest: str, size: int) -> Path:
        return self.root / digest[:2] / f"{digest}-{size}.jpg"

    def get(self, path: Path, size: int, max_pixels: int | None = None) -> bytes:
        """The JPEG thumbnail of ``path``, made on first use and kept (raises ImageError for undecodable images
        and those of more than ``max_pixels`` pixels; None: Pillow's limit). A cache folder that cannot be
        written costs speed only: the thumbnail is made again next time."""
        digest = self.digest(path)
        try:
            return self._file(digest, size).read_bytes()
        except OSError:
            pass
        # hashed and decoded from the same bytes: a file replaced meanwhile must not have its new picture kept
        # under its old content's digest (shown from then on for every image of that content)
        data = path.read_bytes()
        try:
            im = open_rgb(io.BytesIO(data), draft_to=size, max_pixels=max_pixels, name=str(path))
        except ImageError:
            # the reason the file tells (empty, HEIC without its plugin, a format by its extension), if it still fails
            open_rgb(path, draft_to=size, max_pixels=max_pixels).close()
            raise
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        try:
            atomic_write_bytes(self._file(hashlib.sha256(data).hexdigest(), size), buf.getvalue())
        except OSError as e:
            log.warning("thumbnail not kept in %s (%s): made again each time", self.root, e.strerror or e)
        return buf.getvalue()

    def preview(self, path: Path, size: int = 2048, max_pixels: int | None = None) -> bytes:
        """A JPEG of the whole image (upright, longer side at most ``size``) for formats browsers cannot show."""
        im = open_rgb(path, draft_to=size, max_pixels=max_pixels)
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue()
