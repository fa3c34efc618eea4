"""The in-process group store (the default: one replica).

:class:`MemoryBackend` plays the part Redis plays for the Redis store: the shared state, each
step atomic because it runs without an ``await`` on one event loop. :class:`MemoryGroupStore` is
the client; several may share one backend (what the contract tests use to stand in for several
replicas). The state machine is the same as ``lua/group.lua``'s, step for step."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .base import (
    Attach,
    GroupKey,
    GroupStore,
    Member,
    Reply,
    SigmaRule,
    SigmaState,
    Signals,
    fold_sigma,
    identical_overload,
)


@dataclass
class _Generation:
    run: str
    size: int
    deadline: float
    state: str = "open"  # open | closing | closed
    epoch: int = 0  # fencing token counter
    lease_until: float = 0.0
    partial: bool = False
    order: list[str] = field(default_factory=list)
    data: dict[str, Member] = field(default_factory=dict)
    result: Optional[str] = None
    expires_at: float = float("inf")


class MemoryBackend:
    """Shared state of the in-process store; ``clock`` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._heads: dict[str, tuple[str, int]] = {}  # digest -> (current gen, gens opened)
        self._gens: dict[tuple[str, str], _Generation] = {}
        self._member_gen: dict[tuple[str, str], str] = {}
        self.waiting = 0  # members in open generations (the memory bound)
        self._open_deadlines: list[tuple[float, str, str]] = []  # heap of (deadline, digest, gen)
        self._expiries: list[tuple[float, int, str, str]] = []  # heap of (at, seq, digest, gen)
        self._seq = itertools.count()
        self.sigma: dict[str, SigmaState] = {}
        self._listeners: list[Callable[[str, str, bool], None]] = []
        # member id -> (lease end in clock seconds, delivered)
        self.attachments: dict[str, tuple[float, bool]] = {}

    # -- bookkeeping ---------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[str, str, bool], None]) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[str, str, bool], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, digest: str, gen: str, closed: bool) -> None:
        for listener in list(self._listeners):
            listener(digest, gen, closed)

    def _expire_at(self, digest: str, gen: str, g: _Generation, at: float) -> None:
        g.expires_at = at
        heapq.heappush(self._expiries, (at, next(self._seq), digest, gen))

    def _housekeep(self, now: float) -> None:
        # Overdue open generations stop counting against the bound even if nobody is left to
        # claim them: they become "closing" with an expired lease, so any later waiter or
        # re-sent member takes them over (the Lua script's sweep does the same).
        while self._open_deadlines and self._open_deadlines[0][0] <= now:
            _, digest, gen = heapq.heappop(self._open_deadlines)
            g = self._gens.get((digest, gen))
            if g is not None and g.state == "open":
                self._begin_close(digest, gen, g, partial=True, lease_until=0.0)
        while self._expiries and self._expiries[0][0] <= now:
            at, _, digest, gen = heapq.heappop(self._expiries)
            g = self._gens.get((digest, gen))
            if g is not None and g.expires_at <= now:
                if g.state == "open":
                    self.waiting -= len(g.order)
                del self._gens[(digest, gen)]
                for member_id in g.order:
                    if self._member_gen.get((digest, member_id)) == gen:
                        del self._member_gen[(digest, member_id)]

    def _begin_close(self, digest: str, gen: str, g: _Generation, partial: bool,
                     lease_until: float) -> None:
        self.waiting -= len(g.order)
        g.state = "closing"
        g.partial = partial
        g.epoch += 1
        g.lease_until = lease_until
        self._notify(digest, gen, closed=False)

    def _closer_reply(self, gen: str, g: _Generation) -> Reply:
        sigma = self.sigma.get(g.run)
        return Reply("closer", gen, token=str(g.epoch), partial=g.partial,
                     sigma_ref=sigma.value if sigma else None,
                     members=tuple(g.data[m] for m in g.order))

    def _status(self, digest: str, gen: str, now: float, lease_s: float) -> Reply:
        """Where a generation stands; closes it at its deadline, takes over an expired lease."""
        g = self._gens.get((digest, gen))
        if g is None:
            return Reply("vanished", gen)
        if g.state == "closed":
            return Reply("closed", gen, result=g.result)
        if g.state == "open":
            if now >= g.deadline:
                self._begin_close(digest, gen, g, partial=True, lease_until=now + lease_s)
                return self._closer_reply(gen, g)
            return Reply("waiting", gen, remaining_s=g.deadline - now)
        if now >= g.lease_until:
            g.epoch += 1
            g.lease_until = now + lease_s
            return self._closer_reply(gen, g)
        return Reply("closing", gen, remaining_s=g.lease_until - now)

    # -- the atomic steps ----------------------------------------------------------------------

    def _pick_ids(self, bases: Sequence[str], attach: Attach, now: float,
                  wait_on_contention: bool) -> Union[list[str], Reply]:
        """The member ids an attaching join takes (see base.Attach), or the reply that stops it."""
        picked: list[str] = []
        contended = False
        for base in bases:
            choice = None
            for k in range(attach.slots):
                name = f"{base}#{k}"
                if name in picked:
                    continue
                until, delivered = self.attachments.get(name, (0.0, False))
                if until <= now:
                    choice = name
                    break
                contended = contended or not delivered
            if choice is None:
                return Reply("overloaded", detail=identical_overload(attach.slots))
            picked.append(choice)
        if contended and wait_on_contention:
            return Reply("contended")
        return picked

    def join(self, key: GroupKey, members: Sequence[Member], timeout_s: float, lease_s: float,
             ttl_s: float, max_waiting: int, attach: Optional[Attach] = None,
             wait_on_contention: bool = False) -> list[Reply]:
        now = self.clock()
        self._housekeep(now)
        digest = key.digest
        if attach is not None:
            picked = self._pick_ids([m.member_id for m in members], attach, now,
                                    wait_on_contention)
            if isinstance(picked, Reply):
                return [picked]
            members = [dataclasses.replace(m, member_id=p) for m, p in zip(members, picked)]
        known = [self._member_gen.get((digest, m.member_id)) for m in members]
        known = [g if g is not None and (digest, g) in self._gens else None for g in known]
        new = sum(1 for g in known if g is None)
        if new and self.waiting + new > max_waiting:
            return [Reply("overloaded", detail=f"{self.waiting} responses are waiting for "
                          f"their groups (limit {max_waiting})")]
        if attach is not None:
            for m in members:
                self.attachments[m.member_id] = (now + attach.lease_s, False)
        replies = self._join_members(key, members, known, now, timeout_s, lease_s, ttl_s)
        if attach is not None:
            replies = [dataclasses.replace(r, member_id=m.member_id)
                       for r, m in zip(replies, members)]
        return replies

    def _join_members(self, key: GroupKey, members: Sequence[Member],
                      known: Sequence[Optional[str]], now: float, timeout_s: float,
                      lease_s: float, ttl_s: float) -> list[Reply]:
        digest = key.digest
        replies = []
        for member, gen in zip(members, known):
            if gen is not None:  # a re-sent member: re-attach, never add it twice
                replies.append(self._status(digest, gen, now, lease_s))
                continue
            head = self._heads.get(digest)
            g = self._gens.get((digest, head[0])) if head else None
            if head is not None and g is not None and g.state == "open":
                gen = head[0]
            else:
                opened = head[1] + 1 if head else 1
                gen = str(opened)
                self._heads[digest] = (gen, opened)
                g = _Generation(run=key.run, size=key.size, deadline=now + timeout_s)
                self._gens[(digest, gen)] = g
                self._expire_at(digest, gen, g, now + timeout_s + ttl_s)
                heapq.heappush(self._open_deadlines, (g.deadline, digest, gen))
            g.order.append(member.member_id)
            g.data[member.member_id] = member
            self._member_gen[(digest, member.member_id)] = gen
            self.waiting += 1
            if len(g.order) >= g.size:
                self._begin_close(digest, gen, g, partial=False, lease_until=now + lease_s)
                replies.append(self._closer_reply(gen, g))
            elif now >= g.deadline:
                self._begin_close(digest, gen, g, partial=True, lease_until=now + lease_s)
                replies.append(self._closer_reply(gen, g))
            else:
                replies.append(Reply("waiting", gen, remaining_s=g.deadline - now))
        return replies

    def claim(self, key: GroupKey, gen: str, lease_s: float, deliver: Sequence[str] = (),
              ttl_s: float = 0.0) -> Reply:
        now = self.clock()
        self._housekeep(now)
        reply = self._status(key.digest, gen, now, lease_s)
        if reply.kind == "closed":
            self.mark_delivered(deliver, now + ttl_s)
        return reply

    def mark_delivered(self, names: Sequence[str], until: float) -> None:
        for name in names:
            self.attachments[name] = (until, True)

    def publish(self, key: GroupKey, gen: str, token: str, result: str, sigma: Optional[float],
                ttl_s: float, rule: SigmaRule, groups_per_step: Optional[int],
                deliver: Sequence[str] = ()) -> Reply:
        now = self.clock()
        self._housekeep(now)
        g = self._gens.get((key.digest, gen))
        if g is None:
            return Reply("vanished", gen)
        if g.state == "closed":
            return Reply("closed", gen, result=g.result)
        if g.state != "closing" or token != str(g.epoch):
            return Reply("closing", gen, remaining_s=max(0.0, g.lease_until - now))
        g.state = "closed"
        g.result = result
        self._expire_at(key.digest, gen, g, now + ttl_s)
        after = self.fold(g.run, [sigma], rule, groups_per_step) if sigma is not None else None
        self.mark_delivered(deliver, now + ttl_s)
        self._notify(key.digest, gen, closed=True)
        return Reply("closed", gen, result=result, sigma_after=after)

    def fold(self, run: str, sigmas: Sequence[float], rule: SigmaRule,
             groups_per_step: Optional[int]) -> Optional[float]:
        state = self.sigma.setdefault(run, SigmaState())
        now_ms = int(self.clock() * 1000)
        for s in sigmas:
            fold_sigma(state, s, now_ms, rule, groups_per_step)
        return state.value


