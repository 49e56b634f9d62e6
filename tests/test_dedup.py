import csv
import hashlib
import io
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fakeprovider import make_image, run_cli
from helpers import held_elsewhere, refuse_listing
from PIL import Image

import imgclf.datatools.dedup as dedup
from imgclf.datatools.dedup import (
    HashCache,
    HashInfo,
    find_duplicates,
    find_label_conflicts,
    find_leaks,
    group_duplicates,
    hash_images,
    popcount,
    popcount_lut,
    write_reports,
)
from imgclf.datatools.journal import QUARANTINE_DIR, journal_path, quarantine, undo
from imgclf.utils import FolderInUse


def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _recompressed(data: bytes, scale: float, quality: int) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _digests(root: Path, skip_quarantine: bool = True) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.jpg")) + sorted(root.rglob("*.png"))
        if not (skip_quarantine and QUARANTINE_DIR in p.relative_to(root).parts)
    }


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """a/, b/: one picture in three copies (one larger), two distinct pictures, and files dedup ignores."""
    root = tmp_path / "data"
    pic = make_image(1, size=(160, 120))
    _put(root / "a" / "x1.jpg", pic)
    _put(root / "b" / "x0.jpg", pic)
    big = Image.open(io.BytesIO(pic)).resize((320, 240), Image.Resampling.LANCZOS)
    big.save(root / "b" / "zz_large.png")
    _put(root / "a" / "other.jpg", make_image(2, size=(160, 120)))
    _put(root / "b" / "nested" / "third.jpg", make_image(3, size=(160, 120)))
    _put(root / "b" / ".hidden" / "x.jpg", pic)  # hidden folder: ignored
    _put(root / "loose.jpg", pic)  # not in a class folder: ignored
    _put(root / "a" / "broken.jpg", b"not an image")
    return root


def test_groups_keep_largest_then_first_path_and_reports(data: Path):
    result = find_duplicates(data, max_distance=4)
    assert result.n_images == 5 and result.skipped[0][0] == "a/broken.jpg"
    assert len(result.groups) == 1
    group = result.groups[0]
    assert [m.path for m in group] == ["b/zz_large.png", "a/x1.jpg", "b/x0.jpg"]
    assert [m.kept for m in group] == [True, False, False] and (group[0].width, group[0].height) == (320, 240)
    assert result.extras == [("a/x1.jpg", "b/zz_large.png"), ("b/x0.jpg", "b/zz_large.png")]
    assert result.across_classes == [group]  # a/ and b/ hold the same picture: said, as a label may be wrong
    csv_path, html_path = write_reports(result)
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["group"], r["path"], r["kept"]) for r in rows] == [
        ("1", "b/zz_large.png", "yes"),
        ("1", "a/x1.jpg", "no"),
        ("1", "b/x0.jpg", "no"),
    ]
    assert rows[1]["distance"] == rows[2]["distance"] and rows[0]["width"] == "320"
    page = html_path.read_text()
    assert page.count("data:image/jpeg;base64,") == 3 and "a/broken.jpg" in page


def test_groups_across_classes_of_a_folder_laid_out_by_split(tmp_path: Path):
    """train/ants and val/ants are one class: a copy in both is a leak, not a wrong label; one in train/bees is."""
    root = tmp_path / "data"
    leak, wrong = make_image(1, size=(160, 120)), make_image(2, size=(160, 120))
    for rel, pic in [("train/ants/a.jpg", leak), ("val/ants/a_copy.jpg", leak)]:
        _put(root / rel, pic)
    for rel, pic in [("train/ants/b.jpg", wrong), ("train/bees/b_copy.jpg", wrong)]:
        _put(root / rel, pic)
    _put(root / "val" / "bees" / "c.jpg", make_image(3, size=(160, 120)))
    result = find_duplicates(root)
    assert len(result.groups) == 2
    assert [[m.path for m in g] for g in result.across_classes] == [["train/ants/b.jpg", "train/bees/b_copy.jpg"]]


def test_a_split_left_without_a_class_by_apply_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """val/ants held only a copy of a training ant: the warning said "a copy of one in another class: train
    leaves the class out", both untrue in a train/val layout."""
    root = tmp_path / "data"
    leak = make_image(1, size=(160, 120))
    _put(root / "train" / "ants" / "a.jpg", leak)
    _put(root / "val" / "ants" / "a_copy.jpg", leak)
    for split, seed in (("train", 2), ("val", 3)):
        _put(root / split / "bees" / "b.jpg", make_image(seed, size=(160, 120)))
    assert run_cli(["dedup", str(root), "--apply"]) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: {root / 'val' / 'ants'} holds no image now (each was a copy of an image kept in another folder)"
        in err
    )
    assert ": val/ holds no ants now; --undo brings its images back" in err


