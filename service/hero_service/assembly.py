"""Group assembly across requests (``--group-size N``).

HERO needs the whole group, but some trainers send it in pieces: OpenRLHF posts one query per
``/get_reward`` request, and a multi-process TRL run splits a group across processes. Responses
for the same (prompt, reference) wait here until N have arrived; the group is scored once and each
waiting caller gets its own response's result. After ``timeout_s`` a partial group is scored and
flagged. The number of waiting rollouts is bounded (``max_waiting``, the server's
``--max-queued-rollouts``): a piece that would fit but finds the bound reached gets 429
``overloaded`` (retry later); a piece larger than the bound itself can never fit and gets a final
413 ``too_many_rollouts``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Hashable, Optional

from hero_client.schema import GroupResult

from .errors import Overloaded, TooManyRollouts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssembledResult:
    """One response's share of an assembled group."""

    group: GroupResult
    index: int
    sigma_ref: Optional[float]
    partial: bool


@dataclass(frozen=True)
class ScoredGroup:
    group: GroupResult
    sigma_ref: Optional[float]


ScoreFn = Callable[[str, Optional[str], list[str]], Awaitable[ScoredGroup]]


@dataclass
class _OpenGroup:
    prompt: str
    reference: Optional[str]
    responses: list[str] = field(default_factory=list)
    futures: list[asyncio.Future[AssembledResult]] = field(default_factory=list)
    timer: Optional[asyncio.TimerHandle] = None


class GroupAssembler:
    def __init__(self, group_size: int, timeout_s: float, max_waiting: int,
                 score: ScoreFn) -> None:
        if group_size < 1:
            raise ValueError("group_size must be >= 1")
        self.group_size = group_size
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self._score = score
        self._open: dict[Hashable, _OpenGroup] = {}
        self._waiting = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        return self._waiting

    def add(self, prompt: str, reference: Optional[str],
            responses: list[str]) -> list[asyncio.Future[AssembledResult]]:
        """Place responses into the open group for (prompt, reference); full groups are scored
        at once. Must be called on the event loop."""
        if len(responses) > self.max_waiting:
            raise TooManyRollouts(len(responses), self.max_waiting,
                                  "--max-queued-rollouts, rollouts waiting for their groups",
                                  field="query")
        if self._waiting + len(responses) > self.max_waiting:
            raise Overloaded(
                f"{self._waiting} rollouts waiting for their groups (limit {self.max_waiting})")
        loop = asyncio.get_running_loop()
        key = (prompt, reference)
        futures = []
        for response in responses:
            group = self._open.get(key)
            if group is None:
                group = _OpenGroup(prompt, reference)
                group.timer = loop.call_later(self.timeout_s, self._expire, key, group)
                self._open[key] = group
            future: asyncio.Future[AssembledResult] = loop.create_future()
            group.responses.append(response)
            group.futures.append(future)
            futures.append(future)
            self._waiting += 1
            if len(group.responses) >= self.group_size:
                self._flush(key, group, partial=False)
        return futures

    def _expire(self, key: Hashable, group: _OpenGroup) -> None:
        if self._open.get(key) is group:
            log.warning("group assembly timed out with %d of %d responses; scoring it partial",
                        len(group.responses), self.group_size)
            self._flush(key, group, partial=True)

    def _flush(self, key: Hashable, group: _OpenGroup, partial: bool) -> None:
        del self._open[key]
        if group.timer is not None:
            group.timer.cancel()
        task = asyncio.ensure_future(self._score_group(group, partial))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _score_group(self, group: _OpenGroup, partial: bool) -> None:
        try:
            scored = await self._score(group.prompt, group.reference, group.responses)
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
            for future in group.futures:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._waiting -= len(group.responses)
        scored.group.partial = partial
        for i, future in enumerate(group.futures):
            if not future.done():
                future.set_result(AssembledResult(scored.group, i, scored.sigma_ref, partial))

    async def flush_all(self) -> None:
        """Score every open group now (used when draining)."""
        for key, group in list(self._open.items()):
            self._flush(key, group, partial=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
