"""Core commands: ``train``, ``evaluate``, ``predict``, ``demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from imgclf.cli import add_config_args, config_from_args, non_negative_int, positive_int, user_path, utf8_path
from imgclf.config import Config

CORE_SECTIONS = (
    *("data", "backbone", "features", "classifier", "finetune", "tracking", "output"),
    *(f"datatools.{name}" for name in ("hash_size", "max_distance", "fail_on_leak")),  # the leak check's
)
DEMO_BASE = Config().updated(out=Path("runs/demo"))  # the demo's run folder


def _train(args: argparse.Namespace) -> int:
    from imgclf.pipeline import train

    train(config_from_args(args, data_root=args.data_dir))
    return 0


def _run_config(run_dir: str) -> Config:
    """The configuration a run was trained with, for this machine (:meth:`Config.of_run`); flags given to
    evaluate/predict override it."""
    from imgclf.bundle import Bundle

    return Config.of_run(Bundle.load(run_dir).config, f"the run {run_dir}")


def _evaluate(args: argparse.Namespace) -> int:
    from imgclf.pipeline import evaluate

    trained = _run_config(args.run_dir)
    cfg = config_from_args(args, trained)
    evaluate(args.run_dir, on_train=args.on_train, cfg=cfg, flip_tta=cfg.features.flip_tta)
    if not (cfg.tracking.tracking or trained.tracking.tracking or hasattr(args, "cfg__tracking")):  # the run's
        logging.getLogger("imgclf").info(
            "not recorded in the run history: the run was trained with --no-tracking (--tracking records this)"
        )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from imgclf.pipeline import predict, predictions_csv, write_predictions_csv
    from imgclf.utils import check_output_file, display_path

    to_stdout = args.csv == "-"  # the CSV in place of the lines, for a pipe
    if args.csv and not to_stdout:  # before the work, not after it
        check_output_file(Path(args.csv), "--csv", args.inputs)
    cfg = config_from_args(args, _run_config(args.run_dir))
    classes, preds = predict(args.run_dir, args.inputs, cfg, flip_tta=cfg.features.flip_tta)
    unwritten = None
    if to_stdout:
        sys.stdout.write(predictions_csv(classes, preds, cfg.serve.top_k))
    elif args.csv:  # before the lines: a reader that stops early (`| head`) ends the printing
        try:
            write_predictions_csv(Path(args.csv), classes, preds, cfg.serve.top_k)
        except OSError as e:  # the folder went away or filled up while the images were scored
            unwritten = e
    for p in [] if to_stdout else preds:
        if p.scores is None:
            print(f"{display_path(p.path)}\tERROR\t{p.error}")
        else:
            top = sorted(zip(classes, p.scores, strict=True), key=lambda t: -t[1])[: cfg.serve.top_k]
            print(f"{display_path(p.path)}\t" + "\t".join(f"{c} {s:.3f}" for c, s in top))
    if failed := sum(p.error is not None for p in preds):  # also where the lines go to a file
        print(f"{failed} of {len(preds)} image(s) could not be classified: see their ERROR lines", file=sys.stderr)
    if unwritten:  # the predictions are printed above: only the file is lost
        raise unwritten
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    from imgclf.data.demo import generate_demo_dataset
    from imgclf.pipeline import train

    cfg = config_from_args(args, DEMO_BASE)
    if Path(args.data).exists() and not Path(args.data).is_dir():  # the generator said "it is not empty"
        raise NotADirectoryError(f"--data {args.data} is a file: give a folder for the generated images")
    data = generate_demo_dataset(
        args.data, n_per_class=args.n_per_class, seed=args.demo_seed, progress=cfg.output.progress
    )
    train(cfg.updated(data_root=data))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="Train and evaluate a classifier on a folder of labelled images.")
    p.add_argument(
        "data_dir", type=utf8_path, help="Folder with one sub-folder per class (or train/ and val/ or test/)."
    )
    add_config_args(p, CORE_SECTIONS, exclude=("data.data_root",))  # DATA_DIR instead
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="Score a run's model on its test split (or training split) again.")
    p.add_argument("run_dir", type=user_path, help="Run folder written by train.")
    p.add_argument("--on-train", action="store_true", help="Evaluate on the training split instead.")
    p.add_argument(
        "--data-root",
        "--data_root",
        dest="cfg__data_root",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="The data folder, where it has moved since training. [default: the run's]",
    )
    add_config_args(p, ("data.max_image_pixels", "features", "tracking", "output.progress"), from_run=True)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="Classify images with a trained model.")
    p.add_argument("run_dir", type=user_path, help="Run folder (or its model/ bundle).")
    p.add_argument(
        "inputs",
        nargs="+",
        type=user_path,
        help="Image files, folders (searched recursively) or .txt lists of paths.",
    )
    p.add_argument(
        "--csv",
        type=user_path,
        help="Also write the predictions to this CSV file; - writes the CSV to standard output instead of the lines.",
    )
    add_config_args(p, ("data.max_image_pixels", "features", "serve.top_k", "output.progress"), from_run=True)
    p.set_defaults(func=_predict)

    p = sub.add_parser("demo", help="Generate the built-in texture data set and train on it.")
    p.add_argument(
        "--data", type=utf8_path, default="demo-data", help="Folder for the generated images. [default: demo-data]"
    )
    p.add_argument("--n-per-class", type=positive_int, default=60, help="Generated images per class. [default: 60]")
    p.add_argument("--demo-seed", type=non_negative_int, default=0, help="Seed of the generator. [default: 0]")
    add_config_args(p, CORE_SECTIONS, exclude=("data.data_root",), base=DEMO_BASE)  # --data instead
    p.set_defaults(func=_demo)
