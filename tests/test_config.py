import contextlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from imgclf.cli import build_parser, config_from_args, main
from imgclf.config import Config, describe_errors, field_index, parameter_table
from imgclf.datatools.dedup import HashCache


def test_defaults_and_descriptions():
    cfg = Config()
    assert cfg.data.train_fraction == 0.75
    assert cfg.backbone.backbone == "efficientnet_lite0"
    rows = parameter_table()
    assert len(rows) == len(field_index())  # flat names are unique across sections
    assert all(desc and len(desc) < 140 for *_, desc in rows)


def test_updated_validates_and_rejects_unknown():
    cfg = Config().updated(train_fraction=0.5, svm_c_grid=[1.0])
    assert cfg.data.train_fraction == 0.5 and cfg.classifier.svm_c_grid == [1.0]
    with pytest.raises(KeyError, match="unknown parameter"):
        Config().updated(no_such_thing=1)
    with pytest.raises(ValidationError):
        Config().updated(train_fraction=1.5)
    with pytest.raises(ValidationError, match="would make unrelated images duplicates"):
        Config().updated(max_distance=64)  # a quarter of a 256-bit dhash: dedup --apply would move most images
    assert Config().updated(max_distance=63, hash_size=16).datatools.max_distance == 63
    with pytest.raises(ValidationError, match="use less than 16"):
        Config().updated(hash_size=8, max_distance=16)


def test_settings_assigned_into_a_section_are_kept_and_given():
    """`cfg.classifier.svm_c_grid = [0.01]` then `cfg.updated(...)` (as train does) fell back to the default
    grid, and `cfg.tracking.tracking = False` recorded the run all the same."""
    cfg = Config()
    cfg.classifier.svm_c_grid = [0.01]
    cfg.tracking.tracking = False
    assert cfg.given() == {"svm_c_grid": [0.01], "tracking": False}
    copy = cfg.updated(epochs=3)
    assert copy.classifier.svm_c_grid == [0.01] and copy.tracking.tracking is False and copy.finetune.epochs == 3
    assert copy.given() == {"svm_c_grid": [0.01], "tracking": False, "epochs": 3}
    assert Config.of_run(Config().model_dump(mode="json"), "a run", cfg).tracking.tracking is False


def test_true_or_false_is_no_number(tmp_path: Path):
    """A file's ``lr = true`` trained with lr 1.0 (1000 times the default), ``epochs = true`` for 1 epoch."""
    f = tmp_path / "bools.toml"
    for line in ("lr = true", "epochs = true", "split_seed = false", "svm_c_grid = [0.1, true]"):
        f.write_text(line + "\n")
        with pytest.raises(ValueError, match=f"\\.{line.split()[0]} = .*expected a number, got"):
            Config.from_file(f)
    assert Config().updated(svm_c_grid=[1, 2.5], epochs=3, aug_flip=False).classifier.svm_c_grid == [1.0, 2.5]
    for given in ({"svm_c_grid": (0.1, True)}, {"epochs": np.bool_(True)}):  # from Python: a tuple, numpy's bool
        with pytest.raises(ValidationError, match="expected a number, got"):
            Config().updated(**given)


@pytest.mark.parametrize(
    "suffix,text",
    [
        (".toml", "[data]\ntrain_fraction = 0.6\n[classifier]\nsvm_c_grid = [0.5, 2.0]\n"),
        (".yaml", "data:\n  train_fraction: 0.6\nclassifier:\n  svm_c_grid: [0.5, 2.0]\n"),
    ],
)
def test_file_then_flags(tmp_path: Path, suffix: str, text: str):
    f = tmp_path / f"cfg{suffix}"
    f.write_text(text)
    args = build_parser().parse_args(["train", "data", "--config", str(f), "--split_seed", "3", "--no-l2-normalize"])
    cfg = config_from_args(args, data_root=args.data_dir)
    assert cfg.data.train_fraction == 0.6 and cfg.classifier.svm_c_grid == [0.5, 2.0]
    assert cfg.data.split_seed == 3 and cfg.classifier.l2_normalize is False
    assert cfg.data.data_root == Path("data")


