"""Downloading a ``label<TAB>url`` list into class folders: concurrent, bounded, checked, resumable."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import httpx
from PIL import Image
from tqdm import tqdm

from imgclf.config import DataToolsConfig
from imgclf.data.dataset import split_folders, subfolders
from imgclf.data.io import (
    ImageError,
    PixelBudget,
    check_jpeg_scans,
    exif_orientation,
    has_transparency,
    list_files,
    open_image,
    to_8bit,
    upright,
)
from imgclf.datatools.dedup import REPORT_CSV, REPORT_HTML
from imgclf.datatools.fetch import FetchError, RetryPolicy, make_client, with_retries
from imgclf.datatools.journal import QUARANTINE_DIR, holding_folder
from imgclf.utils import atomic_write_bytes, atomic_write_text, make_folder, read_utf8

ORIGINALS_DIR = ".originals"
log = logging.getLogger("imgclf")
SOURCES_FILE = "sources.tsv"
FAILURES_FILE = "download_failures.tsv"
URL_LIST_FILE = "urls.tsv"  # scrape's
SOURCES_EVERY_S = 10.0  # sources.tsv is brought up to date this often during a download (a killed run keeps it)
# Files the data tools write beside the class folders: no class folder may take their names.
REPORT_FILES = (SOURCES_FILE, FAILURES_FILE, URL_LIST_FILE, REPORT_CSV, REPORT_HTML)
SOURCES_COLUMNS = ("file", "label", "url", "source_page", "licence", "creator", "title", "note")
JPEG_QUALITY = 90
MAX_NAME_BYTES = 255  # longest file or folder name of common file systems (ext4, APFS, NTFS)
SAVED_EXTENSIONS = (".jpg", ".png")  # what :func:`prepare_image` makes
# Tab and every character str.splitlines() ends a line at: none may stay inside a TSV cell.
_TSV_BREAKS = frozenset("\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
_FORMAT_EXT = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


@dataclass(frozen=True)
class UrlEntry:
    """One line of a URL list: where to put the image, where to get it, and whom to credit."""

    label: str
    url: str  # stored without surrounding whitespace: the file name is made from it
    source_page: str = ""
    licence: str = ""
    creator: str = ""
    title: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", clean_field(self.url))


LIST_COLUMNS = tuple(f.name for f in fields(UrlEntry))


@dataclass(frozen=True)
class Outcome:
    """What happened to one entry: downloaded, exists (skipped), removed (downloaded before, removed by the
    user since: not fetched again), duplicate (URL listed before), failed, or not done (the run was
    interrupted)."""

    entry: UrlEntry
    status: str
    file: str = ""  # path relative to the output folder
    reason: str = ""  # why it failed; for "exists", the other class folder the file was found in


@dataclass
class DownloadReport:
    """Every entry's outcome, in list order."""

    out: Path
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def summary(self) -> str:
        elsewhere = sum(o.status == "exists" and bool(o.reason) for o in self.outcomes)
        lines = [
            f"downloaded {self.count('downloaded')}, already present {self.count('exists')}"
            + (f" ({elsewhere} in another class)" if elsewhere else "")
            + ", "
            f"failed {self.count('failed')}, duplicate URLs skipped {self.count('duplicate')} "
            f"-> {self.out}"
        ]
        if self.count("removed"):
            lines.append(
                f"not fetched again: {self.count('removed')} image(s) {SOURCES_FILE} lists as downloaded before and "
                "removed from the folder since (by you, or with the dedup quarantine); --refetch-removed fetches them"
            )
        if self.failures:
            kinds = Counter(_reason_kind(o.reason) for o in self.failures)
            lines.append("failures: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
            lines.append(f"  details: {self.out / FAILURES_FILE}")
        if self.count("not done"):
            lines.append(
                f"interrupted: {self.count('not done')} URL(s) not done; the same command again resumes (the "
                f"images stored so far are skipped, and listed in {self.out / SOURCES_FILE})"
            )
        return "\n".join(lines)


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`download`, raised once the files stored so far are in ``sources.tsv``."""

    def __init__(self, report: DownloadReport) -> None:
        super().__init__(report.summary())
        self.report = report


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(" after ")[0]


def clean_field(value: str) -> str:
    """A value safe for one TSV cell (tabs and line breaks of any kind become spaces)."""
    text = str(value)
    return " ".join(text.split()) if any(c in _TSV_BREAKS for c in text) else text.strip()


def _tsv_lines(text: str) -> list[str]:
    """The lines of a TSV file: split at "\\n" only (a trailing "\\r" dropped), so that other line
    separators left inside a cell by older versions stay in their cell."""
    return [line.removesuffix("\r") for line in text.split("\n")]


WINDOWS_UNSAFE = '<>:"|?*'  # characters Windows refuses in a file name (":" names an NTFS stream)
WINDOWS_RESERVED = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?", re.IGNORECASE)  # devices there


def check_label(label: str, where: str) -> str:
    """A label usable as a class folder name, or ValueError naming ``where``."""
    bad = any(c in "/\\\0" or c in _TSV_BREAKS for c in label)
    if not label or label in (".", "..") or label.startswith(".") or bad:
        raise ValueError(
            f"{where}: label {label!r} cannot be a folder name "
            "(no '/', '\\', tabs, line breaks, leading '.' or empty labels); fix the label"
        )
    unsafe = any(c in WINDOWS_UNSAFE or ord(c) < 32 for c in label)
    if unsafe or label[-1] in ". " or WINDOWS_RESERVED.fullmatch(label):
        raise ValueError(
            f"{where}: label {label!r} cannot be a folder name on Windows (no {' '.join(WINDOWS_UNSAFE)} or control "
            "character, no trailing '.' or space, not CON, PRN, AUX, NUL, COM0-9 or LPT0-9): the data set could not "
            "be copied there; rename the label"
        )
    if label.casefold() in (name.casefold() for name in REPORT_FILES):
        raise ValueError(
            f"{where}: label {label!r} is the name of a file the data tools write beside the class folders "
            f"({', '.join(REPORT_FILES)}); rename the label"
        )
    if len(label.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(
            f"{where}: label {label[:40]!r}... is too long for a folder name ({len(label.encode('utf-8'))} bytes "
            f"in UTF-8, file systems allow {MAX_NAME_BYTES}); shorten it"
        )
    return label


def read_url_list(path: Path) -> list[UrlEntry]:
    """Parse ``label<TAB>url[<TAB>source page<TAB>licence<TAB>creator<TAB>title<TAB>note]`` lines.

    Blank lines and lines starting with '#' are skipped; ValueError names the file and line of every bad one.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the URL list, a text file of label<TAB>url lines")
    if not path.is_file():
        raise FileNotFoundError(f"URL list not found: {path}")
    text = read_utf8(path, "URL list")
    entries, errors = [], []
    for n, line in enumerate(_tsv_lines(text), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in line.split("\t")]
        try:
            if len(cells) < 2 or not cells[1]:
                raise ValueError(
                    f"{path}:{n}: expected label<TAB>url, got {line[:80]!r} "
                    "(columns must be separated by a tab, not spaces)"
                )
            check_label(cells[0], f"{path}:{n}")
        except ValueError as e:
            errors.append(str(e))
            continue
        entries.append(UrlEntry(*cells[: len(LIST_COLUMNS)]))
    if errors:
        more = f"\n... and {len(errors) - 10} more bad lines" if len(errors) > 10 else ""
        raise ValueError(f"{len(errors)} bad line(s), nothing downloaded:\n" + "\n".join(errors[:10]) + more)
    by_case: dict[str, set[str]] = {}
    for e in entries:
        by_case.setdefault(e.label.casefold(), set()).add(e.label)
    for alike in (sorted(labels) for labels in by_case.values() if len(labels) > 1):
        log.warning(
            "warning: %s: labels %s differ only in letter case: separate classes here, one folder on macOS and "
            "Windows (their images would be mixed); use one spelling",
            path,
            " and ".join(map(repr, alike)),
        )
    return entries


def write_url_list(path: Path, entries: Iterable[UrlEntry]) -> None:
    """Write entries in the format :func:`read_url_list` reads, with a '#' header line, atomically."""
    lines = ["# " + "\t".join(LIST_COLUMNS)]
    lines += ["\t".join(clean_field(getattr(e, c)) for c in LIST_COLUMNS) for e in entries]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")


def file_stem(url: str) -> str:
    """Stable file name stem of a URL: the first 16 hex digits of its SHA-1."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def _class_of(rel: str) -> str:
    """The class folder of a path relative to the data folder (also of one in the quarantine)."""
    return rel.removeprefix(f"{QUARANTINE_DIR}/").split("/")[0]


def _earlier_downloads(out: Path) -> dict[str, list[str]]:
    """Files named as downloads name them, in any class folder or the quarantine: name -> relative paths.

    One scan per run; a file the user moved to another class (keeping its name) is found there.
    """
    found: dict[str, list[str]] = {}
    for folder in [*subfolders(out), out / QUARANTINE_DIR]:
        for f in list_files(folder) if folder.is_dir() else []:
            if f.suffix in SAVED_EXTENSIONS:
                found.setdefault(f.name, []).append(f.relative_to(out).as_posix())
    return found


def _existing(out: Path, label: str, stem: str, earlier: dict[str, list[str]]) -> str:
    """Relative path of an earlier download of this stem, or ''; its own class first, then the quarantine
    (where dedup moved it), then other classes (the user relabelled it), alphabetically."""
    paths = [p for ext in SAVED_EXTENSIONS for p in earlier.get(f"{stem}{ext}", [])]
    ranked = sorted(paths, key=lambda p: (_class_of(p) != label, p.startswith(f"{QUARANTINE_DIR}/"), p))
    return next((p for p in ranked if (out / p).is_file()), "")


def _read_limited(response: httpx.Response, max_bytes: int, timeout_s: float) -> tuple[bytes, str]:
    """The body (stopping past ``max_bytes``, or when it has not all come within ``timeout_s``: a server
    sending a byte a second held a run for ever) and its content type."""
    too_large = FetchError(f"larger than {max_bytes / 1e6:g} MB (raise --max-download-mb to accept it)")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    deadline = time.monotonic() + timeout_s
    buf = bytearray()
    for chunk in response.iter_bytes():  # as it comes (a fixed chunk size waits for it to fill)
        buf += chunk
        if len(buf) > max_bytes:
            raise too_large
        if time.monotonic() > deadline:
            raise FetchError(
                f"not all received within {timeout_s:g} s ({len(buf):,} bytes so far; not retried): raise "
                "--timeout-s for slow servers"
            )
    return bytes(buf), response.headers.get("content-type", "").split(";")[0].strip()


# Decoded images take about 4 bytes per pixel, plus a working copy of a ninth while shrinking: at most
# 100 Mpx at once bounds the download workers of a process to about 0.5 GB of image memory.
DECODING = PixelBudget(100_000_000)


def _decode(
    data: bytes, content_type: str, max_pixels: int, draft_to: int = 0, held: ExitStack | None = None
) -> tuple[Image.Image, int, int]:
    """The decoded image and its stored size; JPEGs larger than ``draft_to`` are decoded at reduced scale.

    With ``held``, the pixels to decode are taken from :data:`DECODING` first, until ``held`` closes.
    Only the formats imgclf reads are decoded: other content (PostScript, icons) is "not an image"."""
    try:
        im = open_image(io.BytesIO(data))  # Pillow's pixel warning is off (see imgclf/__init__.py)
        w, h = im.size
        if w * h > max_pixels:
            raise FetchError(f"too many pixels ({w}x{h} > {max_pixels / 1e6:g} Mpx; raise --max-image-pixels)")
        check_jpeg_scans(im, data)
        if draft_to and im.format in ("JPEG", "MPO") and max(w, h) > draft_to:
            im.draft("RGB", (draft_to, draft_to))  # DCT scaling: less memory and time, same result
        if held is not None:
            held.enter_context(DECODING.hold(im.width * im.height))  # the size to decode, after draft()
        im.load()
    except FetchError:
        raise
    except ImageError as e:
        raise FetchError(str(e)) from e
    except Image.DecompressionBombError as e:
        raise FetchError(f"too many pixels ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise FetchError(
            f"not an image ({content_type or 'no content type'}): the URL does not point at an image file"
        ) from e
    except Exception as e:  # Pillow raises many types for broken files
        raise FetchError(f"broken image data ({type(e).__name__}: {e})") from e
    return im, w, h


def prepare_image(
    data: bytes, content_type: str, out: Path, label: str, stem: str, cfg: DataToolsConfig, max_pixels: int
) -> list[tuple[Path, bytes]]:
    """Check, orient and shrink one downloaded image: the files to write, the image's own last.

    The bytes are kept as they are for JPEG/PNG files that need neither rotation nor resizing (also where
    their EXIF block is unreadable); other images are re-encoded: PNG where they have transparency, else JPEG,
    unrotated where the EXIF block is unreadable. The image's pixels are held in :data:`DECODING` from
    decoding to encoding, which bounds the memory of concurrent downloads.
    """
    with ExitStack() as held:
        im, w, h = _decode(data, content_type, max_pixels, cfg.max_side, held)
        has_alpha = has_transparency(im)
        needs_resize = cfg.max_side > 0 and max(w, h) > cfg.max_side
        orientation = exif_orientation(im)
        if not needs_resize and orientation == 1 and im.format in ("JPEG", "PNG"):
            return [(out / label / f"{stem}{'.jpg' if im.format == 'JPEG' else '.png'}", data)]
        target = out / label / f"{stem}{'.png' if has_alpha else '.jpg'}"
        fmt = im.format
        icc = im.info.get("icc_profile")
        if orientation != 1:  # only then: exif_transpose copies an image it need not turn
            im = upright(im, str(target))
        if needs_resize:
            im.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        if has_alpha:
            im.convert("RGBA").save(buf, "PNG", icc_profile=icc)
        else:
            to_8bit(im).convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY, icc_profile=icc)
    files = []
    if cfg.keep_originals:
        original = out / ORIGINALS_DIR / label / f"{stem}{_FORMAT_EXT.get(fmt or '', '.img')}"
        if not original.exists():
            files.append((original, data))
    return [*files, (target, buf.getvalue())]


def _write_new(path: Path, data: bytes) -> None:
    """Write atomically (temporary file + rename); refuse to replace an existing file."""
    if path.exists():
        raise FetchError(f"{path} appeared meanwhile; not overwritten")
    atomic_write_bytes(path, data)


class _Run:
    """What the workers of one download share: the outcomes so far, and a stop after which none writes."""

    def __init__(self, workers: int) -> None:
        self.stop = threading.Event()
        self.outcomes: dict[str, Outcome] = {}
        self.failed = 0
        self._workers = workers
        self._writing = 0
        self._cond = threading.Condition()

    def _add(self, outcome: Outcome) -> None:
        self.outcomes[outcome.entry.url] = outcome
        self.failed += outcome.status == "failed"
        self._cond.notify_all()

    def record(self, outcome: Outcome) -> None:
        """Keep ``outcome``; dropped once stopped (the report is made)."""
        with self._cond:
            if not self.stop.is_set():
                self._add(outcome)

    def store(self, files: Sequence[tuple[Path, bytes]], outcome: Outcome) -> None:
        """Write ``files`` (new files only) and keep ``outcome``, unless stopped; :meth:`halt` waits for the
        stores under way, so that every file written is in the report."""
        with self._cond:
            if self.stop.is_set():
                return
            self._writing += 1
        written = False
        try:
            for path, data in files:
                _write_new(path, data)
            written = True
        finally:
            with self._cond:
                self._writing -= 1
                if written:
                    self._add(outcome)
                self._cond.notify_all()

    def leave(self) -> bool:
        """A worker is done; True for the last one."""
        with self._cond:
            self._workers -= 1
            self._cond.notify_all()
            return not self._workers

    def wait(self, seen: int, timeout: float) -> tuple[int, bool]:
        """Wait up to ``timeout`` s for more than ``seen`` outcomes; the number of outcomes, and whether a
        worker is left."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self.outcomes) <= seen and self._workers and (left := end - time.monotonic()) > 0:
                # woken at times, so that a Ctrl-C the system handed to a worker thread is acted on at once
                self._cond.wait(min(left, 0.2))
            return len(self.outcomes), bool(self._workers)

    def so_far(self) -> list[Outcome]:
        """The outcomes kept so far."""
        with self._cond:
            return list(self.outcomes.values())

    def halt(self) -> dict[str, Outcome]:
        """Stop: no file is written after this returns; the outcomes kept, by URL."""
        with self._cond:
            self.stop.set()
            self._cond.wait_for(lambda: not self._writing)
            return dict(self.outcomes)


def _fetch_one(
    client: httpx.Client,
    entry: UrlEntry,
    out: Path,
    cfg: DataToolsConfig,
    max_pixels: int,
    earlier: dict[str, list[str]],
    run: _Run,
    removed: dict[str, str],
) -> None:
    """Fetch, check and store one entry; its outcome goes to ``run``. ``removed``: URL -> the file it was
    stored as, for the files no longer there (not fetched again)."""
    stem = file_stem(entry.url)
    existing = _existing(out, entry.label, stem, earlier)
    if existing:
        where = _class_of(existing)
        note = f"in class {where}, listed for {entry.label}" if where != entry.label else ""
        run.record(Outcome(entry, "exists", existing, note))
        return
    if entry.url in removed:
        run.record(Outcome(entry, "removed", reason=f"{removed[entry.url]} removed since it was downloaded"))
        return
    policy = RetryPolicy(cfg.retries, cfg.backoff_s, cfg.max_backoff_s)
    max_bytes = int(cfg.max_download_mb * 1e6)
    try:
        data, content_type = with_retries(
            client, entry.url, policy, lambda r: _read_limited(r, max_bytes, cfg.timeout_s), stop=run.stop
        )
        files = prepare_image(data, content_type, out, entry.label, stem, cfg, max_pixels)
        run.store(files, Outcome(entry, "downloaded", files[-1][0].relative_to(out).as_posix()))
    except FetchError as e:
        run.record(Outcome(entry, "failed", reason=str(e)))
    except OSError as e:  # disk full, permissions: say why, and name the folder
        run.record(Outcome(entry, "failed", reason=f"cannot write: {e.strerror or e} (in {out / entry.label})"))
    except Exception as e:  # noqa: BLE001 - one odd file (e.g. malformed EXIF) must not stop a long run
        run.record(Outcome(entry, "failed", reason=f"unexpected error ({type(e).__name__}: {e})"))


def _work(
    client: httpx.Client, todo: queue.SimpleQueue[UrlEntry], fetch: Callable[[UrlEntry], None], run: _Run
) -> None:
    """One worker: ``fetch`` entries from ``todo`` until none is left or the run stops; the last one closes
    ``client``."""
    try:
        while not run.stop.is_set():
            try:
                entry = todo.get_nowait()
            except queue.Empty:
                return
            fetch(entry)
    finally:
        if run.leave():
            client.close()


def _plan(entries: Sequence[UrlEntry]) -> tuple[list[UrlEntry], dict[int, Outcome]]:
    """Entries to fetch (first occurrence of each URL, with notes on repeats) and outcomes of the repeats."""
    first: dict[str, int] = {}
    stems: dict[str, str] = {}
    notes: dict[int, list[str]] = {}
    skipped: dict[int, Outcome] = {}
    for i, e in enumerate(entries):
        stem = file_stem(e.url)
        if e.url in first:
            j = first[e.url]
            notes.setdefault(j, []).append(f"also listed for {e.label}")
            skipped[i] = Outcome(e, "duplicate", reason=f"URL listed before (for {entries[j].label})")
        elif stems.get(stem, e.url) != e.url:
            skipped[i] = Outcome(e, "failed", reason=f"file name (SHA-1 prefix) collides with {stems[stem]}")
        else:
            first[e.url], stems[stem] = i, e.url
    todo = []
    for i in first.values():
        e = entries[i]
        extra = "; ".join(dict.fromkeys(notes.get(i, [])))
        todo.append(replace(e, note="; ".join(filter(None, [e.note, extra]))) if extra else e)
    return todo, skipped


@holding_folder("out")
def download(
    entries: Sequence[UrlEntry], out: Path, cfg: DataToolsConfig, max_pixels: int = 100_000_000, progress: bool = True
) -> DownloadReport:
    """Download every entry into ``out/<label>/``; write ``sources.tsv`` and ``download_failures.tsv`` there.

    Files already present are skipped (the run resumes), never overwritten, also where they were moved to
    another class folder or quarantined; each URL is fetched once. ``sources.tsv`` is also brought up to date
    every ``SOURCES_EVERY_S`` seconds, so that the files of a killed run keep their sources. On Ctrl-C, no
    request is started or retried any more, requests under way are abandoned (the workers are daemon threads),
    the reports are written for the files stored so far and DownloadInterrupted is raised.
    """
    out = Path(out)
    make_folder(out, "data folder", "--out")
    sources = read_sources(out)
    check_class_folders(out, {e.label for e in entries})
    _warn_split_layout(out)
    todo, outcomes_by_index = _plan(entries)
    earlier = _earlier_downloads(out)
    removed = {} if cfg.refetch_removed else {r[2]: r[0] for r in sources.values() if not (out / r[0]).exists()}
    workers = min(cfg.download_workers, len(todo))
    run = _Run(workers)
    work: queue.SimpleQueue[UrlEntry] = queue.SimpleQueue()
    for e in todo:
        work.put(e)
    interrupted = False
    try:
        if workers:
            client = make_client(cfg.timeout_s, workers)
            fetch = partial(
                _fetch_one, client, out=out, cfg=cfg, max_pixels=max_pixels, earlier=earlier, run=run, removed=removed
            )
            for i in range(workers):
                args = (client, work, fetch, run)
                threading.Thread(target=_work, args=args, name=f"imgclf-download-{i}", daemon=True).start()
        bar_off = None if progress else True  # None: on where the output is a terminal
        with tqdm(total=len(todo), unit="img", desc="download", disable=bar_off) as bar:
            done = saved = 0
            last_save, working = time.monotonic(), True
            while done < len(todo) and working:
                now, working = run.wait(done, SOURCES_EVERY_S)
                bar.set_postfix(failed=run.failed, refresh=False)
                bar.update(now - done)
                done = now
                if done > saved and time.monotonic() - last_save >= SOURCES_EVERY_S:
                    _update_sources(out, sources, run.so_far())  # what a killed run stored keeps its source
                    saved, last_save = done, time.monotonic()
    except KeyboardInterrupt:
        interrupted = True
    results = run.halt()
    first_index = {e.url: i for i, e in reversed(list(enumerate(entries)))}
    for e in todo:
        outcomes_by_index[first_index[e.url]] = results.get(e.url) or Outcome(e, "not done")
    report = DownloadReport(out, [outcomes_by_index[i] for i in sorted(outcomes_by_index)])
    _update_sources(out, sources, report.outcomes)
    _write_failures(out, report.failures)
    if interrupted:
        raise DownloadInterrupted(report)
    return report


def read_sources(out: Path) -> dict[str, list[str]]:
    """The rows of ``out/sources.tsv`` by file (``SOURCES_COLUMNS`` each); ValueError, before any work, where
    the file is not one imgclf wrote (it is rewritten: another's header, columns and lines would be lost)."""
    path = out / SOURCES_FILE
    if not path.is_file():
        return {}
    lines = _tsv_lines(path.read_text(encoding="utf-8"))
    header = "\t".join(SOURCES_COLUMNS)
    if lines[0] != header:
        raise ValueError(
            f"{path} is not a list of sources that imgclf wrote (its first line is not {header!r}); imgclf keeps the "
            f"source of every image it downloads in that file: move yours away, or give another --out"
        )
    rows: dict[str, list[str]] = {}
    for line in lines[1:]:
        cells = [clean_field(c) for c in line.split("\t")]
        if cells[0]:
            rows[cells[0]] = (cells + [""] * len(SOURCES_COLUMNS))[: len(SOURCES_COLUMNS)]
    return rows


def _warn_split_layout(out: Path) -> None:
    """Warn where ``out`` is laid out by split: class folders beside ``train/`` are in no split."""
    if splits := split_folders(out):
        log.warning(
            "warning: %s is laid out by split (%s): the class folders written beside them are in no split, and "
            "train leaves them out; give --out %s to add training images",
            out,
            ", ".join(f"{s}/" for s in splits),
            out / splits[0],
        )


def check_class_folders(out: Path, labels: Iterable[str]) -> None:
    """Refuse, before any download, a file where a label's class folder belongs (every image would fail)."""
    # os.path's: a label too long for a file name is reported per URL, not raised here
    if blocked := sorted(label for label in labels if os.path.lexists(out / label) and not os.path.isdir(out / label)):
        raise NotADirectoryError(
            f"{', '.join(str(out / label) for label in blocked)}: a file where a class folder belongs; move it "
            "away (or rename the label in the list)"
        )


def _update_sources(out: Path, rows: dict[str, list[str]], outcomes: Sequence[Outcome]) -> None:
    """Merge this run's files into ``sources.tsv`` (``rows``, those of earlier runs, are kept); a new row's
    label is the class folder its file lies in."""
    for o in outcomes:
        if o.file and (o.status == "downloaded" or o.file not in rows):
            entry = replace(o.entry, label=_class_of(o.file))
            rows[o.file] = [o.file] + [clean_field(getattr(entry, c)) for c in SOURCES_COLUMNS[1:]]
    lines = ["\t".join(SOURCES_COLUMNS)] + ["\t".join(rows[k]) for k in sorted(rows)]
    atomic_write_text(out / SOURCES_FILE, "\n".join(lines) + "\n")


def _write_failures(out: Path, failures: Sequence[Outcome]) -> None:
    """This run's failures: url, label, reason (rewritten on every run)."""
    lines = ["url\tlabel\treason"]
    lines += ["\t".join(clean_field(v) for v in (o.entry.url, o.entry.label, o.reason)) for o in failures]
    atomic_write_text(out / FAILURES_FILE, "\n".join(lines) + "\n")
