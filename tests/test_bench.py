"""The fine-tuning throughput benchmark runs end to end (tiny settings; the numbers are not checked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_finetune_runs() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_finetune.py"),
            *("--batch", "4", "--batches", "1", "--threads", "1"),
            *("--precision", "bf16"),  # the GPU's autocast path, run on the CPU
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "cpu bf16" in done.stdout and "synthetic" in done.stdout and "img/s" in done.stdout, done.stdout
