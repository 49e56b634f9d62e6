"""End to end on generated data: train -> metrics, report, bundle -> evaluate -> predict (API and CLI)."""

import csv
import hashlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.bundle import Bundle
from imgclf.cli import main
from imgclf.config import Config
from imgclf.data.dataset import DatasetError
from imgclf.data.io import NOT_A_PLAIN_FILE
from imgclf.features import FeatureExtractor
from imgclf.pipeline import evaluate, predict, train

FAST = {"resolution": 64, "progress": False, "svm_c_grid": [0.1, 1.0, 10.0], "cv_folds": 3}


def _digests(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from helpers import make_folder

    tmp = tmp_path_factory.mktemp("e2e")
    data = make_folder(tmp / "data", n=12)
    bad = data / "circles"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "readme.txt").write_text("notes")
    good = (bad / "circles_00.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    before = _digests(data)
    result = train(Config().updated(data_root=data, out=tmp / "run", **FAST))
    return data, result, before


def test_run_folder_contents(run):
    data, result, before = run
    out = result.run_dir
    for name in (
        "metrics.json",
        "predictions.csv",
        "split.csv",
        "config.json",
        "evaluation.png",
        "report.html",
        "report.md",
        "model/bundle.json",
        "model/head.npz",
    ):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["circles", "squares", "stripes"]
    for key in (
        "overall_accuracy",
        "class_averaged_accuracy",
        "per_class_accuracy",
        "auc",
        "confusion_matrix",
        "n_train",
        "n_test",
        "skipped",
    ):
        assert key in m
    assert (
        0 <= m["overall_accuracy"] <= 1 and {"micro", "macro"} <= set(m["auc"]) and "circles" in m["auc"]["per_class"]
    )
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"zero.jpg", "readme.txt", "truncated.jpg"}
    assert reasons["readme.txt"] == "not an image (nor named as one): not used"
    assert m["n_train"] + m["n_test"] == 36  # every good image used, the truncated one skipped
    with open(out / "split.csv") as f:  # it passes the scan: split.csv listed it as used for training
        used = {r["path"]: r["used"] for r in csv.DictReader(f)}
    assert used.pop("circles/truncated.jpg") == "no" and set(used.values()) == {"yes"} and len(used) == 36
    assert _digests(data) == before  # nothing deleted or modified
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m["n_test"] and {"score_circles", "true_label", "predicted_label"} <= set(rows[0])
    assert "data:image/png;base64," in (out / "report.html").read_text()
    model = f"{m['classifier']} on {m['backbone']}, {m['resolution']} px input"
    assert model in (out / "report.html").read_text() and model in (out / "report.md").read_text()
    changed = (out / "report.html").read_text().split("Differing from this imgclf's defaults")[1].split("All ")[0]
    assert (
        "<td>resolution</td><td>64</td><td>None</td>" in changed and "<td>cv_folds</td><td>3</td><td>5</td>" in changed
    )
    assert "<td>lr</td>" not in changed  # left at its default
    assert "<td>progress</td>" not in changed  # off here, but how a command shows its work is no result parameter
    md = (out / "report.md").read_text().split("## Parameters")[1]
    assert "| resolution | 64 | None |" in md and "| cv_folds | 3 | 5 |" in md and "| lr |" not in md
    assert m["overall_accuracy"] > 0.6  # three visibly different shapes


def test_bundle_reload_and_evaluate_reproduce(run):
    _, result, _ = run
    bundle = Bundle.load(result.run_dir)
    assert bundle.classes == result.bundle.classes and bundle.classifier == "svm"
    # a notebook's configuration changes what it gives: the data folder and the run's settings stay (the data
    # folder was looked for in the working folder, the report listed the defaults as the run's settings)
    again = evaluate(result.run_dir, cfg=Config().updated(batch_size=4, cv_folds=5))
    assert again.metrics["overall_accuracy"] == pytest.approx(result.metrics["overall_accuracy"])
    md = (result.run_dir / "report.md").read_text().split("## Parameters")[1]
    assert "| resolution | 64 | None |" in md and "| batch_size | 4 |" in md and "| cv_folds |" not in md
    kept = json.loads((result.run_dir / "metrics.json").read_text())  # training's timings and C (the review app's)
    timings = kept["timings_s"]
    assert timings == {**result.metrics["timings_s"], "evaluate_s": pytest.approx(timings["evaluate_s"])}
    assert kept["svm_c"] in FAST["svm_c_grid"]
    on_train = evaluate(result.run_dir, on_train=True)
    assert (result.run_dir / "train_metrics.json").is_file() and on_train.metrics["n_test"] == result.metrics["n_train"]


def test_model_id_changes_with_any_part_of_the_head(run):
    import dataclasses

    _, result, _ = run
    bundle, head = result.bundle, result.bundle.head
    other_bias = dataclasses.replace(bundle, head=dataclasses.replace(head, bias=head.bias + 1))
    unnormalised = dataclasses.replace(bundle, head=dataclasses.replace(head, l2_normalize=not head.l2_normalize))
    assert len({bundle.model_id, other_bias.model_id, unnormalised.model_id}) == 3
    assert Bundle.load(result.run_dir).model_id == bundle.model_id


def test_a_bundle_with_its_own_weights_prepares_images_as_recorded(run):
    """A hub backbone's weights come with their own preprocessing (torchvision's resnet50: resize 232,
    bilinear; its mean and std): rebuilt untrained to load them, the recorded one must be kept."""
    import dataclasses

    _, result, _ = run
    spec = dict(result.bundle.backbone_spec, mean=[0.4, 0.4, 0.4], std=[0.2, 0.2, 0.2])
    spec["preprocess"] = dict(spec["preprocess"], crop_pct=0.95, interpolation="bilinear")
    state = result.bundle.build_backbone().model.state_dict()
    bundle = dataclasses.replace(result.bundle, backbone_spec=spec, backbone_state=state)
    bb = bundle.build_backbone()
    assert bb.preprocess == bundle.preprocess and (bb.mean, bb.std) == ((0.4,) * 3, (0.2,) * 3)


def test_atomic_folders_are_readable_and_leftovers_of_a_crash_do_no_harm(tmp_path, monkeypatch):
    """A model folder gets the usual permissions (a service account must read it); a leftover of a crash
    does not block the next save; a save that fails leaves the earlier folder in place; a memo entry cut
    short at any length (or of the earlier layout, which had no digest) is computed again."""
    import stat

    from imgclf.utils import Memo, atomic_dir

    umask = os.umask(0)
    os.umask(umask)
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    (tmp_path / f".model.old-{os.getpid()}").mkdir()  # as a crash in an earlier save left it
    (tmp_path / f".model.old-{os.getpid()}" / "x").write_text("left over")
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
    assert (target / "a").read_text() == "2"
    real_replace = os.replace

    def fails_into_place(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fails_into_place)
    with pytest.raises(OSError, match="No space"), atomic_dir(target) as tmp:
        (tmp / "a").write_text("3")
    monkeypatch.undo()
    assert (target / "a").read_text() == "2"
    memo = Memo(tmp_path / "memo", "figures")
    memo.put("k", b"png")
    entry = (tmp_path / "memo" / "figures" / "k").read_bytes()
    for cut in [entry[:n] for n in range(len(entry))] + [b"png"]:
        (tmp_path / "memo" / "figures" / "k").write_bytes(cut)
        assert memo.get("k") is None
        assert memo.compute("k", lambda: b"png") == b"png" and memo.get("k") == b"png"


def test_memo_keys_are_not_those_of_the_earlier_entry_format():
    """An imgclf of the earlier format (entries without their digest) computed the same key for the same inputs
    and read the new entries as its own: "'utf-8' codec can't decode byte 0x85" at every evaluate."""
    import hashlib

    from imgclf.utils import Memo

    earlier = hashlib.sha256(json.dumps({"a": 1}, sort_keys=True).encode() + b"\0").hexdigest()[:32]
    assert Memo.key({"a": 1}) != earlier and len(Memo.key({"a": 1})) == 32


def test_files_are_written_where_os_has_no_fchmod(tmp_path, monkeypatch):
    """Windows has no os.fchmod before Python 3.13: every atomic write (the first marker of a train) failed."""
    from imgclf.utils import atomic_write_text

    monkeypatch.delattr(os, "fchmod")
    atomic_write_text(tmp_path / "a.txt", "written")
    assert (tmp_path / "a.txt").read_text() == "written"


