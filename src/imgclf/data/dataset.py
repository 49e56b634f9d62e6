"""Scanning a folder of labelled images and splitting it into train and test, reproducibly."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import unicodedata
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from imgclf.config import DataConfig
from imgclf.data.io import IMAGE_EXTENSIONS, ImageError, check_image, is_ignored, list_files
from imgclf.utils import atomic_write_text, display_path, has_control_character, is_utf8, read_utf8

UNLABELED_DIR = "unlabeled"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")

log = logging.getLogger("imgclf")


class DatasetError(ValueError):
    """The data folder cannot be used as given; the message says how to fix it."""


@dataclass(frozen=True)
class Sample:
    """One usable image."""

    rel: str  # POSIX path relative to the data root: stable across machines
    label: int
    group: str  # images sharing a group never straddle train and test in "group" mode
    preset: str | None = None  # "train" / "test" where the folder layout fixes the split


@dataclass
class Dataset:
    """Images found under ``root``: class names (sorted), usable samples and skipped files with reasons."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[dict[str, str]] = field(default_factory=list)  # usable, but worth a look (e.g. wrongly named)

    def path(self, sample: Sample) -> Path:
        return self.root / sample.rel

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


NOT_UTF8 = "name is not valid UTF-8 text (undecodable bytes shown as \\x..): rename it to use it"


def _name_problem(name: str) -> str | None:
    """Why a class folder's name cannot be a label (it is printed, and written in text and CSV files)."""
    if not is_utf8(name):
        return NOT_UTF8
    if has_control_character(name):
        return "name holds a control character (a line break or tab, shown as \\n or \\t): rename it to use it"
    return None


def composed(name: str) -> str:
    """``name`` in Unicode's composed form (NFC): names are compared so, so that a copy from a system that
    stores them decomposed (é as e + accent) has the same classes, order and split."""
    return unicodedata.normalize("NFC", name)


def class_name(folder: Path) -> str:
    """The label of a class folder: its name, composed."""
    return composed(folder.name)


def _order(rel: Path) -> tuple[str, ...]:
    """Sort key of a path inside a class folder, alike for composed and decomposed names."""
    return tuple(composed(part) for part in rel.parts)


def _up_link(class_dir: Path) -> str | None:
    """Why a class folder that is a link up the tree (to the data folder, or to ``/``) is not read."""
    target = os.path.realpath(class_dir)
    if Path(os.path.realpath(class_dir.parent)).is_relative_to(target):
        return f"is a link to {target}, which holds the data folder: not followed (it would read all below it)"
    return None


def _broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists() and not is_ignored(path.name)


def broken_class_link(link: Path) -> str:
    """Why the broken link ``link``, where a class folder belongs, is skipped."""
    return f"broken link to {os.readlink(link)} (nothing there): a class folder on a drive not mounted? fix or remove the link"


def broken_class_links(root: Path) -> list[Path]:
    """The broken links where class folders belong: in ``root``, or in its split folders."""
    bases = [root, *(root / s for s in split_folders(root))]
    return [p for base in bases for p in sorted(base.iterdir()) if _broken_link(p)]


