"""The review app's HTTP API, against a real uvicorn server on a free 127.0.0.1 port."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from helpers import draw_image, make_folder, shared_dataset
from PIL import Image

from imgclf.config import Config
from imgclf.pipeline import train
from imgclf.ui.analysis import analyse
from imgclf.ui.app import create_app
from imgclf.ui.labels import JOURNAL_FILE, RelabelJournal
from imgclf.ui.thumbs import ThumbCache
from imgclf.utils import file_sha256, only_local_hosts

CLASSES = ["circles", "squares", "stripes"]


class Server:
    """A uvicorn server for an app, in a thread; ``url`` is its base URL."""

    def __init__(self, app: object) -> None:
        self.socket = socket.socket()  # bound here and handed over: no other process can take the port between
        self.socket.bind(("127.0.0.1", 0))
        port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


def make_review_data(tmp: Path) -> tuple[Path, Path, Config]:
    """A 3-class folder with 12 images each and 4 unlabeled images, and a tiny trained run on it."""
    data = make_folder(tmp / "data", n=12)
    rng = np.random.default_rng(7)
    (data / "unlabeled").mkdir()
    for i, kind in enumerate(["circles", "squares", "stripes", "circles"]):
        draw_image(kind, rng).save(data / "unlabeled" / f"new_{i}.jpg")
    cfg = Config().updated(
        data_root=data, out=tmp / "run", resolution=64, progress=False, tracking=False, cache_dir=tmp / "cache"
    )
    train(cfg)
    return data, tmp / "run", cfg


def sha_map(root: Path) -> dict[str, str]:
    """Every visible file under ``root`` (relative path -> SHA-256); the journal and hidden folders are left out."""
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def wait_analysis(client: httpx.Client, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (s := client.get("/api/analysis").json())["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert s["state"] == "done", s
    return s


@pytest.fixture(scope="session")
def review_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Config]:
    """Shared with the browser tests (tests/test_ui.py): every test leaves the files as it found them."""
    return make_review_data(tmp_path_factory.mktemp("review"))


@pytest.fixture(scope="module")
def review(review_data: tuple[Path, Path, Config]) -> Iterator[tuple[httpx.Client, Path]]:
    data, run, cfg = review_data
    with Server(create_app(data, run, cfg)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        wait_analysis(client)  # scores of a fixed file set: the tests below move files
        yield client, data


def test_info_and_listing(review: tuple[httpx.Client, Path]) -> None:
    client, _ = review
    info = client.get("/api/info").json()
    assert info["classes"] == CLASSES
    assert info["counts"] == {"circles": 12, "squares": 12, "stripes": 12, "unlabeled": 4}
    assert info["run"]["classes"] == CLASSES
    assert client.get("/").status_code == 200
    assert "imgclf review" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200


def test_paging(review: tuple[httpx.Client, Path]) -> None:
    client, _ = review
    seen: list[str] = []
    for page in (1, 2, 3):
        data = client.get("/api/images", params={"label": "squares", "page": page, "per_page": 5}).json()
        assert data["total"] == 12
        seen += [it["path"] for it in data["items"]]
    assert seen == sorted(seen) and len(set(seen)) == 12 and all(p.startswith("squares/") for p in seen)
    # a page past the last (its images moved away since it was shown) gives the last page, saying which
    past = client.get("/api/images", params={"label": "squares", "page": 9, "per_page": 5}).json()
    assert past["page"] == 3 and [it["path"] for it in past["items"]] == seen[10:]
    empty = client.get("/api/journal", params={"page": 2}).json()
    assert empty["page"] == 1 and empty["items"] == []
    assert client.get("/api/images", params={"label": "squares", "per_page": 0}).status_code == 422
    assert client.get("/api/images", params={"label": "nope"}).status_code == 404


def test_thumbnail_and_full_image(review: tuple[httpx.Client, Path]) -> None:
    client, data = review
    r = client.get("/api/thumb", params={"path": "circles/circles_00.jpg", "size": 48})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.content)) as im:
        assert max(im.size) == 48
    assert client.get("/api/thumb", params={"path": "circles/circles_00.jpg", "size": 48}).content == r.content
    full = client.get("/api/image", params={"path": "circles/circles_00.jpg"})
    assert full.content == (data / "circles" / "circles_00.jpg").read_bytes()
    assert client.get("/api/thumb", params={"path": "circles/missing.jpg"}).status_code == 404


def test_relabel_and_undo_leave_files_byte_identical(review: tuple[httpx.Client, Path]) -> None:
    client, data = review
    before = sha_map(data)
    a = client.post("/api/relabel", json={"path": "circles/circles_03.jpg", "label": "stripes"})
    b = client.post("/api/relabel", json={"path": "unlabeled/new_1.jpg", "label": "squares"})
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert a.json()["to"] == "stripes/circles_03.jpg" and b.json()["to"] == "squares/new_1.jpg"
    assert a.json()["sha256"] == before["circles/circles_03.jpg"]
    assert not (data / "circles" / "circles_03.jpg").exists() and (data / "stripes" / "circles_03.jpg").is_file()
    counts = client.get("/api/info").json()["counts"]
    assert counts["circles"] == 11 and counts["stripes"] == 13 and counts["unlabeled"] == 3
    records = [json.loads(line) for line in (data / JOURNAL_FILE).read_text().splitlines()]
    assert [(r["from"], r["to"]) for r in records] == [
        ("circles/circles_03.jpg", "stripes/circles_03.jpg"),
        ("unlabeled/new_1.jpg", "squares/new_1.jpg"),
    ]
    assert len(client.get("/api/journal").json()["items"]) == 2
    last = client.post("/api/undo", json={}).json()  # the last move
    assert [m["to"] for m in last["undone"]] == ["squares/new_1.jpg"] and not last["problems"]
    assert (data / "unlabeled" / "new_1.jpg").is_file()
    rest = client.post("/api/undo", json={"all": True}).json()
    assert [m["to"] for m in rest["undone"]] == ["stripes/circles_03.jpg"]
    assert sha_map(data) == before
    assert client.post("/api/undo", json={"all": True}).json()["undone"] == []


def test_listed_images_carry_the_version_of_their_file(review: tuple[httpx.Client, Path]) -> None:
    """Every list gives each image a version (``v``) that changes when its file is replaced: the page puts it in
    the image URLs, since a browser shows the picture it already holds for a URL again."""
    client, data = review

    def versions(route: str, **params: str) -> dict[str, str | None]:
        items = client.get(route, params={"per_page": 500, **params}).json()["items"]
        return {it.get("now") or it["path"]: it["v"] for it in items}

    path = client.get("/api/results", params={"sort": "path", "per_page": 1}).json()["items"][0]["path"]
    lists = [("/api/images", {"label": path.split("/")[0]}), ("/api/suspects", {}), ("/api/results", {})]
    before = [versions(route, **params)[path] for route, params in lists]
    assert before[0] and before == [before[0]] * 3
    unlabeled = versions("/api/unlabeled")
    assert len(unlabeled) == 4 and unlabeled == versions("/api/images", label="unlabeled")
    f = data / path
    original = f.read_bytes()
    try:
        f.write_bytes((data / "unlabeled" / "new_0.jpg").read_bytes())  # another picture under the same name
        after = [versions(route, **params)[path] for route, params in lists]
        assert after[0] and after[0] != before[0] and after == [after[0]] * 3
    finally:
        f.write_bytes(original)


def test_a_thumbnails_warning_names_its_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Decoded from its bytes (read once), a thumbnail's damaged-EXIF warning said "image", not which file."""
    good = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(good, "JPEG", dpi=(72, 72))
    payload = b"Exif\x00\x00" + b"\x00" * 40  # an APP1 block that is no TIFF structure
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    f = tmp_path / "holiday_0042.jpg"
    f.write_bytes(good.getvalue()[:2] + app1 + good.getvalue()[2:])
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        ThumbCache(tmp_path / "thumbs").get(f, 32)
    assert f"{f}: EXIF data unreadable" in caplog.text


