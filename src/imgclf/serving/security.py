"""HTTP protections of the two web apps (``imgclf serve``, ``imgclf ui``), as ASGI middleware."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
