import hashlib
import io
import logging
import os
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import draw_image, make_folder, refuse_listing
from PIL import Image

from imgclf.config import DataConfig
from imgclf.data.dataset import DatasetError, leave_out_untrained, load_split, make_split, save_split, scan_dataset
from imgclf.data.io import ImageError, Preprocess, _unreadable, check_image, load_for_model, open_rgb, to_8bit


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_scan_sorted_classes_and_extensions(tmp_path: Path):
    root = make_folder(tmp_path / "d", classes=("b_cls", "a_cls"), n=3)
    Image.new("RGB", (40, 30), "red").save(root / "a_cls" / "UPPER.PNG")
    Image.new("RGB", (40, 30), "red").save(root / "a_cls" / "pic.webp")
    Image.new("RGB", (40, 30), "red").save(root / "b_cls" / "pic.TIFF")
    (root / "b_cls" / "nested").mkdir()
    Image.new("RGB", (40, 30), "red").save(root / "b_cls" / "nested" / "deep.bmp")
    # JPEG aliases (browsers on Windows save .jfif), Netpbm (classic data sets; 16-bit too) and JPEG 2000
    for name, fmt in (
        ("web.jfif", "JPEG"),
        ("old.jpe", "JPEG"),
        ("sign.ppm", "PPM"),
        ("scan.jp2", "JPEG2000"),
        ("code.j2k", "JPEG2000"),
    ):
        Image.new("RGB", (40, 30), "red").save(root / "a_cls" / name, format=fmt)
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(root / "b_cls" / "face.pgm")
    ds = scan_dataset(DataConfig(data_root=root))
    assert ds.classes == ["a_cls", "b_cls"]
    rels = [s.rel for s in ds.samples]
    assert rels == sorted(rels) and len(rels) == 16 and "a_cls/code.j2k" in rels
    big = root / "a_cls" / "a_cls_00.jpg"
    limit_mb = big.stat().st_size / 1e6 * 0.99  # --max-file-mb just below one file's size
    too_big = scan_dataset(DataConfig(data_root=root, max_file_mb=limit_mb)).skipped
    assert any(Path(s["path"]) == big and s["reason"].startswith("file too large") for s in too_big)
    assert "a_cls/UPPER.PNG" in rels and "b_cls/nested/deep.bmp" in rels and "a_cls/web.jfif" in rels
    assert ds.skipped == [] and ds.notes == []
    assert np.asarray(open_rgb(root / "a_cls" / "web.jfif"))[..., 0].min() > 240
    assert abs(int(np.asarray(open_rgb(root / "b_cls" / "face.pgm")).mean()) - 40000 * 255 // 65535) <= 1


@pytest.mark.parametrize("ext", [".avif", ".heic"])
def test_phone_formats_read_upright(tmp_path: Path, ext: str):
    """AVIF (Pillow) and HEIC (the pillow-heif plugin) are read, EXIF orientation applied once."""
    if ext == ".heic":
        pytest.importorskip("pillow_heif")
    root = make_folder(tmp_path / "d", n=2)
    im = Image.new("RGB", (60, 20), "white")
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(root / "circles" / f"photo{ext}", exif=exif.tobytes(), quality=95)
    ds = scan_dataset(DataConfig(data_root=root))
    assert f"circles/photo{ext}" in [s.rel for s in ds.samples] and ds.skipped == [] and ds.notes == []
    out = np.asarray(open_rgb(root / "circles" / f"photo{ext}"))
    assert out.shape == (60, 20, 3) and out[:5, :, 0].mean() > 200 and out[:5, :, 1].mean() < 80


def test_heic_without_its_plugin_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import imgclf.data.io as io

    monkeypatch.setattr(io, "HEIF_READABLE", False)
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)  # not registered: unreadable
    Image.init()  # every plugin registered first, so none registers into the patched list
    monkeypatch.setattr(Image, "ID", [k for k in Image.ID if k != "HEIF"])
    for read in (lambda f: check_image(f, 10**8, 10**9), open_rgb):
        with pytest.raises(ImageError, match=r"imgclf\[heif\]"):
            read(tmp_path / "photo.heic")