def test_keep_rule_is_deterministic():
    same = np.packbits(np.arange(256) % 3 == 0).tobytes()
    infos = [HashInfo(same, 100, 100), HashInfo(same, 200, 100), HashInfo(same, 200, 100)]
    groups = group_duplicates(["c.jpg", "b.jpg", "a.jpg"], infos)
    assert [m.path for m in groups[0]] == ["a.jpg", "b.jpg", "c.jpg"]  # largest, then first path
    infos = [HashInfo(same, 400, 400), HashInfo(same, 100, 100)]  # a larger copy waiting to be labelled
    groups = group_duplicates(["unlabeled/IMG_1.jpg", "whale/w1.jpg"], infos)
    assert [m.path for m in groups[0]] == ["whale/w1.jpg", "unlabeled/IMG_1.jpg"]  # the class keeps its image


def test_a_torn_journal_line_loses_no_later_record(data: Path):
    before = _digests(data)
    assert quarantine(data, [("a/x1.jpg", "b/zz_large.png")]).problems == []
    with open(journal_path(data), "a", encoding="utf-8") as f:
        f.write('{"op": "move", "path": "a/o')  # a crash in the middle of a record
    assert quarantine(data, [("b/x0.jpg", "b/zz_large.png")]).problems == []
    report = undo(data)
    assert sorted(report.done) == ["a/x1.jpg", "b/x0.jpg"] and len(report.problems) == 1  # the torn line, named
    assert _digests(data) == before


def test_a_second_apply_or_undo_at_once_stops_before_moving(data: Path, capsys: pytest.CaptureFixture[str]):
    """Two --apply at once on one folder each reported dozens of 'not moved' (and journaled them): the second
    now stops at once, before its search, with a message; the report alone needs no lock."""
    from imgclf.cli import main

    before = _digests(data)
    with held_elsewhere(data):  # another dedup moving files in the folder
        for command in (["--apply"], ["--undo"]):
            assert main(["dedup", str(data), "--max-distance", "4", *command]) == 2
            assert (
                f"another imgclf dedup --apply or --undo, download, scrape or review app is changing {data}"
                in capsys.readouterr().err
            )
        for call in (lambda: undo(data), lambda: quarantine(data, [])):  # from Python too
            with pytest.raises(FolderInUse):
                call()
        assert run_cli(["dedup", str(data), "--max-distance", "4"]) == 0
    assert _digests(data) == before and not (data / QUARANTINE_DIR).exists()
    assert run_cli(["dedup", str(data), "--max-distance", "4", "--apply"]) == 0  # released
    assert run_cli(["dedup", str(data), "--undo"]) == 0 and _digests(data) == before
    from imgclf.utils import default_cache_dir

    key = hashlib.sha256(os.path.realpath(data).encode()).hexdigest()[:16]
    (default_cache_dir() / "locks" / f"dedup-{key}.lock").unlink()
    (default_cache_dir() / "locks" / f"dedup-{key}.lock").mkdir()  # a lock file that cannot be opened: unguarded
    assert main(["dedup", str(data), "--max-distance", "4", "--apply"]) == 0


def test_apply_then_undo_restores_exactly(data: Path, capsys: pytest.CaptureFixture[str]):
    before = _digests(data)
    assert run_cli(["dedup", str(data), "--max-distance", "4"]) == 0
    out, err = capsys.readouterr()
    assert "nothing moved" in out and _digests(data) == before
    assert "warning: 1 group(s) hold images of different classes" in err  # `a/` lost its picture to `b/` unsaid
    assert "  b/zz_large.png (kept): a/x1.jpg, b/x0.jpg" in err
    assert run_cli(["dedup", str(data), "--max-distance", "4", "--apply"]) == 0
    assert "moved 2 extra copies" in capsys.readouterr().out
    assert not (data / "a" / "x1.jpg").exists() and (data / "b" / "zz_large.png").exists()
    moved = _digests(data / QUARANTINE_DIR)
    assert moved == {"a/x1.jpg": before["a/x1.jpg"], "b/x0.jpg": before["b/x0.jpg"]}  # nothing deleted
    records = [json.loads(line) for line in journal_path(data).read_text().splitlines()]
    assert [(r["op"], r["path"], r["sha256"]) for r in records] == [
        ("move", "a/x1.jpg", before["a/x1.jpg"]),
        ("move", "b/x0.jpg", before["b/x0.jpg"]),
    ]
    assert run_cli(["dedup", str(data), "--max-distance", "4", "--apply"]) == 0  # nothing left to move
    assert run_cli(["dedup", str(data), "--undo"]) == 0
    assert _digests(data) == before
    assert [p.name for p in (data / QUARANTINE_DIR).iterdir()] == ["journal.jsonl"]
    assert run_cli(["dedup", str(data), "--undo"]) == 0  # already undone: nothing to do


