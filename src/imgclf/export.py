"""Export a bundle as one self-contained model file (ONNX, OpenVINO IR or TorchScript) plus a JSON sidecar.

The exported network is the whole classifier: uint8 NHWC images (already resized and centre-cropped to the
bundle's resolution) -> normalisation -> backbone -> linear head -> softmax probabilities. The sidecar
(``<out stem>.json``) names the classes and the resize/crop to apply, so users need neither imgclf nor torch.
Every export is checked against the PyTorch bundle before its files replace anything.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from imgclf import __version__
from imgclf.bundle import BUNDLE_DIR, Bundle
from imgclf.config import DataConfig
from imgclf.data.io import IMAGE_EXTENSIONS, ImageError, list_files, load_for_model
from imgclf.features.runtimes import convert_openvino, export_onnx
from imgclf.utils import (
    UMASK,
    atomic_write_bytes,
    atomic_write_text,
    folder_for,
    quiet_torch_jit,
    scratch_named_as,
    write_failure,
)

log = logging.getLogger(__name__)

Format = Literal["onnx", "openvino", "torchscript"]
Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: dict[str, tuple[str, ...]] = {
    "onnx": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
    "torchscript": ("fp32",),
}
_ENDINGS = {"onnx": (".onnx",), "openvino": (".xml",), "torchscript": (".pt", ".pth")}  # what --out may end in
_SUFFIXES = {fmt: endings[0] for fmt, endings in _ENDINGS.items()}  # of a file written into an --out folder
FP32_TOLERANCE = 1e-3
MIN_TOP1_AGREEMENT = 0.99
SIDECAR_FORMAT = "imgclf-export/1"
ONNX_MODULES = ("onnx", "onnxruntime")  # the [onnx] extra: the writer and the parity check's runtime


class ExportError(ValueError):
    """An export that cannot be done as asked, or whose model does not match the bundle."""


@dataclass
class ParityReport:
    """How the exported model's probabilities compare with the PyTorch bundle's on the same images."""

    source: str
    n_images: int
    max_abs_diff: float
    top1_agreement: float
    criterion: str
    passed: bool


@dataclass
class ExportResult:
    files: list[Path]
    sidecar: Path
    parity: ParityReport


def _image_files(folder: Path) -> list[Path]:
    return [p for p in list_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]


def split_paths(bundle: Bundle, run_dir: Path, part: str) -> list[Path]:
    """Image paths of one part ("train"/"test") of the run's ``split.csv``; [] when there is none."""
    root = (bundle.config.get("data") or {}).get("data_root")
    candidates = [run_dir / "split.csv"] + ([bundle.path.parent / "split.csv"] if bundle.path else [])
    split_csv = next((p for p in candidates if p.is_file()), None)
    if split_csv is None or not root:
        return []
    if not Path(root).is_dir():
        log.warning("the run's data folder %s is not there (moved or renamed?): its %s images are not used", root, part)
        return []
    with open(split_csv, newline="", encoding="utf-8") as f:
        return [Path(root) / row["path"] for row in csv.DictReader(f) if row["split"] == part]


def load_images(paths: Sequence[Path], bundle: Bundle, limit: int) -> list[np.ndarray]:
    """Model-ready arrays of up to ``limit`` readable images (unreadable ones, and those over the run's pixel
    limit, are skipped)."""
    out: list[np.ndarray] = []
    skipped: list[str] = []
    max_pixels = bundle.max_image_pixels or DataConfig().max_image_pixels
    for p in paths:
        if len(out) >= limit:
            break
        try:
            out.append(load_for_model(p, bundle.preprocess, max_pixels))
        except (ImageError, OSError) as e:
            skipped.append(f"{p}: {e}")
    if skipped:  # one line, however many: a moved data folder would otherwise log every image
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        log.warning("%d image(s) not readable, not used: %s%s", len(skipped), "; ".join(skipped[:3]), more)
    return out


