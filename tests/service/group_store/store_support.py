"""The real HERO combine for the group-store tests (what the service's closer will run)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
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


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Wait until ``condition()`` holds (e.g. a join's on_attached has reported); it may be
    async (a round trip to the store)."""
    deadline = time.monotonic() + SETTLE_LIMIT_S
    while True:
        held = condition()
        if await held if inspect.isawaitable(held) else held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {SETTLE_LIMIT_S} s: {what}")
        await asyncio.sleep(0.01)


async def until_waiting(store: GroupStore, at_least: int) -> int:
    """Wait until ``store`` counts at least ``at_least`` waiting members; returns the count."""
    counts: list[int] = []

    async def enough() -> bool:
        counts.append(await store.waiting())
        return counts[-1] >= at_least

    await until(enough, f"{at_least} members waiting")
    return counts[-1]
