"""The REST service, tested over real HTTP: a uvicorn server on a loopback port, httpx clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import io
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from helpers import CHROMIUM, CHROMIUM_ARGS, count_concurrent_loads, make_bundle
from PIL import Image
from test_ui_api import Server

from imgclf.bundle import Bundle
from imgclf.config import Config
from imgclf.data.io import load_for_model
from imgclf.serving.app import create_app
from imgclf.serving.batching import MicroBatcher, NotRunning

try:  # the web page tests drive Debian's headless Chromium (.ci/install-browser installs both)
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    expect = sync_playwright = None

API_KEY = "test-key"
AUTH = {"X-API-Key": API_KEY}
LIMITS = {"max_upload_mb": 1.0, "max_images_per_request": 4, "max_image_pixels": 1_000_000}


def blob_image(seed: int, size: tuple[int, int] = (160, 120), fmt: str = "JPEG") -> bytes:
    """A small smooth colour image, encoded."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size (a decompression bomb as far as any header check can tell)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve-run")
    make_bundle(path)
    return path


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [blob_image(i, (160 + 8 * i, 120)) for i in range(16)]


@pytest.fixture(scope="module")
def reference(run_dir: Path, images: list[bytes], tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The bundle's own PyTorch probabilities for ``images`` (decoded from files, the pipeline's way)."""
    bundle = Bundle.load(run_dir)
    folder = tmp_path_factory.mktemp("ref-images")
    arrays = []
    for i, data in enumerate(images):
        (folder / f"{i}.jpg").write_bytes(data)
        arrays.append(load_for_model(folder / f"{i}.jpg", bundle.preprocess))
    with torch.inference_mode():
        return bundle.classifier_net()(torch.from_numpy(np.stack(arrays))).numpy()


@pytest.fixture(scope="module")
def base_url(run_dir: Path) -> Iterator[str]:
    """A real uvicorn server in a thread, on a free 127.0.0.1 port."""
    # fp32 to match the fp32 reference to 1e-3: precision auto serves bf16 on CPUs with AMX
    cfg = Config().updated(api_key=API_KEY, workers=1, max_batch=8, max_wait_ms=5.0, precision="fp32", **LIMITS)
    app = create_app(run_dir, cfg)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
        yield c


def check_prediction(pred: dict, probs: np.ndarray, top_k: int = 3) -> None:
    """A prediction agrees with the bundle's own probabilities and is well formed."""
    classes = ["cat", "dog", "fish"]
    scores = np.array([pred["scores"][c] for c in classes])
    assert np.abs(scores - probs).max() <= 1e-3
    assert pred["label"] == classes[int(np.argmax(probs))]
    assert pred["score"] == pytest.approx(float(probs.max()), abs=1e-3)
    assert scores.sum() == pytest.approx(1.0, abs=1e-4)
    assert pred["top_k"][0]["label"] == pred["label"]
    assert len(pred["top_k"]) == top_k
    assert [t["score"] for t in pred["top_k"]] == sorted((t["score"] for t in pred["top_k"]), reverse=True)


def test_healthz_model_and_docs(client: httpx.Client, run_dir: Path) -> None:
    bundle = Bundle.load(run_dir)
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model_id"] == bundle.model_id
    info = client.get("/v1/model").json()
    assert info["classes"] == ["cat", "dog", "fish"]
    assert info["backbone"] == "efficientnet_lite0" and info["resolution"] == 224
    assert info["classifier"] == "svm" and info["metrics"] == {"overall_accuracy": 0.5}
    assert info["runtime"] == "openvino" and info["precision"] == "fp32" and info["version"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/model", "/healthz", "/score"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/predict"]["post"]["requestBody"]["content"]
    for page in ("/docs", "/redoc"):  # the docs pages load their scripts from the server, not from a CDN
        html = client.get(page).text
        assert "://" not in html, page
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', html)
        assert any(a.endswith(".js") for a in assets), page
        for asset in assets:
            assert client.get(asset).status_code == 200, asset


def test_web_page_is_offline(client: httpx.Client) -> None:
    r = client.get("/", headers={})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "v1/predict" in r.text and "<script" in r.text and "drop" in r.text
    assert "://" not in r.text  # no CDN or other outside resource


@pytest.fixture
def web(base_url: str) -> Iterator[object]:
    """The web page in a fresh browser, its API key entered; no script error, nor a request for /favicon.ico
    (a 404 in the console). A browser per test: Playwright's event loop, while it runs, fails asyncio.run."""
    if sync_playwright is None or not CHROMIUM.exists():
        pytest.skip(f"the web page tests need playwright and {CHROMIUM} (run .ci/install-browser)")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 900, "height": 900})
        context.add_init_script(f"localStorage.setItem('imgclf-api-key', {API_KEY!r})")
        pg = context.new_page()
        pg.set_default_timeout(15_000)
        pg.on("filechooser", lambda _: None)  # file choosers caught from now on, not from a first expect on
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on(
            "console", lambda m: errors.append(m.text) if m.location.get("url", "").endswith("/favicon.ico") else None
        )
        pg.goto(base_url + "/")
        expect(pg.locator("#model")).to_contain_text("efficientnet_lite0")
        yield pg
        browser.close()
    assert not errors, errors


def jpeg(name: str, data: bytes) -> dict:
    return {"name": name, "mimeType": "image/jpeg", "buffer": data}


def result_line(client: httpx.Client, data: bytes) -> str:
    """The page's line for an image: the label and score the service gives it."""
    p = client.post("/v1/predict", files={"file": ("a.jpg", data, "image/jpeg")}).json()["predictions"][0]
    return f"{p['label']} ({100 * p['score']:.1f} %)"


def pick(pg: object, *files: dict) -> None:
    """Choose ``files`` in the page's file chooser."""
    with pg.expect_file_chooser() as chooser:  # type: ignore[attr-defined]
        pg.locator("#drop").click()  # type: ignore[attr-defined]
    chooser.value.set_files(list(files))


# the answer for a file named slow*.jpg comes 1 s late, whatever the page does meanwhile
SLOW_ANSWER = """() => {
  const realFetch = window.fetch;
  window.fetch = async (url, opts = {}) => {
    const file = opts.body instanceof FormData ? opts.body.get("file") : null;
    if (!file || !file.name.startsWith("slow")) return realFetch(url, opts);
    const answer = await realFetch(url, { ...opts, signal: undefined });
    await new Promise((done) => setTimeout(done, 1000));
    window.slowAnswered = true;
    return answer;
  };
}"""


