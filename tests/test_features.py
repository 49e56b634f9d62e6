import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_folder
from PIL import Image

from imgclf.backbones import create_backbone
from imgclf.features import FeatureExtractor


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet_lite0", resolution=64)


def test_cache_hit_and_runtime_parity(tmp_path: Path, backbone):
    root = make_folder(tmp_path / "d", n=4)
    paths = sorted(root.rglob("*.jpg"))
    (root / "circles" / "bad.jpg").write_bytes(paths[0].read_bytes()[:300])
    paths.append(root / "circles" / "bad.jpg")
    fx = FeatureExtractor(
        backbone, runtime="openvino", precision="fp32", cache_dir=tmp_path / "c", batch_size=5, progress=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fx.extract(paths)
    # converting to OpenVINO traces the network; torch.jit's deprecation notice is not the user's concern
    assert not [w for w in caught if "torch.jit" in str(w.message)], [str(w.message) for w in caught]
    assert first.n_cached == 0 and first.ok.sum() == 12 and list(first.errors) == [12]
    assert "truncated" in first.errors[12] or "decode" in first.errors[12]
    again = FeatureExtractor(
        backbone, runtime="openvino", precision="fp32", cache_dir=tmp_path / "c", progress=False
    ).extract(paths)
    assert again.n_cached == 12 and np.array_equal(again.features, first.features)
    as_text = fx.extract([str(paths[0]), str(root / "missing.jpg")])  # paths as strings: a missing one is reported
    with pytest.raises(TypeError, match="extract takes a list of paths, not one path"):  # not one per letter
        fx.extract(str(paths[0]))
    assert as_text.ok.tolist() == [True, False] and "No such file" in as_text.errors[1]
    ref = FeatureExtractor(backbone, runtime="torch", use_cache=False, progress=False).extract(paths[:12])
    assert np.allclose(ref.features, first.features[:12], atol=1e-3)
    # a different runtime or flip setting is a different cache entry
    torch_fx = FeatureExtractor(backbone, runtime="torch", cache_dir=tmp_path / "c")
    assert torch_fx.model_key != fx.model_key
    import imgclf.features.extract as extract

    on_cpu = torch_fx.model_key  # a GPU's fp32 convolutions run in TF32: another entry
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extract, "device_type", lambda device: "cuda" if device.startswith("cuda") else "cpu")
        torch_fx.device = "cuda"
        assert torch_fx.model_key != on_cpu
    flip = FeatureExtractor(backbone, runtime="torch", flip_tta=True, use_cache=False, progress=False)
    assert not np.allclose(flip.extract(paths[:2]).features, ref.features[:2], atol=1e-3)


def test_a_damaged_kept_openvino_model_is_converted_again(tmp_path: Path, backbone, caplog: pytest.LogCaptureFixture):
    """A converted model cut short or altered in the cache (a full disk, a crash, a bad sector) would give
    wrong features without a word, and they would be cached: its checksum catches it."""
    import logging

    batch = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)

    def embed() -> np.ndarray:
        fx = FeatureExtractor(backbone, runtime="openvino", precision="fp32", cache_dir=tmp_path, progress=False)
        return fx.embed_arrays(batch)

    with caplog.at_level(logging.INFO, logger="imgclf"):
        good = embed()  # the seconds of conversion are said (serve started silent for 20-45 s)
    assert f"converting the network for OpenVINO (once: kept in {tmp_path / 'models'}" in caplog.text
    caplog.clear()
    (weights,) = (tmp_path / "models").glob("*/model.bin")
    for damage in (lambda b: b[:1000], lambda b: b[:-4096] + bytes(4096)):
        weights.write_bytes(damage(weights.read_bytes()))
        with caplog.at_level(logging.WARNING):
            assert np.array_equal(embed(), good)
        assert "is damaged (" in caplog.text and "converting it again" in caplog.text
        caplog.clear()
    with caplog.at_level(logging.INFO, logger="imgclf"):
        assert np.array_equal(embed(), good) and not caplog.text  # kept again, whole: nothing to convert


def test_a_damaged_kept_onnx_model_is_exported_again(tmp_path: Path, backbone, caplog: pytest.LogCaptureFixture):
    import logging

    batch = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)

    def embed() -> np.ndarray:
        fx = FeatureExtractor(backbone, runtime="onnxruntime", cache_dir=tmp_path, progress=False)
        return fx.embed_arrays(batch)

    good = embed()
    (model,) = (tmp_path / "models").glob("*/model.onnx")
    data = model.read_bytes()
    middle = len(data) // 2
    model.write_bytes(data[:middle] + bytes(4096) + data[middle + 4096 :])  # weights zeroed: still loads
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(embed(), good)
    assert "ONNX model kept in" in caplog.text and "exporting it again" in caplog.text
    caplog.clear()
    assert np.array_equal(embed(), good) and not caplog.text