def test_files_may_name_parameters_without_their_section(tmp_path: Path):
    (tmp_path / "flat.yaml").write_text("epochs: 2\nclassifier: dnn\nfinetune:\n  lr: 0.002\nresolution: 64\n")
    (tmp_path / "flat.toml").write_text('epochs = 2\nclassifier = "dnn"\nresolution = 64\n[finetune]\nlr = 0.002\n')
    expected = Config().updated(epochs=2, classifier="dnn", lr=0.002, resolution=64)
    assert Config.from_file(tmp_path / "flat.yaml") == Config.from_file(tmp_path / "flat.toml") == expected
    (tmp_path / "typo.yaml").write_text("epochz: 2\n")
    with pytest.raises(ValueError, match=r"epochz: unknown section or parameter \(did you mean epochs\?\)"):
        Config.from_file(tmp_path / "typo.yaml")
    (tmp_path / "section.toml").write_text("[classifier]\ntrain_fraction = 0.6\n")
    with pytest.raises(ValueError, match=r"classifier.train_fraction: train_fraction belongs in \[data\], not"):
        Config.from_file(tmp_path / "section.toml")


def test_a_tilde_in_a_path_is_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Only the shell expands ~, and only in flags: a configuration file's ~/runs made a folder named ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run.yaml").write_text("data_root: ~/photos\nout: ~/runs/x\ncache_dir: ~/cache\n")
    cfg = Config.from_file(tmp_path / "run.yaml")
    assert cfg.data.data_root == tmp_path / "photos" and cfg.output.out == tmp_path / "runs" / "x"
    assert cfg.features.cache_dir == tmp_path / "cache" and cfg.updated(out="~/y").output.out == tmp_path / "y"
    monkeypatch.setenv("IMGCLF_CACHE", "~/c")
    monkeypatch.chdir(tmp_path)
    HashCache()  # the near-duplicate hashes' cache follows $IMGCLF_CACHE like every other cache
    assert (tmp_path / "c" / "dhash" / "dhash.sqlite").is_file() and not (tmp_path / "~").exists()


def test_saved_config_round_trips(tmp_path: Path):
    cfg = Config().updated(resolution=448, classifier="dnn")
    cfg.save(tmp_path / "config.json")
    assert Config.from_file(tmp_path / "config.json") == cfg