def test_web_page_shows_the_answer_for_the_latest_pick_only(
    web: object, client: httpx.Client, images: list[bytes]
) -> None:
    """A slow answer for an earlier file must not show under the file picked since."""
    pg, body = web, web.locator("body")  # type: ignore[attr-defined]
    slow, fast = result_line(client, images[0]), result_line(client, images[1])
    assert slow != fast
    pg.evaluate(SLOW_ANSWER)  # type: ignore[attr-defined]
    pick(pg, jpeg("slow.jpg", images[0]))
    pick(pg, jpeg("fast.jpg", images[1]))
    expect(body).to_contain_text(fast)
    pg.wait_for_function("window.slowAnswered")  # type: ignore[attr-defined]
    pg.wait_for_timeout(300)  # type: ignore[attr-defined]
    expect(body).to_contain_text(fast)
    expect(body).not_to_contain_text(slow)
    expect(body).not_to_contain_text("slow.jpg")


def test_web_page_classifies_each_dropped_file(web: object, client: httpx.Client, images: list[bytes]) -> None:
    files = {f"drop{i}.jpg": images[i] for i in (2, 3, 4)}
    web.evaluate(  # type: ignore[attr-defined]
        """(files) => {
          const dt = new DataTransfer();
          for (const [name, b64] of files) {
            dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, { type: "image/jpeg" }));
          }
          const drop = document.getElementById("drop");
          for (const type of ["dragover", "drop"]) drop.dispatchEvent(new DragEvent(type, { dataTransfer: dt, cancelable: true }));
        }""",
        [[name, base64.b64encode(data).decode()] for name, data in files.items()],
    )
    body = web.locator("body")  # type: ignore[attr-defined]
    for name, data in files.items():
        expect(body).to_contain_text(name)
        expect(body).to_contain_text(result_line(client, data))


def test_web_page_shows_the_highest_scores_of_many_classes(web: object) -> None:
    """120 classes drew 120 rows an image (5 images: a page 13,807 px tall): the 10 highest, then the rest summed."""
    rows = web.evaluate(  # type: ignore[attr-defined]
        """() => {
          const chart = document.createElement("div"), scores = {};
          for (let i = 0; i < 15; i++) scores[`c${i}`] = (i + 1) / 120;
          showScores(chart, scores, "c14");
          return [...chart.children].map((row) => row.textContent);
        }"""
    )
    assert len(rows) == 11 and rows[0] == "c1412.5 %" and rows[9].startswith("c5")
    assert rows[10] == "5 other classes: 12.5 % together"  # c0...c4: (1 + 2 + 3 + 4 + 5) / 120


def test_web_page_takes_the_same_file_twice(web: object, client: httpx.Client, images: list[bytes]) -> None:
    """The chooser is emptied after each pick: choosing the same file again (say after entering the API key)
    is a change, classified again."""
    pick(web, jpeg("again.jpg", images[5]))
    expect(web.locator("body")).to_contain_text(result_line(client, images[5]))  # type: ignore[attr-defined]
    assert web.eval_on_selector("#pick", "input => input.value") == ""  # type: ignore[attr-defined]


def test_web_page_picker_works_from_the_keyboard(web: object, client: httpx.Client, images: list[bytes]) -> None:
    pg = web
    pg.keyboard.press("Tab")  # type: ignore[attr-defined]
    assert pg.evaluate("document.activeElement.closest('#drop') !== null")  # type: ignore[attr-defined]
    for key in ("Enter", " "):
        with pg.expect_file_chooser(timeout=3_000) as chooser:  # type: ignore[attr-defined]
            pg.keyboard.press(key)  # type: ignore[attr-defined]
    chooser.value.set_files([jpeg("typed.jpg", images[6])])
    expect(pg.locator("body")).to_contain_text(result_line(client, images[6]))  # type: ignore[attr-defined]


def test_predict_multipart_one_and_several(client: httpx.Client, images: list[bytes], reference: np.ndarray) -> None:
    r = client.post("/v1/predict", files={"file": ("a.jpg", images[0], "image/jpeg")})
    assert r.status_code == 200
    body = r.json()
    assert body["model_id"] and body["server_time_ms"] > 0 and len(body["predictions"]) == 1
    check_prediction(body["predictions"][0], reference[0])
    files = [("files", (f"{i}.jpg", images[i], "image/jpeg")) for i in (3, 1, 2)]
    preds = client.post("/v1/predict", files=files).json()["predictions"]
    for pred, i in zip(preds, (3, 1, 2), strict=True):
        check_prediction(pred, reference[i])


def test_predict_base64_json_and_raw_body(client: httpx.Client, images: list[bytes], reference: np.ndarray) -> None:
    b64 = [base64.b64encode(images[i]).decode() for i in (4, 5)]
    b64[1] = "data:image/jpeg;base64," + b64[1]
    preds = client.post("/v1/predict", json={"images": b64}).json()["predictions"]
    check_prediction(preds[0], reference[4])
    check_prediction(preds[1], reference[5])
    r = client.post("/v1/predict", content=images[6], headers={"content-type": "image/jpeg"})
    check_prediction(r.json()["predictions"][0], reference[6])
    one = client.post("/v1/predict", json={"image": base64.b64encode(images[7]).decode()}).json()["predictions"]
    assert len(one) == 1
    check_prediction(one[0], reference[7])
    both = client.post("/v1/predict", json={"image": b64[0], "images": b64})
    assert both.status_code == 400 and both.json()["error"] == "bad_json"
    # the URL-safe alphabet (JavaScript's and JWT's), without padding: was "not valid base64"
    url_safe = [base64.urlsafe_b64encode(images[i]).decode().rstrip("=") for i in (4, 5)]
    assert any(c in "".join(url_safe) for c in "-_")
    preds = client.post("/v1/predict", json={"images": url_safe}).json()["predictions"]
    check_prediction(preds[0], reference[4])
    check_prediction(preds[1], reference[5])


