"""Downloading a ``label<TAB>url`` list into class folders: concurrent, bounded, checked, resumable."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import httpx
from PIL import Image
from tqdm import tqdm

from imgclf.config import DataToolsConfig
from imgclf.data.dataset import subfolders
from imgclf.data.io import exif_orientation, list_files, open_image, to_8bit, upright
from imgclf.datatools.fetch import FetchError, RetryPolicy, make_client, with_retries
from imgclf.datatools.journal import QUARANTINE_DIR
from imgclf.utils import atomic_write_bytes, atomic_write_text, make_folder

ORIGINALS_DIR = ".originals"
SOURCES_FILE = "sources.tsv"
FAILURES_FILE = "download_failures.tsv"
SOURCES_COLUMNS = ("file", "label", "url", "source_page", "licence", "creator", "title", "note")
JPEG_QUALITY = 90
SAVED_EXTENSIONS = (".jpg", ".png")  # what :func:`save_image` writes
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
    url: str
    source_page: str = ""
    licence: str = ""
    creator: str = ""
    title: str = ""
    note: str = ""


LIST_COLUMNS = tuple(f.name for f in fields(UrlEntry))


@dataclass(frozen=True)
class Outcome:
    """What happened to one entry: downloaded, exists (skipped), duplicate (URL listed before) or failed."""

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
        if self.failures:
            kinds = Counter(_reason_kind(o.reason) for o in self.failures)
            lines.append("failures: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
            lines.append(f"  details: {self.out / FAILURES_FILE}")
        return "\n".join(lines)


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


def check_label(label: str, where: str) -> str:
    """A label usable as a class folder name, or ValueError naming ``where``."""
    bad = any(c in "/\\\0" or c in _TSV_BREAKS for c in label)
    if not label or label in (".", "..") or label.startswith(".") or bad:
        raise ValueError(
            f"{where}: label {label!r} cannot be a folder name "
            "(no '/', '\\', tabs, line breaks, leading '.' or empty labels); fix the label"
        )
    return label


def read_url_list(path: Path) -> list[UrlEntry]:
    """Parse ``label<TAB>url[<TAB>source page<TAB>licence<TAB>creator<TAB>title<TAB>note]`` lines.

    Blank lines and lines starting with '#' are skipped; ValueError names the file and line of every bad one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"URL list not found: {path}")
    entries, errors = [], []
    for n, line in enumerate(_tsv_lines(path.read_text(encoding="utf-8-sig")), 1):
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


def _read_limited(response: httpx.Response, max_bytes: int) -> tuple[bytes, str]:
    """The body (stopping past ``max_bytes``) and its content type."""
    too_large = FetchError(f"larger than {max_bytes / 1e6:g} MB (raise --max-download-mb to accept it)")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    buf = bytearray()
    for chunk in response.iter_bytes(1 << 16):
        buf += chunk
        if len(buf) > max_bytes:
            raise too_large
    return bytes(buf), response.headers.get("content-type", "").split(";")[0].strip()


def _decode(data: bytes, content_type: str, max_pixels: int, draft_to: int = 0) -> tuple[Image.Image, int, int]:
    """The decoded image and its stored size; JPEGs larger than ``draft_to`` are decoded at reduced scale.

    Only the formats imgclf reads are decoded: other content (PostScript, icons) is "not an image"."""
    try:
        im = open_image(io.BytesIO(data))  # Pillow's pixel warning is off (see imgclf/__init__.py)
        w, h = im.size
        if w * h > max_pixels:
            raise FetchError(f"too many pixels ({w}x{h} > {max_pixels / 1e6:g} Mpx; raise max_image_pixels)")
        if draft_to and im.format == "JPEG" and max(w, h) > draft_to:
            im.draft("RGB", (draft_to, draft_to))  # DCT scaling: less memory and time, same result
        im.load()
    except FetchError:
        raise
    except Image.DecompressionBombError as e:
        raise FetchError(f"too many pixels ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise FetchError(
            f"not an image ({content_type or 'no content type'}): the URL does not point at an image file"
        ) from e
    except Exception as e:  # Pillow raises many types for broken files
        raise FetchError(f"broken image data ({type(e).__name__}: {e})") from e
    return im, w, h


def save_image(
    data: bytes, content_type: str, out: Path, label: str, stem: str, cfg: DataToolsConfig, max_pixels: int
) -> str:
    """Check, orient, shrink and write one downloaded image; return its path relative to ``out``.

    The bytes are kept as they are for JPEG/PNG files that need neither rotation nor resizing (also where
    their EXIF block is unreadable); other images are re-encoded: PNG where they have transparency, else JPEG,
    unrotated where the EXIF block is unreadable. Existing files are never overwritten.
    """
    im, w, h = _decode(data, content_type, max_pixels, cfg.max_side)
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    needs_resize = cfg.max_side > 0 and max(w, h) > cfg.max_side
    keep_bytes = not needs_resize and exif_orientation(im) == 1 and im.format in ("JPEG", "PNG")
    if keep_bytes:
        target, payload = out / label / f"{stem}{'.jpg' if im.format == 'JPEG' else '.png'}", data
    else:
        target = out / label / f"{stem}{'.png' if has_alpha else '.jpg'}"
        fmt = im.format
        icc = im.info.get("icc_profile")
        im = upright(im, str(target))
        if needs_resize:
            im.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        if has_alpha:
            im.convert("RGBA").save(buf, "PNG", icc_profile=icc)
        else:
            to_8bit(im).convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY, icc_profile=icc)
        payload = buf.getvalue()
        if cfg.keep_originals:
            original = out / ORIGINALS_DIR / label / f"{stem}{_FORMAT_EXT.get(fmt or '', '.img')}"
            if not original.exists():
                _write_new(original, data)
    _write_new(target, payload)
    return target.relative_to(out).as_posix()


