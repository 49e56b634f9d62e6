"""Classify images with a running ``imgclf serve``: Python standard library only (no imgclf, no requests).

Each image is sent as base64 JSON; the script prints the label and score, and the round-trip time next
to the time the server itself reports (the difference is network + HTTP + encoding).

    python examples/client.py photo1.jpg photo2.jpg [--url http://127.0.0.1:8000] [--api-key KEY]
    (the key defaults to $IMGCLF_API_KEY, as the server's does)
    python examples/client.py photo.jpg --tutorial   # the 2017 tutorial's /score request format
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def classify(url: str, image: Path, api_key: str | None, tutorial: bool) -> tuple[dict, float]:
    """Send one image; return the server's answer and the round-trip time in ms."""
    b64 = base64.b64encode(image.read_bytes()).decode("ascii")
    if tutorial:
        route, body = "/score", {"input_df": [{"image base64 string": b64}]}
    else:
        route, body = "/v1/predict", {"images": [b64]}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    request = urllib.request.Request(url.rstrip("/") + route, json.dumps(body).encode(), headers, method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    return answer, (time.perf_counter() - t0) * 1000


def error_detail(e: urllib.error.HTTPError) -> str:
    text = e.read().decode("utf-8", "replace")
    try:
        return json.loads(text)["detail"]
    except (ValueError, KeyError, TypeError):
        return text or str(e.reason)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="Image files to classify.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Server address. [http://127.0.0.1:8000]")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("IMGCLF_API_KEY"),
        help="Value of the X-API-Key header, if the server needs one. [$IMGCLF_API_KEY]",
    )
    parser.add_argument("--tutorial", action="store_true", help="Use the 2017 tutorial's /score route and format.")
    args = parser.parse_args()
    failures = 0
    for image in args.images:
        try:
            answer, round_trip = classify(args.url, image, args.api_key, args.tutorial)
        except urllib.error.HTTPError as e:  # imgclf answers errors with JSON {"error", "detail"}
            print(f"{image}: HTTP {e.code}: {error_detail(e)}")
            failures += 1
            continue
        except OSError as e:  # unreadable file, refused connection, timeout
            print(f"{image}: {e}")
            failures += 1
            continue
        best = answer["predictions"][0]
        others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in best["top_k"][1:])
        print(f"{image}: {best['label']} ({best['score']:.3f}){'; then ' + others if others else ''}")
        print(
            f"    round trip {round_trip:.1f} ms, of which {answer['server_time_ms']:.1f} ms in the server "
            f"(model {answer['model_id']})"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