def test_hidden_and_system_files_links_and_loops(tmp_path: Path):
    """Archive and file-manager litter is ignored; folder links are followed once; a broken link is reported."""
    root = make_folder(tmp_path / "d", n=3)
    elsewhere = make_folder(tmp_path / "elsewhere", classes=("more",), n=2)
    (root / "__MACOSX" / "circles").mkdir(parents=True)  # what unzipping a macOS archive leaves
    (root / "__MACOSX" / "circles" / "._circles_00.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "circles" / "._circles_00.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "circles" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "squares" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "squares" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (root / "squares" / ".cache").mkdir()
    (root / "squares" / ".cache" / "a.jpg").write_bytes((root / "squares" / "squares_00.jpg").read_bytes())
    try:
        (root / "circles" / "linked").symlink_to(elsewhere / "more", target_is_directory=True)
        (root / "circles" / "linked_again").symlink_to(elsewhere / "more", target_is_directory=True)
        (root / "squares" / "loop").symlink_to(root / "squares", target_is_directory=True)
        (root / "stripes" / "everything").symlink_to("/", target_is_directory=True)  # never walked
        (root / "stripes" / "gone.jpg").symlink_to(tmp_path / "no_such.jpg")
        (root / "triangles").symlink_to(tmp_path / "unmounted" / "triangles", target_is_directory=True)
    except OSError:
        pytest.skip("this file system or user cannot make symbolic links")
    before = _tree_digest(root)
    ds = scan_dataset(DataConfig(data_root=root))
    assert ds.classes == ["circles", "squares", "stripes"]
    rels = [s.rel for s in ds.samples]
    assert len(rels) == 11 and "circles/linked/more_00.jpg" in rels and "circles/linked_again/more_00.jpg" not in rels
    assert [Path(s["path"]).name for s in ds.skipped] == ["triangles", "gone.jpg"]  # a class folder not there: said
    assert all(s["reason"].startswith("broken link to") for s in ds.skipped)
    assert "unmounted" in ds.skipped[0]["reason"] and "no_such.jpg" in ds.skipped[1]["reason"]
    two = make_folder(tmp_path / "two", classes=("a",), n=2)
    (two / "b").symlink_to(tmp_path / "unmounted" / "b", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"only one class \('a'\) .*broken link\(s\).*: b -> .*unmounted/b"):
        scan_dataset(DataConfig(data_root=two))  # the class that is missing is named, not only the one left
    assert ds.notes == [] and _tree_digest(root) == before


def test_bad_files_listed_with_reasons_and_untouched(tmp_path: Path):
    root = make_folder(tmp_path / "d", n=4)
    bad = root / "circles"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("this is not an image")
    good = (root / "circles" / "circles_00.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    Image.new("RGB", (30, 30), "blue").save(bad / "actually_png.dat", format="PNG")
    Image.new("RGB", (30, 30), "blue").save(bad / "png_named.jpg", format="PNG")
    Image.new("L", (1, 1)).save(bad / "huge.png")  # header patched below to claim 20000x20000
    data = bytearray((bad / "huge.png").read_bytes())
    data[16:24] = (20000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # valid IHDR checksum
    (bad / "huge.png").write_bytes(bytes(data))
    before = _tree_digest(root)
    ds = scan_dataset(DataConfig(data_root=root))
    reasons = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert "empty file" in reasons["zero.jpg"]
    assert "not an image" in reasons["notes.jpg"]
    assert "not an image" in reasons["corrupt.png"]
    assert "rename" in reasons["actually_png.dat"]
    assert "oversized" in reasons["huge.png"]
    # truncated JPEGs pass the cheap header check; decoding reports them (see test_features)
    assert "truncated.jpg" not in reasons
    with pytest.raises(Exception, match="truncated"):
        load_for_model(bad / "truncated.jpg", Preprocess(64))
    assert "png_named.jpg" not in reasons  # usable, and noted
    assert [Path(n["path"]).name for n in ds.notes] == ["png_named.jpg"] and "rename it to .png" in ds.notes[0]["note"]
    assert _tree_digest(root) == before


def test_only_known_formats_are_decoded_whatever_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """PostScript named .jpg would run Ghostscript, an icon named .png was used as a photo: both refused."""
    import imgclf.data.io

    root = make_folder(tmp_path / "d", n=4)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\n%%EOF\n"
    (root / "circles" / "drawing.jpg").write_bytes(eps)
    Image.new("RGB", (32, 32), "blue").save(root / "circles" / "icon.png", format="ICO")
    opened: list[object] = []
    real_open = Image.open
    monkeypatch.setattr(imgclf.data.io.Image, "open", lambda *a, **k: opened.append(k) or real_open(*a, **k))
    reasons = {Path(s["path"]).name: s["reason"] for s in scan_dataset(DataConfig(data_root=root)).skipped}
    for name in ("drawing.jpg", "icon.png"):
        assert "not an image in a format imgclf reads" in reasons[name], reasons
        with pytest.raises(ImageError, match="format imgclf reads"):
            open_rgb(root / "circles" / name)
        with pytest.raises(ImageError, match="format imgclf reads"):  # bytes sent to the server
            open_rgb(io.BytesIO((root / "circles" / name).read_bytes()))
    assert opened and all(k.get("formats") for k in opened)
    # named as what they are: said so, with the way to use them (not "not an image")
    Image.new("RGB", (32, 32), "blue").save(root / "circles" / "icon.ico")
    Image.new("RGB", (32, 32), "blue").save(root / "circles" / "pic.tga")
    (root / "circles" / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    reasons = {Path(s["path"]).name: s["reason"] for s in scan_dataset(DataConfig(data_root=root)).skipped}
    for name, kind in (("icon.ico", "ICO"), ("pic.tga", "TGA"), ("vector.svg", "SVG")):
        assert reasons[name] == f"{kind} image, a format imgclf does not read: convert it to PNG or JPEG to use it"
    (root / "circles" / "broken.apng").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a format imgclf reads
    (root / "circles" / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)  # data, no image
    reasons = {Path(s["path"]).name: s["reason"] for s in scan_dataset(DataConfig(data_root=root)).skipped}
    assert reasons["broken.apng"].startswith("not an image in a format imgclf reads")  # as a broken .png
    assert reasons["weights.h5"] == "not an image (nor named as one): not used"


def test_a_jpeg_cut_short_in_its_header_is_named_so_by_every_reader(tmp_path: Path):
    """The scan called it "not an image in a format imgclf reads ... convert the file"; decoding said
    "cannot decode (Truncated File Read)": one reason now, re-download."""
    root = make_folder(tmp_path / "d", n=4)
    path = root / "circles" / "cut.jpg"
    path.write_bytes((root / "circles" / "circles_00.jpg").read_bytes()[:40])
    reasons = {Path(s["path"]).name: s["reason"] for s in scan_dataset(DataConfig(data_root=root)).skipped}
    expected = "truncated or corrupt image data: re-download or re-save the file"
    assert reasons["cut.jpg"] == expected
    with pytest.raises(ImageError) as raised:
        open_rgb(path)
    assert str(raised.value) == expected


def test_damaged_exif_unreadable_folders_and_pillow_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    root = make_folder(tmp_path / "d", n=4)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "good.jpg", dpi=(72, 72))  # as cameras write them
    good = (tmp_path / "good.jpg").read_bytes()
    payload = b"Exif\x00\x00" + b"\x00" * 40  # an APP1 block that is no TIFF structure
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    (root / "circles" / "bad_exif.jpg").write_bytes(good[:2] + app1 + good[2:])
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        im = open_rgb(root / "circles" / "bad_exif.jpg")  # the pixels decode: used as stored, with a warning
    assert np.array_equal(np.asarray(im), np.asarray(open_rgb(tmp_path / "good.jpg")))
    assert "bad_exif.jpg: EXIF data unreadable" in caplog.text
    # a sub-folder that cannot be listed (permissions) is reported, not silently left out
    (root / "circles" / "locked").mkdir()
    refuse_listing(monkeypatch, "locked")
    ds = scan_dataset(DataConfig(data_root=root))
    reasons = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert "bad_exif.jpg" not in reasons
    assert reasons["locked"].startswith("folder unreadable (Permission denied): its images are not used")
    monkeypatch.undo()
    # --max-image-pixels above Pillow's own ceiling (twice Image.MAX_IMAGE_PIXELS) is honoured
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 20), "red").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    assert check_image(path, 10_000, 10**6) is None and open_rgb(path, max_pixels=10_000).size == (30, 20)
    with pytest.raises(ImageError, match="oversized"):
        check_image(path, 500, 10**6)
    assert "unreadable: Permission denied" in str(_unreadable(path, PermissionError(13, "Permission denied")))


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda r: None, "not found"),
        (lambda r: (r / "only").mkdir(parents=True), "only one class"),
        (lambda r: [(r / c).mkdir(parents=True) for c in ("a", "b")], "fewer than two class folders with a usable"),
        (lambda r: r.mkdir(), "no class sub-folders"),
    ],
)
def test_clear_errors(tmp_path: Path, setup, match):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DatasetError, match=match):
        scan_dataset(DataConfig(data_root=root))


