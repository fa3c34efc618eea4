"""ASGI middleware: the body-size limit and load shedding (before any parsing), per-request
metrics/logging, and a quiet start-up failure. The API-key check lives in ``auth.py``."""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..admission import Admission
from ..audit import HTTP_REQUEST_ID
from ..metrics import Metrics
from ..state import Service
from .errors import error_body

log = logging.getLogger("hero_service.access")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _TooLarge(BaseException):
    """BaseException so the framework's body parser, which turns an Exception into a 400, lets
    it through to this middleware."""


def _json_error(status: int, code: str, message: str, field: str | None = "body",
                extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> tuple[dict[str, Any], bytes]:
    body = json.dumps(error_body(code, message, field)).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()), *extra_headers]}
    return start, body


async def send_json_error(send: Send, status: int, code: str, message: str,
                          field: str | None = "body",
                          extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer with the one JSON error body from a middleware, without calling the app."""
    start, body = _json_error(status, code, message, field, extra_headers)
    await send(start)
    await send({"type": "http.response.body", "body": body})


class _ScopeMiddleware:
    """A pure ASGI middleware that acts on one type of scope (``handles``) and hands every other
    one to the app untouched, so lifespan events never meet request logic and vice versa."""

    handles = "http"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == self.handles:
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


SCORING_PATHS = ("/v1/rewards", "/get_reward")


class LoadShedding(_ScopeMiddleware):
    """Answer 429 *before* reading and parsing the body while the service is already full.

    Under a retry storm most requests are refused; refusing them after JSON parsing and
    validation spends the CPU the admitted ones need (on a small CPU box goodput collapsed to a
    quarter). It only asks whether the admission is full; taking the request's permit (after
    parsing, when its size is known) stays the precise check."""

    def __init__(self, app: ASGIApp, admission: Admission, metrics: Metrics) -> None:
        super().__init__(app)
        self.admission = admission
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] not in SCORING_PATHS or not self.admission.full:
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels("overloaded").inc()
        error = self.admission.overloaded()
        await send_json_error(send, error.status, error.code, error.message, None,
                              [(b"retry-after", str(error.retry_after_s).encode())])


class BodySizeLimit(_ScopeMiddleware):
    """413 for bodies over ``max_bytes``, checked on Content-Length and while streaming (chunked
    uploads have no Content-Length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(send)
                return
        seen = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not response_started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        await send_json_error(send, 413, "payload_too_large",
                              f"request body exceeds {self.max_bytes} bytes")


UNTRACKED_PATHS = ("/healthz", "/readyz", "/metrics")


class RequestIds:
    """12-hex-digit request ids: a random prefix per process, then a counter. Unique within a
    process (for 16.7 M requests) and, by the prefix, across replicas in practice; no syscall
    per request (uuid4 reads os.urandom, which releases and retakes the GIL on the loop)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(3).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFF:06x}"


class RequestMetrics(_ScopeMiddleware):
    """Counts and times every request by route, logs one line per scoring request, and keeps
    ``service.active_requests`` (what a graceful drain waits for)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, service: Service) -> None:
        super().__init__(app)
        self.metrics = metrics
        self.service = service
        self.request_ids = RequestIds()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500
        request_id = self.request_ids.next()
        context_token = HTTP_REQUEST_ID.set(request_id)

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        tracked = scope["path"] not in UNTRACKED_PATHS
        if tracked:
            self.service.active_requests += 1
        try:
            await self.app(scope, receive, capture)
        finally:
            HTTP_REQUEST_ID.reset(context_token)
            if tracked:
                self.service.active_requests -= 1
            route = scope.get("route")
            # Requests refused before routing (401/413/429) still count under their endpoint;
            # any other unrouted path is one label, so labels stay bounded.
            path = scope["path"]
            endpoint = getattr(route, "path", None) or (
                path if path in SCORING_PATHS else "unmatched")
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(elapsed)
            if tracked:
                log.info("request_id=%s %s %s status=%d ms=%.1f", request_id, scope["method"],
                         scope["path"], status, elapsed * 1000)


class QuietStartupFailure(_ScopeMiddleware):
    """uvicorn logs the lifespan's start-up failure message verbatim, and Starlette puts a full
    traceback there. The lifespan records the cause (``service.startup_error``) and the CLI prints
    it as one line, so the traceback is dropped (``--log-level debug`` logs it)."""

    handles = "lifespan"

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def quiet_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                logging.getLogger("hero_service").debug(
                    "start-up failed:\n%s", message.get("message", ""))
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, quiet_send)
