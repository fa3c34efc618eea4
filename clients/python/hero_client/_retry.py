"""Retry policy shared by the sync and async clients: 429/503 and connection errors are retried
with exponential backoff, honouring the server's Retry-After. ``RETRY_STATUSES`` and
``retry_after_seconds`` are also what the service's ``remote`` reward-model backend retries on and
reads (with its own, shorter, attempts and backoff)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import httpx

from ._errors import HeroAPIError

RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_s: float = 0.25
    max_backoff_s: float = 10.0

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 1)."""
        if retry_after is not None:
            # Never earlier than the server asked; up to half a second later, so the callers
            # refused together do not all come back in the same instant.
            wait = max(retry_after, 0.0)
            jitter = random.uniform(0.0, min(wait, 1.0) / 2)
            return min(wait + jitter, max(wait, self.max_backoff_s))
        base = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
        return base * (0.5 + random.random() / 2)  # jitter: replicas do not retry in lockstep


def retry_after_seconds(response: httpx.Response) -> Optional[float]:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def api_error(response: httpx.Response) -> HeroAPIError:
    try:
        error = response.json()["error"]
        return HeroAPIError(response.status_code, error.get("code", "error"),
                            error.get("message", ""), error.get("field"),
                            error.get("errors") or None)
    except (ValueError, KeyError, TypeError):
        return HeroAPIError(response.status_code, "http_error", response.text[:500])