def test_the_thumbnail_of_a_file_replaced_with_its_size_and_times_kept_is_made_anew(tmp_path: Path) -> None:
    """A file swapped for another of the same size and modification time (copied with its times kept) got the
    thumbnail of the one before."""
    f, other = tmp_path / "x.jpg", tmp_path / "other.jpg"
    f.write_bytes(b"a" * 100)
    other.write_bytes(b"b" * 100)
    cache = ThumbCache(tmp_path / "thumbs")
    assert cache.digest(f) == file_sha256(f)
    st = f.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, f)
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert cache.digest(f) == file_sha256(f)


def test_a_thumbnail_made_while_its_image_is_replaced_is_kept_under_the_picture_it_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file was hashed, then opened again to decode: replaced in between, the new picture's thumbnail was
    kept under the old content's digest and shown from then on for every image of that content."""
    red, blue = tmp_path / "red.jpg", tmp_path / "blue.jpg"
    Image.new("RGB", (64, 64), "red").save(red)
    Image.new("RGB", (64, 64), "blue").save(blue)
    f = tmp_path / "x.jpg"
    shutil.copy(red, f)
    cache = ThumbCache(tmp_path / "thumbs")
    hashed = cache.digest

    def hashed_then_replaced(path: Path) -> str:
        digest = hashed(path)
        shutil.copy(blue, tmp_path / "new.jpg")
        os.replace(tmp_path / "new.jpg", path)
        return digest

    monkeypatch.setattr(cache, "digest", hashed_then_replaced)
    cache.get(f, 32)
    monkeypatch.undo()
    for path, channel in ((red, 0), (blue, 2)):  # each shown as its own picture
        colour = Image.open(io.BytesIO(ThumbCache(tmp_path / "thumbs").get(path, 32))).getpixel((16, 16))
        assert max(range(3), key=colour.__getitem__) == channel, (path.name, colour)


CROSS_SITE = [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},  # a sandboxed frame, a file:// page
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # another port of the same machine
    {"Referer": "http://evil.example/cats.html"},
]


def test_a_page_of_another_site_cannot_change_anything(review: tuple[httpx.Client, Path]) -> None:
    """Cross-site request forgery: another site's page, open in the user's browser, POSTs to the app (a form, a
    fetch with mode no-cors): refused, whatever the body. The app's own page (same Origin) is served."""
    client, data = review
    own = {"Origin": str(client.base_url).rstrip("/")}
    before, runs = sha_map(data), client.get("/api/analysis").json()["runs"]
    moved = client.post("/api/relabel", json={"path": "circles/circles_05.jpg", "label": "squares"}, headers=own)
    assert moved.status_code == 200, moved.text
    for headers in CROSS_SITE:
        for path, body in (
            ("/api/undo", {"all": True}),
            ("/api/relabel", {"path": "squares/circles_05.jpg", "label": "stripes"}),
            ("/api/analysis", None),
        ):
            r = client.post(path, json=body, headers=headers)
            assert r.status_code == 403 and "from another site" in r.json()["detail"], (path, headers, r.text)
        form = client.post("/api/undo", data={"all": "true"}, headers=headers)
        assert form.status_code == 403, headers
    assert (data / "squares" / "circles_05.jpg").is_file()
    assert client.get("/api/analysis").json()["runs"] == runs
    no_body = client.post("/api/undo", headers=own)  # undo takes a JSON body only, even from its own page
    form = client.post("/api/undo", data={"all": "true"}, headers=own)
    text = client.post("/api/undo", content=b'{"all": true}', headers=own | {"content-type": "text/plain"})
    assert no_body.status_code == form.status_code == text.status_code == 422
    undone = client.post("/api/undo", json={"all": True}, headers=own | {"Sec-Fetch-Site": "same-origin"})
    assert [m["to"] for m in undone.json()["undone"]] == ["squares/circles_05.jpg"]
    assert sha_map(data) == before


def test_a_proxy_spelling_out_the_default_port_is_the_same_site() -> None:
    """nginx's `proxy_set_header Host $host:$server_port` sends `example.com:443`; the browser's Origin has no
    port: the app's own page got 403 on every change."""
    from starlette.datastructures import Headers

    from imgclf.serving.security import cross_site_reason

    for host, origin in (("example.com:443", "https://example.com"), ("example.com:80", "http://example.com")):
        assert cross_site_reason(Headers({"host": host, "origin": origin})) is None
    assert cross_site_reason(Headers({"host": "[::1]:8001", "origin": "http://[::1]:8001"})) is None
    assert cross_site_reason(Headers({"host": "example.com:8443", "origin": "https://example.com"}))
    assert cross_site_reason(Headers({"host": "example.com", "origin": "https://evil.example"}))


def test_every_answer_forbids_framing(review: tuple[httpx.Client, Path]) -> None:
    """Clickjacking: no page of another site may show the app in a frame and trick clicks on it."""
    client, _ = review
    answers = [client.get(p) for p in ("/", "/api/info", "/static/app.js", "/api/docs", "/api/nope")]
    answers.append(client.post("/api/undo", json={}, headers={"Origin": "http://evil.example"}))
    for r in answers:
        assert r.headers["x-frame-options"] == "DENY", r.url
        assert r.headers["content-security-policy"] == "frame-ancestors 'none'", r.url
        assert r.headers["x-content-type-options"] == "nosniff", r.url


@pytest.mark.parametrize(
    "path",
    ["../data/circles/circles_00.jpg", "circles/../../x.jpg", "/etc/passwd", ".imgclf-journal.jsonl", "..", ""],
)
def test_refuses_paths_outside_the_data(review: tuple[httpx.Client, Path], path: str) -> None:
    client, data = review
    before = sha_map(data)
    assert client.post("/api/relabel", json={"path": path, "label": "squares"}).status_code == 400
    assert client.get("/api/thumb", params={"path": path}).status_code == 400
    assert client.get("/api/image", params={"path": path}).status_code == 400
    assert sha_map(data) == before


def test_refuses_bad_moves(review: tuple[httpx.Client, Path]) -> None:
    client, data = review
    before = sha_map(data)
    assert client.post("/api/relabel", json={"path": "circles/circles_00.jpg", "label": "circles"}).status_code == 409
    unknown = client.post("/api/relabel", json={"path": "circles/circles_00.jpg", "label": "../x"})
    assert unknown.status_code == 400 and "unknown class '../x'" in unknown.json()["detail"]
    assert client.post("/api/relabel", json={"path": "circles/nope.jpg", "label": "squares"}).status_code == 404
    assert sha_map(data) == before


def test_only_listed_images_are_moved(tmp_path: Path) -> None:
    """A visible file that is not an image of a class folder or unlabeled/ stays; "./a/x.jpg" is "a/x.jpg"."""
    from imgclf.ui.labels import RelabelError, RelabelJournal

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=2)
    (root / "notes.txt").write_text("my notes")
    (root / "a" / "notes.txt").write_text("more notes")
    shutil.copy(root / "a" / "a_00.jpg", root / "cover.jpg")
    before = sha_map(root)
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        for path in ("notes.txt", "a/notes.txt", "cover.jpg"):
            r = client.post("/api/relabel", json={"path": path, "label": "b"})
            assert r.status_code == 400 and "not an image of the data set" in r.json()["detail"], r.text
        for path in ("./a/a_00.jpg", "a//a_00.jpg", "a/./a_00.jpg"):
            same = client.post("/api/relabel", json={"path": path, "label": "a"})
            assert same.status_code == 409 and "already in class 'a'" in same.json()["detail"], same.text
        assert sha_map(root) == before
        moved = client.post("/api/relabel", json={"path": "./a/a_01.jpg", "label": "b"}).json()
        assert (moved["from"], moved["to"]) == ("a/a_01.jpg", "b/a_01.jpg")
        assert client.post("/api/undo", json={}).json()["problems"] == []
    with pytest.raises(RelabelError, match="already in class"):  # the journal's own check, without the app
        RelabelJournal(root).move("./a/a_00.jpg", "a", ["a", "b"])
    assert sha_map(root) == before