def subfolders(folder: Path) -> list[Path]:
    """The sub-folders of ``folder`` by name, without hidden and system ones."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not is_ignored(p.name)), key=lambda p: p.name)


def _class_dirs(base: Path) -> list[Path]:
    return [p for p in subfolders(base) if p.name != UNLABELED_DIR]


def _predefined_parts(root: Path) -> list[tuple[Path, str]] | None:
    """(folder, split) of ``train/`` and ``test/`` or ``val/``; with both, ``val/`` trains too."""
    names = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    if "train" not in names or not ({"val", "test"} & names.keys()):
        return None
    if "test" not in names:
        return [(names["train"], "train"), (names["val"], "test")]
    return [(names["train"], "train"), *([(names["val"], "train")] if "val" in names else []), (names["test"], "test")]


def split_folders(root: Path) -> list[str]:
    """Names of the split folders (``train``, ``val``, ``test``) of a data folder laid out by split; [] if flat."""
    return [base.name for base, _ in _predefined_parts(Path(root)) or []]


def label_of(rel: str, splits: list[str]) -> str:
    """The class (or ``unlabeled``) of an image path relative to the data folder whose split folders are
    ``splits`` (:func:`split_folders`): ``train/ants/x.jpg`` is an ant."""
    parts = rel.split("/")
    return parts[1] if splits and parts[0] in splits and len(parts) > 2 else parts[0]


NO_DATA_ROOT = "no data folder given: give DATA_DIR (data_root), the folder that holds one sub-folder per class"


def _is_bundle(folder: Path) -> bool:
    """Whether ``folder`` holds an imgclf model bundle (a ``bundle.json`` of its format, not any file so named:
    a class named ``model`` may hold one)."""
    try:
        with open(folder / "bundle.json", encoding="utf-8", errors="replace") as f:
            return '"imgclf-bundle/' in f.read(4096)
    except OSError:
        return False


def check_data_folder(root: Path) -> Path:
    """``root``, if it is a folder; else DatasetError saying what it is and what to give instead."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data folder not found: {root!s} (give the folder that holds one sub-folder per class)")
    if not root.is_dir():
        unpack = " (an archive: unpack it first)" if root.name.lower().endswith(ARCHIVE_SUFFIXES) else ""
        raise DatasetError(f"{root} is a file{unpack}; give the folder that holds one sub-folder per class")
    if _is_bundle(root / "model") or _is_bundle(root):
        raise DatasetError(
            f"{root} is a run folder (what train writes), not a data folder: give the folder that holds one "
            "sub-folder per class"
        )
    return root