def test_output_into_a_file_is_utf8_and_a_failed_output_loses_no_model(tmp_path, monkeypatch):
    """Windows writes output into a file or pipe in cp1252, which has no letter of 蜜蜂: `imgclf train ... > log`
    stopped at the summary, before the model was saved. Output and error are UTF-8 now (one encoding in
    `> log 2>&1`); where an encoding is kept ($PYTHONIOENCODING, a terminal's) a missing letter is an escape."""
    from helpers import make_folder

    from imgclf.pipeline import INCOMPLETE

    data = make_folder(tmp_path / "data", classes=("café", "蜜蜂"), n=6)
    argv = ["train", str(data), "--resolution", "64", "--no-tracking", "--no-progress"]
    written = {}
    for out in ("utf8", "cp1252"):
        with monkeypatch.context() as m:
            if out == "cp1252":
                m.setenv("PYTHONIOENCODING", "cp1252")
            else:
                m.delenv("PYTHONIOENCODING", raising=False)
            streams = {name: io.BytesIO() for name in ("stdout", "stderr")}
            for name, buffer in streams.items():
                m.setattr(sys, name, io.TextIOWrapper(buffer, encoding="cp1252"))
            assert main([*argv, "--out", str(tmp_path / out)]) == 0
            sys.stdout.flush()
            written[out] = {"stdout": streams["stdout"].getvalue(), "stderr encoding": sys.stderr.encoding}
        assert Bundle.load(tmp_path / out).classes == ["café", "蜜蜂"]
        assert not (tmp_path / out / INCOMPLETE).exists()
    assert "Class 蜜蜂" in written["utf8"]["stdout"].decode("utf-8") and written["utf8"]["stderr encoding"] == "utf-8"
    assert "Class \\u871c\\u8702" in written["cp1252"]["stdout"].decode("cp1252")


def test_a_damaged_bundle_is_named_not_a_traceback(run, tmp_path, capsys):
    import shutil

    _, result, _ = run
    for name, damage in (
        ("head.npz", lambda f: f.write_bytes(f.read_bytes()[:100])),  # a copy cut short
        ("bundle.json", lambda f: f.write_text('{"format": "imgclf-bundle/1"}')),
        ("bundle.json", lambda f: f.write_text(f.read_text().replace('"preprocess"', '"preprocessing"', 1))),
        ("head.npz", lambda f: f.unlink()),
    ):
        model = shutil.copytree(result.run_dir / "model", tmp_path / "model", dirs_exist_ok=True)
        damage(model / name)
        assert main(["predict", str(model), str(tmp_path)]) == 2
        assert f"{model / name} is " in capsys.readouterr().err
    # another run's head over this bundle (a copy that stopped partway): its classes would be scored wrongly
    model = shutil.copytree(result.run_dir / "model", tmp_path / "model", dirs_exist_ok=True)
    np.savez(model / "head.npz", weight=result.bundle.head.weight[::-1], bias=result.bundle.head.bias[::-1])
    assert main(["predict", str(model), str(tmp_path)]) == 2
    assert "checksum differs from the one recorded in bundle.json" in capsys.readouterr().err
    # a damaged split.csv: "imgclf: error: 'label'" named neither the file nor what to do
    run_copy = shutil.copytree(result.run_dir, tmp_path / "run")
    for text, why in (
        ("path,split\nx.jpg,test\n", "no label column"),
        ("path,label,split\nx.jpg,zebra,test\n", "line 2: class 'zebra'"),
    ):
        (run_copy / "split.csv").write_text(text)
        assert main(["evaluate", str(run_copy), "--no-tracking"]) == 2
        assert f"{run_copy / 'split.csv'} is damaged ({why}" in capsys.readouterr().err


def test_a_failed_train_leaves_no_model_to_use_and_a_foreign_folder_is_refused(
    run, tmp_path, capsys, monkeypatch, caplog
):
    """A train that fails or is interrupted in an earlier run's folder left it half old, half new, which
    evaluate scored without a word; a folder of other files was written over; a mistyped backbone or weights
    file is found before the folder is touched."""
    import shutil

    import imgclf.pipeline

    data, result, _ = run
    folder = shutil.copytree(result.run_dir, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    args = ["--out", str(folder), "--no-tracking", "--no-progress", "--resolution", "64", "--cv-folds", "3"]
    for mistake in (["--weights", str(tmp_path / "none.pt")], ["--backbone", "efficientnet_lite9"]):
        assert main(["train", str(data), *args, "--split-seed", "5", *mistake]) == 2
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert main(["evaluate", str(folder), "--no-tracking", "--no-progress"]) == 0
    capsys.readouterr()

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # Ctrl-C while the head is fitted: the folder holds half of each run
        m.setattr(imgclf.pipeline, "fit_head", interrupted)
        assert main(["train", str(data), *args, "--split-seed", "5"]) == 130
    capsys.readouterr()
    for command in (["evaluate", str(folder), "--no-tracking"], ["predict", str(folder), str(data / "squares")]):
        assert main(command) == 2
        assert "did not finish (it failed or was interrupted): its files mix two runs" in capsys.readouterr().err
    assert main(["train", str(data), *args, "--split-seed", "5"]) == 0  # a finished train: usable again
    caplog.set_level("INFO", logger="imgclf")
    caplog.clear()
    assert main(["evaluate", str(folder), "--no-tracking", "--no-progress"]) == 0
    assert "not recorded" not in caplog.text  # asked for: nothing to say
    assert main(["evaluate", str(folder), "--no-progress"]) == 0  # the run's --no-tracking: it was silent
    assert "not recorded in the run history: the run was trained with --no-tracking" in caplog.text
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.json").write_text("{my settings}")
    (mine / "predictions.csv").write_text("mine")
    assert main(["train", str(data), "--out", str(mine), "--no-tracking"]) == 2
    assert "holds config.json, predictions.csv but no imgclf run" in capsys.readouterr().err
    assert (mine / "config.json").read_text() == "{my settings}" and sorted(os.listdir(mine)) == [
        "config.json",
        "predictions.csv",
    ]
    logged = tmp_path / "logged"  # `imgclf train ... > runs/x/train.log`: a file train does not write
    logged.mkdir()
    (logged / "train.log").write_text("")
    assert main(["train", str(data), *args[2:], "--out", str(logged)]) == 0 and (logged / "model").is_dir()


def test_machine_settings_and_sizes_are_checked_before_the_run_folder_is_touched(run, tmp_path, capsys):
    """A wrong --device, --seed, --cache-dir or --resolution failed only once train had marked the earlier run in
    --out unfinished: predict refused that model ("did not finish") until a train succeeded."""
    import shutil

    data, result, _ = run
    folder = shutil.copytree(result.run_dir, tmp_path / "run")
    before = _digests(folder)
    (tmp_path / "a_file").write_text("")
    train_args = ["train", str(data), "--out", str(folder), "--no-tracking", "--no-progress", "--resolution", "64"]
    for mistake, said in (
        (["--device", "gpu"], "features.device = 'gpu' (--device): expected auto, cpu, cuda, cuda:N"),
        (["--device", "cuda:99"], "device 'cuda:99' asked for, but"),  # no GPU, or fewer than 100
        (["--seed", str(2**32)], "output.seed = 4294967296 (--seed): Input should be less than or equal to"),
        (["--cache-dir", str(tmp_path / "a_file")], f"cache folder {tmp_path / 'a_file'} cannot be written"),
        (["--resolution", "20000"], "backbone.resolution = 20000 (--resolution): Input should be less than or"),
    ):
        assert main([*train_args, *mistake]) == 2
        assert said in capsys.readouterr().err
        assert _digests(folder) == before
    assert main(["predict", str(folder), str(data / "squares"), "--no-progress"]) == 0
    assert main([*train_args[:2], "--out", str(tmp_path / "new" / "run"), "--device", "cuda:99"]) == 2
    assert not (tmp_path / "new").exists()


def test_a_folder_where_a_file_is_meant_and_back_is_named(run, tmp_path, capsys):
    """--test-list and --weights said "not found" of a folder that is there; demo --data FILE "is not empty"."""
    data, _, _ = run
    args = ["train", str(data), "--out", str(tmp_path / "r"), "--no-tracking", "--no-progress"]
    for flag, said in (("--test-list", "test list"), ("--weights", "weights file")):
        assert main([*args, flag, str(data / "squares")]) == 2
        assert f"{said} {data / 'squares'} is a folder: give the" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("mine")
    assert main(["demo", "--data", str(tmp_path / "a_file"), "--out", str(tmp_path / "d")]) == 2
    assert f"--data {tmp_path / 'a_file'} is a file: give a folder" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "mine" and not (tmp_path / "r").exists()


def test_a_run_or_data_folder_whose_name_is_not_utf8_is_refused_first(run, tmp_path, capsys):
    """--out o\\xff failed writing config.json ("Error serializing to JSON", naming no path) and left a marked
    folder; a data folder d\\xff failed in the hash cache."""
    data, _, _ = run
    out = tmp_path / os.fsdecode(b"o\xff")
    try:
        out.mkdir()
        out.rmdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    assert main(["train", str(data), "--out", str(out), "--no-tracking", "--no-progress"]) == 2
    assert f"(--out): {tmp_path}/o\\xff is not valid UTF-8 text" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path / os.fsdecode(b"d\xff")), "--out", str(tmp_path / "r")])
    assert f"argument data_dir: {tmp_path}/d\\xff is not valid UTF-8 text" in capsys.readouterr().err