def test_an_abbreviated_flag_matching_both_spellings_is_taken():
    args = build_parser().parse_args(["train", "data", "--balance", "--early-stop", "2"])
    cfg = config_from_args(args)
    assert cfg.finetune.balance_classes is True and cfg.finetune.early_stopping == 2
    with pytest.raises(SystemExit):  # two different flags still are ambiguous
        build_parser().parse_args(["train", "data", "--s", "1"])


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "run", "a.jpg", "--out", "elsewhere"],  # predict writes no run folder: --csv does
        ["evaluate", "run", "--seed", "3"],
        ["dedup", "data", "--per-query", "10"],
        ["download", "urls.tsv", "--out", "d", "--max-distance", "2"],
        ["train", "data", "--per-query", "5"],
    ],
)
def test_a_command_offers_only_the_flags_it_uses(argv: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_mistyped_flag_gets_the_commands_usage_and_a_suggestion(capsys: pytest.CaptureFixture[str]):
    from imgclf.cli import main

    with pytest.raises(SystemExit):
        main(["train", "data", "--clasifier", "dnn"])
    err = capsys.readouterr().err
    assert (
        "usage: imgclf train" in err and "unrecognized arguments: --clasifier dnn (did you mean --classifier?)" in err
    )
    with pytest.raises(SystemExit):
        main(["runs", "list", "--limt", "3"])
    assert (
        "imgclf runs list: error: unrecognized arguments: --limt 3 (did you mean --limit?)" in capsys.readouterr().err
    )
    # a flag of other commands was "did you mean --csv?" (for --epochs); -v after the command went unexplained
    for argv, said in (
        (["predict", "run", "a.jpg", "--epochs", "3"], "--epochs is a flag of config, demo, train; see imgclf predict"),
        (["predict", "run", "a.jpg", "-v"], "-v goes before the command: imgclf -v predict ..."),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert said in capsys.readouterr().err


def test_commands_keep_the_flags_they_use():
    parse = build_parser().parse_args
    assert config_from_args(parse(["predict", "run", "a.jpg", "--no-progress", "--flip-tta"])).features.flip_tta
    assert config_from_args(parse(["dedup", "data", "--max-distance", "2"])).datatools.max_distance == 2
    cfg = config_from_args(parse(["scrape", "--items", "a", "--attributes", "b", "--out", "d", "--per-query", "5"]))
    assert cfg.datatools.per_query == 5
    assert (
        config_from_args(parse(["download", "u", "--out", "d", "--max-image-pixels", "9"])).data.max_image_pixels == 9
    )


def test_a_file_changes_only_what_it_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """evaluate/predict start from the run's configuration; demo from its own run folder."""
    run_cfg = Config().updated(data_root=tmp_path, flip_tta=True, resolution=96)
    (tmp_path / "feat.toml").write_text("[features]\nworkers = 1\n")
    args = build_parser().parse_args(["predict", "run", "a.jpg", "--config", str(tmp_path / "feat.toml")])
    cfg = config_from_args(args, run_cfg)
    assert cfg.features.workers == 1 and cfg.features.flip_tta and cfg.backbone.resolution == 96
    assert cfg.data.data_root == tmp_path
    import imgclf.data.demo
    import imgclf.pipeline
    from imgclf.cli import main

    trained: list[Config] = []
    monkeypatch.setattr(imgclf.data.demo, "generate_demo_dataset", lambda folder, **_: Path(folder))
    monkeypatch.setattr(imgclf.pipeline, "train", trained.append)
    (tmp_path / "out.toml").write_text('[output]\nout = "runs/mine"\n')
    assert main(["demo", "--config", str(tmp_path / "out.toml")]) == 0
    assert main(["demo"]) == 0
    assert [c.output.out for c in trained] == [Path("runs/mine"), Path("runs/demo")]


def test_a_file_given_to_evaluate_or_predict_changes_only_what_their_flags_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """evaluate --config with a file of backbone/classifier/split settings recorded them in the report and in
    MLflow as the run's, though the run's model was scored; and --max-image-pixels, which predict's message for an
    oversized image names, was refused by predict and evaluate."""
    run_cfg = Config().updated(data_root=tmp_path, resolution=96, max_image_pixels=70_000)
    f = tmp_path / "ev.toml"
    f.write_text('backbone = "efficientnet_lite2"\nclassifier = "dnn"\ntrain_fraction = 0.3\nworkers = 1\n')
    for command in (["evaluate", "run"], ["predict", "run", "a.jpg"]):
        args = build_parser().parse_args([*command, "--config", str(f), "--max-image-pixels", "1000000"])
        caplog.clear()
        cfg = config_from_args(args, run_cfg)
        assert cfg.features.workers == 1 and cfg.data.max_image_pixels == 1_000_000  # its own settings apply
        assert (cfg.backbone.backbone, cfg.classifier.classifier, cfg.data.train_fraction) == (
            "efficientnet_lite0",
            "svm",
            0.75,
        )
        assert "backbone, classifier, train_fraction left as the run has them" in caplog.text
    saved = tmp_path / "config.json"
    saved.write_text(Config().updated(workers=1).model_dump_json())  # a config.json of the defaults: nothing to say
    caplog.clear()
    cfg = config_from_args(build_parser().parse_args(["evaluate", "run", "--config", str(saved)]), Config())
    assert cfg.features.workers == 1 and "left as the run has them" not in caplog.text


def test_progress_bars_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or log file
    assert config_from_args(build_parser().parse_args(["train", "d"])).output.progress is False
    assert config_from_args(build_parser().parse_args(["train", "d", "--progress"])).output.progress is True


def test_demo_data_bar_follows_the_same_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import io
    import sys

    from imgclf import pipeline
    from imgclf.cli import main

    trained: list[Config] = []
    monkeypatch.setattr(pipeline, "train", trained.append)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert main(["demo", "--data", str(tmp_path / "d"), "--n-per-class", "1", "--out", str(tmp_path / "r")]) == 0
    assert "demo data" not in sys.stderr.getvalue()
    assert trained[0].data.data_root == tmp_path / "d" and trained[0].output.out == tmp_path / "r"


def test_the_api_key_is_never_written(tmp_path: Path):
    """config.json, the bundle, the reports and MLflow all take the configuration as JSON."""
    from imgclf.tracking.store import flat_params

    cfg = Config().updated(api_key="S3CRET-123")
    assert cfg.serve.api_key == "S3CRET-123" and cfg.updated(port=8001).serve.api_key == "S3CRET-123"
    cfg.save(tmp_path / "config.json")
    for text in ((tmp_path / "config.json").read_text(), json.dumps(cfg.flat()), json.dumps(flat_params(cfg))):
        assert "S3CRET" not in text


def test_empty_values_and_file_checked_with_the_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """An unset shell variable must not mean the working folder, every interface or a nameless experiment;
    an experiment name MLflow refuses (over 500 characters) is refused before the run; a file is checked
    together with the flags that complete it."""
    for flat in (
        {"out": ""},
        {"data_root": ""},
        {"experiment": ""},
        {"host": ""},
        {"svm_c_grid": [float("inf")]},
        {"lr": float("inf")},  # accepted, it trained to NaN and kept epoch 0
        {"test_scale": float("nan")},
        {"max_file_mb": float("inf")},
        {"experiment": "e" * 501},
    ):
        with pytest.raises(ValidationError):
            Config().updated(**flat)
    with pytest.raises(SystemExit):
        main(["train", "", "--out", str(tmp_path / "r")])
    assert "argument data_dir: an empty path (an unset variable?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ui", str(tmp_path), "--host", ""])
    assert "argument --host: an empty address" in capsys.readouterr().err
    wide = tmp_path / "wide.yaml"
    wide.write_text("max_distance: 70\n")  # too wide for hash_size 16, fine for 32
    cfg = config_from_args(build_parser().parse_args(["config", "--config", str(wide), "--hash-size", "32"]))
    assert (cfg.datatools.hash_size, cfg.datatools.max_distance) == (32, 70)
    assert main(["config", "--config", str(wide)]) == 2 and "use less than 64" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["config", "--config=~/wide.yaml", "--hash-size", "32"]) == 0  # no shell expanded that ~


