"""Cross-request dynamic batching: a bounded queue, one inference thread that owns the model, and
futures back to the requests (the queue → batching task → backend flow of TEI's router).

Items from all concurrent requests wait in one queue. The inference thread waits up to
``max_wait_ms`` for a batch to fill while items are known to be on their way (announced by
requests still tokenizing; an idle model starts at once), sorts what it took by length (to cut
padding), packs it into batches whose cost stays within ``max_batch_tokens`` (padded size, or the
sum of tokens for a backend that does not pad) and whose size within the backend's own batch
limit, runs them, and resolves each item's future on the event loop. Identical inputs in flight
are scored once. For a backend that shares prefixes (a group's prompt encoded once), the items of
one prefix are packed next to each other and the prefix counts once, as it is computed.

Failure semantics:

- A failure that can be input-specific (CUDA/CPU out of memory, an input that breaks the model:
  :class:`RewardModelError`) is bisected: the batch is split in half and retried, so only the
  items that cannot be scored fail, and only their requests get an error (503
  ``scoring_failed``).
- A failure of the backend as a whole (a timeout, an unreachable remote, a 5xx:
  :class:`RewardModelUnavailable`) fails the whole batch at once — splitting would repeat the
  call 2n-1 times against a backend that is down — and counts towards a circuit breaker
  (``breaker.py``). While it is open no batch reaches the backend: new work is refused at
  :meth:`Batcher.submit` and queued work fails without a call, all with a retry-after (503
  ``reward_model_unavailable`` + ``Retry-After``); after the cool-down one probe is let through.
- Bounds: none of its own. Every item belongs to a request holding an admission permit
  (``admission.py``), so the queue never holds more than ``--max-queued-rollouts``."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from .breaker import DEFAULT_COOLDOWN_S, DEFAULT_FAILURE_THRESHOLD, STATE_VALUES, CircuitBreaker
from .metrics import Metrics
from .reward_models import Encoded, RewardModel, RewardModelError
from .reward_models._torch_utils import is_out_of_memory, release_cached_memory
from .reward_models.base import RewardModelUnavailable, SharedPrefix

log = logging.getLogger(__name__)

# One round takes at most this many budgets' worth of tokens, so an item that arrives during a
# long round waits for a bounded amount of work, not for the whole backlog.
ROUND_BUDGETS = 8
# The longest Retry-After passed on from a remote RM's own answer.
MAX_RETRY_AFTER_S = 60


@dataclass(frozen=True)
class ScoredItem:
    score: float
    queue_ms: float


@dataclass
class _Pending:
    encoded: Encoded
    future: asyncio.Future[ScoredItem]
    loop: asyncio.AbstractEventLoop
    enqueued_at: float


class _Tally:
    """What a batch costs the backend, grown one item at a time: each distinct shared prefix
    once (when the backend shares prefixes) plus every item's own tokens; for a padding backend
    each of the two parts is a rectangle (padded to its longest), as its forward pads them."""

    def __init__(self, padded: bool, shares_prefixes: bool) -> None:
        self.padded = padded
        self.shares_prefixes = shares_prefixes
        self.items = 0
        self.own_longest = self.own_sum = 0
        self.prefixes: set[Hashable] = set()
        self.prefix_longest = self.prefix_sum = 0

    def _parts(self, item: Encoded) -> tuple[SharedPrefix | None, int]:
        """The item's prefix that is computed once per batch, if any, and its own tokens."""
        prefix = item.shared_prefix if self.shares_prefixes else None
        return prefix, item.n_tokens - (prefix.n_tokens if prefix else 0)

    def _cost(self, items: int, own_longest: int, own_sum: int, prefixes: int,
              prefix_longest: int, prefix_sum: int) -> int:
        if self.padded:
            return prefixes * prefix_longest + items * own_longest
        return prefix_sum + own_sum

    @property
    def cost(self) -> int:
        return self._cost(self.items, self.own_longest, self.own_sum, len(self.prefixes),
                          self.prefix_longest, self.prefix_sum)

    def cost_with(self, item: Encoded) -> int:
        """The cost once ``item`` joins."""
        prefix, own = self._parts(item)
        new_prefix = prefix is not None and prefix.key not in self.prefixes
        return self._cost(
            self.items + 1, max(self.own_longest, own), self.own_sum + own,
            len(self.prefixes) + new_prefix,
            max(self.prefix_longest, prefix.n_tokens if new_prefix and prefix else 0),
            self.prefix_sum + (prefix.n_tokens if new_prefix and prefix else 0))

    def add(self, item: Encoded) -> None:
        prefix, own = self._parts(item)
        self.items += 1
        self.own_longest = max(self.own_longest, own)
        self.own_sum += own
        if prefix is not None and prefix.key not in self.prefixes:
            self.prefixes.add(prefix.key)
            self.prefix_longest = max(self.prefix_longest, prefix.n_tokens)
            self.prefix_sum += prefix.n_tokens


