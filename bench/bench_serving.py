"""The REST service under load vs a naive server, both on loopback, one after the other.

Service: ``imgclf serve RUN_DIR`` (micro-batching, OpenVINO on CPU). Baseline: the same bundle behind a
plain FastAPI endpoint doing one eager PyTorch fp32 forward per request (no batching). For each server the
script measures the p50 latency of single 640x480 JPEG requests on the idle server, then runs
``--clients`` concurrent clients for ``--seconds``, ``--repeats`` times, and prints the medians of
throughput, p50/p95 latency and CPU time per request, and the errors.

The service runs at ``--precision fp32`` by default, like the baseline, so that the throughput ratio
measures batching and the runtime, not a lower precision. ``--precision auto`` measures it as deployed
(bf16 with OpenVINO on CPUs with AMX); the ratio line names both sides' runtime and precision.

    python bench/bench_serving.py runs/demo [--clients 32] [--seconds 20] [--repeats 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, UploadFile
from PIL import Image

from imgclf.cli import positive_int


@dataclass
class Result:
    engine: str  # runtime and precision
    single_p50_ms: float
    throughput: float  # medians over the load runs
    p50_ms: float
    p95_ms: float
    cpu_ms: float  # server CPU time per request under load: comparable even on a busy shared machine
    errors: int  # sums over the load runs
    requests: int


def jpeg_640x480(seed: int) -> bytes:
    """A photo-like 640x480 JPEG: smooth colour fields plus texture noise."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.Resampling.BICUBIC)
    arr = np.clip(np.asarray(base, np.float32) + rng.normal(0, 12, (480, 640, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def duration(text: str) -> float:
    """argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def baseline_server(run_dir: str, port: int) -> None:
    """One request -> decode -> one eager PyTorch forward of the bundle, in FastAPI's thread pool."""
    import torch
    import uvicorn

    from imgclf.bundle import Bundle
    from imgclf.data.io import PixelBudget
    from imgclf.serving.inputs import ImageInput, decode_image

    bundle = Bundle.load(run_dir)
    budget = PixelBudget(100_000_000)  # the service's decoding
    net, pre = bundle.classifier_net(), bundle.preprocess
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model() -> dict:
        return {"runtime": "torch eager", "precision": "fp32"}

    @app.post("/v1/predict")
    def predict(file: UploadFile) -> dict:
        x = decode_image(ImageInput(file.file.read(), "upload"), pre, 100_000_000, budget)
        with torch.inference_mode():
            probs = net(torch.from_numpy(x[None].copy()))[0].numpy()
        best = int(probs.argmax())
        return {
            "predictions": [
                {
                    "label": bundle.classes[best],
                    "score": float(probs[best]),
                    "scores": dict(zip(bundle.classes, probs.tolist(), strict=True)),
                }
            ]
        }

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def log_tail(log: Path) -> str:
    """The last lines of a server's log, to print: the log's folder is deleted when the script exits."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-40:]) or "(empty)"


def start(cmd: list[str], url: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; the end of its log:\n{log_tail(log)}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            sys.exit(f"server did not start in 10 minutes; the end of its log:\n{log_tail(log)}")
        time.sleep(0.5)


def single_latency(url: str, image: bytes, n: int) -> float:
    """p50 of ``n`` sequential single-image requests (after 3 warm-up requests)."""
    times = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(n + 3):
            t = time.perf_counter()
            r = c.post("/v1/predict", files={"file": ("photo.jpg", image, "image/jpeg")})
            if r.status_code != 200:
                sys.exit(f"{url}/v1/predict answered {r.status_code}: {r.text}")
            if i >= 3:
                times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


async def load(url: str, images: list[bytes], clients: int, seconds: float) -> tuple[list[float], int, float]:
    """``clients`` clients posting one image at a time for ``seconds``: latencies, errors, elapsed."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:

        async def client(k: int) -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                image = images[k % len(images)]
                k += 1
                t = time.perf_counter()
                try:
                    r = await c.post("/v1/predict", files={"file": ("photo.jpg", image, "image/jpeg")})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return latencies, errors, time.perf_counter() - t0


def measure(name: str, cmd: list[str], url: str, images: list[bytes], args: argparse.Namespace, logs: Path) -> Result:
    print(f"[{name}] starting: {' '.join(cmd)}", flush=True)
    proc = start(cmd, url, logs / f"{name}.log")
    try:
        info = httpx.get(f"{url}/v1/model").json()
        engine = f"{info['runtime']} {info['precision']}"
        single = single_latency(url, images[0], args.single)
        print(
            f"[{name}] {engine}; single-request p50 {single:.1f} ms; load: {args.repeats} x {args.clients} clients, "
            f"{args.seconds:g} s",
            flush=True,
        )
        runs = []
        for i in range(args.repeats):
            cpu0 = cpu_seconds(proc.pid)
            latencies, errors, elapsed = asyncio.run(load(url, images, args.clients, args.seconds))
            cpu, n = cpu_seconds(proc.pid) - cpu0, len(latencies)
            ms = [x * 1000 for x in latencies]
            runs.append((n / elapsed, percentile(ms, 50), percentile(ms, 95), 1000 * cpu / max(n, 1), errors, n))
            print(f"[{name}] load run {i + 1}: {runs[-1][0]:.1f} req/s, {errors} errors", flush=True)
        if name == "service":
            stats = httpx.get(f"{url}/healthz").json()
            print(
                f"[{name}] {stats['images']} images in {stats['batches']} forward passes "
                f"(mean batch {stats['images'] / max(stats['batches'], 1):.1f}, largest {stats['largest_batch']})"
            )
    finally:
        proc.terminate()
        proc.wait(60)
    throughput, p50, p95, cpu_ms, errors, requests = zip(*runs, strict=True)
    medians = [statistics.median(v) for v in (throughput, p50, p95, cpu_ms)]
    return Result(engine, single, *medians, sum(errors), sum(requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="Run folder (or bundle) to serve.")
    parser.add_argument("--clients", type=positive_int, default=32, help="Concurrent clients. [32]")
    parser.add_argument("--seconds", type=duration, default=20.0, help="Duration of one load run. [20]")
    parser.add_argument("--repeats", type=positive_int, default=3, help="Load runs per server; medians reported. [3]")
    parser.add_argument(
        "--precision", choices=["fp32", "auto", "bf16"], default="fp32", help="The service's precision. [fp32]"
    )
    parser.add_argument("--single", type=positive_int, default=50, help="Sequential requests for the idle p50. [50]")
    parser.add_argument("--skip-baseline", action="store_true", help="Measure the service only.")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        baseline_server(args.run_dir, args.port)
        return
    images = [jpeg_640x480(i) for i in range(8)]
    env_note = f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        port = free_port()
        serve = [sys.executable, "-m", "imgclf.cli", "serve", args.run_dir, "--precision", args.precision]
        service = measure(
            "service",
            [*serve, "--port", str(port)],
            f"http://127.0.0.1:{port}",
            images,
            args,
            Path(tmp),
        )
        results = {"service": service}
        if not args.skip_baseline:
            port = free_port()
            cmd = [sys.executable, __file__, args.run_dir, "--baseline-server", "--port", str(port)]
            results["baseline"] = measure("baseline", cmd, f"http://127.0.0.1:{port}", images, args, Path(tmp))
    print(f"\n{args.repeats} x {args.clients} clients x {args.seconds:g} s per server, 640x480 JPEGs ({env_note})")
    print("medians of the load runs; errors and requests: totals")
    print(f"{'':28s}" + "".join(f"{name:>18s}" for name in results))
    rows = [
        ("runtime, precision", "engine", "s"),
        ("throughput (req/s)", "throughput", ".1f"),
        ("p50 latency (ms)", "p50_ms", ".0f"),
        ("p95 latency (ms)", "p95_ms", ".0f"),
        ("errors", "errors", "d"),
        ("requests", "requests", "d"),
        ("idle single-request p50 (ms)", "single_p50_ms", ".1f"),
        ("server CPU ms per request", "cpu_ms", ".1f"),
    ]
    for label, attr, fmt in rows:
        print(f"{label:28s}" + "".join(f"{getattr(r, attr):>18{fmt}}" for r in results.values()))
    if "baseline" in results:
        base = results["baseline"]
        mixed = "" if service.engine.endswith(" fp32") else f": includes the gain of {service.engine} over fp32"
        print(
            f"throughput ratio service ({service.engine}) / baseline ({base.engine}): "
            f"{service.throughput / base.throughput:.1f}x (target >= 3x{mixed})"
        )
        print(
            f"CPU time per request, baseline/service: {base.cpu_ms / service.cpu_ms:.1f}x "
            "(the throughput ratio on otherwise idle cores)"
        )
    print(f"idle single-request p50 ({service.engine}): {service.single_p50_ms:.1f} ms (target <= 20 ms)")


if __name__ == "__main__":
    main()
