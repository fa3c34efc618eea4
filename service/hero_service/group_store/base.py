"""The group store: where pieces of one HERO group, scored on any replica, meet.

Each replica verifies and RM-scores the responses it received; only per-response results
(:class:`Member`: verdict status, RM score, truncated, a caller-chosen member id) go to the store.
One atomic step adds a member and closes the group exactly once, when it has N members or its
deadline has passed; whoever closes it (the *closer*) computes HERO for the whole group with a
pure ``combine`` callback, stores the result with a TTL and notifies; every waiting caller, on
any replica, gets its own response's share (:class:`MemberOutcome`).

The protocol (:meth:`GroupStore.join`) is written once here, over four atomic primitives that
each implementation provides (``_join``, ``_claim``, ``_publish``, ``_fold_sigmas``) plus a
wake-up signal. A group generation moves ``open -> closing -> closed``:

- ``open``: members are added; the join that brings the N-th member, or any join or claim after
  the deadline, moves it to ``closing`` and becomes its closer (a fencing token guards the
  publish, so a closer that lost its lease cannot publish over its successor).
- ``closing``: the closer has ``lease_s`` to publish. If it died, the first waiter whose claim
  finds the lease expired takes over (new token) and computes the same result from the members
  the store holds.
- ``closed``: the result is stored for ``result_ttl_s``; a re-sent member id re-attaches to it.

Decisions where the issue left a choice:

- A member that arrives for a key whose group has closed opens the *next* group for that key
  (the same prompt may be sampled again in a later step); it is never rejected. A member id that
  is already in a group (a client's retry) re-attaches instead and is never counted twice.
- The late member that finds an open group past its deadline is added, then the group closes
  partial at once, with that joiner as closer (the deadline is enforced by the store on every
  join and claim, so no group waits forever if the replica that opened it died).
- If ``combine`` raises, the closer publishes the failure: every waiter gets
  :class:`GroupScoringFailed` with its message rather than a reward (never a silent 0).
- While waiting, a store outage is retried until the group's deadline plus one lease; then the
  waiter fails with :class:`GroupStoreUnavailable`. The first join of a request fails at once.
- A group whose store entry vanished (Redis restarted without persistence) is re-joined by its
  waiters with the time they had left, so it completes or closes partial by its deadline.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args

from hero_client.schema import GroupResult, VerifierStatus

from ..errors import Overloaded, ScoringFailed, ServiceError

log = logging.getLogger(__name__)

MAX_ID_CHARS = 256
# The waiting bound of a join whose request was admitted as a whole (exact in a Lua double).
UNBOUNDED = 2 ** 53
# How long the sigma-bar this process's publish returned stands for a read of it.
SIGMA_FRESH_S = 1.0


# -- errors -------------------------------------------------------------------------------------


class GroupStoreUnavailable(ServiceError):
    """The store cannot be reached (or answered too slowly); the request can be retried."""

    status = 503
    code = "group_store_unavailable"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GroupStoreOverloaded(Overloaded):
    """Too many members are waiting for their groups (the bound on waiting memory)."""


class GroupScoringFailed(ScoringFailed):
    """The closer could not compute the group's result; every member of the group gets this."""


# -- data types ---------------------------------------------------------------------------------

_STATUSES = frozenset(get_args(VerifierStatus))


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"{what} has {len(value)} characters; the limit is {MAX_ID_CHARS}")
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"{what} must not contain control characters")
    return value


