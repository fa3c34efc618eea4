"""The ``math`` verifier: HuggingFace math-verify, run in a pool of worker processes."""

from __future__ import annotations

import asyncio
import math
from typing import Sequence

from . import _math_worker
from .base import Verdict, Verifier
from .pool import ProcessWorkerPool, TaskTimeout, WorkerDied

# A chunk of normal responses verifies in a few ms; the hard timeout only has to catch work that
# math-verify's own signal.alarm cannot interrupt (C-level loops such as huge integer powers).
MAX_CHUNK = 8


class MathVerifier(Verifier):
    name = "math"

    def __init__(self, workers: int, timeout_s: int, max_tasks: int, memory_mb: int) -> None:
        self.workers = workers
        self.timeout_s = int(timeout_s)
        self._max_tasks = max_tasks
        self._memory_mb = memory_mb
        self._pool: ProcessWorkerPool | None = None
        self.retried_items = 0

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
        return self._pool is not None and self._pool.active()

    @property
    def hard_timeout_s(self) -> float:
        # Parse and compare each have their own alarm of timeout_s; one more second of slack.
        return 2 * self.timeout_s + 1

    async def verify(self, reference: str | None, responses: Sequence[str]) -> list[Verdict]:
        if reference is None:
            return [Verdict("no_answer", "no reference given")] * len(responses)
        size = max(1, min(MAX_CHUNK, math.ceil(len(responses) / self.workers)))
        chunks = [list(responses[i : i + size]) for i in range(0, len(responses), size)]
        results = await asyncio.gather(*(self._verify_chunk(reference, c) for c in chunks))
        return [verdict for chunk in results for verdict in chunk]

    async def _verify_chunk(self, reference: str, responses: list[str]) -> list[Verdict]:
        assert self._pool is not None, "verifier pool not started"
        try:
            outcomes = await self._pool.run(
                _math_worker.verify_chunk, reference, responses, self.timeout_s,
                timeout_s=self.hard_timeout_s,
            )
            return [Verdict(status, detail) for status, detail in outcomes]
        except (TaskTimeout, WorkerDied):
            # One response took the chunk down; retry each response alone so only the culprit
            # loses, and the rest keep their real verdicts.
            self.retried_items += len(responses)
            return list(await asyncio.gather(*(self._verify_alone(reference, r) for r in responses)))

    async def _verify_alone(self, reference: str, response: str) -> Verdict:
        assert self._pool is not None
        try:
            ((status, detail),) = await self._pool.run(
                _math_worker.verify_chunk, reference, [response], self.timeout_s,
                timeout_s=self.hard_timeout_s,
            )
            return Verdict(status, detail)  # type: ignore[arg-type]
        except TaskTimeout as exc:
            return Verdict("timeout", f"verifier worker killed: {exc}")
        except WorkerDied as exc:
            return Verdict("error", f"verifier worker died: {exc}")
