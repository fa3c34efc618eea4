"""The real HERO combine for the group-store tests (what the service's closer will run)."""

from __future__ import annotations

from typing import Optional

from hero_client import hero
from hero_client.schema import GroupResult
from hero_service.group_store import ClosedGroup, Member

PARAMS = hero.HeroParams()


def hero_group(members: tuple[Member, ...], sigma_ref: Optional[float]) -> GroupResult:
    verified = [m.verified for m in members]
    scores = [m.rm_score for m in members]
    assert all(s is not None for s in scores)
    result = hero.score_group("hero", verified, scores, PARAMS, sigma_ref)  # type: ignore[arg-type]
    return GroupResult(
        id="assembled", sigma=result.sigma, weight=result.weight, rewards=result.rewards,
        advantages=result.advantages, verified=verified,
        verifier_status=[m.verifier_status for m in members], rm_scores=scores,  # type: ignore[arg-type]
        normalized=result.normalized, truncated=[m.truncated for m in members])


def combine(group: ClosedGroup) -> GroupResult:
    return hero_group(group.members, group.sigma_ref)


class RecordingCombine:
    """The real combine, remembering what each call was given."""

    def __init__(self) -> None:
        self.calls: list[ClosedGroup] = []

    def __call__(self, group: ClosedGroup) -> GroupResult:
        self.calls.append(group)
        return combine(group)


def member(member_id: str, score: float, status: str = "correct") -> Member:
    return Member(member_id, status, score)  # type: ignore[arg-type]