def test_tutorial_compat_route_returns_real_json(
    client: httpx.Client, images: list[bytes], reference: np.ndarray
) -> None:
    doc = {"input_df": [{"image base64 string": base64.b64encode(images[7]).decode()}]}
    r = client.post("/score", json=doc)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert isinstance(body, dict)  # an object, not a JSON string holding JSON
    check_prediction(body["predictions"][0], reference[7])


class Chunks:
    """A body of ``total`` bytes sent in chunks, without Content-Length (re-iterable)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.total // 65536 + 1):
            yield b"\xff" * 65536


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def _one(name: str, data: bytes) -> dict:
    return {"files": {"file": (name, data, "application/octet-stream")}}


BAD_REQUESTS = {
    "not_an_image": (_one("notes.jpg", b"this is text, not a picture"), 422, "bad_image"),
    "corrupt_jpeg": (_one("cut.jpg", blob_image(1, (640, 480))[:2000]), 422, "bad_image"),
    "empty_file": (_one("empty.jpg", b""), 422, "bad_image"),
    "pixel_limit": (_one("big.png", _png((1200, 1000))), 422, "bad_image"),
    "decompression_bomb": (_one("bomb.png", png_header_only(30000, 30000)), 422, "bad_image"),
    "body_too_large_by_length": (
        {"content": b"\xff" * 1_500_000, "headers": {"content-type": "image/jpeg"}},
        413,
        "body_too_large",
    ),
    "body_too_large_chunked": (
        {"content": Chunks(1_500_000), "headers": {"content-type": "image/jpeg"}},
        413,
        "body_too_large",
    ),
    "too_many_files": (
        {"files": [("files", (f"{i}.jpg", blob_image(i), "image/jpeg")) for i in range(5)]},
        413,
        "too_many_images",
    ),
    "too_many_base64": (
        {"json": {"images": [base64.b64encode(blob_image(i)).decode() for i in range(5)]}},
        413,
        "too_many_images",
    ),
    "malformed_json": ({"content": b'{"images": [', "headers": {"content-type": "application/json"}}, 400, "bad_json"),
    "deeply_nested_json": (
        {"content": b"[" * 200_000, "headers": {"content-type": "application/json"}},
        400,
        "bad_json",
    ),
    "json_integer_over_4300_digits": (  # Python refuses to parse it with a ValueError: was a 500
        {"content": b'{"images": [' + b"9" * 5000 + b"]}", "headers": {"content-type": "application/json"}},
        400,
        "bad_json",
    ),
    "json_without_images": ({"json": {"pictures": []}}, 400, "bad_json"),
    "json_images_not_strings": ({"json": {"images": [42]}}, 400, "bad_json"),
    "bad_base64": ({"json": {"images": ["not base64 at all!"]}}, 400, "bad_base64"),
    "no_images": ({"json": {"images": []}}, 400, "no_images"),
    "multipart_without_file": ({"data": {"note": "hello"}, "files": {"other": ("x.txt", b"x")}}, 400, "bad_multipart"),
    "multipart_unended": (  # the parser took the part that never ends for no part: "no_images"
        {"content": b"--x\r\nfoo", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        400,
        "bad_multipart",
    ),
    "unsupported_content_type": (
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_json_and_server_lives(client: httpx.Client, case: str) -> None:
    kwargs, status, code = BAD_REQUESTS[case]
    r = client.post("/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and body["detail"]
    assert client.get("/healthz").json()["status"] == "ok"


def test_bad_requests_elsewhere(client: httpx.Client) -> None:
    r = client.post("/score", json={"input_df": [{"image": "abc"}]})
    assert r.status_code == 400 and "image base64 string" in r.json()["detail"]
    nested = client.post("/score", content=b"[" * 200_000, headers={"content-type": "application/json"})
    assert nested.status_code == 400 and nested.json()["detail"] == "request body is JSON nested too deeply"
    assert client.get("/no/such/route").json()["error"] == "http_error"
    wrong_method = client.get("/v1/predict")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert "oversized" in client.post("/v1/predict", **BAD_REQUESTS["pixel_limit"][0]).json()["detail"]


def test_too_many_json_images_are_refused_before_any_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20 MB body of millions of empty strings was decoded, one by one, on the event loop (20 s in which the
    server answered nobody) before the count was checked: the count is now checked first, on both routes."""
    import imgclf.serving.inputs as inputs

    decoded: list[str] = []
    monkeypatch.setattr(inputs, "decode_base64", lambda text, name: decoded.append(name))
    many = json.dumps({"images": [""] * 100_000}).encode()
    rows = json.dumps({"input_df": [{inputs.TUTORIAL_KEY: ""}] * 100_000}).encode()
    for parse, body in ((inputs.images_from_json, many), (inputs.images_from_tutorial_json, rows)):
        with pytest.raises(inputs.ApiError) as refused:
            parse(body, 16)
        assert refused.value.status == 413 and str(refused.value) == "100000 images in one request; limit 16"
    assert decoded == []


