"""/v1/rewards groups sent in pieces (``group_key`` + ``group_size``): verl's per-sample reward
loop, TRL on several processes. Each piece is verified and RM-scored here; its per-response
results meet the other pieces of its group in the group store (the same join as /get_reward's),
and each caller gets a GroupResult with its own responses' entries, the whole group's sigma and
weight, and ``partial``. Groups without a key in the same request are scored whole as ever."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from hero_client.schema import Group, GroupResult, RewardsRequest, RewardsResponse

from ..admission import Permit
from ..group_store import GroupKey, GroupStore, Member, MemberOutcome, stable_digest
from ..pipeline import LocalScores, Pipeline
from .openrlhf import (
    DEFAULT_RUN,
    GetRewardScorer,
    StopCheck,
    assembled_combine,
    check_room_to_wait,
)


def has_pieces(request: RewardsRequest) -> bool:
    return any(g.is_piece for g in request.groups)


def piece_result(group: Group, g: int, outcomes: list[MemberOutcome]) -> GroupResult:
    """The caller's own entries of its closed group, in its piece's order."""
    whole = outcomes[0].group
    idx = [o.index for o in outcomes]

    def pick(values):
        return None if values is None else [values[i] for i in idx]

    return GroupResult(
        id=group.id if group.id is not None else str(g), sigma=whole.sigma, weight=whole.weight,
        rewards=pick(whole.rewards), advantages=pick(whole.advantages),
        verified=pick(whole.verified), verifier_status=pick(whole.verifier_status),
        rm_scores=pick(whole.rm_scores), normalized=pick(whole.normalized),
        truncated=pick(whole.truncated), partial=outcomes[0].partial)


async def score_rewards_with_pieces(pipeline: Pipeline, store: GroupStore,
                                    scorer: GetRewardScorer, request: RewardsRequest,
                                    run: str = DEFAULT_RUN,
                                    should_stop: Optional[StopCheck] = None) -> RewardsResponse:
    started = time.perf_counter()
    verifier = pipeline.check(request)
    pieces = [g for g, group in enumerate(request.groups) if group.is_piece]
    with pipeline.admit(request) as permit:
        if len(pieces) > 1:  # one piece: its join checks the bound atomically
            await check_room_to_wait(store,
                                     sum(len(request.groups[g].responses) for g in pieces))
        local = await pipeline.score_locally(request, verifier)
        return await _assemble(pipeline, store, scorer, request, run, should_stop, started,
                               pieces, local, permit)


async def _assemble(pipeline: Pipeline, store: GroupStore, scorer: GetRewardScorer,
                    request: RewardsRequest, run: str, should_stop: Optional[StopCheck],
                    started: float, pieces: list[int], local: LocalScores,
                    permit: Permit) -> RewardsResponse:
    whole = [g for g in range(len(request.groups)) if g not in pieces]
    results: list[Optional[GroupResult]] = [None] * len(request.groups)
    sigma_ref = request.params.sigma_ref
    if whole:
        sub = RewardsRequest(request_id=request.request_id, mode=request.mode,
                             verifier=request.verifier, params=request.params,
                             groups=[request.groups[g] for g in whole])
        combined = pipeline.combine(sub, local.only(whole), None)
        sigma_ref = combined.sigma_ref
        for g, result in zip(whole, combined.groups):
            results[g] = result.model_copy(update={"id": request.groups[g].id or str(g)})
    bases = []
    sizes: dict[int, int] = {}
    keys: dict[int, str] = {}
    for g in pieces:
        group = request.groups[g]
        assert group.group_key is not None and group.group_size is not None  # a piece has both
        keys[g], sizes[g] = group.group_key, group.group_size
        for response in group.responses:
            bases.append(stable_digest("piece", run, group.group_key, group.group_size,
                                       group.reference, response))
    async with scorer.held_ids(max(sizes.values())) as held:
        joins, at = [], 0
        for g in pieces:
            group = request.groups[g]
            rm = local.rm_results[g]
            members = [Member(bases[at + i], v.status, rm.scores[i] if rm else None,
                              rm.truncated[i] if rm else False)
                       for i, v in enumerate(local.verdicts[g])]
            at += len(members)
            joins.append(store.join(
                GroupKey.for_group_key(run, keys[g], sizes[g]), members,
                assembled_combine(request.params, request.mode), admitted=len(pieces) > 1,
                attach=held.attach, on_attached=held.add))
        permit.park()
        outcomes = await scorer.wait_for(asyncio.gather(*joins), held.ids, should_stop)
    for g, group_outcomes in zip(pieces, outcomes):
        results[g] = piece_result(request.groups[g], g, group_outcomes)
        if sigma_ref is None:
            o = group_outcomes[0]
            sigma_ref = o.sigma_ref if o.sigma_ref is not None else o.group.sigma
    pipeline.metrics.rollouts_scored.labels(request.mode).inc(local.n_rollouts)
    return RewardsResponse(
        request_id=request.request_id, mode=request.mode,
        reward_model=pipeline.reward_model.model_id, verifier=local.verifier.name,
        sigma_ref=sigma_ref, groups=results, timings_ms=local.timings(started))
