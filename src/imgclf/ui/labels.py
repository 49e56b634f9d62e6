"""Relabelling by moving files between class folders, journaled and undoable; label-error and uncertainty scores.

Every move is appended to ``<data>/.imgclf-journal.jsonl`` (``from``, ``to``, ``sha256``) before it happens;
:meth:`RelabelJournal.undo` moves files back. Nothing is ever deleted or overwritten: a name already taken in
the target folder gets a free ``-1``, ``-2``... suffix, recorded in the journal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from imgclf.data.dataset import UNLABELED_DIR, class_name, composed, label_of, split_folders, subfolders
from imgclf.data.io import IMAGE_EXTENSIONS, list_files
from imgclf.datatools.journal import append_record, move_no_overwrite, moving_lock, read_journal, same_file
from imgclf.utils import display_path, file_sha256, is_utf8

log = logging.getLogger("imgclf")

JOURNAL_FILE = ".imgclf-journal.jsonl"
_WARNED: dict[Path, set[str]] = {}  # per data folder, the names not valid UTF-8 already warned about
# this system's path separators besides "/" (Windows: "\\"); elsewhere a backslash is a character of a name
OTHER_SEPARATORS = tuple(s for s in (os.sep, os.altsep) if s and s != "/")


class UnsafePathError(ValueError):
    """A path that is not a plain relative path inside the data folder."""


class RelabelError(ValueError):
    """A move that cannot be done; the message says why."""


class UnknownClassError(RelabelError):
    """A move into a class the data folder does not have (a bad request, not a conflict)."""


class MovedAwayError(RelabelError):
    """The image is no longer where the request saw it: another request (or someone else) moved it first."""


class StaleUndoError(RelabelError):
    """An undo of a move that is no longer the last one (undone already, or another move came after)."""


def safe_rel(root: Path, rel: str, through_links: bool = False) -> Path:
    """``root / rel`` if ``rel`` is a relative POSIX path to a visible file inside ``root``; else raise.

    ``through_links`` accepts a path that a folder link inside ``root`` leads outside it (for reading only).
    """
    parts = PurePosixPath(rel).parts
    if not rel or any(s in rel for s in (*OTHER_SEPARATORS, "\x00")) or PurePosixPath(rel).is_absolute():
        raise UnsafePathError(f"not a relative path: {rel!r}")
    if any(p in ("..", ".") or p.startswith(".") for p in parts):
        raise UnsafePathError(f"path outside the data folder or hidden: {rel!r}")
    path = root / Path(*parts)
    if not through_links and not path.resolve().is_relative_to(root.resolve()):
        raise UnsafePathError(f"path leads outside the data folder through a link: {rel!r}; move it where it lies")
    return path


def class_folders(root: Path) -> list[Path]:
    """The class folders (and ``unlabeled``): the sub-folders of ``root``, or of its split folders (``train/``,
    ``val/``, ``test/``) when the data is laid out by split."""
    splits = split_folders(root)
    if not splits:
        return subfolders(root)
    return [d for s in splits for d in subfolders(root / s)] + [d for d in subfolders(root) if d.name == UNLABELED_DIR]


def list_images(root: Path, walked: list[Path] | None = None) -> dict[str, list[str]]:
    """Image paths (relative, as on disk, sorted) per class, and ``unlabeled``; hidden and system names skipped.

    Classes are named and ordered as training names them: composed (NFC), so that a copy from macOS, which
    stores names decomposed, has the run's classes. In a data folder laid out by split, a class gathers its
    images from every split folder. ``walked`` receives every folder listed.
    """
    found: dict[str, list[str]] = {}
    unnamed: list[str] = []  # not valid UTF-8: no URL or JSON can name them
    for d in class_folders(root):
        rels = [f.relative_to(root).as_posix() for f in list_files(d, walked) if f.suffix.lower() in IMAGE_EXTENSIONS]
        unnamed += [r for r in rels if not is_utf8(r)]
        if is_utf8(d.name):
            found.setdefault(class_name(d), []).extend(r for r in rels if is_utf8(r))
    for rel in sorted(set(unnamed) - _WARNED.get(root, set())):  # once per name, not at every listing
        log.warning("not shown: %s (its name is not valid UTF-8 text; rename it)", display_path(rel))
    _WARNED.setdefault(root, set()).update(unnamed)
    return {name: sorted(found[name], key=lambda r: (composed(r), r)) for name in sorted(found)}


def class_folder(parent: Path, label: str) -> Path:
    """The folder of class ``label`` in ``parent``: ``parent / label``, unless only a folder named so in another
    Unicode form (decomposed, as macOS writes names) is there."""
    folder = parent / label
    if folder.is_dir() or not parent.is_dir():
        return folder
    return next((d for d in subfolders(parent) if class_name(d) == label), folder)


@dataclass
class UndoReport:
    """Moves undone (their records) and problems that left a file where it was."""

    undone: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class RelabelJournal:
    """Moves images between class folders of ``root``, journaling each move; undo the last or all."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.path = self.root / JOURNAL_FILE
        self._lock = threading.Lock()

    def _append(self, record: dict[str, Any]) -> None:
        append_record(self.path, record)

    def active(self) -> list[dict[str, Any]]:
        """Move records not undone yet, oldest first (unreadable lines are skipped)."""
        if not self.path.is_file():
            return []
        moves: dict[str, dict[str, Any]] = {}
        for line in read_journal(self.path).splitlines():
            try:
                rec = json.loads(line)
                if rec["op"] == "move":
                    moves[rec["id"]] = rec
                elif rec["op"] == "undo":
                    moves.pop(rec["id"], None)
            except (ValueError, KeyError, TypeError):
                continue
        return list(moves.values())

    def moved(self) -> dict[str, str]:
        """Where each image moved by this journal (and not moved back) lies now: original path -> path."""
        origin: dict[str, str] = {}  # current path -> original path
        for rec in self.active():
            origin[rec["to"]] = origin.pop(rec["from"], rec["from"])
        return {first: now for now, first in origin.items()}

    def _free_name(self, folder: Path, name: str) -> Path:
        target, stem, suffix, n = folder / name, Path(name).stem, Path(name).suffix, 0
        while os.path.lexists(target):  # a dangling link takes its name too
            n += 1
            target = folder / f"{stem}-{n}{suffix}"
        return target

    def move(self, rel: str, label: str, classes: list[str]) -> dict[str, Any]:
        """Move the image ``rel`` into the folder of class ``label``; return the journal record."""
        label = composed(label)
        if label not in classes:
            raise UnknownClassError(f"unknown class {label!r}; classes: {', '.join(classes)}")
        src = safe_rel(self.root, rel)
        rel = src.relative_to(self.root).as_posix()  # as listed: "./a/x.jpg" is "a/x.jpg"
        gone = f"{rel} is no longer there: already moved by another request, or removed"
        splits = split_folders(self.root)
        if composed(label_of(rel, splits)) == label:
            raise RelabelError(f"{rel} is already in class {label!r}")
        parent = self.root
        if splits:  # stay in the image's split folder; a new image joins the first (train/)
            first = PurePosixPath(rel).parts[0]
            parent = self.root / (first if first in splits else splits[0])
        folder = class_folder(parent, label)
        if not folder.resolve().is_relative_to(self.root):
            raise RelabelError(
                f"class folder {folder.relative_to(self.root).as_posix()}/ leads outside the data folder through a "
                "link: move the image by hand"
            )
        with self._lock, moving_lock(self.root):  # another app (or a dedup) on the folder: 409, not a race
            # checked under the lock: a concurrent request for the same image may have moved it meanwhile
            if not src.is_file():
                raise MovedAwayError(gone)
            for _ in range(3):  # another process may take the free name between the check and the move
                dst = self._free_name(folder, src.name)
                try:
                    digest = file_sha256(src)
                except FileNotFoundError:  # another process moved it since the check
                    raise MovedAwayError(gone) from None
                except OSError as e:  # the journal records its content: read permission needed
                    raise RelabelError(f"cannot read {rel} ({e.strerror or e}): make it readable to relabel it") from e
                record = {
                    "op": "move",
                    "id": uuid.uuid4().hex[:12],
                    "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    "from": rel,
                    "to": dst.relative_to(self.root).as_posix(),
                    "sha256": digest,
                }
                self._append(record)
                try:
                    move_no_overwrite(src, dst)
                except FileExistsError:
                    self._append({"op": "undo", "id": record["id"], "note": "target taken, not moved"})
                    continue
                except OSError as e:  # not moved (no permission, another file system): no move to undo later
                    self._append({"op": "undo", "id": record["id"], "note": f"not moved: {e}"})
                    if isinstance(e, FileNotFoundError) and not os.path.lexists(src):
                        raise MovedAwayError(gone) from None
                    raise
                return record
        raise RelabelError(f"could not find a free name for {src.name} in {label}/")

    def finish_cut_moves(self) -> list[str]:
        """Finish the moves a crash cut between their two steps (the file under both names: listed in both
        classes, and moved again it would be copied), as a ``dedup`` re-run finishes its own; the paths
        whose move was finished."""
        finished = []
        with self._lock, moving_lock(self.root):
            for rec in self.active():
                try:
                    src, dst = safe_rel(self.root, rec["from"]), safe_rel(self.root, rec["to"])
                except UnsafePathError:
                    continue
                if same_file(src, dst):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(src)
                    finished.append(rec["from"])
        return finished

    def undo(self, everything: bool = False, last_id: str | None = None) -> UndoReport:
        """Move back the last move not undone yet (or all of them, newest first).

        ``last_id``: the id of the move the caller means as the last one; StaleUndoError if it is not (a
        double click must not undo the move before it).
        """
        report = UndoReport()
        with self._lock, moving_lock(self.root):
            moves = self.active()
            if last_id is not None and (not moves or moves[-1]["id"] != last_id):
                raise StaleUndoError(
                    f"move {last_id} is no longer the last one (undone already, or another move came after): "
                    "nothing undone"
                )
            for rec in reversed(moves if everything else moves[-1:]):
                try:
                    src, back = safe_rel(self.root, rec["to"]), safe_rel(self.root, rec["from"])
                except UnsafePathError as e:
                    report.problems.append(f"journal record {rec['id']}: {e}")
                    continue
                if not src.is_file() and back.is_file():  # moved back by hand, or cut short before it moved
                    self._append({"op": "undo", "id": rec["id"], "note": f"{rec['from']} found in place"})
                    report.undone.append(rec)
                    continue
                if not src.is_file():
                    report.problems.append(f"{rec['to']} is missing: cannot move it back to {rec['from']}")
                    continue
                if back.exists() and not same_file(src, back):
                    report.problems.append(f"{rec['from']} exists: not overwritten; {rec['to']} stays")
                    continue
                try:
                    digest = file_sha256(src)
                except OSError as e:
                    report.problems.append(
                        f"cannot read {rec['to']} ({e.strerror or e}): make it readable to move it back"
                    )
                    continue
                if rec.get("sha256") not in (None, digest):  # another picture saved under its name since
                    then = "its move is retired" if everything else "the next undo goes on to the move before"
                    report.problems.append(
                        f"{rec['to']} is no longer the image moved (changed since): left where it is; {then}"
                    )  # the move is retired: else every "undo last" met it again, and the moves before it stuck
                    self._append({"op": "undo", "id": rec["id"], "note": "not moved back: changed since the move"})
                    continue
                try:
                    move_no_overwrite(src, back)
                except OSError as e:
                    report.problems.append(f"{rec['to']}: not moved back ({e})")
                    continue
                self._append({"op": "undo", "id": rec["id"], "time": datetime.now(UTC).isoformat()})
                report.undone.append(rec)
        return report


