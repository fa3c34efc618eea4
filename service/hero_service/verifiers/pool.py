"""A managed pool of verifier worker processes (pebble): hard per-task timeouts that kill and
replace a stuck worker, an address-space cap per worker, and recycling after N tasks."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

from pebble import ProcessExpired, ProcessPool

from . import _math_worker

WORKER_MODULE = _math_worker.__name__

log = logging.getLogger(__name__)


class TaskTimeout(Exception):
    """The task outran its hard timeout; its worker was killed and replaced."""


class WorkerDied(Exception):
    """The worker running the task died (killed, or out of memory) before answering."""


class ProcessWorkerPool:
    def __init__(self, workers: int, max_tasks: int, memory_mb: int) -> None:
        self.workers = workers
        self.max_tasks = max_tasks
        self.memory_mb = memory_mb
        self.restarts = 0
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPool:
        # A fork server, not fork: the service process holds torch and threads, which must not be
        # forked; the fork server preloads only the worker module, so replacements start in ms.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([WORKER_MODULE])
        return ProcessPool(
            max_workers=self.workers,
            max_tasks=self.max_tasks,
            initializer=_math_worker.init_worker,
            initargs=(self.memory_mb,),
            context=context,
        )

    def ensure_healthy(self) -> bool:
        """pebble replaces a worker that dies during a task, but a worker that dies while idle
        (the OOM killer, an operator's kill) breaks the whole pool for good. Start a new pool
        then, so the service heals instead of failing every later request."""
        if self._pool.active:
            return True
        log.error("verifier pool is broken (a worker died outside a task); starting a new one")
        try:
            self._pool.stop()
            self._pool.join(timeout=5)
        except Exception:  # noqa: BLE001 - the old pool is beyond repair either way
            log.exception("stopping the broken verifier pool failed")
        self._pool = self._new_pool()
        self.restarts += 1
        return self._pool.active

    def active(self) -> bool:
        return self.ensure_healthy()

    async def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
        self.ensure_healthy()
        future = self._pool.schedule(fn, args=args, timeout=timeout_s)
        try:
            # Shielded: a caller that goes away must not cancel a running task, which would kill
            # a healthy worker; a task still queued is simply dropped.
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if not future.running():
                future.cancel()
            raise
        except FutureTimeout as exc:
            raise TaskTimeout(f"no answer within {timeout_s:g}s") from exc
        except ProcessExpired as exc:
            raise WorkerDied(f"worker exited with code {exc.exitcode}") from exc
        except RuntimeError as exc:  # pebble: "Unexpected error within the Pool"
            raise WorkerDied(f"verifier pool failed: {exc}") from exc

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=10)
