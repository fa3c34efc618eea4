"""The ``math`` verifier: HuggingFace math-verify, run in a pool of worker processes.

Responses from all concurrent requests are queued by **lane**, one lane per worker: a reference
goes to the lane that last had it (a new one to the least loaded lane), so the responses of one
group reach the same worker even when they arrive one per request (OpenRLHF's and verl's
per-sample calls). That is where the work is: a worker parses each reference once and caches it
(parsing a MATH answer costs about as much as verifying 8 responses against it), and math-verify
caches recent LaTeX conversions, which a group's responses with the same final answer share. A
lane with nothing of its own takes queued work from the fullest lane once that has
``STEAL_MIN_QUEUED`` responses waiting, so a burst still spreads over every worker.

A dispatcher keeps two chunks per lane in flight (the one its worker runs and the next, already
in its pipe) and cuts the queues into chunks as lanes free up. The queues are cut at the next turn
of the event loop, so the responses of requests arriving together share chunks, into slices of
their total length over every slot, at most ``MAX_CHUNK``: an idle service sends small chunks at
once (low latency), a busy one larger chunks (the pool's per-task cost spread over many
responses), and the end of a burst goes out in ever thinner slices that keep the workers busy to
the last.

Each request waits on one future for all its responses, settled when its last verdict is in.

Time is bounded per math-verify call, not per chunk: each parse and each comparison has its own
alarm of ``timeout_s`` in the worker, and the pool's watchdog kills a worker only when one call
runs past that by ``STEP_SLACK_S`` (the alarm could not stop it). So a chunk's wall time may grow
with its size and with CPU contention without anything being killed, and a stuck response is
charged alone (retried by itself once, then ``timeout``) while its neighbours keep their real
verdicts."""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Optional, get_args

from . import _math_worker
from .base import Status, Verdict, Verifier
from .pool import ItemFailed, ProcessWorkerPool

MAX_CHUNK = 32
CHUNKS_IN_FLIGHT_PER_WORKER = 2
# A lane with nothing queued of its own takes another lane's work only when that many responses
# wait there: its worker, new to their reference, parses it first (the work of ~8 responses).
STEAL_MIN_QUEUED = 8
# References remembered with their lane (a worker caches 256 parsed references itself).
LANE_MEMORY = 4096
# How far past its own alarm one math-verify call may run before its worker is killed: room for
# the alarm's handler to be scheduled on a busy machine.
STEP_SLACK_S = 1.0


class _Request:
    """One ``verify`` call's responses: its verdicts as they come, and the one future its caller
    waits on."""

    __slots__ = ("future", "verdicts", "missing")

    def __init__(self, future: asyncio.Future[list[Verdict]], n: int) -> None:
        self.future = future
        self.verdicts: list[Optional[Verdict]] = [None] * n
        self.missing = n

    def settle(self, index: int, verdict: Verdict) -> None:
        self.verdicts[index] = verdict
        self.missing -= 1
        if self.missing == 0 and not self.future.done():
            self.future.set_result(self.verdicts)  # type: ignore[arg-type]


# One queued response: (its request, its index there, reference, response).
_Item = tuple[_Request, int, str, str]


class _Lane:
    """One worker's share of the work: its queue, and the chunks it has in flight."""

    __slots__ = ("queue", "chunks", "responses")

    def __init__(self) -> None:
        self.queue: deque[_Item] = deque()
        self.chunks = 0  # in flight
        self.responses = 0  # in those chunks

    def load(self) -> int:
        return len(self.queue) + self.responses


