"""Service errors, each mapped to one HTTP status and JSON error code by ``http.errors``.

Which to retry: 429 ``overloaded`` (the queue is full right now) and 503 ``not_ready`` /
``reward_model_unavailable`` (come back after ``Retry-After``) pass on a later try; 413
``too_many_rollouts`` and 422 never will, so clients must not retry them."""

from __future__ import annotations


class ServiceError(Exception):
    """A failure with its HTTP status and JSON error code. A subclass names both in its class
    line (``class NotReady(ServiceError, status=503, code="not_ready")``) or inherits them."""

    status = 500
    code = "internal_error"
    retry_after_s: int | None = None  # sent as Retry-After when set

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None) -> None:
        super().__init_subclass__()
        if status is not None:
            cls.status = status
        if code is not None:
            cls.code = code

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class RetryLater(ServiceError):
    """A failure of the moment, not of the request: the caller should come back after
    ``retry_after_s`` (sent as Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InputError(ServiceError, status=422, code="invalid_request"):
    """The request is well-formed JSON but cannot be scored as asked (names the field)."""


class Overloaded(RetryLater, status=429, code="overloaded"):
    """The bounded queue is full; the caller should retry after ``retry_after_s``."""


class NotReady(ServiceError, status=503, code="not_ready"):
    """The service is starting or draining: another replica, or this one later, can serve."""


class ScoringFailed(ServiceError, status=503, code="scoring_failed"):
    """The reward model failed on this request's inputs (the service itself keeps serving)."""


class ScoringUnavailable(RetryLater, status=503, code="reward_model_unavailable"):
    """The reward model is down as a whole (timeout, unreachable, 5xx) or its circuit breaker is
    open: nothing about this request is wrong, so it should come back after ``retry_after_s``."""


class TooManyRollouts(ServiceError, status=413, code="too_many_rollouts"):
    """One request (or one assembled piece) holds more rollouts than the server's bound: no
    retry can pass, unlike the 429 of a queue that is merely full. The client must split it."""

    def __init__(self, rollouts: int, limit: int, bound: str, field: str = "groups") -> None:
        super().__init__(
            f"{rollouts} rollouts in one request; the limit is {limit} ({bound}): send at most "
            f"{limit} per request", field)
        self.rollouts = rollouts
        self.limit = limit


class Unauthorized(ServiceError, status=401, code="unauthorized"):
    """A scoring request without the service's API key, or with a wrong one."""
