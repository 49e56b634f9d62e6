"""Reading images safely: format check, EXIF orientation, fast JPEG downscaling, clear errors."""

from __future__ import annotations

import itertools
import logging
import os
import re
import stat
import threading
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# The extensions read, by the format Pillow detects (a file whose content is another format gets a note).
_FORMAT_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jfif", ".jpe"),  # .jfif: how browsers on Windows often save JPEGs
    "PNG": (".png",),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"),
    "AVIF": (".avif",),
    "HEIF": (".heic", ".heif", ".hif"),
    "PPM": (".ppm", ".pgm", ".pbm", ".pnm"),  # Netpbm, the format of some classic data sets
    "JPEG2000": (".jp2", ".j2k"),
}
IMAGE_EXTENSIONS = frozenset(ext for exts in _FORMAT_EXTENSIONS.values() for ext in exts)
HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
# Bump when decoding gives some image other pixels than before: cached features and hashes are keyed by it.
# 2: high-bit-depth one-channel images scaled to 8 bits instead of clipped; 3: only the formats listed above;
# 4: a colour key (PNG tRNS on a grey or RGB image) composited on white, as an alpha channel is; 5: MPO (a camera
# JPEG with more frames) draft-decoded as JPEG is
DECODE_VERSION = 5
# What file managers and archivers leave in folders (lower case); ignored like hidden names.
SYSTEM_NAMES = frozenset({"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini"})

try:  # HEIC/HEIF (phone photos) through the optional pillow-heif plugin: pip install "imgclf[heif]"
    from pillow_heif import register_heif_opener
except ImportError:
    HEIF_READABLE = False
else:
    register_heif_opener()
    HEIF_READABLE = True


log = logging.getLogger("imgclf")


class ImageError(Exception):
    """An image that cannot be used; the message says why and what to do."""


def is_ignored(name: str) -> bool:
    """Hidden names (a leading dot) and the metadata files and folders of file managers and archivers."""
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def list_files(
    folder: Path, walked: list[Path] | None = None, unreadable: list[tuple[Path, str]] | None = None
) -> list[Path]:
    """Files under ``folder``, sorted, without ignored names; folder links are followed, each real folder once.

    Broken links are listed too, so that callers can report them; sockets and pipes are not. ``walked``
    receives every folder listed; ``unreadable`` each folder that could not be listed, with why (without
    it, a warning says so).
    """
    out: list[Path] = []
    seen: set[str] = set()
    top = Path(os.path.realpath(folder))

    def failed(e: OSError) -> None:
        why = f"folder unreadable ({e.strerror or e}): its images are not used; check its permissions"
        if unreadable is None:
            log.warning("%s: %s", e.filename, why)
        else:
            unreadable.append((Path(e.filename), why))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=failed, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        if walked is not None:
            walked.append(Path(dirpath))
        kept = []
        for d in sorted(d for d in dirnames if not is_ignored(d)):
            target = os.path.realpath(os.path.join(dirpath, d))
            if top.is_relative_to(target):  # a link up the tree: it would walk everything above (even /)
                log.warning("not followed: %s links to %s, which holds %s", Path(dirpath, d), target, folder)
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            f = Path(dirpath, name)
            if not is_ignored(name) and _listed(f):
                out.append(f)
    return sorted(out)


def _listed(f: Path) -> bool:
    """A file, or a broken link; or one that cannot be looked at (in a folder without search permission, or
    a link into one): listed, so that its reader names it as unreadable."""
    try:
        return f.is_file() or not f.exists()
    except OSError:
        return True


def unreadable_reason(path: Path, e: OSError) -> str:
    """Why ``path`` cannot be read, for the list of skipped files."""
    if isinstance(e, FileNotFoundError) and path.is_symlink():
        return f"broken link to {os.readlink(path)} (no such file): fix or remove the link"
    return f"unreadable: {e.strerror or e}"


def _file_size(path: Path) -> int:
    """The size of an image file; raise ImageError where it cannot be read, or is no plain file (opening a named
    pipe waits, for ever, for a writer)."""
    try:
        st = path.stat()
    except OSError as e:
        raise ImageError(unreadable_reason(path, e)) from e
    if why := not_a_plain_file(path, st):
        raise ImageError(why)
    return st.st_size


def not_a_plain_file(path: Path, st: os.stat_result) -> str | None:
    """Why ``path`` (whose stat is ``st``) is not read as an image file: a named pipe (opening it waits, for
    ever, for a writer), a device or a socket; None for a plain file, or a pipe the shell hands over
    (``/dev/stdin``, ``<(...)``), which has its writer."""
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISFIFO(st.st_mode) and HANDED_OVER.fullmatch(str(path)):
        return None
    return NOT_A_PLAIN_FILE


