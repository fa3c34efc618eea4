"""Groups assembled across requests and replicas, and the run's server-side sigma-bar.

Between the pipeline (which scores a request's own responses: verifier + RM) and the group store
(where the members of one HERO group, scored on any replica, meet): a request's groups that are
*pieces* of larger groups (``/get_reward`` with a group size, ``/v1/rewards`` groups with
``group_key`` + ``group_size``) are scored locally, joined to their groups in the store, and
answered once the group closes; groups scored whole take the run's running sigma-bar from the
store and move it. The HTTP layer only translates wire formats into :class:`Piece` lists and
the outcomes back (``http/openrlhf.py``, ``http/routes.py``).

- **Admission.** A request is admitted whole or not at all, and its permit is held while it waits
  for its groups (parked rollouts count against ``--max-queued-rollouts``). The store's own bound
  on members waiting across every replica is checked once for a request of several pieces
  (:func:`check_room_to_wait`); a one-piece request's join checks it atomically.
- **Member ids.** Each response brings a base id (what it is: a digest of the run, the group and
  the response); its join picks ``base#k``, k the first index whose attachment lease no live
  request holds (``group_store.Attach``). The leases are renewed while the request waits and let
  go when it ends: kept taken if its answer went out, else freed for its retry to re-attach.
- **Stopping.** ``should_stop`` is polled while the request waits: an error it returns (the
  client disconnected, the replica is draining) ends the wait; the members stay in the store.
- **sigma-bar.** A group closed by this replica that published its result reports the run's new
  sigma-bar (``on_sigma``) and, if it closed partial, ``on_partial`` — once per group, whichever
  replica closed it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Optional, TypeVar

from hero_client import hero
from hero_client.schema import GroupResult, HeroParams, Mode, RewardsRequest, RewardsResponse

from .errors import Overloaded, ServiceError
from .group_store import (
    Attach,
    ClosedGroup,
    GroupKey,
    GroupStore,
    GroupStoreUnavailable,
    Member,
    MemberOutcome,
    stable_digest,
)
from .pipeline import LocalScores, Pipeline, combine_group

DEFAULT_RUN = "default"
# Attachment leases: long enough to outlive a slow round trip, renewed well inside.
ATTACH_LEASE_S = 3.0
ATTACH_RENEW_S = 1.0
# Ids per base id and group size: identical samples in one group, plus those answered within
# the result TTL (kept taken so they are never handed an old group's result).
MEMBER_SLOTS = 8
POLL_S = 0.25

StopCheck = Callable[[], Awaitable[Optional[ServiceError]]]
SigmaHook = Callable[[str, Optional[float]], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Piece:
    """One group of a request that is part of a larger group in the store."""

    index: int  # the group's position in the request
    key: GroupKey
    base_ids: list[str]  # one per response, in the group's order


@dataclass(frozen=True)
class Joined:
    """A request's local scores and, per piece (in the order given), its members' outcomes."""

    local: LocalScores
    outcomes: list[list[MemberOutcome]]


def assembled_combine(params: HeroParams,
                      mode: Mode = "hero") -> Callable[[ClosedGroup], GroupResult]:
    """The closer's HERO for one whole group: sigma-bar from the store, or (before the run's
    first group) the group's own sigma, as a request scored alone would get."""
    p = params.formula_params()

    def combine(closed: ClosedGroup) -> GroupResult:
        scores = [m.rm_score for m in closed.members]
        rm = None if any(x is None for x in scores) else [float(x) for x in scores]  # type: ignore[arg-type]
        sigma_ref = params.sigma_ref if params.sigma_ref is not None else closed.sigma_ref
        if sigma_ref is None:
            sigma_ref = hero.group_sigma(rm)
        return combine_group(mode, p, "0", [m.verifier_status for m in closed.members], rm,
                             [m.truncated for m in closed.members], sigma_ref)

    return combine


async def check_room_to_wait(store: GroupStore, rollouts: int) -> None:
    """The store's own bound on members waiting in open groups, across every replica sharing it
    (it protects the store's memory; this replica's permit is the bound the HTTP layer asks)."""
    waiting = await store.waiting()
    if waiting + rollouts > store.max_waiting:
        raise Overloaded(f"{waiting} rollouts waiting for their groups "
                         f"(limit {store.max_waiting}); retry later")