class MemoryGroupStore(GroupStore):
    name = "memory"

    def __init__(self, backend: Optional[MemoryBackend] = None, **options: Any) -> None:
        super().__init__(**options)
        self.backend = backend or MemoryBackend()
        self._signals = Signals()
        self.backend.subscribe(self._notified)

    def _notified(self, digest: str, gen: str, closed: bool) -> None:
        self._signals.notify((digest, gen), closed)

    async def close(self) -> None:
        self.backend.unsubscribe(self._notified)

    async def sigma_values(self) -> dict[str, float]:
        self._stats.round_trips["sigma_read"] += 1
        return {run: s.value for run, s in self.backend.sigma.items() if s.value is not None}

    async def waiting(self) -> int:
        return self.backend.waiting

    async def renew_attachments(self, names: Sequence[str], lease_s: float) -> None:
        self._stats.round_trips["attach_renew"] += 1
        until = self.backend.clock() + lease_s
        for name in names:
            if not self.backend.attachments.get(name, (0.0, False))[1]:  # keep a delivered mark
                self.backend.attachments[name] = (until, False)

    async def release_attachments(self, names: Sequence[str], delivered: bool = False) -> None:
        if delivered:
            names = self._still_to_mark(names)
            if not names:
                return
        self._stats.round_trips["attach_release"] += 1
        for name in names:
            if delivered:
                self.backend.attachments[name] = (self.backend.clock() + self.result_ttl_s, True)
            else:
                self.backend.attachments.pop(name, None)
        # Lapsed leases of requests that never released (bounded by live traffic).
        now = self.backend.clock()
        if len(self.backend.attachments) > 4 * self.max_waiting:
            for name, (until, _) in list(self.backend.attachments.items()):
                if until <= now:
                    del self.backend.attachments[name]

    async def _join(self, key: GroupKey, members: Sequence[Member], timeout_s: float,
                    max_waiting: int, attach: Optional[Attach],
                    wait_on_contention: bool) -> list[Reply]:
        self._stats.round_trips["join"] += 1
        return self.backend.join(key, members, timeout_s, self.lease_s, self.result_ttl_s,
                                 max_waiting, attach, wait_on_contention)

    async def _claim(self, key: GroupKey, gen: str, deliver: Sequence[str] = ()) -> Reply:
        self._stats.round_trips["claim"] += 1
        return self.backend.claim(key, gen, self.lease_s, deliver, self.result_ttl_s)

    async def _publish(self, key: GroupKey, gen: str, token: str, result: str,
                       sigma: Optional[float], groups_per_step: Optional[int],
                       deliver: Sequence[str] = ()) -> Reply:
        self._stats.round_trips["publish"] += 1
        return self.backend.publish(key, gen, token, result, sigma, self.result_ttl_s,
                                    self.sigma_rule, groups_per_step, deliver)

    async def _fold_sigmas(self, run: str, sigmas: Sequence[float],
                           groups_per_step: Optional[int]) -> Optional[float]:
        self._stats.round_trips["sigma_update"] += 1
        return self.backend.fold(run, sigmas, self.sigma_rule, groups_per_step)

    async def _wait_signal(self, key: GroupKey, gen: str, timeout_s: float,
                           lease_s: Optional[float]) -> None:
        await self._signals.wait((key.digest, gen), timeout_s, lease_s)