def test_onnxruntime_matches_torch(tmp_path: Path, backbone):
    pytest.importorskip("onnxruntime")
    batch = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    ort = FeatureExtractor(backbone, runtime="onnxruntime", cache_dir=tmp_path, progress=False)
    torch_fx = FeatureExtractor(backbone, runtime="torch", cache_dir=tmp_path, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ort_out = ort.embed_arrays(batch)
    assert not [w for w in caught if "torch.jit" in str(w.message)], [str(w.message) for w in caught]
    assert np.allclose(ort_out, torch_fx.embed_arrays(batch), atol=1e-3)


@pytest.mark.parametrize("amx", [False, True])
def test_auto_precision_is_fp32_on_cpus_but_for_the_server(monkeypatch: pytest.MonkeyPatch, amx: bool) -> None:
    """Results of train/evaluate/predict never depend on the CPU; only the server takes AMX's bf16."""
    from imgclf.features import runtimes

    monkeypatch.setattr(runtimes, "cpu_has_amx_bf16", lambda: amx)
    assert runtimes.resolve_precision("auto", "openvino", "cpu") == "fp32"
    assert runtimes.resolve_precision("auto", "torch", "cpu", serving=True) == "fp32"
    assert runtimes.resolve_precision("auto", "openvino", "cpu", serving=True) == ("bf16" if amx else "fp32")
    assert runtimes.resolve_precision("bf16", "torch", "cpu") == "bf16"
    assert runtimes.resolve_precision("fp32", "openvino", "cpu", serving=True) == "fp32"


@pytest.mark.parametrize("native", [False, True])
def test_bf16_asked_for_on_a_cpu_that_emulates_it_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, native: bool
) -> None:
    """Emulated bf16 measured 40x slower than fp32 in inference here (4-5x in training); it is the user's choice,
    named with what it costs, once a process."""
    from imgclf.features import runtimes

    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: native)
    runtimes._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        for _ in range(2):
            assert runtimes.resolve_precision("bf16", "torch", "cpu") == "bf16"
        runtimes.resolve_precision("auto", "torch", "cpu")
        runtimes.resolve_precision("bf16", "openvino", "cpu")
    assert caplog.text.count("PyTorch emulates it") == (0 if native else 1), caplog.text
    runtimes._warn_emulated_bf16.cache_clear()


@pytest.mark.parametrize(
    "device", ["gpu", "xpu", "meta", "cuda:99", "cuda:0" if not torch.cuda.is_available() else "cuda:98"]
)
def test_an_unusable_device_is_a_message(device: str):
    from imgclf.errors import USER_ERRORS
    from imgclf.features.runtimes import DeviceError, resolve_device

    with pytest.raises(DeviceError, match=r"use |visible") as e:
        resolve_device(device)
    assert isinstance(e.value, USER_ERRORS)


def test_a_cache_folder_that_cannot_be_written_is_a_message(tmp_path: Path):
    from imgclf.errors import USER_ERRORS

    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.raises(USER_ERRORS, match=r"cache folder .* cannot be written .*IMGCLF_CACHE"):
        FeatureExtractor(create_backbone("efficientnet_lite0", resolution=64), cache_dir=tmp_path / "cache")


def test_a_full_cache_disk_costs_the_cache_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    import errno

    import imgclf.features.extract as extract

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(extract, "atomic_write_bytes", full)
    data = make_folder(tmp_path / "d", n=2)
    fx = FeatureExtractor(create_backbone("efficientnet_lite0", resolution=64), runtime="torch", cache_dir=tmp_path)
    with caplog.at_level("WARNING", logger="imgclf"):
        res = fx.extract(sorted(data.rglob("*.jpg")))
    assert res.ok.all() and fx.cache is not None and not fx.cache.writable
    assert caplog.text.count("features not cached from here on (No space left on device") == 1


@pytest.mark.parametrize("free", [0, 10**12])
def test_a_converted_model_not_kept_says_which_file_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, free: int
):
    """OpenVINO's writer fails on a full disk with ``basic_ios::clear: iostream error``, which the warning
    repeated: it names the file and, where the disk is full, says so."""
    import shutil
    from types import SimpleNamespace

    import openvino

    from imgclf.features.runtimes import _keep

    def cut_short(model: object, path: Path, **kwargs: object) -> None:
        Path(path).write_text("<?xml")
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(openvino, "save_model", cut_short)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    with caplog.at_level("WARNING", logger="imgclf"):
        _keep(None, tmp_path / "ov")  # type: ignore[arg-type]
    why = "No space left on device" if free == 0 else "could not be written (basic_ios::clear: iostream error)"
    assert f"could not be written to {tmp_path / 'ov' / 'model.xml'} ({why})" in caplog.text
    assert ("free space there" in caplog.text) == (free == 0)
    assert list((tmp_path / "ov").iterdir()) == []


def test_thread_pools_are_sized_to_a_containers_cpu_quota(monkeypatch: pytest.MonkeyPatch):
    """A container limited to 1 CPU (cgroup quota) on a larger host: pools get 1 thread, not one per host core."""
    from joblib.externals.loky.backend import context

    from imgclf.utils import cpu_count

    monkeypatch.setattr(context, "_cpu_count_cgroup", lambda os_cpu_count: 1)
    cpu_count.cache_clear()
    try:
        assert cpu_count() == 1
    finally:
        cpu_count.cache_clear()


