"""Reversible file moves: extra copies go to ``<data>/.imgclf-quarantine/`` and every move is journaled.

The journal (``journal.jsonl``, one JSON record a line) is appended before each move, with the file's SHA-256;
:func:`undo` moves the files back. Nothing is ever deleted or overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar, cast

from imgclf.data.dataset import check_data_folder, split_folders
from imgclf.data.io import IMAGE_EXTENSIONS, list_files
from imgclf.utils import default_cache_dir, display_path, file_sha256, held

F = TypeVar("F", bound=Callable[..., Any])

QUARANTINE_DIR = ".imgclf-quarantine"
JOURNAL_FILE = "journal.jsonl"
# never through a link (one planted in the data folder would have records appended to any file it points at),
# never blocking on a FIFO planted there; bytes as they are (Windows)
_JOURNAL_FLAGS = sum(getattr(os, flag, 0) for flag in ("O_NOFOLLOW", "O_NONBLOCK", "O_CLOEXEC", "O_BINARY"))


class JournalFileError(ValueError):
    """A journal that is a link, or not a regular file: it is neither read nor written."""


@dataclass
class JournalReport:
    """Files moved (or restored), and problems that left a file where it was."""

    done: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


_held_here = threading.local()  # the folders this thread holds: a scrape's download holds its folder already


@contextlib.contextmanager
def moving_lock(root: Path) -> Iterator[None]:
    """Hold ``root`` for one ``dedup --apply`` or ``--undo``, ``download``, ``scrape`` or review-app move: a
    second one stops at once (``FolderInUse``; two dedups at once reported dozens of failed moves, journaled too;
    two scrapes lost each other's entries of urls.tsv and sources.tsv; two review apps, images). Held again by the
    thread that holds it, it holds on. The lock file lies in the imgclf cache, not in the data folder; where it
    cannot be made or opened there, unguarded."""
    real = os.path.realpath(root)
    holding: frozenset[str] = getattr(_held_here, "roots", frozenset())
    folder = default_cache_dir() / "locks"
    unguarded = real in holding
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        unguarded = True
    if unguarded:
        yield
        return
    key = hashlib.sha256(real.encode()).hexdigest()[:16]
    busy = (
        f"another imgclf dedup --apply or --undo, download, scrape or review app is changing {root}: wait for it to end"
    )
    with held(folder / f"dedup-{key}.lock", busy, optional=True):
        _held_here.roots = holding | {real}
        try:
            yield
        finally:
            _held_here.roots = holding


def holding_folder(param: str) -> Callable[[F], F]:
    """Decorator: the function runs holding its argument ``param``, a data folder, with :func:`moving_lock`
    (called from Python as from the command line)."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def held_call(*args: Any, **kwargs: Any) -> Any:
            with moving_lock(Path(signature.bind(*args, **kwargs).arguments[param])):
                return fn(*args, **kwargs)

        return cast(F, held_call)

    return wrap


def journal_path(root: Path) -> Path:
    """The journal of ``root``'s quarantine; JournalFileError if the quarantine folder is a link (images would
    be moved, and the journal written, wherever it leads)."""
    folder = Path(root) / QUARANTINE_DIR
    if os.path.islink(folder):
        raise JournalFileError(
            f"{folder} is a symbolic link: imgclf neither moves images nor writes its journal through it; remove "
            "the link (or put the real folder in its place)"
        )
    return folder / JOURNAL_FILE


def _open_journal(path: Path, flags: int) -> int:
    """A descriptor of the journal ``path`` opened with ``flags``; JournalFileError if it is a link or not a
    regular file."""
    refused = JournalFileError(
        f"{path} is a symbolic link or not a regular file: imgclf neither reads nor writes its journal through "
        "it; remove it (or put the real journal file in its place)"
    )
    if os.path.islink(path):
        raise refused
    fd = os.open(path, flags | _JOURNAL_FLAGS, 0o644)  # O_NOFOLLOW: nor through a link planted since
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refused
    return fd


def read_journal(path: Path) -> str:
    """The text of the journal ``path``; JournalFileError if it is a link or not a regular file."""
    with open(_open_journal(path, os.O_RDONLY), encoding="utf-8") as f:
        return f.read()


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line and sync it to disk; a line torn by a crash is ended first, so
    that it does not swallow this record too. JournalFileError if ``path`` is a link or not a regular file."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with open(_open_journal(path, os.O_RDWR | os.O_APPEND | os.O_CREAT), "a+b") as f:
        if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    append_record(path, {"time": datetime.now(UTC).isoformat(timespec="seconds"), **record})


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file under two names: a move cut short between its two steps (link,
    then unlink) left it so. Never one name reached by two paths (through a folder link): unlinking one of
    those would remove the only copy."""
    entries = {os.path.join(os.path.realpath(p.parent), p.name) for p in (a, b)}
    try:
        return len(entries) == 2 and os.path.samefile(a, b)
    except OSError:
        return False


def move_no_overwrite(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError if ``dst`` exists (atomic check where hard links work). A move
    cut short earlier (the file under both names) is finished."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        names = os.stat(src).st_nlink
        os.link(src, dst)  # fails if dst exists
    except FileExistsError:
        if same_file(src, dst):
            with contextlib.suppress(FileNotFoundError):  # the other process finished it meanwhile
                os.unlink(src)
            return
        raise FileExistsError(f"{dst} exists") from None
    except OSError:  # file system without hard links
        if dst.exists():
            raise FileExistsError(f"{dst} exists") from None
        os.rename(src, dst)
        return
    try:
        os.unlink(src)
    except FileNotFoundError:  # another process moved the file meanwhile: to this dst (it found the file under
        if os.stat(dst).st_nlink > names:  # both names and finished the move: dst, its last name, is kept), or
            os.unlink(dst)  # to a name of its own: this one is taken back, the file is there
            raise FileNotFoundError(errno.ENOENT, "moved meanwhile by another process", str(src)) from None
        return
    except OSError:  # the source folder cannot be changed: take the new link back, the file stays where it was
        os.unlink(dst)
        raise


@holding_folder("root")
def quarantine(root: Path, moves: Sequence[tuple[str, str]]) -> JournalReport:
    """Move each ``(path, kept)`` (paths relative to ``root``) to the quarantine, journaling it first.

    A path whose real file lies outside ``root`` (through a link) stays, and so does one whose real file
    another listed path leads to: moving it would break a link, or move the kept image.
    """
    root = Path(root)
    inside = Path(os.path.realpath(root))
    journal = journal_path(root)
    report = JournalReport()
    real = {rel: os.path.realpath(root / rel) for move in moves for rel in move}
    by_real: dict[str, list[str]] = {}
    for rel, path in real.items():
        by_real.setdefault(path, []).append(rel)

    def reason_to_leave(rel: str, kept: str, dst: Path) -> str:
        others = [other for other in by_real[real[rel]] if other != rel]
        if dst.exists() and not same_file(root / rel, dst):
            return (
                f"{dst} exists (an earlier --apply put a copy of that name there): compare the two, then delete "
                "one of them or move the quarantined one elsewhere, and run again"
            )
        if real[rel] == real[kept]:
            return f"it is {kept} itself, reached through a link"
        if not Path(real[rel]).is_relative_to(inside):
            return (
                f"it leads outside the data folder through a link (to {real[rel]}); remove that copy yourself "
                "if you want"
            )
        if others:
            return (
                f"it is the same file as {', '.join(others)} (through a link), and moving it would break the link; "
                "remove the copies you do not want yourself"
            )
        return ""

    for rel, kept in moves:
        src, dst = root / rel, root / QUARANTINE_DIR / rel
        why = reason_to_leave(rel, kept, dst)
        if why:
            report.problems.append(f"{src}: not moved, {why}")
            continue
        try:
            digest = file_sha256(src)
            _append(
                journal,
                {"op": "move", "path": rel, "quarantined": f"{QUARANTINE_DIR}/{rel}", "sha256": digest, "kept": kept},
            )
            move_no_overwrite(src, dst)
        except OSError as e:
            report.problems.append(f"{src}: not moved ({e})")
            continue
        report.done.append(rel)
    return report


def _unsafe(root: Path, rec: dict[str, Any]) -> str:
    """Why a move record's paths are not those dedup writes (``path`` in the data folder, ``quarantined`` the
    same path in the quarantine), or ''. A journal edited by hand or brought with a data set must not move files
    into or out of the data folder (``../thesis.docx``, ``/home/me/notes.txt``)."""
    rel = rec.get("path")
    if not isinstance(rel, str) or rec.get("quarantined") != f"{QUARANTINE_DIR}/{rel}":
        return f"its quarantined path is not {QUARANTINE_DIR}/ and its path"
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or ".." in {*parts, *Path(rel).parts}:
        return f"{rel!r} is not a path inside the data folder"
    if parts[0] == QUARANTINE_DIR or "\x00" in rel:
        return f"{rel!r} is not a path inside the data folder"
    inside = root.resolve()
    for f in (root / rel, root / QUARANTINE_DIR / rel):
        if not f.parent.resolve().is_relative_to(inside):
            return f"{display_path(f)} leads outside the data folder through a link"
    return ""


def emptied_classes(root: Path, moved: Sequence[str]) -> list[Path]:
    """The class folders that the moves ``moved`` (paths relative to ``root``) left without an image."""
    splits = split_folders(root)

    def class_folder(rel: str) -> Path:  # train/ants/x.jpg -> train/ants, ants/x.jpg -> ants
        parts = rel.split("/")
        return root.joinpath(*parts[: 2 if splits and parts[0] in splits and len(parts) > 2 else 1])

    folders = {class_folder(rel) for rel in moved}
    return sorted(f for f in folders if not any(x.suffix.lower() in IMAGE_EXTENSIONS for x in list_files(f)))


def _active_moves(root: Path, journal: Path, problems: list[str]) -> list[dict[str, Any]]:
    """Move records not yet undone, oldest first; records that would move files elsewhere are skipped (named
    in ``problems``)."""
    active: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(read_journal(journal).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key = rec["quarantined"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{journal}:{n}: unreadable record skipped")
            continue
        if rec.get("op") == "move":
            if why := _unsafe(root, rec):
                problems.append(f"{journal}:{n}: record skipped, nothing moved: {why}")
                continue
            active[key] = rec
        elif rec.get("op") == "restore":
            active.pop(key, None)
    return list(active.values())


@holding_folder("root")
def undo(root: Path) -> JournalReport:
    """Move every quarantined file back; one whose original place is taken stays (reported as a problem)."""
    root = check_data_folder(Path(root))
    journal = journal_path(root)
    report = JournalReport()
    if not journal.is_file():
        report.problems.append(f"no journal at {journal}: nothing to undo")
        return report
    for rec in reversed(_active_moves(root, journal, report.problems)):
        src, back = root / rec["quarantined"], root / rec["path"]
        if not src.exists():
            if back.exists():  # moved back by hand, or a move that never happened
                _append(journal, {"op": "restore", "path": rec["path"], "quarantined": rec["quarantined"]})
            else:
                report.problems.append(f"{src}: missing, and nothing at {back} either")
            continue
        if back.exists() and not same_file(src, back):
            report.problems.append(f"{back} exists: not overwritten; the quarantined copy stays at {src}")
            continue
        digest = file_sha256(src)
        if digest != rec.get("sha256"):
            report.problems.append(f"{src}: content changed since it was quarantined (restored anyway)")
        try:
            move_no_overwrite(src, back)
        except OSError as e:
            report.problems.append(f"{src}: not restored ({e})")
            continue
        _append(journal, {"op": "restore", "path": rec["path"], "quarantined": rec["quarantined"], "sha256": digest})
        report.done.append(rec["path"])
    _remove_empty_dirs(root / QUARANTINE_DIR)
    return report


def _remove_empty_dirs(top: Path) -> None:
    """Remove empty folders below ``top`` (folders only; never a file)."""
    for dirpath, _, _ in sorted(os.walk(top), key=lambda t: -len(t[0])):
        if Path(dirpath) != top:
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)  # fails (and is skipped) unless the folder is empty
