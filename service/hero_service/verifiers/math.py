"""The ``math`` verifier: HuggingFace math-verify, run in a pool of worker processes.

Responses from all concurrent requests go into one queue; a dispatcher keeps two chunks per
worker in flight and cuts the queue into chunks as workers free up. An idle service sends small
chunks at once (low latency); a busy one sends larger chunks (up to ``MAX_CHUNK``), so the pool's
per-task cost is spread over many responses.

Time is bounded per math-verify call, not per chunk: each parse and each comparison has its own
alarm of ``timeout_s`` in the worker, and the pool's watchdog kills a worker only when one call
runs past that by ``STEP_SLACK_S`` (the alarm could not stop it). So a chunk's wall time may grow
with its size and with CPU contention without anything being killed, and a stuck response is
charged alone (retried by itself once, then ``timeout``) while its neighbours keep their real
verdicts."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from . import _math_worker
from .base import Verdict, Verifier
from .pool import ItemFailed, ProcessWorkerPool

MAX_CHUNK = 32
CHUNKS_IN_FLIGHT_PER_WORKER = 2
# How far past its own alarm one math-verify call may run before its worker is killed: room for
# the alarm's handler to be scheduled on a busy machine.
STEP_SLACK_S = 1.0


@dataclass
class _Item:
    reference: str
    response: str
    future: asyncio.Future[Verdict]


class MathVerifier(Verifier):
    name = "math"
    # What a worker runs on a chunk: fn(pairs, timeout_s, progress) -> [(status, detail)].
    worker_fn: Callable[..., list[_math_worker.Outcome]] = staticmethod(_math_worker.verify_pairs)

    def __init__(self, workers: int, timeout_s: int, max_tasks: int, memory_mb: int,
                 on_worker_failure: Optional[Callable[[str], None]] = None) -> None:
        self.workers = workers
        self.timeout_s = int(timeout_s)
        self._max_tasks = max_tasks
        self._memory_mb = memory_mb
        self._on_worker_failure = on_worker_failure or (lambda reason: None)
        self._pool: ProcessWorkerPool | None = None
        self._queue: deque[_Item] = deque()
        self._in_flight = 0
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
        # a broken pool is restarted here, so readiness heals too
        return self._pool is not None and self._pool.restart_if_broken()

    @property
    def step_timeout_s(self) -> float:
        """The most one math-verify call may take before its worker is killed."""
        return self.timeout_s + STEP_SLACK_S

    async def verify(self, reference: str | None, responses: Sequence[str]) -> list[Verdict]:
        if reference is None:
            return [Verdict("no_answer", "no reference given")] * len(responses)
        loop = asyncio.get_running_loop()
        items = [_Item(reference, r, loop.create_future()) for r in responses]
        self._queue.extend(items)
        self._dispatch()
        return list(await asyncio.gather(*(i.future for i in items)))

    def _dispatch(self) -> None:
        slots = self.workers * CHUNKS_IN_FLIGHT_PER_WORKER
        while self._queue and self._in_flight < slots:
            size = min(MAX_CHUNK, max(1, math.ceil(len(self._queue) / (slots - self._in_flight))))
            chunk = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
            chunk = [item for item in chunk if not item.future.done()]  # callers that left
            if not chunk:
                continue
            self._in_flight += 1
            task = asyncio.ensure_future(self._verify_and_answer(chunk))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _verify_and_answer(self, chunk: list[_Item]) -> None:
        """Verify one chunk and settle each waiting caller's future with its verdict."""
        try:
            verdicts = await self._verify_chunk([(i.reference, i.response) for i in chunk])
            for item, verdict in zip(chunk, verdicts):
                if not item.future.done():
                    item.future.set_result(verdict)
        except Exception as exc:  # e.g. the pool could not be started
            for item in chunk:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self._in_flight -= 1
            self._dispatch()

    async def _verify_chunk(self, pairs: list[tuple[str, str]]) -> list[Verdict]:
        assert self._pool is not None, "verifier pool not started"
        results = await self._pool.run_items(self.worker_fn, pairs, self.timeout_s,
                                             step_timeout_s=self.step_timeout_s,
                                             on_failure=self._on_worker_failure)
        return [self._verdict(result) for result in results]

    @staticmethod
    def _verdict(result: tuple[str, str | None] | ItemFailed) -> Verdict:
        if isinstance(result, ItemFailed):
            if result.kind == "timeout":
                return Verdict("timeout", f"verifier worker killed: {result.detail}")
            return Verdict("error", f"verifier worker died: {result.detail}")
        status, detail = result
        return Verdict(status, detail)  # type: ignore[arg-type]
