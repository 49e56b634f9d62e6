"""HTTP with retries: exponential back-off, 429/503 ``Retry-After`` honoured up to a bound."""

from __future__ import annotations

import email.utils
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx

from imgclf import __version__

USER_AGENT = f"imgclf/{__version__} (data-set builder; python-httpx)"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
T = TypeVar("T")


class FetchError(Exception):
    """A request that failed for good; the message is a short reason fit for a report."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before trying a request again."""

    retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based); a server's Retry-After wins, capped."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff_s)
        return min(self.backoff_s * 2**attempt, self.max_backoff_s) * random.uniform(0.5, 1.0)


def make_client(timeout_s: float, max_connections: int = 8) -> httpx.Client:
    """A thread-safe client with the given per-operation timeout (:func:`with_retries` follows redirects)."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout_s),
        headers={"User-Agent": USER_AGENT},
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


@contextmanager
def _get(
    client: httpx.Client, url: str, params: Mapping[str, Any] | None, headers: Mapping[str, str] | None
) -> Iterator[httpx.Response]:
    """The streamed answer to GET ``url``, after redirects (at most ``client.max_redirects``).

    ``headers`` carry keys: they go to the origin of ``url`` only (or to its https:// form); a redirect to
    another origin is not followed (FetchError) rather than sending them there.
    """
    request = client.build_request("GET", url, params=params, headers=headers)
    origin = _origin(request.url)
    for _ in range(client.max_redirects + 1):
        response = client.send(request, stream=True, follow_redirects=False)
        if response.next_request is None:
            break
        response.close()
        request = response.next_request
        if headers and _origin(request.url) not in (origin, ("https", origin[1], 443)):
            raise FetchError(
                f"redirected to {request.url.scheme}://{request.url.netloc.decode('ascii')}, another site: not "
                "followed, as the request carries a key; give the address it redirects to as --provider-url"
            )
    else:
        raise FetchError(f"redirect loop (more than {client.max_redirects} redirects)")
    try:
        yield response
    finally:
        response.close()


def with_retries(
    client: httpx.Client,
    url: str,
    policy: RetryPolicy,
    handle: Callable[[httpx.Response], T],
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    stop: threading.Event | None = None,
) -> T:
    """GET ``url`` (streamed, following redirects) and return ``handle(response)`` for a 2xx answer.

    Connection errors, timeouts and HTTP 408/429/5xx are retried ``policy.retries`` times; other HTTP
    errors, redirect loops, undecodable bodies and errors raised by ``handle`` (FetchError) fail at once.
    ``headers`` (keys) are never sent to another site (see :func:`_get`). Once ``stop`` is set, no retry
    is made. Raises FetchError with a short reason.
    """
    stop = stop or threading.Event()
    reason = "no attempt made"
    for attempt in range(policy.retries + 1):
        retry_after = None
        try:
            with _get(client, url, params, headers) as response:
                if response.is_success:
                    return handle(response)
                reason = f"HTTP {response.status_code} {response.reason_phrase}".strip()
                if response.status_code not in RETRY_STATUS:
                    raise FetchError(reason)
                retry_after = parse_retry_after(response.headers.get("retry-after"))
        except httpx.TimeoutException:
            reason = f"timed out ({client.timeout.read:g} s timeout; raise --timeout-s for slow servers)"
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
            raise FetchError(f"invalid URL ({e})") from e
        except httpx.DecodingError as e:  # a broken gzip/deflate/brotli body: the same on every try
            raise FetchError(f"body could not be decoded ({e})") from e
        except httpx.TransportError as e:
            reason = f"connection failed ({type(e).__name__}: {e})"
        if attempt < policy.retries and stop.wait(policy.delay(attempt, retry_after)):
            raise FetchError(f"{reason}; stopped before retrying")
    tries = policy.retries + 1
    raise FetchError(f"{reason} after {tries} tr{'y' if tries == 1 else 'ies'}")
