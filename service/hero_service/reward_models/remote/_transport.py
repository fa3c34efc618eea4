"""The one way the remote backend calls its server: a retrying transport over ``httpx.Client``.
It decides what a failed call means (see "Failures" in the package docstring): retried (connection
errors, the statuses the SDK also retries), :class:`RewardModelUnavailable` (the server as a
whole) or :class:`RewardModelError` (perhaps these inputs)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from hero_client._retry import RETRY_STATUSES, retry_after_seconds

from ...redaction import redact_url
from ..base import RewardModelError, RewardModelUnavailable

# The server refused these inputs: another split of the batch may pass (see "Failures").
INPUT_STATUSES = frozenset({400, 413, 422})
ATTEMPTS = 3
BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class Backoff:
    """The remote's own numbers, shorter than the SDK's ``RetryPolicy``: the batcher waits on
    this call, and its circuit breaker, not a long retry loop, handles a server that is down."""

    attempts: int = ATTEMPTS
    backoff_s: float = BACKOFF_S
    max_backoff_s: float = MAX_BACKOFF_S

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt ``attempt`` (counting from 0; never called for 0)."""
        wait = self.backoff_s * 2 ** (attempt - 1)
        return min(max(wait, retry_after or 0.0), self.max_backoff_s)


class RetryingTransport:
    def __init__(self, *, timeout_s: float, backoff: Backoff, api_key: str | None) -> None:
        self.timeout_s = timeout_s
        self.backoff = backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s), headers=headers)

    def request(self, method: str, url: str, body: Any = None) -> httpx.Response:
        """The response, any status but the retried ones; raises when the server cannot be had.

        A read timeout is not retried: each retry would cost another whole timeout."""
        shown = redact_url(url)
        cause = ""
        retry_after: float | None = None
        for attempt in range(self.backoff.attempts):
            if attempt:
                time.sleep(self.backoff.delay(attempt, retry_after))
                retry_after = None
            try:
                response = self._client.request(method, url, json=body)
            except httpx.ConnectTimeout:
                cause = f"is unreachable (connect timed out after {self.timeout_s:g}s)"
                continue
            except httpx.TimeoutException as exc:
                raise RewardModelUnavailable(
                    f"remote reward model at {shown} timed out after {self.timeout_s:g}s"
                ) from exc
            except httpx.TransportError as exc:
                cause = f"is unreachable ({type(exc).__name__}: {exc})"
                continue
            if response.status_code in RETRY_STATUSES:
                cause = f"returned HTTP {response.status_code}: {detail(response)}"
                seconds = retry_after_seconds(response)
                retry_after = None if seconds is None else max(0.0, seconds)
                continue
            return response
        raise RewardModelUnavailable(
            f"remote reward model at {shown} {cause} (after {self.backoff.attempts} attempts)",
            retry_after_s=retry_after)

    def post(self, url: str, body: dict[str, Any]) -> Any:
        """The decoded JSON answer of a successful POST."""
        return decoded(self.request("POST", url, body), url)

    def close(self) -> None:
        self._client.close()


def decoded(response: httpx.Response, url: str) -> Any:
    """The JSON body of a successful response; raises for an error status or a body not JSON."""
    if response.status_code >= 400:
        error = (RewardModelError if response.status_code in INPUT_STATUSES
                 else RewardModelUnavailable)
        raise error(
            f"remote reward model at {redact_url(url)} returned HTTP {response.status_code}: "
            f"{detail(response)}")
    try:
        return response.json()
    except ValueError:
        raise RewardModelUnavailable(
            f"remote reward model at {redact_url(url)} returned a body that is not JSON: "
            f"{response.text[:200]!r}") from None


def detail(response: httpx.Response) -> str:
    """The server's error message: vLLM {"error": {"message"}} / {"message"}, TEI {"error"}."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or body.get("message") or body.get("detail")
    text = str(message) if message else (response.text or response.reason_phrase)
    return text.strip()[:300]
