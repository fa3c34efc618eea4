"""A managed pool of verifier worker processes (pebble): a watchdog that kills and replaces a stuck
worker, an address-space cap per worker, and recycling after N tasks.

Tasks that verify many items (:meth:`ProcessWorkerPool.run_items`) are bounded per *step*, not per
task: the worker reports each item and each bounded call within it (progress.py), and the
watchdog kills the worker only when one step outruns its budget. So a chunk of many slow but
healthy responses is never killed for its total time (which grows with its size and with CPU
contention), and a stuck one is found within one step's budget and charged alone: it is retried
once by itself (a worker can stall for reasons of its own), then reported; the other items of the
chunk run again untouched."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pebble import ProcessExpired, ProcessPool

from . import _math_worker
from .progress import Position, ProgressBoard, ProgressReporter

WORKER_MODULE = _math_worker.__name__

log = logging.getLogger(__name__)


class TaskTimeout(Exception):
    """The task outran its hard timeout; its worker was killed and replaced."""


class WorkerDied(Exception):
    """The worker running the task died (killed, or out of memory) before answering."""


# How often the watchdog reads a running task's progress.
POLL_S = 0.1
# An item whose worker was lost this many times is given up on (reported, not retried).
MAX_STRIKES = 2
# pebble's own per-task timeout, as a safety net only for a task nobody watches any more (its
# caller was cancelled): generous, in steps per item, so healthy work never reaches it.
BACKSTOP_STEPS_PER_ITEM = 16


@dataclass(frozen=True)
class ItemFailed:
    """An item given up on: its worker was killed for overrunning a step ("timeout"), or died
    ("died"), on every try."""

    kind: Literal["timeout", "died"]
    detail: str


class _TaskLost(Exception):
    """A tracked task lost its worker; ``item`` is the index it was on (None: unknown)."""

    def __init__(self, kind: Literal["timeout", "died"], item: Optional[int], detail: str):
        super().__init__(detail)
        self.kind = kind
        self.item = item
        self.detail = detail


class ProcessWorkerPool:
    def __init__(self, workers: int, max_tasks: int, memory_mb: int) -> None:
        self.workers = workers
        self.max_tasks = max_tasks
        self.memory_mb = memory_mb
        self.restarts = 0
        self._board = ProgressBoard()
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

    def restart_if_broken(self) -> bool:
        """pebble replaces a worker that dies during a task, but a worker that dies while idle
        (the OOM killer, an operator's kill) breaks the whole pool for good. Start a new pool
        then, so the service heals instead of failing every later request. True: the pool (old
        or new) takes tasks."""
        if self._pool.active:
            return True
        log.error("verifier pool is broken (a worker died outside a task); starting a new one")
        try:
            self._pool.stop()
            self._pool.join(timeout=5)
        except Exception:  # the old pool is beyond repair either way
            log.exception("stopping the broken verifier pool failed")
        self._pool = self._new_pool()
        self.restarts += 1
        return self._pool.active

    async def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
        self.restart_if_broken()
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

    async def run_items(self, fn: Callable[..., list[Any]], items: Sequence[Any], *args: Any,
                        step_timeout_s: float,
                        on_failure: Optional[Callable[[str], None]] = None) -> list[Any]:
        """``fn(items, *args, progress)`` in one worker, one result per item, in order. A step
        (see the module docstring) that runs past ``step_timeout_s`` gets its worker killed;
        ``on_failure("timeout" | "died")`` is called for each lost worker. An item that loses
        its worker is retried alone, at most ``MAX_STRIKES`` times in all, then its result is an
        :class:`ItemFailed`; the other items are run again (they are not charged)."""
        results: list[Any] = [None] * len(items)
        strikes = [0] * len(items)
        notify = on_failure or (lambda kind: None)

        async def attempt(indices: list[int]) -> None:
            try:
                out = await self._run_tracked(fn, [items[i] for i in indices], args,
                                              step_timeout_s)
            except _TaskLost as lost:
                notify(lost.kind)
                known = lost.item is not None and 0 <= lost.item < len(indices)
                charged = [indices[lost.item]] if known else list(indices)  # type: ignore[index]
                for i in charged:
                    strikes[i] += 1
                    if strikes[i] >= MAX_STRIKES:
                        results[i] = ItemFailed(lost.kind, lost.detail)
                retry = [i for i in charged if strikes[i] < MAX_STRIKES]
                rest = [i for i in indices if i not in charged]
                # A known culprit runs alone, so it cannot take its neighbours down again; with
                # no culprit known, every item was charged and they run together once more.
                await asyncio.gather(*(attempt(group) for group in (retry, rest) if group))
            else:
                for i, result in zip(indices, out):
                    results[i] = result

        if items:
            await attempt(list(range(len(items))))
        return results

    async def _run_tracked(self, fn: Callable[..., list[Any]], items: list[Any],
                           args: tuple[Any, ...], step_timeout_s: float) -> list[Any]:
        self.restart_if_broken()
        reporter = self._board.acquire()
        backstop_s = step_timeout_s * (BACKSTOP_STEPS_PER_ITEM * len(items) + 1)
        future = self._pool.schedule(fn, args=(items, *args, reporter), timeout=backstop_s)
        try:
            return await self._watch(future, reporter, step_timeout_s)
        except asyncio.CancelledError:
            if not future.running():
                future.cancel()  # still queued: simply dropped
            raise  # running: left to finish (a healthy worker is not killed), under the backstop
        finally:
            self._release_when_done(future, reporter)

    async def _watch(self, future: Future, reporter: ProgressReporter,
                     step_timeout_s: float) -> list[Any]:
        waiter = asyncio.wrap_future(future)
        position: Optional[Position] = None
        step_started: Optional[float] = None  # None: not running yet (queued behind others)
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=POLL_S)
            if done:
                return self._task_result(waiter, reporter)
            if not future.running():
                continue
            now = time.monotonic()
            current = self._board.read(reporter)
            if step_started is None or current != position:
                position, step_started = current, now
            elif now - step_started > step_timeout_s and future.cancel():
                item = position.item if position is not None and position.item >= 0 else None
                raise _TaskLost("timeout", item, f"a verifier step ran past {step_timeout_s:g}s "
                                "(beyond the reach of its alarm); worker killed")

    def _task_result(self, waiter: asyncio.Future, reporter: ProgressReporter) -> list[Any]:
        try:
            return waiter.result()
        except (FutureTimeout, ProcessExpired, RuntimeError) as exc:
            position = self._board.read(reporter)
            item = position.item if position is not None and position.item >= 0 else None
            if isinstance(exc, FutureTimeout):
                raise _TaskLost("timeout", item, "no answer within the task's backstop") from exc
            if isinstance(exc, ProcessExpired):
                detail = f"worker exited with code {exc.exitcode}"
            else:  # pebble: "Unexpected error within the Pool"
                detail = f"verifier pool failed: {exc}"
            raise _TaskLost("died", item, detail) from exc

    def _release_when_done(self, future: Future, reporter: ProgressReporter) -> None:
        """Free the task's progress slot once no worker writes to it any more. A task left
        running by a cancelled caller frees it when it ends (pebble calls back from its own
        thread). A killed worker's last writes carry its token, so the slot's next owner ignores
        them."""
        if future.done():
            self._board.release(reporter)
            return
        loop = asyncio.get_running_loop()

        def release(_: Future) -> None:
            try:
                loop.call_soon_threadsafe(self._board.release, reporter)
            except RuntimeError:  # the loop is closed: the service is shutting down
                pass

        future.add_done_callback(release)

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=10)
        self._board.close()