def test_a_run_that_does_not_fine_tune_drops_an_earlier_fine_tuning(run, tmp_path):
    """An svm train into a fine-tuned run's folder kept its curves, which were recorded with the new run, and
    its checkpoint and image cache (54 MB and ~200 KB an image); with --resume (a fine-tuning's flag, the
    --classifier forgotten) it is refused and keeps them."""
    import shutil

    data, result, _ = run
    folder = shutil.copytree(result.run_dir, tmp_path / "run")
    planted = ["finetune_log.csv", "finetune_curves.png", "finetune_ckpt.pt", "finetune_cache/0.npy"]
    # and what runs killed while they wrote left: a checkpoint's temporary file (as big as it), a model folder's
    planted += [".finetune_ckpt.pt.k3x_9qaz.tmp", ".metrics.json.a1b2c3d4.tmp", ".model.0a9b8c7d.tmp/head.npz"]
    planted += [".model.old-abcd1234/head.npz", "..imgclf-train-incomplete.qwertyui.tmp"]
    for name in planted:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(b"an earlier fine-tuning")
    users = [".finetune_ckpt.pt.bak", ".notes.tmp", ".metrics.json.mine.tmp"]  # not imgclf's: kept
    for name in users:
        (folder / name).write_text("mine")
    args = ["--out", str(folder), "--no-tracking", "--no-progress", "--resolution", "64", "--cv-folds", "3"]
    assert main(["train", str(data), *args, "--resume"]) == 2
    assert (folder / "finetune_ckpt.pt").read_bytes() == b"an earlier fine-tuning"
    assert main(["train", str(data), *args]) == 0
    assert not [name for name in planted if (folder / name.split("/")[0]).exists()]
    assert all((folder / name).read_text() == "mine" for name in users)


def test_a_run_folder_in_use_is_refused(run, tmp_path, capsys, monkeypatch):
    from imgclf.utils import run_folder_lock

    data, result, _ = run
    before = _digests(result.run_dir)
    with run_folder_lock(result.run_dir):  # as another train or evaluate would hold it
        assert main(["train", str(data), "--out", str(result.run_dir), "--no-tracking"]) == 2
        assert "is in use by another imgclf train or evaluate" in capsys.readouterr().err
        assert main(["evaluate", str(result.run_dir), "--no-tracking"]) == 2
    assert _digests(result.run_dir) == before  # neither wrote a file
    assert main(["evaluate", str(result.run_dir), "--no-tracking", "--no-progress"]) == 0  # released
    import imgclf.pipeline
    from imgclf.utils import RUN_LOCK, missing_from

    seen = missing_from(tmp_path / "race")  # a second train started with the first into a new --out: both saw it
    monkeypatch.setattr(imgclf.pipeline, "missing_from", lambda run_dir: seen)  # missing, the first made it
    with run_folder_lock(tmp_path / "race"):
        assert main(["train", str(data), "--out", str(tmp_path / "race"), "--no-tracking"]) == 2
        assert (tmp_path / "race" / RUN_LOCK).is_file()  # the refused one removed the first one's folder and lock
    monkeypatch.undo()
    (tmp_path / "first").mkdir()
    with run_folder_lock(tmp_path / "first"):  # the first train into a folder, its model not written yet
        assert main(["evaluate", str(tmp_path / "first"), "--no-tracking"]) == 2
        assert "a train into it is still running" in capsys.readouterr().err
    # the model/ bundle alone (predict and serve take it): no test split to score, and no lock file left in it
    bundle = result.run_dir / "model"
    monkeypatch.chdir(bundle)  # `evaluate .` inside it names the run folder too
    assert main(["evaluate", ".", "--no-tracking"]) == 2
    assert f"(give the run folder {result.run_dir.resolve()})" in capsys.readouterr().err
    assert main(["evaluate", str(bundle), "--no-tracking"]) == 2
    assert (
        f"evaluate needs the run folder that train wrote, not a model bundle alone (give the run folder {result.run_dir})"
        in capsys.readouterr().err
    )
    assert not (bundle / ".imgclf.lock").exists()


def _full_disk_for(monkeypatch: pytest.MonkeyPatch, full: Callable[[bytes], bool]) -> None:
    """Writes through ``os.fdopen`` (the atomic writes') of the contents ``full`` picks fail as on a full disk."""
    import errno

    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        write = f.write

        def failing(data):
            if full(bytes(data)):
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(data)

        f.write = failing
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_a_failed_evaluate_leaves_the_results_as_they_were(run, tmp_path, capsys, monkeypatch):
    """evaluate on a full disk replaced predictions.csv and metrics.json, then failed on evaluation.png: the
    report and figure kept the old numbers beside them. All of them are replaced together or none is."""
    import shutil

    _, result, _ = run
    folder = shutil.copytree(result.run_dir, tmp_path / "run")
    before = _digests(folder)
    with monkeypatch.context() as m:
        _full_disk_for(m, lambda data: data.startswith(b"\x89PNG"))  # room for all but the figure
        assert main(["evaluate", str(folder), "--flip-tta", "--no-tracking", "--no-progress"]) == 2
    assert _digests(folder) == before  # no file replaced, no temporary file left
    assert f"No space left on device: {folder / 'evaluation.png'} (free space there" in capsys.readouterr().err
    assert main(["evaluate", str(folder), "--flip-tta", "--no-tracking", "--no-progress"]) == 0
    assert json.loads((folder / "metrics.json").read_text())["timings_s"]["evaluate_s"] > 0


def test_memo_entries_cut_short_are_computed_again(run, tmp_path):
    """A crash can truncate memo entries (written without fsync): a figure's was embedded half in the
    report, a metrics one stopped every later train with the same scores (``Expecting value``)."""
    import base64
    import shutil

    from PIL import Image

    from imgclf.utils import default_cache_dir

    _, result, _ = run
    folder = shutil.copytree(result.run_dir, tmp_path / "run")
    for kind in ("metrics", "figures"):
        for entry in (default_cache_dir() / kind).iterdir():
            entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    again = evaluate(folder)
    assert again.metrics["confusion_matrix"] == result.metrics["confusion_matrix"]
    png = (folder / "evaluation.png").read_bytes()
    Image.open(io.BytesIO(png)).load()  # whole: a half one raises
    assert base64.b64encode(png).decode() in (folder / "report.html").read_text()


def test_a_run_folder_removed_while_train_writes_is_not_made_again(run, tmp_path, capsys, monkeypatch):
    """The run folder removed during a train was made again by the next write, holding results and a model
    without the split.csv and config.json they go with, then the train failed on a missing file."""
    import shutil

    import imgclf.pipeline

    data, _, _ = run
    out = tmp_path / "rm1"
    fit_head = imgclf.pipeline.fit_head

    def removed_meanwhile(*args: object) -> object:
        shutil.rmtree(out)
        return fit_head(*args)

    monkeypatch.setattr(imgclf.pipeline, "fit_head", removed_meanwhile)
    args = ["--out", str(out), "--no-tracking", "--no-progress", "--resolution", "64", "--cv-folds", "3"]
    assert main(["train", str(data), *args]) == 2
    assert f"the run folder {out} was removed while imgclf train wrote into it" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_in_a_folder_it_may_not_write_says_what_to_do(run, capsys, monkeypatch):
    """The advice named a way to write elsewhere that evaluate does not have."""
    import errno

    import imgclf.pipeline

    _, result, _ = run
    lock = result.run_dir / ".imgclf.lock"

    def read_only(run_dir: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(lock))

    monkeypatch.setattr(imgclf.pipeline, "run_folder_lock", read_only)
    assert main(["evaluate", str(result.run_dir), "--no-tracking"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"imgclf: error: Permission denied: {lock} (allow writing there, or copy the run folder to a disk you "
        "may write to and evaluate the copy)"
    )


def test_evaluate_after_the_data_folder_moved(run, tmp_path, capsys, caplog, monkeypatch):
    import shutil

    data, result, _ = run
    run_dir, moved = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(result.run_dir, run_dir)
    shutil.copytree(data, moved)
    (tmp_path / "a_file").write_text("")
    for given, what in (("gone", "is not there"), ("a_file", "is a file")):  # "give it with --data-root": given
        assert main(["evaluate", str(run_dir), "--data-root", str(tmp_path / given), "--no-tracking"]) == 2
        said = f"--data-root {tmp_path / given} {what}: give the data folder the run was trained on, where it is now"
        assert said in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(run_dir), "--data-root", str(tmp_path / "empty"), "--no-tracking"]) == 2
    assert "none of the" in capsys.readouterr().err
    rows = csv.DictReader(io.StringIO((run_dir / "split.csv").read_text()))
    first_test = next(r["path"] for r in rows if r["split"] == "test")
    (moved / first_test).unlink()
    assert main(["evaluate", str(run_dir), "--data-root", str(moved), "--no-tracking", "--no-progress"]) == 0
    assert "are no longer in" in caplog.text
    assert json.loads((run_dir / "metrics.json").read_text())["n_test"] == result.metrics["n_test"] - 1
    # once an evaluate has found the moved folder, later ones use it while the run's own is gone
    shutil.copytree(data, tmp_path / "own")
    fresh = train(Config().updated(data_root=tmp_path / "own", out=tmp_path / "fresh", tracking=False, **FAST))
    (tmp_path / "own").rename(tmp_path / "renamed")
    assert main(["evaluate", str(fresh.run_dir), "--no-tracking"]) == 2
    assert "is not there (moved or renamed?): give it with --data-root" in capsys.readouterr().err
    renamed = ["--data-root", str(tmp_path / "renamed")]
    assert main(["evaluate", str(fresh.run_dir), *renamed, "--no-tracking", "--no-progress"]) == 0
    with caplog.at_level(logging.INFO, logger="imgclf"):
        assert main(["evaluate", str(fresh.run_dir), "--on-train", "--no-tracking", "--no-progress"]) == 0
    assert f"using {tmp_path / 'renamed'}, where an earlier evaluate found it" in caplog.text
    train_metrics = json.loads((fresh.run_dir / "train_metrics.json").read_text())
    assert train_metrics["data_root"] == str(tmp_path / "renamed") and train_metrics["n_test"] > 0
    # a relative --data-root is recorded as the folder it named: another working folder's "renamed" is not it
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(fresh.run_dir), "--data-root", "renamed", "--no-tracking", "--no-progress"]) == 0
    assert json.loads((fresh.run_dir / "metrics.json").read_text())["data_root"] == str(tmp_path / "renamed")