def piece_base_ids(run: str, group_key: str, size: int, reference: Optional[str],
                   responses: Sequence[str]) -> list[str]:
    """Base ids of a ``/v1/rewards`` piece's responses."""
    return [stable_digest("piece", run, group_key, size, reference, response)
            for response in responses]


def piece_result(group_id: str, outcomes: list[MemberOutcome]) -> GroupResult:
    """The caller's own entries of its closed group, in its piece's order."""
    whole = outcomes[0].group
    idx = [o.index for o in outcomes]

    def pick(values: list[T]) -> list[T]:
        return [values[i] for i in idx]

    def pick_optional(values: Optional[list[T]]) -> Optional[list[T]]:
        return None if values is None else pick(values)

    return GroupResult(
        id=group_id, sigma=whole.sigma, weight=whole.weight, rewards=pick(whole.rewards),
        advantages=pick_optional(whole.advantages), verified=pick(whole.verified),
        verifier_status=pick(whole.verifier_status), rm_scores=pick_optional(whole.rm_scores),
        normalized=pick(whole.normalized), truncated=pick(whole.truncated),
        partial=outcomes[0].partial, disagreement=pick_optional(whole.disagreement))


def outcome_sigma_ref(outcome: MemberOutcome) -> Optional[float]:
    """The sigma-bar the member's group was weighted with."""
    return outcome.sigma_ref if outcome.sigma_ref is not None else outcome.group.sigma


