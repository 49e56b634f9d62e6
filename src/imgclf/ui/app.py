"""The review web app: browse and relabel a data set, inspect a run's results, fix suspected label errors,
label unlabeled images. JSON APIs are paged; features and out-of-fold scores are computed once in the background.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import mimetypes
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

from imgclf.backbones import Backbone
from imgclf.config import Config
from imgclf.data.dataset import UNLABELED_DIR, check_data_folder, composed, split_folders
from imgclf.data.io import ImageError, exif_orientation, open_image, unreadable_reason
from imgclf.datatools.journal import JournalFileError
from imgclf.serving.security import SameOriginWrites, SecurityHeaders, TokenRequired
from imgclf.ui.analysis import Analyzer
from imgclf.ui.labels import (
    MovedAwayError,
    RelabelError,
    RelabelJournal,
    UnknownClassError,
    UnsafePathError,
    class_folders,
    list_images,
    safe_rel,
)
from imgclf.ui.thumbs import ThumbCache
from imgclf.utils import FolderInUse

log = logging.getLogger("imgclf")
BROWSER_FORMATS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"})
Page = Annotated[int, Query(ge=1)]
PerPage = Annotated[int, Query(ge=1, le=500)]


class RelabelRequest(BaseModel):
    path: str
    label: str


class UndoRequest(BaseModel):
    all: bool = False
    id: str | None = None  # the last move as the page saw it: refused (409) if another one is last now


@dataclass
class RunResults:
    """A run's test predictions (predictions.csv), confusion matrix and the C its SVM head chose (metrics.json;
    None for a run without one), and the content (SHA-256) of each image split.csv names, by composed path ('' where
    not recorded)."""

    classes: list[str]
    rows: list[dict[str, Any]]
    confusion: list[list[int]]
    svm_c: float | None = None
    digests: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> RunResults:
        pred_file, metrics_file = run_dir / "predictions.csv", run_dir / "metrics.json"
        for f in (pred_file, metrics_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: give a run folder written by `imgclf train`")
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        classes = list(metrics["classes"])
        rows = []
        with open(pred_file, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                scores = [float(r[f"score_{c}"]) for c in classes]
                rows.append(
                    {
                        "path": r["path"],
                        "true": r["true_label"],
                        "pred": r["predicted_label"],
                        "confidence": max(scores),
                        "correct": r["true_label"] == r["predicted_label"],
                        "scores": scores,
                    }
                )
        digests = {}
        if (split_file := run_dir / "split.csv").is_file():  # not in runs written before it was
            with open(split_file, newline="", encoding="utf-8") as f:
                digests = {composed(r["path"]): r.get("sha256") or "" for r in csv.DictReader(f) if r.get("path")}
        return cls(classes, rows, metrics["confusion_matrix"], metrics.get("svm_c"), digests)


def file_version(path: Path) -> str | None:
    """A key that changes when the file at ``path`` is changed or replaced, for image URLs: a browser shows the
    picture it holds for a URL again, whatever the cache headers say. None if the file is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}-{st.st_ctime_ns}"


def _times(folder: Path) -> tuple[int, int]:
    """The modification and change times of ``folder``: a chmod changes the latter only (a folder made readable
    again is listed anew)."""
    try:
        st = folder.stat()
    except OSError:  # removed since it was listed
        return -1, -1
    return st.st_mtime_ns, st.st_ctime_ns