def test_every_two_word_flag_takes_its_underscore_spelling():
    """Settings' flags took `--top_k` and `--top-k` alike, a command's own flags only the dashes."""
    parser = build_parser()
    assert parser.parse_args(["predict", "run", "a.jpg", "--top_k", "2"]).cfg__top_k == 2
    assert parser.parse_args(["runs", "compare", "a", "b", "--all_params"]).all_params
    assert parser.parse_args(["demo", "--n_per_class", "5", "--demo_seed", "1"]).n_per_class == 5
    assert parser.parse_args(["evaluate", "run", "--on_train"]).on_train
    for off in ("--no-tracking", "--no_tracking"):  # --no_tracking turned tracking on
        with pytest.raises(SystemExit) if off == "--no_tracking" else contextlib.nullcontext():
            assert parser.parse_args(["train", "data", off]).cfg__tracking is False
    assert parser.parse_args(["train", "data", "--no-use_cache"]).cfg__use_cache is False


def test_path_flags_take_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`--csv=~/p.csv` (no shell expands it) wrote into a folder named `~`; `demo --data=~/d` wrote there and
    then trained from the home folder. Every path flag reads `~` as the settings' paths do."""
    monkeypatch.setenv("HOME", str(tmp_path))
    parser, home = build_parser(), str(tmp_path)
    cases = {
        ("predict", "run", "a.jpg", "--csv=~/p.csv"): ("csv", f"{home}/p.csv"),
        ("demo", "--data=~/d"): ("data", f"{home}/d"),
        ("export", "run", "--format", "onnx", "--out=~/m.onnx", "--check-images=~/i"): ("out", f"{home}/m.onnx"),
        ("runs", "compare", "a", "b", "--markdown=~/c.md"): ("markdown", f"{home}/c.md"),
        ("download", "urls.tsv", "--out=~/data"): ("out", f"{home}/data"),
        ("dedup", "data", "--report-dir=~/r"): ("report_dir", tmp_path / "r"),
        ("ui", "data", "--run=~/run"): ("run", f"{home}/run"),
    }
    for argv, (name, expected) in cases.items():
        assert getattr(parser.parse_args(argv), name) == expected, argv
    assert (
        parser.parse_args(["export", "r", "--format", "onnx", "--out", "m", "--check-images=~/i"]).check_images
        == f"{home}/i"
    )


