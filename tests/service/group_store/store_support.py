"""The real HERO combine for the group-store tests (what the service's closer will run)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Optional

from hero_client import hero
from hero_client.schema import GroupResult
from hero_service.group_store import ClosedGroup, GroupStore, Member

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


# A fixed sleep after starting a join is no proof that the join reached the store: on a loaded
# machine a new Redis connection alone can take longer. Tests wait for the effect instead.
SETTLE_LIMIT_S = 10.0


async def until_waiting(store: GroupStore, at_least: int) -> int:
    """Wait until ``store`` counts at least ``at_least`` waiting members; returns the count."""
    deadline = time.monotonic() + SETTLE_LIMIT_S
    while (count := await store.waiting()) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} members waiting after {SETTLE_LIMIT_S} s, "
                                 f"expected {at_least}")
        await asyncio.sleep(0.01)
    return count


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds (e.g. a join's on_attached has reported)."""
    deadline = time.monotonic() + SETTLE_LIMIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {SETTLE_LIMIT_S} s: {what}")
        await asyncio.sleep(0.01)