def test_evaluate_names_test_images_changed_since_training(run, tmp_path, caplog):
    """Test images overwritten with training images' content raised a run to 100 % without a word: split.csv
    records what each test image held, and evaluate names the ones that changed (scored as they are now)."""
    import shutil

    data, result, _ = run
    run_dir, copy = tmp_path / "run", tmp_path / "data"
    shutil.copytree(result.run_dir, run_dir)
    shutil.copytree(data, copy)
    rows = list(csv.DictReader(io.StringIO((run_dir / "split.csv").read_text())))
    tests = [r for r in rows if r["split"] == "test"]
    assert all(len(r["sha256"]) == 64 for r in tests) and {r["sha256"] for r in rows if r["split"] == "train"} == {""}
    assert tests[0]["sha256"] == hashlib.sha256((data / tests[0]["path"]).read_bytes()).hexdigest()
    trained_on = next(r["path"] for r in rows if r["split"] == "train" and r["label"] == tests[0]["label"])
    original = (copy / tests[0]["path"]).read_bytes()
    shutil.copy(copy / trained_on, copy / tests[0]["path"])
    evaluate_cmd = ["evaluate", str(run_dir), "--data-root", str(copy), "--no-tracking", "--no-progress"]
    assert main(evaluate_cmd) == 0
    assert re.search(r"1 of the \d+ test images scored changed since training", caplog.text), caplog.text
    assert tests[0]["path"] in caplog.text
    notes = json.loads((run_dir / "metrics.json").read_text())["notes"]
    assert [n["path"] for n in notes if n["note"].startswith("changed since training")] == [
        str(copy / tests[0]["path"])
    ]
    (copy / tests[0]["path"]).write_bytes(original)  # put back: no word, no note left from before
    caplog.clear()
    assert main(evaluate_cmd) == 0
    assert "changed since training" not in caplog.text and "is not checked" not in caplog.text
    assert not [n for n in json.loads((run_dir / "metrics.json").read_text())["notes"] if "changed" in n["note"]]
    # a run of an earlier imgclf (split.csv without digests), an evaluation without the cache: said, not silent
    with caplog.at_level(logging.INFO, logger="imgclf"):
        assert main([*evaluate_cmd, "--no-use-cache"]) == 0
        assert "not checked: this evaluation reads them without the feature cache (--no-use-cache)" in caplog.text
        text = (run_dir / "split.csv").read_text()
        (run_dir / "split.csv").write_text(re.sub(r",[0-9a-f]{64}", ",", text))
        assert main(evaluate_cmd) == 0
    assert "not checked: split.csv records no content digests (a run of an earlier imgclf" in caplog.text