def stable_digest(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (group identities, member ids)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class GroupKey:
    """Which group a member belongs to. ``size`` (N) is part of the key, so evaluation traffic
    with another N never mixes with training traffic; ``run`` names the sigma-bar series."""

    run: str
    identity: str
    size: int

    def __post_init__(self) -> None:
        _check_id(self.run, "run")
        if not isinstance(self.identity, str):
            raise ValueError("identity must be a string")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"group size must be an integer >= 1, got {self.size!r}")

    @classmethod
    def for_prompt(cls, run: str, prompt: Union[str, list[dict[str, str]]],
                   reference: Optional[str], size: int) -> GroupKey:
        """The key of the group of (run, prompt, reference) with N = ``size``."""
        return cls(run, stable_digest("prompt", prompt, reference), size)

    @classmethod
    def for_group_key(cls, run: str, group_key: str, size: int) -> GroupKey:
        """The key of a caller-named group (``group_key`` on /v1/rewards)."""
        return cls(run, stable_digest("group_key", group_key), size)

    @property
    def digest(self) -> str:
        # Fixed-length store keys whatever the prompt's length.
        return stable_digest(self.run, self.identity, self.size)


@dataclass(frozen=True)
class Member:
    """One response's scored share, as it travels to the store (never the response text).

    ``member_id`` identifies the response, not its text: two identical responses are two members;
    the same id sent again (a client's retry) re-attaches to its member."""

    member_id: str
    verifier_status: VerifierStatus
    rm_score: Optional[float]
    truncated: bool = False

    def __post_init__(self) -> None:
        _check_id(self.member_id, "member_id")
        if self.verifier_status not in _STATUSES:
            raise ValueError(f"verifier_status must be one of {sorted(_STATUSES)}, "
                             f"got {self.verifier_status!r}")
        if self.rm_score is not None and not math.isfinite(self.rm_score):
            raise ValueError(f"rm_score of member {self.member_id!r} is not finite")

    @property
    def verified(self) -> bool:
        return self.verifier_status == "correct"

    def to_json(self) -> str:
        return json.dumps({"s": self.verifier_status, "r": self.rm_score, "t": self.truncated})

    @classmethod
    def from_json(cls, member_id: str, blob: str) -> Member:
        data = json.loads(blob)
        return cls(member_id, data["s"], data["r"], bool(data["t"]))


@dataclass(frozen=True)
class Attach:
    """Member ids picked by the join itself, in the same atomic step (one round trip).

    Each member's ``member_id`` is then its *base* id; the join gives it ``base#k``, the first
    k < ``slots`` whose attachment no live request's lease holds and no delivered answer keeps,
    and holds it for ``lease_s`` (the caller renews it while it waits, and releases it). Two
    identical responses of one group thus become separate members, while a re-sent request
    (whose first attempt's lease was released or lapsed) re-attaches to its member. When an
    earlier id is held by a live lease (an identical sample, or this very request's first
    attempt on a replica that died), the join adds nothing, waits ``contention_wait_s`` (a dead
    holder's lease lapses meanwhile, a live one's is renewed) and then picks."""

    slots: int
    lease_s: float
    contention_wait_s: float

    def __post_init__(self) -> None:
        if self.slots < 1 or self.lease_s <= 0 or self.contention_wait_s < 0:
            raise ValueError("slots must be >= 1, lease_s > 0, contention_wait_s >= 0")


def identical_overload(slots: int) -> str:
    return (f"{slots} identical responses to this prompt are waiting or were answered "
            "recently")


@dataclass(frozen=True)
class ClosedGroup:
    """What ``combine`` gets: the whole group, in join order."""

    key: GroupKey
    members: tuple[Member, ...]
    partial: bool
    sigma_ref: Optional[float]  # the run's sigma-bar when the group closed (None before any)


Combine = Callable[[ClosedGroup], GroupResult]
"""Pure: the HERO result for the whole group, one entry per member, in the members' order."""


@dataclass(frozen=True)
class MemberOutcome:
    """One member's share of its closed group."""

    member_id: str
    index: int  # position of this member in ``group``'s lists
    group: GroupResult
    sigma_ref: Optional[float]
    partial: bool
    published_here: bool  # this call published the result (count group-level metrics once)

    @property
    def reward(self) -> float:
        return self.group.rewards[self.index]