def test_undo_refuses_to_overwrite(data: Path, capsys: pytest.CaptureFixture[str]):
    assert run_cli(["dedup", str(data), "--max-distance", "4", "--apply"]) == 0
    _put(data / "a" / "x1.jpg", b"a new file the user put there")
    assert run_cli(["dedup", str(data), "--undo"]) == 1
    assert "a/x1.jpg exists: not overwritten" in capsys.readouterr().err
    assert (data / "a" / "x1.jpg").read_bytes() == b"a new file the user put there"
    assert (data / QUARANTINE_DIR / "a" / "x1.jpg").exists() and (data / "b" / "x0.jpg").exists()


def test_a_copy_back_in_place_after_apply_gets_advice_that_helps(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """The advice was "run `imgclf dedup --undo` first": no folder (an error as pasted), and an undo cannot
    restore onto the copy, so --apply refused again. Commands printed quote a folder with a space."""
    root = shutil.copytree(data, tmp_path / "my photos")
    assert run_cli(["dedup", str(root), "--max-distance", "4"]) == 0
    assert f"`imgclf dedup '{root}' --apply` moves" in capsys.readouterr().out
    assert run_cli(["dedup", str(root), "--max-distance", "4", "--apply"]) == 0
    assert f"(`imgclf dedup '{root}' --undo` restores them)" in capsys.readouterr().out
    (root / "a" / "x1.jpg").write_bytes((data / "a" / "x1.jpg").read_bytes())  # back, from a sync
    assert run_cli(["dedup", str(root), "--max-distance", "4", "--apply"]) == 1
    err = capsys.readouterr().err
    assert f"{root / QUARANTINE_DIR / 'a' / 'x1.jpg'} exists (an earlier --apply put a copy of that name there)" in err
    assert "delete one of them or move the quarantined one elsewhere, and run again" in err
    assert (root / "a" / "x1.jpg").read_bytes() == (data / "a" / "x1.jpg").read_bytes()


def test_a_move_cut_short_between_its_two_steps_is_finished(data: Path, monkeypatch: pytest.MonkeyPatch):
    """Killed between link and unlink, a file is under both names: --apply and --undo each refused the
    other ("run --undo first" / "exists: not overwritten") for good; both now finish the move."""
    before = _digests(data)
    real_unlink = os.unlink

    def killed(path: object, *args: object, **kwargs: object) -> None:
        monkeypatch.setattr(os, "unlink", real_unlink)
        raise KeyboardInterrupt  # as a kill would stop it: after the link, before the unlink

    monkeypatch.setattr(os, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        run_cli(["dedup", str(data), "--max-distance", "4", "--apply"])
    assert os.path.samefile(data / "a" / "x1.jpg", data / QUARANTINE_DIR / "a" / "x1.jpg")
    assert run_cli(["dedup", str(data), "--max-distance", "4", "--apply"]) == 0
    assert not (data / "a" / "x1.jpg").exists() and not (data / "b" / "x0.jpg").exists()
    monkeypatch.setattr(os, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        run_cli(["dedup", str(data), "--undo"])
    assert run_cli(["dedup", str(data), "--undo"]) == 0 and _digests(data) == before
    assert not list((data / QUARANTINE_DIR).rglob("*.jpg"))


def test_hashes_go_where_the_cache_folder_is_asked(data: Path, tmp_path: Path):
    hash_images([data / "a" / "x1.jpg"], cache_dir=tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "dhash" / "dhash.sqlite").is_file()


def test_near_duplicate_found_only_with_max_distance(tmp_path: Path):
    root = tmp_path / "d"
    original = make_image(4, size=(400, 300))
    _put(root / "a" / "original.jpg", original)
    _put(root / "a" / "copy.jpg", _recompressed(original, 0.55, 40))
    for i in range(5):
        _put(root / "b" / f"different{i}.jpg", make_image(10 + i, size=(400, 300)))
    near = find_duplicates(root, max_distance=12)
    assert [[m.path for m in g] for g in near.groups] == [["a/original.jpg", "a/copy.jpg"]]
    assert 0 <= near.groups[0][1].distance <= 12
    if near.groups[0][1].distance > 0:
        assert find_duplicates(root, max_distance=0).groups == []


def test_names_that_are_not_utf8_are_reported_not_fatal(tmp_path: Path):
    root = tmp_path / "d"
    pic = make_image(4, size=(200, 150))
    _put(root / "a" / "one.jpg", pic)
    try:
        _put(root / "a" / os.fsdecode(b"copy\xff.jpg"), pic)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    result = find_duplicates(root)
    assert result.groups == [] and result.skipped == [("a/copy\\xff.jpg", "name is not valid UTF-8 text: rename it")]


def test_find_leaks(tmp_path: Path):
    a, b, c = (make_image(20 + i, size=(300, 200)) for i in range(3))
    train = [_put(tmp_path / "train" / n, d) for n, d in (("a.jpg", a), ("b.jpg", b))]
    test = [
        _put(tmp_path / "test" / "a_copy.jpg", a),
        _put(tmp_path / "test" / "b_small.jpg", _recompressed(b, 0.6, 50)),
        _put(tmp_path / "test" / "c.jpg", c),
    ]
    exact = find_leaks(train, test)
    assert exact[0] == (str(train[0]), str(test[0]), 0)
    near = find_leaks([str(p) for p in train], [str(p) for p in test], max_distance=12)
    assert [(Path(t).name, Path(s).name) for t, s, _ in near] == [("a.jpg", "a_copy.jpg"), ("b.jpg", "b_small.jpg")]
    assert find_leaks(train, []) == []


def test_find_label_conflicts(tmp_path: Path):
    """Copies filed under different labels are pairs (one label is wrong); copies under one label are not."""
    a, b = make_image(20, size=(300, 200)), make_image(21, size=(300, 200))
    paths = [
        _put(tmp_path / "cats" / "a.jpg", a),
        _put(tmp_path / "cats" / "a_again.jpg", a),  # a duplicate, but labelled alike
        _put(tmp_path / "dogs" / "a_copy.jpg", a),
        _put(tmp_path / "dogs" / "b.jpg", b),
        _put(tmp_path / "cats" / "b_small.jpg", _recompressed(b, 0.6, 50)),
    ]
    labels = ["cats", "cats", "dogs", "dogs", "cats"]
    exact = find_label_conflicts(paths, labels)
    assert [(Path(p).name, Path(q).name, d) for p, q, d in exact] == [
        ("a.jpg", "a_copy.jpg", 0),
        ("a_again.jpg", "a_copy.jpg", 0),
    ]
    near = find_label_conflicts(paths, labels, max_distance=12)
    assert ("b.jpg", "b_small.jpg") in [(Path(q).name, Path(p).name) for p, q, _ in near] and len(near) == 3
    assert find_label_conflicts(paths[:2], labels[:2]) == []


def test_hashes_are_cached(data: Path, monkeypatch: pytest.MonkeyPatch):
    paths = [data / "a" / "x1.jpg", data / "a" / "other.jpg"]
    first, _ = hash_images(paths)

    def no_decoding(*args: object, **kwargs: object) -> HashInfo:
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(dedup, "compute_hash", no_decoding)
    again, skipped = hash_images(paths)
    assert again == first and not skipped


def test_a_picture_rewritten_at_its_size_and_time_is_hashed_anew(tmp_path: Path):
    """The cache key was size and mtime: a file rewritten in place with its time put back (`exiftool -P`,
    `rsync -t`) kept its old hash, and dedup its old groups."""
    path = tmp_path / "a" / "x.bmp"
    path.parent.mkdir()
    Image.open(io.BytesIO(make_image(1, size=(64, 48)))).save(path)
    (before,) = hash_images([path])[0].values()
    st = path.stat()
    Image.open(io.BytesIO(make_image(2, size=(64, 48)))).save(path)  # a BMP: the same size in bytes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    (after,) = hash_images([path])[0].values()
    assert after.bits != before.bits


def test_grouping_10000_hashes_finds_the_planted_near_duplicates():
    """Its speed is measured in bench/bench_dedup.py, against a pair-by-pair imagehash loop."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (10_000, 256), dtype=np.uint8).astype(bool)
    for k in range(50):  # 50 planted near-duplicates: 1..4 flipped bits
        bits[9_000 + k] = bits[k]
        bits[9_000 + k, rng.choice(256, 1 + k % 4, replace=False)] ^= True
    bits[9_999] = bits[100]  # and one exact copy
    infos = [HashInfo(np.packbits(b).tobytes(), 10, 10) for b in bits]
    names = [f"{i:05d}.jpg" for i in range(len(infos))]
    groups = group_duplicates(names, infos, max_distance=4)
    assert sorted((g[0].path, g[1].path) for g in groups) == sorted(
        [(f"{k:05d}.jpg", f"{9_000 + k:05d}.jpg") for k in range(50)] + [("00100.jpg", "09999.jpg")]
    )
    assert [(g[0].path, g[1].path) for g in group_duplicates(names, infos)] == [("00100.jpg", "09999.jpg")]


def test_chains_join_one_group_and_popcount_fallback():
    base = np.zeros(256, dtype=bool)
    base[-10:] = True  # an all-zero hash is a flat image's, matched by colour
    a, b, c = base.copy(), base.copy(), base.copy()
    b[:3] = True
    c[:6] = True  # a~b (3 bits), b~c (3 bits), a-c 6 bits
    infos = [HashInfo(np.packbits(x).tobytes(), 10, 10) for x in (a, b, c)]
    groups = group_duplicates(["a", "b", "c"], infos, max_distance=4)
    assert [(m.path, m.distance) for m in groups[0]] == [("a", 0), ("b", 3), ("c", 6)]
    x = np.random.default_rng(1).integers(0, 2**63, (7, 5), dtype=np.uint64)
    assert np.array_equal(popcount_lut(x), popcount(x))


def test_links_and_system_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """__MACOSX is not a class; one file reached through two folder links is never quarantined."""
    root = tmp_path / "d"
    pic = make_image(5, size=(200, 150))
    _put(root / "a" / "one.jpg", make_image(6, size=(200, 150)))
    _put(root / "__MACOSX" / "a" / "one.jpg", pic)
    shared = _put(tmp_path / "shared" / "pic.jpg", pic).parent
    try:
        (root / "a" / "via_link").symlink_to(shared, target_is_directory=True)
        (root / "b").symlink_to(shared, target_is_directory=True)
    except OSError:
        pytest.skip("this file system or user cannot make symbolic links")
    result = find_duplicates(root)
    assert [[m.path for m in g] for g in result.groups] == [["a/via_link/pic.jpg", "b/pic.jpg"]]
    assert run_cli(["dedup", str(root), "--apply"]) == 1
    assert "it is a/via_link/pic.jpg itself, reached through a link" in capsys.readouterr().err
    assert (shared / "pic.jpg").read_bytes() == pic
    (root / "ghost").symlink_to(tmp_path / "unmounted" / "ghost")  # was left out without a word
    assert run_cli(["dedup", str(root)]) == 0
    assert "  not hashed: ghost: broken link to " in capsys.readouterr().out


def test_reports_can_go_elsewhere_for_a_read_only_data_folder(data: Path, tmp_path: Path):
    before = _digests(data)
    assert run_cli(["dedup", str(data), "--report-dir", str(tmp_path / "reports")]) == 0
    assert (tmp_path / "reports" / "dedup_report.csv").is_file() and (
        tmp_path / "reports" / "dedup_report.html"
    ).is_file()
    assert not (data / "dedup_report.csv").exists() and _digests(data) == before


def test_apply_moves_nothing_outside_the_data_folder_and_breaks_no_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A copy reached through a folder link to photos elsewhere stays there; so does a file that a listed link
    leads to (moving it would leave the link dangling)."""
    root = tmp_path / "d"
    pic, other = make_image(7, size=(200, 150)), make_image(8, size=(200, 150))
    _put(root / "daisy" / "a.jpg", pic)
    elsewhere = _put(tmp_path / "elsewhere" / "shared_photos" / "copy.jpg", pic).parent
    _put(root / "rose" / "a_kept.jpg", other)
    _put(root / "rose" / "b.jpg", other)
    try:
        (root / "daisy" / "shared").symlink_to(elsewhere, target_is_directory=True)
        (root / "rose" / "z_link.jpg").symlink_to("b.jpg")
    except OSError:
        pytest.skip("this file system or user cannot make symbolic links")
    assert run_cli(["dedup", str(root), "--apply"]) == 1
    err = capsys.readouterr().err
    assert "daisy/shared/copy.jpg: not moved, it leads outside the data folder through a link" in err
    assert "rose/b.jpg: not moved, it is the same file as rose/z_link.jpg" in err
    assert "rose/z_link.jpg: not moved, it is the same file as rose/b.jpg" in err
    assert (elsewhere / "copy.jpg").read_bytes() == pic and (root / "rose" / "z_link.jpg").read_bytes() == other
    assert not journal_path(root).exists()


def test_a_quarantine_folder_that_is_a_link_is_refused(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A `.imgclf-quarantine` planted as a link (in a downloaded data set) led the moves and the journal
    wherever it pointed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        (data / QUARANTINE_DIR).symlink_to(elsewhere, target_is_directory=True)
    except OSError:
        pytest.skip("this file system or user cannot make symbolic links")
    from imgclf.cli import main

    def images() -> list[Path]:
        return sorted(p.relative_to(data) for p in data.rglob("*") if not p.name.startswith("dedup_report"))

    before = images()
    for command in (["dedup", str(data), "--apply"], ["dedup", str(data), "--undo"]):
        assert main(command) == 2
        assert f"{data / QUARANTINE_DIR} is a symbolic link: imgclf neither moves images" in capsys.readouterr().err
    assert images() == before and not any(elsewhere.iterdir())


def test_undo_moves_nothing_a_planted_journal_names_outside_the_data_folder(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A journal brought with a data set (or edited) moved `../victim/thesis.docx` and absolute paths into the
    class folders, and a quarantined file out to any path: records are only those dedup writes."""
    victim = _put(tmp_path / "victim" / "thesis.docx", b"my thesis")
    planted = _put(data / QUARANTINE_DIR / "a" / "p.jpg", make_image(5))
    records = [
        {"op": "move", "path": "a/thesis.docx", "quarantined": "../victim/thesis.docx"},
        {"op": "move", "path": "a/notes.docx", "quarantined": str(victim)},
        {"op": "move", "path": str(tmp_path / "out.jpg"), "quarantined": f"{QUARANTINE_DIR}/a/p.jpg"},
        {"op": "move", "path": "../out.jpg", "quarantined": f"{QUARANTINE_DIR}/../out.jpg"},
        {"op": "move", "path": "a/p.jpg", "quarantined": f"{QUARANTINE_DIR}/a/p.jpg", "sha256": "x"},  # a fair one
    ]
    journal_path(data).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_cli(["dedup", str(data), "--undo"]) == 1
    err = capsys.readouterr().err
    assert err.count("record skipped, nothing moved") == 4 and "is not a path inside the data folder" in err
    assert victim.read_bytes() == b"my thesis" and not (tmp_path / "out.jpg").exists()
    assert not (data / "a" / "thesis.docx").exists() and not (data / "a" / "notes.docx").exists()
    assert (data / "a" / "p.jpg").read_bytes() == make_image(5) and not planted.exists()


def test_a_class_left_empty_by_apply_is_said_and_names_print_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """--apply moved the only image of `wasps/` (a copy of an ant) without a word; a file name with a line
    break split the cross-class warning and the problem lines."""
    root = tmp_path / "data"
    pic = make_image(1, size=(160, 120))
    (root / "ants").mkdir(parents=True)
    Image.open(io.BytesIO(pic)).resize((320, 240)).save(root / "ants" / "big.png")
    _put(root / "ants" / "other.jpg", make_image(2))
    _put(root / "wasps" / "odd\nname.jpg", pic)
    assert run_cli(["dedup", str(root), "--max-distance", "4"]) == 0
    assert "  ants/big.png (kept): wasps/odd\\nname.jpg\n" in capsys.readouterr().err
    assert run_cli(["dedup", str(root), "--max-distance", "4", "--apply"]) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: {root / 'wasps'} holds no image now (each was a copy of an image kept in another folder): train leaves the class out"
        in err
    )
    assert "--undo brings its images back" in err and "ants" not in err.split("holds no image")[0].split("\n")[-1]
    _put(root / "wasps" / "odd\nname.jpg", b"back from a sync")  # the undo refuses to overwrite it
    assert run_cli(["dedup", str(root), "--undo"]) == 1
    assert "wasps/odd\\nname.jpg exists: not overwritten" in capsys.readouterr().err


def test_an_empty_folder_or_a_run_folder_is_refused(tmp_path: Path):
    """`dedup empty/` and `dedup runs/demo` said "0 images ... report: ..." (exit 0) and wrote reports into them."""
    from imgclf.data.dataset import DatasetError

    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images in the class folders of .*empty"):
        run_cli(["dedup", str(tmp_path / "empty")])
    _put(tmp_path / "run" / "model" / "bundle.json", b'{"format": "imgclf-bundle/1"}')
    with pytest.raises(DatasetError, match=r"run.? is a run folder \(what train writes\), not a data folder"):
        run_cli(["dedup", str(tmp_path / "run")])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["bundle.json"]
    from imgclf.data.dataset import check_data_folder

    cars = tmp_path / "cars"  # a class named model, with a file of that name in it: a data folder
    _put(cars / "model" / "bundle.json", b'{"note": "export metadata"}')
    assert check_data_folder(cars) == cars


def test_files_that_cannot_be_hashed_are_named_as_io_names_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty file, one without read permission; a damaged EXIF block is no reason to skip an image."""
    import builtins

    root = tmp_path / "d"
    _put(root / "a" / "empty.jpg", b"")
    _put(root / "a" / "locked.jpg", make_image(9, size=(200, 150)))
    Image.new("RGB", (40, 30), "red").save(tmp_path / "good.jpg", dpi=(72, 72))
    good = (tmp_path / "good.jpg").read_bytes()
    payload = b"Exif\x00\x00" + b"\x00" * 40  # an APP1 block that is no TIFF structure
    _put(
        root / "a" / "bad_exif.jpg", good[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + good[2:]
    )
    real_open = builtins.open

    def fake_open(file: object, *args: object, **kwargs: object) -> object:
        if isinstance(file, str | Path) and Path(file).name == "locked.jpg":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    result = find_duplicates(root)
    assert result.skipped == [
        ("a/empty.jpg", "empty file (0 bytes): re-download or remove it"),
        ("a/locked.jpg", "unreadable: Permission denied"),
    ]
    assert result.n_images == 1


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "d"
    _put(root / "a" / "one.jpg", make_image(9, size=(200, 150)))
    _put(root / "a" / "locked" / "two.jpg", make_image(10, size=(200, 150)))
    refuse_listing(monkeypatch, "locked")
    result = find_duplicates(root)
    assert result.n_images == 1 and result.skipped == [
        ("a/locked", "folder unreadable (Permission denied): its images are not used; check its permissions")
    ]


def test_max_image_pixels_flag(data: Path, capsys: pytest.CaptureFixture[str]):
    """The message for an oversized image says to raise --max-image-pixels: dedup takes it."""
    assert run_cli(["dedup", str(data), "--max-image-pixels", "20000"]) == 0
    out = capsys.readouterr().out
    assert "not hashed: b/zz_large.png: oversized image (320x240): downscale it or raise --max-image-pixels" in out


def test_flat_images_are_duplicates_only_of_flat_ones_of_their_colour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """One-colour images (and horizontal stripes) all have an all-zero dhash; their mean colours and vertical
    hashes tell them apart, whatever their size."""
    root = tmp_path / "d"
    for rel, size, colour in [
        ("a/black.png", (800, 600), "black"),
        ("a/white.png", (40, 30), "white"),
        ("b/red.png", (40, 30), "red"),
        ("b/black_small.jpg", (80, 60), "black"),
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(root / rel)
    _put(root / "b" / "photo.jpg", make_image(11, size=(200, 150)))
    grey, stripes = Image.new("L", (64, 64), 128), Image.new("L", (64, 64), 0)
    stripes.paste(255, (0, 0, 64, 32))  # white over black: no brightness rise from left to right
    grey.save(root / "a" / "grey.png")
    stripes.save(root / "b" / "stripes.png")  # and its mean is the grey's, within the colour tolerance
    for max_distance in (0, 8):
        result = find_duplicates(root, max_distance=max_distance)
        assert [[m.path for m in g] for g in result.groups] == [["a/black.png", "b/black_small.jpg"]]
    black, white, red, small = (root / r for r in ("a/black.png", "a/white.png", "b/red.png", "b/black_small.jpg"))
    assert find_leaks([black, white], [red, small]) == [(str(black), str(small), 0)]
    assert find_label_conflicts([black, white, red], ["a", "a", "b"]) == []
    first, _ = hash_images([black, red])
    assert first[black].colour == b"\0\0\0" and first[red].colour == b"\xff\0\0"
    monkeypatch.setattr(dedup, "compute_hash", None)  # the colours come back from the cache
    assert hash_images([black, red])[0] == first
    assert (
        first[black].vertical == bytes(32)
        and hash_images([root / "b/photo.jpg"])[0][root / "b/photo.jpg"].vertical == b""
    )
    old = tmp_path / "old.sqlite"  # caches written before colours and vertical hashes were stored are not read
    with sqlite3.connect(old) as db:
        db.execute("CREATE TABLE dhash (key TEXT PRIMARY KEY, bits BLOB, w INT, h INT)")
        db.execute("INSERT INTO dhash VALUES (?, ?, 800, 600)", (HashCache.key(black, 16), first[black].bits))
        db.execute("CREATE TABLE dhash_v2 (key TEXT PRIMARY KEY, bits BLOB, w INT, h INT, colour BLOB)")
        db.execute(
            "INSERT INTO dhash_v2 VALUES (?, ?, 800, 600, ?)", (HashCache.key(black, 16), first[black].bits, b"\0\0\0")
        )
    assert HashCache(old).get([HashCache.key(black, 16)]) == {}


def test_ctrl_c_during_apply_says_how_to_go_on(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from imgclf.cli import main

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("imgclf.datatools.journal.move_no_overwrite", interrupted)
    assert main(["dedup", str(data), "--max-distance", "4", "--apply"]) == 130
    err = capsys.readouterr().err
    assert "the same command again moves the rest" in err and f"imgclf dedup {data} --undo" in err


def test_one_name_reached_by_two_paths_is_not_a_move_to_finish(tmp_path: Path):
    """Finishing a move unlinks the source: never where both paths are one directory entry."""
    from imgclf.datatools.journal import move_no_overwrite, same_file

    real = _put(tmp_path / "a" / "x.jpg", b"only copy")
    (tmp_path / "b").symlink_to(tmp_path / "a", target_is_directory=True)
    assert not same_file(real, tmp_path / "b" / "x.jpg")
    with pytest.raises(FileExistsError):
        move_no_overwrite(real, tmp_path / "b" / "x.jpg")
    assert real.read_bytes() == b"only copy"


def test_report_sizes_are_upright_for_every_format(tmp_path: Path):
    """The report's size of an image turned by its EXIF orientation: a TIFF got its sides swapped twice (Pillow
    turns a TIFF as it opens it)."""
    stored = Image.new("RGB", (80, 120), (200, 30, 30))  # kept sideways: shown 120 wide, 80 high
    exif = Image.Exif()
    exif[0x0112] = 6
    for ext in ("jpg", "png", "tif", "webp"):
        stored.save(tmp_path / f"o6.{ext}", exif=exif)
        info = dedup.compute_hash(tmp_path / f"o6.{ext}")
        assert (info.width, info.height) == (120, 80), ext


def test_a_report_folder_in_the_way_is_refused_before_the_hashing(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """`--report-dir FILE` failed after every image was hashed, with "[Errno 17] File exists" and no flag named;
    a report folder made for a dedup that then failed stayed behind, empty."""
    from imgclf.cli import main

    (tmp_path / "a_file").write_text("")
    hashed: list[Path] = []
    with monkeypatch.context() as m:
        m.setattr(dedup, "hash_images", lambda paths, *a, **k: hashed.extend(paths) or ({}, {}))
        for report_dir in ("a_file", "a_file/reports"):
            assert main(["dedup", str(data), "--report-dir", str(tmp_path / report_dir)]) == 2
            said = f"cannot make the report folder {tmp_path / report_dir}: a file is in the way; give another"
            assert f"{said} --report-dir" in capsys.readouterr().err
    assert hashed == [] and (tmp_path / "a_file").read_text() == ""
    assert main(["dedup", str(tmp_path / "no_data"), "--report-dir", str(tmp_path / "new" / "reports")]) == 2
    assert "data folder not found" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_hash_size_past_64_is_refused(data: Path, capsys: pytest.CaptureFixture[str]):
    """--hash-size 100000 ran out of memory, 99999999999999999999999 overflowed: tracebacks, exit status 1."""
    from imgclf.cli import main

    for size in ("100000", "99999999999999999999999"):
        assert main(["dedup", str(data), "--hash-size", size]) == 2
        said = f"datatools.hash_size = {size} (--hash-size): Input should be less than or equal to 64"
        assert said in capsys.readouterr().err
    assert main(["dedup", str(data), "--hash-size", "64", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("5 images, 1 duplicate groups")  # the copies of one size


def test_a_data_folder_whose_path_is_not_utf8_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Its hash cache failed with "'utf-8' codec can't encode character '\\udcff' ... surrogates not allowed",
    naming no path (names that are not UTF-8 inside the class folders are skipped and named instead)."""
    from imgclf.cli import main

    root = tmp_path / os.fsdecode(b"d\xff")
    try:
        _put(root / "a" / "one.jpg", make_image(4, size=(200, 150)))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    with pytest.raises(SystemExit):
        main(["dedup", str(root)])
    assert f"argument data_dir: {tmp_path}/d\\xff is not valid UTF-8 text" in capsys.readouterr().err
