"""Tests for the built-in demo data generator (imgclf.data.demo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data import demo
from imgclf.data.demo import CLASSES, MARKER_NAME, generate_demo_dataset, render_texture

SMALL = {"n_per_class": 2, "size": 64, "progress": False}


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _child(seed: int, label: str, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(CLASSES.index(label), i)))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=3, **SMALL)


def test_classes_are_sorted_and_match_the_tutorial() -> None:
    assert CLASSES == ("dotted", "leopard", "striped") == tuple(sorted(CLASSES))


def test_layout_counts_and_marker(small_set: Path) -> None:
    assert sorted(p.name for p in small_set.iterdir()) == sorted([*CLASSES, MARKER_NAME])
    for label in CLASSES:
        names = sorted(p.name for p in (small_set / label).iterdir())
        assert names == [f"{label}_0000.jpg", f"{label}_0001.jpg"]  # no temporary files left behind
    marker = json.loads((small_set / MARKER_NAME).read_text())
    assert marker["classes"] == list(CLASSES)
    assert (marker["n_per_class"], marker["seed"], marker["size"]) == (2, 3, 64)


def test_files_are_rgb_jpegs_of_the_requested_size(small_set: Path) -> None:
    paths = sorted(small_set.rglob("*.jpg"))
    assert len(paths) == 2 * len(CLASSES)
    for path in paths:
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))
            assert np.asarray(im).std() > 5  # decodes fully, and is not a blank image


def test_same_seed_gives_byte_identical_files_other_seeds_differ(small_set: Path, tmp_path: Path) -> None:
    again = _files(generate_demo_dataset(tmp_path / "again", seed=3, **SMALL))
    assert again == _files(small_set)
    other = _files(generate_demo_dataset(tmp_path / "other", seed=4, **SMALL))
    images = [name for name in again if name.endswith(".jpg")]
    assert images and all(other[name] != again[name] for name in images)


def test_each_image_has_its_own_generator_so_order_does_not_matter(small_set: Path, tmp_path: Path) -> None:
    bigger = generate_demo_dataset(tmp_path / "bigger", seed=3, n_per_class=3, size=64, progress=False)
    for path in small_set.rglob("*.jpg"):
        assert (bigger / path.relative_to(small_set)).read_bytes() == path.read_bytes()
    # Image 1 of "leopard" is rendered by the child generator SeedSequence(3, spawn_key=(1, 1)).
    stored = np.asarray(Image.open(small_set / "leopard" / "leopard_0001.jpg"), np.float32)
    assert np.abs(stored - np.asarray(render_texture("leopard", _child(3, "leopard", 1), 64))).mean() < 3
    assert np.abs(stored - np.asarray(render_texture("leopard", _child(3, "leopard", 0), 64))).mean() > 10


def test_matching_marker_returns_the_cached_set_without_rendering(
    small_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p: p.stat().st_mtime_ns for p in small_set.rglob("*")}
    monkeypatch.setattr(demo, "render_texture", lambda *a, **k: pytest.fail("a cached set was re-rendered"))
    assert generate_demo_dataset(str(small_set), seed=3, **SMALL) == small_set
    assert {p: p.stat().st_mtime_ns for p in small_set.rglob("*")} == before


def test_refuses_a_non_empty_foreign_folder_and_leaves_it_untouched(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "dotted").mkdir()
    (tmp_path / "dotted" / "dotted_0000.jpg").write_bytes(b"my own photo")
    before = _files(tmp_path)
    with pytest.raises(FileExistsError, match="new or empty folder"):
        generate_demo_dataset(tmp_path, **SMALL)
    assert _files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dotted", "notes.txt"]


def test_refuses_a_demo_set_made_with_other_parameters(small_set: Path) -> None:
    before = _files(small_set)
    with pytest.raises(FileExistsError, match="other parameters"):
        generate_demo_dataset(small_set, seed=4, **SMALL)
    with pytest.raises(FileExistsError, match="other parameters"):
        generate_demo_dataset(small_set, seed=3, n_per_class=2, size=96, progress=False)
    assert _files(small_set) == before


def test_an_interrupted_set_is_finished_by_the_next_run(
    small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, drawn = demo.render_texture, []

    def interrupted(*args: object) -> Image.Image:
        if len(drawn) == 3:
            raise KeyboardInterrupt
        drawn.append(1)
        return real(*args)

    monkeypatch.setattr(demo, "render_texture", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(tmp_path / "data", seed=3, **SMALL)
    monkeypatch.undo()
    assert generate_demo_dataset(tmp_path / "data", seed=3, **SMALL) == tmp_path / "data"
    assert _files(tmp_path / "data") == _files(small_set)
    monkeypatch.setattr(demo, "render_texture", interrupted)
    drawn.clear()
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(tmp_path / "other", seed=5, **SMALL)
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="other parameters"):  # unfinished with other parameters
        generate_demo_dataset(tmp_path / "other", seed=6, **SMALL)


def test_refuses_a_path_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.write_text("not a folder")
    with pytest.raises(FileExistsError):
        generate_demo_dataset(target, **SMALL)
    assert target.read_text() == "not a folder"


def test_fills_an_existing_empty_folder(tmp_path: Path) -> None:
    assert generate_demo_dataset(tmp_path, n_per_class=1, size=48, progress=False) == tmp_path
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg")) == [
        f"{label}/{label}_0000.jpg" for label in CLASSES
    ]
    assert (tmp_path / MARKER_NAME).is_file()


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo class"):
        render_texture("plaid", np.random.default_rng(0))
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path / "x", n_per_class=0, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("size", [64, 200])
def test_render_texture_gives_an_rgb_image_of_any_requested_size(size: int) -> None:
    for label in CLASSES:
        img = render_texture(label, np.random.default_rng(7), size=size)
        assert (img.mode, img.size) == ("RGB", (size, size))


def _band_power(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Power and orientation (0..pi) of the windowed grey-level spectrum at pattern frequencies."""
    g = np.asarray(img.convert("L"), np.float64)
    n = g.shape[0]
    g = (g - g.mean()) * np.outer(np.hanning(n), np.hanning(n))
    power = np.abs(np.fft.fftshift(np.fft.fft2(g))) ** 2
    fy, fx = np.indices(power.shape) - n // 2
    band = (np.hypot(fx, fy) > 3) & (np.hypot(fx, fy) < n / 3)
    return power[band], np.arctan2(fy[band], fx[band]) % np.pi


