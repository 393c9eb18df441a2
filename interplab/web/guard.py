"""Request guards of the feature explorer, as one ASGI middleware in front of every route.

- **Host**: only loopback names (``localhost``, ``127.0.0.0/8``, ``[::1]``, any port) and the names the user
  allows (``interplab serve --allow-host NAME``) are served. A page on another origin that rebinds its own
  name to 127.0.0.1 (DNS rebinding) sends its own name as ``Host`` and gets 421, so it can neither read
  pages nor write labels.
- **Origin**: state-changing requests (POST, PUT, PATCH, DELETE) must come from the app's own origin: the
  ``Origin`` header, when sent, must equal ``http://<Host>``; a browser's ``Sec-Fetch-Site``, when sent, must
  be ``same-origin`` or ``none``. Otherwise 403. Clients that send neither (curl, scripts) are not browsers
  driven by another site and are let through.
- **URL length**: a path plus query string longer than `MAX_URL` characters gets 414 with the length and
  the bound, before any route runs. The HTTP server reads request heads up to `MAX_REQUEST_HEAD` bytes
  (`SERVER_OPTIONS` sets it), far above `MAX_URL`, so an over-long URL is read whole and answered, never
  cut off mid-send (a server that closes while the client still sends resets the connection, and the
  client sees no answer at all). Heads above `MAX_REQUEST_HEAD` are dropped by the server with its own 400.
- **HEAD** is answered on every GET route: the route runs as GET and the body is dropped (headers, the
  length included, stay those of the GET).

>>> app = HostOriginGuard(app, allowed_hosts=["lab.example"])
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # only types: `interplab serve` imports this module before the web stack
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_URL = 16 * 1024
"""characters of path plus query string the app answers; longer URLs get 414 (no page needs more: a search
text is at most `interplab.features.reader.MAX_QUERY` characters)"""
MAX_REQUEST_HEAD = 1 << 20
"""bytes of request line plus headers the HTTP server reads (uvicorn's h11 default, 16 KiB, would cut a
long URL off mid-send and reset the connection instead of answering it)"""
SERVER_OPTIONS: dict[str, Any] = {"log_level": "warning", "h11_max_incomplete_event_size": MAX_REQUEST_HEAD}
"""uvicorn options of every interplab server (`uvicorn.run(app, host=..., port=..., **SERVER_OPTIONS)`)"""
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})


def split_host(value: str) -> tuple[str, str | None] | None:
    """``"Host"`` header value -> (lower-case name without brackets, port or None); None when malformed."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/\\@?# \t"):
        return None
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] or None
    else:
        name, _, port = value.partition(":")
        port = port or None
        if ":" in (port or ""):
            return None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        return None
    return (name.rstrip("."), port) if name else None


def is_loopback(name: str) -> bool:
    """``localhost`` (and ``*.localhost``, which browsers resolve to loopback), 127.0.0.0/8 and ::1."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def normalise_allowed(names: Iterable[str]) -> frozenset[str]:
    """Names given with ``--allow-host`` as host names (a port or brackets are accepted and dropped)."""
    out = set()
    for n in names:
        parsed = split_host(n)
        if parsed is None:
            raise ValueError(f"--allow-host {n!r} is not a host name (e.g. lab.example or 192.168.1.5)")
        out.add(parsed[0])
    return frozenset(out)


class HostOriginGuard:
    """ASGI middleware: the Host allowlist, the same-origin rule for state-changing requests, and HEAD."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = normalise_allowed(allowed_hosts)

    def host_allowed(self, name: str) -> bool:
        return is_loopback(name) or name in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        parsed = split_host(host)
        if parsed is None or not self.host_allowed(parsed[0]):
            shown = parsed[0] if parsed else host
            await _refuse(
                scope,
                send,
                421,
                f"host {shown!r} is not served: this app answers loopback names (localhost, 127.0.0.1, [::1]) "
                f"and names given with `interplab serve --allow-host NAME`",
            )
            return
        query = scope.get("query_string", b"")
        length = len(scope.get("raw_path") or scope.get("path", "").encode()) + (
            len(query) + 1 if query else 0
        )
        if length > MAX_URL:
            # here, not at the top: `interplab serve` imports this module before the app (and SQLAlchemy)
            from interplab.features.reader import MAX_QUERY

            await _refuse(
                scope,
                send,
                414,
                f"the URL has {length:,} characters; this app answers URLs of at most {MAX_URL:,} "
                f"(search texts are at most {MAX_QUERY:,} characters)",
            )
            return
        method = scope["method"].upper()
        if method in STATE_CHANGING:
            problem = self.cross_origin(headers, host)
            if problem:
                await _refuse(scope, send, 403, f"{method} refused: {problem}; only this app's own pages may")
                return
        if method == "HEAD":
            await self.app({**scope, "method": "GET"}, receive, _drop_body(send))
            return
        await self.app(scope, receive, send)

    def cross_origin(self, headers: dict[str, str], host: str) -> str | None:
        """Why a state-changing request is cross-origin, or None when it is same-origin (or not a browser)."""
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin.strip()) if origin.strip() != "null" else None
            if parts is None or parts.scheme not in ("http", "https"):
                return f"the request comes from origin {origin!r}"
            got = split_host(parts.netloc)
            want = split_host(host)
            if got is None or want is None or got != want or not self.host_allowed(got[0]):
                return f"the request comes from another origin ({origin})"
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.strip().lower() not in SAME_ORIGIN_FETCH:
            return f"the browser says the request is {fetch_site.strip()} (Sec-Fetch-Site)"
        return None


def _drop_body(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(message)

    return wrapped


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    """A JSON error under /api, plain text elsewhere (no template: nothing of the app runs)."""
    if scope.get("path", "").startswith("/api/"):
        body, kind = json.dumps({"error": message}).encode(), b"application/json"
    else:
        body, kind = f"{status}: {message}\n".encode(), b"text/plain; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
