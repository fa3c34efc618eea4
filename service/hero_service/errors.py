"""Service errors, each mapped to one HTTP status and JSON error code by ``http.errors``."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InputError(ServiceError):
    """The request is well-formed JSON but cannot be scored as asked (names the field)."""

    status = 422
    code = "invalid_request"


class Overloaded(ServiceError):
    """The bounded queue is full; the caller should retry after ``retry_after_s``."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(ServiceError):
    status = 503
    code = "not_ready"


class ScoringFailed(ServiceError):
    """The reward model failed for this request (the service itself keeps serving)."""

    status = 503
    code = "scoring_failed"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"