class Assembler:
    """Scores requests whose groups are assembled in the group store, and requests of whole
    groups under the run's server-side sigma-bar."""

    def __init__(self, pipeline: Pipeline, store: GroupStore, on_sigma: SigmaHook,
                 on_partial: Callable[[], None] = lambda: None) -> None:
        self.pipeline = pipeline
        self.store = store
        self._on_sigma = on_sigma
        self._on_partial = on_partial
        self.parked = 0  # requests of this replica waiting for their groups

    async def score_whole(self, request: RewardsRequest, run: str) -> RewardsResponse:
        """Whole groups under the run's sigma-bar: one series per run in the store, shared by
        every replica; singleton groups (sigma 0 by definition) do not move it."""
        sigma_ref = await self.store.sigma_value(run)
        scored = await self.pipeline.score(request, sigma_ref)
        sigmas = [g.sigma for g in scored.groups if len(g.rewards) > 1]
        # A request of singletons (OpenRLHF's one query, no group size) moves nothing: no second
        # store round trip for the value just read.
        moved = await self.store.update_sigma(run, sigmas) if sigmas else sigma_ref
        self._on_sigma(run, moved)
        return scored

    async def score_rewards(self, request: RewardsRequest, run: str = DEFAULT_RUN,
                            should_stop: Optional[StopCheck] = None) -> RewardsResponse:
        """A ``/v1/rewards`` request with pieces: those are assembled, the other groups of the
        same request are scored whole as ever (with the request's sigma_ref or their own)."""
        started = time.perf_counter()
        pieces = []
        for g, group in enumerate(request.groups):
            if group.group_key is not None and group.group_size is not None:
                pieces.append(Piece(g, GroupKey.for_group_key(run, group.group_key,
                                                              group.group_size),
                                    piece_base_ids(run, group.group_key, group.group_size,
                                                   group.reference, group.responses)))
        joined = await self.join(request, pieces, run, should_stop)
        results: list[Optional[GroupResult]] = [None] * len(request.groups)
        sigma_ref = request.params.sigma_ref
        whole = [g for g in range(len(request.groups)) if g not in {p.index for p in pieces}]
        if whole:
            sub = request.model_copy(update={"groups": [request.groups[g] for g in whole]})
            combined = self.pipeline.combine(sub, joined.local.only(whole), None)
            sigma_ref = combined.sigma_ref
            for g, result in zip(whole, combined.groups):
                named = result.model_copy(update={"id": request.groups[g].id or str(g)})
                self.pipeline.metrics.observe_group(request.mode, named)
                self.pipeline.audit_flagged(request.request_id, named,
                                            request.groups[g].responses)
                results[g] = named
        for piece, outcomes in zip(pieces, joined.outcomes):
            results[piece.index] = piece_result(request.groups[piece.index].id or str(piece.index),
                                                outcomes)
            if sigma_ref is None:
                sigma_ref = outcome_sigma_ref(outcomes[0])
        return RewardsResponse(
            request_id=request.request_id, mode=request.mode,
            reward_model=self.pipeline.reward_model.model_id, verifier=joined.local.verifier.name,
            sigma_ref=sigma_ref, groups=results, timings_ms=joined.local.timings(started))

    async def join(self, request: RewardsRequest, pieces: Sequence[Piece], run: str,
                   should_stop: Optional[StopCheck] = None, *,
                   field: str = "groups") -> Joined:
        """Score the request locally, join each piece to its group and wait until every one has
        closed. ``field`` names the request's part in an admission error."""
        verifier = self.pipeline.check(request)
        several = len(pieces) > 1  # one piece: its join checks the store's bound atomically
        combine = assembled_combine(request.params, request.mode)
        with self.pipeline.admit(request, field=field) as permit:
            if several:
                await check_room_to_wait(
                    self.store, sum(len(request.groups[p.index].responses) for p in pieces))
            local = await self.pipeline.score_locally(request, verifier)
            self.pipeline.metrics.rollouts_scored.labels(request.mode).inc(local.n_rollouts)
            size = max((p.key.size for p in pieces), default=1)
            async with self._held_ids(size) as held:
                joins = [self.store.join(p.key, _members(local, p), combine, admitted=several,
                                         attach=held.attach, on_attached=held.ids.extend)
                         for p in pieces]
                permit.park()
                outcomes = await self._wait_for(asyncio.gather(*joins), held.ids, should_stop)
        for piece, group_outcomes in zip(pieces, outcomes):
            first = group_outcomes[0]
            if first.published_here:  # group-level counts once per group, on any replica
                if first.partial:
                    self._on_partial()
                self.pipeline.metrics.observe_group(request.mode, first.group)
                self._on_sigma(run, await self.store.sigma_value(run))
            # Each response is audited by the request that sent it (only it has the text).
            group = request.groups[piece.index]
            self.pipeline.audit_flagged(
                request.request_id, piece_result(group.id or str(piece.index), group_outcomes),
                group.responses)
        return Joined(local, outcomes)

    @contextlib.asynccontextmanager
    async def _held_ids(self, size: int) -> AsyncIterator[_HeldIds]:
        held = _HeldIds(Attach(MEMBER_SLOTS * size, ATTACH_LEASE_S,
                               ATTACH_LEASE_S + ATTACH_RENEW_S))
        delivered = False
        try:
            yield held
            delivered = True
        finally:
            if held.ids:
                try:
                    await self.store.release_attachments(held.ids, delivered=delivered)
                except GroupStoreUnavailable:
                    pass  # the leases lapse on their own

    async def _wait_for(self, joined: Awaitable[list[list[MemberOutcome]]],
                        member_ids: list[str],
                        should_stop: Optional[StopCheck]) -> list[list[MemberOutcome]]:
        """Wait for the joins, renewing the leases; end early if ``should_stop`` says so."""
        task = asyncio.ensure_future(joined)
        loop = asyncio.get_running_loop()
        self.parked += 1
        try:
            renew_at = loop.time() + ATTACH_RENEW_S
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if should_stop is not None:
                    stop = await should_stop()
                    if stop is not None:
                        raise stop
                if loop.time() >= renew_at:
                    renew_at = loop.time() + ATTACH_RENEW_S
                    with contextlib.suppress(GroupStoreUnavailable):
                        await self.store.renew_attachments(member_ids, ATTACH_LEASE_S)
        finally:
            self.parked -= 1
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


@dataclass(frozen=True)
class _HeldIds:
    """The member ids a request's joins picked, in the order the joins reported them."""

    attach: Attach
    ids: list[str] = dataclasses.field(default_factory=list)


def _members(local: LocalScores, piece: Piece) -> list[Member]:
    """The piece's members under their base ids (the join picks ``base#k``)."""
    rm = local.rm_results[piece.index]
    return [Member(piece.base_ids[i], verdict.status,
                   rm.scores[i] if rm is not None else None,
                   rm.truncated[i] if rm is not None else False)
            for i, verdict in enumerate(local.verdicts[piece.index])]
