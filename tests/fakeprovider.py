"""A local HTTP server on 127.0.0.1 that answers like Openverse and Bing image search and serves test images.

Each path gets a behaviour: an image, 404, a reset connection, a slow answer, 429 rate limiting (then the
image), an HTML page, an oversized body or a redirect; so can the search answer for one query. Nothing here
touches the network beyond the loopback interface.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image, ImageDraw


def make_image(
    seed: int,
    size: tuple[int, int] | None = None,
    fmt: str = "JPEG",
    mode: str = "RGB",
    exif_orientation: int | None = None,
) -> bytes:
    """A varied synthetic picture (gradient, shapes) encoded as ``fmt``; ``seed`` fixes its content."""
    rng = np.random.default_rng(seed)
    w, h = size or (int(rng.integers(64, 120)), int(rng.integers(48, 100)))
    base = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    base = base.resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(8, w // 2 + 9)), y0 + int(rng.integers(8, h // 2 + 9)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    im = base.convert(mode) if mode != "RGBA" else _with_alpha(base)
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _with_alpha(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    alpha = Image.new("L", im.size, 0)
    ImageDraw.Draw(alpha).ellipse((0, 0, im.size[0], im.size[1]), fill=255)
    rgba.putalpha(alpha)
    return rgba


@dataclass
class Route:
    """What a path answers: kind is image, 404, reset, slow, trickle, 429, html, big or redirect."""

    kind: str
    data: bytes = b""
    content_type: str = "image/jpeg"
    headers: dict[str, str] = field(default_factory=dict)  # image: more response headers
    location: str = ""  # redirect: where to, the request's query string appended
    delay: float = 0.0  # slow: seconds before answering; trickle: between the bytes of its body
    times: int = 0  # 429: how many requests are refused before the image is served
    retry_after: str = "0"
    size: int = 0  # big, trickle: body bytes
    declare_length: bool = True  # big: send Content-Length


class FakeServer:
    """Threaded HTTP server on a free loopback port; use as a context manager."""

    def __init__(self, bing_key: str = "test-key") -> None:
        self.routes: dict[str, Route] = {}
        self.results: dict[str, list[dict[str, str]]] = {}  # query -> [{url, page, licence, creator, title}]
        self.search_routes: dict[str, Route] = {}  # query -> what its search answers instead of results
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path with query, headers)
        self.bing_key = bing_key
        self.openverse_max_page = 1_000  # later pages answer 401, as Openverse does for anonymous clients
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add(self, path: str, route: Route) -> str:
        """Serve ``route`` at ``path``; return its full URL."""
        self.routes[path] = route
        return self.url(path)

    def image(self, path: str, data: bytes, content_type: str = "image/jpeg") -> str:
        return self.add(path, Route("image", data, content_type))


def _make_handler(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, data: object, status: int = 200) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            params = {k: v[0] for k, v in parse_qs(parts.query).items()}
            with server.lock:
                server.hits[parts.path] += 1
                hit = server.hits[parts.path]
                server.requests.append((self.path, dict(self.headers)))
            search = parts.path in ("/v1/images/", "/v7.0/images/search")
            route = server.search_routes.get(params.get("q", "")) if search else server.routes.get(parts.path)
            if route is None and parts.path == "/v1/images/":
                return self._openverse(params)
            if route is None and parts.path == "/v7.0/images/search":
                return self._bing(params)
            if route is None or route.kind == "404":
                return self._send(404, b"<html>not found</html>", "text/html")
            if route.kind == "redirect":
                location = route.location + (f"?{parts.query}" if parts.query else "")
                return self._send(302, b"", "text/plain", {"Location": location})
            if route.kind == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                return None
            if route.kind == "slow":
                time.sleep(route.delay)
            if route.kind == "429" and hit <= route.times:
                return self._send(429, b"slow down", "text/plain", {"Retry-After": route.retry_after})
            if route.kind == "html":
                return self._send(200, b"<!doctype html><html><body>a web page</body></html>", "text/html")
            if route.kind == "trickle":  # a byte at a time, each read well within a read timeout
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(route.size))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up
                    for _ in range(route.size):
                        self.wfile.write(b"\xff")
                        self.wfile.flush()
                        time.sleep(route.delay)
                return None
            if route.kind == "big":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                if route.declare_length:
                    self.send_header("Content-Length", str(route.size))
                self.end_headers()
                chunk = b"\xff" * 65536
                for _ in range(0, route.size, len(chunk)):
                    self.wfile.write(chunk)
                return None
            return self._send(200, route.data, route.content_type, route.headers)

        def _openverse(self, params: dict[str, str]) -> None:
            results = server.results.get(params.get("q", ""), [])
            page, size = int(params.get("page", 1)), int(params.get("page_size", 20))
            if page > server.openverse_max_page:
                return self._json({"detail": "Authentication credentials were not provided."}, 401)
            chunk = results[(page - 1) * size : page * size]
            self._json(
                {
                    "result_count": len(results),
                    "page_count": -(-len(results) // size),
                    "page": page,
                    "results": [
                        {
                            "url": r["url"],
                            "foreign_landing_url": r.get("page", ""),
                            "license": r.get("licence", "by"),
                            "license_version": "4.0",
                            "creator": r.get("creator", ""),
                            "title": r.get("title", ""),
                        }
                        for r in chunk
                    ],
                }
            )

        def _bing(self, params: dict[str, str]) -> None:
            if self.headers.get("Ocp-Apim-Subscription-Key") != server.bing_key:
                return self._json({"error": {"code": "401", "message": "Access denied"}}, 401)
            results = server.results.get(params.get("q", ""), [])
            offset, count = int(params.get("offset", 0)), int(params.get("count", 35))
            chunk = results[offset : offset + count]
            self._json(
                {
                    "_type": "Images",
                    "totalEstimatedMatches": len(results),
                    "nextOffset": offset + len(chunk),
                    "value": [
                        {"contentUrl": r["url"], "hostPageUrl": r.get("page", ""), "name": r.get("title", "")}
                        for r in chunk
                    ],
                }
            )
            return None

    return Handler


def run_cli(argv: list[str]) -> int:
    """Run one of the datatools commands (download, scrape, dedup) as the ``imgclf`` CLI would."""
    import argparse

    from imgclf.datatools.cli import register

    parser = argparse.ArgumentParser(prog="imgclf")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
