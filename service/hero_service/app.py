"""The FastAPI application: wiring of settings → verifiers, reward model, batcher → pipeline →
routes, with a lifespan that loads everything before /readyz turns green."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI

from . import __version__
from .assembly import Assembler
from .audit import AuditLog
from .batching import Batcher
from .config import Settings
from .http.auth import ApiKeyAuth
from .http.errors import install_error_handlers
from .http.middleware import BodySizeLimit, LoadShedding, QuietStartupFailure, RequestMetrics
from .http.openrlhf import GetRewardScorer
from .http.routes import router
from .metrics import Metrics
from .pipeline import Pipeline
from .redaction import redact_text
from .reward_models import RewardModel, load_reward_model
from .state import Runtime, Service
from .verifiers import ExactVerifier, MathVerifier, NoVerifier, NumericVerifier, Verifier

log = logging.getLogger("hero_service")

RewardModelFactory = Callable[[Settings], RewardModel]


def default_reward_model(settings: Settings) -> RewardModel:
    return load_reward_model(
        settings.reward_model, device=settings.device, dtype=settings.dtype,
        max_length=settings.max_length, trust_remote_code=settings.trust_remote_code,
        remote_timeout_s=settings.remote_timeout_s, share_prompts=settings.share_prompts,
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
        audit: Optional[AuditLog] = None
        stage = "opening the audit log"
        try:
            if settings.audit_log is not None:
                audit = AuditLog(settings.audit_log, sample_rate=settings.audit_sample_rate,
                                 max_bytes=settings.audit_max_bytes, metrics=metrics)
            stage = "loading the reward model"
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
            if audit is not None:
                audit.close()
            raise
        batcher = Batcher(
            model, max_batch_tokens=settings.resolved_max_batch_tokens(model.device_type),
            max_wait_ms=settings.max_wait_ms, metrics=metrics)
        batcher.start()
        pipeline = Pipeline(settings, model, batcher, verifiers, metrics, service.admission,
                            audit)

        def on_sigma(run: str, value: Optional[float]) -> None:
            metrics.sigma_ref.set(value or 0.0)
            metrics.sigma_ref_by_run.labels(run).set(value or 0.0)

        assembler = Assembler(pipeline, service.group_store, on_sigma,
                              on_partial=metrics.partial_groups.inc)
        get_reward = GetRewardScorer(assembler, settings.group_size)
        store_task = asyncio.create_task(service.start_group_store(), name="group-store-start")
        # What is loaded by now (torch, transformers, the model, math-verify: ~450k objects
        # with the embedded RM) lives as long as the service. Frozen out of the cyclic GC, a
        # full collection no longer walks it: 250 ms holding the GIL here, which stalls the
        # forward and every request, about every 30 s under load (vLLM freezes its heap too).
        gc.collect()
        gc.freeze()
        service.started(Runtime(pipeline, verifiers, assembler, get_reward))
        log.info("ready: reward_model=%s on %s, verifier=%s, max_batch_tokens=%d",
                 model.model_id, model.device_type, settings.verifier, batcher.max_batch_tokens)
        try:
            yield
        finally:
            gc.unfreeze()  # back to the oldest generation: an app started again re-freezes
            service.draining = True
            store_task.cancel()
            await asyncio.gather(store_task, return_exceptions=True)
            await service.group_store.close()
            batcher.stop()
            await asyncio.gather(*(v.close() for v in verifiers.values()))
            model.close()
            if audit is not None:
                await asyncio.to_thread(audit.close)  # writes what is queued

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
