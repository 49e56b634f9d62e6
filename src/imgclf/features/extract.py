"""Batched feature extraction: parallel decoding feeding a runtime, with an on-disk cache per image."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imgclf.backbones import Backbone, create_backbone
from imgclf.config import Config
from imgclf.data.io import (
    DECODE_VERSION,
    ImageError,
    Preprocess,
    is_handed_over_pipe,
    load_for_model,
    not_a_plain_file,
    unreadable_reason,
)
from imgclf.features.runtimes import Runtime, create_runtime, device_type, resolve_precision, resolve_runtime
from imgclf.utils import atomic_write_bytes, cpu_count, default_cache_dir, file_sha256, writable_cache_dir

log = logging.getLogger("imgclf")


class FeatureCache:
    """One ``.npy`` per (image content, feature model): ``root/<model key>/<sha[:2]>/<sha>.npy``."""

    def __init__(self, root: Path, model_key: str) -> None:
        self.dir = root / "features" / model_key
        self.writable = True

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        try:
            return np.load(self._path(digest), allow_pickle=False)
        except (ValueError, OSError, EOFError):  # missing, or cut short (EOFError: empty) by a crash
            return None

    def put(self, digest: str, vector: np.ndarray) -> None:
        import io

        if not self.writable:
            return
        buf = io.BytesIO()
        np.save(buf, vector.astype(np.float32, copy=False), allow_pickle=False)
        try:
            atomic_write_bytes(self._path(digest), buf.getvalue(), durable=False)
        except OSError as e:  # a full disk: the run goes on, later runs compute these features again
            self.writable = False
            log.warning("warning: features not cached from here on (%s in %s)", e.strerror or e, self.dir)


@dataclass
class FeatureResult:
    """Features of the images that decoded (rows in input order) and the reasons of those that did not."""

    features: np.ndarray
    ok: np.ndarray  # bool mask over the input paths
    errors: dict[int, str] = field(default_factory=dict)
    n_cached: int = 0
    digests: dict[int, str] = field(default_factory=dict)  # SHA-256 of each image read (with the cache only)


class FeatureExtractor:
    """Turn image files into backbone features, reusing cached ones.

    Decoding runs in a thread pool (Pillow releases the GIL) while the runtime computes the previous batch.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        runtime: str = "auto",
        precision: str = "auto",
        device: str = "auto",
        batch_size: int = 32,
        workers: int = 0,
        cache_dir: Path | None = None,
        use_cache: bool = True,
        flip_tta: bool = False,
        max_pixels: int | None = None,
        progress: bool = True,
    ) -> None:
        self.backbone, self.batch_size, self.flip_tta = backbone, batch_size, flip_tta
        self.workers, self.max_pixels, self.progress = workers or cpu_count(), max_pixels, progress
        dev = device_type(device)
        self.runtime_name = resolve_runtime(runtime, dev)
        self.precision = resolve_precision(precision, self.runtime_name, dev)
        self.device = device
        self.cache_root = writable_cache_dir(cache_dir or default_cache_dir())
        # randomly initialised weights differ at each build while their id stays "random": never cached
        cacheable = use_cache and backbone.weights_id != "random"
        self.cache = FeatureCache(self.cache_root, self.model_key) if cacheable else None
        self._runtime: Runtime | None = None

    @classmethod
    def from_config(cls, cfg: Config, backbone: Backbone | None = None) -> FeatureExtractor:
        """The extractor ``cfg`` describes, on ``backbone`` where given (else the one ``cfg`` names)."""
        b, f = cfg.backbone, cfg.features
        backbone = backbone or create_backbone(b.backbone, weights=b.weights, resolution=b.resolution)
        return cls(
            backbone,
            runtime=f.runtime,
            precision=f.precision,
            device=f.device,
            batch_size=f.batch_size,
            workers=f.workers,
            cache_dir=f.cache_dir,
            use_cache=f.use_cache,
            flip_tta=f.flip_tta,
            max_pixels=cfg.data.max_image_pixels,
            progress=cfg.output.progress,
        )

    @property
    def preprocess(self) -> Preprocess:
        return self.backbone.preprocess

    @property
    def model_key(self) -> str:
        """Names the feature model: backbone, weights, preprocessing, runtime, precision, test-time flip."""
        spec = dict(
            self.backbone.spec(),
            runtime=self.runtime_name,
            precision=self.precision,
            flip=self.flip_tta,
            decode=DECODE_VERSION,
        )
        if self.runtime_name == "torch" and (dev := device_type(self.device)) != "cpu":
            spec["device"] = dev  # a GPU computes fp32 convolutions in TF32: features differ from the CPU's
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        res = self.preprocess.resolution
        return f"{self.backbone.name.replace(':', '_')}-{res}-{self.runtime_name}-{self.precision}-{digest}"

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            model_dir = self.cache_root / "models" / self.model_key
            self._runtime = create_runtime(
                self.backbone.feature_net,
                self.preprocess.resolution,
                self.runtime_name,
                self.precision,
                self.device,
                self.workers,
                model_dir,
            )
        return self._runtime

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Features of a uint8 NHWC batch (already resized and cropped)."""
        parts = [np.empty((0, self.backbone.num_features), np.float32)]
        for i in range(0, len(batch), self.batch_size):
            chunk = batch[i : i + self.batch_size]
            f = self.runtime(chunk)
            if self.flip_tta:
                f = 0.5 * (f + self.runtime(np.ascontiguousarray(chunk[:, :, ::-1])))
            parts.append(f)
        return np.concatenate(parts)

    def _decode(self, path: Path, digest: str | None, name: str | None = None) -> tuple[np.ndarray | str, bool]:
        """The decoded image (or why not), and whether the file still has ``digest`` after decoding: a file
        replaced meanwhile must not have its new features cached under its old content's digest. ``name``: the
        path's name in messages, where not its own."""
        try:
            image = load_for_model(path, self.preprocess, self.max_pixels, name)
        except ImageError as e:
            return str(e), False
        except OSError as e:
            return unreadable_reason(Path(name) if name else path, e), False
        return image, digest is not None and _digest(path) == digest

    def _decoded(
        self, pool: ThreadPoolExecutor, paths: Sequence[Path], digests: Sequence[str | None], shown: dict[Path, str]
    ) -> Iterator[tuple[np.ndarray | str, bool]]:
        """Decoded images in order (see :meth:`_decode`), with a bounded number decoding ahead."""
        ahead = 3 * self.batch_size

        def submit(i: int) -> Future:
            return pool.submit(self._decode, paths[i], digests[i], shown.get(paths[i]))

        futures: list[Future] = [submit(i) for i in range(min(ahead, len(paths)))]
        for i in range(len(paths)):
            if i + ahead < len(paths):
                futures.append(submit(i + ahead))
            yield futures[i].result()
            futures[i] = None  # type: ignore[call-overload]  # free the decoded image

    def extract(self, paths: Sequence[str | Path], desc: str = "features") -> FeatureResult:
        """Features for every path; images that fail to decode are reported in ``errors``, never raised."""
        if isinstance(paths, str | os.PathLike):  # a str is a sequence too: of one-letter paths
            raise TypeError(f"extract takes a list of paths, not one path: give [{str(paths)!r}]")
        paths = [Path(p) for p in paths]
        if not any(map(is_handed_over_pipe, paths)):
            return self._extract(paths, desc)
        # a pipe's bytes can be read once (hashing them for the cache left nothing to decode: "empty file"):
        # each pipe is read once into a file, named as given in messages
        with tempfile.TemporaryDirectory(prefix="imgclf-") as spool:
            copies: dict[Path, Path | str] = {}  # pipe -> its copy, or why it could not be read
            for pipe in dict.fromkeys(p for p in paths if is_handed_over_pipe(p)):
                copy = Path(spool, str(len(copies)))
                try:
                    with open(pipe, "rb") as src, open(copy, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    copies[pipe] = copy
                except OSError as e:
                    copies[pipe] = f"could not read the pipe ({e.strerror or e})"
            failed = {i: why for i, p in enumerate(paths) if isinstance(why := copies.get(p), str)}
            shown = {copy: str(pipe) for pipe, copy in copies.items() if isinstance(copy, Path)}
            read = [copy if isinstance(copy := copies.get(p), Path) else p for p in paths]
            return self._extract(read, desc, shown, failed)

    def _extract(
        self, paths: list[Path], desc: str, shown: dict[Path, str] | None = None, failed: dict[int, str] | None = None
    ) -> FeatureResult:
        """:meth:`extract` of ``paths``; ``shown``: the name a path has in messages where not its own (a pipe's
        copy), ``failed``: why the paths of these indices cannot be read."""
        n = len(paths)
        feats = np.zeros((n, self.backbone.num_features), np.float32)
        ok = np.zeros(n, bool)
        errors: dict[int, str] = dict(failed or {})
        digests: list[str | None] = [None] * n
        todo: list[int] = []
        with ThreadPoolExecutor(self.workers) as pool:
            if self.cache is not None:
                for i, d in enumerate(pool.map(_digest, paths)):
                    if i in errors:
                        continue
                    digests[i] = d
                    if isinstance(d, str) and d.startswith("!"):
                        errors[i] = d[1:]
                        continue
                    v = self.cache.get(d)
                    if v is not None and v.shape == (self.backbone.num_features,):
                        feats[i], ok[i] = v, True
                    else:
                        todo.append(i)
            else:
                todo = [i for i in range(n) if i not in errors]
            n_cached = int(ok.sum())
            bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not self.progress or not todo, leave=False)
            batch_idx: list[int] = []
            batch: list[np.ndarray] = []
            unchanged: set[int] = set()  # decoded from the content their digest names

            def flush() -> None:
                f = self.embed_arrays(np.stack(batch))
                for j, i in enumerate(batch_idx):
                    feats[i], ok[i] = f[j], True
                    if self.cache is not None and i in unchanged:
                        self.cache.put(digests[i], f[j])  # type: ignore[arg-type]
                bar.update(len(batch))
                batch.clear()
                batch_idx.clear()

            decoded = self._decoded(pool, [paths[i] for i in todo], [digests[i] for i in todo], shown or {})
            for i, (img, same) in zip(todo, decoded, strict=True):
                if isinstance(img, str):
                    errors[i] = img
                    bar.update(1)
                    continue
                if same:
                    unchanged.add(i)
                batch.append(img)
                batch_idx.append(i)
                if len(batch) == self.batch_size:
                    flush()
            if batch:
                flush()
            bar.close()
        sums = {i: d for i, d in enumerate(digests) if d is not None and not d.startswith("!")}
        return FeatureResult(feats, ok, errors, n_cached, sums)


def _digest(path: Path) -> str:
    try:
        if why := not_a_plain_file(path, path.stat()):
            return f"!{why}"
        return file_sha256(path)
    except OSError as e:
        return f"!{unreadable_reason(path, e)}"
