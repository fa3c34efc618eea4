"""The JSON error shape ``{"error": {"code", "message", "field"}}`` for every failure; a 422 adds
``errors: [{field, message}, ...]`` with every problem found (``field`` is the first one's,
``message`` sums them up), and says "body is not valid JSON ... at line L column C" for non-JSON."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hero_client._validation import (
    MAX_LISTED_ERRORS,
    FieldProblem,
    field_problems,
    summarise,
)

from ..errors import ServiceError
from ..redaction import redact_text

log = logging.getLogger(__name__)


def error_body(code: str, message: str, field: str | None = None,
               errors: list[FieldProblem] | None = None) -> dict[str, Any]:
    """The one JSON error shape, for the handlers and for the ASGI middlewares that answer
    before the app (load shedding, body size, API key)."""
    detail: dict[str, Any] = {"code": code, "message": message, "field": field}
    if errors is not None:
        detail["errors"] = errors
    return {"error": detail}


def error_response(
    status: int, code: str, message: str, field: str | None = None,
    headers: dict[str, str] | None = None, errors: list[FieldProblem] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(code, message, field, errors), status_code=status,
                        headers=headers)


def _line_and_column(body: bytes, position: int) -> tuple[int, int]:
    before = body[:position].decode("utf-8", "replace")
    return before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1


def _body_problem(error: dict[str, Any], request: Request) -> FieldProblem | None:
    """What went wrong with the body as a whole, in words, or None for a field problem."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type")
    body: bytes = getattr(request, "_body", b"") or b""  # the bytes FastAPI already read
    if kind == "json_invalid":
        position = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
        line, column = _line_and_column(body, position)
        cause = (error.get("ctx") or {}).get("error", "JSON decode error")
        return FieldProblem(field="body", message=(
            f"body is not valid JSON: {cause} at line {line} column {column} (char {position})"))
    if loc != ("body",):
        return None
    if kind == "missing":
        return FieldProblem(field="body", message="body is empty: send a JSON object")
    if kind in ("model_attributes_type", "dict_type", "model_type"):
        content_type = request.headers.get("content-type", "")
        hint = ("" if "json" in content_type else
                f" (Content-Type is {content_type or 'missing'!r}: send application/json)")
        return FieldProblem(field="body", message=f"body must be a JSON object{hint}")
    return None


def validation_problems(exc: RequestValidationError, request: Request) -> list[FieldProblem]:
    problems: list[FieldProblem] = []
    plain = []
    for error in exc.errors():
        problem = _body_problem(error, request)
        if problem is not None:
            problems.append(problem)
        else:
            plain.append(error)
    return problems + field_problems(plain)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        # 429 overloaded and 503 reward_model_unavailable say when to come back.
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        # Messages may quote a remote RM's URL or its error text: never show a credential.
        message = redact_text(exc.message)
        # Every 422 has the same shape, whether pydantic or the pipeline found the problem.
        errors = ([FieldProblem(field=exc.field or "body", message=message)]
                  if exc.status == 422 else None)
        return error_response(exc.status, exc.code, message, exc.field, headers, errors)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Every problem, each with its field; ``field`` is the first one's and ``message`` sums
        # them all up, so clients reading only the contract's code/message/field still get it.
        problems = validation_problems(exc, request) or [
            FieldProblem(field="body", message="invalid request")]
        return error_response(422, "invalid_request", summarise(problems), problems[0]["field"],
                              errors=problems[:MAX_LISTED_ERRORS])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), None,
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"{type(exc).__name__}: internal error")
