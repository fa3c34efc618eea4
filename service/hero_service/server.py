"""uvicorn with a graceful drain: on SIGTERM/SIGINT the service first turns /readyz 503 and answers
new scoring requests with 503, lets in-flight requests finish (up to ``drain_timeout_s``), then
lets uvicorn shut down. A second signal exits at once."""

from __future__ import annotations

import logging
import threading
import time
from types import FrameType
from typing import Optional

import uvicorn
from fastapi import FastAPI

from .state import Service

log = logging.getLogger("hero_service")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        service = app.state.service
        assert isinstance(service, Service)
        self.service = service
        self.drain_timeout_s = drain_timeout_s
        self._drain_started = False

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        if self._drain_started:
            log.warning("second signal %d: exiting without waiting", sig)
            super().handle_exit(sig, frame)
            return
        self._drain_started = True
        self.service.draining = True
        log.info("signal %d: draining (%d requests in flight)", sig, self.service.active_requests)
        threading.Thread(target=self._exit_when_drained, daemon=True,
                         name="hero-drain").start()

    def _exit_when_drained(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while self.service.active_requests > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.service.active_requests:
            log.warning("drain timeout: %d requests still in flight", self.service.active_requests)
        else:
            log.info("drained; shutting down")
        # should_exit rather than handle_exit: uvicorn re-raises signals it handled, and a
        # completed drain should end with status 0.
        self.should_exit = True