def test_without_the_token_nothing_is_seen_or_moved(tmp_path: Path) -> None:
    """Every user of a machine reaches its 127.0.0.1: another one moved images and read files through links the
    folder's permissions kept from them. The link printed at start carries a token, kept in a cookie."""
    root = make_folder(tmp_path / "d", classes=("a", "b"), n=2)
    before = sha_map(root)
    app = create_app(root, analyse_on_start=False, token="s3cret-token")
    with Server(app) as server, httpx.Client(base_url=server.url) as other:
        for method, path, body in (
            ("GET", "/", None),
            ("GET", "/api/image?path=a/a_00.jpg", None),
            ("GET", "/api/image?path=a/a_00.jpg&token=guess", None),
            ("POST", "/api/relabel", {"path": "a/a_00.jpg", "label": "b"}),
            ("POST", "/api/relabel?token=s3cret-tokeN", {"path": "a/a_00.jpg", "label": "b"}),
        ):
            r = other.request(method, path, json=body)
            assert r.status_code == 401 and "printed when it started" in r.json()["detail"], (path, r.text)
            assert r.headers["x-frame-options"] == "DENY"
        other.cookies.set(f"imgclf-ui-{int(server.url.rsplit(':', 1)[1]) + 1}", "s3cret-token")  # another app's
        assert other.get("/api/info").status_code == 401
        assert sha_map(root) == before
    with Server(app) as server, httpx.Client(base_url=server.url) as user:
        link = user.get("/api/thumb", params={"path": "a/a_00.jpg", "size": 48, "token": "s3cret-token"})
        assert link.status_code == 303 and link.headers["location"] == "/api/thumb?path=a%2Fa_00.jpg&size=48"
        assert "HttpOnly" in link.headers["set-cookie"] and "SameSite=lax" in link.headers["set-cookie"]
        assert link.headers["x-frame-options"] == "DENY"  # on the token's own answers too
        away = user.get(server.url + "//evil.example/x", params={"token": "s3cret-token"})  # stays on this site
        assert away.headers["location"] == "/evil.example/x"
        assert user.get(link.headers["location"]).status_code == 200  # with the cookie
        moved = user.post("/api/relabel", json={"path": "a/a_00.jpg", "label": "b"})
        assert moved.status_code == 200 and (root / "b" / "a_00.jpg").is_file()


def test_a_journal_that_is_a_link_is_neither_written_nor_read(tmp_path: Path) -> None:
    """A link planted as the journal would have every move appended to the file it points at (~/.bashrc)."""
    import os

    from imgclf.datatools.journal import JournalFileError
    from imgclf.ui.labels import RelabelJournal

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    target = tmp_path / "bashrc"
    target.write_text("alias ls='ls --color'\n")
    try:
        (root / JOURNAL_FILE).symlink_to(target)
    except OSError:
        pytest.skip("this file system or user cannot make symbolic links")
    before = sha_map(tmp_path)
    with pytest.raises(JournalFileError, match="is a symbolic link or not a regular file"):
        RelabelJournal(root).move("a/a_00.jpg", "b", ["a", "b"])
    with pytest.raises(JournalFileError):
        RelabelJournal(root).active()
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        for r in (
            client.post("/api/relabel", json={"path": "a/a_00.jpg", "label": "b"}),
            client.post("/api/undo", json={}),
            client.get("/api/journal"),
        ):
            assert r.status_code == 409 and "symbolic link" in r.json()["detail"], r.text
    assert sha_map(tmp_path) == before
    (root / JOURNAL_FILE).unlink()
    os.mkfifo(root / JOURNAL_FILE)  # nor another kind of file
    with pytest.raises(JournalFileError):
        RelabelJournal(root).move("a/a_00.jpg", "b", ["a", "b"])
    assert sha_map(tmp_path) == before