def test_predict_api_and_cli(run, tmp_path, capsys, monkeypatch):
    data, result, _ = run
    one = sorted((data / "circles").glob("circles_*.jpg"))[0]
    classes, (only,) = predict(result.run_dir, one)  # one path, not a list: not read letter by letter
    assert only.path == one and only.scores is not None and len(only.scores) == len(classes)
    with pytest.raises(DatasetError, match="no data folder given"):
        train(Config().updated(out=tmp_path / "r"))
    classes, preds = predict(result.run_dir, [data / "squares"])
    assert len(preds) == 12 and all(p.scores is not None for p in preds)
    named_twice = tmp_path / "twice.txt"
    named_twice.write_text(f"  # a comment, indented\n{data / 'squares' / 'squares_00.jpg'}\n")
    _, again = predict(result.run_dir, [data / "squares" / "squares_00.jpg", data / "squares", named_twice])
    # one prediction per file named, repeats too (results line up with the names); a folder adds the rest
    assert [p.path.name for p in again][:2] == ["squares_00.jpg", "squares_01.jpg"] and len(again) == 13
    repeat, first = again[-1], again[0]  # the same image in another batch: equal to batch arithmetic
    assert repeat.path.name == "squares_00.jpg" and np.allclose(repeat.scores, first.scores, atol=1e-4)
    from PIL import Image

    with pytest.raises(TypeError, match=r"give images as paths .* not JpegImageFile"):
        predict(result.run_dir, Image.open(data / "squares" / "squares_00.jpg"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"list of image paths .*latin1\.txt is not UTF-8 text"):
        predict(result.run_dir, latin1)
    bom = tmp_path / "bom.txt"  # as Notepad saves it: the first path was "not found"
    bom.write_bytes(b"\xef\xbb\xbf" + f"{data / 'squares' / 'squares_00.jpg'}\r\n".encode())
    assert [(p.path.name, p.error) for p in predict(result.run_dir, bom)[1]] == [("squares_00.jpg", None)]
    assert sum(classes[int(p.scores.argmax())] == "squares" for p in preds) >= 8
    listing = tmp_path / "list.txt"
    listing.write_text(f"{data / 'circles' / 'circles_01.jpg'}\n{data / 'circles' / 'zero.jpg'}\n")
    out_csv = tmp_path / "pred.csv"
    code = main(["predict", str(result.run_dir), str(listing), "--top-k", "2", "--csv", str(out_csv), "--no-progress"])
    assert code == 1  # one input could not be read, and says so
    rows = list(csv.DictReader(out_csv.open()))
    assert rows[0]["label_1"] in classes and rows[0]["label_2"] in classes and not rows[0]["error"]
    _, (first, _) = predict(result.run_dir, listing)  # best first: the top label is the predicted one
    order = np.argsort(-first.scores)
    assert [rows[0]["label_1"], rows[0]["label_2"]] == [classes[order[0]], classes[order[1]]]
    assert float(rows[0]["score_1"]) >= float(rows[0]["score_2"])
    out = capsys.readouterr().out
    shown = out.splitlines()[0].split("\t")  # the printed line too
    assert shown[1].split()[0] == classes[order[0]] and shown[2].split()[0] == classes[order[1]]
    assert "empty" in rows[1]["error"]
    assert "ERROR" in out
    assert main(["predict", str(result.run_dir), str(listing), "--top-k", "2", "--csv", "-", "--no-progress"]) == 1
    piped = capsys.readouterr()  # `--csv -`: the CSV alone on standard output, for a pipe (it wrote a file "-")
    assert piped.out == out_csv.read_text() and "1 of 2 image(s) could not be classified" in piped.err
    assert not Path("-").exists()
    main(["predict", str(result.run_dir), str(listing), "--top-k", "9", "--csv", str(out_csv), "--no-progress"])
    code = main(["predict", str(result.run_dir), str(listing), "--csv", str(tmp_path), "--no-progress"])
    assert code == 2 and f"{tmp_path} is a folder: give the name of a file to write" in capsys.readouterr().err
    assert out_csv.read_text().splitlines()[0] == "path,label_1,score_1,label_2,score_2,label_3,score_3,error"
    # --csv never writes over an image or an input (`--csv a.jpg b.jpg`, arguments swapped)
    pair = sorted((data / "circles").glob("circles_0[23].jpg"))
    before = [p.read_bytes() for p in pair]
    assert main(["predict", str(result.run_dir), "--csv", str(pair[0]), str(pair[1]), "--no-progress"]) == 2
    assert "named as an image, not written; name a .csv file" in capsys.readouterr().err
    assert main(["predict", str(result.run_dir), str(listing), "--csv", str(listing), "--no-progress"]) == 2
    assert "that is an input, not overwritten" in capsys.readouterr().err
    # nor over a file of a run: its split.csv or model/bundle.json replaced lost the run
    kept = {f: f.read_bytes() for f in (result.run_dir / "split.csv", result.run_dir / "model" / "bundle.json")}
    for f in kept:
        assert main(["predict", str(result.run_dir), str(listing), "--csv", str(f), "--no-progress"]) == 2
        assert f"--csv {f}: a file of the run in {f.parent}, not overwritten" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in kept} == kept
    mine = result.run_dir / "my_predictions.csv"  # the user's own file beside them: written, and again
    for _ in range(2):
        assert main(["predict", str(result.run_dir), str(pair[0]), "--csv", str(mine), "--no-progress"]) == 0
    mine.unlink()
    capsys.readouterr()
    assert [p.read_bytes() for p in pair] == before and "circles_01.jpg" in listing.read_text()
    # a --csv folder missing or not writable is refused before the images are scored (was: all scored, then
    # a raw errno and nothing printed); a file written while the folder goes away still prints the lines
    with monkeypatch.context() as m:
        m.setattr("imgclf.pipeline.predict", lambda *a, **k: pytest.fail("scored before the --csv check"))
        assert main(["predict", str(result.run_dir), str(listing), "--csv", str(listing / "p.csv")]) == 2
        assert f"--csv {listing / 'p.csv'}: {listing} is a file, not a folder" in capsys.readouterr().err
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        if not os.access(locked, os.W_OK):  # root writes anywhere
            assert main(["predict", str(result.run_dir), str(listing), "--csv", str(locked / "p.csv")]) == 2
            assert "Permission denied" in capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setattr("imgclf.pipeline.atomic_write_text", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
        assert main(["predict", str(result.run_dir), str(listing), "--csv", str(out_csv), "--no-progress"]) == 2
    lines, err = capsys.readouterr()
    assert len(lines.splitlines()) == 2 and "I/O error" in err
    assert main(["predict", str(result.run_dir), str(listing), "--csv", str(tmp_path / "new" / "p.csv")]) == 1
    assert len(list(csv.DictReader((tmp_path / "new" / "p.csv").open()))) == 2  # a missing folder is made
    capsys.readouterr()
    # a missing file named is reported on its line, the others scored (a missing one in a list was already)
    missing = tmp_path / "no_such.jpg"
    assert main(["predict", str(result.run_dir), str(missing), str(pair[0]), "--no-progress"]) == 1
    lines, err = capsys.readouterr()
    assert "1 of 2 image(s) could not be classified: see their ERROR lines" in err  # where stdout goes to a file
    lines = lines.splitlines()
    assert lines[0].startswith(f"{missing}\tERROR\t") and "\tERROR" not in lines[1]
    assert main(["predict", str(result.run_dir), str(missing), str(tmp_path / "also_none.jpg")]) == 2
    assert f"no such file or folder: {missing}, " in capsys.readouterr().err
    # `imgclf predict ... --csv f | head -1`: the reader gone, the printing stops; the CSV is written first
    import builtins

    from imgclf.cli import build_parser
    from imgclf.commands import _predict

    def gone(*args: object, **kwargs: object) -> None:
        raise BrokenPipeError

    out_csv.unlink()
    with monkeypatch.context() as m:
        m.setattr(builtins, "print", gone)
        with pytest.raises(BrokenPipeError):
            _predict(build_parser().parse_args(["predict", str(result.run_dir), str(listing), "--csv", str(out_csv)]))
    assert len(list(csv.DictReader(out_csv.open()))) == 2
    # a file name that is not UTF-8 (possible on Linux) is classified and shown with \x escapes
    odd = tmp_path / "odd"
    odd.mkdir()
    try:
        (odd / os.fsdecode(b"bad\xff.jpg")).write_bytes((data / "squares" / "squares_00.jpg").read_bytes())
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    assert main(["predict", str(result.run_dir), str(odd), "--csv", str(out_csv), "--no-progress"]) == 0
    assert "bad\\xff.jpg\t" in capsys.readouterr().out and "bad\\xff.jpg," in out_csv.read_text()


def test_a_backbone_from_a_weights_file_travels_in_the_bundle(run, tmp_path):
    """--weights without fine-tuning: predict, the server and the exporters use those weights, not pip's."""
    import torch

    from imgclf.backbones import create_backbone
    from imgclf.bundle import BundleError

    data, _, _ = run
    torch.manual_seed(0)
    torch.save(create_backbone("efficientnet_lite0", pretrained=False).model.state_dict(), tmp_path / "mine.pt")
    result = train(Config().updated(data_root=data, out=tmp_path / "w", weights=tmp_path / "mine.pt", **FAST))
    rows = {r["path"]: r for r in csv.DictReader((result.run_dir / "predictions.csv").open())}
    path, row = next(iter(rows.items()))
    classes, (pred,) = predict(result.run_dir, [data / path])
    assert pred.scores == pytest.approx([float(row[f"score_{c}"]) for c in classes], abs=1e-5)
    spec = json.loads((result.run_dir / "model" / "bundle.json").read_text())["backbone"]
    assert spec["weights_id"].startswith("file:") and (result.run_dir / "model" / "backbone.pt").is_file()
    bundle = Bundle.load(result.run_dir)
    bundle.backbone_state = None  # as bundles written before the weights travelled with them
    with pytest.raises(BundleError, match="weights from a file"):
        bundle.build_backbone()


def test_a_class_folder_renamed_during_the_run_stops_it(tmp_path, monkeypatch):
    """A class whose images are all gone since the scan (its folder renamed while features were extracted) is
    a message, not a model that never predicts it with an accuracy over the other classes."""
    from helpers import make_folder

    data = tmp_path / "data"
    make_folder(data, classes=("a", "b", "c"), n=6)
    extract = FeatureExtractor.extract

    def rename_first(self, paths, desc=""):
        if (data / "c").is_dir():
            (data / "c").rename(data / "c2")
        return extract(self, paths, desc=desc)

    monkeypatch.setattr(FeatureExtractor, "extract", rename_first)
    with pytest.raises(DatasetError, match=r"images of class 'c' are gone since .* \(e\.g\. .*c_0.\.jpg\): was its"):
        train(Config().updated(data_root=data, out=tmp_path / "r", tracking=False, **FAST))
    assert sorted(p.name for p in (data / "c2").iterdir()) == [f"c_{i:02d}.jpg" for i in range(6)]  # nothing lost


def test_predict_names_an_image_given_as_bytes(run):
    """An image file's bytes were taken for a list of ints: "not int"."""
    data, result, _ = run
    image = (data / "circles" / "circles_00.jpg").read_bytes()
    for given in (image, bytearray(image), memoryview(image)):
        with pytest.raises(TypeError, match=f"give images as paths .*, not {type(given).__name__}: save an image"):
            predict(result.run_dir, given)


def test_images_that_pass_the_scan_but_cannot_be_decoded(tmp_path, caplog):
    """A class whose every training image is cut short is never predicted (the run goes on and says so);
    a test split that no image of can be read is a message before the classifier is fitted."""
    from helpers import make_folder
    from PIL import Image

    data = tmp_path / "data"
    make_folder(data / "train", classes=("a", "b", "c"), n=6)
    make_folder(data / "test", classes=("a", "b", "c"), n=3, seed=1)
    for f in sorted((data / "train" / "c").iterdir()):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # the header reads, the pixels do not
    with Image.open(data / "train" / "b" / "b_00.jpg") as im:
        im.load()
        im.save(data / "train" / "b" / "b_00.jpg", format="PNG")  # usable, with a note
    with caplog.at_level(logging.INFO, logger="imgclf"):
        result = train(Config().updated(data_root=data, out=tmp_path / "r", tracking=False, **FAST))
    assert "class 'c' has no training image that could be read" in caplog.text
    assert "18 training and 9 test images, 0 skipped" in caplog.text  # as scanned; then, decoded:
    assert "6 more image(s) could not be decoded (listed in the report): 12 training and 9 test" in caplog.text
    assert result.bundle.head.weight.shape[0] == 3 and result.metrics["per_class_accuracy"]["c"] == 0.0
    assert result.metrics["n_train"] == 12 and result.metrics["n_test"] == 9
    # evaluate rewrites metrics.json: what training skipped, noted and trained on stays; a test image
    # damaged since is reported as it reads now
    test_a0 = data / "test" / "a" / "a_00.jpg"
    test_a0.write_bytes(test_a0.read_bytes()[:200])
    again = evaluate(result.run_dir)
    skipped = result.metrics["skipped"]
    assert len(skipped) == 6 and again.metrics["skipped"][:6] == skipped and again.metrics["n_train"] == 12
    assert [s["path"] for s in again.metrics["skipped"][6:]] == [str(test_a0)] and again.metrics["n_test"] == 8
    assert len(result.metrics["notes"]) == 1 and again.metrics["notes"] == result.metrics["notes"]
    assert json.loads((result.run_dir / "metrics.json").read_text())["notes"] == result.metrics["notes"]
    for f in sorted((data / "test").rglob("*.jpg")):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"none of the 8 test images could be read \(e.g. .*test/a/a_01.jpg"):
        train(Config().updated(data_root=data, out=tmp_path / "r2", tracking=False, **FAST))