def is_handed_over_pipe(path: Path) -> bool:
    """A pipe the shell hands over (``/dev/stdin``, ``<(...)``): its bytes can be read once only."""
    try:  # the name first: no stat for the paths of a whole data set
        return bool(HANDED_OVER.fullmatch(str(path))) and stat.S_ISFIFO(path.stat().st_mode)
    except OSError:
        return False


NOT_AN_IMAGE = "not an image (nor named as one): not used"
NOT_A_PLAIN_FILE = (
    "not a plain file (a named pipe, device or socket): not read; give an image file (or pipe one to /dev/stdin)"
)
HANDED_OVER = re.compile(r"/dev/stdin|/dev/fd/\d+|/proc/self/fd/\d+")  # the pipes a shell hands over


def _unreadable(path: Path | BinaryIO, e: Exception) -> ImageError:
    if isinstance(e, OSError) and e.errno is not None and isinstance(path, Path):  # permission denied, I/O error
        return ImageError(unreadable_reason(path, e))
    if isinstance(path, Path) and path.suffix.lower() in HEIF_EXTENSIONS and not HEIF_READABLE:
        return ImageError(
            'HEIC/HEIF image: install the plugin that reads it (pip install "imgclf[heif]") or convert it'
        )
    if isinstance(path, Path) and path.suffix.lower() not in IMAGE_EXTENSIONS:  # notes, annotations beside images
        kind = _other_format(path.suffix.lower())
        if kind is None:
            return ImageError(NOT_AN_IMAGE)
        if kind not in _FORMAT_EXTENSIONS:  # a format imgclf reads, under another name, is told below
            return ImageError(f"{kind} image, a format imgclf does not read: convert it to PNG or JPEG to use it")
    if isinstance(e, OSError) and not isinstance(e, Image.UnidentifiedImageError):  # a known format, cut short
        return ImageError(_decode_failure(e))
    return ImageError(
        f"not an image in a format imgclf reads ({type(e).__name__}; {', '.join(_FORMAT_EXTENSIONS)}): "
        "check or convert the file"
    )


_DATA_FORMATS = frozenset({"HDF5", "GRIB", "BUFR", "MPEG"})  # extensions Pillow knows: data and video, no images


def _other_format(ext: str) -> str | None:
    """The image format an extension imgclf does not read names (TGA, ICO, PSD, EPS, SVG; or one imgclf reads
    under other names, such as PNG for .apng), or None for other files."""
    Image.init()
    kind = Image.registered_extensions().get(ext) or {".svg": "SVG", ".svgz": "SVG"}.get(ext)
    if kind is None or kind in _DATA_FORMATS or (kind not in Image.OPEN and kind != "SVG"):
        return None
    return kind


def _decode_failure(e: OSError) -> str:
    """Why an image of a format imgclf reads did not decode (Pillow's OSError without an errno)."""
    if "truncated" in str(e).lower():
        return "truncated or corrupt image data: re-download or re-save the file"
    return f"cannot decode ({e}): re-download or re-save the file"


def allow_pixels(max_pixels: int | None) -> None:
    """Let Pillow open images up to ``max_pixels``: it refuses those above twice its own limit before imgclf's
    check runs. The limit is only ever raised (process-wide), never lowered."""
    if max_pixels is not None and Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2


def open_image(path: Path | BinaryIO) -> Image.Image:
    """``Image.open`` restricted to the formats imgclf reads, of those Pillow has a decoder for: content of any
    other kind (PostScript, which would run Ghostscript; icons, TGA) is refused, whatever its name."""
    Image.init()  # every plugin registered (once), so that ``Image.ID`` lists them
    return Image.open(path, formats=[f for f in _FORMAT_EXTENSIONS if f in Image.ID])


def upright(im: Image.Image, name: str) -> Image.Image:
    """``im`` turned by its EXIF orientation; as stored, with a warning, when its EXIF block is unreadable."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - a damaged EXIF block (any parser error) in an image that decodes
        log.warning(
            "%s: EXIF data unreadable (%s: %s); the image is used as stored, unrotated", name, type(e).__name__, e
        )
        return im


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 where there is none or the EXIF block is unreadable."""
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - as in upright()
        return 1


@dataclass(frozen=True)
class Preprocess:
    """Eval-time geometry of a backbone: resize the shorter side, then centre-crop a square."""

    resolution: int
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    @property
    def resize_to(self) -> int:
        return round(self.resolution / self.crop_pct)


_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# An image whose long side, once its short side is resized, exceeds this many times that side: a strip, not a photo.
_WHOLE_RESIZE_LIMIT = 32


