"""HTTP protections of the two web apps (``imgclf serve``, ``imgclf ui``), as ASGI middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from hmac import compare_digest
from urllib.parse import urlencode, urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("imgclf")

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

# no page of another site may show ours in a frame (clickjacking); no response is read as another type
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response of ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def cross_site_reason(headers: Headers) -> str | None:
    """Why a request comes from a page of another origin than the one it is addressed to (its Host), or None.

    Browsers send ``Origin`` with every POST; older ones ``Sec-Fetch-Site`` or ``Referer``. A request with none
    of them comes from a program, not a web page, and is let through.
    """
    host = _without_default_port(headers.get("host", "").lower())
    if (origin := headers.get("origin")) is not None:
        if origin == "null" or _netloc(origin) != host:
            return f"Origin {origin}"
        return None
    if (site := headers.get("sec-fetch-site")) is not None:
        return None if site in ("same-origin", "none") else f"Sec-Fetch-Site {site}"
    if (referer := headers.get("referer")) is not None and _netloc(referer) != host:
        return f"Referer {referer}"
    return None


def _without_default_port(netloc: str) -> str:
    """``host:80`` and ``host:443`` as ``host`` (proxies often spell out the port; browsers leave it out)."""
    name, _, port = netloc.rpartition(":")
    return name if port in ("80", "443") and name and not name.endswith(":") else netloc


def _netloc(url: str) -> str:
    return _without_default_port(urlsplit(url).netloc.lower())


class SameOriginWrites:
    """Refuses (403) every request of ``app`` but GET, HEAD and OPTIONS sent by a page of another origin
    (cross-site request forgery: another site's page making the user's browser change the data)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            reason = cross_site_reason(Headers(scope=scope))
            if reason is not None:
                detail = f"refused: a request from another site ({reason}); use the app's own page"
                await JSONResponse({"detail": detail}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class TokenRequired:
    """Every request of ``app`` needs ``token`` (as Jupyter's): in the query of the link printed at start
    (``?token=``; a page asked for so gets a cookie and is sent to its address without it), or in that cookie.
    Every user of a machine reaches its 127.0.0.1; without the token, none but the one who started the app sees
    or moves an image. The cookie is SameSite=Lax: a Strict one is not sent after a link followed from another
    site's page (a notebook, a chat), which then showed 401; writes from other sites are refused by
    :class:`SameOriginWrites` anyway."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token.encode()

    def _valid(self, given: str | None) -> bool:
        return given is not None and compare_digest(given.encode("utf-8", "replace"), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        cookie = f"imgclf-ui-{request.url.port or 80}"  # a cookie is the host's whatever the port: one per app
        if self._valid(request.query_params.get("token")):
            if scope["method"] == "GET":
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                path = "/" + request.url.path.lstrip("/")  # "//host/x" would send the browser to another site
                response = RedirectResponse(path + (f"?{urlencode(rest)}" if rest else ""), 303)
                response.set_cookie(cookie, self.token.decode(), httponly=True, samesite="lax")
                await response(scope, receive, send)
                return
        elif not self._valid(request.cookies.get(cookie)):
            detail = "open the link with its token that `imgclf ui` printed when it started (…/?token=…)"
            await JSONResponse({"detail": detail}, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _connection_limit() -> int:
    """The connections a server holds open at once: its open-files limit (raised to the hard limit where it
    may be: the soft one is 256 on macOS, 1024 on most Linux), less room for its own files."""
    if resource is None:  # Windows
        return 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    want = 65536 if hard == infinite else min(hard, 65536)
    if soft != infinite and soft < want:
        with contextlib.suppress(ValueError, OSError):  # macOS refuses more than its kernel's own limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    soft = 65536 if soft == infinite else soft
    return max(16, soft - min(256, soft // 4))


def http_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol (h11, whatever else is installed) with two limits uvicorn lacks: a request's
    headers must arrive within ``header_timeout_s`` (the body's deadline is the app's), and the connections
    open at once stay below the process's file limit. One client holding connections whose headers never
    end shut the server out: 20,000 of them reached the limit, every accept then failed (and logged).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    most = _connection_limit()
    said = [-math.inf]  # when the refusals were last logged

    class HeadersInTime(H11Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            if len(self.connections) > most:  # closed at once: the descriptor is free again
                transport.close()
                if time.monotonic() - said[0] > 60:
                    said[0] = time.monotonic()
                    log.warning(
                        "warning: %d connections open at once, the most this server holds (its open-files limit): "
                        "new ones are closed unanswered until some end",
                        most,
                    )
                return
            self._headers_due = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._headers_due.cancel()  # the next request's headers have their own time (after keep-alive's)
            self._headers_due = self.loop.call_later(header_timeout_s, self._headers_late)

        def shutdown(self) -> None:
            # uvicorn closes the connection after the answer in progress but did not say so in it: a client
            # keeping the connection alive sent its next request into the closed socket (broken pipe). The
            # request's own Connection: close makes uvicorn add the header to the answer.
            if self.cycle is not None and not self.cycle.response_started:
                self.cycle.scope["headers"].append((b"connection", b"close"))
            super().shutdown()

        def connection_lost(self, exc: Exception | None) -> None:
            if hasattr(self, "_headers_due"):
                self._headers_due.cancel()
            super().connection_lost(exc)

    return HeadersInTime