@dataclass(frozen=True)
class SigmaRule:
    """The server-side running sigma-bar, one series per run, folded one group at a time with
    the time constant of DESIGN's batch rule (sigma-bar <- 0.9 sigma-bar + 0.1 batch mean).

    With G groups per training step, each group moves sigma-bar with momentum 0.9 ** (1 / G), so
    after one step the old value keeps weight 0.9 exactly as in the batch rule. The first step
    seeds it: its groups' plain running mean (exactly "the first batch sets sigma-bar to its mean
    sigma"). G is the caller's ``groups_per_step`` when known (per call or ``groups_per_step``
    here); otherwise it is estimated as the number of groups in the last completed step, a step
    ending where no group of the run closed for ``step_gap_s`` (a trainer's update phase), capped
    at ``max_groups_per_step`` so traffic without pauses still gets a moving mean. Partial
    groups, singleton groups and groups without a sigma never move it (the caller decides;
    :func:`sigma_moves` is the rule)."""

    momentum: float = 0.9
    groups_per_step: Optional[int] = None
    step_gap_s: float = 30.0
    max_groups_per_step: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        if self.groups_per_step is not None and self.groups_per_step < 1:
            raise ValueError("groups_per_step must be >= 1")
        if self.step_gap_s <= 0 or self.max_groups_per_step < 1:
            raise ValueError("step_gap_s must be > 0 and max_groups_per_step >= 1")


@dataclass
class SigmaState:
    """One run's series: the value and what the step estimate needs."""

    value: Optional[float] = None
    groups: int = 0  # groups folded in so far
    step_groups: int = 0  # groups folded in the current step
    last_step_groups: int = 0  # size of the last completed step (0: none completed yet)
    last_ms: int = 0


def fold_sigma(state: SigmaState, sigma: float, now_ms: int, rule: SigmaRule,
               groups_per_step: Optional[int] = None) -> SigmaState:
    """Fold one group's sigma into a run's series (the rule the Lua script mirrors)."""
    gap_ms = int(rule.step_gap_s * 1000)
    if state.groups > 0 and state.step_groups > 0 and now_ms - state.last_ms >= gap_ms:
        state.last_step_groups, state.step_groups = state.step_groups, 0
    g = groups_per_step or rule.groups_per_step or state.last_step_groups
    if not g and state.groups >= rule.max_groups_per_step:
        g = rule.max_groups_per_step
    if state.value is None or state.groups == 0:
        state.value = sigma
    elif not g or state.groups < g:  # still the first step: its plain mean seeds sigma-bar
        state.value += (sigma - state.value) / (state.groups + 1)
    else:
        m = rule.momentum ** (1.0 / g)
        state.value = m * state.value + (1.0 - m) * sigma
    state.groups += 1
    state.step_groups += 1
    state.last_ms = now_ms
    return state


def sigma_moves(partial: bool, n_members: int, sigma: Optional[float]) -> bool:
    """Whether a closed group moves its run's sigma-bar."""
    return not partial and n_members >= 2 and sigma is not None and math.isfinite(sigma)


@dataclass
class StoreStats:
    """Counters a benchmark reads: members joined and store round trips by operation."""

    members: int = 0
    round_trips: Counter[str] = field(default_factory=Counter)

    @property
    def total_round_trips(self) -> int:
        return sum(self.round_trips.values())

    def per_member(self) -> float:
        return self.total_round_trips / self.members if self.members else 0.0


# -- replies of the atomic primitives ----------------------------------------------------------

ReplyKind = Literal["waiting", "closing", "closer", "closed", "vanished", "overloaded",
                    "contended"]


@dataclass(frozen=True)
class Reply:
    """The answer of one atomic step for one generation of a group."""

    kind: ReplyKind
    gen: str = ""
    remaining_s: float = 0.0  # waiting: until the deadline; closing: until the lease expires
    token: str = ""  # closer: the fencing token its publish must present
    partial: bool = False
    sigma_ref: Optional[float] = None
    members: tuple[Member, ...] = ()
    result: Optional[str] = None  # closed: the stored result (JSON)
    detail: str = ""  # overloaded: the reason
    sigma_after: Optional[float] = None  # publish: the run's sigma-bar with this group folded in
    member_id: str = ""  # join with Attach: the id the join picked for this reply's member


