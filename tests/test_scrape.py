import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fakeprovider import FakeServer, Route, make_image, run_cli

from imgclf.config import DataToolsConfig
from imgclf.datatools.download import FAILURES_FILE, download, file_stem, read_url_list
from imgclf.datatools.fetch import RetryPolicy, make_client
from imgclf.datatools.journal import QUARANTINE_DIR
from imgclf.datatools.providers import BingProvider, OpenverseProvider, ProviderError, make_provider
from imgclf.datatools.scrape import build_queries, parse_terms, scrape

FAST = DataToolsConfig(download_workers=4, timeout_s=2.0, retries=1, backoff_s=0.01, max_backoff_s=0.2)
POLICY = RetryPolicy(retries=1, backoff_s=0.01)


@pytest.fixture
def server():
    with FakeServer(bing_key="secret-key-123") as s:
        yield s


def _results(server: FakeServer, query: str, n: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {
            "url": server.url(f"/{query.replace(' ', '_')}/{i}.jpg"),
            "page": f"http://page/{i}",
            "creator": f"creator {i}",
            "title": f"title {i}",
            "licence": "by-sa",
        }
        for i in range(start, start + n)
    ]


def test_queries_and_terms():
    assert parse_terms(" striped, dotted,,striped ", "--attributes") == ["striped", "dotted"]
    with pytest.raises(ValueError, match="--items: give at least one term"):
        parse_terms(" , ", "--items")
    assert build_queries(["blouse", "shirt"], ["striped"]) == [
        ("striped blouse", "striped"),
        ("striped shirt", "striped"),
    ]
    with pytest.raises(ValueError, match="--attributes: label 'a/b'"):
        build_queries(["blouse"], ["a/b"])


def test_openverse_pages_until_n(server: FakeServer, monkeypatch: pytest.MonkeyPatch):
    server.results["striped blouse"] = _results(server, "striped blouse", 45)
    server.results["rare"] = _results(server, "rare", 5)
    monkeypatch.setenv("IMGCLF_OPENVERSE_TOKEN", "tok-456")
    with make_client(2.0) as client:
        provider = make_provider("openverse", client, server.base_url, POLICY)
        found = provider.search("striped blouse", 30)
        assert [r.url for r in found] == [r["url"] for r in server.results["striped blouse"][:30]]
        assert (found[0].source_page, found[0].licence, found[0].creator, found[0].title) == (
            "http://page/0",
            "by-sa 4.0",
            "creator 0",
            "title 0",
        )
        assert len(provider.search("rare", 50)) == 5
        server.openverse_max_page = 1
        assert len(provider.search("striped blouse", 30)) == 20  # page 2 refused: page 1 is kept
    paths = [p for p, _ in server.requests[:3]]
    assert paths == [
        "/v1/images/?q=striped+blouse&page=1&page_size=20",
        "/v1/images/?q=striped+blouse&page=2&page_size=20",
        "/v1/images/?q=rare&page=1&page_size=20",
    ]
    assert all(h["Authorization"] == "Bearer tok-456" for _, h in server.requests)


def test_bing_offsets_and_key(server: FakeServer, monkeypatch: pytest.MonkeyPatch):
    server.results["dotted shirt"] = _results(server, "dotted shirt", 200)
    monkeypatch.delenv("IMGCLF_BING_KEY", raising=False)
    with make_client(2.0) as client:
        with pytest.raises(ProviderError, match="set the environment variable IMGCLF_BING_KEY"):
            make_provider("bing", client, server.base_url, POLICY)
        monkeypatch.setenv("IMGCLF_BING_KEY", "secret-key-123")
        found = make_provider("bing", client, server.base_url, POLICY).search("dotted shirt", 160)
        assert [r.url for r in found] == [r["url"] for r in server.results["dotted shirt"][:160]]
        assert (found[3].source_page, found[3].title) == ("http://page/3", "title 3")
        with pytest.raises(ProviderError, match="HTTP 401") as err:
            BingProvider(client, server.base_url, POLICY, key="wrong-key").search("dotted shirt", 5)
        assert "wrong-key" not in str(err.value)
    assert [p for p, _ in server.requests[:2]] == [
        "/v7.0/images/search?q=dotted+shirt&count=150&offset=0",
        "/v7.0/images/search?q=dotted+shirt&count=10&offset=150",
    ]
    assert server.requests[0][1]["Ocp-Apim-Subscription-Key"] == "secret-key-123"