ALONE = "only image of its class: cannot be cross-checked (add images to the class)"


def cross_checkable(y: np.ndarray) -> np.ndarray:
    """Which samples a cross-validation can hold out: those of a class with at least two (held out, the only
    sample of a class would be scored by a head that does not know its class)."""
    return np.bincount(y)[y] >= 2


def out_of_fold_proba(
    x: np.ndarray, y: np.ndarray, n_classes: int, make_head: Callable[[], Any], folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Probabilities of every class for every :func:`cross_checkable` sample from a head that never saw it
    (stratified k-fold, k at most the size of the smallest such class).

    The other samples are on the fitting side of every fold; their rows stay 0.
    """
    proba = np.zeros((len(y), n_classes))
    checkable = cross_checkable(y)
    held, always = np.flatnonzero(checkable), np.flatnonzero(~checkable)
    if not len(held):
        return proba
    counts = np.bincount(y[held])
    k = int(min(folds, counts[counts > 0].min()))
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(x[held], y[held]):
        train, test = np.sort(np.r_[held[tr], always]), held[te]
        if len(np.unique(y[train])) < 2:
            continue
        head = make_head().fit(x[train], y[train])
        proba[np.ix_(test, head.classes_)] = head.predict_proba(x[test])
    return proba


def label_error_order(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample indices, most suspect first: lowest out-of-fold probability of the given label."""
    return np.argsort(proba[np.arange(len(y)), y], kind="stable")


def margins(proba: np.ndarray) -> np.ndarray:
    """Best minus second-best probability per row (small: the classifier hesitates)."""
    top2 = np.sort(proba, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]