def test_a_config_file_that_is_no_text_or_a_folder_is_named(tmp_path: Path):
    """`--config photo.jpg` said only "'utf-8' codec can't decode byte 0xff", naming no file."""
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    (tmp_path / "latin1.toml").write_bytes("title = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "folder.toml").mkdir()
    for name, said in (
        ("photo.jpg", "photo.jpg: configuration files must end in .toml, .yaml, .yml or .json"),
        ("latin1.toml", "latin1.toml is not UTF-8 text: byte 0xe9 at position 12 is not UTF-8; save the file as UTF-8"),
        ("folder.toml", "folder.toml is a folder: give a .toml, .yaml or .json file"),
    ):
        with pytest.raises((ValueError, IsADirectoryError)) as e:
            Config.from_file(tmp_path / name)
        assert said in str(e.value)


def test_config_files_saved_by_windows_editors_are_read(tmp_path: Path):
    """Notepad and PowerShell 5 put a byte-order mark before UTF-8 ("Invalid statement (at line 1, column 1)"
    in TOML); PowerShell 5's `>` writes UTF-16, which is named as such."""
    for name, text in (
        ("a.toml", 'backbone = "efficientnet_lite1"\n'),
        ("a.json", '{"backbone": "efficientnet_lite1"}'),
    ):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert Config.from_file(tmp_path / name).backbone.backbone == "efficientnet_lite1"
    (tmp_path / "b.toml").write_bytes("epochs = 3\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"configuration file .*b.toml is not UTF-8 text \(it is UTF-16\)"):
        Config.from_file(tmp_path / "b.toml")


def test_a_run_saved_by_an_earlier_version_still_loads(caplog: pytest.LogCaptureFixture):
    saved = {"finetune": {"ft_resolution": 448, "ft_batch_size": 1, "epochs": 3}, "data": {"split_seed": 2}}
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        cfg = Config.from_saved(saved, "runs/old")
    assert (cfg.finetune.epochs, cfg.data.split_seed, cfg.finetune.ft_batch_size) == (3, 2, 32)
    assert "runs/old: settings this imgclf does not know or accept" in caplog.text
    assert "finetune.ft_resolution" in caplog.text and "finetune.ft_batch_size" in caplog.text


def test_a_setting_given_at_the_top_and_in_its_section_is_refused_unless_alike(tmp_path: Path):
    """`epochs = 3` then `[finetune] epochs = 5` gave 5 in TOML, and the JSON of the same two 3: order won."""
    toml, js = tmp_path / "dup.toml", tmp_path / "dup.json"
    toml.write_text("epochs = 3\n[finetune]\nepochs = 5\n")
    js.write_text('{"finetune": {"epochs": 5}, "epochs": 3}')
    for f in (toml, js):
        with pytest.raises(ValueError, match=r"dup\.\w+: epochs given twice, 3 at the top and 5 in \[finetune\]"):
            Config.from_file(f)
    toml.write_text("epochs = 5\n[finetune]\nepochs = 5\n")
    assert Config.from_file(toml).finetune.epochs == 5


def test_an_old_runs_config_file_reruns_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A config.json of a run before 11-28 holds "ft_resolution": null: `train --config runs/x/config.json` (the
    documented rerun) was refused ("unknown parameter, did you mean resolution?": it would also change the
    side of testing), and every predict or evaluate of such a run warned twice of a setting that changed
    nothing."""
    saved = Config().model_dump(mode="json")
    saved["finetune"]["ft_resolution"] = None
    old = tmp_path / "config.json"
    old.write_text(json.dumps(saved))
    assert Config.from_file(old) == Config.from_saved(saved, "x")
    saved["finetune"]["ft_resolution"] = 448
    old.write_text(json.dumps(saved))
    with pytest.raises(
        ValueError, match=r"finetune\.ft_resolution = 448 is a setting of an earlier imgclf: .*give resolution"
    ):
        Config.from_file(old)
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        Config.from_saved({"finetune": {"ft_resolution": None}}, "runs/a")
        Config.from_saved(saved, "runs/b")
        Config.from_saved(saved, "runs/b")
    assert "runs/a" not in caplog.text and caplog.text.count("runs/b: settings this imgclf does not know") == 1


def test_train_takes_its_data_folder_as_an_argument_only(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "data", "--data-root", "elsewhere"])
    assert "unrecognized arguments: --data-root" in capsys.readouterr().err
    demo = build_parser().parse_args(["demo", "--demo-seed", "3"])
    assert demo.demo_seed == 3 and not hasattr(demo, "cfg__data_root")


def test_verbose_keeps_the_message_and_exit_status_of_an_input_error(capsys: pytest.CaptureFixture[str]):
    assert main(["-v", "config", "--train-fraction", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "imgclf: error: data.train_fraction = 2.0 (--train-fraction)" in err


def test_verbose_shows_imgclf_details_not_every_library(monkeypatch: pytest.MonkeyPatch):
    """-v set the root logger to DEBUG: matplotlib's font search alone printed hundreds of lines."""
    import logging

    monkeypatch.setattr(logging.getLogger("imgclf"), "level", logging.NOTSET)
    monkeypatch.setattr(logging.root, "handlers", [])  # basicConfig acts once per process
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    assert main(["-v", "config"]) == 0
    assert logging.getLogger("imgclf.export").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.DEBUG)


def test_help_shows_the_defaults_each_command_uses(capsys: pytest.CaptureFixture[str]):
    """predict's help said `--flip-tta [default: false]` while it follows the run; demo's `--out` said
    runs/latest while it writes runs/demo; demo's own flags showed none; `--progress [default: the run's]`
    while bars show where the command runs on a terminal."""

    def help_of(*command: str) -> str:
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        return " ".join(capsys.readouterr().out.split("options:", 1)[1].split())  # after the usage lines

    def default(text: str, flag: str) -> str:
        return re.search(rf"{flag}[ ,].*?\[default: ([^\]]*)\]", text).group(1)

    for command in ("predict", "evaluate"):
        text = help_of(command)
        assert default(text, "--flip-tta") == default(text, "--precision") == "the run's"
        assert default(text, "--device") == '"auto"' and default(text, "--workers") == "0"  # this machine's
    serve = help_of("serve")
    assert default(serve, "--flip-tta") == "the run's" and default(serve, "--port") == "8000"
    assert default(help_of("demo"), "--out") == '"runs/demo"'
    assert default(help_of("train"), "--out") == '"runs/latest"'
    assert default(help_of("train"), "--flip-tta") == "false"
    demo = help_of("demo")
    assert [default(demo, flag) for flag in ("--data", "--n-per-class", "--demo-seed")] == ["demo-data", "60", "0"]
    for command in ("train", "evaluate", "predict", "dedup"):
        assert default(help_of(command), "--progress") == "on a terminal"


def test_a_mistyped_command_or_choice_gets_the_one_meant(capsys: pytest.CaptureFixture[str]):
    """argparse listed every choice and left the reader to spot the typo."""
    for argv, meant in (
        (["trian", "data"], "(did you mean 'train'?)"),
        (["runs", "lsit"], "(did you mean 'list'?)"),
        (["train", "data", "--classifier", "svn"], "(did you mean 'svm'?)"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert capsys.readouterr().err.rstrip().endswith(meant)
    with pytest.raises(SystemExit):
        main(["xyzzy"])
    assert "did you mean" not in capsys.readouterr().err


def test_a_file_named_like_a_flag_gets_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """`predict run a.jpg -x.jpg`: "unrecognized arguments: -x.jpg", with no word of ./-x.jpg or --."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-x.jpg").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["predict", "run", "a.jpg", "-x.jpg"])
    assert "(-x.jpg is a file here: give it as ./-x.jpg, or after --)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", ""],
        ["evaluate", ""],
        ["predict", "", "a.jpg"],
        ["predict", "run", "a.jpg", ""],
        ["dedup", "", "--apply"],
        ["download", "", "--out", "d"],
        ["serve", ""],
        ["export", "", "--format", "onnx", "--out", "m.onnx"],
        ["ui", ""],
        ["config", "--config", ""],
    ],
)
def test_an_empty_path_argument_is_refused(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """An unset variable ("$DIR") meant the working folder: `dedup "" --apply` moved its copies into
    ./.imgclf-quarantine, `predict run ""` classified every image below it; `--config ""` was ignored."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and "an empty path (an unset variable?)" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_bad_flag_value_gets_one_line_of_usage(capsys: pytest.CaptureFixture[str]):
    """A value of the wrong type printed the whole usage (48 lines for train) before the error, and said
    "invalid int value"; a value out of range got the error alone."""
    for argv, said in (
        (["train", "d", "--epochs", "abc"], "argument --epochs: expected a whole number, got 'abc'"),
        (["train", "d", "--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
        (["demo", "--n-per-class", "0"], "argument --n-per-class: expected a whole number of 1 or more, got '0'"),
        (["train", "d", "--classifier", "svn"], "(did you mean 'svm'?)"),
        (["predict", "run"], "the following arguments are required: inputs"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        usage, error = capsys.readouterr().err.splitlines()
        command = f"imgclf {argv[0]}"
        assert usage.startswith(f"usage: {command} [options]") and usage.endswith(f"(see {command} --help)")
        assert error.startswith(f"{command}: error: ") and said in error
    with pytest.raises(SystemExit):
        main(["predict"])
    assert capsys.readouterr().err.startswith("usage: imgclf predict [options] run_dir inputs [inputs ...] (see")


def test_the_seeds_device_resolution_and_paths_are_checked_as_given(tmp_path: Path):
    """Refused by numpy, torch, Pillow or the JSON writer in the middle of a train, its run folder marked: a
    seed past 2**32 - 1, --device gpu, a model input Pillow will not make, a path that is not UTF-8. A model
    input larger than --max-image-pixels (small images upscaled) is no reason: the first version of this check
    refused such runs, and loading those trained before."""
    for flat, said in (
        ({"seed": 2**32}, r"output.seed = 4294967296 \(--seed\): Input should be less than or equal to 4294967295"),
        ({"split_seed": 2**32}, r"\(--split-seed\): Input should be less than or equal to 4294967295"),
        ({"device": "gpu"}, r"features.device = 'gpu' \(--device\): expected auto, cpu, cuda, cuda:N"),
        ({"device": "cuda:x"}, r"expected auto, cpu, cuda, cuda:N"),
        ({"resolution": 20000}, r"backbone.resolution = 20000 \(--resolution\): .* less than or equal to 4096"),
        ({"out": os.fsdecode(b"o\xff")}, r"output.out = 'o\\udcff' \(--out\): o\\xff is not valid UTF-8 text"),
        ({"data_root": tmp_path / os.fsdecode(b"d\xff")}, r"d\\xff is not valid UTF-8 text, .*: rename it"),
    ):
        with pytest.raises(ValidationError) as refused:
            Config().updated(**flat)
        assert re.search(said, describe_errors(refused.value))
    for flat in (
        {"seed": 2**32 - 1, "split_seed": 2**32 - 1},
        {"device": "cuda:1"},
        {"device": "mps"},
        {"device": "cpu:0"},
        {"resolution": 4096, "test_scale": 2.0, "classifier": "dnn"},
        {"resolution": 160, "max_image_pixels": 20_000},
    ):
        Config().updated(**flat)


def test_config_show_prints_values_as_written_not_as_markup(capsys: pytest.CaptureFixture[str]):
    """rich read the values as markup: `/photos/[old] trip` showed as `/photos/ trip`, `[/]` ended in a
    traceback, the type list[float] as `list`; None and True are JSON's null and true."""
    assert main(["config", "--show", "--data-root", "/photos/[old] trip", "--experiment", "[/]"]) == 0
    cells = [[c.strip() for c in line.split("│")[2:5]] for line in capsys.readouterr().out.splitlines()]
    rows = {name: (type_, value) for name, type_, value in (c for c in cells if len(c) == 3 and c[0])}
    assert rows["data_root"] == ("Path | None", '"/photos/[old] trip"') and rows["experiment"] == ("str", '"[/]"')
    assert rows["svm_c_grid"] == ("list[float]", "[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]")
    assert rows["test_list"][1] == "null" and rows["use_cache"][1] == "true"


def test_a_clash_of_flags_is_not_blamed_on_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`--config e.toml --hash-size 2 --max-distance 1` said "e.toml: datatools: ..." of a file without them."""
    (tmp_path / "e.toml").write_text("[finetune]\nepochs = 3\n")
    (tmp_path / "d.toml").write_text("[datatools]\nmax_distance = 1\n")
    for config, flags, said in (
        ("e.toml", ["--hash-size", "2", "--max-distance", "1"], "imgclf: error: datatools: max_distance 1"),
        ("d.toml", ["--hash-size", "2"], f"imgclf: error: {tmp_path / 'd.toml'} with the flags given: datatools:"),
        ("e.toml", ["--epochs", "0"], "imgclf: error: finetune.epochs = 0 (--epochs)"),
    ):
        assert main(["config", "--config", str(tmp_path / config), *flags]) == 2
        assert capsys.readouterr().err.startswith(said)