def test_scrape_lists_each_url_once_under_its_first_label(server: FakeServer, tmp_path: Path):
    shared = server.image("/shared.jpg", make_image(1))
    server.results["striped shirt"] = [{"url": server.image("/s.jpg", make_image(2))}, {"url": shared}]
    server.results["dotted shirt"] = [{"url": shared}, {"url": server.image("/d.jpg", make_image(3))}]
    with make_client(2.0) as client:
        report = scrape(
            ["shirt"],
            ["striped", "dotted"],
            tmp_path / "d",
            FAST,
            progress=False,
            provider=OpenverseProvider(client, server.base_url, POLICY),
        )
    entries = read_url_list(tmp_path / "d" / "urls.tsv")
    assert [(e.label, e.url.rsplit("/", 1)[-1]) for e in entries] == [
        ("striped", "s.jpg"),
        ("striped", "shared.jpg"),
        ("dotted", "d.jpg"),
    ]
    assert entries[1].note == "query 'striped shirt'; also found for 'dotted shirt'"
    assert server.hits["/shared.jpg"] == 1 and report.download is not None
    assert report.download.count("downloaded") == 3
    assert sorted(p.parent.name for p in (tmp_path / "d").rglob("*.jpg")) == ["dotted", "striped", "striped"]
    assert "warning" not in report.summary()
    server.results["leopard shirt"] = [{"url": shared}]  # only an image listed under an earlier attribute
    with make_client(2.0) as client:
        provider = OpenverseProvider(client, server.base_url, POLICY)
        report = scrape(["shirt"], ["striped", "leopard"], tmp_path / "e", FAST, progress=False, provider=provider)
    assert "warning: no image listed for 'leopard': its class folder stays empty" in report.summary()