_PRIORITY = {"closer": 0, "closed": 1, "vanished": 2, "closing": 3, "waiting": 4}


def encode_result(members: Sequence[Member], partial: bool, sigma_ref: Optional[float],
                  group: Optional[GroupResult], error: Optional[str]) -> str:
    return json.dumps({
        "member_ids": [m.member_id for m in members],
        "partial": partial,
        "sigma_ref": sigma_ref,
        "group": group.model_dump(mode="json") if group is not None else None,
        "error": error,
    })


class Signals:
    """Wake-ups for local waiters, keyed by (digest, gen), in two phases: ``closing`` (someone
    closed the group: its result should follow within one lease, else a waiter takes over) and
    ``closed`` (the result is there). A notification that arrives before anyone waits (the group
    closed between a join's reply and its waiter's sleep) is remembered, in a bounded set of
    recent ones, so the waiter does not sleep until its deadline."""

    def __init__(self, remember: int = 4096) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        self._waiters: Counter[tuple[str, str]] = Counter()
        self._recent: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._remember = remember

    def notify(self, slot: tuple[str, str], closed: bool = True) -> None:
        seen = self._recent.get(slot)
        if seen is None or (closed and not seen[0]):
            self._recent[slot] = (closed, time.monotonic())
        self._recent.move_to_end(slot)
        while len(self._recent) > self._remember:
            self._recent.popitem(last=False)
        event = self._events.get(slot)
        if event is not None:
            event.set()

    def watched(self) -> list[tuple[str, str]]:
        return list(self._events)

    async def wait(self, slot: tuple[str, str], timeout_s: float,
                   lease_s: Optional[float]) -> None:
        """Until ``closed``, ``lease_s`` after ``closing`` (None: the caller already knows the
        group is closing and waits out its lease), or ``timeout_s``."""
        until = time.monotonic() + timeout_s
        event = self._events.get(slot)
        if event is None:
            event = self._events[slot] = asyncio.Event()
        self._waiters[slot] += 1
        try:
            while True:
                seen = self._recent.get(slot)
                if seen is not None:
                    if seen[0]:
                        return
                    if lease_s is not None:
                        until = min(until, seen[1] + lease_s)
                left = until - time.monotonic()
                if left <= 0:
                    return
                event.clear()
                try:
                    await asyncio.wait_for(event.wait(), left)
                except asyncio.TimeoutError:
                    return
        finally:
            self._waiters[slot] -= 1
            if self._waiters[slot] <= 0:
                del self._waiters[slot]
                self._events.pop(slot, None)


# -- the protocol -------------------------------------------------------------------------------