def batch_cost(items: Sequence[Encoded], *, padded: bool, shares_prefixes: bool = False) -> int:
    """Tokens a batch costs the backend: what it really computes (:class:`_Tally`)."""
    tally = _Tally(padded, shares_prefixes)
    for item in items:
        tally.add(item)
    return tally.cost


def packing_order(items: Sequence[Encoded], *, shares_prefixes: bool = False) -> list[int]:
    """Positions of ``items`` in packing order: by length; for a backend that shares prefixes,
    the items of one prefix next to each other (by their own length) so they land in one
    forward, prefixes ordered by their longest item."""
    if not shares_prefixes:
        return sorted(range(len(items)), key=lambda i: items[i].n_tokens)

    def own(i: int) -> int:
        prefix = items[i].shared_prefix
        return items[i].n_tokens - (prefix.n_tokens if prefix else 0)

    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        prefix = item.shared_prefix
        groups.setdefault(("prefix", prefix.key) if prefix else ("alone", i), []).append(i)
    members = [sorted(group, key=own) for group in groups.values()]
    members.sort(key=lambda group: own(group[-1]))
    return [i for group in members for i in group]


def pack_indices(items: Sequence[Encoded], max_batch_tokens: int, *, padded: bool = True,
                 max_batch_size: int = 0, shares_prefixes: bool = False) -> list[list[int]]:
    """Positions of ``items``, in :func:`packing_order`, cut into batches whose cost
    (:func:`batch_cost`) fits the budget and whose size is at most ``max_batch_size`` (0: any).
    An item that alone costs more than the budget goes alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    tally = _Tally(padded, shares_prefixes)
    for i in packing_order(items, shares_prefixes=shares_prefixes):
        if current and (tally.cost_with(items[i]) > max_batch_tokens
                        or len(current) == max_batch_size):
            batches.append(current)
            current, tally = [], _Tally(padded, shares_prefixes)
        current.append(i)
        tally.add(items[i])
    if current:
        batches.append(current)
    return batches


def pack_batches(items: Sequence[Encoded], max_batch_tokens: int, *, padded: bool = True,
                 max_batch_size: int = 0, shares_prefixes: bool = False) -> list[list[Encoded]]:
    """The batcher's packing rule (:func:`pack_indices`) over encoded items."""
    return [[items[i] for i in batch]
            for batch in pack_indices(items, max_batch_tokens, padded=padded,
                                      max_batch_size=max_batch_size,
                                      shares_prefixes=shares_prefixes)]


@dataclass(frozen=True)
class _Failure:
    """What a failed forward said, without the exception itself (whose traceback keeps the
    forward's tensors alive)."""

    out_of_memory: bool
    description: str
    error: RewardModelError  # what the caller of a one-item batch gets

    @classmethod
    def of(cls, exc: Exception) -> _Failure:
        description = f"{type(exc).__name__}: {exc}"
        message = str(exc) if isinstance(exc, RewardModelError) else (
            f"reward model failed: {description}")
        return cls(is_out_of_memory(exc), description, RewardModelError(message))


