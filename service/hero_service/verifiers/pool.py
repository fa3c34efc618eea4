"""A managed pool of verifier worker processes (pebble): hard per-task timeouts that kill and
replace a stuck worker, an address-space cap per worker, and recycling after N tasks."""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

from pebble import ProcessExpired, ProcessPool

from . import _math_worker

WORKER_MODULE = _math_worker.__name__


class TaskTimeout(Exception):
    """The task outran its hard timeout; its worker was killed and replaced."""


class WorkerDied(Exception):
    """The worker running the task died (killed, or out of memory) before answering."""


class ProcessWorkerPool:
    def __init__(self, workers: int, max_tasks: int, memory_mb: int) -> None:
        self.workers = workers
        # A fork server, not fork: the service process holds torch and threads, which must not be
        # forked; the fork server preloads only the worker module, so replacements start in ms.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([WORKER_MODULE])
        self._pool = ProcessPool(
            max_workers=workers,
            max_tasks=max_tasks,
            initializer=_math_worker.init_worker,
            initargs=(memory_mb,),
            context=context,
        )

    def active(self) -> bool:
        return self._pool.active

    async def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
        future = self._pool.schedule(fn, args=args, timeout=timeout_s)
        try:
            return await asyncio.wrap_future(future)
        except FutureTimeout as exc:
            raise TaskTimeout(f"no answer within {timeout_s:g}s") from exc
        except ProcessExpired as exc:
            raise WorkerDied(f"worker exited with code {exc.exitcode}") from exc

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=10)