class MathVerifier(Verifier):
    name = "math"
    # What a worker runs on a chunk: fn(pairs, timeout_s, progress) -> [(status, detail)].
    worker_fn: Callable[..., list[_math_worker.Outcome]] = staticmethod(_math_worker.verify_pairs)

    def __init__(self, workers: int, timeout_s: int, max_tasks: int, memory_mb: int,
                 on_worker_failure: Optional[Callable[[str], None]] = None,
                 reference_lanes: bool = True) -> None:
        """``reference_lanes=False``: one queue for all workers, chunks to whichever worker
        is free (what the benchmark compares lanes with)."""
        self.workers = workers
        self.timeout_s = int(timeout_s)
        self._max_tasks = max_tasks
        self._memory_mb = memory_mb
        self._on_worker_failure = on_worker_failure or (lambda reason: None)
        self._pool: ProcessWorkerPool | None = None
        self._by_reference = reference_lanes and workers > 1
        self._lanes = [_Lane() for _ in range(workers if self._by_reference else 1)]
        self._chunks_per_lane = CHUNKS_IN_FLIGHT_PER_WORKER * workers // len(self._lanes)
        self._lane_of: OrderedDict[str, int] = OrderedDict()  # reference -> its lane
        self._dispatch_due = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._pool = ProcessWorkerPool(self.workers, self._max_tasks, self._memory_mb)
        # Warm every worker (imports, first parse) before reporting ready.
        warmup = [self._pool.run(_math_worker.verify_chunk, "1", ["\\boxed{1}"], self.timeout_s,
                                 timeout_s=60) for _ in range(self.workers)]
        await asyncio.gather(*warmup)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def ready(self) -> bool:
        # the pool replaces dead workers itself (also idle ones), so readiness heals too
        return self._pool is not None and self._pool.ready()

    @property
    def step_timeout_s(self) -> float:
        """The most one math-verify call may take before its worker is killed."""
        return self.timeout_s + STEP_SLACK_S

    async def verify(self, reference: str | None, responses: Sequence[str]) -> list[Verdict]:
        if reference is None:
            return [Verdict("no_answer", "no reference given")] * len(responses)
        if not responses:
            return []
        loop = asyncio.get_running_loop()
        request = _Request(loop.create_future(), len(responses))
        lane = self._lanes[self._lane_for(reference)]
        lane.queue.extend((request, i, reference, r) for i, r in enumerate(responses))
        if not self._dispatch_due:
            # At the next turn of the loop: requests that arrive together share chunks.
            self._dispatch_due = True
            loop.call_soon(self._dispatch)
        return list(await request.future)

    def _lane_for(self, reference: str) -> int:
        """The lane that last had ``reference`` (its worker has it parsed), else the least
        loaded one."""
        lanes = self._lanes
        if len(lanes) == 1:
            return 0
        index = self._lane_of.get(reference)
        if index is None:
            index = min(range(len(lanes)), key=lambda k: lanes[k].load())
            if len(self._lane_of) >= LANE_MEMORY:
                self._lane_of.popitem(last=False)
        else:
            self._lane_of.move_to_end(reference)
        self._lane_of[reference] = index
        return index

    def _source_for(self, lane: _Lane) -> Optional[_Lane]:
        """Where ``lane`` takes its next chunk from: its own queue, else the fullest other queue
        if enough waits there to repay a worker new to its references."""
        if lane.queue:
            return lane
        fullest = max(self._lanes, key=lambda other: len(other.queue))
        return fullest if len(fullest.queue) >= STEAL_MIN_QUEUED else None

    def _dispatch(self) -> None:
        self._dispatch_due = False
        queued = sum(len(lane.queue) for lane in self._lanes)
        if not queued:
            return
        # The queues as they are now, split evenly over every slot (at most MAX_CHUNK each): 16
        # responses and 2 free slots make two chunks of 8; at the end of a burst, what is left
        # goes out in slices, so no worker idles while another works through one long chunk.
        size = min(MAX_CHUNK, math.ceil(queued / (len(self._lanes) * self._chunks_per_lane)))
        started = True
        while started:  # a round over the lanes, one chunk each, until none can take one
            started = False
            for index, lane in enumerate(self._lanes):
                if lane.chunks >= self._chunks_per_lane:
                    continue
                source = self._source_for(lane)
                if source is None:
                    continue
                taken = [source.queue.popleft() for _ in range(min(size, len(source.queue)))]
                chunk = [item for item in taken if not item[0].future.done()]  # callers gone
                started = True
                if chunk:
                    self._start(index, chunk)

    def _start(self, index: int, chunk: list[_Item]) -> None:
        lane = self._lanes[index]
        lane.chunks += 1
        lane.responses += len(chunk)
        task = asyncio.ensure_future(self._verify_and_answer(index, chunk))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _verify_and_answer(self, index: int, chunk: list[_Item]) -> None:
        """Verify one chunk (on lane ``index``'s worker) and hand each verdict to its request."""
        try:
            pool_lane = index if self._by_reference else None
            verdicts = await self._verify_chunk([(item[2], item[3]) for item in chunk], pool_lane)
            for (request, position, _, _), verdict in zip(chunk, verdicts):
                request.settle(position, verdict)
        except Exception as exc:  # e.g. the pool could not be started
            for request, _, _, _ in chunk:
                if not request.future.done():
                    request.future.set_exception(exc)
        finally:
            lane = self._lanes[index]
            lane.chunks -= 1
            lane.responses -= len(chunk)
            self._dispatch()

    async def _verify_chunk(self, pairs: list[tuple[str, str]],
                            lane: Optional[int] = None) -> list[Verdict]:
        assert self._pool is not None, "verifier pool not started"
        results = await self._pool.run_items(self.worker_fn, pairs, self.timeout_s,
                                             step_timeout_s=self.step_timeout_s,
                                             on_failure=self._on_worker_failure, lane=lane)
        return [self._verdict(result) for result in results]

    @staticmethod
    def _verdict(result: tuple[str, str | None] | ItemFailed) -> Verdict:
        if isinstance(result, ItemFailed):
            if result.kind == "timeout":
                return Verdict("timeout", f"verifier worker killed: {result.detail}")
            return Verdict("error", f"verifier worker died: {result.detail}")
        status, detail = result
        if detail is None:
            return _PLAIN_VERDICTS[status]  # one shared instance per status (frozen)
        return Verdict(status, detail)  # type: ignore[arg-type]


_PLAIN_VERDICTS: dict[str, Verdict] = {status: Verdict(status) for status in get_args(Status)}
