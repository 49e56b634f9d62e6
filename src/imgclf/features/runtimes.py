"""Inference runtimes for feature extraction: OpenVINO (fast on CPUs), ONNX Runtime, PyTorch (CPU/GPU).

Every runtime takes a batch of uint8 NHWC images and returns float32 features; normalisation lives in
the graph (:class:`imgclf.backbones.nets.UInt8FeatureNet`). torch is imported only where it is used: a
run whose features are all cached, or whose converted model is cached, never builds the torch network.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from imgclf.utils import (
    atomic_write_bytes,
    cpu_count,
    cpu_has_amx_bf16,
    cpu_has_bf16,
    file_sha256,
    quiet_torch_jit,
    write_failure,
)

if TYPE_CHECKING:
    import openvino as ov
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def decline_openvino_telemetry() -> None:
    """OpenVINO's converter and NNCF send usage data to Google Analytics from a forked process unless a consent
    file in the home folder says no; offline, that process can wait on DNS for minutes and the command's exit
    waits for it (a test session hung at its end). imgclf sends nothing: consent is declined in this process."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # not installed: nothing is sent
        return
    OptInChecker.check = lambda *_args, **_kwargs: ConsentCheckResult.DECLINED  # type: ignore[method-assign]


decline_openvino_telemetry()


class Runtime(Protocol):
    name: str
    precision: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def _cuda_possible() -> bool:
    """False on a Linux machine without an NVIDIA driver, where asking torch (a slow import) is pointless."""
    if sys.platform != "linux":
        return True
    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()


def device_type(device: str = "auto") -> str:
    """``cuda`` or ``cpu`` for a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:1``...)."""
    if device == "cpu" or (device == "auto" and not _cuda_possible()):
        return "cpu"
    return resolve_device(device).type