def test_json_is_parsed_off_the_event_loop(run_dir: Path, images: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20 MB JSON body was parsed on the event loop: /healthz waited 5 s (a liveness probe's limit is 1 s)."""
    import asyncio

    import imgclf.serving.inputs as inputs

    on_loop: list[bool] = []
    parse = inputs.parse_json

    def parse_where(body: bytes) -> object:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop runs in this thread
            on_loop.append(False)
        return parse(body)

    monkeypatch.setattr(inputs, "parse_json", parse_where)
    b64 = base64.b64encode(images[0]).decode()
    with TestClient(create_app(run_dir, Config().updated(workers=1, precision="fp32"))) as c:
        assert c.post("/v1/predict", json={"images": [b64]}).status_code == 200
        assert c.post("/score", json={"input_df": [{inputs.TUTORIAL_KEY: b64}]}).status_code == 200
    assert on_loop == [False, False]


def test_every_unusable_image_of_a_request_is_named(client: httpx.Client, images: list[bytes]) -> None:
    """All or nothing, but the 422 names each bad image with why, for base64 JSON and multipart alike."""
    batch = [images[0], blob_image(1, (640, 480))[:2000], images[1], b"this is text, not a picture"]
    r = client.post("/v1/predict", json={"images": [base64.b64encode(b).decode() for b in batch]})
    assert r.status_code == 422 and r.json()["error"] == "bad_image"
    assert re.fullmatch(r"images\[1\]: truncated .+; images\[3\]: not an image .+", r.json()["detail"]), r.text
    names = ["good.jpg", "cut.jpg", "fine.jpg", "notes.jpg"]
    files = [("files", (n, b, "image/jpeg")) for n, b in zip(names, batch, strict=True)]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 422 and r.json()["error"] == "bad_image"
    assert re.fullmatch(r"cut\.jpg: truncated .+; notes\.jpg: not an image .+", r.json()["detail"]), r.text


def test_api_key(base_url: str, images: list[bytes]) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as anonymous:
        for method, path in (("POST", "/v1/predict"), ("GET", "/v1/model"), ("POST", "/score")):
            r = anonymous.request(method, path, files={"file": ("a.jpg", images[0])} if method == "POST" else None)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        r = anonymous.get("/v1/model", headers={"X-API-Key": "wrong"})
        assert r.status_code == 401
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/").status_code == 200
        assert anonymous.get("/v1/model", headers=AUTH).status_code == 200


@pytest.mark.parametrize("key", ["", "  ", "clé", "tab\tkey", " key "])
def test_an_api_key_nobody_could_send_is_refused_at_start(run_dir: Path, key: str) -> None:
    """An empty key (an unset variable) turned authentication off; one an HTTP header cannot carry let nobody in."""
    with pytest.raises(ValueError, match=r"empty API key|must be printable ASCII"):
        create_app(run_dir, Config().updated(api_key=key))


def test_serve_refuses_an_empty_api_key(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from imgclf.cli import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("served without authentication"))
    assert main(["serve", str(run_dir), "--port", str(_free_port()), "--api-key", ""]) == 2
    assert "an empty API key (an unset variable?)" in capsys.readouterr().err


def test_serve_takes_the_api_key_from_the_environment(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key on the command line is seen by every local user (ps); $IMGCLF_API_KEY is not, and --api-key wins."""
    from imgclf.cli import main
    from imgclf.serving import app as serving_app

    keys: list[str | None] = []
    monkeypatch.setattr(serving_app, "create_app", lambda bundle, cfg, **k: keys.append(cfg.serve.api_key))
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: None)
    monkeypatch.setenv("IMGCLF_API_KEY", "from-env")
    assert main(["serve", str(run_dir), "--port", str(_free_port())]) == 0
    assert main(["serve", str(run_dir), "--port", str(_free_port()), "--api-key", "from-flag"]) == 0
    assert keys == ["from-env", "from-flag"]
    monkeypatch.setenv("IMGCLF_API_KEY", "")  # set but empty: refused, never an open service
    assert main(["serve", str(run_dir), "--port", str(_free_port())]) == 2
    assert "$IMGCLF_API_KEY is set but empty (an unset variable?)" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--port", str(_free_port()), "--api-key", "from-flag"]) == 0  # the flag's
    assert keys[-1] == "from-flag"


def test_serve_refuses_images_over_the_runs_pixel_limit_as_predict_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run trained with --max-image-pixels 200000: predict refused a 600x800 image, the server scored it
    (the guard was dropped where untrusted images arrive); --max-image-pixels still overrides."""
    from imgclf.cli import main
    from imgclf.serving import app as serving_app

    make_bundle(tmp_path / "run", {"data": {"max_image_pixels": 200_000}})
    limits: list[int] = []
    monkeypatch.setattr(serving_app, "create_app", lambda bundle, cfg, **k: limits.append(cfg.data.max_image_pixels))
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: None)
    assert main(["serve", str(tmp_path / "run"), "--port", str(_free_port())]) == 0
    assert main(["serve", str(tmp_path / "run"), "--port", str(_free_port()), "--max-image-pixels", "5000000"]) == 0
    assert limits == [200_000, 5_000_000]


def test_a_server_made_in_python_keeps_the_key_and_the_runs_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`create_app(run)` served without a key while $IMGCLF_API_KEY was set, and dropped the run's pixel limit:
    only `imgclf serve` applied them. Settings given in Python still win."""
    from imgclf.serving.app import serving_config

    bundle = make_bundle(tmp_path / "run", {"data": {"max_image_pixels": 200_000}})
    monkeypatch.setenv("IMGCLF_API_KEY", "from-env")
    cfg = serving_config(bundle, Config().updated(workers=1))
    assert (cfg.serve.api_key, cfg.data.max_image_pixels, cfg.features.workers) == ("from-env", 200_000, 1)
    cfg = serving_config(bundle, Config().updated(api_key="mine", max_image_pixels=10**6))
    assert (cfg.serve.api_key, cfg.data.max_image_pixels) == ("mine", 10**6)
    monkeypatch.setenv("IMGCLF_API_KEY", " ")
    with pytest.raises(ValueError, match="set but empty"):
        serving_config(bundle)
    monkeypatch.setenv("IMGCLF_API_KEY", "from-env")
    big = io.BytesIO()
    Image.new("RGB", (600, 400), "red").save(big, "JPEG")
    with TestClient(create_app(tmp_path / "run", Config().updated(workers=1, precision="fp32"))) as c:
        assert c.post("/v1/predict", files={"file": ("a.jpg", big.getvalue(), "image/jpeg")}).status_code == 401
        sent = c.post(
            "/v1/predict", files={"file": ("a.jpg", big.getvalue(), "image/jpeg")}, headers={"X-API-Key": "from-env"}
        )
    assert sent.status_code == 422 and "oversized image (600x400)" in sent.json()["detail"], sent.text


def test_serving_on_all_addresses_without_a_key_is_warned_about(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`docker run -e IMGCLF_API_KEY` with the variable not exported served 0.0.0.0 open, without a word."""
    from imgclf.cli import main
    from imgclf.serving import app as serving_app

    monkeypatch.setattr(serving_app, "create_app", lambda *a, **k: None)
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: None)
    monkeypatch.delenv("IMGCLF_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert main(["serve", str(run_dir), "--port", str(_free_port())]) == 0
        assert "without an API key" not in caplog.text  # 127.0.0.1: this machine's users only
        assert main(["serve", str(run_dir), "--host", "0.0.0.0", "--port", str(_free_port())]) == 0
    assert "warning: serving on 0.0.0.0 without an API key: anyone who can reach port" in caplog.text


def test_the_api_docs_name_no_class_and_no_backbone(client: httpx.Client) -> None:
    """/openapi.json needs no key (/v1/model does), and /redoc renders its description as HTML: a class folder
    named <img src=x onerror=...> ran its script there."""
    with httpx.Client(base_url=client.base_url) as anonymous:
        schema = anonymous.get("/openapi.json")
    assert schema.status_code == 200
    assert not re.search(r"\b(cat|dog|fish)\b|efficientnet", schema.text), schema.json()["info"]


def test_every_answer_forbids_framing(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clickjacking: no page of another site may show the web page (or any other) in a frame."""
    from imgclf.serving.app import ModelService

    answers = [client.get(p) for p in ("/", "/healthz", "/v1/model", "/docs", "/redoc", "/openapi.json", "/nope")]
    answers += [client.get("/v1/model", headers={"X-API-Key": "wrong"}), client.post("/v1/predict", json={})]
    monkeypatch.setattr(ModelService, "info", lambda self: 1 / 0)
    answers.append(client.get("/v1/model"))
    assert answers[-1].status_code == 500
    for r in answers:
        assert r.headers["x-frame-options"] == "DENY", r.url
        assert r.headers["content-security-policy"] == "frame-ancestors 'none'", r.url
        assert r.headers["x-content-type-options"] == "nosniff", r.url


def test_a_client_sending_slowly_is_cut_off(run_dir: Path) -> None:
    """A body announced as 1000 bytes and sent a byte at a time held the connection for ever: it gets 408 when
    it has not all come within request_timeout_s, and the connection is closed."""
    app = create_app(run_dir, Config().updated(workers=1, precision="fp32", request_timeout_s=0.5))
    with Server(app) as server, socket.create_connection(server.socket.getsockname(), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n")
        s.sendall(b"Content-Length: 1000\r\n\r\n")
        for _ in range(3):  # then nothing more: the server must not wait for the rest
            s.sendall(b"x")
            time.sleep(0.1)
        answer = b""
        while chunk := s.recv(4096):  # until the server closes the connection (a timeout error otherwise)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"error":"request_timeout"' in answer, answer
    assert 0.5 <= time.monotonic() - t0 < 5


def test_concurrent_requests_are_batched_and_correct(
    client: httpx.Client, images: list[bytes], reference: np.ndarray
) -> None:
    before = client.get("/healthz").json()

    def ask(i: int) -> tuple[int, httpx.Response]:
        k = i % len(images)
        return k, client.post("/v1/predict", files={"file": (f"{k}.jpg", images[k], "image/jpeg")})

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, range(64)))
    for k, r in answers:
        assert r.status_code == 200, r.text
        check_prediction(r.json()["predictions"][0], reference[k])
    after = client.get("/healthz").json()
    assert after["images"] - before["images"] == 64
    assert after["batches"] - before["batches"] < 64  # several requests shared forward passes
    assert 1 < after["largest_batch"] <= 8


def test_example_client(base_url: str, images: list[bytes], reference: np.ndarray, tmp_path: Path) -> None:
    """examples/client.py (standard library only) prints the label, score and both timings."""
    (tmp_path / "a.jpg").write_bytes(images[2])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    client = Path(__file__).resolve().parents[1] / "examples" / "client.py"
    label = ["cat", "dog", "fish"][int(np.argmax(reference[2]))]
    for extra in (["--api-key", API_KEY], ["--tutorial"]):  # the second takes the key from $IMGCLF_API_KEY
        proc = subprocess.run(
            [
                sys.executable,
                str(client),
                str(tmp_path / "a.jpg"),
                str(tmp_path / "bad.jpg"),
                "--url",
                base_url,
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "IMGCLF_API_KEY": API_KEY},
        )
        assert proc.returncode == 1  # one of the two images failed
        found = re.search(rf"a\.jpg: {label} \((0\.\d+)\)", proc.stdout)
        assert found and float(found[1]) == pytest.approx(reference[2].max(), abs=2e-3), proc.stdout
        assert re.search(r"round trip [\d.]+ ms, of which [\d.]+ ms in the server", proc.stdout)
        assert re.search(r"bad\.jpg: HTTP 422: (images|input_df)\[0\]: ", proc.stdout)


def test_micro_batcher_batches_and_survives_model_errors() -> None:
    sizes: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        if (batch == 255).any():
            raise RuntimeError("boom")
        time.sleep(0.02)
        return batch.reshape(len(batch), -1)[:, :2].astype(np.float32)

    async def scenario() -> None:
        batcher = MicroBatcher(model, max_batch=4, max_wait_ms=50)
        await batcher.start()
        try:
            images = [np.full((2, 2, 3), i, np.uint8) for i in range(10)]
            outs = await asyncio.gather(*(batcher.infer([im]) for im in images))
            assert [int(o[0, 0]) for o in outs] == list(range(10))
            assert max(sizes) == 4 and len(sizes) < 10
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.infer([np.full((2, 2, 3), 255, np.uint8)])
            assert (await batcher.infer([images[3]]))[0, 0] == 3  # the worker survived the failure
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command(run_dir: Path, images: list[bytes], reference: np.ndarray, base_url: str) -> None:
    """``imgclf serve`` in a subprocess, in bf16 (what precision auto picks on CPUs with AMX)."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "imgclf.cli",
        "serve",
        str(run_dir),
        "--port",
        str(port),
        "--workers",
        "1",
        "--max-batch",
        "2",
        "--precision",
        "bf16",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "imgclf serve did not start"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert httpx.get(f"{url}/v1/model", timeout=10).json()["precision"] == "bf16"
        r = httpx.post(f"{url}/v1/predict", files={"file": ("a.jpg", images[0])}, timeout=60)
        assert r.status_code == 200
        scores = r.json()["predictions"][0]["scores"]
        assert np.abs(np.array([scores[c] for c in ("cat", "dog", "fish")]) - reference[0]).max() < 0.05
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_request_that_times_out_leaves_the_queue() -> None:
    """A client given up on (503 after request_timeout_s) costs no forward pass: its images are dropped."""
    seen: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        seen.extend(int(v) for v in batch[:, 0, 0, 0])
        time.sleep(0.3)
        return batch.reshape(len(batch), -1)[:, :2].astype(np.float32)

    async def scenario() -> None:
        batcher = MicroBatcher(model, max_batch=1, max_wait_ms=0)
        await batcher.start()
        try:
            first = asyncio.create_task(batcher.infer([np.full((2, 2, 3), 1, np.uint8)]))
            await asyncio.sleep(0.05)  # its forward pass is running
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher.infer([np.full((2, 2, 3), 2, np.uint8)]), 0.1)
            await first
            assert (await batcher.infer([np.full((2, 2, 3), 3, np.uint8)]))[0, 0] == 3
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert seen == [1, 3]


def test_stop_fails_the_running_and_queued_images() -> None:
    """stop() answers every waiting caller: the image being scored and those queued behind it."""

    def model(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.3)
        return batch.reshape(len(batch), -1)[:, :2].astype(np.float32)

    async def scenario() -> None:
        batcher = MicroBatcher(model, max_batch=1, max_wait_ms=0)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.infer([np.full((2, 2, 3), i, np.uint8)])) for i in range(3)]
        await asyncio.sleep(0.05)  # the first forward pass is running, two images wait in the queue
        await batcher.stop()
        _, pending = await asyncio.wait(tasks, timeout=1)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} of 3 callers still wait after stop()"
        for task in tasks:
            with pytest.raises(NotRunning):
                task.result()
        with pytest.raises(NotRunning):
            await batcher.infer([np.zeros((2, 2, 3), np.uint8)])

    asyncio.run(scenario())


