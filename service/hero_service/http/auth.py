"""Bearer API key on the scoring endpoints (health, readiness and metrics stay open)."""

from __future__ import annotations

import hmac
from typing import Optional

from fastapi import Request

from ..errors import Unauthorized


def presented_key(request: Request) -> Optional[str]:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key")


def require_api_key(request: Request) -> None:
    expected: Optional[str] = request.app.state.api_key
    if expected is None:
        return
    key = presented_key(request)
    # Constant-time compare: the key must not leak through response timing.
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer <key>')")