def _anisotropy(img: Image.Image) -> float:
    """Power in the strongest of 18 orientation bins over the mean bin: 1 for isotropic textures."""
    power, angle = _band_power(img)
    bins = np.bincount((angle / np.pi * 18).astype(int) % 18, weights=power, minlength=18)
    return float(bins.max() / bins.mean())


def _peakiness(img: Image.Image) -> float:
    """Share of the power held by the 6 strongest frequencies: high for periodic patterns."""
    power = np.sort(_band_power(img)[0])
    return float(power[-6:].sum() / power.sum())


def test_classes_differ_measurably_in_their_spectra() -> None:
    images = {lab: [render_texture(lab, _child(5, lab, i), 128) for i in range(15)] for lab in CLASSES}
    aniso = {label: np.median([_anisotropy(im) for im in ims]) for label, ims in images.items()}
    peaks = {label: np.median([_peakiness(im) for im in ims]) for label, ims in images.items()}
    # Stripes put their power in one orientation; dots and rosettes spread it over several.
    assert aniso["striped"] > 2 * max(aniso["dotted"], aniso["leopard"])
    # Stripes and dot lattices are periodic (few sharp peaks); rosettes are irregular.
    assert peaks["striped"] > 1.5 * peaks["dotted"]
    assert peaks["dotted"] > 1.5 * peaks["leopard"]
