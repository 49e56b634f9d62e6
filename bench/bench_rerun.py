"""A repeated ``imgclf train`` on the same data: wall time with a warm cache as a share of the first run.

Each repeat starts from an empty cache folder (``IMGCLF_CACHE``) and a fresh MLflow store, runs
``imgclf train DATA`` once cold (features extracted, the OpenVINO model converted, the SVM
cross-validated) and then ``--warm`` more times on the same data, every run as its own process, as a
user would type it. It prints every wall time and the median warm/cold ratio; extra arguments after
``--`` go to ``imgclf train``.

    python bench/bench_rerun.py ../shared/datasets/flowers5 [--repeats 3] [--warm 2] [-- --classifier svm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgclf.cli import positive_int


def timed_train(data: Path, out: Path, env: dict[str, str], extra: list[str]) -> float:
    """Wall time of one ``imgclf train`` process; if it fails, print its last log lines and exit 1."""
    argv = ["train", str(data), "--out", str(out), "--no-progress", *extra]
    t = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "imgclf", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if done.returncode:  # its last log lines end with the reason (``imgclf: error: ...`` or a traceback)
        print(*done.stderr.splitlines()[-40:], sep="\n", file=sys.stderr)
        sys.exit(f"train failed (exit {done.returncode}): imgclf {' '.join(argv)}")
    return time.perf_counter() - t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """This script's options; everything after the first ``--`` goes to ``imgclf train`` (``train_args``)."""
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(
        usage="%(prog)s [-h] [--repeats N] [--warm N] data [-- IMGCLF_TRAIN_FLAGS ...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("data", type=Path)
    ap.add_argument("--repeats", type=positive_int, default=3, help="Cold + warm sequences, each from an empty cache.")
    ap.add_argument("--warm", type=positive_int, default=2, help="Warm runs after each cold one (1 or more).")
    args = ap.parse_args(argv[:cut])
    args.train_args = argv[cut + 1 :]
    return args


def main() -> None:
    args = parse_args()
    ratios, colds, warms = [], [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="imgclf-rerun-") as tmp:
            root = Path(tmp)
            env = dict(os.environ, IMGCLF_CACHE=str(root / "cache"), MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db")
            cold = timed_train(args.data, root / "cold", env, args.train_args)
            warm = [timed_train(args.data, root / f"warm{i}", env, args.train_args) for i in range(args.warm)]
            accs = {
                json.loads((root / d / "metrics.json").read_text())["overall_accuracy"]
                for d in ["cold"] + [f"warm{i}" for i in range(args.warm)]
            }
            if len(accs) != 1:
                raise SystemExit(f"warm runs disagree with the cold one: accuracies {sorted(accs)}")
            ratio = statistics.median(warm) / cold
            print(
                f"repeat {r + 1}: cold {cold:.2f} s, warm {' / '.join(f'{w:.2f}' for w in warm)} s, ratio {ratio:.3f}"
            )
            ratios.append(ratio)
            colds.append(cold)
            warms += warm
            deadline = time.monotonic() + 120  # let the background MLflow writer finish before cleaning up
            while any((root / "cache" / "tracking").glob("*/*.json")) and time.monotonic() < deadline:
                time.sleep(0.5)
    print(
        f"median cold {statistics.median(colds):.2f} s, median warm {statistics.median(warms):.2f} s, "
        f"warm/cold {100 * statistics.median(ratios):.1f} % (target < 10 %)"
    )


if __name__ == "__main__":
    main()
