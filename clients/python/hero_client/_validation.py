"""pydantic validation errors as the contract shows them: one ``{field, message}`` per problem, the
field written the way the client wrote it (``groups[0].prompt[1].role``). Shared by the service's
422 answers and the SDK's own checks, so both say the same thing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

# At most this many problems are returned (a 1024-group request with one typo per group must not
# become a megabyte of errors); the summary still counts them all.
MAX_LISTED_ERRORS = 50
# ... and at most this many are spelled out in the one-line summary.
MAX_SUMMARISED_ERRORS = 5


class FieldProblem(TypedDict):
    field: str
    message: str


def field_path(loc: Sequence[Any], root: str = "body") -> str:
    """('body', 'groups', 0, 'responses') -> 'groups[0].responses'."""
    path = ""
    for part in loc:
        if part == root and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            # pydantic names union members ("str", "list[ChatMessage]") and validators in loc;
            # they are not part of the field path the client wrote.
            if isinstance(part, str) and ("[" in part or part in {"str", "function-after"}):
                continue
            path += f".{part}" if path else str(part)
    return path or root


def problem_message(error: dict[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


def field_problems(errors: Iterable[dict[str, Any]], root: str = "body") -> list[FieldProblem]:
    """Every problem once, in pydantic's order (the order of the fields in the request)."""
    seen: set[tuple[str, str]] = set()
    problems: list[FieldProblem] = []
    for error in errors:
        problem = FieldProblem(field=field_path(error.get("loc", ()), root),
                               message=problem_message(error))
        key = (problem["field"], problem["message"])
        if key not in seen:
            seen.add(key)
            problems.append(problem)
    return problems


def _spelled_out(problem: FieldProblem) -> str:
    field, message = problem["field"], problem["message"]
    # "body is not valid JSON" already names its field.
    return message if message.startswith(field + " ") else f"{field}: {message}"


def summarise(problems: Sequence[FieldProblem]) -> str:
    """One line: ``groups[0].reference: Field required`` or
    ``3 problems: a: ...; b: ...; c: ...``."""
    if not problems:
        return "invalid request"
    listed = "; ".join(_spelled_out(p) for p in problems[:MAX_SUMMARISED_ERRORS])
    if len(problems) == 1:
        return listed
    more = len(problems) - MAX_SUMMARISED_ERRORS
    return f"{len(problems)} problems: {listed}" + (f"; and {more} more" if more > 0 else "")