def test_an_archive_given_as_data_says_to_unpack_it(tmp_path: Path):
    (tmp_path / "photos.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(DatasetError, match=r"is a file \(an archive: unpack it first\)"):
        scan_dataset(DataConfig(data_root=tmp_path / "photos.zip"))


def test_composed_and_decomposed_names_give_the_same_classes_and_split(tmp_path: Path):
    """A copy from a system that stores names decomposed (é as e + U+0301) has the same classes, class ids
    and split; a class folder named like another in the other form is that class (with a note)."""
    import shutil
    import unicodedata

    def copy(form: str, name: str = "") -> Path:
        root = tmp_path / (name or form)
        for c in ("daisy", "échinacée", "tulip"):
            for i, stem in enumerate(("été", "fleur", "zèbre", "ébène", "rose", "île", "eau", "ère")):
                f = root / unicodedata.normalize(form, f"{c}/{stem}_{i}.jpg")
                f.parent.mkdir(parents=True, exist_ok=True)
                draw_image("circles", np.random.default_rng(i)).save(f)
        return root

    def scanned(root: Path, **kw: object) -> tuple[list[str], list[tuple[str, int, str]]]:
        ds = scan_dataset(DataConfig(data_root=root, **kw))
        split = make_split(ds, DataConfig(data_root=root, **kw))
        rels = [unicodedata.normalize("NFC", s.rel) for s in ds.samples]
        return ds.classes, sorted(zip(rels, ds.labels.tolist(), split.tolist(), strict=True))

    composed, decomposed = copy("NFC"), copy("NFD")
    assert unicodedata.normalize("NFD", "échinacée") in os.listdir(decomposed)  # kept decomposed on disk
    assert scanned(composed) == scanned(decomposed)
    assert scanned(composed, split_mode="group") == scanned(decomposed, split_mode="group")
    assert scanned(composed)[0] == ["daisy", "tulip", "échinacée"]
    listed = tmp_path / "test.txt"  # a list in composed form (as split.csv and shells write it) names the files
    listed.write_text("échinacée/été_0.jpg\ndaisy/île_5.jpg\ntulip/ère_7.jpg\n", encoding="utf-8")
    assert [part for _, _, part in scanned(decomposed, test_list=listed)[1]].count("test") == 3
    ds = scan_dataset(DataConfig(data_root=composed))
    save_split(tmp_path / "split.csv", ds, make_split(ds, DataConfig(data_root=composed)))
    moved, _ = load_split(tmp_path / "split.csv", decomposed, ds.classes)  # evaluate --data-root on the copy
    assert all(moved.path(s).is_file() for s in moved.samples) and len(moved.samples) == 24
    shutil.move(
        decomposed / unicodedata.normalize("NFD", "échinacée"), composed / unicodedata.normalize("NFD", "échinacée")
    )
    ds = scan_dataset(DataConfig(data_root=composed))
    assert ds.classes == ["daisy", "tulip", "échinacée"] and int((ds.labels == 2).sum()) == 16
    notes = [unicodedata.normalize("NFC", n["note"]).split(":")[0] for n in ds.notes]
    assert notes == ["named like échinacée in another Unicode form"]
    mixed, whole = copy("NFC", "mixed"), copy("NFC", "whole")  # a class's images in its two forms: one folder's split
    (mixed / unicodedata.normalize("NFD", "échinacée")).mkdir()
    for f in sorted((mixed / "échinacée").iterdir())[4:]:
        f.rename(mixed / unicodedata.normalize("NFD", "échinacée") / f.name)
    for seed in range(3):
        assert scanned(mixed, split_seed=seed) == scanned(whole, split_seed=seed), seed


def test_classes_that_cannot_be_learned_are_left_out_and_reported(tmp_path: Path):
    """An empty class folder, or one only in val/, is left out with a reason; the run goes on."""
    root = make_folder(tmp_path / "flat", n=4)
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("not an image")
    ds = scan_dataset(DataConfig(data_root=root))
    assert ds.classes == ["circles", "squares", "stripes"] and sorted(ds.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    reasons = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert "class left out" in reasons["empty"] and "not an image" in reasons["notes.txt"]

    pre = tmp_path / "pre"
    make_folder(pre / "train", classes=("a", "b"), n=4)
    make_folder(pre / "val", classes=("a", "b", "only_val"), n=2, seed=1)
    cfg = DataConfig(data_root=pre)
    before = _tree_digest(pre)
    full = scan_dataset(cfg)
    ds, split = leave_out_untrained(full, make_split(full, cfg))
    assert ds.classes == ["a", "b"] and len(ds.samples) == len(split) == 12 and sum(split == "test") == 4
    assert [s.label for s in ds.samples] == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1]
    left_out = [s for s in ds.skipped if "has no training image" in s["reason"]]
    assert sorted(Path(s["path"]).name for s in left_out) == ["only_val_00.jpg", "only_val_01.jpg"]
    assert _tree_digest(pre) == before
    try:  # names that are not UTF-8 (possible on Linux): skipped and shown with \x escapes, not a crash
        (root / os.fsdecode(b"cls\xfe")).mkdir()
        (root / "circles" / os.fsdecode(b"bad\xff.jpg")).write_bytes((root / "circles" / "circles_00.jpg").read_bytes())
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    ds = scan_dataset(DataConfig(data_root=root))
    assert ds.classes == ["circles", "squares", "stripes"] and len(ds.samples) == 12
    reasons = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert "not valid UTF-8" in reasons["cls\\xfe"] and "rename it" in reasons["bad\\xff.jpg"]


def test_class_names_with_control_characters_are_reported(tmp_path: Path):
    """A line break in a folder name would break every line of text that prints the label."""
    root = make_folder(tmp_path / "d", n=2)
    try:
        (root / "new\nline").mkdir()
    except OSError:
        pytest.skip("this file system refuses line breaks in names")
    (root / "new\nline" / "x.jpg").write_bytes((root / "circles" / "circles_00.jpg").read_bytes())
    ds = scan_dataset(DataConfig(data_root=root))
    assert ds.classes == ["circles", "squares", "stripes"]
    assert [s["path"] for s in ds.skipped] == [str(root / "new\\nline")]
    assert "control character" in ds.skipped[0]["reason"]


def test_random_split_stratified_deterministic_and_order_free(tmp_path: Path):
    root = make_folder(tmp_path / "d", n=20)
    cfg = DataConfig(data_root=root, split_seed=7)
    ds = scan_dataset(cfg)
    split = make_split(ds, cfg)
    for c in range(3):
        assert np.sum((ds.labels == c) & (split == "test")) == 5
    # same split when the listing order differs, e.g. on another machine
    ds_shuffled = scan_dataset(cfg)
    perm = np.random.default_rng(0).permutation(len(ds_shuffled.samples))
    ds_shuffled.samples = [ds_shuffled.samples[i] for i in perm]
    ds_shuffled.samples.sort(key=lambda s: s.rel)
    assert (make_split(ds_shuffled, cfg) == split).all()
    assert not (make_split(ds, DataConfig(data_root=root, split_seed=8)) == split).all()


def test_predefined_list_and_group_modes(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    pre = tmp_path / "pre"
    make_folder(pre / "train", n=5)
    make_folder(pre / "val", n=2, seed=1)
    ds = scan_dataset(DataConfig(data_root=pre))
    split = make_split(ds, DataConfig(data_root=pre))
    assert sum(split == "test") == 6 and all(
        s.rel.startswith("val/") for s, p in zip(ds.samples, split, strict=True) if p == "test"
    )
    make_folder(pre / "test", n=3, seed=2)  # train/, val/ and test/: test/ tests, val/ trains too
    make_folder(pre / "extra", classes=("circles",), n=1, seed=3)
    Image.new("RGB", (30, 30), "red").save(pre / "loose.png")
    (pre / "PROVENANCE.md").write_text("not an image, not reported")
    ds = scan_dataset(DataConfig(data_root=pre))
    split = make_split(ds, DataConfig(data_root=pre))
    tests = [s.rel.split("/")[0] for s, p in zip(ds.samples, split, strict=True) if p == "test"]
    assert tests == ["test"] * 9 and sum(split == "train") == 15 + 6
    assert [(Path(s["path"]).name, s["reason"]) for s in ds.skipped] == [
        ("extra", "folder beside train/, val/, test/: in no split, not used"),
        ("loose.png", "image not inside a class folder: move it into one to use it"),
    ]
    pooled = DataConfig(data_root=pre, split_mode="random")  # split again: the classes stay the classes
    ds = scan_dataset(pooled)
    assert ds.classes == ["circles", "squares", "stripes"] and len(ds.samples) == 30
    assert sum(make_split(ds, pooled) == "test") == 6  # a quarter of each class's 10, rounded to 2

    root = make_folder(tmp_path / "flat", n=6)
    (tmp_path / "test.txt").write_text("circles/circles_00.jpg\nsquares/squares_01.jpg\nstripes/stripes_02.jpg\n")
    cfg = DataConfig(data_root=root, split_mode="list", test_list=tmp_path / "test.txt")
    split = make_split(scan_dataset(cfg), cfg)
    assert sum(split == "test") == 3
    auto = DataConfig(data_root=root, test_list=tmp_path / "test.txt")  # the default mode follows the list given
    assert np.array_equal(make_split(scan_dataset(auto), auto), split)
    contradicting = DataConfig(data_root=root, split_mode="random", test_list=tmp_path / "test.txt")
    with pytest.raises(DatasetError, match="--test-list names the test images, --split-mode random splits"):
        make_split(scan_dataset(contradicting), contradicting)
    (tmp_path / "test.txt").write_text("circles\\circles_00.jpg\n", encoding="utf-16")  # PowerShell 5's `>`
    with pytest.raises(DatasetError, match=r"test list .*test.txt is not UTF-8 text \(it is UTF-16\).*save the file"):
        make_split(scan_dataset(cfg), cfg)
    (tmp_path / "test.txt").write_text("circles\\circles_00.jpg\n/elsewhere/x.jpg\n")  # a Windows path; outside
    with pytest.raises(DatasetError, match=r"1 path\(s\) in .*test.txt are not usable images .*'/elsewhere/x.jpg'"):
        make_split(scan_dataset(cfg), cfg)
    try:  # an absolute path through a folder link inside the data folder names an image of it
        (root / "circles" / "more").symlink_to(make_folder(tmp_path / "other", classes=("m",), n=1) / "m")
    except OSError:
        pass
    else:
        (tmp_path / "test.txt").write_text(f"{root}/circles/more/m_00.jpg\nsquares/squares_01.jpg\n")
        assert sum(make_split(scan_dataset(cfg), cfg) == "test") == 2

    grouped = tmp_path / "grouped"
    for c in ("a", "b"):
        for g in range(4):
            make_folder(grouped / c / f"session{g}", classes=("x",), n=3, seed=g)
    cfg = DataConfig(data_root=grouped, split_mode="group", train_fraction=0.5)
    ds = scan_dataset(cfg)
    split = make_split(ds, cfg)
    for g in {s.group for s in ds.samples}:
        assert len({p for s, p in zip(ds.samples, split, strict=True) if s.group == g}) == 1
    make_folder(tmp_path / "one_group" / "a" / "session0", classes=("x",), n=4)
    make_folder(tmp_path / "one_group" / "b" / "session0", classes=("x",), n=4)
    make_folder(tmp_path / "one_group" / "b" / "session1", classes=("x",), n=4, seed=1)
    cfg = DataConfig(data_root=tmp_path / "one_group", split_mode="group")
    with pytest.raises(
        DatasetError,
        match=r"test split holds fewer than two classes \(none of a\): a class whose images lie in one sub-folder",
    ):
        make_split(scan_dataset(cfg), cfg)
    make_folder(tmp_path / "one_group" / "c" / "session0", classes=("x",), n=4, seed=2)
    make_folder(tmp_path / "one_group" / "c" / "session1", classes=("x",), n=4, seed=3)
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        split = make_split(ds := scan_dataset(cfg), cfg)
    assert "no test image of a: learned but not evaluated" in caplog.text
    assert {ds.classes[s.label] for s, p in zip(ds.samples, split, strict=True) if p == "test"} == {"b", "c"}


def test_split_csv_round_trip(tmp_path: Path):
    root = make_folder(tmp_path / "d", n=8)
    cfg = DataConfig(data_root=root)
    ds = scan_dataset(cfg)
    split = make_split(ds, cfg)
    save_split(tmp_path / "split.csv", ds, split)
    ds2, split2 = load_split(tmp_path / "split.csv", root, ds.classes)
    assert [s.rel for s in ds2.samples] == [s.rel for s in ds.samples]
    assert (split2 == split).all() and (ds2.labels == ds.labels).all()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest drops import-time filters
def test_readers_leave_warning_filters_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Images decode in threads, where warnings.catch_warnings (not thread-safe) would drop others' filters."""
    from imgclf.datatools.download import _decode

    path = tmp_path / "big.png"
    Image.new("RGB", (30, 20), "red").save(path)
    real, entered = warnings.catch_warnings, []
    monkeypatch.setattr(warnings, "catch_warnings", lambda *a, **k: entered.append(1) or real(*a, **k))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow's own limit, below the image's 600 pixels
    with pytest.raises(ImageError, match="oversized"):
        open_rgb(path)  # no limit of its own: Pillow's applies
    assert check_image(path, 10_000, 10**6) is None
    assert open_rgb(path, max_pixels=10_000).size == (30, 20)
    assert _decode(path.read_bytes(), "image/png", 10_000)[1:] == (30, 20)
    assert not entered
    # Pillow's warning is filtered once, when imgclf is imported; behind the program's own filters, such as
    # "error" (Pillow's advice against decompression bombs), set before or after the import
    code = f"import imgclf; from PIL import Image; Image.MAX_IMAGE_PIXELS = 500; Image.open({str(path)!r}).load()"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert quiet.stderr == ""
    for where in ("-W", "error", "-c", code), ("-c", f"import warnings; warnings.simplefilter('error'); {code}"):
        refused = subprocess.run([sys.executable, *where], capture_output=True, text=True)
        assert refused.returncode == 1 and "DecompressionBombWarning: Image size (600 pixels)" in refused.stderr


def test_pillow_without_a_pixel_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``Image.MAX_IMAGE_PIXELS = None`` (a common line in a program's own code) made every image "cannot decode"
    (a TypeError comparing with None): no limit of Pillow's and none given is no limit."""
    path = tmp_path / "a.png"
    Image.new("RGB", (30, 20), "red").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert open_rgb(path).size == (30, 20)
    with pytest.raises(ImageError, match="oversized"):
        open_rgb(path, max_pixels=500)


def test_a_progressive_jpeg_of_very_many_scans_is_refused(tmp_path: Path):
    """Each scan of a progressive JPEG is another pass over every block: a 1.4 MB file of 10,000 repeated scans
    held a server's decoding threads for minutes. Refused before decoding, from a file or from bytes."""
    buf = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    assert data.count(b"\xff\xda") < 20
    assert open_rgb(io.BytesIO(data)).size == (64, 64)  # an ordinary progressive JPEG
    last = data.rindex(b"\xff\xda")  # the last scan (its header and data, up to the end-of-image marker)
    (tmp_path / "scans.jpg").write_bytes(data[:-2] + data[last:-2] * 150 + data[-2:])
    for given in (tmp_path / "scans.jpg", io.BytesIO((tmp_path / "scans.jpg").read_bytes())):
        with pytest.raises(ImageError, match=r"progressive JPEG of 156 scans \(more than 100: .*re-save the file"):
            open_rgb(given)
    # an MPO (a camera's JPEG with a preview frame): Pillow names its format so, and it was not checked
    frames = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(
        frames, "MPO", save_all=True, append_images=[Image.new("RGB", (64, 64), "blue")], progressive=True
    )
    mpo = frames.getvalue()
    end = mpo.index(b"\xff\xd9")  # the first frame's end
    scan = mpo[mpo.rindex(b"\xff\xda", 0, end) : end]
    with pytest.raises(ImageError, match="progressive JPEG of 160 scans"):
        open_rgb(io.BytesIO(mpo[:end] + scan * 150 + mpo[end:]))
    # garbage between segments, which decoders skip, did not hide the scans after it from the count
    second = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    many = data[:-2] + data[last:-2] * 150 + data[-2:]
    for junk in (b"\xff\xfe\x00\x03A\x00", b"\xff\xfe\x00\x03A\xff\x00\xff\xff"):  # a stray byte; FF00 FFFF
        with pytest.raises(ImageError, match="progressive JPEG of 156 scans"):
            open_rgb(io.BytesIO(many[:second] + junk + many[second:]))
    # what follows the image (a motion photo's video) holds the marker's bytes by chance: not counted
    after = data + b"\xff\xda\x00\x08" * 500
    assert open_rgb(io.BytesIO(after)).size == (64, 64)


def test_exif_orientation_applied(tmp_path: Path):
    im = Image.new("RGB", (60, 20), "white")
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = open_rgb(tmp_path / "rot.jpg")
    assert out.size == (20, 60)
    top = np.asarray(out)[:5].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 80  # the red band is now on top


def test_an_mpo_is_draft_decoded_as_the_same_jpeg_is(tmp_path: Path):
    """A camera JPEG with a second (MPF) frame, which Pillow calls MPO, was decoded at full size: slower, and
    other pixels than the same picture without that frame."""
    from imgclf.datatools.download import _decode

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((800, 600), Image.Resampling.BICUBIC)
    im.save(tmp_path / "plain.jpg", quality=90)
    im.save(tmp_path / "mpo.jpg", "MPO", save_all=True, append_images=[im.resize((200, 150))], quality=90)
    with Image.open(tmp_path / "mpo.jpg") as mpo:
        assert mpo.format == "MPO"
    assert open_rgb(tmp_path / "mpo.jpg", draft_to=100).size == open_rgb(tmp_path / "plain.jpg", draft_to=100).size
    assert open_rgb(tmp_path / "mpo.jpg", draft_to=100).size == (200, 150)
    pre = Preprocess(96)
    assert np.array_equal(load_for_model(tmp_path / "mpo.jpg", pre), load_for_model(tmp_path / "plain.jpg", pre))
    decoded = [_decode((tmp_path / n).read_bytes(), "image/jpeg", 10**6, 100)[0] for n in ("mpo.jpg", "plain.jpg")]
    assert decoded[0].size == decoded[1].size == (200, 150)  # the downloader drafts it too


def test_transparency_and_modes(tmp_path: Path):
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (30, 30), 128).save(tmp_path / "grey.gif")
    assert np.asarray(open_rgb(tmp_path / "clear.png")).min() == 255  # composited on white
    # a colour key (tRNS on an RGB or grey PNG, what optimisers write for on/off alpha) is transparency too
    Image.new("RGB", (30, 30), (0, 0, 0)).save(tmp_path / "key_rgb.png", transparency=(0, 0, 0))
    Image.new("L", (30, 30), 0).save(tmp_path / "key_grey.png", transparency=0)
    for name in ("key_rgb.png", "key_grey.png"):
        assert np.asarray(open_rgb(tmp_path / name)).min() == 255, name
    arr = load_for_model(tmp_path / "grey.gif", Preprocess(24))
    assert arr.shape == (24, 24, 3) and arr.dtype == np.uint8


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path: Path):
    """16-bit PNG/TIFF (microscopy, scans) and float TIFF: Pillow's own conversion would clip them to white."""
    ramp = np.linspace(0, 1, 256)[None].repeat(8, 0)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.tif")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(tmp_path / "unit.tif")
    Image.fromarray((ramp * 5000 - 1000).astype(np.float32), mode="F").save(tmp_path / "wide.tif")
    for name in ("g16.png", "g16.tif", "unit.tif", "wide.tif"):
        row = np.asarray(open_rgb(tmp_path / name))[0, :, 0].astype(int)
        assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1, name


def test_high_bit_depth_images_are_scaled_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A 0.1 MB 16-bit PNG of 16 Mpx took 8 bytes a pixel several times over (float64 copies of the whole):
    the server's memory promise held for 8-bit images only. Block by block, the result is the same."""
    ramp = (np.arange(4000 * 4000, dtype=np.uint32) % 65535).astype(np.uint16).reshape(4000, 4000)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    code = (
        "from pathlib import Path; from imgclf.data.io import open_rgb;"
        f"im = open_rgb(Path({str(tmp_path / 'g16.png')!r}), max_pixels=10**9);"
        "peak = int(Path('/proc/self/status').read_text().split('VmHWM:')[1].split()[0]);"
        "print(im.size[0], im.getpixel((1000, 0))[0], peak // 1024)"
    )
    width, pixel, peak = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert (width, pixel) == ("4000", str(round(1000 * 255 / 65535)))
    assert int(peak) < 350, f"peak memory {peak} MB"  # 600 MB before
    small = Image.fromarray(np.random.default_rng(0).normal(0, 3, (700, 300)).astype(np.float32), mode="F")
    whole = np.asarray(small, np.float64)
    expected = np.clip(np.rint((whole - whole.min()) * (255.0 / (whole.max() - whole.min()))), 0, 255)
    for block in (1 << 20, 301, 1):  # one block, uneven blocks, a row at a time
        monkeypatch.setattr("imgclf.data.io._BLOCK_PIXELS", block)
        np.testing.assert_array_equal(np.asarray(to_8bit(small)), expected.astype(np.uint8))


def test_a_thin_strip_is_cropped_before_it_is_enlarged(tmp_path: Path):
    """A 1-pixel-high strip scaled so its short side fits the model would need gigabytes (a 1 kB PNG could
    take down the server); only the centre square is resized. Ordinary shapes keep their exact pixels."""
    Image.new("RGB", (60_000, 1), (10, 200, 30)).save(tmp_path / "strip.png")
    code = (
        "from pathlib import Path; from imgclf.data.io import Preprocess, load_for_model;"
        f"a = load_for_model(Path({str(tmp_path / 'strip.png')!r}), Preprocess(224));"
        "peak = int(Path('/proc/self/status').read_text().split('VmHWM:')[1].split()[0]);"
        "print(a.shape, a[112, 112].tolist(), peak // 1024)"
    )  # VmHWM is this process's own peak; ru_maxrss starts from the forking pytest process's
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:5] == ["(224,", "224,", "3)", "[10,", "200,"], out
    assert int(out[6]) < 2000, f"peak memory {out[6]} MB"  # about 12 GB before the crop came first
    rng = np.random.default_rng(0)
    for size in ((500, 375), (240, 214), (2000, 120)):  # the last is 17:1, beyond most photos
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "p.png")
        im = open_rgb(tmp_path / "p.png")
        pre = Preprocess(224)
        nw, nh = max(224, round(size[0] * 256 / min(size))), max(224, round(size[1] * 256 / min(size)))
        whole = np.asarray(im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0))
        top, left = (nh - 224) // 2, (nw - 224) // 2
        np.testing.assert_array_equal(
            load_for_model(tmp_path / "p.png", pre), whole[top : top + 224, left : left + 224]
        )