def test_large_images_are_decoded_within_a_pixel_budget(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One 100 Mpx PNG took 1.2 GB while decoded, and each decoding thread (one a core) could hold one: the
    pixels decoded at once are now at most --max-image-pixels; smaller images still decode side by side."""
    peak = count_concurrent_loads(monkeypatch, 0.1)
    cfg = Config().updated(workers=4, precision="fp32", max_image_pixels=100_000)
    png = io.BytesIO()
    Image.new("RGB", (400, 200), (200, 30, 30)).save(png, "PNG")  # 80,000 pixels: two do not fit at once
    small = io.BytesIO()
    Image.new("RGB", (200, 100), (30, 30, 200)).save(small, "PNG")  # 20,000: four fit
    with TestClient(create_app(run_dir, cfg)) as c:
        for data, alone in ((png, True), (small, False)):
            peak[0] = 0
            files = [("file", (f"{i}.png", data.getvalue(), "image/png")) for i in range(4)]
            r = c.post("/v1/predict", files=files)
            assert r.status_code == 200 and len(r.json()["predictions"]) == 4, r.text
            assert peak[0] == 1 if alone else peak[0] >= 2, peak[0]


def test_memory_of_a_large_image_goes_back_to_the_system(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server's memory stayed at 3.2 GB after four 100 Mpx PNGs (each decoding thread's malloc arena kept its
    image); after an image over TRIM_AFTER_PIXELS, decoded or failed, the freed memory is handed back."""
    from imgclf.serving import inputs

    budget, trimmed = inputs.DecodingBudget(100_000), []
    monkeypatch.setattr(inputs, "TRIM_AFTER_PIXELS", 50_000)
    monkeypatch.setattr(inputs, "release_freed_memory", lambda: trimmed.append(budget._free))
    pre = Bundle.load(run_dir).preprocess
    pngs = []
    for size in ((400, 200), (200, 100)):  # 80,000 pixels, then 20,000
        png = io.BytesIO()
        Image.new("RGB", size).save(png, "PNG")
        pngs.append(png.getvalue())
        assert inputs.decode_image(inputs.ImageInput(pngs[-1], "x.png"), pre, 100_000, budget).ndim == 3
    assert trimmed == [20_000]  # once, for the large image, while its 80,000 pixels were held
    with pytest.raises(inputs.ApiError):  # the large one cut short: decoding fails, the memory goes back all the same
        inputs.decode_image(inputs.ImageInput(pngs[0][: len(pngs[0]) // 2], "cut.png"), pre, 100_000, budget)
    assert trimmed == [20_000, 20_000]


def test_a_busy_server_answers_503(run_dir: Path, images: list[bytes]) -> None:
    cfg = Config().updated(workers=1, precision="fp32", request_timeout_s=1e-9)
    with TestClient(create_app(run_dir, cfg)) as slow:
        r = slow.post("/v1/predict", files={"file": ("a.jpg", images[0], "image/jpeg")})
        assert r.status_code == 503 and r.json()["error"] == "timeout", r.text
        assert "not answered within 1e-09 s: the server is busy" in r.json()["detail"]
        assert slow.get("/healthz").json()["images"] == 0


def test_an_app_started_twice_serves_both_times(run_dir: Path, images: list[bytes]) -> None:
    """Each lifespan start gets fresh thread pools; a request after the last stop gets 503, not 500."""
    app = create_app(run_dir, Config().updated(workers=1, precision="fp32"))
    file = {"file": ("a.jpg", images[0], "image/jpeg")}
    for _ in range(2):  # e.g. two TestClient blocks, or uvicorn running the lifespan again
        with TestClient(app, raise_server_exceptions=False) as client:
            r = client.post("/v1/predict", files=file)
            assert r.status_code == 200, r.text
    r = client.post("/v1/predict", files=file)
    assert r.status_code == 503 and r.json()["error"] == "not_running", r.text


def test_a_run_trained_with_flip_tta_is_served_and_exported_with_it(
    tmp_path: Path, images: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its head was fitted on mirror-averaged features: the server and the exported file average them too,
    so they score as predict does (the server scored each image once, and ignored --flip-tta)."""
    from imgclf.backbones import create_backbone
    from imgclf.export import export_model
    from imgclf.heads.linear import LinearHead
    from imgclf.pipeline import predict

    flipped = tmp_path / "flipped"
    w = np.random.default_rng(0).normal(0, 4, (3, 1280)).astype(np.float32)
    Bundle(
        ["cat", "dog", "fish"],
        create_backbone("efficientnet_lite0", resolution=64).spec(),  # small: the mirror doubles the work
        LinearHead(w, np.zeros(3, np.float32), True),
        config={"features": {"flip_tta": True, "workers": 1, "cache_dir": str(tmp_path / "c")}},
    ).save(flipped)
    (tmp_path / "a.jpg").write_bytes(images[3])
    classes, (expected,) = predict(flipped, tmp_path / "a.jpg")
    # a configuration passed in that does not mention flip_tta (a notebook's Config()) still follows the run
    cfg = Config().updated(workers=1, precision="fp32", serve_runtime="torch", max_batch=1, cache_dir=tmp_path / "c")
    _, (same,) = predict(flipped, tmp_path / "a.jpg", cfg)
    _, (plain,) = predict(flipped, tmp_path / "a.jpg", cfg, flip_tta=False)
    assert np.abs(same.scores - expected.scores).max() <= 1e-5 < np.abs(plain.scores - expected.scores).max()
    import imgclf.serving.app

    monkeypatch.setattr(imgclf.serving.app, "resolve_precision", lambda *a, **k: "fp32")  # not bf16 on AMX
    for app in (create_app(flipped), create_app(flipped, cfg)):  # by default as the run was trained
        with TestClient(app) as c:
            got = c.post("/v1/predict", files={"file": ("a.jpg", images[3], "image/jpeg")}).json()
        check_prediction(got["predictions"][0], expected.scores)
    with TestClient(create_app(flipped, cfg, flip_tta=False)) as c:  # --no-flip-tta: once
        once = c.post("/v1/predict", files={"file": ("a.jpg", images[3], "image/jpeg")}).json()["predictions"][0]
    assert max(abs(once["scores"][k] - s) for k, s in zip(classes, expected.scores, strict=True)) > 1e-3
    result = export_model(flipped, "torchscript", tmp_path / "m.pt")
    assert '"flip_tta": true' in result.sidecar.read_text()
    module = torch.jit.load(str(tmp_path / "m.pt"))
    bundle = Bundle.load(flipped)
    x = torch.from_numpy(load_for_model(tmp_path / "a.jpg", bundle.preprocess)[None].copy())
    with torch.inference_mode():
        assert np.abs(module(x).numpy()[0] - expected.scores).max() <= 1e-3


@contextlib.contextmanager
def _plain_server(protocol: type[asyncio.Protocol], endpoint: Any = None) -> Iterator[tuple[int, uvicorn.Server]]:
    """A uvicorn server of a one-route app (``endpoint``, else one answering "ok") on ``protocol``, in a thread;
    yields its port and the server."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    app = Starlette(routes=[Route("/", endpoint or (lambda _: PlainTextResponse("ok")))])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=protocol))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _closed_within(conn: socket.socket, seconds: float) -> bool:
    conn.settimeout(seconds)
    try:
        return conn.recv(100) == b""
    except TimeoutError:
        return False


def test_connections_whose_headers_never_end_are_closed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One client holding connections that never finish their headers (or send nothing) kept them for ever:
    20,000 of them reached the file limit and shut everyone out. Headers now have the request timeout, and
    the connections open at once stay below the file limit."""
    from imgclf.serving import security

    with _plain_server(security.http_protocol(0.5)) as (port, _):
        stalled, silent = socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        assert _closed_within(stalled, 5) and _closed_within(silent, 5)
        with socket.create_connection(("127.0.0.1", port)) as ok:  # a whole request is answered, twice
            for _ in range(2):
                ok.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answer = b""
                while not answer.endswith(b"\r\n\r\nok"):
                    answer += ok.recv(1000)
                assert answer.startswith(b"HTTP/1.1 200")
    monkeypatch.setattr(security.resource, "getrlimit", lambda _: (100, 100))  # room for 75 connections
    with caplog.at_level(logging.WARNING, logger="imgclf"), _plain_server(security.http_protocol(30)) as (port, _):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(90)]
        time.sleep(1)
        closed = sum(_closed_within(c, 0.01) for c in held)
        assert 10 <= closed <= 15, closed  # those over 75 (the server counts its own connections as they come)
        for c in held:
            c.close()
    assert caplog.text.count("75 connections open at once, the most this server holds") == 1  # once a minute


def test_a_refused_body_size_is_not_rounded_below_the_limit() -> None:
    """`--max-upload-mb 0.01`: "request body of 0.0 MB exceeds the limit of 0.01 MB" (and a body of 20.004 MB
    "20 MB" over a limit of 20 MB): the sizes are given in bytes."""
    from starlette.requests import Request

    from imgclf.serving.inputs import ApiError, read_body

    scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"12000")]}
    with pytest.raises(ApiError, match=r"request body of 12,000 bytes exceeds the limit of 0\.01 MB \(10,000 bytes\)"):
        asyncio.run(read_body(Request(scope), 10_000, 5.0))


def test_a_small_open_files_limit_is_raised_for_the_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """At macOS's soft limit of 256 the server held 64 connections and reset the rest without a word: the soft
    limit is raised to the hard one where it may be."""
    from imgclf.serving import security

    raised: list[tuple[int, int]] = []
    monkeypatch.setattr(security.resource, "getrlimit", lambda _: (256, 4096))
    monkeypatch.setattr(security.resource, "setrlimit", lambda _, limits: raised.append(limits))
    assert security._connection_limit() == 4096 - 256 and raised == [(4096, 4096)]

    def refuse(*_: object) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(security.resource, "setrlimit", refuse)
    assert security._connection_limit() == 256 - 64  # kept: a quarter for the server's own files


def test_answers_given_while_stopping_say_that_the_connection_closes() -> None:
    """uvicorn closes a connection after the answer it gives while stopping, but the answer did not say so: a
    client keeping the connection alive sent its next request into the closed socket (broken pipe)."""
    from starlette.responses import PlainTextResponse

    from imgclf.serving import security

    started = threading.Event()

    async def slow(_: object) -> PlainTextResponse:
        started.set()
        await asyncio.sleep(0.3)
        return PlainTextResponse("ok")

    with _plain_server(security.http_protocol(30), slow) as (port, server):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        assert started.wait(5)
        server.should_exit = True  # Ctrl-C once, with the request in progress
        answer = conn.getresponse()
        assert answer.read() == b"ok" and answer.getheader("connection") == "close"
        conn.close()


def test_a_forced_stop_answers_the_requests_in_flight_with_503(
    run_dir: Path, images: list[bytes], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C twice while images were scored: uvicorn answered them with a plain-text 500 and logged a
    traceback for each, and one for the app's lifespan. They get the documented 503, and the server stops."""
    from imgclf.serving import app as serving_app

    decoding, decode = threading.Event(), serving_app.decode_image

    def slow_decode(*args: Any) -> np.ndarray:
        decoding.set()
        time.sleep(1)
        return decode(*args)

    monkeypatch.setattr(serving_app, "decode_image", slow_decode)
    server = Server(create_app(run_dir, Config().updated(workers=1, max_batch=1, precision="fp32")))
    uvicorn_log = logging.getLogger("uvicorn.error")  # configured by the server: caplog's handler added after
    uvicorn_log.addHandler(caplog.handler)
    try:
        with server, ThreadPoolExecutor(1) as pool:
            jpeg = {"content-type": "image/jpeg"}
            sent = pool.submit(httpx.post, server.url + "/v1/predict", content=images[0], headers=jpeg, timeout=10)
            assert decoding.wait(10)
            server.server.should_exit = server.server.force_exit = True
            r = sent.result()
        assert not server.thread.is_alive()
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert r.status_code == 503 and r.json()["error"] == "not_running", r.text
    assert r.headers["connection"] == "close"
    assert not [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_a_second_server_on_the_port_is_refused_while_the_first_loads(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The port was tested, then bound again after the model loaded (20-45 s at a first conversion): a second
    `imgclf serve` took it meanwhile, and the first failed after loading with uvicorn's bare "address already
    in use" (exit 3). The port is now held from before the model loads: the second is refused at once."""
    from imgclf.cli import main
    from imgclf.serving import app as serving_app

    port, load, second, served = _free_port(), Bundle.load, [], []

    def load_while_another_starts(path: Path) -> Bundle:
        if not second:
            second.append(None)
            second[0] = main(["serve", str(run_dir), "--port", str(port)])
        return load(path)

    monkeypatch.setattr(Bundle, "load", load_while_another_starts)
    monkeypatch.setattr(serving_app, "create_app", lambda *a, **k: None)
    monkeypatch.setattr(uvicorn.Server, "run", lambda _, sockets: served.extend(s.getsockname() for s in sockets))
    assert main(["serve", str(run_dir), "--port", str(port)]) == 0
    assert second == [2]
    assert (
        f"cannot listen on 127.0.0.1:{port} (Address already in use): choose another --port" in capsys.readouterr().err
    )
    assert served == [("127.0.0.1", port)]  # the server was given the socket held since before the model loaded


def _run_client(*args: str) -> subprocess.CompletedProcess[str]:
    client = Path(__file__).resolve().parents[1] / "examples" / "client.py"
    return subprocess.run([sys.executable, str(client), *args], capture_output=True, text=True, timeout=60)


def test_example_client_shows_the_413_of_an_image_over_the_limit(base_url: str, tmp_path: Path) -> None:
    """urllib sent the body whole before reading an answer: the server's early 413 came as "Connection reset by
    peer" (every image over ~15 MB at the default limit, base64 adding a third)."""
    big = tmp_path / "big.jpg"
    big.write_bytes(os.urandom(12_000_000))  # 16 MB as base64, over the limit of 1 MB
    proc = _run_client(str(big), "--url", base_url, "--api-key", API_KEY)
    assert proc.returncode == 1
    assert re.fullmatch(
        r".*big\.jpg: HTTP 413: request body of [\d,]+ bytes exceeds the limit of 1 MB .*\n", proc.stdout
    )


class _Foreign(BaseHTTPRequestHandler):
    """Servers that are not imgclf's, chosen by the path's first part: an HTML page, JSON of another kind, an
    answer cut short, or none."""

    hang = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        kind = self.path.split("/")[1]
        if kind == "hang":
            self.hang.wait(10)
            return
        body = {"html": b"<html>Welcome to nginx!</html>", "json": b'{"status": "ok"}', "cut": b'{"predictions": ['}
        self.send_response(200)
        self.send_header("Content-Length", str(len(body[kind]) + (100 if kind == "cut" else 0)))
        self.end_headers()
        self.wfile.write(body[kind])
        self.close_connection = True

    def log_message(self, *_: object) -> None:
        pass


def test_example_client_says_what_to_do_when_there_is_no_imgclf_server(
    base_url: str, images: list[bytes], tmp_path: Path
) -> None:
    """No server, another kind of server, an answer cut short or none: the client printed a bare "Connection
    refused" for each image, a traceback, or waited 60 s for each. It now names the URL and what to do, and stops at
    the first image."""
    photos = [str(tmp_path / f"{i}.jpg") for i in range(2)]
    for photo in photos:
        Path(photo).write_bytes(images[0])
    nobody = f"http://127.0.0.1:{_free_port()}"
    proc = _run_client(*photos, "--url", nobody)
    assert proc.returncode == 1 and proc.stdout.count("\n") == 1, proc.stdout
    assert f"cannot reach a server at {nobody} (Connection refused): start one with `imgclf serve RUN`" in proc.stdout
    foreign = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    try:
        for kind, error in (("html", "JSONDecodeError"), ("json", "KeyError"), ("cut", "IncompleteRead")):
            url = f"http://127.0.0.1:{foreign.server_port}/{kind}"
            proc = _run_client(*photos, "--url", url)
            assert proc.returncode == 1 and proc.stdout.count("\n") == 1 and not proc.stderr, proc
            assert f"the answer from {url} is not imgclf's ({error}" in proc.stdout
        url = f"http://127.0.0.1:{foreign.server_port}/hang"
        t0 = time.monotonic()
        proc = _run_client(*photos, "--url", url, "--timeout", "0.5")
        assert proc.returncode == 1 and proc.stdout.count("\n") == 1 and time.monotonic() - t0 < 5
        assert f"no answer from {url} within 0.5 s (--timeout)" in proc.stdout
    finally:
        _Foreign.hang.set()
        foreign.shutdown()
    proc = _run_client(*photos, "--url", base_url + "/v1/predict", "--api-key", API_KEY)
    assert proc.returncode == 1 and proc.stdout.count("\n") == 1
    assert "HTTP 404 (Not Found) from" in proc.stdout and "--url takes the server's address" in proc.stdout
