"""The async client's HTTP transport: aiohttp's connection pool when ``httpx-aiohttp`` is
installed (``pip install 'hero-rewards[aiohttp]'``), else httpx's own.

Why two: httpcore's pool (httpx's default transport) re-scans every connection, each with a
socket-readability check, whenever a request starts or ends, so its CPU per request grows with
the connections in flight. A trainer that keeps one request per sample open (verl's per-sample
reward loop, OpenRLHF-style callers) spends that CPU in its own process; aiohttp's connector
does not scan (``bench/client_cost.py`` measures both). Either one sits behind the same
``httpx.AsyncBaseTransport`` seam, so retries, timeouts and errors stay the client's own
(``httpx_aiohttp`` maps aiohttp's exceptions onto httpx's)."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Literal, Optional, get_args

import httpx

HTTPBackend = Literal["auto", "httpx", "aiohttp"]
HTTP_BACKENDS: tuple[HTTPBackend, ...] = get_args(HTTPBackend)
# How long an idle connection is kept for reuse, either backend (httpx's default).
KEEPALIVE_EXPIRY_S = 5.0


def aiohttp_available() -> bool:
    return importlib.util.find_spec("httpx_aiohttp") is not None


def resolve_backend(backend: HTTPBackend) -> Literal["httpx", "aiohttp"]:
    if backend not in HTTP_BACKENDS:
        choices = ", ".join(repr(b) for b in HTTP_BACKENDS)
        raise ValueError(f"http_backend must be one of {choices}, got {backend!r}")
    if backend == "auto":
        return "aiohttp" if aiohttp_available() else "httpx"
    return backend


def httpx_limits(max_connections: Optional[int]) -> httpx.Limits:
    """httpx's pool limits for ``max_connections`` (None: no cap)."""
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max_connections must be >= 1 or None, got {max_connections}")
    return httpx.Limits(max_connections=max_connections,
                        max_keepalive_connections=min(max_connections or 64, 64),
                        keepalive_expiry=KEEPALIVE_EXPIRY_S)


def aiohttp_transport(base_url: str,
                      max_connections: Optional[int] = 100) -> httpx.AsyncBaseTransport:
    """An httpx transport over aiohttp's connection pool (``max_connections=None``: no cap) for
    requests to ``base_url``. Like httpx, it honours HTTP(S)_PROXY / NO_PROXY from the
    environment as they are when it is built, and ignores ``~/.netrc``."""
    httpx_limits(max_connections)  # the same check, the same error
    try:
        import aiohttp
        from httpx_aiohttp import AiohttpTransport
    except ImportError as exc:
        raise ImportError("the aiohttp backend needs httpx-aiohttp: "
                          "pip install 'hero-rewards[aiohttp]'") from exc

    class Transport(AiohttpTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            try:
                return await super().handle_async_request(request)
            except httpx.ConnectTimeout as exc:
                # httpx-aiohttp maps every aiohttp connection error to ConnectTimeout; a
                # refused connection or a server that hung up is not a timeout, and the
                # client reports them as HeroConnectionError, as on httpx.
                cause = exc.__cause__
                if cause is None or isinstance(cause, (TimeoutError, asyncio.TimeoutError,
                                                       aiohttp.ServerTimeoutError)):
                    raise
                if isinstance(cause, aiohttp.ClientConnectorError):
                    raise httpx.ConnectError(str(cause), request=request) from cause
                raise httpx.RemoteProtocolError(str(cause), request=request) from cause

    def session() -> aiohttp.ClientSession:
        # Built on first use, inside the event loop that sends (aiohttp binds a session to its
        # loop). limit=0 is aiohttp's "no cap". Not trust_env: aiohttp would then look the proxy
        # up and read ~/.netrc in a worker thread for every request (two thread hand-offs and a
        # file read each); the proxy is looked up once, below, as httpx does at construction.
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections or 0,
                                           keepalive_timeout=KEEPALIVE_EXPIRY_S))

    return Transport(client=session, proxy=environment_proxy(base_url))


def environment_proxy(url: str) -> Optional[httpx.Proxy]:
    """The proxy HTTP(S)_PROXY / NO_PROXY name for ``url`` (aiohttp's own rule), or None."""
    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL

    try:
        proxy, auth = get_env_proxy_for_url(URL(url))
    except LookupError:
        return None
    return httpx.Proxy(str(proxy), auth=(auth.login, auth.password) if auth else None)
