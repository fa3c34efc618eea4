"""OpenRLHF remote-RM compatibility: ``/get_reward`` payloads to HERO groups and back.

Queries sharing a (prompt, label) form one group; the response text is the query with its prompt
prefix removed (OpenRLHF sends prompt + response as one string). OpenRLHF cannot send sigma_ref,
so the server's running mean is used; with ``--group-size`` the queries of one group may arrive
in separate requests and are assembled (see ``assembly.py``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional

from hero_client.schema import GetRewardRequest, GetRewardResponse, Group, RewardsRequest

from ..assembly import AssembledResult, GroupAssembler, ScoredGroup
from ..pipeline import Pipeline


@dataclass(frozen=True)
class QueryGroup:
    prompt: str
    label: Optional[str]
    responses: list[str]
    positions: list[int]  # where each response's query sits in the request


def response_text(query: str, prompt: str) -> str:
    return query[len(prompt):] if prompt and query.startswith(prompt) else query


def split_by_prompt(request: GetRewardRequest) -> list[QueryGroup]:
    groups: dict[tuple[str, Optional[str]], QueryGroup] = {}
    for i, query in enumerate(request.query):
        prompt = request.prompts[i] if request.prompts is not None else ""
        label = request.labels[i] if request.labels is not None else None
        group = groups.setdefault((prompt, label), QueryGroup(prompt, label, [], []))
        group.responses.append(response_text(query, prompt))
        group.positions.append(i)
    return list(groups.values())


def build_response(results: list[AssembledResult]) -> GetRewardResponse:
    """Per-query rewards; OpenRLHF turns every extra_logs entry into a tensor, so they are
    numbers only, one per query."""
    rewards = [r.group.rewards[r.index] for r in results]
    extra_logs = {
        "verified": [float(r.group.verified[r.index]) for r in results],
        "rm_score": [r.group.rm_scores[r.index] if r.group.rm_scores else 0.0 for r in results],
        "hero_weight": [r.group.weight for r in results],
        "sigma_ref": [r.sigma_ref or 0.0 for r in results],
        "partial": [float(r.partial) for r in results],
    }
    return GetRewardResponse(rewards=rewards, scores=rewards, extra_logs=extra_logs)


class GetRewardScorer:
    """Scores /get_reward traffic: request by request, or through group assembly."""

    def __init__(self, pipeline: Pipeline, running_sigma, on_sigma, group_size: int,
                 group_timeout_s: float, max_waiting: int) -> None:
        self.pipeline = pipeline
        self.running_sigma = running_sigma
        self._on_sigma = on_sigma
        self.assembler = (GroupAssembler(group_size, group_timeout_s, max_waiting,
                                         self._score_one) if group_size > 0 else None)

    async def _score_groups(self, groups: list[Group]) -> tuple[list, Optional[float]]:
        result = await self.pipeline.score(RewardsRequest(groups=groups), self.running_sigma.value)
        self._on_sigma(self.running_sigma.update(g.sigma for g in result.groups))
        return result.groups, result.sigma_ref

    async def _score_one(self, prompt: str, label: Optional[str],
                         responses: list[str]) -> ScoredGroup:
        (group,), sigma_ref = await self._score_groups(
            [Group(prompt=prompt, reference=label, responses=responses)])
        return ScoredGroup(group, sigma_ref)

    async def score(self, request: GetRewardRequest) -> GetRewardResponse:
        query_groups = split_by_prompt(request)
        results: list[Optional[AssembledResult]] = [None] * len(request.query)
        if self.assembler is None:
            scored, sigma_ref = await self._score_groups(
                [Group(id=str(g), prompt=q.prompt, reference=q.label, responses=q.responses)
                 for g, q in enumerate(query_groups)])
            for q, group in zip(query_groups, scored):
                for index, position in enumerate(q.positions):
                    results[position] = AssembledResult(group, index, sigma_ref, False)
        else:
            # Validate here so one caller's bad query cannot fail the others in its group.
            self.pipeline.check(RewardsRequest(groups=[
                Group(prompt=q.prompt, reference=q.label, responses=q.responses)
                for q in query_groups]))
            futures = [(q, self.assembler.add(q.prompt, q.label, q.responses))
                       for q in query_groups]
            for q, group_futures in futures:
                for position, outcome in zip(q.positions, await asyncio.gather(*group_futures)):
                    results[position] = outcome
        assert all(r is not None for r in results)
        return build_response(results)  # type: ignore[arg-type]