def test_demo_data_on_a_full_disk_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """The message was ``No space left on device (free space ...)``, naming no file or folder."""
    import errno

    from imgclf.cli import main

    real_open = io.open

    def full_for_images(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            write = f.write

            def failing(data: bytes) -> int:
                if bytes(data[:2]) == b"\xff\xd8":  # a JPEG: the marker file goes in, the first image does not
                    raise OSError(errno.ENOSPC, "No space left on device")
                return write(data)

            f.write = failing
        return f

    data = tmp_path / "demo"
    with monkeypatch.context() as m:
        m.setattr(io, "open", full_for_images)
        assert main(["demo", "--data", str(data), "--out", str(tmp_path / "run"), "--n-per-class", "1"]) == 2
    image = data / "dotted" / "dotted_0000.jpg"
    assert f"No space left on device: {image} (free space there, or give other --data" in capsys.readouterr().err
    assert sorted(p.name for p in (data / "dotted").iterdir()) == []  # no temporary file left


def test_a_folder_that_lists_but_cannot_be_entered_is_reported_not_fatal(tmp_path: Path, monkeypatch):
    """A folder without search permission (chmod 644: its names list, its files cannot be looked at) stopped
    train and predict with a PermissionError blamed on writing; its images are now skipped, each named."""
    root = make_folder(tmp_path / "d", n=4)
    (root / "circles" / "batch2").mkdir()
    for i in range(2):
        draw_image("circles", np.random.default_rng(i)).save(root / "circles" / "batch2" / f"b{i}.jpg")
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if Path(os.fsdecode(path)).parent.name == "batch2":
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    ds = scan_dataset(DataConfig(data_root=root))
    assert len(ds.samples) == 12
    reasons = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert reasons == {"b0.jpg": "unreadable: Permission denied", "b1.jpg": "unreadable: Permission denied"}


def test_a_class_folder_linking_up_the_tree_is_not_followed(tmp_path: Path):
    """A class folder that links to the data folder or to / read every file below it (a bogus class of all
    images, or the whole file system); it is left out with its reason."""
    root = make_folder(tmp_path / "d", n=4)
    (root / "all").symlink_to(".")
    (root / "everything").symlink_to("/")
    ds = scan_dataset(DataConfig(data_root=root))
    assert ds.classes == ["circles", "squares", "stripes"] and len(ds.samples) == 12
    reasons = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert (
        reasons["all"] == f"class folder is a link to {root.resolve()}, which holds the data folder: not followed "
        "(it would read all below it)"
    )
    assert reasons["everything"].startswith("class folder is a link to /, which holds")


def test_classes_differing_only_in_letter_case_are_noted(tmp_path: Path):
    """Rose/ and rose/ were two classes without a word: a copy on macOS or Windows merges their folders."""
    root = make_folder(tmp_path / "d", classes=("Rose", "rose", "tulip"), n=2)
    ds = scan_dataset(DataConfig(data_root=root))
    assert ds.classes == ["Rose", "rose", "tulip"]
    assert [n["note"].split(":")[0] for n in ds.notes] == ["classes 'Rose' and 'rose' differ only in letter case"]
    split = make_folder(tmp_path / "s" / "train", classes=("Rose", "rose", "tulip"), n=2).parent
    make_folder(split / "val", classes=("Rose", "rose", "tulip"), n=2)
    assert [n["path"] for n in scan_dataset(DataConfig(data_root=split)).notes] == [str(split / "train" / "rose")]


def test_a_large_image_is_not_starved_by_a_stream_of_small_ones():
    """Pixels are taken in the order asked: an image needing the whole budget waited for ever behind four
    threads decoding small images in turn (the budget was never all free at once)."""
    import threading
    import time

    from imgclf.data.io import PixelBudget

    budget, stop, admitted = PixelBudget(100), threading.Event(), threading.Event()

    def small() -> None:
        while not stop.is_set():
            with budget.hold(30):
                time.sleep(0.01)

    def large() -> None:
        with budget.hold(100):
            admitted.set()

    workers = [threading.Thread(target=small) for _ in range(4)]
    for t in workers:
        t.start()
    time.sleep(0.1)
    waiting = threading.Thread(target=large)
    waiting.start()
    got_in = admitted.wait(5)
    stop.set()
    for t in [*workers, waiting]:
        t.join(10)
    assert got_in
