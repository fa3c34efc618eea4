"""OpenRLHF remote-RM compatibility: ``/get_reward`` payloads to HERO groups and back.

Queries sharing a (prompt, label) form one group; the response text is the query with its prompt
prefix removed (OpenRLHF sends prompt + response as one string)."""

from __future__ import annotations

from dataclasses import dataclass

from hero_client.schema import GetRewardRequest, GetRewardResponse, Group, RewardsResponse


@dataclass(frozen=True)
class Placement:
    group: int
    index: int


def response_text(query: str, prompt: str) -> str:
    return query[len(prompt):] if prompt and query.startswith(prompt) else query


def to_groups(request: GetRewardRequest) -> tuple[list[Group], list[Placement]]:
    slots: dict[tuple[str, str | None], int] = {}
    members: list[tuple[str, str | None, list[str]]] = []
    placements = []
    for i, query in enumerate(request.query):
        prompt = request.prompts[i] if request.prompts is not None else ""
        label = request.labels[i] if request.labels is not None else None
        g = slots.setdefault((prompt, label), len(members))
        if g == len(members):
            members.append((prompt, label, []))
        responses = members[g][2]
        placements.append(Placement(g, len(responses)))
        responses.append(response_text(query, prompt))
    groups = [Group(id=str(g), prompt=p, reference=label, responses=r)
              for g, (p, label, r) in enumerate(members)]
    return groups, placements


def from_result(result: RewardsResponse, placements: list[Placement]) -> GetRewardResponse:
    rewards, verified, rm_scores, weights = [], [], [], []
    for p in placements:
        group = result.groups[p.group]
        rewards.append(group.rewards[p.index])
        verified.append(1.0 if group.verified[p.index] else 0.0)
        rm_scores.append(group.rm_scores[p.index] if group.rm_scores else 0.0)
        weights.append(group.weight)
    # OpenRLHF turns every extra_logs entry into a tensor: numbers only, one per query.
    extra_logs = {
        "verified": verified,
        "rm_score": rm_scores,
        "hero_weight": weights,
        "sigma_ref": [result.sigma_ref or 0.0] * len(placements),
    }
    return GetRewardResponse(rewards=rewards, scores=rewards, extra_logs=extra_logs)
