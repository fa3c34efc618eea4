"""The service's state as the routes and middlewares see it: what exists from construction (the
settings, metrics, admission, group store), what start-up builds once (:class:`Runtime`), and the
few facts that change while it serves (draining, requests being answered, the store's reach)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from fastapi import Request

from . import __version__
from .admission import Admission
from .assembly import Assembler
from .config import Settings
from .errors import NotReady
from .group_store import GroupStore, GroupStoreUnavailable, create_group_store
from .http.openrlhf import GetRewardScorer
from .metrics import Metrics
from .pipeline import Pipeline
from .verifiers import Verifier

log = logging.getLogger("hero_service")

STORE_RETRY_S = 2.0


@dataclass(frozen=True)
class Runtime:
    """What the lifespan built before /readyz turns green; fixed from then on."""

    pipeline: Pipeline
    verifiers: Mapping[str, Verifier]
    assembler: Assembler
    get_reward: GetRewardScorer


class Service:
    """Everything the routes need; created with the app, started by its lifespan."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.version = __version__
        # The one bound on the rollouts this process holds (scoring or parked).
        self.admission = Admission(settings.max_queued_rollouts, metrics)
        # Assembled groups and the server-side sigma-bar per run (one replica: in memory).
        self.group_store: GroupStore = create_group_store(settings, result_ttl_s=1200)
        self.draining = False
        self.active_requests = 0  # scoring requests being answered (maintained by middleware)
        self.startup_error: Optional[str] = None  # why the lifespan failed, in one line
        self._runtime: Optional[Runtime] = None
        self._store_started = False
        self._store_error: Optional[str] = None  # why it could not start (for /readyz)

    # -- start-up -------------------------------------------------------------------------------

    def started(self, runtime: Runtime) -> None:
        if self._runtime is not None:
            raise RuntimeError("the service is started once")
        self._runtime = runtime

    async def start_group_store(self) -> None:
        """Start the store; while Redis is unreachable, log one line and keep trying (the
        service stays up, /readyz says why it is not ready, and it turns ready once Redis
        answers)."""
        logged = False
        while True:
            try:
                await self.group_store.start()
            except GroupStoreUnavailable as exc:
                self._store_error = exc.message
                if not logged:
                    log.error("%s; not ready until it is reachable (retrying every 2 s)",
                              exc.message)
                    logged = True
                await asyncio.sleep(STORE_RETRY_S)
                continue
            self._store_started, self._store_error = True, None
            if logged:
                log.info("group store %s reachable; ready", self.group_store.name)
            return

    # -- what the routes ask --------------------------------------------------------------------

    @property
    def runtime(self) -> Optional[Runtime]:
        return self._runtime

    @property
    def group_store_started(self) -> bool:
        return self._store_started

    @property
    def ready(self) -> bool:
        """Model loaded, verifier pool up, not draining (the group store aside)."""
        runtime = self._runtime
        return (runtime is not None and not self.draining
                and all(v.ready() for v in runtime.verifiers.values()))

    async def not_ready_reason(self) -> Optional[str]:
        """None when ready; else why not, in a few words (for /readyz)."""
        if self.draining:
            return "draining"
        if not self.ready:
            return "starting"
        if not self._store_started:
            return f"group store not reachable: {self._store_error or 'starting'}"
        return await self.group_store.ready()

    def require_runtime(self) -> Runtime:
        if self.draining:
            raise NotReady("service is draining (shutting down); send to another replica")
        if self._runtime is None:
            raise NotReady("service is starting: the model or the verifier pool is not ready yet")
        return self._runtime

    def require_group_store(self) -> GroupStore:
        if not self._store_started:
            raise GroupStoreUnavailable(
                f"group store not started: {self._store_error or 'starting'}",
                retry_after_s=2)
        return self.group_store


async def service_of(request: Request) -> Service:
    # async: FastAPI runs a plain ``def`` dependency in a worker thread (two hand-offs a request).
    """The app's service (a FastAPI dependency)."""
    service = request.app.state.service
    assert isinstance(service, Service)
    return service