def check_image(path: Path, max_pixels: int, max_bytes: int) -> str | None:
    """Cheap header check; raise ImageError saying what is wrong with the file.

    Returns a note for a usable image whose content does not match its extension (a PNG named .jpg).
    """
    size = _file_size(path)
    if size == 0:
        raise ImageError("empty file (0 bytes): re-download or remove it")
    if size > max_bytes:
        raise ImageError(
            f"file too large ({size / 1e6:.3g} MB > {max_bytes / 1e6:.3g} MB): downscale it or raise --max-file-mb"
        )
    allow_pixels(max_pixels)
    try:
        with open_image(path) as im:
            fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError as e:
        raise ImageError(f"oversized image ({e}): downscale it or raise --max-image-pixels") from e
    except Exception as e:
        raise _unreadable(path, e) from e
    if w * h > max_pixels:
        raise ImageError(
            f"oversized image ({w}x{h} = {w * h / 1e6:.3g} Mpx > {max_pixels / 1e6:.3g} Mpx): "
            "downscale it or raise --max-image-pixels"
        )
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ImageError(
            f"{fmt} image with extension {ext or '(none)'!r}: rename it to a known image extension to use it"
        )
    if fmt in _FORMAT_EXTENSIONS and ext not in _FORMAT_EXTENSIONS[fmt]:
        return f"{fmt} content named {ext}: used as {fmt}; rename it to {_FORMAT_EXTENSIONS[fmt][0]} to avoid confusion"
    return None


_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_BLOCK_PIXELS = 1 << 20


