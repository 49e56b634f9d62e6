import base64
import json
import time
from pathlib import Path

import httpx
import pytest
from fakeprovider import FakeServer, Route, run_cli

from imgclf.config import DataToolsConfig
from imgclf.datatools.fetch import RetryPolicy, make_client
from imgclf.datatools.providers import BingProvider, OpenverseProvider, ProviderError, make_provider

POLICY = RetryPolicy(retries=0, backoff_s=0.01)


@pytest.fixture
def server():
    with FakeServer(bing_key="secret-key-123") as s:
        yield s


def _results(server: FakeServer, query: str, n: int) -> list[dict[str, str]]:
    return [{"url": server.url(f"/{query}/{i}.jpg"), "title": f"title {i}"} for i in range(n)]


def test_openverse_pages_past_results_without_url(server: FakeServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("IMGCLF_OPENVERSE_TOKEN", raising=False)
    server.results["q"] = _results(server, "q", 45)
    server.results["q"][3]["url"] = ""  # dropped, but page 1 was still a full page: page 2 follows
    with make_client(2.0) as client:
        found = OpenverseProvider(client, server.base_url, POLICY).search("q", 40)
    expected = [r["url"] for r in server.results["q"] if r["url"]][:40]
    assert [r.url for r in found] == expected
    assert server.hits["/v1/images/"] == 3


@pytest.mark.parametrize("name", ["openverse", "bing"])
def test_a_trickling_search_answer_stops_at_the_timeout(name: str, server: FakeServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("IMGCLF_BING_KEY", "secret-key-123")
    # Each byte comes well within the read timeout; the whole answer (2 s) does not come within 0.5 s.
    server.search_routes["q"] = Route("trickle", size=40, delay=0.05)
    with make_client(0.5) as client:
        provider = make_provider(name, client, server.base_url, POLICY)
        start = time.monotonic()
        with pytest.raises(ProviderError, match=r"failed: answer not all received within 0.5 s .*--timeout-s"):
            provider.search("q", 10)
    assert time.monotonic() - start < 1.5
    assert sum(server.hits.values()) == 1  # not retried


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:hunter2@host:8080/v1/?a=b@c", "http://host:8080/v1/?a=b@c"),
        ("https://user:p%40ss@w@host", "https://host"),  # the last @ of the authority ends the userinfo
        ("http://host/path/@name", "http://host/path/@name"),  # an @ in the path is no userinfo
        ("user:hunter2@host/v1", "host/v1"),  # no scheme: the request fails, its message must not leak
        ("http://host", "http://host"),
    ],
)
def test_without_userinfo(url: str, shown: str):
    from imgclf.datatools.providers import without_userinfo  # here: the other tests run without it

    assert without_userinfo(url) == shown


def _answering(pages: list[object]) -> httpx.Client:
    answers = iter(pages)
    return httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(200, text=json.dumps(next(answers)))))


def test_provider_url_credentials_are_sent_but_never_shown(
    server: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.delenv("IMGCLF_OPENVERSE_TOKEN", raising=False)
    secret_url = server.base_url.replace("http://", "http://user:hunter2@")
    shown = f"at {server.base_url}/v1/images/ failed"
    server.results["many"] = _results(server, "many", 45)
    server.search_routes["gone"] = Route("404")
    server.openverse_max_page = 1
    with make_client(2.0) as client:
        provider = OpenverseProvider(client, secret_url, POLICY)
        with pytest.raises(ProviderError) as failed:
            provider.search("gone", 10)
        assert shown in str(failed.value) and "hunter2" not in str(failed.value)
        assert len(provider.search("many", 30)) == 20  # page 2 refused: a warning
    assert shown in caplog.text and "hunter2" not in caplog.text
    basic = "Basic " + base64.b64encode(b"user:hunter2").decode()
    assert all(h.get("Authorization") == basic for _, h in server.requests)  # the request keeps them

    with (
        _answering([{"value": 7}]) as client,
        pytest.raises(ProviderError, match=r"at http://search/v7.0/images/search failed: malformed") as failed,
    ):
        BingProvider(client, "http://user:hunter2@search", POLICY, key="k").search("q", 10)
    assert "hunter2" not in str(failed.value)

    server.search_routes["striped shirt"] = Route("404")
    args = ["scrape", "--items", "shirt", "--attributes", "striped", "--out", str(tmp_path / "d")]
    code = run_cli([*args, "--provider-url", secret_url, "--retries", "0"])
    captured = capsys.readouterr()
    assert code == 2 and "HTTP 404" in captured.err
    assert "hunter2" not in captured.err + captured.out + caplog.text


def test_a_password_that_ends_the_host_part_is_refused_unshown(capsys: pytest.CaptureFixture[str]):
    """`--provider-url http://user:s3cr#et@host`: '#' ends the host part, the request failed and its message
    showed the password (parsed as a port: "Invalid port: 's3cr'")."""
    from imgclf.cli import main

    args = ["scrape", "--items", "x", "--attributes", "ok", "--out", "unused"]
    for url in ("http://user:s3cr#et@127.0.0.1:9/", "http://user:s3/cr@127.0.0.1:9/", "http://user:a?b@h"):
        assert main([*args, "--provider-url", url]) == 2
        err = capsys.readouterr().err
        assert "write them as %23, %3F and %2F" in err and "(not shown)" in err
        assert "s3" not in err and "a?b" not in err
    for fine in ("http://host:8080/x@y", "http://[::1]:8080/@proxy/", "http://[fd00::5]/openverse/@x"):
        assert DataToolsConfig(provider_url=fine).provider_url  # an address, a port and a path: no password
