"""Memory of the REST service's image decoding: large images sent at once, bounded against unbounded.

``--images`` PNGs of ``--megapixels`` each (one colour: a few hundred KB of request body) are decoded at once
by as many threads, as the service's decoding threads do (``imgclf.serving.inputs.decode_image``). Each
mode runs in a fresh process, ``--repeats`` times; the script prints the medians of the peak rise of resident
memory and of what stays after the images are answered:

- *bounded*, the service's own (``DecodingBudget``): at most ``--megapixels`` pixels decoded at once across
  the threads (its ``--max-image-pixels``), and an image over ``TRIM_AFTER_PIXELS`` gives its memory back to
  the system before the next large one starts;
- *unbounded*, the baseline: every thread decodes at once, freed memory stays with each thread's allocator.

    python bench/bench_decode_memory.py [--images 4] [--megapixels 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from imgclf.cli import positive_int


def _rss_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS now, VmHWM the peak), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def measure(mode: str, images: int, megapixels: float) -> dict[str, float]:
    """One mode, in this process: the peak rise and what stays, in MB."""
    from PIL import Image

    from imgclf.data.io import PixelBudget, Preprocess
    from imgclf.serving import inputs

    side = int((megapixels * 1e6) ** 0.5)
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buf, "PNG")
    data = buf.getvalue()
    del buf
    pixels = side * side
    budget = inputs.DecodingBudget(pixels) if mode == "bounded" else PixelBudget(10**15)
    pre = Preprocess(resolution=224)  # EfficientNet-Lite0's
    inputs.release_freed_memory()  # the PNG's making is not counted
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to VmRSS (Linux)
        f.write("5")
    before = _rss_mb("VmRSS")
    with ThreadPoolExecutor(images) as pool:
        done = list(
            pool.map(
                lambda i: inputs.decode_image(inputs.ImageInput(data, f"{i}.png"), pre, pixels, budget), range(images)
            )
        )
    assert len(done) == images
    return {"peak": _rss_mb("VmHWM") - before, "after": _rss_mb("VmRSS") - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=positive_int, default=4, help="images (and threads) at once")
    ap.add_argument("--megapixels", type=float, default=100.0, help="pixels of each image, in millions")
    ap.add_argument("--repeats", type=positive_int, default=3, help="fresh processes per mode; medians printed")
    ap.add_argument("--child", choices=["bounded", "unbounded"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 0 < args.megapixels <= 1000:
        ap.error(f"--megapixels: expected more than 0 and at most 1000, got {args.megapixels:g}")
    if args.child:
        print(json.dumps(measure(args.child, args.images, args.megapixels)))
        return
    result = {}
    for mode in ("bounded", "unbounded"):
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--child", mode, "--images", str(args.images)]
            done = subprocess.run([*cmd, "--megapixels", str(args.megapixels)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{mode} run failed:\n{done.stderr[-2000:]}")
            runs.append(json.loads(done.stdout))
        result[mode] = {key: statistics.median(r[key] for r in runs) for key in ("peak", "after")}
        peak, after = result[mode]["peak"], result[mode]["after"]
        print(
            f"{mode:>9}: {args.images} x {args.megapixels:g} Mpx PNG at once: memory peak +{peak:.0f} MB, "
            f"after +{after:.0f} MB (medians of {args.repeats})"
        )
    b, u = result["bounded"], result["unbounded"]
    print(f"bounded / unbounded: peak {b['peak'] / u['peak']:.2f}, after {b['after'] / max(u['after'], 1.0):.2f}")


if __name__ == "__main__":
    main()
