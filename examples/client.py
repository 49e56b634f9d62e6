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
import contextlib
import http.client
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


class Stop(Exception):
    """The server cannot be reached or is not imgclf's: the other images would fare no better."""


def classify(url: str, b64: str, api_key: str | None, tutorial: bool, timeout: float) -> tuple[int, bytes, float]:
    """Send one base64 image; return the HTTP status, the answer's body and the round-trip time in ms."""
    if tutorial:
        route, body = "/score", {"input_df": [{"image base64 string": b64}]}
    else:
        route, body = "/v1/predict", {"images": [b64]}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.netloc, timeout=timeout)
    t0 = time.perf_counter()
    try:
        # a body over the limit is refused before it is all sent: the server's answer (413) is read below
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.request("POST", parts.path + route, json.dumps(body).encode(), headers)
        response = connection.getresponse()
        return response.status, response.read(), (time.perf_counter() - t0) * 1000
    except TimeoutError as e:
        raise Stop(f"no answer from {url} within {timeout:g} s (--timeout): the server is busy or hung") from e
    except ConnectionResetError as e:
        raise Stop(f"the server at {url} closed the connection without answering ({e})") from e
    except http.client.HTTPException as e:  # an answer cut short, or not HTTP
        raise Stop(f"the answer from {url} is not imgclf's ({e!r}); is --url the address of `imgclf serve`?") from e
    except OSError as e:  # refused, no such host
        raise Stop(
            f"cannot reach a server at {url} ({e.strerror or e}): start one with `imgclf serve RUN`, or give "
            "its address with --url"
        ) from e
    finally:
        connection.close()


def error_detail(status: int, data: bytes) -> str:
    """imgclf's message of an error answer (JSON {"error", "detail"}), else the answer's text."""
    text = data.decode("utf-8", "replace")
    try:
        return json.loads(text)["detail"]
    except (ValueError, KeyError, TypeError):
        return text or http.client.responses.get(status, "")


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
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds to wait for each answer. [60]")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        parser.error(f"--url {args.url}: give the server's address, e.g. http://127.0.0.1:8000")
    failures = 0
    for image in args.images:
        try:
            b64 = base64.b64encode(image.read_bytes()).decode("ascii")
        except OSError as e:  # missing or unreadable file
            print(f"{image}: {e.strerror or e}")
            failures += 1
            continue
        try:
            status, data, round_trip = classify(url, b64, args.api_key, args.tutorial, args.timeout)
            if status == 404:
                raise Stop(
                    f"HTTP 404 ({error_detail(status, data)}) from {url}: --url takes the server's address, e.g. "
                    "http://127.0.0.1:8000, not a route"
                )
            if status != 200:  # imgclf answers errors with JSON {"error", "detail"}
                print(f"{image}: HTTP {status}: {error_detail(status, data)}")
                failures += 1
                continue
            answer = json.loads(data)
            best = answer["predictions"][0]
            others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in best["top_k"][1:])
            timing = f"{answer['server_time_ms']:.1f} ms in the server (model {answer['model_id']})"
        except (ValueError, KeyError, IndexError, TypeError) as e:
            print(f"{image}: the answer from {url} is not imgclf's ({e!r}); is --url the address of `imgclf serve`?")
            return 1
        except Stop as e:
            print(f"{image}: {e}")
            return 1
        print(f"{image}: {best['label']} ({best['score']:.3f}){'; then ' + others if others else ''}")
        print(f"    round trip {round_trip:.1f} ms, of which {timing}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