def test_name_clash_gets_a_free_name(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=2)
    shutil.copy(data / "squares" / "squares_00.jpg", data / "circles" / "squares_00.jpg")
    before = sha_map(data)
    with Server(create_app(data, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        rec = client.post("/api/relabel", json={"path": "circles/squares_00.jpg", "label": "squares"}).json()
        assert rec["to"] == "squares/squares_00-1.jpg"
        assert sha_map(data)["squares/squares_00.jpg"] == before["squares/squares_00.jpg"]
        assert client.get("/api/results").status_code == 404  # no run given
        assert client.post("/api/undo", json={}).json()["problems"] == []
    assert sha_map(data) == before


def test_undo_last_undoes_only_the_move_the_page_saw(tmp_path: Path) -> None:
    """The page sends the id of the last move it saw: a second click (a double click) is refused, not an undo
    of the move before."""
    root = make_folder(tmp_path / "d", classes=("a", "b"), n=2)
    before = sha_map(root)
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        first = client.post("/api/relabel", json={"path": "a/a_00.jpg", "label": "b"}).json()
        last = client.post("/api/relabel", json={"path": "a/a_01.jpg", "label": "b"}).json()
        stale = client.post("/api/undo", json={"id": first["id"]})
        assert stale.status_code == 409 and "no longer the last one" in stale.json()["detail"], stale.text
        # Undo all confirmed when `first` was the last move: `last`, made since, is not undone with the rest
        assert client.post("/api/undo", json={"all": True, "id": first["id"]}).status_code == 409
        assert len(client.get("/api/journal").json()["items"]) == 2
        undone = client.post("/api/undo", json={"id": last["id"]})
        assert [m["id"] for m in undone.json()["undone"]] == [last["id"]], undone.text
        again = client.post("/api/undo", json={"id": last["id"]})  # the second click of a double click
        assert again.status_code == 409 and "nothing undone" in again.json()["detail"], again.text
        assert [m["id"] for m in client.get("/api/journal").json()["items"]] == [first["id"]]
        assert client.post("/api/undo", json={"id": first["id"]}).status_code == 200
        assert client.post("/api/undo", json={"id": first["id"]}).status_code == 409  # nothing left
    assert sha_map(root) == before


def test_undo_leaves_another_picture_saved_under_the_moved_name(tmp_path: Path) -> None:
    """Another picture saved since under the name a move gave (an editor's "save as"): undo moved it into the
    image's old class and said nothing. It stays; the move is retired, so that the moves before it can be undone
    (else every "undo last" met it again)."""
    root = make_folder(tmp_path / "d", classes=("a", "b"), n=2)
    other = (root / "b" / "b_00.jpg").read_bytes()
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        first = client.post("/api/relabel", json={"path": "a/a_01.jpg", "label": "b"}).json()
        move = client.post("/api/relabel", json={"path": "a/a_00.jpg", "label": "b"}).json()
        (root / "b" / "a_00.jpg").write_bytes(other)
        r = client.post("/api/undo", json={"id": move["id"]}).json()
        assert r == {
            "undone": [],
            "problems": [
                "b/a_00.jpg is no longer the image moved (changed since): left where it is; the next undo goes on "
                "to the move before"
            ],
        }
        assert [m["id"] for m in client.get("/api/journal").json()["items"]] == [first["id"]]
        assert client.post("/api/undo", json={"id": first["id"]}).json()["undone"][0]["id"] == first["id"]
        again = client.post("/api/relabel", json={"path": "a/a_01.jpg", "label": "b"}).json()  # undo all: no "next"
        (root / again["to"]).write_bytes(other)
        r = client.post("/api/undo", json={"all": True, "id": again["id"]}).json()
        assert r["problems"] == [
            f"{again['to']} is no longer the image moved (changed since): left where it is; its move is retired"
        ]
    assert not (root / "a" / "a_00.jpg").exists() and (root / "b" / "a_00.jpg").read_bytes() == other
    assert (root / "b" / "a_01.jpg").read_bytes() == other


def test_a_move_cut_by_a_crash_is_finished_when_the_app_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between a move's link and unlink, the image was listed in both classes after a restart, and moving
    the copy still shown in its old class made a second file of it."""
    from imgclf.ui import labels

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=2)
    monkeypatch.setattr(labels, "move_no_overwrite", lambda src, dst: os.link(src, dst))  # cut after the link
    RelabelJournal(root).move("a/a_00.jpg", "b", ["a", "b"])
    monkeypatch.undo()
    assert (root / "a" / "a_00.jpg").is_file() and (root / "b" / "a_00.jpg").is_file()
    with Server(create_app(root, analyse_on_start=False)) as server:
        assert httpx.get(server.url + "/api/info").json()["counts"] == {"a": 1, "b": 3}
    assert not (root / "a" / "a_00.jpg").exists() and (root / "b" / "a_00.jpg").is_file()
    RelabelJournal(root).undo()
    assert (root / "a" / "a_00.jpg").is_file() and not (root / "b" / "a_00.jpg").exists()


def test_a_folder_another_process_changes_is_not_moved_in(tmp_path: Path) -> None:
    """Two review apps (or an app and a dedup --apply) on one folder raced: both moved the same image, and the
    one that found it gone took back the other's new name, the file's last one (images lost)."""
    from helpers import held_elsewhere

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    before = sha_map(root)
    with Server(create_app(root, analyse_on_start=False)) as server, held_elsewhere(root):
        answer = httpx.post(server.url + "/api/relabel", json={"path": "a/a_00.jpg", "label": "b"})
        assert answer.status_code == 409
        assert "another imgclf dedup --apply or --undo, download, scrape or review app is changing" in answer.text
        assert httpx.post(server.url + "/api/undo", json={}).status_code == 409
    assert sha_map(root) == before


def test_a_move_finished_by_another_process_keeps_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other process found the file under both names between this one's link and unlink, and finished the
    move: this one's unlink found nothing, and its clean-up removed the new name, the file's last."""
    from imgclf.datatools import journal

    src, dst = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"
    src.parent.mkdir()
    src.write_bytes(b"the only copy")
    real_link = os.link

    def link_then_the_other_finishes(a: object, b: object) -> None:
        real_link(a, b)
        assert journal.same_file(Path(a), Path(b))
        os.unlink(a)  # the other process, finding the file under both names, finished the move

    monkeypatch.setattr(os, "link", link_then_the_other_finishes)
    journal.move_no_overwrite(src, dst)
    assert dst.read_bytes() == b"the only copy" and not src.exists()
    # the other moved it to a name of its own meanwhile (another class, or a free name): this one's is taken back
    other = tmp_path / "b" / "x-1.jpg"

    def link_then_the_other_moves_it_elsewhere(a: object, b: object) -> None:
        real_link(a, b)
        real_link(a, other)
        os.unlink(a)

    monkeypatch.setattr(os, "link", link_then_the_other_moves_it_elsewhere)
    with pytest.raises(FileNotFoundError, match="moved meanwhile by another process"):
        journal.move_no_overwrite(dst, tmp_path / "c" / "x.jpg")
    assert other.read_bytes() == b"the only copy" and os.stat(other).st_nlink == 1
    assert not dst.exists() and not (tmp_path / "c" / "x.jpg").exists()


def test_two_moves_of_one_image_at_once_move_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests to move the same image (two tabs, a double click): one moves it, the other is told so, with
    a 409 naming the image, not a 404 with the error number and absolute path of a file gone under it."""
    from imgclf.ui import labels

    root = make_folder(tmp_path / "d", classes=("a", "b", "c"), n=1)
    before, real_safe_rel = sha_map(root), labels.safe_rel
    together, calls = threading.Barrier(2, timeout=10), itertools.count()

    def both_checked(*args: object, **kwargs: object) -> Path:  # both requests reach the move before either moves
        if next(calls) < 2:
            together.wait()
        return real_safe_rel(*args, **kwargs)

    monkeypatch.setattr(labels, "safe_rel", both_checked)
    answers: list[httpx.Response] = []
    with Server(create_app(root, analyse_on_start=False)) as server:

        def post(label: str) -> None:
            answers.append(httpx.post(server.url + "/api/relabel", json={"path": "a/a_00.jpg", "label": label}))

        threads = [threading.Thread(target=post, args=(label,)) for label in ("b", "c")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
        refused = next(r for r in answers if r.status_code == 409).json()["detail"]
        assert refused == "a/a_00.jpg is no longer there: already moved by another request, or removed"
        assert len(RelabelJournal(root).active()) == 1
        # one after the other (a double click, a second tab): told where it went, not "no image" (404)
        moved = RelabelJournal(root).active()[0]
        again = httpx.post(server.url + "/api/relabel", json={"path": "a/a_00.jpg", "label": "c"})
        assert again.status_code == 409, again.text
        assert (
            again.json()["detail"]
            == f"a/a_00.jpg is no longer there: already moved to {moved['to']} (by another request)"
        )
        assert httpx.post(server.url + "/api/undo", json={}).json()["problems"] == []
    assert sha_map(root) == before


def test_results_filters_and_sort(review: tuple[httpx.Client, Path]) -> None:
    client, _ = review
    every = client.get("/api/results", params={"per_page": 500}).json()
    right = client.get("/api/results", params={"outcome": "right", "per_page": 500}).json()
    wrong = client.get("/api/results", params={"outcome": "wrong", "per_page": 500}).json()
    assert every["total"] == right["total"] + wrong["total"] > 0
    assert all(it["correct"] for it in right["items"]) and not any(it["correct"] for it in wrong["items"])
    conf = [it["confidence"] for it in every["items"]]
    assert conf == sorted(conf)
    desc = client.get("/api/results", params={"sort": "confidence_desc", "per_page": 500}).json()
    assert [it["confidence"] for it in desc["items"]] == sorted(conf, reverse=True)
    item = every["items"][0]
    assert len(item["scores"]) == 3 and item["exists"] and abs(sum(item["scores"]) - 1) < 1e-3
    only = client.get("/api/results", params={"true": "squares", "per_page": 500}).json()
    assert only["total"] > 0 and all(it["true"] == "squares" for it in only["items"])


def test_a_result_relabelled_since_the_run_is_followed(review: tuple[httpx.Client, Path]) -> None:
    """Relabelling from the results view moves the image: the view shows where it lies now."""
    client, data = review
    before = sha_map(data)

    def result(path: str) -> dict:
        items = client.get("/api/results", params={"sort": "path", "per_page": 500}).json()["items"]
        return next(it for it in items if it["path"] == path)

    item = client.get("/api/results", params={"sort": "path", "per_page": 1}).json()["items"][0]
    assert item["now"] == item["path"]
    others = [c for c in CLASSES if c != item["true"]]
    first = client.post("/api/relabel", json={"path": item["path"], "label": others[0]}).json()
    second = client.post("/api/relabel", json={"path": first["to"], "label": others[1]}).json()
    moved = result(item["path"])
    assert moved["v"] and moved["v"] != item["v"]  # the version of its file: a move changes the file's ctime
    assert moved | {"exists": None, "v": None} == item | {"exists": None, "v": None, "now": second["to"]}
    assert client.post("/api/undo", json={"all": True}).status_code == 200
    assert result(item["path"])["now"] == item["path"] and sha_map(data) == before


def test_a_result_moved_by_hand_is_found_by_its_content(review: tuple[httpx.Client, Path]) -> None:
    """An image of the run's test split moved and renamed outside the app was "no longer in the data folder";
    split.csv records its content."""
    client, data = review
    item = client.get("/api/results", params={"sort": "path", "per_page": 1}).json()["items"][0]
    elsewhere = f"{next(c for c in CLASSES if c != item['true'])}/renamed by hand.jpg"
    (data / item["path"]).rename(data / elsewhere)
    try:
        moved = client.get("/api/results", params={"sort": "path", "per_page": 1}).json()["items"][0]
        assert (moved["path"], moved["exists"], moved["now"]) == (item["path"], False, elsewhere)
        assert moved["v"]
    finally:
        (data / elsewhere).rename(data / item["path"])


def test_confusion_cells_list_their_images(review: tuple[httpx.Client, Path]) -> None:
    client, _ = review
    cm = client.get("/api/confusion").json()
    assert cm["classes"] == CLASSES
    total = 0
    for i, t in enumerate(cm["classes"]):
        for j, p in enumerate(cm["classes"]):
            cell = client.get("/api/results", params={"true": t, "pred": p, "per_page": 500}).json()
            assert cell["total"] == cm["matrix"][i][j]
            assert all(it["true"] == t and it["pred"] == p for it in cell["items"])
            total += cell["total"]
    assert total == client.get("/api/results").json()["total"]


def test_suspects_and_active_learning(review: tuple[httpx.Client, Path]) -> None:
    client, data = review
    status = wait_analysis(client)
    assert status["n_suspects"] == 36 and status["n_unlabeled"] == 4
    sus = client.get("/api/suspects", params={"per_page": 500}).json()
    p = [it["p_label"] for it in sus["items"]]
    assert sus["total"] == 36 and p == sorted(p) and sus["classes"] == CLASSES
    assert all(it["suggested"] in CLASSES and len(it["scores"]) == 3 for it in sus["items"])
    unl = client.get("/api/unlabeled").json()
    margins = [it["margin"] for it in unl["items"]]
    assert unl["total"] == 4 and margins == sorted(margins)
    first = unl["items"][0]
    before = sha_map(data)
    assert client.post("/api/relabel", json={"path": first["path"], "label": first["suggested"]}).status_code == 200
    assert client.get("/api/unlabeled").json()["total"] == 3  # labelled images leave the queue
    client.post("/api/undo", json={})
    assert sha_map(data) == before
    assert client.get("/api/skipped").json()["total"] == status["n_skipped"] == 0
    assert client.post("/api/analysis").json()["started"] is True
    assert wait_analysis(client)["runs"] == 2


@pytest.mark.shared
@pytest.mark.slow
def test_acceptance_flowers5_mislabelled_images_rank_first(tmp_path: Path) -> None:
    src = shared_dataset("flowers5")
    data = tmp_path / "flowers5"
    shutil.copytree(src, data, ignore=shutil.ignore_patterns("*.md", "*.tsv"))
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    rng = np.random.default_rng(0)
    moved = []
    for k in range(8):
        here, there = classes[k % len(classes)], classes[(k + 1 + k // len(classes)) % len(classes)]
        files = sorted((data / here).iterdir())
        f = files[int(rng.integers(len(files)))]
        f.rename(data / there / f.name)
        moved.append(f"{there}/{f.name}")
    result = analyse(data, Config().updated(progress=False))
    rank = {s["path"]: s["rank"] for s in result.suspects}
    ranks = sorted(rank[m] for m in moved)
    print(f"ranks of the {len(moved)} mislabelled images among {len(rank)}: {ranks}")
    assert sum(r <= 20 for r in ranks) >= 6, ranks


@pytest.mark.skipif(os.name == "nt", reason="a backslash separates folders on Windows")
def test_a_backslash_is_a_character_of_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux and macOS allow a backslash in a file name: such an image is listed, shown, moved and moved back."""
    from imgclf.ui import labels

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    shutil.copy(root / "a" / "a_00.jpg", root / "a" / "x\\y.jpg")
    before = sha_map(root)
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        listed = [i["path"] for i in client.get("/api/images", params={"label": "a"}).json()["items"]]
        assert listed == ["a/a_00.jpg", "a/x\\y.jpg"]
        assert client.get("/api/thumb", params={"path": "a/x\\y.jpg"}).status_code == 200
        assert client.get("/api/image", params={"path": "a/x\\y.jpg"}).content == (root / "a" / "x\\y.jpg").read_bytes()
        moved = client.post("/api/relabel", json={"path": "a/x\\y.jpg", "label": "b"})
        assert moved.status_code == 200 and moved.json()["to"] == "b/x\\y.jpg"
        assert client.post("/api/undo", json={}).json()["undone"]
    assert sha_map(root) == before
    monkeypatch.setattr(labels, "OTHER_SEPARATORS", ("\\",))  # as on Windows: a separator, refused
    with pytest.raises(labels.UnsafePathError, match="not a relative path"):
        labels.safe_rel(root, "a\\..\\..\\x.jpg")


def test_listing_leaves_out_names_that_are_not_utf8(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No URL or JSON can name such a file: it is left out of the listing, with a warning naming it."""
    import os

    from imgclf.ui.labels import list_images

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=2)
    try:
        (root / "a" / os.fsdecode(b"bad\xff.jpg")).write_bytes((root / "a" / "a_00.jpg").read_bytes())
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    with caplog.at_level("WARNING", logger="imgclf"):
        assert list_images(root) == {"a": ["a/a_00.jpg", "a/a_01.jpg"], "b": ["b/b_00.jpg", "b/b_01.jpg"]}
        list_images(root)  # the app lists again whenever a folder changes: warned once
    assert caplog.text.count("not shown: a/bad\\xff.jpg") == 1


def test_images_reached_through_a_folder_link_are_shown_not_moved(tmp_path: Path) -> None:
    """A linked folder outside the data folder: its images are listed and viewable; moving them is refused."""
    root = make_folder(tmp_path / "d", classes=("a", "b"), n=2)
    outside = make_folder(tmp_path / "outside", classes=("more",), n=1) / "more"
    try:
        (root / "a" / "linked").symlink_to(outside, target_is_directory=True)
    except OSError:
        pytest.skip("this file system or user cannot make symbolic links")
    (root / "__MACOSX").mkdir()
    before = sha_map(tmp_path)
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/api/info").json()["classes"] == ["a", "b"]
        listed = [i["path"] for i in client.get("/api/images", params={"label": "a"}).json()["items"]]
        assert listed == ["a/a_00.jpg", "a/a_01.jpg", "a/linked/more_00.jpg"]
        assert client.get("/api/thumb", params={"path": "a/linked/more_00.jpg"}).status_code == 200
        assert client.get("/api/image", params={"path": "a/linked/more_00.jpg"}).status_code == 200
        assert client.get("/api/image", params={"path": "./a/linked/more_00.jpg"}).status_code == 200
        moved = client.post("/api/relabel", json={"path": "a/linked/more_00.jpg", "label": "b"})
        assert moved.status_code == 400 and "through a link" in moved.json()["detail"]
    assert sha_map(tmp_path) == before


def test_a_data_folder_laid_out_by_split(tmp_path: Path) -> None:
    """train/<class>/ and val/<class>/: the classes are the class folders, and a move stays in its split."""
    root = tmp_path / "d"
    make_folder(root / "train", classes=("a", "b"), n=3)
    make_folder(root / "val", classes=("a", "b"), n=2, seed=1)
    make_folder(root / "unlabeled", classes=("new",), n=1, seed=2)
    (root / "unlabeled" / "new" / "new_00.jpg").rename(root / "unlabeled" / "new_00.jpg")
    before = sha_map(root)
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        info = client.get("/api/info").json()
        assert info["classes"] == ["a", "b"] and info["splits"] == ["train", "val"]
        assert info["counts"] == {"a": 5, "b": 5, "unlabeled": 1}
        listed = [i["path"] for i in client.get("/api/images", params={"label": "a"}).json()["items"]]
        assert listed == [
            "train/a/a_00.jpg",
            "train/a/a_01.jpg",
            "train/a/a_02.jpg",
            "val/a/a_00.jpg",
            "val/a/a_01.jpg",
        ]
        moved = client.post("/api/relabel", json={"path": "val/a/a_01.jpg", "label": "b"}).json()
        assert moved["to"] == "val/b/a_01.jpg"
        same = client.post("/api/relabel", json={"path": "val/b/a_01.jpg", "label": "b"})
        assert same.status_code == 409
        assert client.post("/api/relabel", json={"path": "unlabeled/new_00.jpg", "label": "a"}).json()["to"] == (
            "train/a/new_00.jpg"
        )
        assert client.get("/api/info").json()["counts"] == {"a": 5, "b": 6, "unlabeled": 0}
        assert len(client.post("/api/undo", json={"all": True}).json()["undone"]) == 2
    assert sha_map(root) == before


def test_a_read_only_data_folder_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from imgclf.ui.labels import RelabelJournal

    def read_only(self: RelabelJournal, record: dict) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self.path))

    monkeypatch.setattr(RelabelJournal, "_append", read_only)
    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    before = sha_map(root)
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        r = client.post("/api/relabel", json={"path": "a/a_00.jpg", "label": "b"})
        assert r.status_code == 409 and "cannot be changed: Read-only file system" in r.json()["detail"]
    assert sha_map(root) == before


def test_a_class_folder_that_refuses_a_move_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A move into a read-only class folder named only the image, not the folder that refused it."""
    import errno

    def refused(src: str, dst: str) -> None:
        raise OSError(errno.EACCES, "Permission denied", src, None, dst)

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    before = sha_map(root)
    monkeypatch.setattr("os.link", refused)
    monkeypatch.setattr("os.rename", refused)
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        r = client.post("/api/relabel", json={"path": "a/a_00.jpg", "label": "b"})
    assert r.status_code == 409 and f"to {root / 'b' / 'a_00.jpg'}" in r.json()["detail"]
    assert sha_map(root) == before


def test_a_loopback_server_refuses_other_host_names(review_data: tuple[Path, Path, Config]) -> None:
    """DNS rebinding: a page of evil.example, its name pointed at 127.0.0.1, must not read or move images."""
    data, _, cfg = review_data
    app = create_app(data, None, cfg, analyse_on_start=False)
    assert only_local_hosts(app, "0.0.0.0") is app and only_local_hosts(app, "192.168.1.5") is app
    with Server(only_local_hosts(app, "127.0.0.1")) as server, httpx.Client(base_url=server.url) as client:
        port = server.url.rsplit(":", 1)[1]
        assert client.get("/api/info").json()["classes"] == CLASSES
        assert client.get("/api/info", headers={"host": f"localhost:{port}"}).status_code == 200
        before = sha_map(data)
        for method, path in (("GET", "/api/images"), ("POST", "/api/relabel")):
            body = {"path": "circles/circles_00.jpg", "label": "squares"} if method == "POST" else None
            r = client.request(method, path, json=body, headers={"host": f"evil.example:{port}"})
            assert r.status_code == 400 and r.text == "Invalid host header"
        assert sha_map(data) == before


def test_a_move_that_fails_leaves_earlier_moves_undoable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No permission, another file system: the failed move is closed in the journal, Undo reaches the one before."""
    import errno

    from imgclf.ui import labels

    root = make_folder(tmp_path / "d", classes=("a", "b", "c"), n=2)
    before, journal, classes = sha_map(root), labels.RelabelJournal(root), ["a", "b", "c"]
    journal.move("a/a_00.jpg", "c", classes)
    real = labels.move_no_overwrite

    def cross_device(src: Path, dst: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(labels, "move_no_overwrite", cross_device)
    with pytest.raises(OSError, match="cross-device"):
        journal.move("a/a_01.jpg", "b", classes)
    monkeypatch.setattr(labels, "move_no_overwrite", real)
    assert journal.undo().problems == []
    assert sha_map(root) == before


def test_a_torn_journal_line_or_a_move_cut_short_loses_no_move(tmp_path: Path) -> None:
    from imgclf.ui.labels import RelabelJournal

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=3)
    before, journal = sha_map(root), RelabelJournal(root)
    journal.move("a/a_00.jpg", "b", ["a", "b"])
    with open(root / JOURNAL_FILE, "a", encoding="utf-8") as f:
        f.write('{"op": "move", "id": "torn", "fr')  # a crash in the middle of a record
    journal.move("a/a_01.jpg", "b", ["a", "b"])
    journal._append({"op": "move", "id": "cut", "from": "a/a_02.jpg", "to": "b/a_02.jpg"})  # crash before the move
    assert [r["id"] for r in journal.undo().undone] == ["cut"]  # found in place: nothing to move
    report = journal.undo(everything=True)
    assert len(report.undone) == 2 and report.problems == []
    assert sha_map(root) == before


def test_relabel_into_a_dangling_name_or_a_folder_outside(tmp_path: Path) -> None:
    from imgclf.ui.labels import RelabelError, RelabelJournal

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        (root / "b" / "a_00.jpg").symlink_to(tmp_path / "gone.jpg")  # a link to a file no longer there
        (root / "c").symlink_to(outside, target_is_directory=True)
    except OSError:
        pytest.skip("this file system or user cannot make symbolic links")
    journal = RelabelJournal(root)
    with pytest.raises(RelabelError, match="c/ leads outside the data folder"):
        journal.move("a/a_00.jpg", "c", ["a", "b", "c"])
    assert list(outside.iterdir()) == []
    assert journal.move("a/a_00.jpg", "b", ["a", "b"])["to"] == "b/a_00-1.jpg"
    assert journal.undo().problems == [] and (root / "a" / "a_00.jpg").is_file()


def test_the_listing_follows_changes_inside_sub_folders(tmp_path: Path) -> None:
    """An image added to a class's sub-folder (one empty until then) or removed from one shows at once."""
    import os

    from imgclf.ui.app import ImageIndex

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    for sub in ("sess1", "sess2"):
        (root / "a" / sub).mkdir()
    shutil.copy(root / "a" / "a_00.jpg", root / "a" / "sess1" / "x.jpg")
    index = ImageIndex(root)
    assert index.folders()["a"] == ["a/a_00.jpg", "a/sess1/x.jpg"]
    shutil.copy(root / "a" / "a_00.jpg", root / "a" / "sess2" / "y.jpg")
    (root / "a" / "sess1" / "x.jpg").unlink()
    for sub in ("sess1", "sess2"):  # a clock tick, also where the file system keeps whole seconds
        later = (root / "a" / sub).stat().st_mtime_ns + 2 * 10**9
        os.utime(root / "a" / sub, ns=(later, later))
    assert index.folders()["a"] == ["a/a_00.jpg", "a/sess2/y.jpg"]
    assert index.present() == {"a/a_00.jpg", "a/sess2/y.jpg", "b/b_00.jpg"}
    import imgclf.ui.app

    real_listing = imgclf.ui.app.list_images

    def changed_while_listed(*args: object) -> dict[str, list[str]]:
        listed = real_listing(*args)
        shutil.copy(root / "a" / "a_00.jpg", root / "a" / "sess1" / "late.jpg")  # after its folder was walked
        later = (root / "a" / "sess1").stat().st_mtime_ns + 4 * 10**9
        os.utime(root / "a" / "sess1", ns=(later, later))
        return listed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imgclf.ui.app, "list_images", changed_while_listed)
        index.invalidate()
        assert "a/sess1/late.jpg" not in index.folders()["a"]
    assert "a/sess1/late.jpg" in index.folders()["a"]  # seen at the next use


def test_analysis_of_a_fine_tuned_run_scores_with_an_svm(tmp_path: Path) -> None:
    """`imgclf ui DATA --run RUN` with a dnn run: its config names no feature head; the review's SVM is used."""
    data = make_folder(tmp_path / "d", n=6)
    cfg = Config().updated(classifier="dnn", resolution=64, progress=False, svm_c_grid=[1.0], cv_folds=2)
    result = analyse(data, cfg.updated(cache_dir=tmp_path / "cache"))
    assert len(result.suspects) == 18 and result.classes == CLASSES


def test_a_move_whose_source_cannot_be_removed_leaves_one_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is linked into its new folder, then unlinked from the old one: when that fails (a source folder
    without write permission), the new link is taken back, so the image is not in two classes."""
    import errno
    import os

    from imgclf.ui.labels import RelabelJournal

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    before, real_unlink = sha_map(root), os.unlink

    def refused(path: object, *args: object, **kwargs: object) -> None:
        if Path(str(path)) == root / "a" / "a_00.jpg":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(PermissionError):
        RelabelJournal(root).move("a/a_00.jpg", "b", ["a", "b"])
    monkeypatch.undo()
    assert sha_map(root) == before and RelabelJournal(root).active() == []


def test_an_unreadable_image_is_a_message_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file without read permission: its thumbnail and full view are refused before a response starts."""
    import builtins
    import errno

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    locked, real_open = (root / "a" / "a_00.jpg").resolve(), builtins.open

    def refused(file: object, *args: object, **kwargs: object) -> object:
        if isinstance(file, str | Path) and Path(file).resolve() == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refused)
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        for route in ("/api/thumb", "/api/image"):
            r = client.get(route, params={"path": "a/a_00.jpg"})
            assert r.status_code == 422, (route, r.text)
            assert r.json()["detail"].startswith("cannot show a/a_00.jpg: unreadable: Permission denied: make the")
        assert client.get("/api/image", params={"path": "b/b_00.jpg"}).content == (root / "b" / "b_00.jpg").read_bytes()


def test_a_refused_read_is_named_as_a_read_not_as_a_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image in a folder without read permission, a data folder without it: every answer said "the data
    folder cannot be changed" (409); so did the relabel of an unreadable file (hashed for the journal)."""
    import builtins
    import errno

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1).resolve()
    image, real_stat, real_listdir, real_open = root / "a" / "a_00.jpg", os.stat, os.listdir, builtins.open

    def refusing(real: object, locked: Path) -> object:
        def call(path: object, *args: object, **kwargs: object) -> object:
            if isinstance(path, str | Path) and Path(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)  # type: ignore[operator]

        return call

    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        monkeypatch.setattr(os, "stat", refusing(real_stat, image))  # its folder unreadable
        r = client.get("/api/thumb", params={"path": "a/a_00.jpg"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == (
            f"cannot read {image}: Permission denied: check the permissions of it and of the folders above it"
        )
        monkeypatch.undo()
        monkeypatch.setattr(os, "listdir", refusing(real_listdir, root))
        r = client.get("/api/info")
        assert r.status_code == 422 and r.json()["detail"].startswith(f"cannot read {root}: Permission denied"), r.text
        monkeypatch.undo()
        monkeypatch.setattr(builtins, "open", refusing(real_open, image))
        r = client.post("/api/relabel", json={"path": "a/a_00.jpg", "label": "b"})
        assert r.status_code == 409, r.text
        assert r.json()["detail"] == "cannot read a/a_00.jpg (Permission denied): make it readable to relabel it"
        assert image.is_file() and RelabelJournal(root).active() == []
        monkeypatch.undo()
        move = client.post("/api/relabel", json={"path": "a/a_00.jpg", "label": "b"}).json()
        monkeypatch.setattr(builtins, "open", refusing(real_open, root / "b" / "a_00.jpg"))
        r = client.post("/api/undo", json={"id": move["id"]})
        assert r.json()["problems"] == ["cannot read b/a_00.jpg (Permission denied): make it readable to move it back"]


def test_a_folder_made_readable_again_is_listed_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chmod changes a folder's change time, not its modification time: a class folder listed while it could
    not be read stayed empty once readable again."""
    import errno

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=2).resolve()
    real_walk = os.walk

    def unreadable_a(top: object, *args: object, onerror: object = None, **kwargs: object) -> Iterator[object]:
        if Path(str(top)) == root / "a":
            onerror(PermissionError(errno.EACCES, "Permission denied", str(top)))  # type: ignore[operator]
            return iter(())
        return real_walk(top, *args, onerror=onerror, **kwargs)  # type: ignore[call-overload]

    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        monkeypatch.setattr(os, "walk", unreadable_a)
        for _ in range(2):  # listed, then listed again with the folders the first listing walked: steady
            assert client.get("/api/info").json()["counts"] == {"a": 0, "b": 2}
        monkeypatch.undo()
        os.chmod(root / "a", 0o755)
        assert client.get("/api/info").json()["counts"] == {"a": 2, "b": 2}


def test_a_data_folder_gone_is_named_with_what_to_do(tmp_path: Path) -> None:
    """Deleted or renamed while the app runs: every request answered "[Errno 2] No such file or directory"."""
    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1).resolve()
    gone = (
        f"the data folder {root} is gone (deleted, moved or renamed since the app started): restore it, or start "
        "imgclf ui on its new place"
    )
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        root.rename(tmp_path / "renamed")
        for r in (
            client.get("/api/info"),
            client.get("/api/images", params={"label": "a"}),
            client.get("/api/thumb", params={"path": "a/a_00.jpg"}),
            client.post("/api/relabel", json={"path": "a/a_00.jpg", "label": "b"}),
        ):
            assert (r.status_code, r.json()["detail"]) == (404, gone), r.request.url
        (tmp_path / "renamed").rename(root)  # restored
        assert client.get("/api/info").json()["counts"] == {"a": 1, "b": 1}


def test_the_full_image_is_one_file_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removed (or replaced) between the app's check and the file response's own stat and open: a 500 (File at
    path ... does not exist), or a body of the one file with the length of the other."""
    import builtins

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1).resolve()
    image, real_open = root / "a" / "a_00.jpg", builtins.open
    original = image.read_bytes()

    def removed_once_opened(file: object, *args: object, **kwargs: object) -> object:
        handle = real_open(file, *args, **kwargs)
        if isinstance(file, str | Path) and Path(file) == image:
            image.unlink()
        return handle

    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        monkeypatch.setattr(builtins, "open", removed_once_opened)
        r = client.get("/api/image", params={"path": "a/a_00.jpg"})
        assert (r.status_code, r.headers["content-type"], r.content) == (200, "image/jpeg", original)
        r = client.get("/api/image", params={"path": "a/a_00.jpg"})
        assert (r.status_code, r.json()["detail"]) == (404, "no image 'a/a_00.jpg' in the data folder")


def test_the_zoom_of_a_webp_turned_by_exif_is_upright(tmp_path: Path) -> None:
    """Browsers apply the EXIF orientation of JPEG and PNG files, not WebP's: the zoom showed it sideways."""
    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1).resolve()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 wide, 120 high; shown 120 wide
    for ext in ("webp", "jpg"):
        Image.new("RGB", (80, 120), (200, 30, 30)).save(root / "a" / f"turned.{ext}", exif=exif)
    with Server(create_app(root, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        webp = client.get("/api/image", params={"path": "a/turned.webp"})
        assert webp.headers["content-type"] == "image/jpeg"  # the preview, turned as the model sees it
        assert Image.open(io.BytesIO(webp.content)).size == (120, 80)
        jpeg = client.get("/api/image", params={"path": "a/turned.jpg"})  # the browser turns it: sent as it is
        assert jpeg.content == (root / "a" / "turned.jpg").read_bytes()


def test_images_are_shown_up_to_the_configured_pixel_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pillow's own limit (89.5 Mpx) is below imgclf's (100 Mpx): `imgclf ui --max-image-pixels` sets the one
    thumbnails and previews are decoded under, as training's."""
    from imgclf.cli import main

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    Image.open(root / "a" / "a_00.jpg").save(root / "a" / "scan.tif")  # no browser shows TIFF: a preview
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow's limit, below the images' pixels
    apps: list[object] = []
    monkeypatch.setattr("imgclf.serving.cli.run_server", lambda app, *_: apps.append(app))  # not served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    assert main(["ui", str(root), "--no-analysis", "--port", port, "--max-image-pixels", "100000"]) == 0
    token = capsys.readouterr().out.split("?token=")[1].split()[0]  # the link printed
    with Server(apps[0]) as server, httpx.Client(base_url=server.url, follow_redirects=True) as client:
        assert client.get("/", params={"token": token}).status_code == 200  # the cookie kept from here on
        assert client.get("/api/thumb", params={"path": "a/a_00.jpg", "size": 48}).status_code == 200
        assert client.get("/api/image", params={"path": "a/scan.tif"}).status_code == 200


def test_ui_offers_only_the_settings_its_analysis_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--backbone auto` started the app and failed in the analysis; `--classifier dnn` was taken and ignored."""
    from imgclf.cli import main

    monkeypatch.setattr("imgclf.serving.cli.run_server", lambda app, *_: None)  # not served

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    assert main(["ui", str(root), "--no-analysis", "--port", port, "--backbone", "auto"]) == 2
    assert "the review app takes a backbone name, not auto" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ui", str(root), "--classifier", "dnn"])
    assert "unrecognized arguments: --classifier dnn" in capsys.readouterr().err
    if socket.has_ipv6:  # the link printed is a URL (it was http://::1:PORT/...)
        assert main(["ui", str(root), "--no-analysis", "--host", "::1", "--port", port]) == 0
        assert f"imgclf review app: http://[::1]:{port}/?token=" in capsys.readouterr().out


def test_thumbnails_are_shown_when_their_cache_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only cache folder answered 409 'the data folder cannot be changed'; it only costs speed."""
    import errno

    import imgclf.ui.thumbs

    def read_only(path: Path, data: bytes) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    root = make_folder(tmp_path / "d", classes=("a", "b"), n=1)
    monkeypatch.setattr(imgclf.ui.thumbs, "atomic_write_bytes", read_only)
    app = create_app(root, analyse_on_start=False, thumbs=ThumbCache(tmp_path / "thumbs"))
    with Server(app) as server, httpx.Client(base_url=server.url) as client, caplog.at_level(logging.WARNING):
        for _ in range(2):
            r = client.get("/api/thumb", params={"path": "a/a_00.jpg", "size": 48})
            assert r.status_code == 200 and max(Image.open(io.BytesIO(r.content)).size) == 48
    assert "thumbnail not kept in" in caplog.text and "Read-only file system" in caplog.text


def test_the_only_image_of_a_class_is_not_ranked_and_cuts_no_folds(tmp_path: Path) -> None:
    """Every image of a one-image class ranked first (p = 0: no head that did not see it knows its class), and
    such a class cut everyone's cross-validation to 2 folds. It is fitted in every fold, listed apart."""
    from imgclf.ui.labels import ALONE, out_of_fold_proba

    rng = np.random.default_rng(0)
    y = np.r_[np.repeat([0, 1, 2], 6), 3]
    x = rng.normal(size=(len(y), 4)) + 4 * np.eye(4)[y]
    fits: list[np.ndarray] = []

    class Head:
        def fit(self, xs: np.ndarray, ys: np.ndarray) -> Head:
            fits.append(ys)
            self.classes_ = np.unique(ys)
            return self

        def predict_proba(self, xs: np.ndarray) -> np.ndarray:
            return np.full((len(xs), len(self.classes_)), 1 / len(self.classes_))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor scikit-learn's "least populated class in y has only 1 members"
        proba = out_of_fold_proba(x, y, 4, Head, folds=5)
    assert len(fits) == 5 and all(3 in ys for ys in fits)  # 5 folds, the lone image on the fitting side of each
    assert proba[-1].sum() == 0 and np.allclose(proba[:-1].sum(axis=1), 1)

    data = make_folder(tmp_path / "d", n=6)
    make_folder(data, classes=("lone",), n=1, seed=3)
    cfg = Config().updated(resolution=64, progress=False, cache_dir=tmp_path / "cache", svm_c_grid=[1.0])
    with Server(create_app(data, cfg=cfg)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert wait_analysis(client)["n_unchecked"] == 1
        sus = client.get("/api/suspects", params={"per_page": 500}).json()
        assert sus["total"] == 18 and "lone/lone_00.jpg" not in {s["path"] for s in sus["items"]}
        assert [s["rank"] for s in sus["items"]] == list(range(1, 19)) and sus["classes"] == sorted([*CLASSES, "lone"])
        assert client.get("/api/unchecked").json()["items"] == [{"path": "lone/lone_00.jpg", "reason": ALONE}]


def fake_run(run: Path, classes: list[str], rows: list[tuple[str, str, str]], svm_c: float | None = None) -> Path:
    """A run folder as the review app reads it: predictions.csv (path, true, predicted) and metrics.json."""
    run.mkdir()
    lines = [",".join(["path", "true_label", "predicted_label", *(f"score_{c}" for c in classes)])]
    lines += [",".join([p, t, q, *("1.0" if c == q else "0.0" for c in classes)]) for p, t, q in rows]
    (run / "predictions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    confusion = [[sum(t == a and q == b for _, t, q in rows) for b in classes] for a in classes]
    metrics = {"classes": classes, "confusion_matrix": confusion} | ({} if svm_c is None else {"svm_c": svm_c})
    (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return run


def test_analysis_fits_one_c_the_runs_or_one_chosen_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The analysis searched the whole C grid in each of the k folds and once more for unlabeled/ (960 images in
    120 classes: 200 s). With a run, its head's C is fitted; without, the grid is searched once."""
    from imgclf.heads.svm import LinearSVMHead

    data = make_folder(tmp_path / "d", n=6)
    make_folder(data / "unlabeled", classes=("new",), n=2, seed=1)
    cfg = Config().updated(resolution=64, progress=False, cache_dir=tmp_path / "cache", cv_folds=3)
    grid = cfg.classifier.svm_c_grid
    used: list[float] = []
    svc = LinearSVMHead._svc
    monkeypatch.setattr(LinearSVMHead, "_svc", lambda self, c: used.append(c) or svc(self, c))
    result = analyse(data, cfg, c=0.3)
    # 3 folds and the head for unlabeled/: each one fit per calibration fold (3) and a final one
    assert used == [0.3] * 16 and len(result.suspects) == 18 and len(result.unlabeled) == 2
    used.clear()
    analyse(data, cfg)
    chosen = used[-1]
    assert all(used.count(c) == 3 for c in grid if c != chosen)  # one search: 3 folds for each C of the grid
    assert used.count(chosen) == 3 + 1 + 3 * 4  # that search's, its final fit, then 3 folds of one C

    run = fake_run(tmp_path / "run", CLASSES, [("circles/circles_00.jpg", "circles", "circles")], svm_c=0.3)
    assert create_app(data, run, cfg, analyse_on_start=False).state.analyzer.c == 0.3
    other_grid = cfg.updated(svm_c_grid=[1.0, 10.0])  # --svm-c-grid without the run's C: searched
    assert create_app(data, run, other_grid, analyse_on_start=False).state.analyzer.c is None


def test_a_decomposed_copy_shows_the_run_of_the_composed_one(tmp_path: Path) -> None:
    """macOS writes names decomposed (NFD); train names classes composed (NFC). On such a copy the app listed
    classes in another order (keys 1-9 moved), 404'd the run's class and its results' thumbnails."""
    import unicodedata

    def nfd(s: str) -> str:
        return unicodedata.normalize("NFD", s)

    classes = ["café", "Ünï"]  # composed "Ü" sorts after "c"; decomposed ("U" + accent) before
    data = tmp_path / "d"
    rng = np.random.default_rng(0)
    for c in classes:
        (data / nfd(c)).mkdir(parents=True)
        for i in range(2):
            draw_image("circles", rng).save(data / nfd(c) / nfd(f"{c}{i}.jpg"))
    rows = [(f"{c}/{c}{i}.jpg", c, classes[0]) for c in classes for i in range(2)]
    run = fake_run(tmp_path / "run", classes, rows)
    before = sha_map(data)
    with Server(create_app(data, run, analyse_on_start=False)) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/api/info").json()["classes"] == classes
        listed = client.get("/api/images", params={"label": "café"}).json()["items"]
        assert [i["path"] for i in listed] == [nfd("café/café0.jpg"), nfd("café/café1.jpg")]
        res = client.get("/api/results", params={"sort": "path"}).json()["items"]
        assert [(r["exists"], r["now"]) for r in res] == [(True, nfd(p)) for p, _, _ in rows]
        assert client.get("/api/thumb", params={"path": "café/café0.jpg"}).status_code == 200
        assert client.get("/api/results", params={"true": nfd("Ünï")}).json()["total"] == 2
        same = client.post("/api/relabel", json={"path": "café/café0.jpg", "label": nfd("café")})
        assert same.status_code == 409 and "already in class" in same.json()["detail"]
        moved = client.post("/api/relabel", json={"path": "café/café0.jpg", "label": "Ünï"}).json()
        assert (moved["from"], moved["to"]) == (nfd("café/café0.jpg"), nfd("Ünï/café0.jpg"))  # the folders on disk
        assert client.get("/api/results", params={"sort": "path"}).json()["items"][0]["now"] == moved["to"]
        assert client.post("/api/undo", json={}).json()["problems"] == []
    assert sha_map(data) == before
