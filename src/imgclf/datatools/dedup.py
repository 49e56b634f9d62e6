"""Duplicate and near-duplicate images by difference hash (dhash), and train/test leaks.

Images whose dhashes are equal (``max_distance`` 0) or differ in at most ``max_distance`` bits form a group
(connected components, so a chain A~B~C is one group). In each group the largest image is kept (ties: the
lexicographically first path). An image whose brightness never rises from left to right (one colour, but
also horizontal stripes) has an all-zero dhash: it is a duplicate only of such images whose mean colours
differ by at most ``FLAT_TOLERANCE`` levels per channel and whose vertical dhashes (top to bottom) are as
close as ``max_distance`` asks, so that one grey image and grey-mean horizontal stripes stay apart.
Hashes are cached per file in ``$IMGCLF_CACHE/dhash`` (default ``~/.cache/imgclf/dhash``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import shlex
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import ImageStat
from tqdm import tqdm

from imgclf.data.dataset import (
    UNLABELED_DIR,
    broken_class_link,
    broken_class_links,
    check_data_folder,
    label_of,
    split_folders,
    subfolders,
)
from imgclf.data.io import (
    DECODE_VERSION,
    IMAGE_EXTENSIONS,
    ImageError,
    _unreadable,
    exif_orientation,
    list_files,
    open_image,
    open_rgb,
    unreadable_reason,
)
from imgclf.utils import atomic_write_text, cpu_count, default_cache_dir, display_path, is_utf8

log = logging.getLogger(__name__)

REPORT_CSV = "dedup_report.csv"
REPORT_HTML = "dedup_report.html"
DEFAULT_MAX_PIXELS = 100_000_000
THUMB_SIDE = 128
_BLOCK = 128  # rows per block of the pairwise distance computation
FLAT_TOLERANCE = 4  # flat images whose mean colours differ by at most this (of 255) per channel are duplicates
_CACHE_TABLE = "dhash_v3"  # v3: flat images' mean colour and vertical dhash; older tables are not read
_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount_lut(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element by table lookup (for numpy < 2.0, which lacks ``np.bitwise_count``)."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return _POP8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


popcount = getattr(np, "bitwise_count", popcount_lut)


@dataclass(frozen=True)
class HashInfo:
    """An image's dhash (packed bits), its upright size in pixels and, for a flat image (all-zero dhash),
    its mean RGB colour (3 bytes) and vertical dhash (packed bits); both empty for other images."""

    bits: bytes
    width: int
    height: int
    colour: bytes = b""
    vertical: bytes = b""


@dataclass(frozen=True)
class Member:
    """One image of a duplicate group."""

    path: str  # relative to the data root, POSIX
    kept: bool
    distance: int  # Hamming distance to the kept image's hash (flat images: their vertical hashes)
    width: int
    height: int


@dataclass
class DedupResult:
    """Duplicate groups (kept image first), images that could not be hashed and folders that could not be
    listed (with why), and how many images were hashed."""

    root: Path
    groups: list[list[Member]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_images: int = 0

    @property
    def extras(self) -> list[tuple[str, str]]:
        """(extra copy, kept image) for every image that is not kept."""
        return [(m.path, g[0].path) for g in self.groups for m in g[1:]]

    @property
    def across_classes(self) -> list[list[Member]]:
        """The groups whose images lie in more than one class folder (``unlabeled/`` aside): a wrong label, or
        pictures that colour alone tells apart; the kept image decides which class keeps the picture."""
        splits = split_folders(self.root)  # train/ants/x.jpg: the class is ants, where the layout is by split
        return [g for g in self.groups if len({label_of(m.path, splits) for m in g} - {UNLABELED_DIR}) > 1]


class HashCache:
    """dhashes keyed by (hash size, decoder version, size, mtime, ctime, inode, absolute path) in a small SQLite file; no-op if
    unusable."""

    def __init__(self, path: Path | None = None) -> None:
        path = path or default_cache_dir() / "dhash" / "dhash.sqlite"
        self._db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30)
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {_CACHE_TABLE} (key TEXT PRIMARY KEY, bits BLOB, w INT, h INT, colour BLOB, vertical BLOB)"
            )
        except (OSError, sqlite3.Error) as e:
            log.warning("dhash cache %s unusable (%s); hashing without a cache", path, e)
            self._db = None

    @staticmethod
    def key(path: Path, hash_size: int) -> str:
        st = path.stat()
        # the change time and inode too: a file rewritten at its size with its mtime put back (rsync -t, exiftool -P)
        return (
            f"{hash_size}|{DECODE_VERSION}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{path.resolve()}"
        )

    def get(self, keys: Sequence[str]) -> dict[str, HashInfo]:
        found: dict[str, HashInfo] = {}
        if self._db is None:
            return found
        try:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT * FROM {_CACHE_TABLE} WHERE key IN ({marks})", chunk)
                found.update({k: HashInfo(bytes(b), w, h, bytes(c), bytes(v)) for k, b, w, h, c, v in rows})
        except sqlite3.Error as e:
            log.warning("dhash cache unreadable (%s); hashing again", e)
        return found

    def put(self, items: dict[str, HashInfo]) -> None:
        if self._db is None or not items:
            return
        try:
            with self._db:
                self._db.executemany(
                    f"INSERT OR REPLACE INTO {_CACHE_TABLE} VALUES (?, ?, ?, ?, ?, ?)",
                    [(k, v.bits, v.width, v.height, v.colour, v.vertical) for k, v in items.items()],
                )
        except sqlite3.Error as e:
            log.warning("dhash cache not updated (%s)", e)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def compute_hash(path: Path, hash_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS) -> HashInfo:
    """dhash of the upright image (EXIF orientation applied), and the mean colour and vertical dhash of a flat
    one; raises ImageError for unusable files."""
    # JPEG draft decoding (to >= 8 x hash_size pixels) is ~3x faster and as good for hashing
    im = open_rgb(path, draft_to=8 * hash_size, max_pixels=max_pixels)
    bits = imagehash.dhash(im, hash_size).hash
    colour = vertical = b""
    if not bits.any():
        colour = bytes(round(c) for c in ImageStat.Stat(im).mean)
        vertical = np.packbits(imagehash.dhash_vertical(im, hash_size).hash.ravel()).tobytes()
    try:
        with open_image(path) as stored:  # a JPEG's size before draft decoding; other images decode whole
            w, h = stored.size if stored.format == "JPEG" else im.size  # (Pillow turns a TIFF as it opens it)
            if stored.format == "JPEG" and exif_orientation(stored) in (5, 6, 7, 8):
                w, h = h, w
    except Exception as e:  # Pillow raises many types for broken files
        raise _unreadable(path, e) from e
    return HashInfo(np.packbits(bits.ravel()).tobytes(), w, h, colour, vertical)


def hash_images(
    paths: Sequence[Path],
    hash_size: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = False,
    cache_dir: Path | None = None,
) -> tuple[dict[Path, HashInfo], dict[Path, str]]:
    """Hashes of ``paths`` (cached in ``cache_dir``, default imgclf's cache folder), and the reason for each
    file that could not be hashed."""
    cache = HashCache(cache_dir / "dhash" / "dhash.sqlite" if cache_dir is not None else None)
    try:
        keys = {}
        skipped: dict[Path, str] = {}
        for p in paths:
            try:
                keys[p] = HashCache.key(p, hash_size)
            except OSError as e:
                skipped[p] = unreadable_reason(p, e)
        known = cache.get(list(keys.values()))
        hashes = {p: known[k] for p, k in keys.items() if k in known}
        todo = [p for p in keys if p not in hashes]

        def one(p: Path) -> HashInfo | str:
            try:
                return compute_hash(p, hash_size, max_pixels)
            except (ImageError, OSError) as e:
                return str(e)

        new: dict[str, HashInfo] = {}
        with (
            ThreadPoolExecutor(max_workers=min(4, cpu_count())) as pool,
            tqdm(total=len(todo), unit="img", desc="hash", disable=None if progress else True) as bar,
        ):
            for p, result in zip(todo, pool.map(one, todo), strict=True):
                bar.update()
                if isinstance(result, str):
                    skipped[p] = result
                else:
                    hashes[p] = new[keys[p]] = result
                if len(new) >= 1000:
                    cache.put(new)
                    new = {}
        cache.put(new)
    finally:
        cache.close()
    return hashes, skipped


def _words(bits: Sequence[bytes]) -> np.ndarray:
    """Packed hashes as an (n, k) uint64 matrix (zero-padded to whole words)."""
    if not bits:
        return np.zeros((0, 1), dtype=np.uint64)
    width = -(-len(bits[0]) // 8) * 8
    buf = np.frombuffer(b"".join(b.ljust(width, b"\0") for b in bits), dtype=np.uint8)
    return buf.view(np.uint64).reshape(len(bits), width // 8)


def _hamming(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bits that differ between each packed hash of ``rows`` and each of ``cols``."""
    dist = np.zeros((len(rows), len(cols)), dtype=np.uint16)
    for w in range(rows.shape[1]):
        dist += popcount(rows[:, w, None] ^ cols[None, :, w])
    return dist


def _colour_gap(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Largest per-channel difference between each colour of ``rows`` and each of ``cols``."""
    return np.abs(rows[:, None, :] - cols[None, :, :]).max(axis=2)


def close_pairs(
    a: np.ndarray,
    b: np.ndarray,
    max_distance: int,
    upper: bool = False,
    distance: Callable[[np.ndarray, np.ndarray], np.ndarray] = _hamming,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks of (i, j, distance) with distance(a[i], b[j]) <= max_distance (by default the Hamming distance of
    packed hashes); ``upper``: only j > i."""
    for start in range(0, len(a), _BLOCK):
        rows = a[start : start + _BLOCK]
        col0 = start + 1 if upper else 0
        dist = distance(rows, b[col0:])
        if upper:  # keep j > i only
            dist[np.tril_indices(len(rows), k=-1, m=dist.shape[1])] = max_distance + 1
        i, j = np.nonzero(dist <= max_distance)
        yield i + start, j + col0, dist[i, j]


def _split(infos: Sequence[HashInfo]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices and packed hashes of the images with a gradient; indices, mean colours and packed vertical
    hashes of the flat ones."""
    words = _words([h.bits for h in infos])
    flat = ~words.any(axis=1)
    hashed, plain = np.flatnonzero(~flat), np.flatnonzero(flat)
    colours = np.array([list(infos[i].colour) for i in plain], dtype=np.int16).reshape(len(plain), 3)
    return hashed, words[hashed], plain, colours, _words([infos[i].vertical for i in plain])


def _matches(
    a: Sequence[HashInfo], b: Sequence[HashInfo], max_distance: int, upper: bool = False
) -> Iterator[tuple[int, int, int]]:
    """(i, j, distance) for images of ``a`` and ``b`` whose hashes differ in at most ``max_distance`` bits, flat
    images only with flat ones of about their mean colour and as close a vertical hash (``upper``, with ``a``
    as ``b``: at least the pairs j > i). Equal hashes (distance 0) are looked up, not compared pair by pair, so the default check stays fast
    on large data sets."""
    (ia, wa, fa, ca, va), (ib, wb, fb, cb, vb) = _split(a), _split(b)
    if max_distance == 0:
        index: dict[bytes, list[int]] = {}
        for j, row in zip(ib.tolist(), wb, strict=True):
            index.setdefault(row.tobytes(), []).append(j)
        for i, row in zip(ia.tolist(), wa, strict=True):
            yield from ((i, j, 0) for j in index.get(row.tobytes(), ()))
    else:
        for ii, jj, dd in close_pairs(wa, wb, max_distance, upper):
            yield from zip(ia[ii].tolist(), ib[jj].tolist(), dd.tolist(), strict=True)
    for ii, jj, _ in close_pairs(ca, cb, FLAT_TOLERANCE, upper, _colour_gap):
        dist = popcount(va[ii] ^ vb[jj]).sum(axis=1)
        near = dist <= max_distance
        yield from zip(fa[ii[near]].tolist(), fb[jj[near]].tolist(), dist[near].tolist(), strict=True)


def _groups(infos: Sequence[HashInfo], max_distance: int) -> list[list[int]]:
    """Connected components (size >= 2) of the graph of :func:`_matches`, by union-find over the distinct
    hashes (and flat images' colours and vertical hashes), so that many equal hashes cost no pairs."""
    same: dict[bytes, list[int]] = {}
    for i, h in enumerate(infos):
        same.setdefault(h.bits + h.colour + h.vertical, []).append(i)
    buckets = list(same.values())
    parent = np.arange(len(buckets))

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    # at distance 0 distinct hashes never meet: only flat images (of close colours) can join other buckets
    candidates = [k for k, g in enumerate(buckets) if max_distance or not any(infos[g[0]].bits)]
    firsts = [infos[buckets[k][0]] for k in candidates]
    for i, j, _ in _matches(firsts, firsts, max_distance, upper=True):
        ri, rj = find(candidates[i]), find(candidates[j])
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = {}
    for k, g in enumerate(buckets):
        members.setdefault(find(k), []).extend(g)
    return [g for g in members.values() if len(g) > 1]


def group_duplicates(names: Sequence[str], infos: Sequence[HashInfo], max_distance: int = 0) -> list[list[Member]]:
    """Duplicate groups, kept image first (a labelled one over ``unlabeled/``, largest, then first name);
    groups sorted by kept name."""
    words = _words([h.vertical or h.bits for h in infos])  # flat images (grouped only together): vertical hashes
    out = []
    for g in _groups(infos, max_distance):
        order = sorted(
            g,
            key=lambda i: (names[i].split("/")[0] == UNLABELED_DIR, -infos[i].width * infos[i].height, names[i]),
        )
        keep = order[0]
        dists = popcount(words[order] ^ words[keep]).sum(axis=1)
        out.append(
            [
                Member(names[i], i == keep, int(d), infos[i].width, infos[i].height)
                for i, d in zip(order, dists, strict=True)
            ]
        )
    return sorted(out, key=lambda g: g[0].path)


def find_images(root: Path, unreadable: list[tuple[Path, str]] | None = None) -> list[str]:
    """Image files inside class folders (any depth, hidden and system names excluded): sorted POSIX relative paths.

    Files beside the class folders are in no class and not listed. ``unreadable`` receives the folders that
    could not be listed and the broken links where class folders belong, with why.
    """
    root = Path(root)
    if unreadable is not None:  # a class folder on a drive not mounted: its images are not compared
        unreadable += [(link, broken_class_link(link)) for link in broken_class_links(root)]
    return sorted(
        f.relative_to(root).as_posix()
        for d in subfolders(root)
        for f in list_files(d, unreadable=unreadable)
        if f.suffix.lower() in IMAGE_EXTENSIONS
    )


def find_duplicates(
    root: Path,
    hash_size: int = 16,
    max_distance: int = 0,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DedupResult:
    """Hash every image under ``root``'s class folders and group the duplicates; the images that could not be
    hashed and the folders that could not be listed are the skipped ones."""
    root = check_data_folder(Path(root))
    unreadable: list[tuple[Path, str]] = []
    rels = find_images(root, unreadable)
    unnamed = [(display_path(r), "name is not valid UTF-8 text: rename it") for r in rels if not is_utf8(r)]
    unlisted = [(display_path(p.relative_to(root).as_posix()), why) for p, why in unreadable]
    rels = [r for r in rels if is_utf8(r)]
    hashes, skipped = hash_images([root / r for r in rels], hash_size, max_pixels, progress)
    ok = [r for r in rels if root / r in hashes]
    groups = group_duplicates(ok, [hashes[root / r] for r in ok], max_distance)
    skipped_rel = sorted([(p.relative_to(root).as_posix(), why) for p, why in skipped.items()] + unnamed + unlisted)
    return DedupResult(root, groups, skipped_rel, len(ok))


def _hashes(paths: Sequence[str | Path], hash_size: int) -> dict[Path, HashInfo]:
    return hash_images(list(dict.fromkeys(Path(p) for p in paths)), hash_size)[0]


def find_leaks(
    train_paths: Sequence[str | Path],
    test_paths: Sequence[str | Path],
    hash_size: int = 16,
    max_distance: int = 0,
    hashes: dict[Path, HashInfo] | None = None,
) -> list[tuple[str, str, int]]:
    """(train path, test path, distance) for every near-duplicate pair straddling train and test.

    Images that cannot be hashed are ignored. Pairs are sorted by test path, then train path. ``hashes``:
    already computed ones (:func:`hash_images`), else they are computed here.
    """
    if hashes is None:
        hashes = _hashes([*train_paths, *test_paths], hash_size)
    train = [str(p) for p in train_paths if Path(p) in hashes]
    test = [str(p) for p in test_paths if Path(p) in hashes]
    if not train or not test:
        return []
    a, b = [hashes[Path(p)] for p in test], [hashes[Path(p)] for p in train]
    pairs = [(train[j], test[i], d) for i, j, d in _matches(a, b, max_distance)]
    return sorted(pairs, key=lambda t: (t[1], t[0]))


def find_label_conflicts(
    paths: Sequence[str | Path],
    labels: Sequence[str],
    hash_size: int = 16,
    max_distance: int = 0,
    hashes: dict[Path, HashInfo] | None = None,
) -> list[tuple[str, str, int]]:
    """(path, path, distance) for near-duplicate images filed under different labels: at least one of the
    two labels is wrong. Images that cannot be hashed are ignored; pairs are sorted by path. ``hashes``: as
    for :func:`find_leaks`."""
    if hashes is None:
        hashes = _hashes(paths, hash_size)
    kept = [(str(p), label) for p, label in zip(paths, labels, strict=True) if Path(p) in hashes]
    if len(kept) < 2:
        return []
    infos = [hashes[Path(p)] for p, _ in kept]
    pairs = []
    for i, j, d in _matches(infos, infos, max_distance, upper=True):
        (path_a, label_a), (path_b, label_b) = kept[i], kept[j]
        if i < j and label_a != label_b:
            pairs.append((min(path_a, path_b), max(path_a, path_b), d))
    return sorted(pairs)


def write_reports(result: DedupResult, folder: Path | None = None) -> tuple[Path, Path]:
    """Write ``dedup_report.csv`` (group, path, kept, distance, width, height) and ``dedup_report.html``
    into ``folder`` (default: the data folder)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "path", "kept", "distance", "width", "height"])
    for n, g in enumerate(result.groups, 1):
        for m in g:
            w.writerow([n, m.path, "yes" if m.kept else "no", m.distance, m.width, m.height])
    folder = Path(folder) if folder is not None else result.root
    csv_path, html_path = folder / REPORT_CSV, folder / REPORT_HTML
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(html_path, _html(result))
    return csv_path, html_path


def _thumbnail(path: Path) -> str:
    """A small JPEG of the image as a data: URI ('' if it cannot be read)."""
    try:
        im = open_rgb(path, draft_to=THUMB_SIDE)
    except Exception:  # noqa: BLE001 - a thumbnail is best-effort
        return ""
    im.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _html(result: DedupResult) -> str:
    n_extra = len(result.extras)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>imgclf dedup report</title><style>",
        "body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;padding:4px;"
        "border:3px solid #ccc;vertical-align:top;width:140px;font-size:11px;word-break:break-all}"
        "figure.kept{border-color:#2a2}img{max-width:128px;max-height:128px;display:block}"
        "section{border-bottom:1px solid #ddd;padding:6px 0}</style></head><body>",
        f"<h1>Duplicates in {html.escape(str(result.root))}</h1>",
        f"<p>{result.n_images} images, {len(result.groups)} groups, {n_extra} extra copies "
        f"(green: kept; the others go to .imgclf-quarantine/ with <code>imgclf dedup "
        f"{html.escape(shlex.quote(str(result.root)))} --apply</code>).</p>",
    ]
    for n, g in enumerate(result.groups, 1):
        parts.append(f"<section><h3>group {n}</h3>")
        for m in g:
            src = _thumbnail(result.root / m.path)
            label = "kept" if m.kept else f"duplicate, distance {m.distance}"
            img = f"<img src='{src}' alt=''>" if src else ""
            parts.append(
                f"<figure class='{'kept' if m.kept else 'extra'}'>{img}<figcaption>"
                f"{html.escape(m.path)}<br>{m.width}x{m.height}, {label}</figcaption></figure>"
            )
        parts.append("</section>")
    if result.skipped:
        parts.append("<h2>Not hashed</h2><ul>")
        parts += [f"<li>{html.escape(p)}: {html.escape(why)}</li>" for p, why in result.skipped]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
