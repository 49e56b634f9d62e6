"""Data-set building commands: ``download``, ``scrape``, ``dedup``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.cli import add_config_args, config_from_args, user_path, utf8_path

if TYPE_CHECKING:
    from imgclf.datatools.download import DownloadReport

ACROSS_SHOWN = 5  # duplicate groups across classes listed by dedup (all are in its report)
_FETCH = tuple(f"datatools.{n}" for n in ("timeout_s", "retries", "backoff_s", "max_backoff_s"))
DOWNLOAD_FIELDS = (
    *(
        f"datatools.{n}"
        for n in ("download_workers", "max_download_mb", "max_side", "keep_originals", "refetch_removed")
    ),
    *_FETCH,
    "data.max_image_pixels",
    "output.progress",
)
SCRAPE_FIELDS = (*DOWNLOAD_FIELDS, "datatools.provider", "datatools.provider_url", "datatools.per_query")
INTERRUPTED = 130  # 128 + SIGINT, as the imgclf command reports Ctrl-C
DEDUP_FIELDS = ("datatools.hash_size", "datatools.max_distance", "data.max_image_pixels", "output.progress")


def _quiet_http_log() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise


def _download(args: argparse.Namespace) -> int:
    from imgclf.datatools.download import DownloadInterrupted, download, read_url_list

    _quiet_http_log()
    cfg = config_from_args(args)
    entries = read_url_list(Path(args.url_list))
    try:
        report = download(entries, Path(args.out), cfg.datatools, cfg.data.max_image_pixels, cfg.output.progress)
    except DownloadInterrupted as e:
        print(e.report.summary())
        return INTERRUPTED
    print(report.summary())
    return 1 if entries and not _any_image(report) else 0


def _any_image(report: DownloadReport) -> bool:
    """Whether the list gave an image: downloaded now, there already, or removed by the user since."""
    return any(report.count(status) for status in ("downloaded", "exists", "removed"))


def _scrape(args: argparse.Namespace) -> int:
    from imgclf.datatools.download import URL_LIST_FILE, DownloadInterrupted
    from imgclf.datatools.providers import ProviderError
    from imgclf.datatools.scrape import SearchInterrupted, parse_terms, scrape

    _quiet_http_log()
    cfg = config_from_args(args)
    items, attributes = parse_terms(args.items, "--items"), parse_terms(args.attributes, "--attributes")
    try:
        report = scrape(
            items, attributes, Path(args.out), cfg.datatools, cfg.data.max_image_pixels, cfg.output.progress
        )
    except ProviderError as e:
        print(f"imgclf: error: {e}", file=sys.stderr)
        return 2
    except SearchInterrupted as e:
        print(e, file=sys.stderr)
        return INTERRUPTED
    except DownloadInterrupted as e:
        print(e.report.summary())
        url_list, out = shlex.quote(str(Path(args.out) / URL_LIST_FILE)), shlex.quote(args.out)
        print(f"(or `imgclf download {url_list} --out {out}`, which does not search again)")
        return INTERRUPTED
    print(report.summary())
    assert report.download is not None
    return 0 if _any_image(report.download) else 1


def _dedup(args: argparse.Namespace) -> int:
    from imgclf.datatools.journal import moving_lock

    root = Path(args.data_dir)
    # the search and the moves together (quarantine and undo hold the folder themselves too)
    with moving_lock(root) if args.apply or args.undo else contextlib.nullcontext():
        return _dedup_held(args, root)


def _dedup_held(args: argparse.Namespace, root: Path) -> int:
    from imgclf.data.dataset import DatasetError
    from imgclf.datatools.dedup import find_duplicates, write_reports
    from imgclf.datatools.journal import QUARANTINE_DIR, emptied_classes, quarantine, undo
    from imgclf.utils import display_path, folder_for

    if args.undo:
        report = undo(root)
        print(f"restored {len(report.done)} file(s) from {root / QUARANTINE_DIR}")
    else:
        cfg = config_from_args(args)
        tools = cfg.datatools
        # made before the hashing (a file in the way was found after it, as "[Errno 17] File exists"); removed
        # again where dedup stops before writing into it
        reports = folder_for(args.report_dir, "report folder", "--report-dir") if args.report_dir else None
        with reports or contextlib.nullcontext():
            result = find_duplicates(
                root, tools.hash_size, tools.max_distance, cfg.output.progress, cfg.data.max_image_pixels
            )
            if not result.n_images and not result.skipped:
                raise DatasetError(
                    f"no images in the class folders of {root} (dedup compares those of its sub-folders)"
                )
            csv_path, html_path = write_reports(result, args.report_dir)
        extras = result.extras
        print(
            f"{result.n_images} images, {len(result.groups)} duplicate groups, {len(extras)} extra copies; "
            f"report: {csv_path}, {html_path}"
        )
        for path, why in result.skipped:
            print(f"  not hashed: {path}: {why}")
        if across := result.across_classes:
            print(
                f"warning: {len(across)} group(s) hold images of different classes: a label is wrong, or colour "
                "alone tells them apart (dhash sees brightness only). The kept image decides which class keeps "
                "the picture; check these before --apply (or after it: --undo), e.g. in `imgclf ui`:",
                file=sys.stderr,
            )
            for group in across[:ACROSS_SHOWN]:
                line = f"  {group[0].path} (kept): " + ", ".join(m.path for m in group[1:])
                print(display_path(line), file=sys.stderr)
            if len(across) > ACROSS_SHOWN:
                print(f"  ... and {len(across) - ACROSS_SHOWN} more in the report", file=sys.stderr)
        if not args.apply:
            if extras:
                print(
                    f"nothing moved; `imgclf dedup {shlex.quote(str(root))} --apply` moves the extra copies to "
                    f"{root / QUARANTINE_DIR} (and --undo brings them back)"
                )
            return 0
        report = quarantine(root, extras)
        print(
            f"moved {len(report.done)} extra copies to {root / QUARANTINE_DIR} "
            f"(`imgclf dedup {shlex.quote(str(root))} --undo` restores them)"
        )
        for folder in emptied_classes(root, report.done):
            split = folder.parent != root  # train/ants: the class is left only in that split
            effect = f"{folder.parent.name}/ holds no {folder.name} now" if split else "train leaves the class out"
            print(
                f"warning: {display_path(folder)} holds no image now (each was a copy of an image kept in another "
                f"folder): {effect}; --undo brings its images back",
                file=sys.stderr,
            )
    for problem in report.problems:  # a line each: control characters in file names escaped
        print(f"  {display_path(problem)}", file=sys.stderr)
    return 1 if report.problems else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="Download a label<TAB>url list into one folder per label.")
    p.add_argument(
        "url_list", type=user_path, help="File of label<TAB>url[<TAB>source page<TAB>licence<TAB>creator] lines."
    )
    p.add_argument(
        "--out", type=user_path, required=True, help="Data folder: images go to OUT/<label>/ (kept if there)."
    )
    add_config_args(p, DOWNLOAD_FIELDS)
    p.set_defaults(func=_download)

    p = sub.add_parser("scrape", help="Search images for every attribute x item; download them by attribute.")
    p.add_argument("--items", required=True, help="Comma-separated things, e.g. blouse,hoodie,shirt.")
    p.add_argument(
        "--attributes",
        required=True,
        help="Comma-separated attributes, e.g. striped,dotted,leopard: one class folder each.",
    )
    p.add_argument(
        "--out", type=user_path, required=True, help="Data folder; also gets urls.tsv, sources.tsv, failure list."
    )
    add_config_args(p, SCRAPE_FIELDS)
    p.set_defaults(func=_scrape)

    p = sub.add_parser("dedup", help="Find duplicate images (dhash), report them, quarantine extra copies.")
    p.add_argument("data_dir", type=utf8_path, help="Folder with one sub-folder per class.")
    p.add_argument(
        "--report-dir",
        type=lambda text: Path(user_path(text)),
        help="Folder for dedup_report.csv and .html [default: DATA_DIR; for a read-only one].",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--apply",
        action="store_true",
        help="Move extra copies to DATA_DIR/.imgclf-quarantine/ (journaled, never deleted).",
    )
    mode.add_argument("--undo", action="store_true", help="Move every quarantined file back.")
    add_config_args(p, DEDUP_FIELDS)
    p.set_defaults(func=_dedup)
