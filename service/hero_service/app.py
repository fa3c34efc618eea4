"""The FastAPI application: wiring of settings → verifiers, reward model, batcher → pipeline →
routes, with a lifespan that loads everything before /readyz turns green."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI

from . import __version__
from .admission import Admission
from .batching import Batcher
from .config import Settings
from .group_store import GroupStore, GroupStoreUnavailable, create_group_store
from .http.errors import install_error_handlers
from .http.openrlhf import GetRewardScorer
from .http.auth import ApiKeyAuth
from .http.middleware import BodySizeLimit, LoadShedding, QuietStartupFailure, RequestMetrics
from .http.routes import router
from .metrics import Metrics
from .pipeline import Pipeline
from .redaction import redact_text
from .reward_models import RewardModel, load_reward_model
from .verifiers import ExactVerifier, MathVerifier, NoVerifier, NumericVerifier, Verifier

log = logging.getLogger("hero_service")

RewardModelFactory = Callable[[Settings], RewardModel]


def default_reward_model(settings: Settings) -> RewardModel:
    return load_reward_model(
        settings.reward_model, device=settings.device, dtype=settings.dtype,
        max_length=settings.max_length, trust_remote_code=settings.trust_remote_code,
        remote_timeout_s=settings.remote_timeout_s,
    )


def build_verifiers(settings: Settings, metrics: Metrics) -> dict[str, Verifier]:
    return {
        "math": MathVerifier(
            workers=settings.resolved_verifier_workers(), timeout_s=settings.verifier_timeout_s,
            max_tasks=settings.verifier_max_tasks, memory_mb=settings.verifier_memory_mb,
            on_worker_failure=lambda reason: metrics.verifier_worker_failures.labels(reason).inc()),
        "exact": ExactVerifier(),
        "numeric": NumericVerifier(),
        "none": NoVerifier(),
    }


class Service:
    """Everything the routes need, created at start-up, torn down at shutdown."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.version = __version__
        self.pipeline: Optional[Pipeline] = None
        self.verifiers: dict[str, Verifier] = {}
        # Assembled groups and the server-side sigma-bar per run (one replica: in memory).
        # The one bound on the rollouts this process holds (scoring or parked).
        self.admission = Admission(settings.max_queued_rollouts, metrics)
        self.group_store: GroupStore = create_group_store(settings, result_ttl_s=1200)
        self.group_store_started = False
        self.group_store_error: Optional[str] = None  # why it could not start (for /readyz)
        self.get_reward_scorer: Optional[GetRewardScorer] = None
        self.draining = False
        self.active_requests = 0  # scoring requests being answered (maintained by middleware)
        self.startup_error: Optional[str] = None  # why the lifespan failed, in one line

    def ready(self) -> bool:
        return (self.pipeline is not None and not self.draining
                and all(v.ready() for v in self.verifiers.values()))

    async def not_ready_reason(self) -> Optional[str]:
        """None when ready; else why not, in a few words (for /readyz)."""
        if self.draining:
            return "draining"
        if not self.ready():
            return "starting"
        if not self.group_store_started:
            return f"group store not reachable: {self.group_store_error or 'starting'}"
        return await self.group_store.ready()

    def require_group_store(self) -> GroupStore:
        if not self.group_store_started:
            raise GroupStoreUnavailable(
                f"group store not started: {self.group_store_error or 'starting'}",
                retry_after_s=2)
        return self.group_store

    async def start_group_store(self) -> None:
        """Start the store; while Redis is unreachable, log one line and keep trying (the
        service stays up, /readyz says why it is not ready, and it turns ready once Redis
        answers)."""
        logged = False
        while True:
            try:
                await self.group_store.start()
            except GroupStoreUnavailable as exc:
                self.group_store_error = exc.message
                if not logged:
                    log.error("%s; not ready until it is reachable (retrying every 2 s)",
                              exc.message)
                    logged = True
                await asyncio.sleep(2.0)
                continue
            self.group_store_started, self.group_store_error = True, None
            if logged:
                log.info("group store %s reachable; ready", self.group_store.name)
            return

    def require_pipeline(self) -> Pipeline:
        from .errors import NotReady

        if self.draining:
            raise NotReady("service is draining (shutting down); send to another replica")
        if self.pipeline is None:
            raise NotReady("service is starting: the model or the verifier pool is not ready yet")
        return self.pipeline


def create_app(
    settings: Optional[Settings] = None,
    reward_model_factory: RewardModelFactory = default_reward_model,
) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    service = Service(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        verifiers = build_verifiers(settings, metrics)
        model: Optional[RewardModel] = None
        stage = "loading the reward model"
        try:
            model = await asyncio.to_thread(reward_model_factory, settings)
            stage = "starting the verifier pool"
            await asyncio.gather(*(v.start() for v in verifiers.values()))
        except Exception as exc:
            # Recorded for the CLI's one-line report (http.middleware.QuietStartupFailure).
            service.startup_error = redact_text(
                f"start-up failed {stage}: {type(exc).__name__}: {' '.join(str(exc).split())}")
            await asyncio.gather(*(v.close() for v in verifiers.values()),
                                 return_exceptions=True)
            if model is not None:
                model.close()
            raise
        device_type = getattr(getattr(model, "device", None), "type", "remote")
        batcher = Batcher(
            model, max_batch_tokens=settings.resolved_max_batch_tokens(device_type),
            max_wait_ms=settings.max_wait_ms, metrics=metrics)
        batcher.start()
        pipeline = Pipeline(settings, model, batcher, verifiers, metrics, service.admission)
        def on_sigma(run: str, value: Optional[float]) -> None:
            metrics.sigma_ref.set(value or 0.0)
            metrics.sigma_ref_by_run.labels(run).set(value or 0.0)

        service.get_reward_scorer = GetRewardScorer(
            pipeline, service.group_store, settings.group_size, on_sigma,
            on_partial=metrics.partial_groups.inc)
        store_task = asyncio.create_task(service.start_group_store(), name="group-store-start")
        service.verifiers = verifiers
        service.pipeline = pipeline
        log.info("ready: reward_model=%s on %s, verifier=%s, max_batch_tokens=%d",
                 model.model_id, device_type, settings.verifier, batcher.max_batch_tokens)
        try:
            yield
        finally:
            service.draining = True
            store_task.cancel()
            await asyncio.gather(store_task, return_exceptions=True)
            await service.group_store.close()
            batcher.stop()
            await asyncio.gather(*(v.close() for v in verifiers.values()))
            model.close()

    app = FastAPI(
        title="hero-rewards",
        version=__version__,
        description="HERO (Hybrid Ensemble Reward Optimization) rewards for RL of language models.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.api_key = settings.resolved_api_key()
    install_error_handlers(app)
    app.include_router(router)
    # Added innermost first. A request meets: request metrics (so 401/413/429 are counted), the
    # API key (on the headers: nothing of an unauthenticated body is read), the size limit, then
    # cheap load shedding — all before the body is parsed.
    app.add_middleware(LoadShedding, admission=service.admission, metrics=metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, api_key=app.state.api_key, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics, service=service)
    app.add_middleware(QuietStartupFailure)
    return app
