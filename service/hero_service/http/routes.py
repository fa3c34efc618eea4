"""HTTP routes of the v1 contract (DESIGN §2) plus OpenRLHF's /get_reward."""

from __future__ import annotations

from typing import get_args

from fastapi import APIRouter, Depends, Request, Response

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

from ..errors import NotReady
from ..redaction import redact_text
from .auth import require_api_key
from .errors import error_response

router = APIRouter()

_ERRORS = {code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 503)}


def _service(request: Request):  # -> Service (imported lazily to avoid a cycle)
    return request.app.state.service


@router.post("/v1/rewards", response_model=RewardsResponse, responses=_ERRORS,
             dependencies=[Depends(require_api_key)])
async def rewards(body: RewardsRequest, request: Request) -> RewardsResponse:
    """Score prompt groups: verifier verdicts + RM scores → HERO rewards and advantages."""
    return await _service(request).require_pipeline().score(body)


@router.post("/get_reward", response_model=GetRewardResponse, responses=_ERRORS,
             dependencies=[Depends(require_api_key)])
async def get_reward(body: GetRewardRequest, request: Request) -> GetRewardResponse:
    """OpenRLHF ``--reward.remote_url`` endpoint. Groups are the queries sharing a prompt (and
    label); with ``--group-size`` they may arrive across requests. sigma_ref is the server's
    running mean (OpenRLHF cannot send one). ``scores`` are the verdicts (1.0 verified, else 0.0),
    ``rewards`` the HERO rewards; see ``http/openrlhf.py`` for prompts, labels and EOS text."""
    service = _service(request)
    service.require_pipeline()
    return await service.get_reward_scorer.score(body)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. Cheap; checks nothing else."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    """Readiness: model loaded, verifier pool up, not draining."""
    service = _service(request)
    if service.ready():
        return Response('{"status":"ready"}', media_type="application/json")
    reason = "draining" if service.draining else "starting"
    return error_response(503, NotReady.code, f"not ready: {reason}")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = _service(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/v1/info", response_model=InfoResponse)
async def info(request: Request) -> InfoResponse:
    service = _service(request)
    s = service.settings
    pipeline = service.pipeline
    return InfoResponse(
        version=service.version,
        # /v1/info is open: the model id must never carry a URL's credentials.
        reward_model=redact_text(pipeline.reward_model.model_id if pipeline else s.reward_model),
        verifier=s.verifier,
        verifiers=list(get_args(VerifierName)),
        modes=list(get_args(Mode)),
        group_size=s.group_size or None,
        limits=LimitsInfo(
            max_body_bytes=s.max_body_bytes, max_groups=s.max_groups,
            max_responses_per_group=s.max_responses_per_group,
            max_response_chars=s.max_response_chars, max_queued_rollouts=s.max_queued_rollouts),
    )