class Batcher:
    def __init__(
        self,
        model: RewardModel,
        *,
        max_batch_tokens: int,
        max_wait_ms: float,
        metrics: Metrics,
        breaker_failures: int = DEFAULT_FAILURE_THRESHOLD,
        breaker_cooldown_s: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.metrics = metrics
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._outstanding = 0  # queued + being scored; guarded by _cond
        self._announced = 0  # admitted items still being tokenized; guarded by _cond
        self._inflight: dict[Hashable, asyncio.Future[ScoredItem]] = {}  # event-loop thread only
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hero-inference", daemon=True)
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s,
                                      on_transition=self._breaker_moved)
        metrics.rm_breaker_state.set(STATE_VALUES["closed"])

    def _breaker_moved(self, _was: str, to: str) -> None:
        self.metrics.rm_breaker_state.set(STATE_VALUES[to])  # type: ignore[index]
        self.metrics.rm_breaker_transitions.labels(to).inc()

    # -- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def outstanding(self) -> int:
        with self._cond:
            return self._outstanding

    def announce(self, n: int) -> None:
        """``n`` items are being tokenized and will be submitted soon."""
        with self._cond:
            self._announced += n

    def withdraw(self, n: int) -> None:
        """Announced items are now submitted (or will never be)."""
        with self._cond:
            self._announced = max(0, self._announced - n)
            self._cond.notify()

    def raise_if_unavailable(self) -> None:
        """Raise :class:`RewardModelUnavailable` if the breaker would refuse RM work now (a cheap
        check before a request does any work; claims no probe)."""
        wait = self.breaker.refusal()
        if wait is not None:
            raise self._refused(wait)

    def submit(self, encoded: Sequence[Encoded]) -> list[asyncio.Future[ScoredItem]]:
        """Enqueue items (sharing futures with identical items already in flight), or enqueue none
        of them and raise RewardModelUnavailable (the breaker is open). Must be called on the
        event loop."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ScoredItem]] = []
        fresh: dict[Hashable, _Pending] = {}
        for item in encoded:
            future = self._inflight.get(item.key)
            if future is not None and future.get_loop() is not loop:
                future = None  # left by a loop that closed before its result came (see _post)
            if future is None:
                pending = fresh.get(item.key)
                if pending is None:
                    pending = _Pending(item, loop.create_future(), loop, 0.0)
                    fresh[item.key] = pending
                future = pending.future
            futures.append(future)
        self.metrics.deduplicated_rollouts.inc(len(encoded) - len(fresh))
        with self._cond:
            # Last check before enqueuing: a request admitted as the breaker's probe is queued
            # below without fail, so the probe always runs and reports.
            wait = self.breaker.admit() if fresh else None
            if wait is not None:
                raise self._refused(wait)
            now = time.perf_counter()
            for key, pending in fresh.items():
                pending.enqueued_at = now
                self._inflight[key] = pending.future
                pending.future.add_done_callback(self._forget(key))
                self._queue.append(pending)
            self._outstanding += len(fresh)
            self.metrics.batch_queue_depth.set(self._outstanding)
            self._cond.notify()
        return futures

    def _forget(self, key: Hashable) -> Callable[[asyncio.Future[ScoredItem]], None]:
        """A done-callback: the item is no longer in flight (later identical ones run anew)."""
        def forget(_future: asyncio.Future[ScoredItem]) -> None:
            self._inflight.pop(key, None)

        return forget

    async def score(self, encoded: Sequence[Encoded]) -> list[ScoredItem]:
        futures = self.submit(encoded)
        # Shielded: a caller that goes away must not cancel a result other callers share.
        return list(await asyncio.gather(*(asyncio.shield(f) for f in futures)))

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # -- inference thread --------------------------------------------------------------------

    def _take_round(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            # Hold the batch open only for work known to be on its way (items being tokenized):
            # an idle model starts at once, and under load items queue up during each forward.
            deadline = self._queue[0].enqueued_at + self.max_wait_s
            while (not self._stopping and self._announced > 0
                   and self._queued_tokens() < self.max_batch_tokens):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken: list[_Pending] = []
            # The round's work as the forward computes it (a shared prefix once).
            work = _Tally(padded=False, shares_prefixes=self.model.shares_prefixes)
            limit = self.max_batch_tokens * ROUND_BUDGETS
            while self._queue and (not taken or work.cost_with(self._queue[0].encoded) <= limit):
                item = self._queue.popleft()
                taken.append(item)
                work.add(item.encoded)
            return taken

    def _queued_tokens(self) -> int:
        return sum(p.encoded.n_tokens for p in self._queue)

    def _run(self) -> None:
        while True:
            taken = self._take_round()
            if taken is None:
                return
            for batch in pack_indices([p.encoded for p in taken], self.max_batch_tokens,
                                      padded=self.model.padded,
                                      max_batch_size=self.model.max_batch_size,
                                      shares_prefixes=self.model.shares_prefixes):
                self._run_batch([taken[i] for i in batch])
            with self._cond:
                self._outstanding -= len(taken)
                self.metrics.batch_queue_depth.set(self._outstanding)

    def _run_batch(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        for p, outcome in zip(batch, self._score_isolating(batch)):
            if isinstance(outcome, BaseException):
                _post(p, _resolve_error, outcome)
            else:
                _post(p, _resolve, ScoredItem(score=outcome,
                                              queue_ms=(started - p.enqueued_at) * 1000.0))

    def _score_isolating(self, batch: list[_Pending]) -> list[float | RewardModelError]:
        """Scores, or the error for the items that cannot be scored. A batch failing in a way
        that can be input-specific is split in half and retried, so an out-of-memory batch still
        gets scored in smaller pieces and an input that breaks the model fails alone, not the
        other requests batched with it. A backend that is down fails the whole batch at once."""
        if not self.breaker.may_run():
            # Opened by an earlier batch of this round (or of a bisection): no call.
            return [self._refused(self.breaker.retry_after_s())] * len(batch)
        try:
            scores: list[float | RewardModelError] = list(self._forward(batch))
        except RewardModelUnavailable as exc:
            self.metrics.rm_unavailable_batches.inc()
            self.breaker.record_failure(str(exc))
            log.error("reward model unavailable; failing a batch of %d without splitting: %s",
                      len(batch), exc)
            exc.retry_after_s = min(MAX_RETRY_AFTER_S,
                                    max(exc.retry_after_s or 0, self.breaker.retry_after_s()))
            return [exc] * len(batch)
        except Exception as exc:
            failure = _Failure.of(exc)
        else:
            self.breaker.record_success()
            return scores
        # Out of the except block: the exception's traceback held the failed forward's frames
        # and so its tensors (PyTorch's FAQ on OOM handlers); now they can be freed for the retry.
        self.breaker.record_success()  # the backend answered; the failure is about inputs
        if failure.out_of_memory:
            release_cached_memory()
        if len(batch) == 1:
            log.error("reward model failed on one input: %s", failure.description)
            return [failure.error]
        if failure.out_of_memory:
            self.metrics.oom_splits.inc()
            log.warning("out of memory on a batch of %d; splitting and retrying", len(batch))
        else:
            self.metrics.failure_splits.inc()
            log.warning("reward model failed on a batch of %d (%s); splitting to isolate the "
                        "input", len(batch), failure.description)
        half = len(batch) // 2
        return self._score_isolating(batch[:half]) + self._score_isolating(batch[half:])

    def _refused(self, retry_after_s: int) -> RewardModelUnavailable:
        return RewardModelUnavailable(
            f"reward model unavailable (circuit breaker {self.breaker.state}; last failure: "
            f"{self.breaker.last_cause or 'unknown'}); retry in {retry_after_s}s", retry_after_s)

    def _forward(self, batch: list[_Pending]) -> list[float]:
        items = [p.encoded for p in batch]
        cost = batch_cost(items, padded=self.model.padded,
                          shares_prefixes=self.model.shares_prefixes)
        # The tokens the forward really runs (shared prefixes once), not counting its padding.
        computed = batch_cost(items, padded=False, shares_prefixes=self.model.shares_prefixes)
        started = time.perf_counter()
        scores = self.model.forward(items)
        self.metrics.forward_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(cost)
        self.metrics.padding_ratio.observe(1.0 - computed / cost if cost else 0.0)
        if len(scores) != len(batch):
            raise RewardModelError(f"backend returned {len(scores)} scores for {len(batch)} inputs")
        if not all(math.isfinite(s) for s in scores):
            raise RewardModelError("reward model returned a non-finite score (NaN or inf)")
        return scores


def _post(p: _Pending, resolve: Callable[[asyncio.Future[ScoredItem], Any], None],
          outcome: object) -> None:
    try:
        p.loop.call_soon_threadsafe(resolve, p.future, outcome)
    except RuntimeError:
        # The caller's event loop has closed: nobody waits for this item. The inference thread
        # must survive it, or every later request would wait forever.
        log.warning("dropped a result for an event loop that is closed")


def _resolve(future: asyncio.Future[ScoredItem], result: ScoredItem) -> None:
    if not future.done():
        future.set_result(result)


def _resolve_error(future: asyncio.Future[ScoredItem], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