class DeviceError(ValueError):
    """A device or runtime setting that cannot be used on this machine; the message says what to do."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when present, else cpu; a GPU is never required."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type not in ("cpu", "cuda", "mps"):  # xpu, meta, ...: PyTorch knows them, imgclf does not run on them
        raise DeviceError(f"device {device!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {device!r} asked for, but only cuda:0 to cuda:{count - 1} are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r} asked for, but this PyTorch has no Apple GPU (MPS); use --device cpu")
    return dev


def resolve_runtime(runtime: str, device: str) -> str:
    """The runtime for a device type: ``auto`` -> openvino on a CPU where installed, else torch."""
    if runtime != "auto":
        return runtime
    if device == "cpu" and importlib.util.find_spec("openvino") is not None:
        return "openvino"
    return "torch"


def resolve_precision(precision: str, runtime: str, device: str, serving: bool = False) -> str:
    """``auto`` -> bf16 on GPUs with native bf16 (Ampere and newer), else fp32.

    ``serving``: the server also takes bf16 with OpenVINO on CPUs with AMX, where it measured about twice
    as fast. Training, evaluation and ``predict`` keep fp32 on every CPU, so that their results do not
    depend on which CPU ran them.
    """
    if precision != "auto":
        if precision == "bf16" and runtime == "torch" and device == "cpu" and not cpu_has_bf16():
            _warn_emulated_bf16()
        return precision
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if serving and runtime == "openvino" and cpu_has_amx_bf16() else "fp32"


@functools.cache
def _warn_emulated_bf16() -> None:
    log.warning(
        "warning: --precision bf16 on a CPU without bf16 units (AVX-512 BF16 or AMX): PyTorch emulates it, "
        "measured 4-5x slower in training and 40x slower in inference than fp32 on such a CPU; "
        "--precision auto (fp32 on CPUs) is faster and gives the same results on every CPU"
    )


class TorchRuntime:
    """Eager PyTorch on CPU or GPU (bf16 autocast and channels_last on GPU)."""

    name = "torch"

    def __init__(self, net: nn.Module, device: torch.device, precision: str, threads: int) -> None:
        import torch

        self.net, self.device, self.precision = net.to(device).eval(), device, precision
        if device.type == "cpu":
            torch.set_num_threads(threads)
        else:
            self.net = self.net.to(memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"),
        ):
            return self.net(x).float().cpu().numpy()


def export_onnx(net: nn.Module, resolution: int, path: Path) -> Path:
    """Write ``net`` (uint8 NHWC in, features out; dynamic batch) as an ONNX file, atomically."""
    import io

    import torch

    buf = io.BytesIO()
    example = torch.zeros(1, resolution, resolution, 3, dtype=torch.uint8)
    with quiet_torch_jit():
        torch.onnx.export(
            net.eval().cpu(),
            (example,),
            buf,
            input_names=["image"],
            output_names=["output"],
            dynamic_axes={"image": {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    atomic_write_bytes(path, buf.getvalue())
    return path


def convert_openvino(net: nn.Module, resolution: int):  # -> openvino.Model
    """Convert ``net`` to an OpenVINO model with a dynamic batch and a fixed image size."""
    import openvino as ov
    import torch

    example = torch.zeros(1, resolution, resolution, 3, dtype=torch.uint8)
    with torch.no_grad(), quiet_torch_jit():
        model = ov.convert_model(
            net.eval().cpu(), example_input=example, input=[([-1, resolution, resolution, 3], ov.Type.u8)]
        )
    return model


def _check_kept(file: Path, digest: Path) -> None:
    """ValueError (OSError where unreadable) unless ``file`` matches the checksum kept in ``digest``."""
    if file_sha256(file) != digest.read_text(encoding="utf-8").strip():
        raise ValueError(f"{file.name} differs from its checksum")


def _read_kept(core: ov.Core, model_dir: Path) -> ov.Model | None:
    """The converted model kept in ``model_dir``, if there and whole (its weights match the checksum kept
    beside them); else None, so that it is converted again."""
    xml, digest = model_dir / "model.xml", model_dir / "model.bin.sha256"
    if not (xml.exists() and digest.exists()):
        return None
    try:
        _check_kept(xml.with_suffix(".bin"), digest)
        return core.read_model(xml)
    except (OSError, RuntimeError, ValueError) as e:  # a damaged file; OpenVINO raises RuntimeError
        log.warning("warning: the converted model kept in %s is damaged (%s); converting it again", model_dir, e)
        return None


def _keep(model: ov.Model, model_dir: Path) -> None:
    """Save a converted model into ``model_dir`` for later runs (best effort: a full disk only warns).

    Processes converting at once write their own temporary files; the checksum, written last, makes a
    reader that sees one process's weights with another's checksum convert again instead of using them."""
    import openvino

    tmp = model_dir / f".tmp-{os.getpid()}-{threading.get_ident()}-model.xml"
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        openvino.save_model(model, tmp, compress_to_fp16=False)
        digest = file_sha256(tmp.with_suffix(".bin"))
        tmp.with_suffix(".bin").replace(model_dir / "model.bin")
        tmp.replace(model_dir / "model.xml")
        atomic_write_bytes(model_dir / "model.bin.sha256", digest.encode(), durable=False)
    except (OSError, RuntimeError) as e:  # OpenVINO reports a full disk as a RuntimeError
        failure = write_failure(model_dir / "model.xml", e)  # asked while the partial files still fill the disk
        for f in (tmp, tmp.with_suffix(".bin")):
            f.unlink(missing_ok=True)
        log.warning(
            "warning: the converted model could not be written to %s (%s): it is converted again next time%s",
            failure.filename,
            failure.strerror,
            "; free space there (or give another --cache-dir) to keep it" if failure.errno == errno.ENOSPC else "",
        )


class OpenVINORuntime:
    """OpenVINO on the CPU; the converted model is kept in ``model_dir`` so later runs skip conversion."""

    name = "openvino"

    def __init__(
        self, net: Callable[[], nn.Module], resolution: int, precision: str, threads: int, model_dir: Path | None
    ) -> None:
        import openvino as ov

        core = ov.Core()
        model = _read_kept(core, model_dir) if model_dir is not None else None
        if model is None:
            _converting("OpenVINO", model_dir)
            model = convert_openvino(net(), resolution)
            if model_dir is not None:
                _keep(model, model_dir)
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer([np.ascontiguousarray(batch)])
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)


def _converting(runtime: str, model_dir: Path | None) -> None:
    """Say what the seconds of silence before the first image are spent on."""
    kept = f"once: kept in {model_dir}" if model_dir is not None else "not kept: no cache folder"
    log.info("converting the network for %s (%s)", runtime, kept)


def _onnx_kept(path: Path) -> bool:
    """Whether the ONNX model kept at ``path`` is whole (it matches the checksum kept beside it)."""
    digest = path.with_name("model.onnx.sha256")
    if not (path.exists() and digest.exists()):
        return False
    try:
        _check_kept(path, digest)
    except (OSError, ValueError) as e:
        log.warning("warning: the ONNX model kept in %s is damaged (%s); exporting it again", path.parent, e)
        return False
    return True


class OnnxRuntime:
    """ONNX Runtime on the CPU; the exported model is kept in ``model_dir``."""

    name = "onnxruntime"

    def __init__(self, net: Callable[[], nn.Module], resolution: int, threads: int, model_dir: Path | None) -> None:
        import onnxruntime as ort

        path = model_dir / "model.onnx" if model_dir is not None else None
        if path is None or not _onnx_kept(path):  # checked once: it hashes the file, and warns where damaged
            _converting("ONNX Runtime", model_dir)
            if path is None:
                import tempfile

                path = Path(tempfile.mkdtemp(prefix="imgclf-onnx-")) / "model.onnx"
                export_onnx(net(), resolution, path)
            else:
                export_onnx(net(), resolution, path)
                atomic_write_bytes(path.with_name("model.onnx.sha256"), file_sha256(path).encode(), durable=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.precision = "fp32"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": np.ascontiguousarray(batch)})[0].astype(np.float32, copy=False)


def create_runtime(
    net: Callable[[], nn.Module],
    resolution: int,
    runtime: str = "auto",
    precision: str = "auto",
    device: str = "auto",
    threads: int = 0,
    model_dir: Path | None = None,
) -> Runtime:
    """Build the runtime named by ``runtime`` ("auto" picks the fastest available for the device).

    ``net`` builds the torch network; it is not called when a converted model is already in ``model_dir``.
    """
    dev = device_type(device)
    name = resolve_runtime(runtime, dev)
    prec = resolve_precision(precision, name, dev)
    threads = threads or cpu_count()
    if name == "openvino":
        if importlib.util.find_spec("openvino") is None:
            raise DeviceError("runtime openvino asked for but not installed: pip install openvino")
        return OpenVINORuntime(net, resolution, prec, threads, model_dir)
    if name == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            raise DeviceError("runtime onnxruntime asked for but not installed: pip install onnxruntime")
        return OnnxRuntime(net, resolution, threads, model_dir)
    return TorchRuntime(net(), resolve_device(device), prec, threads)