class ImageIndex:
    """Image paths per top-level folder, re-listed when the modification or change time of a folder changes (of the
    data folder's own, or of any folder the last listing walked, sub-folders of classes included)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._signature: tuple[int, ...] = ()
        self._walked: list[Path] = []
        self._folders: dict[str, list[str]] = {}
        self._present: frozenset[str] = frozenset()
        self._by_composed: dict[str, str] = {}

    def _current_signature(self) -> tuple[int, ...]:
        dirs = [self.root, *(self.root / s for s in split_folders(self.root)), *class_folders(self.root)]
        return (*(t for d in [*dirs, *self._walked] for t in _times(d)), len(dirs))

    def folders(self) -> dict[str, list[str]]:
        if (before := self._current_signature()) != self._signature:
            walked: list[Path] = []
            self._folders = list_images(self.root, walked)
            # the times from before the walk: a change made during it shows at the next use. With folders
            # new to this walk the next signature differs once more: one extra listing, then steady.
            self._walked, self._signature = walked, before
            self._present = frozenset(r for rels in self._folders.values() for r in rels)
            self._by_composed = {composed(r): r for r in sorted(self._present)}
        return self._folders

    def invalidate(self) -> None:
        """Re-list on next use (after a move: on a file system with coarse times, a folder's may not change)."""
        self._signature = ()

    def present(self) -> frozenset[str]:
        """Every listed image path."""
        self.folders()
        return self._present

    def on_disk(self, rel: str) -> str | None:
        """The listed path of ``rel`` written in either Unicode form (a run trained on a copy from another system
        names its images composed, macOS writes them decomposed); None if no listed image is so named."""
        return rel if rel in self.present() else self._by_composed.get(composed(rel))

    def classes(self) -> list[str]:
        return [k for k in self.folders() if k != UNLABELED_DIR]


class ByContent:
    """The listed images a run's split.csv does not name (moved or renamed by hand since the run, or new), by
    content: hashed when first asked for after each listing, with ``digest`` (which remembers unchanged files)."""

    def __init__(self, index: ImageIndex, digest: Callable[[Path], str], named: Collection[str]) -> None:
        self.index, self.digest, self.named = index, digest, named
        self._built: tuple[frozenset[str] | None, dict[str, str]] = (None, {})

    def find(self, digest: str) -> str | None:
        """The path of a listed image not named in split.csv whose content is ``digest``; None if none is."""
        if not digest:  # not recorded (a run of an earlier version): nothing to look for
            return None
        present = self.index.present()
        listing, paths = self._built
        if listing is not present:
            paths = {}
            for rel in sorted(present):
                if composed(rel) not in self.named:
                    with contextlib.suppress(OSError):  # gone or unreadable since the listing
                        paths.setdefault(self.digest(self.index.root / rel), rel)
            self._built = (present, paths)
        return paths.get(digest)


def _turned_by_exif(data: bytes) -> bool:
    """An image of an EXIF orientation that browsers do not apply (they do in JPEG and PNG files, not in WebP)."""
    try:
        with open_image(io.BytesIO(data)) as im:
            return im.format not in ("JPEG", "PNG") and exif_orientation(im) != 1
    except Exception:  # noqa: BLE001 - not decodable: shown as it is (the browser says what it can)
        return False


def _page(items: list[Any], page: int, per_page: int, **extra: Any) -> dict[str, Any]:
    """One page of ``items``; a page past the last (its images moved away since) gives the last."""
    page = min(page, max(1, -(-len(items) // per_page)))
    start = (page - 1) * per_page
    return {"total": len(items), "page": page, "per_page": per_page, "items": items[start : start + per_page], **extra}


def static_dir() -> Path:
    return Path(str(resources.files("imgclf.ui").joinpath("static")))


def create_app(
    data_root: Path,
    run_dir: Path | None = None,
    cfg: Config | None = None,
    *,
    backbone: Backbone | None = None,
    analyse_on_start: bool = True,
    thumbs: ThumbCache | None = None,
    token: str | None = None,
) -> FastAPI:
    """The app for the data folder ``data_root`` (and optionally the results of ``run_dir``); with ``token``,
    every request needs it (:class:`TokenRequired`)."""
    root = check_data_folder(Path(data_root)).resolve()
    cfg = cfg or Config()
    index = ImageIndex(root)
    journal = RelabelJournal(root)
    with contextlib.suppress(FolderInUse, JournalFileError):  # another process moving files: it finishes them
        if finished := journal.finish_cut_moves():
            log.info("finished %d move(s) cut short by a crash: %s", len(finished), ", ".join(finished[:5]))
    max_pixels = cfg.data.max_image_pixels
    thumbs = thumbs or ThumbCache(cfg.features.cache_dir / "thumbs" if cfg.features.cache_dir else None)
    results = RunResults.load(Path(run_dir)) if run_dir is not None else None
    # the run's C, unless the grid given here (--svm-c-grid) lacks it
    run_c = results.svm_c if results is not None and results.svm_c in cfg.classifier.svm_c_grid else None
    analyzer = Analyzer(root, cfg, backbone, run_c)
    by_content = ByContent(index, thumbs.digest, results.digests if results is not None else {})

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if analyse_on_start:
            analyzer.start()
        yield

    app = FastAPIOffline(
        title="imgclf review",
        docs_url="/api/docs",
        redoc_url="/api/redoc",
        openapi_url="/api/openapi.json",
        static_url="/api/docs-assets",
        lifespan=lifespan,
    )
    app.state.analyzer = analyzer
    app.add_middleware(SameOriginWrites)  # another site's page must not move images or restart the analysis
    if token is not None:
        app.add_middleware(TokenRequired, token=token)
    app.add_middleware(SecurityHeaders)  # the outermost: on every answer, the token's 401 and redirect too

    @app.exception_handler(UnsafePathError)
    def _unsafe(_: Request, e: UnsafePathError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(UnknownClassError)
    def _unknown_class(_: Request, e: UnknownClassError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(RelabelError)
    def _relabel_error(_: Request, e: RelabelError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(JournalFileError)
    @app.exception_handler(FolderInUse)  # another review app, a dedup --apply or a download moving its files
    def _bad_journal_or_busy(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=409)

    def data_folder_gone() -> JSONResponse | None:
        """The answer to every request once the data folder is gone (not when it is only unreadable)."""
        try:
            root.stat()
        except (FileNotFoundError, NotADirectoryError):
            why = f"the data folder {root} is gone (deleted, moved or renamed since the app started)"
            return JSONResponse({"detail": f"{why}: restore it, or start imgclf ui on its new place"}, status_code=404)
        except OSError:  # there, but unreadable: answered as such
            pass
        return None

    @app.exception_handler(FileNotFoundError)
    def _missing(_: Request, e: FileNotFoundError) -> JSONResponse:
        return data_folder_gone() or JSONResponse({"detail": str(e)}, status_code=404)

    @app.exception_handler(OSError)
    def _os_error(request: Request, e: OSError) -> JSONResponse:
        if gone := data_folder_gone():
            return gone
        if request.method in ("GET", "HEAD"):  # reads only: a file or folder without read permission, a bad disk
            hint = ": check the permissions of it and of the folders above it" if isinstance(e, PermissionError) else ""
            what = e.filename or "the data folder"
            return JSONResponse({"detail": f"cannot read {what}: {e.strerror or e}{hint}"}, status_code=422)
        # a change refused: a read-only data folder, a full disk
        where = f" ({e.filename})" if e.filename else ""
        if e.filename2:  # a move: the folder that refused it is the destination's, as often as the source's
            where = f" (moving {e.filename} to {e.filename2})"
        return JSONResponse({"detail": f"the data folder cannot be changed: {e.strerror or e}{where}"}, status_code=409)

    @app.exception_handler(ImageError)
    def _bad_image(request: Request, e: ImageError) -> JSONResponse:
        name = request.query_params.get("path", "this image")  # /api/thumb and /api/image name it
        return JSONResponse({"detail": f"cannot show {name}: {e}"}, status_code=422)

    def find_image(path: str) -> Path:
        """The file of the image ``path`` names (404 if none)."""
        try:
            f = safe_rel(root, path)
        except UnsafePathError:  # outside through a link: readable if listed (it is inside the data set)
            f = safe_rel(root, path, through_links=True)
            if f.relative_to(root).as_posix() not in index.present():
                raise
        if not f.is_file() and (listed := index.on_disk(f.relative_to(root).as_posix())):
            f = root / listed  # named in its other Unicode form
        if not f.is_file():
            raise FileNotFoundError(f"no image {path!r} in the data folder")
        return f

    def image_file(path: str) -> Path:
        """The file of the image ``path`` names, found readable (if not, refused with why: not as an image that
        fails to decode)."""
        f = find_image(path)
        read(f, path, 0)
        return f

    def read(f: Path, path: str, size: int = -1) -> bytes:
        """The first ``size`` bytes of the image file ``f`` (named ``path`` in the request), all by default."""
        try:
            with open(f, "rb") as file:
                return file.read(size)
        except FileNotFoundError:  # removed since it was found
            raise FileNotFoundError(f"no image {path!r} in the data folder") from None
        except OSError as e:
            raise ImageError(f"{unreadable_reason(f, e)}: make the file readable (check its permissions)") from e

    def need_run() -> RunResults:
        if results is None:
            raise HTTPException(404, "no run given: start the app with --run RUN_DIR to see results")
        return results

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(static_dir() / "index.html")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        folders = index.folders()
        return {
            "data_root": str(root),
            "classes": index.classes(),
            "counts": {k: len(v) for k, v in folders.items()},
            "unlabeled_dir": UNLABELED_DIR,
            "splits": split_folders(root),  # a data folder laid out by split: train/<class>/..., val/<class>/...
            "run": None if results is None else {"path": str(run_dir), "classes": results.classes},
            "journal": str(journal.path),
        }

    @app.get("/api/images")
    def images(label: str, page: Page = 1, per_page: PerPage = 60) -> dict[str, Any]:
        folders, label = index.folders(), composed(label)
        if label not in folders:
            raise HTTPException(404, f"no folder {label!r} in the data folder")
        out = _page([{"path": p, "label": label} for p in folders[label]], page, per_page)
        for item in out["items"]:  # for this page only: a stat per image
            item["v"] = file_version(root / item["path"])
        return out

    @app.get("/api/thumb")
    def thumb(path: str, size: Annotated[int, Query(ge=32, le=512)] = 160) -> Response:
        jpeg = thumbs.get(image_file(path), size, max_pixels)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    @app.get("/api/image")
    def image(path: str) -> Response:
        # A browser's format is sent as read from one open file (a file response stats and opens the path again,
        # and a file removed or replaced in between made a 500 or a body of another length than announced), unless
        # turned by an EXIF orientation browsers do not apply; else the preview, upright as the model sees it.
        f = find_image(path)
        if f.suffix.lower() not in BROWSER_FORMATS:
            read(f, path, 0)  # unreadable: refused with why (as image_file does)
        elif not _turned_by_exif(data := read(f, path)):
            media_type = mimetypes.guess_type(f.name)[0]
            return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})
        return Response(thumbs.preview(f, max_pixels=max_pixels), media_type="image/jpeg")

    def listed_image(path: str) -> str:
        """``path`` written as the listing writes it, if it names an image the app lists; else refused."""
        f = safe_rel(root, path)
        rel = f.relative_to(root).as_posix()
        rel = index.on_disk(rel) or rel  # the file on disk, whichever Unicode form names it
        if rel not in index.present():
            if not f.is_file() and (now := journal.moved().get(rel)):  # a second click, another tab
                raise MovedAwayError(f"{rel} is no longer there: already moved to {now} (by another request)")
            if not f.is_file():
                raise FileNotFoundError(f"no image {path!r} in the data folder")
            raise UnsafePathError(
                f"not an image of the data set: {path!r}; only images in a class folder or in {UNLABELED_DIR}/ "
                "can be relabelled"
            )
        return rel

    @app.post("/api/relabel")
    def relabel(req: RelabelRequest) -> dict[str, Any]:
        record = journal.move(listed_image(req.path), req.label, index.classes())
        index.invalidate()
        return record

    @app.post("/api/undo")
    def undo(req: UndoRequest) -> dict[str, Any]:
        report = journal.undo(everything=req.all, last_id=req.id)
        index.invalidate()
        return {"undone": report.undone, "problems": report.problems}

    @app.get("/api/journal")
    def journal_moves(page: Page = 1, per_page: PerPage = 50) -> dict[str, Any]:
        return _page(journal.active()[::-1], page, per_page)

    @app.get("/api/results")
    def run_results(
        outcome: Literal["all", "right", "wrong"] = "all",
        true: str | None = None,
        pred: str | None = None,
        sort: Literal["confidence_asc", "confidence_desc", "path"] = "confidence_asc",
        page: Page = 1,
        per_page: PerPage = 60,
    ) -> dict[str, Any]:
        res = need_run()
        true, pred = (None if v is None else composed(v) for v in (true, pred))
        rows = [
            r
            for r in res.rows
            if (outcome == "all" or r["correct"] == (outcome == "right"))
            and (true is None or r["true"] == true)
            and (pred is None or r["pred"] == pred)
        ]
        if sort == "path":
            rows.sort(key=lambda r: r["path"])
        else:
            rows.sort(key=lambda r: r["confidence"], reverse=sort == "confidence_desc")
        out = _page(rows, page, per_page, classes=res.classes)
        present = index.present()
        moved = {composed(first): now for first, now in journal.moved().items()}
        for item in out["items"]:  # where the image lies now: relabelled since the run, it moved
            here = index.on_disk(item["path"])
            now = here or moved.get(composed(item["path"]))
            if now not in present:  # moved or renamed by hand: found by the content split.csv records
                now = by_content.find(res.digests.get(composed(item["path"]), ""))
            item.update(exists=here is not None, now=now, v=file_version(root / now) if now else None)
        return out

    @app.get("/api/confusion")
    def confusion() -> dict[str, Any]:
        res = need_run()
        return {"classes": res.classes, "matrix": res.confusion}

    @app.get("/api/analysis")
    def analysis_status() -> dict[str, Any]:
        return analyzer.status()

    @app.post("/api/analysis")
    def analysis_start() -> dict[str, Any]:
        return dict(analyzer.status(), started=analyzer.start())

    def with_why(kind: Literal["skipped", "unchecked"], page: int, per_page: int) -> dict[str, Any]:
        reasons: dict[str, str] = getattr(analyzer.result, kind, {})
        return _page([{"path": p, "reason": why} for p, why in sorted(reasons.items())], page, per_page)

    @app.get("/api/skipped")
    def skipped(page: Page = 1, per_page: PerPage = 50) -> dict[str, Any]:
        """The images the last analysis could not read or decode, with why."""
        return with_why("skipped", page, per_page)

    @app.get("/api/unchecked")
    def unchecked(page: Page = 1, per_page: PerPage = 50) -> dict[str, Any]:
        """The labelled images the last analysis could not cross-check (the only image of their class), with why."""
        return with_why("unchecked", page, per_page)

    def scored(kind: Literal["suspects", "unlabeled"], page: int, per_page: int) -> dict[str, Any]:
        r = analyzer.result
        present = index.present()
        items = [s for s in getattr(r, kind) if s["path"] in present] if r else []
        out = _page(items, page, per_page, classes=r.classes if r else [], analysis=analyzer.status())
        out["items"] = [dict(s, v=file_version(root / s["path"])) for s in out["items"]]  # copies: r is shared
        return out

    @app.get("/api/suspects")
    def suspects(page: Page = 1, per_page: PerPage = 60) -> dict[str, Any]:
        return scored("suspects", page, per_page)

    @app.get("/api/unlabeled")
    def unlabeled(page: Page = 1, per_page: PerPage = 60) -> dict[str, Any]:
        return scored("unlabeled", page, per_page)

    app.mount("/static", StaticFiles(directory=static_dir()), name="static")
    return app