def test_scrape_cli_fails_clearly_when_every_search_fails(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("IMGCLF_BING_KEY", "not-the-key")
    code = run_cli(
        [
            "scrape",
            "--items",
            "shirt",
            "--attributes",
            "striped",
            "--out",
            str(tmp_path / "d"),
            "--provider",
            "bing",
            "--provider-url",
            server.base_url,
            "--retries",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "every search failed" in err and "HTTP 401" in err and "not-the-key" not in err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_acceptance_scrape_then_dedup_apply_and_undo(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """3 attributes x 3 items x 20 results, 10 % broken links, 10 % duplicate pictures under other URLs."""
    attributes, items = ["striped", "dotted", "leopard"], ["blouse", "hoodie", "shirt"]
    expected: dict[str, set[str]] = {a: set() for a in attributes}  # sha256 of each class's distinct pictures
    pictures: dict[tuple[str, str, int], bytes] = {}
    seed = 0
    for a in attributes:
        for item in items:
            for k in range(16):
                seed += 1
                pictures[a, item, k] = make_image(seed)
                expected[a].add(hashlib.sha256(pictures[a, item, k]).hexdigest())
    for a in attributes:
        for j, item in enumerate(items):
            query, results = f"{a} {item}", []
            for k in range(16):
                results.append(
                    {
                        "url": server.image(f"/{a}/{item}/{k}.jpg", pictures[a, item, k]),
                        "page": f"http://shop/{a}/{item}/{k}",
                        "creator": "someone",
                        "title": f"{a} {item}",
                    }
                )
            for k in range(2):  # duplicates: a picture of another query of the same class, under a new URL
                picture = pictures[a, items[(j + 1) % 3], k]
                results.append({"url": server.image(f"/{a}/{item}/dup{k}.jpg", picture)})
            results.append({"url": server.add(f"/{a}/{item}/gone.jpg", Route("404"))})
            results.append({"url": server.add(f"/{a}/{item}/reset.jpg", Route("reset"))})
            server.results[query] = results
    out = tmp_path / "fashion"
    monkeypatch.delenv("IMGCLF_OPENVERSE_TOKEN", raising=False)
    assert (
        run_cli(
            [
                "scrape",
                "--items",
                ",".join(items),
                "--attributes",
                ",".join(attributes),
                "--per-query",
                "20",
                "--out",
                str(out),
                "--provider-url",
                server.base_url,
                "--retries",
                "1",
                "--backoff-s",
                "0.01",
                "--timeout-s",
                "5",
            ]
        )
        == 0
    )
    assert len(read_url_list(out / "urls.tsv")) == 180
    failures = (out / FAILURES_FILE).read_text().splitlines()[1:]
    assert len(failures) == 18 and all(("gone.jpg" in f) != ("reset.jpg" in f) for f in failures)

    def images() -> dict[str, str]:
        return {p.relative_to(out).as_posix(): _sha(p) for p in sorted(out.rglob("*.jpg"))}

    downloaded = images()
    assert len(downloaded) == 162
    assert run_cli(["dedup", str(out), "--apply"]) == 0
    after = images()
    kept = {k: v for k, v in after.items() if not k.startswith(QUARANTINE_DIR)}
    for a in attributes:  # exactly one copy of each distinct picture, in its class folder
        in_class = [v for k, v in kept.items() if k.startswith(f"{a}/")]
        assert Counter(in_class) == Counter(expected[a])
    assert len(kept) == 144 and len(after) == 162  # the 18 extra copies are quarantined, none deleted
    assert Counter(after.values()) == Counter(downloaded.values())
    assert {k.removeprefix(f"{QUARANTINE_DIR}/"): v for k, v in after.items()} == downloaded
    assert run_cli(["dedup", str(out), "--undo"]) == 0
    assert images() == downloaded


def test_bing_scrape_never_writes_or_prints_the_key(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    server.results["striped shirt"] = [{"url": server.image("/b.jpg", make_image(5)), "title": "b"}]
    monkeypatch.setenv("IMGCLF_BING_KEY", "secret-key-123")
    out = tmp_path / "d"
    assert (
        run_cli(
            [
                "scrape",
                "--items",
                "shirt",
                "--attributes",
                "striped",
                "--out",
                str(out),
                "--provider",
                "bing",
                "--provider-url",
                server.base_url,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "downloaded 1" in captured.out
    assert not any(b"secret-key-123" in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert "secret-key-123" not in captured.out + captured.err


def test_scrape_with_line_separators_in_titles(server: FakeServer, tmp_path: Path):
    server.results["striped shirt"] = [
        {"url": server.image("/t.jpg", make_image(6)), "title": "Sunset\u2028over the bay", "creator": "Ada\x85L"}
    ]
    with make_client(2.0) as client:
        report = scrape(
            ["shirt"],
            ["striped"],
            tmp_path / "d",
            FAST,
            progress=False,
            provider=OpenverseProvider(client, server.base_url, POLICY),
        )
    assert report.download is not None and report.download.count("downloaded") == 1
    [entry] = read_url_list(tmp_path / "d" / "urls.tsv")
    assert (entry.title, entry.creator) == ("Sunset over the bay", "Ada L")
    assert len((tmp_path / "d" / "sources.tsv").read_text(encoding="utf-8").splitlines()) == 2


def _answering(pages: list[dict[str, object]]) -> httpx.Client:
    """A client whose every request gets the next of ``pages`` as its JSON answer (infinity as ``Infinity``)."""
    answers = iter(pages)
    return httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(200, text=json.dumps(next(answers)))))


@pytest.mark.parametrize("bad", ["many", [2], {"n": 2}, float("inf")])
def test_non_numeric_paging_keeps_the_results_so_far(bad: object, caplog: pytest.LogCaptureFixture):
    def openverse(i: int, page_count: object) -> dict[str, object]:
        return {"page_count": page_count, "results": [{"url": f"http://img/{i}-{k}.jpg"} for k in range(2)]}

    with _answering([openverse(1, 3), openverse(2, bad)]) as client:
        provider = OpenverseProvider(client, "http://search", POLICY)
        provider.page_size = 2
        found = provider.search("q", 6)
    assert [r.url for r in found] == [
        "http://img/1-0.jpg",
        "http://img/1-1.jpg",
        "http://img/2-0.jpg",
        "http://img/2-1.jpg",
    ]
    assert "page_count" in caplog.text and "keeping the 4 result(s)" in caplog.text

    def bing(offset: object, n: int) -> dict[str, object]:
        return {"nextOffset": offset, "value": [{"contentUrl": f"http://img/{k}.jpg"} for k in range(n)]}

    with _answering([bing(2, 2), bing(bad, 2)]) as client:
        found = BingProvider(client, "http://search", POLICY, key="k").search("q", 10)
    assert [r.url for r in found] == [f"http://img/{k}.jpg" for k in (0, 1, 0, 1)]
    assert "nextOffset" in caplog.text
    with (
        _answering([bing(bad, 0) | {"value": [{"no": "url"}]}]) as client,
        pytest.raises(
            ProviderError, match=r"bing search for 'q' at http://search/v7.0/images/search failed: .*nextOffset"
        ),
    ):
        BingProvider(client, "http://search", POLICY, key="k").search("q", 10)
    with _answering([openverse(1, 3), {"results": 7}]) as client:  # a list that is none
        provider = OpenverseProvider(client, "http://search", POLICY)
        provider.page_size = 2
        assert [r.url for r in provider.search("q", 6)] == ["http://img/1-0.jpg", "http://img/1-1.jpg"]
    assert "malformed answer (results '7' is not a list)" in caplog.text
    with _answering([{"value": 7}]) as client, pytest.raises(ProviderError, match="value '7' is not a list"):
        BingProvider(client, "http://search", POLICY, key="k").search("q", 10)


def test_one_bad_search_answer_fails_its_query_only(server: FakeServer, tmp_path: Path):
    server.search_routes["striped shirt"] = Route("redirect", location=server.url("/v1/images/"))  # forever
    gzip = {"Content-Encoding": "gzip"}
    server.search_routes["dotted shirt"] = Route("image", b"not gzip", "application/json", headers=gzip)
    server.search_routes["plain shirt"] = Route("image", b"[" * 100_000, "application/json")  # nested too deep
    server.results["leopard shirt"] = [{"url": server.image("/l.jpg", make_image(20))}]
    with make_client(2.0) as client:
        provider = OpenverseProvider(client, server.base_url, POLICY)
        attributes = ["striped", "dotted", "plain", "leopard"]
        report = scrape(["shirt"], attributes, tmp_path / "d", FAST, progress=False, provider=provider)
    assert [e.label for e in read_url_list(tmp_path / "d" / "urls.tsv")] == ["leopard"]
    assert report.download is not None and report.download.count("downloaded") == 1
    reasons = [reason.split(" failed: ")[1] for _, reason in report.search_failures]
    assert reasons[0] == "redirect loop (more than 20 redirects)"
    assert reasons[1].startswith("body could not be decoded (")
    assert reasons[2].startswith("answer is not JSON (RecursionError")


def test_the_summary_tells_failed_searches_from_empty_ones(server: FakeServer, tmp_path: Path):
    """A class whose searches failed was described as one whose searches found nothing (nothing said to run
    again), and a query that found nothing (a misspelt item) was not named."""
    server.search_routes["striped shirt"] = Route("404")
    server.results["dotted shirt"] = [{"url": server.image("/d.jpg", make_image(21))}]
    with make_client(2.0) as client:
        provider = OpenverseProvider(client, server.base_url, POLICY)
        report = scrape(
            ["shirt", "shrit"], ["striped", "dotted"], tmp_path / "d", FAST, progress=False, provider=provider
        )
    summary = report.summary()
    assert (
        "warning: no image listed for 'striped': its class folder stays empty (1 of its 2 searches failed (above)"
        in summary
    )
    assert "the same command again retries them" in summary
    assert "searches that found no image (a misspelt item?): 'striped shrit', 'dotted shrit'" in summary


def test_ctrl_c_while_searching_keeps_what_the_searches_done_found(server: FakeServer, tmp_path: Path):
    """Ctrl-C during the searches printed "interrupted" and threw away every finished search (paid for again
    on a rate-limited service); the URLs found so far are now added to the list, and the message says how
    to download them."""
    from imgclf.datatools.scrape import SearchInterrupted

    server.results["striped shirt"] = [{"url": server.image("/s.jpg", make_image(23))}]

    class Stopped(OpenverseProvider):
        def search(self, query: str, n: int) -> list:
            if query == "dotted shirt":
                raise KeyboardInterrupt
            return super().search(query, n)

    out = tmp_path / "d"
    with make_client(2.0) as client, pytest.raises(SearchInterrupted) as e:
        scrape(
            ["shirt"],
            ["striped", "dotted"],
            out,
            FAST,
            progress=False,
            provider=Stopped(client, server.base_url, POLICY),
        )
    assert [x.url for x in read_url_list(out / "urls.tsv")] == [server.url("/s.jpg")]
    assert "interrupted after 1 of 2 searches, before downloading: 1 new URL(s) found, added to" in str(e.value)
    assert f"`imgclf download {out / 'urls.tsv'} --out {out}` downloads the list" in str(e.value)
    assert not (out / "striped").exists()
    with make_client(2.0) as client, pytest.raises(SearchInterrupted) as e:  # nothing found: download not offered
        scrape(
            ["shirt"],
            ["dotted"],
            tmp_path / "e",
            FAST,
            progress=False,
            provider=Stopped(client, server.base_url, POLICY),
        )
    said = str(e.value)
    assert "no URL found yet, nothing written; the same scrape again" in said and "imgclf download" not in said


def test_a_split_layout_is_warned_of_and_a_repeat_in_one_answer_is_no_note(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Scraping into train/ + val/ put the classes beside them, in no split, without a word; a provider
    repeating a URL in one answer gave the note "query 'x'; also found for 'x'"."""
    url = server.image("/d.jpg", make_image(22))
    server.results["dotted shirt"] = [{"url": url}, {"url": url}]
    out = tmp_path / "d"
    for split in ("train", "val"):
        (out / split / "ants").mkdir(parents=True)
    with make_client(2.0) as client, caplog.at_level(logging.WARNING, logger="imgclf"):
        provider = OpenverseProvider(client, server.base_url, POLICY)
        scrape(["shirt"], ["dotted"], out, FAST, progress=False, provider=provider)
    assert (
        caplog.text.count(f"{out} is laid out by split (train/, val/)") == 1
        and f"give --out {out / 'train'}" in caplog.text
    )
    assert [e.note for e in read_url_list(out / "urls.tsv")] == ["query 'dotted shirt'"]


def test_a_key_is_never_sent_to_another_site(server: FakeServer, tmp_path: Path):
    """A search service that redirects elsewhere is not followed with the key; a redirect on its own site is."""
    with FakeServer(bing_key="secret-key-123") as elsewhere, make_client(2.0) as client:
        elsewhere.results["striped shirt"] = [{"url": "http://img/1.jpg"}]
        away = elsewhere.url("/v7.0/images/search")
        server.search_routes["striped shirt"] = Route("redirect", location=away)
        with pytest.raises(ProviderError, match=r"redirected to http://127\.0\.0\.1:\d+, another site: not followed"):
            BingProvider(client, server.base_url, POLICY, key="secret-key-123").search("striped shirt", 5)
        with pytest.raises(ProviderError, match="another site: not followed"):
            OpenverseProvider(client, server.base_url, POLICY, token="tok").search("striped shirt", 5)
        assert elsewhere.requests == []
        server.results["dotted shirt"] = [{"url": "http://img/2.jpg"}]
        server.add("/old/v7.0/images/search", Route("redirect", location=server.url("/v7.0/images/search")))
        found = BingProvider(client, server.url("/old"), POLICY, key="secret-key-123").search("dotted shirt", 5)
        assert [r.url for r in found] == ["http://img/2.jpg"]
        anonymous = OpenverseProvider(client, server.base_url, POLICY, token="")  # no key: redirects followed
        elsewhere.results["striped shirt"] = [{"url": "http://img/3.jpg"}]
        server.search_routes["striped shirt"] = Route("redirect", location=elsewhere.url("/v1/images/"))
        assert [r.url for r in anonymous.search("striped shirt", 5)] == ["http://img/3.jpg"]


def test_urls_are_trimmed_before_naming(server: FakeServer, tmp_path: Path):
    urls = [server.image(f"/{n}.jpg", make_image(21 + i)) for i, n in enumerate("abc")]
    padded = [f" {urls[0]}", f"{urls[1]}\t", f"{urls[2]} ", "  "]
    server.results["striped shirt"] = [{"url": u} for u in padded]
    server.results["dotted shirt"] = [{"url": urls[2]}]
    out = tmp_path / "d"
    with make_client(2.0) as client:
        provider = OpenverseProvider(client, server.base_url, POLICY)
        report = scrape(["shirt"], ["striped", "dotted"], out, FAST, progress=False, provider=provider)
    assert report.download is not None and report.download.count("downloaded") == 3
    assert {p.name for p in (out / "striped").iterdir()} == {f"{file_stem(u)}.jpg" for u in urls}
    listed = read_url_list(out / "urls.tsv")
    assert [e.url for e in listed] == urls and "also found for 'dotted shirt'" in listed[2].note
    again = download(listed, out, FAST, progress=False)  # the documented retry finds every file
    assert [o.status for o in again.outcomes] == ["exists"] * 3
    assert len((out / "sources.tsv").read_text().splitlines()) == 4


def test_a_second_scrape_adds_to_the_list(server: FakeServer, tmp_path: Path):
    kept, gone = server.image("/kept.jpg", make_image(24)), server.add("/gone.jpg", Route("404"))
    server.results["striped shirt"] = [{"url": kept}, {"url": gone}]
    out = tmp_path / "d"
    with make_client(2.0) as client:
        provider = OpenverseProvider(client, server.base_url, POLICY)
        scrape(["shirt"], ["striped"], out, FAST, progress=False, provider=provider)
        new = server.image("/new.jpg", make_image(25))
        server.results["dotted shirt"] = [{"url": gone}, {"url": new}]
        report = scrape(["shirt"], ["dotted"], out, FAST, progress=False, provider=provider)
    assert [(e.label, e.url) for e in read_url_list(out / "urls.tsv")] == [
        ("striped", kept),
        ("striped", gone),
        ("dotted", new),
    ]
    assert report.found == 2 and "(2 entries of earlier runs kept, 1 new added)" in report.summary()
    assert report.download is not None
    assert [o.status for o in report.download.outcomes] == ["exists", "failed", "downloaded"]
    failures = (out / FAILURES_FILE).read_text().splitlines()[1:]
    assert len(failures) == 1 and gone in failures[0]  # the earlier failure is still listed, to retry


def test_scrape_checks_its_folder_and_terms_before_searching(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    args = ["scrape", "--items", "shirt", "--provider-url", server.base_url, "--retries", "0"]
    with pytest.raises(NotADirectoryError, match="a file is in the way; give another --out"):
        run_cli([*args, "--attributes", "striped", "--out", str(afile)])
    with pytest.raises(ValueError, match=r"--attributes: label 'é+'... is too long for a folder name"):
        run_cli([*args, "--attributes", "é" * 128, "--out", str(tmp_path / "d")])
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "urls.tsv").write_text(
        "# label\turl\tsource_page\tlicence\tcreator\ttitle\tnote\nstriped http://x/1.jpg\n"
    )
    with pytest.raises(ValueError, match=r"(?s)e/urls.tsv, the URL list of an earlier scrape .*fix it.*urls.tsv:2"):
        run_cli([*args, "--attributes", "striped", "--out", str(tmp_path / "e")])
    # files scrape rewrites, written by someone else (a header of their own, a comment, more columns): refused
    mine = {"urls.tsv": "# my list: checked\nred\thttp://x/a.jpg\tp\tCC0\tAda\tt\tn\tapproved by Bob\n"}
    mine["sources.tsv"] = "file,photographer,licence\nred/a.jpg,Ada,CC0\n"
    for name, text in mine.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / name).write_text(text)
        with pytest.raises(
            ValueError, match=f"{name} is not .* that imgclf wrote|{name} is not the URL list of an earlier"
        ):
            run_cli([*args, "--attributes", "striped", "--out", str(tmp_path / name)])
        assert (tmp_path / name / name).read_text() == text
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "striped").write_text("mine")  # where the class folder belongs: every download would fail
    with pytest.raises(NotADirectoryError, match=r"f/striped: a file where a class folder belongs; move it away"):
        run_cli([*args, "--attributes", "striped", "--out", str(tmp_path / "f")])
    assert server.requests == [] and afile.read_text() == "mine"