def test_a_cache_entry_cut_short_is_computed_again(tmp_path: Path, backbone):
    """A crash (the cache is written without fsync) can leave an empty or partial entry: recomputed."""
    paths = sorted(make_folder(tmp_path / "d", n=2).rglob("*.jpg"))
    fx = FeatureExtractor(backbone, runtime="torch", cache_dir=tmp_path / "c", progress=False)
    first = fx.extract(paths)
    entries = sorted((tmp_path / "c" / "features").rglob("*.npy"))
    entries[0].write_bytes(b"")
    entries[1].write_bytes(entries[1].read_bytes()[:100])
    again = fx.extract(paths)
    assert again.n_cached == len(paths) - 2 and np.allclose(again.features, first.features, atol=1e-5)


def test_an_image_replaced_while_it_is_read_is_not_cached_under_its_old_content(
    tmp_path: Path, backbone, monkeypatch: pytest.MonkeyPatch
):
    import imgclf.features.extract as extract

    data = make_folder(tmp_path / "d", n=1)
    a, b = data / "circles" / "circles_00.jpg", data / "squares" / "squares_00.jpg"
    original = a.read_bytes()
    real_load = extract.load_for_model

    def replaced_meanwhile(path: Path, *args: object) -> np.ndarray:
        if path == a:
            a.write_bytes(b.read_bytes())  # after hashing, before decoding
        return real_load(path, *args)

    monkeypatch.setattr(extract, "load_for_model", replaced_meanwhile)
    fx = FeatureExtractor(backbone, runtime="torch", cache_dir=tmp_path / "c", progress=False)
    fx.extract([a])
    monkeypatch.undo()
    (tmp_path / "copy.jpg").write_bytes(original)
    fresh = FeatureExtractor(backbone, runtime="torch", use_cache=False, progress=False).extract(
        [tmp_path / "copy.jpg"]
    )
    cached = fx.extract([tmp_path / "copy.jpg"])
    assert cached.n_cached == 0 and np.allclose(cached.features, fresh.features, atol=1e-5)


def test_features_of_random_weights_are_not_cached(tmp_path: Path):
    """Every build of a network without pretrained weights differs, while its weights id is always 'random'."""
    paths = sorted(make_folder(tmp_path / "d", n=1).rglob("*.jpg"))
    results = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        bb = create_backbone("efficientnet_lite0", resolution=64, pretrained=False)
        results.append(FeatureExtractor(bb, runtime="torch", cache_dir=tmp_path / "c", progress=False).extract(paths))
    assert results[1].n_cached == 0 and not np.allclose(results[0].features, results[1].features)


def test_openvino_conversion_sends_no_telemetry() -> None:
    """OpenVINO's converter sent usage data from a forked process (consent was taken for granted without a
    consent file); offline it waited on DNS, and a test session hung at its end waiting for it."""
    tm = pytest.importorskip("openvino_telemetry")
    import openvino as ov

    import imgclf.features.runtimes  # noqa: F401  (declines on import)

    ov.convert_model(torch.nn.Linear(4, 2), example_input=torch.zeros(1, 4))
    assert tm.Telemetry().consent is False


def _pipe(data: bytes) -> str:
    """A pipe as the shell hands one over (``/dev/fd/N``), ``data`` written to it from a thread."""
    import os
    import threading

    r, w = os.pipe()

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(data)

    threading.Thread(target=write, daemon=True).start()
    return f"/dev/fd/{r}"


def test_a_piped_image_is_read_once_and_named_as_given(
    tmp_path: Path, backbone, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """A pipe's bytes can be read once: hashing them for the cache left nothing to decode ("empty file"), a pipe
    named twice got "empty file" the second time, messages named a temporary copy, and a copy that failed
    (a full /tmp) was "empty file" too."""
    import errno
    import shutil

    root = make_folder(tmp_path / "d", n=1)
    image = sorted(root.rglob("*.jpg"))[0]
    fx = FeatureExtractor(backbone, runtime="torch", cache_dir=tmp_path / "c", progress=False)
    pipe = _pipe(image.read_bytes())
    res = fx.extract([pipe, image, pipe])
    assert res.ok.all(), res.errors
    np.testing.assert_allclose(res.features[0], res.features[1], atol=1e-6)
    np.testing.assert_array_equal(res.features[0], res.features[2])
    payload = b"Exif\x00\x00" + b"\x00" * 40  # an APP1 block that is no TIFF structure: a warning naming the file
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    good = tmp_path / "good.jpg"
    Image.new("RGB", (40, 30), "red").save(good, dpi=(72, 72))  # as cameras write them
    pipe = _pipe(good.read_bytes()[:2] + app1 + good.read_bytes()[2:])
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert fx.extract([pipe]).ok.all()
    assert f"{pipe}: EXIF data unreadable" in caplog.text
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shutil, "copyfileobj", lambda *a: (_ for _ in ()).throw(full))
    pipe = _pipe(image.read_bytes())
    assert fx.extract([pipe]).errors == {0: "could not read the pipe (No space left on device)"}
