"""Overall accuracy of `imgclf train` over several split seeds (the feature cache makes later seeds cheap).

python bench/accuracy.py ../shared/datasets/flowers5 --seeds 0 1 2 3 4 [-- extra train flags]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from imgclf.cli import main as imgclf_main


def run(data: str, seeds: list[int], extra: list[str]) -> list[float]:
    accs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            out = Path(tmp) / f"seed{seed}"
            argv = ["train", data, "--out", str(out), "--split-seed", str(seed), "--no-progress", *extra]
            t = time.perf_counter()
            if imgclf_main(argv) != 0:
                sys.exit(f"train failed for seed {seed}")
            accs.append(json.loads((out / "metrics.json").read_text())["overall_accuracy"])
            print(f"seed {seed}: overall accuracy {accs[-1]:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args, extra = parser.parse_known_args()
    accs = run(args.data, args.seeds, [a for a in extra if a != "--"])
    print(f"overall accuracy per seed: {[round(a, 4) for a in accs]}")
    print(f"mean {statistics.mean(accs):.4f}  median {statistics.median(accs):.4f}  min {min(accs):.4f}")


if __name__ == "__main__":
    main()