def test_predict_into_a_pipe_closed_early_stops_quietly(run):
    """`imgclf predict RUN DIR | head -1`: the reader leaves; no traceback, exit status 141 (SIGPIPE's)."""
    data, result, _ = run
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgclf", "predict", str(result.run_dir), str(data / "squares"), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_predict_takes_top_k_from_a_config_file(run, tmp_path, capsys):
    """`top_k = 1` in a --config file was said to be "left as the run has them", then ignored: predict's
    --top-k was a flag of its own, not the setting."""
    data, result, _ = run
    (tmp_path / "one.toml").write_text("[serve]\ntop_k = 1\n")
    image = str(data / "squares" / "squares_00.jpg")
    assert main(["predict", str(result.run_dir), image, "--config", str(tmp_path / "one.toml"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()[0].split("\t")) == 2 and "left as the run has them" not in err, (out, err)
    assert main(["predict", str(result.run_dir), image, "--no-progress"]) == 0  # the default: 3 of the 3 classes
    assert len(capsys.readouterr().out.splitlines()[0].split("\t")) == 4


def test_predict_names_a_named_pipe_and_goes_on(run, tmp_path):
    """A named pipe given to predict (a FIFO named .jpg) blocked it for ever, in the opening of it to hash it
    (Ctrl-C could not end it): it is named as no plain file, and the rest are classified."""
    data, result, _ = run
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgclf",
            "predict",
            str(result.run_dir),
            str(fifo),
            str(data / "squares" / "squares_00.jpg"),
            f"/dev/fd/../../..{fifo}",  # the same pipe by a path that only starts as a handed-over one does
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and lines[0] == f"{fifo}\tERROR\t{NOT_A_PLAIN_FILE}", (proc.stdout, proc.stderr)
    assert lines[1].startswith(str(data / "squares" / "squares_00.jpg"))
    assert lines[2] == f"/dev/fd/../../..{fifo}\tERROR\t{NOT_A_PLAIN_FILE}"
    # a pipe the shell hands over has its writer: read, once (hashing it for the feature cache left nothing to
    # decode, "empty file", but for an image whose features were cached already)
    fresh = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(fresh, "JPEG")
    piped = subprocess.run(
        [sys.executable, "-m", "imgclf", "predict", str(result.run_dir), "/dev/stdin", "--no-progress"],
        input=fresh.getvalue(),
        capture_output=True,
        timeout=120,
    )
    assert piped.returncode == 0 and piped.stdout.startswith(b"/dev/stdin\t"), (piped.stdout, piped.stderr)


SIGTERM_PROBE = """
import ctypes
import imgclf.cli as cli
run = ctypes.pythonapi.PyRun_String
run.restype, run.argtypes = ctypes.py_object, [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]
def command(args):  # SIGTERM lands in Python code run by PyRun_String, as in torch's pybind11 py::exec
    run(b"import os, signal, time\\nos.kill(os.getpid(), signal.SIGTERM)\\ntime.sleep(60)\\n", 257, {}, {})
cli._show_config = command
raise SystemExit(cli.main(["config", "--show"]))
"""


def test_sigterm_ends_a_command_with_status_130(tmp_path):
    """An export stopped by SIGTERM printed "interrupted" and then died of SIGINT (-2): CPython had noted the
    KeyboardInterrupt as unhandled on its way through PyRun_String code and, under ``python -m``, killed the
    process at exit. SIGTERM now ends every command with 130, as main returns."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "__main__.py").write_text(SIGTERM_PROBE)
    proc = subprocess.run([sys.executable, "-m", "probe"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "interrupted", (proc.returncode, proc.stderr)


def test_predict_on_folders_without_images_says_so(run, tmp_path, capsys, caplog):
    data, result, _ = run
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("not a photo")
    (tmp_path / "notes" / "IMG_0001").write_bytes((data / "squares" / "squares_00.jpg").read_bytes())
    assert main(["predict", str(result.run_dir), str(tmp_path / "notes"), "--no-progress"]) == 2
    assert f"no image to classify in {tmp_path / 'notes'}" in capsys.readouterr().err
    assert "2 file(s) in the folders given not named as images, not classified (.txt 1, no extension 1)" in caplog.text
    with pytest.raises(DatasetError, match="no image to classify"):
        predict(result.run_dir, [])
    (tmp_path / "notes" / "a.jpg").write_bytes((data / "squares" / "squares_00.jpg").read_bytes())
    assert main(["predict", str(result.run_dir), str(tmp_path / "notes"), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'notes' / 'a.jpg'}\t")


def test_cli_train_warm_cache_and_config_show(run, tmp_path, capsys, caplog, monkeypatch):
    data, _, _ = run
    out = tmp_path / "cli-run"

    def no_network(*args, **kwargs):
        raise AssertionError("features computed although the first run cached them")

    monkeypatch.setattr(FeatureExtractor, "embed_arrays", no_network)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        assert (
            main(["train", str(data), "--out", str(out), "--resolution", "64", "--no-progress", "--cv-folds", "3"]) == 0
        )
    assert "1 file(s) not images, not used (.txt 1)" in caplog.text and "readme.txt" not in caplog.text
    assert "zero.jpg: empty file" in caplog.text  # damaged images are still named one by one
    assert "Overall accuracy" in capsys.readouterr().out
    assert "holds an earlier run" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imgclf"):  # the same command again: it says what it replaces
        assert (
            main(["train", str(data), "--out", str(out), "--resolution", "64", "--no-progress", "--cv-folds", "3"]) == 0
        )
    assert f"run folder {out} holds an earlier run: this one replaces it" in caplog.text
    assert main(["config", "--show"]) == 0
    assert "train_fraction" in capsys.readouterr().out


def test_warm_rerun_imports_no_heavy_library(run, tmp_path):
    """A repeated train with everything cached reads features, head fit, metrics and figure back: it
    imports neither PyTorch, scikit-learn, matplotlib, OpenVINO nor MLflow, and reproduces the results."""
    data, _, _ = run
    probe = (
        "import sys; from imgclf.cli import main; rc = main(sys.argv[1:]); "
        "print('HEAVY', sorted(m for m in ('torch', 'timm', 'sklearn', 'matplotlib', 'openvino', 'mlflow') "
        "if m in sys.modules)); raise SystemExit(rc)"
    )
    outs = []
    for i in range(2):
        out = tmp_path / f"rerun{i}"
        args = ["train", str(data), "--out", str(out), "--resolution", "64", "--no-progress", "--cv-folds", "3"]
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True)
        outs.append((proc.stdout, json.loads((out / "metrics.json").read_text())))
    assert "HEAVY []" in outs[1][0], outs[1][0]
    first, second = outs[0][1], outs[1][1]
    for key in ("overall_accuracy", "auc", "confusion_matrix", "per_class_accuracy"):
        assert first[key] == second[key]
    assert (tmp_path / "rerun1" / "evaluation.png").read_bytes() == (
        tmp_path / "rerun0" / "evaluation.png"
    ).read_bytes()


def test_predict_and_evaluate_use_this_machines_device_workers_and_cache(tmp_path, capsys):
    """A run trained with --device cuda (or a --cache-dir of its machine) could not be used where that is not:
    predict said the device is missing; the machine's settings are now those of where a command runs."""
    from helpers import make_bundle

    features = {"device": "cuda:3", "workers": 7, "cache_dir": str(tmp_path / "their-disk" / "cache")}
    make_bundle(tmp_path / "run", {"features": features})
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "x.jpg")
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "x.jpg"), "--no-progress"]) == 0
    assert "x.jpg\t" in capsys.readouterr().out and not (tmp_path / "their-disk").exists()
    _, preds = predict(tmp_path / "run", [tmp_path / "x.jpg"])  # the Python API (and ui --run) too
    assert preds[0].error is None and not (tmp_path / "their-disk").exists()


