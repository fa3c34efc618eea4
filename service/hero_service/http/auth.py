"""Bearer API key on the scoring endpoints (health, readiness, metrics and /v1/info stay open).

Checked twice, on purpose:

- :class:`ApiKeyAuth`, an ASGI middleware, answers 401 from the request *headers*, before a byte of
  the body is read: an unauthenticated caller must not make the service buffer and parse up to
  ``--max-body-bytes`` (a FastAPI dependency runs only after the body has been parsed).
- :func:`require_api_key`, a route dependency doing the same compare, declares the schemes in the
  OpenAPI document (so ``/docs`` can send the key) and guards any scoring route that the
  middleware's path list would miss.
"""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers

from ..errors import Unauthorized
from ..metrics import Metrics
from .middleware import SCORING_PATHS, ASGIApp, Receive, Scope, Send, _json_error

UNAUTHORIZED_MESSAGE = "missing or wrong API key (send 'Authorization: Bearer <key>')"
# RFC 6750: a 401 names the scheme it wants.
WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="hero-rewards"')

bearer_scheme = HTTPBearer(
    scheme_name="bearerAuth", auto_error=False,
    description="the service's API key (--api-key / --api-key-file / HERO_API_KEY)")
api_key_header = APIKeyHeader(
    name="X-API-Key", scheme_name="apiKeyHeader", auto_error=False,
    description="the same key in an X-API-Key header (for clients that cannot send Bearer)")


def presented_key(headers: Headers) -> Optional[str]:
    """The bearer token, else the X-API-Key header (a bearer header wins, right or wrong)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


def key_matches(presented: Optional[str], expected: str) -> bool:
    # Constant-time compare: the key must not leak through response timing.
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def is_scoring_path(path: str) -> bool:
    return path.rstrip("/") in SCORING_PATHS


class ApiKeyAuth:
    """401 JSON for a missing or wrong key on the scoring paths, decided on the headers alone."""

    def __init__(self, app: ASGIApp, api_key: Optional[str], metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.api_key is None or scope["type"] != "http" or not is_scoring_path(scope["path"])
                or key_matches(presented_key(Headers(scope=scope)), self.api_key)):
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels("unauthorized").inc()
        # The body stays unread; the server discards whatever of it still arrives.
        start, body = _json_error(401, Unauthorized.code, UNAUTHORIZED_MESSAGE, None,
                                  [WWW_AUTHENTICATE])
        await send(start)
        await send({"type": "http.response.body", "body": body})


async def require_api_key(
    request: Request,
    _bearer: Optional[HTTPAuthorizationCredentials] = Security(bearer_scheme),
    _header: Optional[str] = Security(api_key_header),
) -> None:
    expected: Optional[str] = request.app.state.api_key
    if expected is not None and not key_matches(presented_key(request.headers), expected):
        raise Unauthorized(UNAUTHORIZED_MESSAGE)

