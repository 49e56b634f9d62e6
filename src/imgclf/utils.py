"""Small shared helpers: atomic file writes, hashing, CPU facts."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import sys
import tempfile
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

UMASK = os.umask(0)
os.umask(UMASK)


def default_cache_dir() -> Path:
    """``$IMGCLF_CACHE``, else ``~/.cache/imgclf``: features, converted models, hashes, memoised fits."""
    return Path(os.environ.get("IMGCLF_CACHE") or Path.home() / ".cache" / "imgclf").expanduser()


def writable_cache_dir(path: Path) -> Path:
    """``path``, created if needed; ValueError saying what to do when it cannot hold the cache."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        why = "a file is in the way" if path.is_file() else e.strerror or e
        raise ValueError(
            f"cache folder {path} cannot be written ({why}): point $IMGCLF_CACHE or --cache-dir at a writable folder"
        ) from None
    return path


def _is_control(c: str) -> bool:
    return unicodedata.category(c) == "Cc"


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as printable text: bytes that are not UTF-8 and control characters (a line break) escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c.encode("unicode_escape").decode("ascii") if _is_control(c) else c for c in text)


def has_control_character(name: str) -> bool:
    """Whether ``name`` holds a control character (a line break or tab), which breaks text output."""
    return any(map(_is_control, name))


def read_utf8(path: Path, what: str) -> str:
    """The text of a user's file (``what``: "URL list", ...), UTF-8 with or without the byte-order mark that
    Windows editors write; a ValueError names the file, the byte and what to do (UTF-16: PowerShell 5's ``>``)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf16 = " (it is UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ValueError(
            f"{what} {path} is not UTF-8 text{utf16}: byte {data[e.start]:#04x} at position {e.start} is not "
            "UTF-8; save the file as UTF-8 (your editor's 'Save as' offers the encoding), then run the command again"
        ) from None


def is_utf8(name: str) -> bool:
    """Whether a file name decoded from the file system is valid UTF-8 (no undecodable bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def make_folder(path: Path, what: str, flag: str) -> None:
    """``mkdir -p path``; a file in the way (at ``path`` or above it) is an error naming ``what`` and ``flag``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"cannot make the {what} {path}: a file is in the way; give another {flag}") from e


def missing_from(path: Path) -> tuple[Path, Path | None]:
    """``path`` with ".." resolved (new/../b/run makes b/run, never removes b), and the first folder on the way
    to it that is not there yet (None where all are): what making it makes, for :func:`remove_made`."""
    made = Path(os.path.abspath(path))
    return made, next((f for f in (*reversed(made.parents), made) if not f.exists()), None)


def remove_made(made: Path, fresh: Path | None) -> None:
    """Remove ``made`` and the folders above it up to ``fresh`` (see :func:`missing_from`) while they are empty."""
    with contextlib.suppress(OSError):  # one not empty ends it
        for folder in (made, *made.parents) if fresh is not None else ():
            folder.rmdir()
            if folder == fresh:
                break


@contextlib.contextmanager
def folder_for(path: Path, what: str, flag: str) -> Iterator[None]:
    """:func:`make_folder` for the block; where the block fails, the folders it made go again if empty (a
    refused export into a new ``--out models/`` left an empty ``models``)."""
    made, fresh = missing_from(path)
    make_folder(path, what, flag)
    try:
        yield
    except BaseException:
        remove_made(made, fresh)
        raise


def atomic_write_files(files: Mapping[Path, bytes], durable: bool = True, parents: bool = True) -> None:
    """Write ``files`` (path -> content) as one unit: every content goes to a temporary file beside its path
    first, and only then do they replace their files, so that a failed write (a full disk) changes none of
    them. (A rename that fails after others succeeded, a folder in the way, leaves those replaced.)

    ``durable=False`` skips the fsync: for caches, whose entries can be recomputed. ``parents=False``: a
    missing folder is an error (FileNotFoundError naming the file), not made again.
    """
    temps: list[tuple[Path, str]] = []  # written, not yet moved into place
    try:
        for path, data in files.items():
            temps.append((path, _temp_copy(path, data, durable, parents)))
        while temps:
            path, tmp = temps[0]
            try:
                os.replace(tmp, path)
            except IsADirectoryError:  # checked here, not before every write
                raise IsADirectoryError(f"{path} is a folder: give the name of a file to write") from None
            except OSError as e:  # name the file wanted, not the temporary one
                raise OSError(e.errno, e.strerror, str(path)) from e
            temps.pop(0)
    finally:
        for _, tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _temp_copy(path: Path, data: bytes, durable: bool, parents: bool) -> str:
    """A temporary file beside ``path`` holding ``data``; an OSError names ``path``, not the temporary file."""
    tmp = None
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if hasattr(os, "fchmod"):  # not on Windows before Python 3.13 (where only a read-only bit exists)
            os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        return tmp
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def temp_leftovers(path: Path) -> list[Path]:
    """The temporary files and folders that :func:`atomic_write_files` and :func:`atomic_dir` make beside
    ``path``: there while a write is under way, left over where a process was killed meanwhile."""
    random = "?" * 8  # tempfile's names
    return [*path.parent.glob(f".{path.name}.{random}.tmp"), *path.parent.glob(f".{path.name}.old-{random}")]


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True, parents: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a partial one.

    ``durable`` and ``parents`` as for :func:`atomic_write_files`.
    """
    atomic_write_files({path: data}, durable, parents)


def atomic_write_text(path: Path, text: str, parents: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), parents=parents)


