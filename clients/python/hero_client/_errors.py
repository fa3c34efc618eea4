from __future__ import annotations

from typing import Optional


class HeroError(Exception):
    """Base class of the client's errors."""


class HeroAPIError(HeroError):
    """The service answered with an error (the JSON error body, parsed)."""

    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None) -> None:
        where = f" [{field}]" if field else ""
        super().__init__(f"HTTP {status} {code}{where}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class HeroConnectionError(HeroError):
    """The service could not be reached (after retries)."""


class HeroTimeoutError(HeroError):
    """The service did not answer within the timeout (after retries)."""