def to_8bit(im: Image.Image) -> Image.Image:
    """A high-bit-depth one-channel image (16-bit PNG or TIFF, 32-bit integer or float TIFF) as 8-bit "L".

    Pillow's own conversion clips such images at 255, so a 16-bit photo comes out nearly white. Integer
    images are scaled from the 16-bit range (from their own minimum and maximum when outside it); float
    images from 0..1 when they lie in it, else from their own minimum and maximum. Other modes pass as they are.
    """
    if im.mode not in _HIGH_BIT_MODES:
        return im
    w, h = im.size
    rows = max(1, _BLOCK_PIXELS // max(w, 1))  # a block of rows at a time: 8 bytes a pixel for the whole took GBs

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for top in range(0, h, rows):
            yield top, np.nan_to_num(np.asarray(im.crop((0, top, w, min(h, top + rows))), dtype=np.float64))

    lo, hi = np.inf, -np.inf
    for _, a in blocks():
        lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    if im.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    elif im.mode != "F" and lo >= 0 and hi <= 65535:
        lo, hi = 0.0, 65535.0
    out = np.empty((h, w), np.uint8)
    for top, a in blocks():
        out[top : top + len(a)] = np.clip(np.rint((a - lo) * (255.0 / max(hi - lo, 1e-12))), 0, 255)
    return Image.fromarray(out, "L")


class PixelBudget:
    """Pixels decoded at once across threads: an image waits until its pixels fit in what is free; one larger
    than the whole budget waits until it is all free, then decodes alone. Images take their pixels in the
    order they asked (a large one waited for ever behind a steady stream of small ones)."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self._free = pixels
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._next = 0  # the ticket whose turn it is

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Take ``pixels`` (at most the whole budget) from the budget until the block ends."""
        n = min(pixels, self.pixels)
        with self._cond:
            ticket = next(self._tickets)
            self._cond.wait_for(lambda: self._next == ticket and self._free >= n)
            self._free -= n
            self._next += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._free += n
                self._cond.notify_all()


def open_rgb(
    path: Path | BinaryIO,
    draft_to: int | None = None,
    max_pixels: int | None = None,
    budget: tuple[PixelBudget, ExitStack] | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode an image (a path or a binary file object, ``name`` in messages) as upright RGB.

    ``draft_to`` lets JPEG decoding downscale by 1/2..1/8 while keeping the shorter side >= draft_to.
    EXIF orientation is applied after decoding; transparent pixels are composited on white. With ``budget``
    (a budget and a stack), the pixels to decode are taken from the budget until the stack closes.
    """
    im = None
    try:  # a failed decoding lets go of its image now, not with the traceback (whose decoder holds it)
        try:
            if isinstance(path, Path) and _file_size(path) == 0:
                raise ImageError("empty file (0 bytes): re-download or remove it")
            allow_pixels(max_pixels)
            im = open_image(path)
            limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS  # None: no limit at all
            if limit is not None and im.size[0] * im.size[1] > limit:
                im.close()
                raise ImageError(
                    f"oversized image ({im.size[0]}x{im.size[1]}): downscale it or raise --max-image-pixels"
                )
            try:
                check_jpeg_scans(im, path)
            except ImageError:
                im.close()
                raise
            if draft_to is not None and im.format in ("JPEG", "MPO"):  # MPO: a JPEG with more frames
                im.draft("RGB", (draft_to, draft_to))
            if budget is not None:
                budget[1].enter_context(budget[0].hold(im.width * im.height))  # the size to decode, after draft()
            im.load()
            im = to_8bit(upright(im, name or (str(path) if isinstance(path, Path) else "image")))
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(f"oversized image ({e}): downscale it or raise --max-image-pixels") from e
        except Image.UnidentifiedImageError as e:
            raise _unreadable(path, e) from e
        except OSError as e:
            if e.errno is not None and isinstance(path, Path):
                raise _unreadable(path, e) from e
            raise ImageError(_decode_failure(e)) from e
        except Exception as e:
            raise ImageError(f"cannot decode ({type(e).__name__}: {e}): re-download or re-save the file") from e
    except BaseException as e:
        if im is not None:
            im.close()
        if e.__cause__ is not None:
            traceback.clear_frames(e.__cause__.__traceback__)
        raise
    if has_transparency(im):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB") if im.mode != "RGB" else im


MAX_JPEG_SCANS = 100  # a progressive JPEG has about 10; a 1 MB file of 10,000 repeated scans decoded for minutes


_MARKER = re.compile(rb"\xff[^\x00\xff]")  # between segments: other bytes (fill, garbage, 0xFF00) skipped
_SCAN_END = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")  # entropy-coded data ends at a marker but a restart


def jpeg_scans(data: bytes) -> int:
    """The scans (start-of-scan segments) of a JPEG file's first image, its markers walked as a decoder walks
    them, up to end-of-image: what follows it (a motion photo's video, an MPO's other frames) is not counted.
    Linear in the file's size (single-byte regular expressions, no backtracking)."""
    scans, i, pattern = 0, 2, _MARKER
    while m := pattern.search(data, i):
        code, i, pattern = data[m.start() + 1], m.end(), _MARKER
        if code == 0xD9:  # end of image
            break
        if code != 0x01 and not 0xD0 <= code <= 0xD7:  # a segment with a length (its own two bytes included)
            i += int.from_bytes(data[i : i + 2], "big")
            if code == 0xDA:
                scans, pattern = scans + 1, _SCAN_END
    return scans


def check_jpeg_scans(im: Image.Image, data: bytes | Path | BinaryIO) -> None:
    """ImageError where ``im`` (opened from ``data``) is a progressive JPEG of more than :data:`MAX_JPEG_SCANS`
    scans: each is another pass over every block of the image."""
    if im.format not in ("JPEG", "MPO") or not im.info.get("progressive"):
        return
    if isinstance(data, Path):
        data = data.read_bytes()
    elif not isinstance(data, bytes):  # a file object: read whole, its position given back
        where = data.tell()
        data.seek(0)
        content = data.read()
        data.seek(where)
        data = content
    if (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
        raise ImageError(
            f"progressive JPEG of {scans} scans (more than {MAX_JPEG_SCANS}: each is another pass over the whole "
            "image, minutes of decoding): re-save the file"
        )


def has_transparency(im: Image.Image) -> bool:
    """An alpha channel, or a transparent palette entry or colour key (PNG's tRNS on a palette, grey or RGB image;
    not on a 16-bit grey one: its scaling to 8 bits leaves the key out)."""
    return im.mode in ("RGBA", "LA", "PA") or ("transparency" in im.info and im.mode not in _HIGH_BIT_MODES)


def resize_center_crop(im: Image.Image, pre: Preprocess) -> np.ndarray:
    """Resize the shorter side to ``pre.resize_to`` and centre-crop ``pre.resolution``: HxWx3 uint8."""
    w, h = im.size
    scale = pre.resize_to / min(w, h)
    nw, nh = max(pre.resolution, round(w * scale)), max(pre.resolution, round(h * scale))
    left, top = (nw - pre.resolution) // 2, (nh - pre.resolution) // 2
    if max(nw, nh) > _WHOLE_RESIZE_LIMIT * pre.resize_to:
        # A thin strip (say 60000x1) would need gigabytes resized whole: resize only the crop's source box.
        # Not for ordinary shapes, whose pixels the box's rounding would move by one level here and there.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + pre.resolution) * sx, (top + pre.resolution) * sy)
        im = im.resize((pre.resolution, pre.resolution), _RESAMPLE[pre.interpolation], box=box)
    else:
        im = im.resize((nw, nh), _RESAMPLE[pre.interpolation], reducing_gap=3.0)
        im = im.crop((left, top, left + pre.resolution, top + pre.resolution))
    return np.asarray(im, dtype=np.uint8)


def load_for_model(path: Path, pre: Preprocess, max_pixels: int | None = None, name: str | None = None) -> np.ndarray:
    """Decode, orient and crop one image for a backbone: HxWx3 uint8 (``name``: the image's in messages)."""
    return resize_center_crop(open_rgb(path, draft_to=pre.resize_to, max_pixels=max_pixels, name=name), pre)