FULL_DISK_MARGIN = 16 << 20  # bytes free on a disk under which a write that failed there is put down to it


def write_failure(path: Path, e: Exception) -> OSError:
    """The OSError naming ``path`` to raise for its failed write ``e``. torch and OpenVINO raise RuntimeErrors
    that say neither which file nor why: ENOSPC where the disk holding ``path`` has under FULL_DISK_MARGIN
    free (so call this before the partial file is removed), else EIO with the library's words."""
    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, e.strerror, str(path))
    try:
        full = shutil.disk_usage(path.parent).free < FULL_DISK_MARGIN
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"could not be written ({e})", str(path))


@contextlib.contextmanager
def scratch_named_as(scratch: Path, final: Path) -> Iterator[None]:
    """An OSError about a file in ``scratch`` (a temporary folder) names that file's place in ``final``."""
    try:
        yield
    except OSError as e:
        if e.filename is None or not Path(e.filename).is_relative_to(scratch):
            raise
        raise OSError(e.errno, e.strerror, str(final / Path(e.filename).relative_to(scratch))) from e


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Give PyTorch back the thread count its caller had set (computing sets its own: ``--workers``)."""
    torch = sys.modules.get("torch")  # not imported yet: the caller set nothing
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None and threads is not None:
            torch.set_num_threads(threads)


_DIGEST = 32  # bytes of the SHA-256 that starts every Memo entry
_ENTRY_FORMAT = b"memo entry 2: sha256 + data"  # in every key: an imgclf that wrote entries otherwise never reads these


class Memo:
    """Outputs of deterministic steps, kept under ``root/<kind>/`` by a digest of everything they depend on.

    A re-run with the same inputs and settings reads an output back instead of computing it again. Keys
    should include the code that computes the output (pass its source file as a ``Path``) and the library
    versions it depends on. ``root=None`` turns the memo off. Each entry starts with the SHA-256 of its
    output: one cut short (entries are written without fsync, which a crash can truncate) is computed again.
    """

    def __init__(self, root: Path | None, kind: str) -> None:
        self.dir = root / kind if root is not None else None

    @staticmethod
    def key(*parts: object) -> str:
        """Digest of ``parts``: arrays by dtype, shape and bytes, paths by file content, the rest as JSON."""
        h = hashlib.sha256(_ENTRY_FORMAT)
        for part in parts:
            if isinstance(part, np.ndarray):
                a = np.ascontiguousarray(part)
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(a.tobytes())
            elif isinstance(part, Path):
                h.update(part.read_bytes())
            else:
                h.update(json.dumps(part, sort_keys=True, default=str).encode())
            h.update(b"\0")
        return h.hexdigest()[:32]

    def get(self, key: str) -> bytes | None:
        """The output stored under ``key``; None where there is none or it is not whole."""
        if self.dir is None:
            return None
        try:
            entry = (self.dir / key).read_bytes()
        except OSError:
            return None
        digest, data = entry[:_DIGEST], entry[_DIGEST:]
        return data if hashlib.sha256(data).digest() == digest else None

    def put(self, key: str, data: bytes) -> None:
        if self.dir is not None:
            with contextlib.suppress(OSError):  # a memo that cannot be written only costs a recomputation
                atomic_write_bytes(self.dir / key, hashlib.sha256(data).digest() + data, durable=False)

    def compute(self, key: str, fn: Callable[[], bytes]) -> bytes:
        """The output stored under ``key``, else ``fn()`` (then stored)."""
        data = self.get(key)
        if data is None:
            data = fn()
            self.put(key, data)
        return data


@contextlib.contextmanager
def atomic_dir(path: Path, parents: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole.

    ``parents=False``: a missing parent folder is an error (FileNotFoundError naming ``path``), not made again.
    """
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:  # name the folder wanted, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from e
    os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700 folders; a model is meant to be read by others too
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))  # a name no crash left
            old.rmdir()
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # the earlier folder back where it was
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


