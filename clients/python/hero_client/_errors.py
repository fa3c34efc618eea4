from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from ._validation import FieldProblem, field_problems, summarise


class HeroError(Exception):
    """Base class of the client's errors."""


class HeroAPIError(HeroError):
    """The service answered with an error (the JSON error body, parsed).

    ``field`` names the (first) field at fault; for a 422, ``errors`` lists every problem as
    ``{"field": ..., "message": ...}``."""

    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None,
                 errors: Optional[Sequence[FieldProblem]] = None) -> None:
        where = f" [{field}]" if field else ""
        super().__init__(f"HTTP {status} {code}{where}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.errors: list[FieldProblem] = [e for e in errors or () if isinstance(e, dict)]


class HeroValidationError(HeroAPIError, ValueError):
    """A request the SDK refused to send: what the server would answer with a 422, found before
    sending (same ``status``, ``code``, ``field`` and ``errors``). Also a ``ValueError``, like the
    pydantic error it replaces."""

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        problems = list(problems) or [FieldProblem(field="body", message="invalid request")]
        super().__init__(422, "invalid_request", summarise(problems), problems[0]["field"],
                         problems)
        # Not an HTTP answer: say so rather than "HTTP 422".
        self.args = (f"invalid request, not sent [{self.field}]: {self.message}",)

    @classmethod
    def from_pydantic(cls, errors: Sequence[Any], at: str = "") -> HeroValidationError:
        """pydantic's ``exc.errors()`` for an object found at ``at`` (``groups[3]``) of the
        request, with fields named as the server names them."""
        return cls([FieldProblem(field=_join(at, p["field"]) or "request", message=p["message"])
                    for p in field_problems(errors, root="")])


def _join(at: str, field: str) -> str:
    if not at or not field:
        return at or field
    return f"{at}{'' if field.startswith('[') else '.'}{field}"


class HeroConnectionError(HeroError):
    """The service could not be reached (after retries)."""


class HeroTimeoutError(HeroError):
    """The service did not answer within the timeout (after retries)."""
