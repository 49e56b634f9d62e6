import hashlib
import io
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import numpy as np
import pytest
from fakeprovider import FakeServer, Route, make_image, run_cli
from helpers import count_concurrent_loads, held_elsewhere
from PIL import Image, ImageOps

from imgclf.config import DataToolsConfig
from imgclf.datatools.download import (
    FAILURES_FILE,
    SOURCES_FILE,
    DownloadInterrupted,
    UrlEntry,
    download,
    file_stem,
    read_url_list,
    write_url_list,
)
from imgclf.datatools.fetch import parse_retry_after
from imgclf.datatools.journal import QUARANTINE_DIR
from imgclf.utils import FolderInUse

FAST = DataToolsConfig(download_workers=4, timeout_s=2.0, retries=2, backoff_s=0.01, max_backoff_s=0.5)


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def _read_tsv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:]]


def _all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_read_url_list(tmp_path: Path):
    f = tmp_path / "urls.tsv"
    f.write_text(
        "\ufeff# a comment\n\ncats\thttp://x/1.jpg\n  # indented comment\n"
        "dogs\thttp://x/2.jpg\thttp://page\tCC BY 4.0\tAda\tA dog\n",
        encoding="utf-8",
    )
    entries = read_url_list(f)
    assert entries == [
        UrlEntry("cats", "http://x/1.jpg"),
        UrlEntry("dogs", "http://x/2.jpg", "http://page", "CC BY 4.0", "Ada", "A dog"),
    ]
    f.write_text("cats\thttp://x/1.jpg\n\n../etc\thttp://x/2.jpg\n")
    with pytest.raises(ValueError, match=r"urls.tsv:3: label '\.\./etc'"):
        read_url_list(f)
    f.write_text("cats http://x/1.jpg\n")
    with pytest.raises(ValueError, match=r"urls.tsv:1: expected label<TAB>url.*tab"):
        read_url_list(f)
    f.write_text("cats http://x/1.jpg\ndogs\thttp://x/2.jpg\n.hidden\thttp://x/3.jpg\n")  # every bad line at once
    with pytest.raises(ValueError, match=r"(?s)2 bad line.*urls.tsv:1: expected.*urls.tsv:3: label '\.hidden'"):
        read_url_list(f)
    f.write_text("Download_Failures.tsv\thttp://x/1.jpg\n")  # its images went into a folder of that name, and the
    with pytest.raises(ValueError, match=r"urls.tsv:1: label 'Download_Failures.tsv' is the name of a file the"):
        read_url_list(f)  # failure report could then not be written: every run ended in an error


