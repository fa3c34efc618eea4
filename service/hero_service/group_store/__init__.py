"""Group store: where groups assembled across requests and replicas meet (protocol: base.py;
in-process: memory.py; Redis with one Lua script: redis.py and lua/group.lua; from the
settings: factory.py).

How the service uses it (``assembly.py`` for 2-4 and 7, the routes for 5):

1. Start-up (app lifespan): ``store = create_group_store(settings, result_ttl_s=1200)`` and
   ``await store.start()``. ``GroupStoreUnavailable`` there carries one clear message (URL
   without userinfo): log it and keep ``/readyz`` at 503 (``await store.ready()`` returns None
   when ready, else the reason). On shutdown ``await store.close()``.
2. ``/get_reward`` with a group size (``--group-size`` or ``?n=``; ``?run=`` names the series):
   score the request's own responses locally as today (pipeline: verifier + RM batcher), then
   per (prompt, label) piece build ``Member(member_id, verifier_status, rm_score, truncated)``
   and ``await store.join(GroupKey.for_prompt(run, prompt, label, n), members, combine)``.
   ``combine`` is pure: HERO for the whole group from ``ClosedGroup.members`` with the
   request's params and ``ClosedGroup.sigma_ref`` (None before the run's first group: fall back
   to the group's own sigma, as ``hero.default_sigma_ref`` does), returning a ``GroupResult``
   in the members' order -- the one-group body of ``Pipeline._combine``. Each
   ``MemberOutcome`` maps onto today's ``AssembledResult(group, index, sigma_ref, partial)``.
   Member ids (wired in ``assembly.py``): digest(run, n, prompt, label, query) + ``#k``,
   k the first index whose attachment lease no live request holds, picked by the join itself
   (``join(..., attach=Attach(...))``, one atomic step); renewed while the request waits,
   released when it ends (kept for ``result_ttl_s`` once its
   answer was delivered), so identical samples are separate members and a re-sent request
   whose first attempt got no answer re-attaches.
3. ``/v1/rewards`` pieces (``group_key`` + ``group_size``): ``GroupKey.for_group_key(run,
   group_key, group_size)`` and the same join.
4. Groups scored whole (no assembly): read ``await store.sigma_value(run)`` as the server's
   sigma_ref and afterwards ``await store.update_sigma(run, [g.sigma for g in groups])`` --
   this replaces ``RunningSigma`` so every replica shares one series per run.
5. ``/v1/info`` ``running_sigma_ref``: ``await store.sigma_values()``.
6. Errors are ``ServiceError``s already: ``GroupStoreUnavailable`` (503,
   ``group_store_unavailable``, ``retry_after_s``), ``GroupStoreOverloaded`` (429, an
   ``Overloaded``), ``GroupScoringFailed`` (503, a ``ScoringFailed``); the HTTP error handler
   should send ``Retry-After`` for the 503 one.
7. Metrics: count group-level events (partial groups, sigma updates) only where
   ``outcome.published_here`` (exactly one caller per group); export
   ``store.stats().round_trips`` (by op) and ``await store.waiting()``.
8. SIGTERM: cancel parked joins and answer 503 + Retry-After; their members stay in the store,
   so the client's retry re-attaches on another replica (with the memory store the group dies
   with the process, as today).
9. Timing: keep ``group_timeout_s`` well inside the client's timeout (OpenRLHF: 180 s) and
   ``result_ttl_s`` above its whole retry budget (5 attempts), so a late retry still finds
   its result.
"""

from .base import (
    Attach,
    ClosedGroup,
    Combine,
    GroupKey,
    GroupScoringFailed,
    GroupStore,
    GroupStoreOverloaded,
    GroupStoreUnavailable,
    Member,
    MemberOutcome,
    SigmaRule,
    StoreStats,
    stable_digest,
)
from .factory import create_group_store, resolved_password
from .memory import MemoryBackend, MemoryGroupStore

__all__ = [
    "Attach", "ClosedGroup", "Combine", "GroupKey", "GroupScoringFailed", "GroupStore",
    "GroupStoreOverloaded", "GroupStoreUnavailable", "Member", "MemberOutcome", "MemoryBackend",
    "MemoryGroupStore", "SigmaRule", "StoreStats", "create_group_store", "resolved_password",
    "stable_digest",
]
