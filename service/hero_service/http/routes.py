"""HTTP routes of the v1 contract (DESIGN §2) plus OpenRLHF's /get_reward."""

from __future__ import annotations

from typing import Annotated, Any, Optional, get_args

from fastapi import APIRouter, Depends, Query, Request, Response

from hero_client.schema import (
    ErrorResponse,
    GetRewardRequest,
    GetRewardResponse,
    InfoResponse,
    LimitsInfo,
    Mode,
    RewardsRequest,
    RewardsResponse,
    VerifierName,
)

from ..assembly import StopCheck
from ..errors import InputError, NotReady, ServiceError
from ..group_store.base import MAX_ID_CHARS
from ..redaction import redact_text
from ..state import Service, service_of
from .auth import require_api_key
from .errors import error_response

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 503)}


ServiceDep = Annotated[Service, Depends(service_of)]


@router.post("/v1/rewards", response_model=RewardsResponse, responses=_ERRORS,
             dependencies=[Depends(require_api_key)])
async def rewards(
    body: RewardsRequest, request: Request, service: ServiceDep,
    run: str = Query("default", min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[^\x00-\x1f]+$",
                     description="names the server-side sigma-bar series (pieces only)"),
) -> RewardsResponse:
    """Score prompt groups: verifier verdicts + RM scores → HERO rewards and advantages. Groups
    with ``group_key`` + ``group_size`` are pieces, assembled with the other pieces of their
    group (on any replica) before HERO is computed; each caller gets its own entries."""
    runtime = service.require_runtime()
    if not any(g.is_piece for g in body.groups):
        return await runtime.pipeline.score(body)
    service.require_group_store()
    return await runtime.assembler.score_rewards(body, run, _stop_check(service, request))


def _stop_check(service: Service, request: Request) -> StopCheck:
    async def should_stop() -> Optional[ServiceError]:
        # Parked requests answer 503 + Retry-After at once on SIGTERM (their members stay in
        # the store: the client's retry re-attaches elsewhere), and let go of their member ids
        # when their client is gone (so its re-sent request re-attaches to them).
        if service.draining:
            return _Draining("service is draining (shutting down); re-send to another replica")
        if await request.is_disconnected():
            return _Draining("client disconnected")
        return None

    return should_stop


@router.post("/get_reward", response_model=GetRewardResponse, responses=_ERRORS,
             dependencies=[Depends(require_api_key)])
async def get_reward(
    body: GetRewardRequest, request: Request, service: ServiceDep,
    n: Optional[int] = Query(None, ge=0, description="group size for this trainer (overrides "
                             "--group-size; 0: score each request whole)"),
    run: str = Query("default", min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[^\x00-\x1f]+$",
                     description="names the server-side sigma-bar series"),
) -> GetRewardResponse:
    """OpenRLHF ``--reward.remote_url`` endpoint. Groups are the queries sharing a prompt (and
    label); with a group size (``--group-size`` or ``?n=``) they may arrive across requests and
    replicas. sigma_ref is the run's server-side running mean (``?run=``; OpenRLHF cannot send
    one). ``scores`` are the verdicts (1.0 verified, else 0.0), ``rewards`` the HERO rewards; see
    ``http/openrlhf.py`` for prompts, labels, EOS text and member ids."""
    runtime = service.require_runtime()
    limit = service.settings.max_responses_per_group
    if n is not None and n > limit:
        raise InputError(f"n={n}; the limit is {limit} (--max-responses-per-group)", "n")
    service.require_group_store()
    return await runtime.get_reward.score(body, n=n, run=run,
                                          should_stop=_stop_check(service, request))


class _Draining(NotReady):
    retry_after_s = 1


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. Cheap; checks nothing else."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(service: ServiceDep) -> Response:
    """Readiness: model loaded, verifier pool up, not draining."""
    reason = await service.not_ready_reason()
    if reason is None:
        return Response('{"status":"ready"}', media_type="application/json")
    return error_response(503, NotReady.code, f"not ready: {reason}")


@router.get("/metrics")
async def metrics(service: ServiceDep) -> Response:
    m = service.metrics
    store = service.group_store
    stats = store.stats()
    for op, count in stats.round_trips.items():
        m.group_store_round_trips.labels(op).set(count)
    m.group_store_members.set(stats.members)
    if service.runtime is not None:
        m.group_waiting_requests.set(service.runtime.assembler.parked)
    if service.group_store_started:
        try:
            m.group_waiting_members.set(await store.waiting())
        except ServiceError:
            pass  # the store is down: /readyz says so; the metrics still answer
    return Response(m.render(), media_type=m.content_type)


@router.get("/v1/info", response_model=InfoResponse)
async def info(service: ServiceDep) -> InfoResponse:
    s = service.settings
    runtime = service.runtime
    return InfoResponse(
        version=service.version,
        # /v1/info is open: the model id must never carry a URL's credentials.
        reward_model=redact_text(runtime.pipeline.reward_model.model_id if runtime
                                 else s.reward_model),
        verifier=s.verifier,
        verifiers=list(get_args(VerifierName)),
        modes=list(get_args(Mode)),
        group_size=s.group_size or None,
        limits=LimitsInfo(
            max_body_bytes=s.max_body_bytes, max_groups=s.max_groups,
            max_responses_per_group=s.max_responses_per_group,
            max_response_chars=s.max_response_chars, max_queued_rollouts=s.max_queued_rollouts),
        running_sigma_ref=await _sigma_values(service),
        group_store=service.group_store.name,
    )


async def _sigma_values(service: Service) -> dict[str, float]:
    if not service.group_store_started:
        return {}
    try:
        return await service.group_store.sigma_values()
    except ServiceError:
        return {}  # /v1/info stays up while the store is down
