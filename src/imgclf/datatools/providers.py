"""Image search providers: Openverse (default, no key needed) and the Bing Image Search v7 format.

Keys come from environment variables (``IMGCLF_BING_KEY``, optional ``IMGCLF_OPENVERSE_TOKEN``); they are
sent in request headers only, never logged or written. Nor is a ``user:password@`` part of the provider URL.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from imgclf.datatools.fetch import FetchError, RetryPolicy, with_retries

log = logging.getLogger(__name__)
MAX_JSON_BYTES = 20_000_000


def without_userinfo(url: str) -> str:
    """``url`` without its ``user:password@`` part, to show in messages (the request itself keeps it)."""
    scheme, sep, rest = url.partition("://")
    # Also without a scheme: "user:pw@host" fails as a request, and its message must not show the password.
    prefix, rest = (scheme + sep, rest) if sep else ("", url)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return prefix + rest[:end].rpartition("@")[2] + rest[end:]


class ProviderError(RuntimeError):
    """A search that failed; the message names the provider, the query and the reason."""


@dataclass(frozen=True)
class Result:
    """One image found by a search: its URL and what is known about where it comes from."""

    url: str
    source_page: str = ""
    licence: str = ""
    creator: str = ""
    title: str = ""


class Provider(ABC):
    """An image search service: ``search(query, n)`` returns up to ``n`` results, best first."""

    name: ClassVar[str]
    default_url: ClassVar[str]

    def __init__(self, client: httpx.Client, base_url: str | None = None, policy: RetryPolicy | None = None) -> None:
        self.client = client
        self.base_url = (base_url or self.default_url).rstrip("/")
        self.policy = policy or RetryPolicy()

    @abstractmethod
    def search(self, query: str, n: int) -> list[Result]:
        """Up to ``n`` results for ``query``; raises ProviderError."""

    def _next_page(
        self, path: str, query: str, params: Mapping[str, Any], headers: Mapping[str, str], found: int
    ) -> dict[str, Any] | None:
        """The next page of results; None (with a warning) where a later page fails after some results."""
        try:
            return self._get_json(path, query, params, headers)
        except ProviderError as e:
            return self._give_up(e, found)

    def _paging_number(
        self, data: Mapping[str, Any], key: str, default: int, path: str, query: str, found: int
    ) -> int | None:
        """The whole number ``data[key]`` (``default`` where absent or empty); where it is no number, the answer
        is malformed: None (with a warning) after some results, else ProviderError."""
        value = data.get(key) or default
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: JSON 1e999 is infinity
            error = ProviderError(
                f"{self.name} search for {query!r} at {without_userinfo(self.base_url + path)} failed: "
                f"malformed answer ({key} {str(value)[:40]!r} is not a number)"
            )
            return self._give_up(error, found)

    def _page_items(self, data: Mapping[str, Any], key: str, path: str, query: str, found: int) -> list[Any] | None:
        """The list ``data[key]`` ([] where absent or empty); where it is no list, the answer is malformed:
        None (with a warning) after some results, else ProviderError."""
        items = data.get(key) or []
        if isinstance(items, list):
            return items
        error = ProviderError(
            f"{self.name} search for {query!r} at {without_userinfo(self.base_url + path)} failed: "
            f"malformed answer ({key} {str(items)[:40]!r} is not a list)"
        )
        return self._give_up(error, found)

    @staticmethod
    def _give_up(error: ProviderError, found: int) -> None:
        """Stop paging: raise ``error`` where nothing was found yet, else warn and keep the results."""
        if not found:
            raise error
        log.warning("%s; keeping the %d result(s) found so far", error, found)

    def _get_json(
        self, path: str, query: str, params: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        # The client's timeout (--timeout-s) bounds each read only: a server sending a few bytes at a time
        # could hold a run for days, so the whole answer must come within it (as downloads must).
        limit_s = self.client.timeout.read

        def parse(response: httpx.Response) -> dict[str, Any]:
            deadline = time.monotonic() + limit_s if limit_s is not None else math.inf
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_JSON_BYTES:
                    raise FetchError(f"answer larger than {MAX_JSON_BYTES / 1e6:g} MB")
                if time.monotonic() > deadline:
                    raise FetchError(
                        f"answer not all received within {limit_s:g} s ({len(body):,} bytes so far; not retried): "
                        "raise --timeout-s for slow servers"
                    )
            try:
                data = json.loads(body)
            except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
                raise FetchError(f"answer is not JSON ({type(e).__name__}: {e})") from e
            if not isinstance(data, dict):
                raise FetchError("answer is not a JSON object")
            return data

        url = self.base_url + path
        try:
            return with_retries(self.client, url, self.policy, parse, params=params, headers=headers)
        except FetchError as e:
            raise ProviderError(f"{self.name} search for {query!r} at {without_userinfo(url)} failed: {e}") from e


class OpenverseProvider(Provider):
    """Openverse (openly licensed images): ``GET /v1/images/?q=&page=&page_size=``, paged until ``n``."""

    name = "openverse"
    default_url = "https://api.openverse.org"
    page_size = 20  # the most anonymous clients may ask for

    def __init__(
        self,
        client: httpx.Client,
        base_url: str | None = None,
        policy: RetryPolicy | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(client, base_url, policy)
        token = token if token is not None else os.environ.get("IMGCLF_OPENVERSE_TOKEN")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def search(self, query: str, n: int) -> list[Result]:
        path, size = "/v1/images/", min(self.page_size, n)
        results: list[Result] = []
        page = 1
        while len(results) < n:
            params = {"q": query, "page": page, "page_size": size}
            data = self._next_page(path, query, params, self._headers, len(results))
            if data is None:
                break
            raw = self._page_items(data, "results", path, query, len(results))
            if raw is None:
                break
            items = [it for it in raw if isinstance(it, dict) and it.get("url")]
            results += [
                Result(
                    str(it["url"]),
                    str(it.get("foreign_landing_url") or ""),
                    _openverse_licence(it),
                    str(it.get("creator") or ""),
                    str(it.get("title") or ""),
                )
                for it in items
            ]
            if len(raw) < size:  # a short page is the last; results dropped for lacking a URL do not count
                break
            page_count = self._paging_number(data, "page_count", page, path, query, len(results))
            if page_count is None or page >= page_count:
                break
            page += 1
        return results[:n]


def _openverse_licence(item: Mapping[str, Any]) -> str:
    name = " ".join(str(item[k]) for k in ("license", "license_version") if item.get(k))
    return f"{name} ({item['license_url']})" if item.get("license_url") else name


class BingProvider(Provider):
    """Bing Image Search v7 format: ``GET /v7.0/images/search?q=&count=&offset=`` with a subscription key."""

    name = "bing"
    default_url = "https://api.bing.microsoft.com"
    max_count = 150  # results per request the API allows

    def __init__(
        self,
        client: httpx.Client,
        base_url: str | None = None,
        policy: RetryPolicy | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(client, base_url, policy)
        key = key if key is not None else os.environ.get("IMGCLF_BING_KEY")
        if not key:
            raise ProviderError(
                "the bing provider needs a subscription key: set the environment variable "
                "IMGCLF_BING_KEY (or use --provider openverse, which needs none)"
            )
        self._headers = {"Ocp-Apim-Subscription-Key": key}

    def search(self, query: str, n: int) -> list[Result]:
        path = "/v7.0/images/search"
        results: list[Result] = []
        offset = 0
        while len(results) < n:
            count = min(self.max_count, n - len(results))
            params = {"q": query, "count": count, "offset": offset}
            data = self._next_page(path, query, params, self._headers, len(results))
            if data is None:
                break
            raw = self._page_items(data, "value", path, query, len(results))
            if raw is None:
                break
            items = [it for it in raw if isinstance(it, dict) and it.get("contentUrl")]
            results += [
                Result(str(it["contentUrl"]), str(it.get("hostPageUrl") or ""), "", "", str(it.get("name") or ""))
                for it in items
            ]
            if not raw:
                break
            next_offset = self._paging_number(data, "nextOffset", offset + len(raw), path, query, len(results))
            if next_offset is None or next_offset <= offset:
                break
            offset = next_offset
        return results[:n]


PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in (OpenverseProvider, BingProvider)}


def make_provider(
    name: str, client: httpx.Client, base_url: str | None = None, policy: RetryPolicy | None = None
) -> Provider:
    """The provider called ``name`` (openverse or bing)."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown image search provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    return PROVIDERS[name](client, base_url, policy)