RUN_LOCK = ".imgclf.lock"  # the file run_folder_lock holds in a run folder


class FolderInUse(RuntimeError):
    """Another imgclf command is writing into the same run folder."""


def run_folder_lock(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``run_dir`` for one train or evaluate: a second one into it stops at once (``FolderInUse``)
    instead of mixing two runs' files. The lock (a hidden file, ``flock``) ends with the process."""
    busy = (
        f"the run folder {run_dir} is in use by another imgclf train or evaluate: wait for it to end "
        "(or train into another --out)"
    )
    return held(run_dir / RUN_LOCK, busy)


@contextlib.contextmanager
def held(lock_file: Path, busy: str, optional: bool = False) -> Iterator[None]:
    """Hold ``lock_file`` (``flock``; released when the process ends, however it ends); ``FolderInUse(busy)``
    at once where another process holds it. On a file system without flock, unguarded; ``optional``: also
    where the lock file cannot be opened (another user's)."""
    from filelock import FileLock, Timeout

    lock = FileLock(lock_file, timeout=0)
    unguarded = (NotImplementedError, OSError) if optional else (NotImplementedError,)  # no flock: network mounts
    try:
        lock.acquire()
    except Timeout:  # an OSError too: first
        raise FolderInUse(busy) from None
    except unguarded:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def folder_in_use(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir`` with :func:`run_folder_lock` (a train still running)."""
    from filelock import FileLock, Timeout

    lock_file = Path(run_dir) / RUN_LOCK
    if not lock_file.is_file():
        return False
    try:
        with FileLock(lock_file, timeout=0):
            return False
    except Timeout:
        return True
    except (NotImplementedError, OSError):  # no flock here, or no right to lock: not known to be in use
        return False


@contextlib.contextmanager
def quiet_torch_jit() -> Iterator[None]:
    """Silence torch.jit's deprecation warnings (its tracer still serves OpenVINO, ONNX and TorchScript)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.cache
def cpu_count() -> int:
    """CPU cores this process may use: its CPU affinity and a container's CPU quota (cgroups) counted, so
    that ``docker run --cpus 4`` on a 64-core host sizes thread pools for 4, not 64."""
    from joblib import cpu_count as usable  # loky's count: affinity, cgroup quota, $LOKY_MAX_CPU_COUNT

    return max(1, usable())


@functools.cache
def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_amx_bf16() -> bool:
    """True where the CPU has AMX bf16 tile units (where bf16 inference beats fp32)."""
    return " amx_bf16" in _cpu_flags()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_freed_memory() -> None:
    """Give memory freed in this process back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    After a large image, each thread's malloc arena kept what it had decoded in: one server thread a
    100 Mpx PNG held 1.2 GB long after its answer."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 itself (AVX-512 BF16 or AMX); elsewhere PyTorch emulates it."""
    flags = _cpu_flags()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on ``host:port``, one for each of its addresses (``localhost`` may be 127.0.0.1 and
    ::1), as uvicorn would open them; ValueError, saying what to do, when one cannot be. A server opens them
    before it loads its model and keeps them: a port only tested for then was taken meanwhile by a second
    server, which failed after loading with uvicorn's bare "address already in use"."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        ):
            sockets.append(sock := socket.socket(family, kind, proto))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            if family == socket.AF_INET6:  # as asyncio does: "::" is IPv6 only
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            port = port or sock.getsockname()[1]  # port 0: the one the first address got, for all of them
            sock.listen()  # binding alone does not keep another SO_REUSEADDR socket off the port
    except OSError as e:
        for sock in sockets:
            sock.close()
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            advice = "give --host an address of this machine (127.0.0.1, or 0.0.0.0 for all)"
        else:
            advice = "choose another --port, or stop what uses it"
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}): {advice}") from None
    return sockets