class GroupStore(abc.ABC):
    """One interface, two implementations (``memory``, ``redis``). Use from one event loop."""

    name: str = "group store"

    def __init__(self, *, timeout_s: float = 30.0, max_waiting: int = 4096, lease_s: float = 2.0,
                 result_ttl_s: float = 900.0, sigma_rule: SigmaRule = SigmaRule()) -> None:
        if timeout_s <= 0 or lease_s <= 0 or result_ttl_s <= 0:
            raise ValueError("timeout_s, lease_s and result_ttl_s must be > 0")
        if max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.lease_s = lease_s
        self.result_ttl_s = result_ttl_s
        self.sigma_rule = sigma_rule
        self._stats = StoreStats()
        # Member ids whose attachment the claim or publish that handed this process their
        # result already marked delivered: releasing them as delivered costs no round trip.
        self._marked_delivered: set[str] = set()
        # run -> (sigma-bar, when): what this process's last publish folded it to.
        self._sigma_seen: dict[str, tuple[float, float]] = {}

    # Lifecycle. ``start`` raises GroupStoreUnavailable with one clear message when the store
    # cannot be reached; ``ready`` returns None when ready, else why not (for /readyz).
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ready(self) -> Optional[str]:
        return None

    def stats(self) -> StoreStats:
        return self._stats

    # -- what callers use ----------------------------------------------------------------------

    async def join(self, key: GroupKey, members: Sequence[Member], combine: Combine, *,
                   timeout_s: Optional[float] = None,
                   groups_per_step: Optional[int] = None,
                   admitted: bool = False, attach: Optional[Attach] = None,
                   on_attached: Optional[Callable[[list[str]], None]] = None,
                   ) -> list[MemberOutcome]:
        """Add ``members`` to their group and wait until it closes; one outcome per member, in
        order. Raises GroupStoreOverloaded (nothing added), GroupStoreUnavailable,
        GroupScoringFailed. ``admitted``: the caller has checked its whole request against the
        waiting bound (a request of several groups is admitted whole or not at all), so this
        join does not check it again and cannot refuse a later group of an admitted request.
        ``attach``: the join picks the member ids (see :class:`Attach`) and tells
        ``on_attached`` which, in member order, before it waits for the group."""
        if not members:
            return []
        ids = [m.member_id for m in members]
        if attach is None and len(set(ids)) != len(ids):  # base ids may repeat: one pick each
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise ValueError(f"member_id {dup!r} appears twice in one join")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise ValueError("timeout_s must be > 0")
        bound = UNBOUNDED if admitted else self.max_waiting
        replies = await self._join(key, members, timeout, bound, attach, True)
        if replies and replies[0].kind == "contended":
            assert attach is not None
            await asyncio.sleep(attach.contention_wait_s)
            replies = await self._join(key, members, timeout, bound, attach, False)
        if replies and replies[0].kind == "overloaded":
            raise GroupStoreOverloaded(
                f"{replies[0].detail}; retry later", retry_after_s=max(1, round(self.lease_s)))
        if attach is not None:
            members = [dataclasses.replace(m, member_id=r.member_id)
                       for m, r in zip(members, replies)]
            if on_attached is not None:
                on_attached([m.member_id for m in members])
        self._stats.members += len(members)
        by_gen: dict[str, list[int]] = {}
        for i, reply in enumerate(replies):
            by_gen.setdefault(reply.gen, []).append(i)
        settled = await asyncio.gather(*(
            self._settle(key, [members[i] for i in idx],
                         min((replies[i] for i in idx), key=lambda r: _PRIORITY[r.kind]),
                         combine, timeout, groups_per_step)
            for idx in by_gen.values()))
        outcomes: list[Optional[MemberOutcome]] = [None] * len(members)
        for idx, group_outcomes in zip(by_gen.values(), settled):
            for i, outcome in zip(idx, group_outcomes):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    async def update_sigma(self, run: str, sigmas: Sequence[Optional[float]], *,
                           groups_per_step: Optional[int] = None) -> Optional[float]:
        """Fold whole groups scored outside assembly (a request that brought its groups whole)
        into the run's series, one group at a time; returns the new value."""
        _check_id(run, "run")
        known = [s for s in sigmas if s is not None and math.isfinite(s)]
        if not known:
            return await self.sigma_value(run)
        return await self._fold_sigmas(run, known, groups_per_step)

    async def sigma_value(self, run: str) -> Optional[float]:
        """The run's sigma-bar: as this process's own publish left it if that was within
        ``SIGMA_FRESH_S`` (the closer reads it right after folding its group in), else read."""
        seen = self._sigma_seen.get(run)
        if seen is not None and time.monotonic() - seen[1] < SIGMA_FRESH_S:
            return seen[0]
        return (await self.sigma_values()).get(run)

    def _still_to_mark(self, names: Sequence[str]) -> list[str]:
        """``names`` less those already marked delivered by this process's claim or publish."""
        left = [n for n in names if n not in self._marked_delivered]
        self._marked_delivered.difference_update(names)
        return left

    # -- attachment leases: which member ids a live request is holding --------------------------
    # Two identical responses of one group send identical bodies; a join with ``Attach`` gives
    # each the first of its candidate member ids (``...#0``, ``...#1``, ...) that no live request
    # holds, so they become separate members, while a re-sent request (whose first attempt ended
    # or whose replica died, so its lease lapsed) re-attaches to the same id.

    @abc.abstractmethod
    async def renew_attachments(self, names: Sequence[str], lease_s: float) -> None:
        """Extend the leases this caller holds (while its request waits)."""

    @abc.abstractmethod
    async def release_attachments(self, names: Sequence[str], delivered: bool = False) -> None:
        """Drop leases (the request ended). ``delivered``: the member's result reached its
        caller, so the id stays taken for ``result_ttl_s`` (as long as the store remembers the
        member): the same response sampled again later is a new member, never handed the old
        group's result, while a request that did not get its answer (timed out, disconnected,
        replica died) leaves the id free for its retry to re-attach. The claim or publish that
        hands a waiter its group's result marks its members' ids delivered in the same step
        (:meth:`_still_to_mark` then spares the round trip); renewals never undo the mark."""

    @abc.abstractmethod
    async def waiting(self) -> int:
        """Members in open groups, across all replicas sharing the store (the bounded count)."""

    @abc.abstractmethod
    async def sigma_values(self) -> dict[str, float]:
        """``{run: sigma-bar}`` for every run (for /v1/info ``running_sigma_ref``)."""

    # -- the primitives each implementation provides (each one atomic step) -------------------

    @abc.abstractmethod
    async def _join(self, key: GroupKey, members: Sequence[Member], timeout_s: float,
                    max_waiting: int, attach: Optional[Attach],
                    wait_on_contention: bool) -> list[Reply]:
        """Add each member (or re-attach it), all-or-nothing against the waiting bound
        ``max_waiting``: either one ``overloaded`` reply or one reply per member. With
        ``attach`` the members' ids are base ids and each reply carries the picked
        ``member_id``; with ``wait_on_contention`` an earlier id held by a live lease makes it
        add nothing and answer one ``contended`` reply."""

    @abc.abstractmethod
    async def _claim(self, key: GroupKey, gen: str, deliver: Sequence[str] = ()) -> Reply:
        """Where the generation stands; closes it (deadline) or takes it over (lease expired).
        If it is closed, the attachments of the member ids ``deliver`` are marked delivered."""

    @abc.abstractmethod
    async def _publish(self, key: GroupKey, gen: str, token: str, result: str,
                       sigma: Optional[float], groups_per_step: Optional[int],
                       deliver: Sequence[str] = ()) -> Reply:
        """Store the result if ``token`` still holds the lease, fold ``sigma`` (None: the group
        does not move sigma-bar) into the run's series (``sigma_after``: its new value), mark
        the attachments of ``deliver`` delivered, and notify."""

    @abc.abstractmethod
    async def _fold_sigmas(self, run: str, sigmas: Sequence[float],
                           groups_per_step: Optional[int]) -> Optional[float]:
        ...

    @abc.abstractmethod
    async def _wait_signal(self, key: GroupKey, gen: str, timeout_s: float,
                           lease_s: Optional[float]) -> None:
        """Return when the generation closed, ``lease_s`` after it began closing (None: not
        that), or after ``timeout_s`` (see :class:`Signals`)."""

    # -- the protocol, written once ------------------------------------------------------------

    async def _settle(self, key: GroupKey, members: list[Member], reply: Reply, combine: Combine,
                      timeout_s: float, groups_per_step: Optional[int]) -> list[MemberOutcome]:
        started = time.monotonic()
        give_up_at = started + timeout_s + self.lease_s
        published_here = False
        spins = 0
        ids = [m.member_id for m in members]
        while True:
            if reply.kind == "closed":
                assert reply.result is not None
                return _outcomes(reply.result, members, published_here)
            if reply.kind == "closer":
                reply, published_here = await self._close(key, reply, combine, groups_per_step,
                                                          ids)
                if published_here:
                    self._marked_delivered.update(ids)
                continue
            if reply.kind == "overloaded":
                raise GroupStoreOverloaded(f"{reply.detail}; retry later")
            if reply.kind == "vanished":
                # The store lost the group (a restart without persistence): join again with the
                # time left, so the group completes or closes partial by its deadline.
                left = max(0.05, started + timeout_s - time.monotonic())
                log.warning("group %s:%s vanished from the store; re-joining %d member(s)",
                            key.digest[:8], reply.gen, len(members))
                replies = await self._retrying(  # admitted already: no bound again
                    functools.partial(self._join, key, members, left, UNBOUNDED, None, False),
                    give_up_at)
                reply = min(replies, key=lambda r: _PRIORITY.get(r.kind, -1))
                continue
            # waiting or closing: sleep until notified, the deadline, or the lease's end.
            give_up_at = max(give_up_at, time.monotonic() + reply.remaining_s + self.lease_s)
            slept = time.monotonic()
            await self._wait_signal(key, reply.gen, reply.remaining_s + 0.005,
                                    self.lease_s if reply.kind == "waiting" else None)
            if time.monotonic() - slept < 0.001:
                # Woken at once again and again, yet not done (a signal that no longer
                # applies): back off a little, so a waiter never spins on the store.
                spins += 1
                if spins > 1:
                    await asyncio.sleep(min(0.01 * spins, 0.2))
            gen = reply.gen
            reply = await self._retrying(functools.partial(self._claim, key, gen, ids),
                                         give_up_at)
            if reply.kind == "closed":
                self._marked_delivered.update(ids)

    async def _close(self, key: GroupKey, reply: Reply, combine: Combine,
                     groups_per_step: Optional[int],
                     deliver: Sequence[str]) -> tuple[Reply, bool]:
        group: Optional[GroupResult] = None
        error: Optional[str] = None
        try:
            group = combine(ClosedGroup(key, reply.members, reply.partial, reply.sigma_ref))
            n = len(reply.members)
            if len(group.rewards) != n or len(group.verified) != n:
                raise ValueError(f"combine returned {len(group.rewards)} rewards for {n} members")
            group = group.model_copy(update={"partial": reply.partial})
        except Exception as exc:
            log.exception("combining group %s:%s failed", key.digest[:8], reply.gen)
            error = f"combining the group failed: {type(exc).__name__}: {exc}"
            group = None
        sigma = group.sigma if group is not None else None
        moves = sigma_moves(reply.partial, len(reply.members), sigma)
        result = encode_result(reply.members, reply.partial, reply.sigma_ref, group, error)
        # A failed publish is retried within the lease; past it a successor takes over anyway.
        published = await self._retrying(
            lambda: self._publish(key, reply.gen, reply.token, result, sigma if moves else None,
                                  groups_per_step, deliver),
            time.monotonic() + self.lease_s)
        if published.sigma_after is not None:
            self._sigma_seen[key.run] = (published.sigma_after, time.monotonic())
        return published, published.kind == "closed" and published.result == result

    async def _retrying(self, op: Callable[[], Any], give_up_at: float) -> Any:
        """Retry a store step through a short outage, never past ``give_up_at``."""
        delay = 0.05
        while True:
            try:
                return await op()
            except GroupStoreUnavailable:
                left = give_up_at - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)


def _outcomes(result: str, members: Sequence[Member], published_here: bool) -> list[MemberOutcome]:
    data = json.loads(result)
    if data["error"] is not None:
        raise GroupScoringFailed(data["error"])
    group = GroupResult.model_validate(data["group"])
    index = {member_id: i for i, member_id in enumerate(data["member_ids"])}
    outcomes = []
    for m in members:
        if m.member_id not in index:  # cannot happen: the store answered for this generation
            raise GroupScoringFailed(f"member {m.member_id!r} missing from its closed group")
        outcomes.append(MemberOutcome(m.member_id, index[m.member_id], group, data["sigma_ref"],
                                      bool(data["partial"]), published_here))
    return outcomes