def scan_dataset(cfg: DataConfig) -> Dataset:
    """List the usable images under the data root; unusable files are reported in ``skipped``, never touched."""
    if cfg.data_root is None:
        raise DatasetError(NO_DATA_ROOT)
    root = check_data_folder(Path(cfg.data_root)).resolve()
    predefined = _predefined_parts(root)
    if cfg.split_mode == "predefined" and predefined is None:
        raise DatasetError(f"split_mode=predefined needs {root}/train and {root}/val (or test) sub-folders")
    parts: list[tuple[Path, str | None]] = [(root, None)]
    listed = cfg.split_mode == "list" or (cfg.split_mode == "auto" and cfg.test_list is not None)
    if predefined and cfg.split_mode in ("auto", "predefined") and not listed:
        parts = list(predefined)
        log.info(
            "predefined split: training images from %s, test images from %s",
            " and ".join(f"{base.name}/" for base, preset in predefined if preset == "train"),
            predefined[-1][0].name + "/",
        )
    elif predefined:  # the classes are in the split folders: pool them, then split by split_mode
        parts = [(base, None) for base, _ in predefined]
        names = ", ".join(f"{base.name}/" for base, _ in predefined)
        log.info("split_mode %s: the images of %s are pooled and split again", cfg.split_mode, names)
    # listed once, in label order (a folder whose name differs from another's only in Unicode form is that class)
    dirs = {base: sorted(_class_dirs(base), key=lambda d: (class_name(d), d.name)) for base, _ in parts}
    bad_names = {d: why for base, _ in parts for d in dirs[base] if (why := _name_problem(d.name) or _up_link(d))}
    class_names = sorted({class_name(d) for base, _ in parts for d in dirs[base] if d not in bad_names})
    broken = [p for base, _ in parts for p in sorted(base.iterdir()) if _broken_link(p)]
    links = ", ".join(f"{p.name} -> {os.readlink(p)}" for p in broken)
    gone = f"; broken link(s), a class folder on a drive not mounted?: {links}" if broken else ""
    if not class_names:
        raise DatasetError(f"no class sub-folders in {root}: expected {root}/<class name>/<images>{gone}")
    if len(class_names) < 2:
        raise DatasetError(
            f"only one class ({class_names[0]!r}) in {root}: a classifier needs at least two class folders{gone}"
        )
    found: list[tuple[tuple[int, str, tuple[str, ...]], str, str, str, str | None]] = []  # order, rel, class...
    skipped = [{"path": display_path(d), "reason": f"class folder {why}"} for d, why in bad_names.items()]
    notes: list[dict[str, str]] = []
    max_bytes = int(cfg.max_file_mb * 1e6)
    for base, _ in parts:
        for d, twin in itertools.pairwise(dirs[base]):
            if class_name(d) == class_name(twin) and twin not in bad_names:
                notes.append(
                    {
                        "path": display_path(twin),
                        "note": f"named like {d.name} in another Unicode form: used as class {class_name(d)!r} too; "
                        "give the folders one name",
                    }
                )
    by_case: dict[str, list[str]] = {}
    for name in class_names:
        by_case.setdefault(name.casefold(), []).append(name)
    for alike in (names for names in by_case.values() if len(names) > 1):
        folder = next(d for base, _ in parts for d in dirs[base] if class_name(d) == alike[1])
        notes.append(
            {
                "path": display_path(folder),
                "note": f"classes {' and '.join(map(repr, alike))} differ only in letter case: separate classes here, "
                "but one folder on macOS and Windows (a copy there mixes them); merge or rename them",
            }
        )
    loose = "image not inside a class folder: move it into one to use it"
    if predefined:  # what lies beside train/ and val/ or test/ is in no split
        split_dirs = [base for base, _ in parts]
        names = ", ".join(f"{base.name}/" for base in split_dirs)
        for p in sorted(root.iterdir()):
            if p in split_dirs or is_ignored(p.name) or p.name == UNLABELED_DIR:
                continue
            if p.is_dir():
                skipped.append({"path": display_path(p), "reason": f"folder beside {names}: in no split, not used"})
            elif p.suffix.lower() in IMAGE_EXTENSIONS:
                skipped.append({"path": display_path(p), "reason": loose})
    for part, (base, preset) in enumerate(parts):
        for f in sorted(
            p for p in base.iterdir() if p.is_file() and not is_ignored(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS
        ):
            skipped.append({"path": display_path(f), "reason": loose})
        for link in (p for p in broken if p.parent == base):
            skipped.append({"path": display_path(link), "reason": broken_class_link(link)})
        for class_dir in dirs[base]:
            if class_dir in bad_names:
                continue
            unreadable: list[tuple[Path, str]] = []
            name = class_name(class_dir)
            for f in sorted(
                list_files(class_dir, unreadable=unreadable), key=lambda f: _order(f.relative_to(class_dir))
            ):
                rel_in_class = f.relative_to(class_dir)
                if not is_utf8(rel_in_class.as_posix()):
                    skipped.append({"path": display_path(f), "reason": f"file {NOT_UTF8}"})
                    continue
                try:
                    note = check_image(f, cfg.max_image_pixels, max_bytes)
                except ImageError as e:
                    skipped.append({"path": display_path(f), "reason": str(e)})
                    continue
                if note:
                    notes.append({"path": display_path(f), "note": note})
                group = composed(rel_in_class.parts[0] if len(rel_in_class.parts) > 1 else rel_in_class.as_posix())
                order = (part, name, _order(rel_in_class))  # one class's folders in two Unicode forms: one order
                found.append((order, f.relative_to(root).as_posix(), name, f"{name}/{group}", preset))
            skipped += [{"path": display_path(d), "reason": why} for d, why in unreadable]
    found.sort(key=lambda row: row[0])
    used = {name for _, _, name, _, _ in found}
    empty = [name for name in class_names if name not in used]
    if len(used) < 2:
        shown = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        raise DatasetError(
            f"fewer than two class folders with a usable image in {root} (without one: {', '.join(empty)}); "
            f"add images to them" + (f". {len(skipped)} file(s) skipped: {shown}" if skipped else "")
        )
    reason = "class folder without a usable image: class left out (add images to train it)"
    skipped += [
        {"path": display_path(d), "reason": reason} for base, _ in parts for d in dirs[base] if class_name(d) in empty
    ]
    class_names = [name for name in class_names if name in used]
    label_of = {name: i for i, name in enumerate(class_names)}
    samples = [Sample(rel, label_of[name], group, preset) for _, rel, name, group, preset in found]
    return Dataset(root, class_names, samples, skipped, notes)


def _rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on the seed and a name (never on listing order or platform)."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def _n_test(n: int, train_fraction: float) -> int:
    return 0 if n < 2 else min(n - 1, max(1, round(n * (1.0 - train_fraction))))


def _split_hint(mode: str, cfg: DataConfig, part: str) -> str:
    """What to change when a split lacks classes, by the split mode used."""
    if mode == "predefined":
        return "put images of each class in train/ and in val/ (or test/), or pool them with --split-mode random"
    if part == "test" and mode == "group":
        return (
            "a class whose images lie in one sub-folder (one group) stays whole in training; give it several "
            "sub-folders, or use --split-mode random"
        )
    if mode == "list":
        return f"list images of these classes in {cfg.test_list}"
    if part == "test" and mode == "random":
        return "a class needs two images or more to have one in the test split; add images"
    return "add images of these classes to it, or change the split (--split-mode)"


def make_split(ds: Dataset, cfg: DataConfig) -> np.ndarray:
    """Array of "train"/"test", one per sample, by ``cfg.split_mode`` (``auto`` with a ``test_list``: by it)."""
    split = np.full(len(ds.samples), "train", dtype=object)
    if cfg.test_list is not None and cfg.split_mode not in ("auto", "list"):
        raise DatasetError(
            f"--test-list names the test images, --split-mode {cfg.split_mode} splits otherwise: drop one of them"
        )
    listed = cfg.test_list is not None or cfg.split_mode == "list"
    mode = "random" if cfg.split_mode == "auto" else cfg.split_mode
    if all(s.preset is not None for s in ds.samples) and cfg.split_mode in ("auto", "predefined") and not listed:
        mode = "predefined"
        split[:] = [s.preset for s in ds.samples]
    elif listed:
        mode = "list"
        if cfg.test_list is None:
            raise DatasetError("split_mode=list needs --test-list FILE (image paths, one per line)")
        wanted = _read_list(Path(cfg.test_list), ds.root)
        index = {composed(s.rel): i for i, s in enumerate(ds.samples)}
        missing = sorted(wanted - index.keys())
        if missing:
            raise DatasetError(
                f"{len(missing)} path(s) in {cfg.test_list} are not usable images under {ds.root}, e.g. {missing[:3]}"
            )
        split[[index[r] for r in wanted]] = "test"
    else:
        labels = ds.labels
        for c, name in enumerate(ds.classes):
            idx = np.flatnonzero(labels == c)  # samples are sorted by path: order is platform-independent
            rng = _rng(cfg.split_seed, name)
            if cfg.split_mode == "group":
                groups = sorted({ds.samples[i].group for i in idx})
                order = [groups[j] for j in rng.permutation(len(groups))]
                target, taken = _n_test(len(idx), cfg.train_fraction), 0
                members = {g: [i for i in idx if ds.samples[i].group == g] for g in groups}
                for g in order[:-1] if len(order) > 1 else []:
                    if taken >= target:
                        break
                    split[members[g]] = "test"
                    taken += len(members[g])
            else:
                split[idx[rng.permutation(len(idx))[: _n_test(len(idx), cfg.train_fraction)]]] = "test"
    absent: dict[str, list[str]] = {}
    for part in ("train", "test"):
        present = {ds.samples[i].label for i in np.flatnonzero(split == part)}
        absent[part] = [c for i, c in enumerate(ds.classes) if i not in present]
        if len(present) < 2:
            raise DatasetError(
                f"the {part} split holds fewer than two classes (none of {_first(absent[part])}): "
                f"{_split_hint(mode, cfg, part)}"
            )
    if absent["test"]:
        log.warning(
            "warning: no test image of %s: learned but not evaluated (%s)",
            _first(absent["test"]),
            _split_hint(mode, cfg, "test"),
        )
    return split


def _first(names: list[str], most: int = 5) -> str:
    """The first ``most`` names, and how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def leave_out_untrained(ds: Dataset, split: np.ndarray) -> tuple[Dataset, np.ndarray]:
    """Leave out classes without a training image (e.g. a folder only in ``val/``): none can be learned.

    Their images are listed in ``skipped`` with the reason; the remaining classes keep their sorted order.
    """
    trained = sorted({ds.samples[i].label for i in np.flatnonzero(split == "train")})
    if len(trained) == len(ds.classes):
        return ds, split
    new_label = {old: new for new, old in enumerate(trained)}
    keep = np.array([s.label in new_label for s in ds.samples])
    skipped = ds.skipped + [
        {
            "path": display_path(ds.path(s)),
            "reason": f"class {ds.classes[s.label]!r} has no training image: left out (add training images to it)",
        }
        for s in ds.samples
        if s.label not in new_label
    ]
    samples = [replace(s, label=new_label[s.label]) for s in ds.samples if s.label in new_label]
    kept = Dataset(ds.root, [ds.classes[c] for c in trained], samples, skipped, ds.notes)
    if len({s.label for s, part in zip(samples, split[keep], strict=True) if part == "test"}) < 2:
        raise DatasetError("the test split holds fewer than two trainable classes; add images or change the split")
    return kept, split[keep]


def _read_list(path: Path, root: Path) -> set[str]:
    if path.is_dir():
        raise DatasetError(f"test list {path} is a folder: give the text file that lists the test images")
    if not path.is_file():
        raise DatasetError(f"test list not found: {path}")
    out = set()
    try:
        text = read_utf8(path, "test list")
    except ValueError as e:
        raise DatasetError(str(e)) from None
    for line in text.splitlines():
        line = line.strip().replace("\\", "/")  # lists written on Windows
        if line and not line.startswith("#"):
            p = Path(line)
            if p.is_absolute():  # as written (through a folder link inside the root), else with links resolved
                plain, real = Path(os.path.abspath(p)), p.resolve()
                inside = next((q for q in (plain, real) if q.is_relative_to(root)), None)
                p = inside.relative_to(root) if inside else p  # outside: reported as not usable
            out.add(composed(p.as_posix()))
    return out


def save_split(
    path: Path,
    ds: Dataset,
    split: np.ndarray,
    digests: dict[int, str] | None = None,
    used: Collection[int] | None = None,
) -> None:
    """Write the split as CSV (path, label, split; with ``digests``, sample index -> SHA-256 of the image,
    a sha256 column, empty where not known; with ``used``, the indices of the images the run could read, a
    used column of yes/no), atomically, into an existing folder (a run folder removed meanwhile is not made
    again)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split", *(["sha256"] if digests else []), *(["used"] if used is not None else [])])
    for i, (s, part) in enumerate(zip(ds.samples, split, strict=True)):
        row = [s.rel, ds.classes[s.label], part, *([digests.get(i, "")] if digests else [])]
        w.writerow([*row, *([("yes" if i in used else "no")] if used is not None else [])])
    atomic_write_text(path, buf.getvalue(), parents=False)


def recorded_digests(path: Path) -> list[str]:
    """The sha256 column of a split CSV, one per row ('' where not recorded, all '' in older files)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [row.get("sha256") or "" for row in csv.DictReader(f)]


def load_split(path: Path, root: Path, classes: list[str]) -> tuple[Dataset, np.ndarray]:
    """Read a split CSV written by :func:`save_split` back into a Dataset and split array.

    A path not found as written is looked up in Unicode's composed form among the files under ``root`` (a
    copy of the data folder that stores names decomposed)."""
    label_of = {c: i for i, c in enumerate(classes)}
    samples, split = [], []
    damaged = f"{path} is damaged (%s): it says which images are the test split; train again to write it anew"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if lacking := [c for c in ("path", "label", "split") if c not in (reader.fieldnames or [])]:
            raise DatasetError(damaged % f"no {', '.join(lacking)} column")
        for n, row in enumerate(reader, 2):
            if row["label"] not in label_of:
                raise DatasetError(damaged % f"line {n}: class {row['label']!r}, which the model does not know")
            samples.append(Sample(row["path"], label_of[row["label"]], row["path"]))
            split.append(row["split"])
    root = Path(root)
    missing = [i for i, s in enumerate(samples) if not (root / s.rel).exists()]
    if missing and root.is_dir():
        on_disk = {composed(f.relative_to(root).as_posix()): f for f in list_files(root)}
        for i in missing:
            if (found := on_disk.get(composed(samples[i].rel))) is not None:
                samples[i] = replace(samples[i], rel=found.relative_to(root).as_posix())
    return Dataset(root, list(classes), samples), np.array(split, dtype=object)