def random_images(n: int, resolution: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random colour images (blobs, not pixel noise): a stand-in when no real images are at hand."""
    rng = np.random.default_rng(seed)
    return [
        np.asarray(
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
                (resolution, resolution), Image.Resampling.BICUBIC
            )
        )
        for _ in range(n)
    ]


def parity_images(
    bundle: Bundle, run_dir: Path, check_dir: Path | None, limit: int, precision: str = "fp32"
) -> tuple[np.ndarray, str]:
    """Images for the parity check: ``check_dir``, else the run's test split, else (fp32 only) random images.

    bf16 and int8 are refused without real images: on random ones an int8 model calibrated on them passed the
    check, then changed the top class of 8-12 % of real images."""
    if check_dir is not None:
        if not check_dir.is_dir():
            raise ExportError(
                f"--check-images {check_dir}: {'not a folder' if check_dir.exists() else 'no such folder'}"
            )
        images = load_images(_image_files(check_dir), bundle, limit)
        if not images:
            raise ExportError(f"no readable image in {check_dir} for the parity check")
        return np.stack(images), str(check_dir)
    images = load_images(split_paths(bundle, run_dir, "test"), bundle, limit)
    if images:
        return np.stack(images), "test split"
    if precision != "fp32":
        need = "calibrate and check" if precision == "int8" else "check"
        raise ExportError(
            f"{precision} needs real images to {need}, and the run's test split is not at hand (a model folder "
            "copied without its split.csv, or the data moved): give --check-images DIR (a hundred or more images "
            "of the kind the model will see)"
        )
    log.warning("no test-split images found: checking parity on random images (--check-images FOLDER: on real ones)")
    return np.stack(random_images(min(limit, 32), bundle.preprocess.resolution)), "random images"


def torch_probabilities(net: torch.nn.Module, images: np.ndarray, batch: int = 16) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate(
            [net(torch.from_numpy(images[i : i + batch])).float().numpy() for i in range(0, len(images), batch)]
        )


def openvino_config(precision: str) -> dict[str, str]:
    """Compile options of an OpenVINO export (CPUs with bf16 units default to bf16, even for fp32)."""
    return {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}


def _predictor(path: Path, fmt: str, precision: str) -> Callable[[np.ndarray], Any]:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    if fmt == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", openvino_config(precision))
        return lambda x: compiled([x])[0]
    with quiet_torch_jit():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


def run_exported(path: Path, fmt: str, precision: str, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """Probabilities of an exported model file, computed by its own runtime."""
    run = _predictor(path, fmt, precision)
    chunks = [np.asarray(run(images[i : i + batch]), np.float32) for i in range(0, len(images), batch)]
    return np.concatenate(chunks)


def compare(reference: np.ndarray, probs: np.ndarray, precision: str, source: str) -> ParityReport:
    """fp32 must match within FP32_TOLERANCE; bf16/int8 must agree on the top-1 class of >= 99 % of images."""
    diff = float(np.abs(reference - probs).max())
    top1 = float(np.mean(reference.argmax(1) == probs.argmax(1)))
    if precision == "fp32":
        criterion, passed = f"max |p - p_torch| <= {FP32_TOLERANCE:g}", diff <= FP32_TOLERANCE
    else:
        criterion, passed = f"top-1 agreement >= {MIN_TOP1_AGREEMENT:.0%}", top1 >= MIN_TOP1_AGREEMENT
    return ParityReport(source, len(probs), diff, top1, criterion, passed)


def _int8_advice(fmt: str, precision: str, parity: ParityReport) -> str:
    """What to do when int8 moved too many top classes (the bar is not lowered: those are users' answers)."""
    if precision != "int8":
        return ""
    changed = round((1 - parity.top1_agreement) * parity.n_images)
    other = "--precision bf16 (half the size, top classes kept) or fp32" if fmt == "openvino" else "--precision fp32"
    also = "" if fmt == "openvino" else ", or --format openvino --precision int8 (it quantizes closer)"
    return (
        f" int8 changed the top class of {changed} of {parity.n_images} images: this model does not keep its "
        f"answers in 8 bits; use {other}{also}"
    )


@contextlib.contextmanager
def _nncf(show: bool) -> Iterator[Any]:
    """NNCF, imported, with its progress bars and log lines on standard error where ``show`` (imgclf's bars: on a
    terminal), else neither: they went to standard output, whose log kept their last frames. Torch's "No CUDA
    runtime is found, using CUDA_HOME=..." (logged as NNCF imports torch's C++ extension builder) is not shown
    at all: an export runs on the CPU. Everything is put back afterwards."""
    import rich

    torch_log = logging.getLogger("torch.utils.cpp_extension")
    torch_level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    console = rich.get_console()  # the one NNCF's bars (rich.progress, console=None) draw on
    quiet, on_stderr = console.quiet, console.stderr
    console.quiet, console.stderr = not show, True
    nncf_log = logging.getLogger("nncf")  # NNCF's import sets its level and a handler on standard output
    try:
        try:
            import nncf
        except ImportError as e:
            raise ExportError(
                "int8 export needs NNCF: pip install nncf (fp32, and bf16 for openvino, work without it)"
            ) from e
        level = nncf_log.level
        handlers = [h for h in nncf_log.handlers if isinstance(h, logging.StreamHandler)]
        streams = [h.stream for h in handlers]
        for h in handlers:
            h.stream = sys.stderr  # set, not setStream: that flushes the old one, perhaps closed by now
        nncf_log.setLevel(level if show else logging.WARNING)
        try:
            yield nncf
        finally:
            nncf_log.setLevel(level)
            for h, stream in zip(handlers, streams, strict=True):
                h.stream = stream
    finally:
        console.quiet, console.stderr = quiet, on_stderr
        torch_log.setLevel(torch_level)


def _quantize(model: Any, calibration: np.ndarray, input_name: str | None) -> Any:
    """int8 by NNCF's post-training quantization, calibrated on ``calibration`` (the run's training images).

    NNCF's defaults moved top classes: an SVM's head scales L2-normalised features by ~30, so the backbone's int8
    error shows. On a flowers5 SVM run (efficientnet_lite0, 100 test images) top-1 agreement with the PyTorch
    bundle was 95 % (OpenVINO) and 94 % (ONNX), 99 % needed. Full bias correction (not NNCF's fast one; quantizing
    takes ~45 s, not ~20 s) gives 99 % and 97 %. Turning NNCF's overflow fix off (it keeps the first layer's
    weights in 7 bits, for CPUs without VNNI, whose int8 sums may saturate) gave ONNX 99 % too, but only on CPUs
    with VNNI: kept on. The mixed preset, a float head MatMul or first convolution did no better; float depthwise
    convolutions no better and as slow as fp32.
    """
    with _nncf(sys.stderr.isatty()) as nncf:
        items = [calibration[i : i + 1] for i in range(len(calibration))]
        data = nncf.Dataset(items, (lambda x: {input_name: x}) if input_name else None)
        return nncf.quantize(model, data, subset_size=len(items), fast_bias_correction=False)


def _write_model(
    net: torch.nn.Module, resolution: int, fmt: str, precision: str, path: Path, calibration: np.ndarray
) -> list[Path]:
    """Write the classifier network to ``path`` (in a scratch folder); return the files written.

    A failed write is an OSError naming the file: ONNX and TorchScript are made in memory and written as
    other files are, OpenVINO's own writer's failure is told apart (a full disk or not) before it is cleared.
    """
    res = resolution
    if fmt == "onnx":
        if precision == "int8":
            import onnx

            fp32 = path.with_name(f"fp32-{path.name}")
            export_onnx(net, res, fp32)
            buf = io.BytesIO()
            onnx.save(_quantize(onnx.load(str(fp32)), calibration, "image"), buf)
            fp32.unlink()
            atomic_write_bytes(path, buf.getvalue())
        else:
            export_onnx(net, res, path)
        return [path]
    if fmt == "openvino":
        import openvino as ov

        model = convert_openvino(net, res)
        if precision == "int8":
            model = _quantize(model, calibration, None)
        try:
            ov.save_model(model, str(path), compress_to_fp16=precision == "bf16")
        except RuntimeError as e:  # says neither which file nor why
            raise write_failure(path, e) from e
        return [path.with_suffix(".bin"), path]
    net.requires_grad_(False)  # else every call of the loaded file builds a graph for gradients
    buf = io.BytesIO()
    with quiet_torch_jit(), torch.no_grad():
        example = torch.zeros(1, res, res, 3, dtype=torch.uint8)
        torch.jit.save(torch.jit.trace(net, example, check_trace=False), buf)  # parity is checked below
    atomic_write_bytes(path, buf.getvalue())
    return [path]


def sidecar(bundle: Bundle, fmt: str, precision: str, files: list[Path], parity: ParityReport) -> dict[str, Any]:
    """What a user of the exported file needs: classes and the resize/crop to apply before the model."""
    pre = bundle.preprocess
    doc: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "export_format": fmt,
        "precision": precision,
        "files": [f.name for f in files],
        "classes": bundle.classes,
        "resolution": pre.resolution,
        "crop_pct": pre.crop_pct,
        "resize_to": pre.resize_to,
        "interpolation": pre.interpolation,
        "input": {
            "dtype": "uint8",
            "layout": "NHWC",
            "shape": ["batch", pre.resolution, pre.resolution, 3],
            "preprocessing": "RGB (transparent pixels composited on white, 16-bit images scaled to 8 bits; a JPEG, "
            "MPO too, decoded with Pillow's draft to resize_to, then turned upright by its EXIF orientation); resize "
            f"the shorter side to resize_to ({pre.interpolation}, Pillow reducing_gap 3.0), then centre-crop "
            "resolution x resolution; normalisation (and flip_tta's mirror image) is inside "
            "the model; imgclf.data.io.load_for_model does all this",
        },
        "output": {
            "dtype": "float32",
            "shape": ["batch", len(bundle.classes)],
            "meaning": "class probabilities (softmax), in the order of classes",
        },
        "model_id": bundle.model_id,
        "backbone": bundle.backbone_spec["name"],
        "classifier": bundle.classifier,
        "flip_tta": bundle.flip_tta,
        "imgclf_version": __version__,
        "parity": asdict(parity),
    }
    if fmt == "openvino":
        doc["openvino_config"] = openvino_config(precision)
    return doc


def _check_targets_free(out: Path, names: list[str], fmt: str, model_id: str) -> None:
    """Refuse an export that would replace a file other than an earlier export of this same model: a sidecar
    (``<out stem>.json``) describing other files, or a model file of another model, of another run or the
    user's (a bundle's own ``backbone.pt`` was written over)."""
    side = out.with_suffix(".json")

    def refused(why: str, instead: str) -> ExportError:
        return ExportError(
            f"{why}: exporting would replace it. Give another file name (e.g. --out "
            f"{out.with_name(f'{out.stem}-{instead}{out.suffix}')}), move that file away, or add --replace if it "
            "may go (an export of this run before it was trained again, say)"
        )

    try:
        doc = json.loads(side.read_text(encoding="utf-8")) if side.exists() else {}
    except (OSError, ValueError):
        doc = None
    doc = doc if isinstance(doc, dict) else {}
    files = doc.get("files")
    if side.exists() and files != names:
        what = f"it lists {files}" if isinstance(files, list) else "it is not an imgclf export sidecar"
        raise refused(f"{side} exists and does not describe {out.name} ({what})", fmt)
    taken = [out.parent / name for name in names if (out.parent / name).exists()]
    if taken and doc.get("model_id") != model_id:
        whose = f"model {doc['model_id']}" if doc.get("model_id") else f"no {side.name} names it"
        raise refused(f"{taken[0]} exists and is no earlier export of this model ({whose})", model_id[:8])


def export_model(
    run_dir: str | Path,
    fmt: Format,
    out: str | Path,
    precision: Precision = "fp32",
    check_images: str | Path | None = None,
    max_check_images: int = 100,
    replace: bool = False,
) -> ExportResult:
    """Export the bundle of ``run_dir``, check it against PyTorch, then move its files into place atomically.

    Raises ExportError (nothing written) when the format/precision pair is unsupported, parity fails, or a file
    at ``out`` is not an earlier export of the same model (unless ``replace``).
    """
    folder = str(out).endswith(("/", os.sep)) or Path(out).is_dir()
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in PRECISIONS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(PRECISIONS)}")
    if folder:  # the file goes into it, named after the run (and the precision, unless fp32)
        run = run_dir.resolve()
        tag = "" if precision == "fp32" else f"-{precision}"
        out = out / f"{(run.parent if run.name == BUNDLE_DIR else run).name}{tag}{_SUFFIXES[fmt]}"
    if precision not in PRECISIONS[fmt]:
        raise ExportError(f"{fmt} export supports precision {', '.join(PRECISIONS[fmt])}, not {precision}")
    missing = [m for m in ONNX_MODULES if fmt == "onnx" and importlib.util.find_spec(m) is None]
    if missing:  # torch's exporter failed with a traceback after the work
        raise ExportError(
            f"--format onnx needs {' and '.join(missing)}, not installed: pip install 'imgclf[onnx]' (in a clone: "
            "pip install -e '.[onnx]'); --format openvino and torchscript work without them"
        )
    if out.suffix.lower() not in _ENDINGS[fmt]:
        pair = ", an .xml + .bin pair" if fmt == "openvino" else ""
        raise ExportError(
            f"--out must end in {' or '.join(_ENDINGS[fmt])} for --format {fmt}{pair} ({out.name}), or in / for a "
            "folder"
        )
    bundle = Bundle.load(run_dir)
    names = [out.with_suffix(".bin").name, out.name] if fmt == "openvino" else [out.name]
    if not replace:
        _check_targets_free(out, names, fmt, bundle.model_id)
    check_dir = Path(check_images) if check_images else None
    images, source = parity_images(bundle, run_dir, check_dir, max_check_images, precision)
    calibration = images
    if precision == "int8":  # calibrate on training images where the run has them, else on the (real) check images
        train = load_images(split_paths(bundle, run_dir, "train"), bundle, 300)
        calibration = np.stack(train) if train else images
    with folder_for(out.parent, "folder", "--out"):
        try:
            scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        except OSError as e:  # name the file asked for, not the scratch folder
            raise OSError(e.errno, e.strerror, str(out)) from e
        try:
            net = bundle.classifier_net(bundle.flip_tta)  # scores as predict does: mirror averaging where trained so
            res = bundle.preprocess.resolution
            with scratch_named_as(scratch, out.parent):  # a failure names the file asked for, not the scratch one
                files = _write_model(net, res, fmt, precision, scratch / out.name, calibration)
            parity = compare(
                torch_probabilities(net, images),
                run_exported(scratch / out.name, fmt, precision, images),
                precision,
                source,
            )
            if not parity.passed:
                raise ExportError(
                    f"parity check failed: the {fmt} {precision} model differs from the PyTorch bundle on "
                    f"{parity.n_images} images ({source}): max |p - p_torch| = {parity.max_abs_diff:.2e}, "
                    f"top-1 agreement {parity.top1_agreement:.1%}; needed: {parity.criterion}. Nothing written."
                    + _int8_advice(fmt, precision, parity)
                )
            final = [out.parent / f.name for f in files]
            side = out.with_suffix(".json")
            with scratch_named_as(scratch, out.parent):  # written before any file is replaced, as the model was
                atomic_write_text(
                    scratch / side.name, json.dumps(sidecar(bundle, fmt, precision, final, parity), indent=2)
                )
            for f in (side, *final):  # the export replaced goes first, its sidecar before its model: a crash
                with contextlib.suppress(FileNotFoundError):  # between the replaces left no sidecar naming
                    os.unlink(f)  # another model's classes (nor an .xml with another model's .bin)
            for f in (*files, scratch / side.name):
                os.chmod(f, 0o666 & ~UMASK)  # scratch files are private (0600): the usual permissions, as umask says
                os.replace(f, out.parent / f.name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult(final, side, parity)