def test_cli_errors_are_messages(tmp_path, capsys, monkeypatch):
    import errno

    assert main(["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "runs" / "latest")]) == 2
    assert "is inside the data folder" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert main(["predict", str(tmp_path / "no_run"), str(tmp_path / "x.jpg")]) == 2
    assert "no model bundle in" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("not a folder")
    for command in ("predict", "serve"):  # an exported model given for the run folder
        assert (
            main([command, str(tmp_path / "a_file"), *([str(tmp_path / "x.jpg")] if command == "predict" else [])]) == 2
        )
        assert f"{tmp_path / 'a_file'} is a file: give the run folder that train wrote" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for command in (["dedup"], ["dedup", "--undo"], ["ui", "--port", port]):  # the data folder is a file
        assert main([command[0], str(tmp_path / "a_file"), *command[1:]]) == 2
        assert "a_file is a file; give the folder that holds one sub-folder per class" in capsys.readouterr().err
    for out in ("a_file", "a_file/run"):
        assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / out)]) == 2
        assert "a file is in the way; give another --out" in capsys.readouterr().err
    (tmp_path / "urls.tsv").write_text("cat\thttp://127.0.0.1:9/cat.jpg\n")
    assert main(["download", str(tmp_path / "urls.tsv"), "--out", str(tmp_path / "a_file" / "data")]) == 2
    assert "cannot make the data folder" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "not a folder"
    from helpers import make_bundle

    make_bundle(tmp_path / "a_run")
    assert main(["predict", str(tmp_path / "a_run"), str(tmp_path / "x.jpg"), "--top-k", "0"]) == 2
    assert "serve.top_k = 0 (--top-k): Input should be greater than or equal to 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--data", str(tmp_path / "demo"), "--demo-seed", "-1"])
    assert "--demo-seed: expected a whole number of 0 or more, got '-1'" in capsys.readouterr().err
    for cmd, message in (
        (["runs", "list", "--limit", "0"], "--limit: expected a whole number of 1 or more, got '0'"),
        (["ui", str(tmp_path), "--port", "70000"], "--port: expected a port number from 1 to 65535, got '70000'"),
    ):
        with pytest.raises(SystemExit):
            main(cmd)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    assert main(["train", str(tmp_path), "--split-seed", "-5"]) == 2
    assert "data.split_seed = -5 (--split-seed): Input should be greater than or equal to 0" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for cmd in (["serve", str(tmp_path / "no_run")], ["ui", str(tmp_path)]):
            assert main([*cmd, "--port", port]) == 2
            assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    for host in ("nosuchhost.invalid", "192.0.2.1"):  # no such name; an address of another machine
        assert main(["ui", str(tmp_path), "--host", host]) == 2
        assert "give --host an address of this machine" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--epochs", "0", "--svm-c-grid", "1", "-1"]) == 2
    err = capsys.readouterr().err
    assert "finetune.epochs = 0 (--epochs): Input should be greater than or equal to 1" in err
    assert "every C must be a number greater than 0" in err and "errors.pydantic.dev" not in err
    (tmp_path / "run.toml").write_text("[finetune]\nepoch = 3\n[bogus]\n")
    assert main(["train", str(tmp_path), "--config", str(tmp_path / "run.toml")]) == 2
    err = capsys.readouterr().err
    assert "run.toml: finetune.epoch: unknown parameter (did you mean epochs?); bogus: unknown section" in err
    (tmp_path / "run.toml").write_text("[finetune\n")
    assert main(["train", str(tmp_path), "--config", str(tmp_path / "run.toml")]) == 2
    assert "run.toml: not a valid TOML file" in capsys.readouterr().err
    (tmp_path / "run.yaml").write_text("finetune: [\n")
    assert main(["train", str(tmp_path), "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert "run.yaml: not a valid YAML file (line 2, column 1: expected the node content" in err
    assert len(err.strip().splitlines()) == 1
    import torch

    import imgclf.pipeline

    def out_of_memory(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(imgclf.pipeline, "train", out_of_memory)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "out of GPU memory: lower --ft-batch-size" in capsys.readouterr().err
    monkeypatch.setattr(imgclf.pipeline, "predict", lambda *a, **k: out_of_memory(None))
    (tmp_path / "r").mkdir(exist_ok=True)
    monkeypatch.setattr("imgclf.commands._run_config", lambda run_dir: Config())
    assert main(["predict", str(tmp_path / "r"), str(tmp_path)]) == 2  # its own flags: no --ft-batch-size there
    err = capsys.readouterr().err
    assert "out of GPU memory: lower --batch-size, or run on the CPU with --device cpu" in err

    def disk_full(cfg):
        from imgclf.utils import atomic_write_bytes

        real_write = os.fdopen

        def failing(fd, *a, **k):
            f = real_write(fd, *a, **k)
            f.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
            return f

        monkeypatch.setattr(os, "fdopen", failing)
        atomic_write_bytes(tmp_path / "r" / "metrics.json", b"{}")

    monkeypatch.setattr(imgclf.pipeline, "train", disk_full)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"No space left on device: {tmp_path / 'r' / 'metrics.json'} (free space there, or train into" in err
    assert "--resume" not in err  # no fine-tuning to continue

    def stopped(error):
        def train(cfg):
            error.add_note(imgclf.pipeline.RESUMABLE)  # as train adds to a fine-tuning's, its checkpoint written
            raise error

        return train

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "model" / "backbone.pt"))
    monkeypatch.setattr(imgclf.pipeline, "train", stopped(full))
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"imgclf: error: No space left on device: {tmp_path / 'r' / 'model' / 'backbone.pt'} (free space there, "
        "or train into another --out; the same command plus --resume continues the fine-tuning from its last "
        "checkpoint)"
    )
    monkeypatch.setattr(imgclf.pipeline, "train", stopped(KeyboardInterrupt()))
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r")]) == 130
    hint = "(the same command plus --resume continues the fine-tuning from its last checkpoint)"
    assert capsys.readouterr().err.strip() == f"interrupted {hint}"

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(imgclf.pipeline, "train", interrupted)  # an svm run, or a fine-tuning without checkpoint
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r")]) == 130
    hint = "(the same command again reuses the image features computed so far)"
    assert capsys.readouterr().err.strip() == f"interrupted {hint}"
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--no-use-cache"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--classifier", "dnn"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted (the same command again reuses the images decoded so far)"


def test_leak_between_train_and_test_warns_or_refuses(tmp_path, caplog, monkeypatch):
    from helpers import make_folder

    import imgclf.datatools.dedup

    hash_images, limits = imgclf.datatools.dedup.hash_images, []
    monkeypatch.setattr(
        imgclf.datatools.dedup, "hash_images", lambda p, h, m, **k: limits.append(m) or hash_images(p, h, m, **k)
    )

    data = tmp_path / "data"
    make_folder(data / "train", n=6)
    make_folder(data / "val", n=3, seed=1)
    dup = data / "val" / "circles" / "copy_of_train.jpg"
    dup.write_bytes((data / "train" / "circles" / "circles_00.jpg").read_bytes())
    mislabelled = data / "train" / "squares" / "a_circle.jpg"  # the same picture under another label
    mislabelled.write_bytes((data / "train" / "circles" / "circles_01.jpg").read_bytes())
    cfg = Config().updated(data_root=data, out=tmp_path / "run", **FAST, tracking=False)
    train(cfg)  # an earlier run in the folder: the refusal below left it unusable ("did not finish")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    refusal = r"--fail-on-leak: 1 near-duplicate pair\(s\) straddle train and test \(.*circles_00.jpg ~ .*copy_of_train"
    with pytest.raises(DatasetError, match=refusal + r".*nothing written\. Run `imgclf dedup .*--split-mode group"):
        train(cfg.updated(fail_on_leak=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    with pytest.raises(DatasetError, match=refusal):  # a new folder: not left behind, empty but for a lock file
        train(cfg.updated(fail_on_leak=True, out=tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()  # nor the folder made to hold it
    (tmp_path / "was_here").mkdir()  # new/../was_here/run: was_here was there before, new never made
    with pytest.raises(DatasetError, match=refusal):
        train(cfg.updated(fail_on_leak=True, out=tmp_path / "new" / ".." / "was_here" / "run"))
    assert (tmp_path / "was_here").is_dir() and not any((tmp_path / "was_here").iterdir())
    assert evaluate(tmp_path / "run").metrics["n_test"] > 0
    make_folder(tmp_path / "extra", classes=("squares",), n=2, seed=2)
    (tmp_path / "extra" / "squares").rename(data / "val" / "only_in_val")  # a class that cannot be learned
    result = train(cfg.updated(max_image_pixels=123_456_789))
    assert limits[-1] == 123_456_789  # the images are hashed under the run's own pixel limit
    leaks = (tmp_path / "run" / "leaks.csv").read_text()
    assert "copy_of_train.jpg" in leaks and "circles_00.jpg" in leaks
    assert "straddle train and test" in caplog.text
    assert "1 near-duplicate pair(s) carry different labels" in caplog.text
    conflicts = (tmp_path / "run" / "label_conflicts.csv").read_text().splitlines()
    assert len(conflicts) == 2 and "circles_01.jpg" in conflicts[1] and "a_circle.jpg" in conflicts[1]
    assert result.bundle.classes == ["circles", "squares", "stripes"] and result.metrics["n_test"] == 10
    assert sum("only_in_val" in s["path"] for s in result.metrics["skipped"]) == 2


def test_group_mode_keeps_groups_whole_in_the_heads_folds(tmp_path, caplog, monkeypatch):
    from helpers import make_folder

    import imgclf.pipeline

    data = tmp_path / "data"
    for g in range(4):  # four sub-folders (groups) per class
        make_folder(tmp_path / f"g{g}", n=3, seed=g)
        for c in ("circles", "squares", "stripes"):
            (data / c).mkdir(parents=True, exist_ok=True)
            (tmp_path / f"g{g}" / c).rename(data / c / f"burst{g}")
    fit_head, seen = imgclf.pipeline.fit_head, []
    monkeypatch.setattr(imgclf.pipeline, "fit_head", lambda *a: seen.append(a[6]) or fit_head(*a))  # a[6]: groups
    with caplog.at_level(logging.INFO, logger="imgclf"):
        result = train(Config().updated(data_root=data, out=tmp_path / "r", split_mode="group", tracking=False, **FAST))
    rels = [s["path"] for s in csv.DictReader((result.run_dir / "split.csv").open()) if s["split"] == "train"]
    assert seen[-1] == ["/".join(rel.split("/")[:2]) for rel in rels] and len(rels) == 27  # 3 of 4 bursts each
    assert "cross-validation on the training split, groups kept whole" in caplog.text


def test_backbone_auto_chooses_on_the_training_split(tmp_path, caplog, monkeypatch):
    """Every candidate is cross-validated on training images only; the best is used and recorded."""
    from helpers import make_folder
    from pydantic import ValidationError

    import imgclf.pipeline
    from imgclf.config import AUTO_CANDIDATES

    data = make_folder(tmp_path / "data", n=6)
    seen: list[tuple[str, list[int]]] = []
    features = imgclf.pipeline._features

    def recording(fx, ds, idx, desc, skipped, digests=None):
        seen.append((desc, [int(i) for i in idx]))
        return features(fx, ds, idx, desc, skipped, digests)

    monkeypatch.setattr(imgclf.pipeline, "_features", recording)
    cfg = Config().updated(data_root=data, out=tmp_path / "run", **FAST, backbone="auto", runtime="torch")
    with caplog.at_level("INFO", logger="imgclf"):
        result = train(cfg.updated(tracking=False))
    cv = result.metrics["backbone_cv_accuracy"]
    assert list(cv) == list(AUTO_CANDIDATES) and all(0 <= v <= 1 for v in cv.values())
    chosen = max(AUTO_CANDIDATES, key=lambda n: (cv[n], -AUTO_CANDIDATES.index(n)))
    assert result.metrics["backbone"] == chosen and result.bundle.backbone_spec["name"] == chosen
    assert json.loads((tmp_path / "run" / "config.json").read_text())["backbone"]["backbone"] == chosen
    assert f"backbone auto: {chosen} chosen by cross-validation on the training split" in caplog.text
    with open(tmp_path / "run" / "split.csv") as f:
        test_rows = {i for i, row in enumerate(csv.DictReader(f)) if row["split"] == "test"}
    choosing = [idx for desc, idx in seen if desc.endswith(" train features")]
    assert len(choosing) == 3 and not any(test_rows & set(idx) for idx in choosing)  # the test split plays no part
    assert [desc for desc, _ in seen][3:] == ["test features"]
    assert evaluate(result.run_dir).metrics["backbone_cv_accuracy"] == cv  # an evaluation cannot choose again
    with pytest.raises(ValidationError, match="use it with --classifier svm"):
        Config().updated(backbone="auto", classifier="dnn")


def test_the_cv_accuracy_names_the_classes_it_cannot_score(tmp_path, caplog):
    """A class of one training image stays on the fitting side of every fold: "CV accuracy 1.000" did not say
    that class was left out of the score (its test accuracy was 0 %)."""
    from helpers import make_folder

    data = make_folder(tmp_path / "data" / "train", classes=("circles", "squares"), n=6).parent
    make_folder(data / "train", classes=("stripes",), n=1)
    make_folder(data / "val", n=2, seed=1)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        train(Config().updated(data_root=data, out=tmp_path / "run", **FAST, tracking=False, epochs=2, lr=0.5))
    assert ", without stripes: one training image, never held out)" in caplog.text
    # fine-tuning settings given to the SVM were ignored without a word (a fine-tuning run names its void ones)
    assert (
        "settings with no effect in this run: epochs 2, lr 0.5 (they set the fine-tuning of --classifier dnn"
        in caplog.text
    )


def test_unbalanced_classes_get_a_hint_unless_balanced(caplog):
    from imgclf.data.dataset import Dataset, Sample
    from imgclf.pipeline import _note_unbalanced

    ds = Dataset(Path("d"), ["few", "many"], [Sample(f"{i}", int(i >= 3), f"{i}") for i in range(18)])
    idx = np.arange(18)  # 3 against 15
    with caplog.at_level(logging.INFO, logger="imgclf"):
        _note_unbalanced(Config(), ds, idx, fine_tunes=False)
        _note_unbalanced(Config(), ds, idx, fine_tunes=True)
        _note_unbalanced(Config().updated(class_weight="balanced"), ds, idx, fine_tunes=False)
        _note_unbalanced(Config().updated(balance_classes=True), ds, idx, fine_tunes=True)
        _note_unbalanced(Config(), ds, idx[1:], fine_tunes=False)  # 2 against 15
        _note_unbalanced(Config(), ds, np.r_[idx[:3], idx[3:16]], fine_tunes=False)  # 3 against 13: not yet
    notes = [r.getMessage() for r in caplog.records if "unbalanced" in r.getMessage()]
    assert len(notes) == 3 and "few: 3 training images, many: 15" in notes[0]
    assert "--class-weight balanced" in notes[0] and "--balance-classes" in notes[1] and "few: 2" in notes[2]


def test_predict_takes_an_array_of_paths_and_leaves_torch_threads_as_they_were(run):
    """An array of paths (a DataFrame column) was refused as an image; train, evaluate and predict set
    PyTorch's thread count (--workers) and left it changed for their caller."""
    import torch

    data, result, _ = run
    paths = sorted((data / "squares").glob("squares_0[01].jpg"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, preds = predict(
            result.run_dir, np.array([str(p) for p in paths]), Config().updated(runtime="torch", use_cache=False)
        )
        assert [p.path for p in preds] == paths and all(p.scores is not None for p in preds)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_predict_on_a_terminal_shows_progress_whatever_the_run_recorded(run, monkeypatch):
    """A run trained into a log file recorded progress off; predict on a terminal then showed no bar."""
    from imgclf.cli import build_parser, config_from_args

    _, result, _ = run
    recorded = Config.from_saved(Bundle.load(result.run_dir).config, "the run").updated(progress=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    args = build_parser().parse_args(["predict", str(result.run_dir), "x.jpg"])
    assert config_from_args(args, recorded).output.progress
    args = build_parser().parse_args(["predict", str(result.run_dir), "x.jpg", "--no-progress"])
    assert not config_from_args(args, recorded).output.progress
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    args = build_parser().parse_args(["predict", str(result.run_dir), "x.jpg"])
    assert not config_from_args(args, recorded.updated(progress=True)).output.progress


def test_train_records_the_svm_cross_validation(run, tmp_path):
    """metrics.json had the C chosen but not how: now the folds and the cross-validated accuracy of the C kept
    and of every C tried (None for a NaN: JSON has none), which an evaluate keeps (only train knows them)."""
    import math
    import shutil

    from imgclf.heads import FittedHead, LinearHead
    from imgclf.pipeline import _svm_cv

    _, result, _ = run
    cv = result.metrics["svm_cv"]
    assert cv["folds"] == FAST["cv_folds"] and list(cv["accuracy_by_c"]) == ["0.1", "1.0", "10.0"]
    assert cv["accuracy"] == cv["accuracy_by_c"][str(result.metrics["svm_c"])] == max(cv["accuracy_by_c"].values())
    assert 0 < cv["accuracy"] <= 1
    folder = shutil.copytree(result.run_dir, tmp_path / "run")
    assert json.loads((folder / "metrics.json").read_text())["svm_cv"] == cv
    assert evaluate(folder).metrics["svm_cv"] == cv
    assert json.loads((folder / "metrics.json").read_text())["svm_cv"] == cv
    head = LinearHead(np.zeros((2, 3)), np.zeros(2), True)
    not_validated = FittedHead(head, 1.0, math.nan, 0, {1.0: math.nan})
    assert _svm_cv(not_validated) == {"folds": 0, "accuracy": None, "accuracy_by_c": {"1.0": None}}