def test_download_checks_names_and_reports(server: FakeServer, tmp_path: Path):
    jpeg, png = make_image(1), make_image(2, fmt="PNG", mode="RGBA")
    entries = [
        UrlEntry("cats", server.image("/a.jpg", jpeg), "http://page/a", "CC BY 4.0", "Ada"),
        UrlEntry("cats", server.image("/same-picture-other-url.jpg", jpeg)),
        UrlEntry("dogs", server.image("/b.png", png, "image/png")),
        UrlEntry("dogs", server.url("/a.jpg")),  # the same URL again, other label: fetched once
        UrlEntry("dogs", server.add("/page.html", Route("html"))),
        UrlEntry("dogs", server.image("/truncated.jpg", jpeg[: len(jpeg) // 2])),
        UrlEntry("dogs", server.add("/missing.jpg", Route("404"))),
        UrlEntry("dogs", server.add("/reset.jpg", Route("reset"))),
        UrlEntry("dogs", "ftp://example.invalid/x.jpg"),
    ]
    out = tmp_path / "data"
    report = download(entries, out, FAST, progress=False)
    a, other, b = (file_stem(server.url(p)) for p in ("/a.jpg", "/same-picture-other-url.jpg", "/b.png"))
    assert file_stem(server.url("/a.jpg")) == hashlib.sha1(server.url("/a.jpg").encode()).hexdigest()[:16]
    assert (out / f"cats/{a}.jpg").read_bytes() == jpeg  # no resize or rotation needed: bytes kept
    assert (out / f"cats/{other}.jpg").read_bytes() == jpeg  # same picture, other URL: its own file
    assert (out / f"dogs/{b}.png").read_bytes() == png  # transparency kept as PNG
    assert _all_files(out) == {f"cats/{a}.jpg", f"cats/{other}.jpg", f"dogs/{b}.png", SOURCES_FILE, FAILURES_FILE}
    assert [o.status for o in report.outcomes] == ["downloaded"] * 3 + ["duplicate"] + ["failed"] * 5
    assert server.hits["/a.jpg"] == 1
    assert server.hits["/missing.jpg"] == 1  # 404 is not retried
    assert server.hits["/reset.jpg"] == FAST.retries + 1  # connection errors are
    failures = {r["url"].rsplit("/", 1)[-1]: r["reason"] for r in _read_tsv(out / FAILURES_FILE)}
    assert failures["page.html"].startswith("not an image (text/html)")
    assert failures["truncated.jpg"].startswith("broken image data")
    assert failures["missing.jpg"].startswith("HTTP 404")
    assert failures["reset.jpg"].startswith("connection failed")
    assert failures["x.jpg"].startswith("invalid URL")
    sources = {r["file"]: r for r in _read_tsv(out / SOURCES_FILE)}
    assert sources[f"cats/{a}.jpg"]["licence"] == "CC BY 4.0" and sources[f"cats/{a}.jpg"]["creator"] == "Ada"
    assert sources[f"cats/{a}.jpg"]["note"] == "also listed for dogs"
    assert "failed 5" in report.summary() and "duplicate URLs skipped 1" in report.summary()


def test_resume_skips_existing_and_never_overwrites(server: FakeServer, tmp_path: Path):
    out = tmp_path / "data"
    old_url, new_url = server.image("/old.jpg", make_image(3)), server.image("/new.jpg", make_image(4))
    existing = out / "cats" / f"{file_stem(old_url)}.jpg"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"the user's own bytes")
    entries = [UrlEntry("cats", old_url), UrlEntry("cats", new_url)]
    report = download(entries, out, FAST, progress=False)
    assert [o.status for o in report.outcomes] == ["exists", "downloaded"]
    assert existing.read_bytes() == b"the user's own bytes" and server.hits["/old.jpg"] == 0
    before = {p: p.read_bytes() for p in out.rglob("*.jpg")}
    again = download(entries, out, FAST, progress=False)
    assert [o.status for o in again.outcomes] == ["exists", "exists"] and server.hits["/new.jpg"] == 1
    assert {p: p.read_bytes() for p in out.rglob("*.jpg")} == before
    assert len(_read_tsv(out / SOURCES_FILE)) == 2


def test_images_removed_since_they_were_downloaded_are_not_fetched_again(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A re-run (or a scrape with one more item) downloaded again the images the user had deleted, or whose
    dedup quarantine was deleted as the docs say; a sources.tsv of another's was rewritten; a second download
    into the folder at once lost entries."""
    out, urls = tmp_path / "data", tmp_path / "urls.tsv"
    write_url_list(urls, [UrlEntry("cats", server.image(f"/{i}.jpg", make_image(30 + i))) for i in range(3)])
    assert run_cli(["download", str(urls), "--out", str(out)]) == 0
    gone = sorted((out / "cats").iterdir())[0]
    gone.unlink()
    capsys.readouterr()
    assert run_cli(["download", str(urls), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "downloaded 0, already present 2" in said and not gone.exists()
    assert "not fetched again: 1 image(s) sources.tsv lists as downloaded before and removed" in said
    assert "--refetch-removed fetches them" in said and len(_read_tsv(out / SOURCES_FILE)) == 3
    assert run_cli(["download", str(urls), "--out", str(out), "--refetch-removed"]) == 0
    assert "downloaded 1, already present 2" in capsys.readouterr().out and gone.exists()
    with held_elsewhere(out):  # while a scrape, download or dedup --apply runs; from Python too
        with pytest.raises(FolderInUse, match="download, scrape or review app is changing"):
            run_cli(["download", str(urls), "--out", str(out)])
        with pytest.raises(FolderInUse, match="download, scrape or review app is changing"):
            download(read_url_list(urls), out, DataToolsConfig(), progress=False)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / SOURCES_FILE).write_text("file\tphotographer\tapproved_by\nred/a.jpg\tAda\tBob\n")
    with pytest.raises(ValueError, match=r"sources\.tsv is not a list of sources that imgclf wrote"):
        run_cli(["download", str(urls), "--out", str(theirs)])
    assert (theirs / SOURCES_FILE).read_text() == "file\tphotographer\tapproved_by\nred/a.jpg\tAda\tBob\n"
    assert _all_files(theirs) == {SOURCES_FILE}


def test_size_limit_stops_streaming(server: FakeServer, tmp_path: Path):
    cfg = FAST.model_copy(update={"max_download_mb": 1.0})
    entries = [
        UrlEntry("x", server.add("/declared.jpg", Route("big", size=50_000_000))),
        UrlEntry("x", server.add("/undeclared.jpg", Route("big", size=3_000_000, declare_length=False))),
    ]
    start = time.perf_counter()
    report = download(entries, tmp_path / "d", cfg, progress=False)
    assert time.perf_counter() - start < 5
    assert all(o.status == "failed" and o.reason.startswith("larger than 1 MB") for o in report.outcomes)
    assert _all_files(tmp_path / "d") == {SOURCES_FILE, FAILURES_FILE}  # no partial or temporary file


def test_exif_orientation_then_resize_and_originals(server: FakeServer, tmp_path: Path):
    raw = make_image(5, size=(1600, 800), exif_orientation=6)  # stored landscape, shown portrait
    url = server.image("/rotated.jpg", raw)
    cfg = FAST.model_copy(update={"max_side": 1000, "keep_originals": True})
    download([UrlEntry("x", url)], tmp_path / "d", cfg, progress=False)
    saved = Image.open(tmp_path / "d" / "x" / f"{file_stem(url)}.jpg")
    assert saved.size == (500, 1000)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).convert("RGB").resize((500, 1000))
    assert np.abs(np.asarray(saved, dtype=float) - np.asarray(expected, dtype=float)).mean() < 6
    assert (tmp_path / "d" / ".originals" / "x" / f"{file_stem(url)}.jpg").read_bytes() == raw
    download([UrlEntry("y", url)], tmp_path / "full", cfg.model_copy(update={"max_side": 0}), progress=False)
    assert Image.open(tmp_path / "full" / "y" / f"{file_stem(url)}.jpg").size == (800, 1600)  # upright, full
    large = server.image("/large.jpg", make_image(11, size=(2400, 1800)))  # JPEG draft at 1/2, then resize
    download([UrlEntry("z", large)], tmp_path / "d", cfg, progress=False)
    assert Image.open(tmp_path / "d" / "z" / f"{file_stem(large)}.jpg").size == (1000, 750)
    # a progressive JPEG of very many scans (minutes of decoding) is refused before it is decoded
    progressive = io.BytesIO()
    Image.new("L", (64, 64), 128).save(progressive, "JPEG", progressive=True)
    data = progressive.getvalue()
    scans = data[:-2] + data[data.rindex(b"\xff\xda") : -2] * 150 + data[-2:]
    report = download([UrlEntry("s", server.image("/scans.jpg", scans))], tmp_path / "d", cfg, progress=False)
    assert report.outcomes[0].status == "failed" and "progressive JPEG of 156 scans" in report.outcomes[0].reason
    # a colour key (tRNS on an RGB PNG) stays transparency when the image is made smaller
    keyed = io.BytesIO()
    Image.new("RGB", (1200, 600), (0, 0, 0)).save(keyed, "PNG", transparency=(0, 0, 0))
    url = server.image("/keyed.png", keyed.getvalue())
    download([UrlEntry("k", url)], tmp_path / "d", cfg, progress=False)
    with Image.open(tmp_path / "d" / "k" / f"{file_stem(url)}.png") as saved:
        assert saved.size == (1000, 500) and saved.convert("RGBA").getextrema()[3] == (0, 0)
    # but not on a 16-bit grey image, whose 8-bit scaling leaves the key out: it was saved nearly all white
    ramp = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 65535, 1200), (600, 1)).astype(np.uint16)).save(ramp, "PNG", transparency=0)
    url = server.image("/ramp16.png", ramp.getvalue())
    download([UrlEntry("r", url)], tmp_path / "d", cfg, progress=False)
    with Image.open(tmp_path / "d" / "r" / f"{file_stem(url)}.jpg") as saved:
        row = np.asarray(saved.convert("L"))[250]
    assert saved.size == (1000, 500) and abs(int(row[500]) - 128) < 6 and row[50] < 20


def test_retry_after_honoured_and_bounded(server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import imgclf.datatools.fetch as fetch

    waits: list[float] = []  # the waits asked for, not the clock: the same on a busy machine
    delay = fetch.RetryPolicy.delay
    monkeypatch.setattr(fetch.RetryPolicy, "delay", lambda *a: waits.append(delay(*a)) or 0.0)
    polite = server.add("/polite.jpg", Route("429", make_image(6), times=1, retry_after="1"))
    cfg = FAST.model_copy(update={"max_backoff_s": 5.0})
    report = download([UrlEntry("x", polite)], tmp_path / "d", cfg, progress=False)
    assert report.outcomes[0].status == "downloaded" and waits == [1.0]
    greedy = server.add("/greedy.jpg", Route("429", make_image(7), times=2, retry_after="3600"))
    waits.clear()
    report = download(
        [UrlEntry("x", greedy)], tmp_path / "d", cfg.model_copy(update={"max_backoff_s": 0.1}), progress=False
    )
    assert report.outcomes[0].status == "downloaded" and len(waits) == 2 and max(waits) <= 0.1
    assert server.hits["/greedy.jpg"] == 3
    stubborn = server.add("/stubborn.jpg", Route("429", make_image(8), times=99, retry_after="0"))
    report = download([UrlEntry("x", stubborn)], tmp_path / "d", FAST, progress=False)
    assert report.outcomes[0].reason == "HTTP 429 Too Many Requests after 3 tries"


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None

    def http_date(delta: timedelta) -> str:
        return format_datetime(datetime.now(UTC) + delta, usegmt=True)

    assert parse_retry_after(http_date(timedelta(hours=-1))) == 0.0
    assert 50 < (parse_retry_after(http_date(timedelta(seconds=60))) or 0) <= 60


def test_slow_server_times_out(server: FakeServer, tmp_path: Path):
    url = server.add("/slow.jpg", Route("slow", make_image(9), delay=1.5))
    cfg = FAST.model_copy(update={"timeout_s": 0.2, "retries": 0})
    report = download([UrlEntry("x", url)], tmp_path / "d", cfg, progress=False)
    assert report.outcomes[0].reason.startswith("timed out")  # given up before the server's 1.5 s answer


def test_a_server_sending_slowly_is_given_up_at_the_timeout(server: FakeServer, tmp_path: Path):
    """Each read within the read timeout, a byte every 0.1 s: a run waited for ever (a hostile or broken host in
    a URL list); the whole body must now come within --timeout-s, and the next URL is fetched."""
    slow = server.add("/trickle.jpg", Route("trickle", delay=0.1, size=300))  # 30 s for the whole body
    fine = server.image("/fine.jpg", make_image(9))
    cfg = FAST.model_copy(update={"timeout_s": 0.5, "retries": 0})
    start = time.monotonic()
    report = download([UrlEntry("x", slow), UrlEntry("x", fine)], tmp_path / "d", cfg, progress=False)
    assert time.monotonic() - start < 10
    assert report.outcomes[0].reason.startswith("not all received within 0.5 s"), report.outcomes[0].reason
    assert report.outcomes[1].status == "downloaded"


def test_download_cli(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    urls = tmp_path / "urls.tsv"
    urls.write_text(
        f"# label\turl\ncats\t{server.image('/c.jpg', make_image(10))}\ndogs\t{server.add('/gone.jpg', Route('404'))}\n"
    )
    out = tmp_path / "data"
    assert run_cli(["download", str(urls), "--out", str(out), "--retries", "0"]) == 0
    assert "downloaded 1, already present 0, failed 1" in capsys.readouterr().out
    assert len(list((out / "cats").iterdir())) == 1
    assert run_cli(["download", str(urls), "--out", str(out)]) == 0
    assert "downloaded 0, already present 1, failed 1" in capsys.readouterr().out


def test_rerun_keeps_relabelled_images_in_their_new_class(server: FakeServer, tmp_path: Path):
    entries = [
        UrlEntry("cats", server.image("/a.jpg", make_image(12))),
        UrlEntry("cats", server.image("/b.jpg", make_image(13))),
        UrlEntry("dogs", server.image("/c.jpg", make_image(14))),
        UrlEntry("dogs", server.image("/d.png", make_image(15, fmt="PNG", mode="RGBA"), "image/png")),
    ]
    out = tmp_path / "data"
    download(entries, out, FAST, progress=False)
    a, d = file_stem(server.url("/a.jpg")), file_stem(server.url("/d.png"))
    (out / f"cats/{a}.jpg").rename(out / f"dogs/{a}.jpg")  # relabelled, keeping its name
    (out / QUARANTINE_DIR / "cats").mkdir(parents=True)  # relabelled, then quarantined by dedup
    (out / f"dogs/{d}.png").rename(out / QUARANTINE_DIR / f"cats/{d}.png")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.suffix in (".jpg", ".png")}
    report = download(entries, out, FAST, progress=False)
    assert [o.status for o in report.outcomes] == ["exists"] * 4
    assert all(server.hits[p] == 1 for p in ("/a.jpg", "/b.jpg", "/c.jpg", "/d.png"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.suffix in (".jpg", ".png")} == before
    assert not (out / f"cats/{a}.jpg").exists() and not (out / f"dogs/{d}.png").exists()
    assert (report.outcomes[0].file, report.outcomes[0].reason) == (f"dogs/{a}.jpg", "in class dogs, listed for cats")
    assert report.outcomes[3].file == f"{QUARANTINE_DIR}/cats/{d}.png"
    assert report.outcomes[3].reason == "in class cats, listed for dogs"
    assert "already present 4 (2 in another class)" in report.summary()
    sources = {r["file"]: r for r in _read_tsv(out / SOURCES_FILE)}
    assert sources[f"dogs/{a}.jpg"]["label"] == "dogs" and sources[f"dogs/{a}.jpg"]["url"] == server.url("/a.jpg")


def test_line_separators_stay_inside_their_cell(server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    separators = "\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
    url = server.image("/sep.jpg", make_image(16))
    entry = UrlEntry("cats", url, "http://page", "CC\u2029BY", "Ada\x85Lovelace", f"Sunset{separators}over the bay")
    listed = tmp_path / "urls.tsv"
    write_url_list(listed, [entry])
    assert read_url_list(listed) == [
        UrlEntry("cats", url, "http://page", "CC BY", "Ada Lovelace", "Sunset over the bay")
    ]
    out = tmp_path / "data"
    download([entry], out, FAST, progress=False)
    assert len((out / SOURCES_FILE).read_text(encoding="utf-8").splitlines()) == 2  # header and one row
    [row] = _read_tsv(out / SOURCES_FILE)
    assert (row["licence"], row["creator"], row["title"]) == ("CC BY", "Ada Lovelace", "Sunset over the bay")
    # files written before the fix, with a separator inside a cell, still read correctly
    listed.write_text(f"cats\t{url}\t\t\t\tSunset\u2028over\x0cthe bay\r\ndogs\t{url}2\r\n", encoding="utf-8")
    assert [(e.label, e.title) for e in read_url_list(listed)] == [
        ("cats", "Sunset\u2028over\x0cthe bay"),
        ("dogs", ""),
    ]
    listed.write_text(f"a\u2028b\t{url}\n", encoding="utf-8")  # a label is a folder name: none in it
    with pytest.raises(ValueError, match=r"urls.tsv:1: label 'a\\u2028b' cannot be a folder name"):
        read_url_list(listed)
    for label in (
        "what?",
        "a:b",
        "CON",
        "nul.txt",
        "dots...",
        "a\x01b",
        "COM0",
        "LPT¹",
    ):  # folders Windows cannot hold (or makes a stream)
        listed.write_text(f"{label}\t{url}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=r"urls.tsv:1: label .* cannot be a folder name on Windows"):
            read_url_list(listed)
    listed.write_text(f"Bee\t{url}\nbee\t{url}2\nconsole\t{url}3\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert [e.label for e in read_url_list(listed)] == ["Bee", "bee", "console"]
    assert "labels 'Bee' and 'bee' differ only in letter case" in caplog.text
    sources = out / SOURCES_FILE
    sources.write_text(sources.read_text(encoding="utf-8").replace("Ada Lovelace", "Ada\u2028Lovelace"), "utf-8")
    download([entry], out, FAST, progress=False)
    assert [r["creator"] for r in _read_tsv(sources)] == ["Ada Lovelace"]


def _with_damaged_exif(seed: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(make_image(seed, size))).save(buf, "JPEG", dpi=(72, 72))  # as cameras write them
    jpeg, payload = buf.getvalue(), b"Exif\x00\x00" + b"\x00" * 40  # an APP1 block that is no TIFF structure
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def test_only_readable_formats_are_stored_and_a_damaged_exif_block_fails_nothing(server: FakeServer, tmp_path: Path):
    """PostScript (which would run Ghostscript) and icons are refused; an image with a damaged EXIF block is
    stored byte for byte where it needs no shrinking, else shrunk as stored (unrotated)."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\n%%EOF\n"
    icon = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(icon, "ICO")
    small, large = _with_damaged_exif(12, (40, 30)), _with_damaged_exif(13, (800, 600))
    entries = [
        UrlEntry("x", server.image("/drawing.jpg", eps)),
        UrlEntry("x", server.image("/icon.png", icon.getvalue(), "image/png")),
        UrlEntry("x", server.image("/small.jpg", small)),
        UrlEntry("x", server.image("/large.jpg", large)),
    ]
    report = download(entries, tmp_path / "d", FAST.model_copy(update={"max_side": 400}), progress=False)
    assert [(o.status, o.reason.split(" (")[0]) for o in report.outcomes] == [
        ("failed", "not an image"),
        ("failed", "not an image"),
        ("downloaded", ""),
        ("downloaded", ""),
    ]
    assert (tmp_path / "d" / report.outcomes[2].file).read_bytes() == small
    assert Image.open(tmp_path / "d" / report.outcomes[3].file).size == (400, 300)


def test_redirect_loop_and_undecodable_body_are_reported_as_such(server: FakeServer, tmp_path: Path):
    entries = [
        UrlEntry("x", server.add("/loop.jpg", Route("redirect", location=server.url("/loop.jpg")))),
        UrlEntry("x", server.add("/gz.jpg", Route("image", b"not gzip", headers={"Content-Encoding": "gzip"}))),
        UrlEntry("x", server.add("/moved.jpg", Route("redirect", location=server.image("/a.jpg", make_image(40))))),
    ]
    report = download(entries, tmp_path / "d", FAST, progress=False)
    assert [(o.status, o.reason.split(" (")[0]) for o in report.outcomes] == [
        ("failed", "redirect loop"),
        ("failed", "body could not be decoded"),
        ("downloaded", ""),
    ]
    assert server.hits["/loop.jpg"] == 21 and server.hits["/gz.jpg"] == 1  # neither is retried
    assert "failures: 1 redirect loop, 1 body could not be decoded" in report.summary()


def test_ctrl_c_stops_at_once_and_records_what_was_stored(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """In-flight requests are abandoned and pending ones never start; the files stored are in sources.tsv."""
    import imgclf.datatools.download as dl

    fast = [UrlEntry("x", server.image(f"/f{i}.jpg", make_image(41 + i))) for i in range(2)]
    slow = [UrlEntry("y", server.add(f"/slow{i}.jpg", Route("slow", make_image(43), delay=10))) for i in range(4)]
    cfg = FAST.model_copy(update={"download_workers": 2, "timeout_s": 30.0, "retries": 3})
    sent: list[float] = []

    def ctrl_c_once_both_workers_wait(
        run: object, seen: int, timeout: float
    ) -> int:  # each took a fast entry, then a slow one
        while server.hits["/slow0.jpg"] + server.hits["/slow1.jpg"] < 2:
            time.sleep(0.01)
        sent.append(time.perf_counter())
        raise KeyboardInterrupt  # where Ctrl-C meets the main thread: waiting for the workers

    monkeypatch.setattr(dl._Run, "wait", ctrl_c_once_both_workers_wait)
    out = tmp_path / "d"
    with pytest.raises(DownloadInterrupted) as interrupted:
        download(fast + slow, out, cfg, progress=False)
    assert time.perf_counter() - sent[0] < 2  # not the 10 s the slow answers take
    report = interrupted.value.report
    assert [o.status for o in report.outcomes] == ["downloaded"] * 2 + ["not done"] * 4
    assert "interrupted: 4 URL(s) not done; the same command again resumes" in report.summary()
    assert sorted(r["url"] for r in _read_tsv(out / SOURCES_FILE)) == sorted(e.url for e in fast)
    assert _read_tsv(out / FAILURES_FILE) == []
    assert server.hits["/slow2.jpg"] == server.hits["/slow3.jpg"] == 0
    monkeypatch.undo()
    for i in range(4):
        server.image(f"/slow{i}.jpg", make_image(44 + i))
    again = download(fast + slow, out, cfg, progress=False)  # the same command resumes
    assert [o.status for o in again.outcomes] == ["exists"] * 2 + ["downloaded"] * 4
    assert len(_read_tsv(out / SOURCES_FILE)) == 6


def test_sources_are_saved_during_the_run(server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A run killed while one download hangs keeps the sources of the files it stored before."""
    import imgclf.datatools.download as dl

    monkeypatch.setattr(dl, "SOURCES_EVERY_S", 0.05)
    fast = [UrlEntry("x", server.image(f"/f{i}.jpg", make_image(61 + i))) for i in range(2)]
    slow = UrlEntry("y", server.add("/slow.jpg", Route("slow", make_image(63), delay=3)))
    out = tmp_path / "d"
    cfg = FAST.model_copy(update={"download_workers": 1, "timeout_s": 30.0})
    worker = threading.Thread(target=download, args=([*fast, slow], out, cfg), kwargs={"progress": False})
    worker.start()
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline and not (
        (out / SOURCES_FILE).is_file() and len(_read_tsv(out / SOURCES_FILE)) == 2
    ):
        time.sleep(0.02)
    assert worker.is_alive()  # the slow image is still being sent
    assert sorted(r["url"] for r in _read_tsv(out / SOURCES_FILE)) == sorted(e.url for e in fast)
    worker.join()
    assert len(_read_tsv(out / SOURCES_FILE)) == 3


def test_large_images_are_decoded_one_at_a_time(server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Decoding takes its pixels from a budget: images larger than what is free wait (memory stays bounded)."""
    import imgclf.datatools.download as dl

    monkeypatch.setattr(dl, "DECODING", dl.PixelBudget(100_000))  # each 400x300 image takes it all
    peak = count_concurrent_loads(monkeypatch, 0.05)
    entries = [UrlEntry("x", server.image(f"/l{i}.png", make_image(50 + i, (400, 300), "PNG"))) for i in range(4)]
    report = download(entries, tmp_path / "d", FAST, progress=False)
    assert [o.status for o in report.outcomes] == ["downloaded"] * 4
    assert peak[0] == 1


def test_a_folder_given_as_url_list_is_named(tmp_path: Path):
    with pytest.raises(IsADirectoryError, match="is a folder: give the URL list"):  # was "URL list not found"
        read_url_list(tmp_path)


def test_url_list_not_utf8_names_the_file_and_the_fix(tmp_path: Path):
    f = tmp_path / "urls.tsv"
    f.write_text("cats\thttp://x/1.jpg\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"urls.tsv is not UTF-8 text \(it is UTF-16\).*save the file as UTF-8"):
        read_url_list(f)
    f.write_text("café\thttp://x/1.jpg\n", encoding="latin-1")
    with pytest.raises(ValueError, match=r"urls.tsv is not UTF-8 text: byte 0xe9 at position 3 .*save the file"):
        read_url_list(f)


def test_names_too_long_for_the_file_system(server: FakeServer, tmp_path: Path):
    f = tmp_path / "urls.tsv"
    f.write_text(f"{'é' * 128}\thttp://x/1.jpg\n", encoding="utf-8")  # 256 bytes
    with pytest.raises(ValueError, match=r"urls.tsv:1: label 'é+'... is too long for a folder name \(256 bytes"):
        read_url_list(f)
    room = 4050 - len(str(tmp_path))  # a data folder (and its reports) within Linux's 4096 bytes a path
    deep = tmp_path.joinpath(*["d" * 199] * (room // 200), "d" * max(1, room % 200 - 1))
    entries = [UrlEntry("x" * 60, server.image("/deep.jpg", make_image(60)))]  # its class folder is not
    report = download(entries, deep, FAST, progress=False)
    assert report.outcomes[0].reason.startswith("cannot write: File name too long (in ")
    assert "failures: 1 cannot write: File name too long\n" in report.summary()