def _write_new(path: Path, data: bytes) -> None:
    """Write atomically (temporary file + rename); refuse to replace an existing file."""
    if path.exists():
        raise FetchError(f"{path} appeared meanwhile; not overwritten")
    atomic_write_bytes(path, data)


def _fetch_one(
    client: httpx.Client,
    entry: UrlEntry,
    out: Path,
    cfg: DataToolsConfig,
    max_pixels: int,
    earlier: dict[str, list[str]],
) -> Outcome:
    stem = file_stem(entry.url)
    existing = _existing(out, entry.label, stem, earlier)
    if existing:
        where = _class_of(existing)
        note = f"in class {where}, listed for {entry.label}" if where != entry.label else ""
        return Outcome(entry, "exists", existing, note)
    policy = RetryPolicy(cfg.retries, cfg.backoff_s, cfg.max_backoff_s)
    max_bytes = int(cfg.max_download_mb * 1e6)
    try:
        data, content_type = with_retries(client, entry.url, policy, lambda r: _read_limited(r, max_bytes))
        saved = save_image(data, content_type, out, entry.label, stem, cfg, max_pixels)
        return Outcome(entry, "downloaded", saved)
    except FetchError as e:
        return Outcome(entry, "failed", reason=str(e))
    except OSError as e:  # disk full, permissions: name the folder
        return Outcome(entry, "failed", reason=f"cannot write under {out / entry.label} ({e.strerror or e})")
    except Exception as e:  # noqa: BLE001 - one odd file (e.g. malformed EXIF) must not stop a long run
        return Outcome(entry, "failed", reason=f"unexpected error ({type(e).__name__}: {e})")


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


def download(
    entries: Sequence[UrlEntry], out: Path, cfg: DataToolsConfig, max_pixels: int = 100_000_000, progress: bool = True
) -> DownloadReport:
    """Download every entry into ``out/<label>/``; write ``sources.tsv`` and ``download_failures.tsv`` there.

    Files already present are skipped (the run resumes), never overwritten, also where they were moved to
    another class folder or quarantined; each URL is fetched once.
    """
    out = Path(out)
    make_folder(out, "data folder", "--out")
    todo, outcomes_by_index = _plan(entries)
    earlier = _earlier_downloads(out)
    results: dict[str, Outcome] = {}
    with make_client(cfg.timeout_s, cfg.download_workers) as client:
        pool = ThreadPoolExecutor(max_workers=cfg.download_workers, thread_name_prefix="imgclf-download")
        try:
            futures = [pool.submit(_fetch_one, client, e, out, cfg, max_pixels, earlier) for e in todo]
            bar_off = None if progress else True  # None: on where the output is a terminal
            failed = 0
            with tqdm(total=len(futures), unit="img", desc="download", disable=bar_off) as bar:
                for fut in as_completed(futures):
                    o = fut.result()
                    results[o.entry.url] = o
                    failed += o.status == "failed"
                    bar.update()
                    bar.set_postfix(failed=failed, refresh=False)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    first_index = {e.url: i for i, e in reversed(list(enumerate(entries)))}
    for url, o in results.items():
        outcomes_by_index[first_index[url]] = o
    report = DownloadReport(out, [outcomes_by_index[i] for i in sorted(outcomes_by_index)])
    _update_sources(out, report.outcomes)
    _write_failures(out, report.failures)
    return report


def _update_sources(out: Path, outcomes: Sequence[Outcome]) -> None:
    """Merge this run's files into ``sources.tsv`` (rows of earlier runs are kept); a new row's label is the
    class folder its file lies in."""
    path = out / SOURCES_FILE
    rows: dict[str, list[str]] = {}
    if path.is_file():
        for line in _tsv_lines(path.read_text(encoding="utf-8"))[1:]:
            cells = [clean_field(c) for c in line.split("\t")]
            if cells[0]:
                rows[cells[0]] = (cells + [""] * len(SOURCES_COLUMNS))[: len(SOURCES_COLUMNS)]
    for o in outcomes:
        if o.file and (o.status == "downloaded" or o.file not in rows):
            entry = replace(o.entry, label=_class_of(o.file))
            rows[o.file] = [o.file] + [clean_field(getattr(entry, c)) for c in SOURCES_COLUMNS[1:]]
    lines = ["\t".join(SOURCES_COLUMNS)] + ["\t".join(rows[k]) for k in sorted(rows)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _write_failures(out: Path, failures: Sequence[Outcome]) -> None:
    """This run's failures: url, label, reason (rewritten on every run)."""
    lines = ["url\tlabel\treason"]
    lines += ["\t".join(clean_field(v) for v in (o.entry.url, o.entry.label, o.reason)) for o in failures]
    atomic_write_text(out / FAILURES_FILE, "\n".join(lines) + "\n")