def ensure_port_free(host: str, port: int) -> None:
    """Raise ValueError, saying what to do, when a server could not listen on ``host:port``."""
    for sock in listening_sockets(host, port):
        sock.close()


def is_loopback(host: str) -> bool:
    """Whether a server listening on ``host`` is reachable from this machine only."""
    name = host.strip("[]")
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def only_local_hosts(app: Any, host: str) -> Any:
    """``app``, refusing (400) requests whose Host header names another machine when it listens on a
    loopback address: against DNS rebinding, where a web page, once its site's name points at 127.0.0.1,
    could read the app and act in it from the user's own browser. Other addresses are the user's choice."""
    if not is_loopback(host):
        return app
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    name = host.strip("[]")
    literal = f"[{name}]" if ":" in name else name
    return TrustedHostMiddleware(app, allowed_hosts=sorted({"localhost", "127.0.0.1", "[::1]", literal}))


FINETUNE_OUTPUTS = ("finetune_log.csv", "finetune_curves.png")
# Results an earlier run in the same folder may have left that a new run does not always rewrite.
EARLIER_OUTPUTS = ("leaks.csv", "label_conflicts.csv", *FINETUNE_OUTPUTS, "train_metrics.json", "train_predictions.csv")
# The result files train writes into a run folder (besides model/ and the fine-tuning's state).
RUN_FILES = (
    *("split.csv", "config.json", "metrics.json", "predictions.csv", "report.html", "report.md", "evaluation.png"),
    *EARLIER_OUTPUTS,
)


def check_output_file(path: Path, flag: str, inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Refuse, before any work, an output file (``flag``'s) that cannot be written (a file where its folder
    belongs, no permission) or would be written over what must stay: an image (``--csv a.jpg b.jpg``, the
    arguments swapped), one of the ``inputs``, or a file train wrote into a run folder or model bundle (written
    over, a run's split.csv or bundle.json lost the run); a file of the user's beside them may be rewritten."""
    from imgclf.data.io import IMAGE_EXTENSIONS

    folder = path.parent  # made where missing: the nearest folder that is there must let it be made
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{flag} {display_path(path)}: {display_path(folder)} is a file, not a folder")
    if path.is_dir():
        raise IsADirectoryError(f"{display_path(path)} is a folder: give the name of a file to write")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), display_path(path))
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        kind = ".md" if flag == "--markdown" else ".csv"
        raise FileExistsError(f"{flag} {display_path(path)}: named as an image, not written; name a {kind} file")
    if not path.exists():
        return
    if any(Path(i).exists() and os.path.samefile(path, i) for i in inputs):
        raise FileExistsError(f"{flag} {display_path(path)}: that is an input, not overwritten; name another file")
    in_bundle = (path.parent / "bundle.json").is_file()  # every file of a model bundle is the model's
    if in_bundle or (path.name in RUN_FILES and (path.parent / "model" / "bundle.json").is_file()):
        raise FileExistsError(
            f"{flag} {display_path(path)}: a file of the run in {display_path(path.parent)}, not overwritten; name "
            "another file"
        )
