"""A managed pool of verifier worker processes: a watchdog that kills and replaces a stuck worker,
an address-space cap per worker, and recycling after N tasks.

**Driven from the event loop.** Each worker has a pipe of its own for tasks and one for results,
written and read by the event loop without blocking: no helper threads (so no GIL hand-offs with
the loop), no shared task queue with its locks, no acknowledgements; a task costs the service one
pickle out and one in. A worker is sent its next task while it still runs the current one
(``PIPELINE_DEPTH``), so it does not wait for the service between tasks, and which task it is on
follows from the order they were sent in. One watchdog timer covers every running task; it runs
only while some task does.

**Bounded per step.** Tasks that verify many items (:meth:`ProcessWorkerPool.run_items`) are
bounded per *step*, not per task: the worker reports each item and each bounded call within it
(progress.py), and the watchdog kills the worker only when one step outruns its budget. So a
chunk of many slow but healthy responses is never killed for its total time (which grows with
its size and with CPU contention), and a stuck one is found within one step's budget and charged
alone: it is retried once by itself (a worker can stall for reasons of its own), then reported;
the other items of the chunk run again untouched.

**Deaths.** A worker that dies (killed, out of memory, or while idle) is noticed at once — its
result pipe closes — and replaced. The task it was running fails (:class:`TaskTimeout` /
:class:`WorkerDied`, or in :meth:`~ProcessWorkerPool.run_items` its item is charged); tasks sent
to it behind that one never started and go to another worker uncharged."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal, Optional

from . import _math_worker, _pool_worker
from .progress import Position, ProgressBoard, ProgressReporter

WORKER_MODULE = _math_worker.__name__

log = logging.getLogger(__name__)


class TaskTimeout(Exception):
    """The task outran its hard timeout; its worker was killed and replaced."""


class WorkerDied(Exception):
    """The worker running the task died (killed, or out of memory) before answering."""


# How often the watchdog looks at the running tasks (only while there are some).
POLL_S = 0.1
# Tasks a worker holds at once: the one it runs and the next, already in its pipe.
PIPELINE_DEPTH = 2
# A lane's worker whose current task has run this long is passed over for the lane's next task
# (which would wait behind it in the pipe): a chunk of 32 ordinary responses takes ~15 ms, so
# this one is on a slow response, maybe one that runs to its timeout.
LANE_HELD_UP_S = 0.25
# An item whose worker was lost this many times is given up on (reported, not retried).
MAX_STRIKES = 2
# A worker that dies within this long of its start without answering anything is replaced only
# after this long, so a worker that cannot start is not respawned in a tight loop.
RESPAWN_BACKOFF_S = 1.0
# How long the exit code of a worker whose pipe closed is waited for (the fork server reports it).
EXIT_CODE_WAIT_S = 1.0
# How long close() lets the workers exit before killing them.
CLOSE_TIMEOUT_S = 5.0

# multiprocessing.connection's framing (what the worker's Connection reads and writes): a signed
# 4-byte big-endian length, or -1 then an unsigned 8-byte length for payloads of 2 GiB and more.
_HEADER = struct.Struct("!i")
_LARGE_HEADER = struct.Struct("!Q")
_READ_BYTES = 1 << 16
# A task pipe's capacity (Linux's default pipe-max-size): a chunk of 32 responses is ~40 KB on the
# dev data, more than the default 64 KB pipe holds once responses run long.
TASK_PIPE_BYTES = 1 << 20

LossKind = Literal["timeout", "died"]


@dataclass(frozen=True)
class ItemFailed:
    """An item given up on: its worker was killed for overrunning a step ("timeout"), or died
    ("died"), on every try."""

    kind: LossKind
    detail: str


class _TaskLost(Exception):
    """A task lost its worker; ``item`` is the index it was on (None: unknown)."""

    def __init__(self, kind: LossKind, item: Optional[int], detail: str):
        super().__init__(detail)
        self.kind = kind
        self.item = item
        self.detail = detail


@dataclass(eq=False)
class _Task:
    id: int
    payload: bytes  # the pickled (id, fn, args)
    future: asyncio.Future[Any]
    timeout_s: Optional[float] = None  # the whole task's bound (run)
    step_timeout_s: Optional[float] = None  # each step's bound (run_items, with a reporter)
    reporter: Optional[ProgressReporter] = None
    lane: Optional[int] = None  # the worker lane it should go to (a preference, see _dispatch)
    # Set when it becomes the task its worker runs (the head of what the worker was sent).
    started: float = 0.0
    position: Optional[Position] = None
    step_started: float = 0.0

    def start(self, now: float) -> None:
        self.started = self.step_started = now
        self.position = None


@dataclass(frozen=True)
class _Kill:
    """Why the pool killed a worker, and which of its tasks is charged."""

    task_id: int
    kind: LossKind
    item: Optional[int]
    detail: str


@dataclass(eq=False)
class _Worker:
    process: Any  # multiprocessing's forkserver Process
    pid: int
    task_fd: int
    result_fd: int
    born: float
    lane: int  # 0 .. workers-1: a replacement takes over the lane of the worker it replaces
    sent: deque[_Task] = field(default_factory=deque)  # in order; the first is running
    tasks_sent: int = 0
    answered: int = 0
    retiring: bool = False  # takes no new task; its task pipe closes once it has answered all
    killed: Optional[_Kill] = None
    unsent: bytearray = field(default_factory=bytearray)  # what its task pipe could not take yet
    received: bytearray = field(default_factory=bytearray)  # result bytes not yet a whole frame


class ProcessWorkerPool:
    def __init__(self, workers: int, max_tasks: int, memory_mb: int) -> None:
        self.workers = workers
        self.max_tasks = max_tasks
        self.memory_mb = memory_mb
        self.restarts = 0  # workers replaced after dying outside a task
        self._board = ProgressBoard()
        # A fork server, not fork: the service process holds torch and threads, which must not be
        # forked; the fork server preloads only the worker module, so replacements start in ms.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([WORKER_MODULE])
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._live: list[_Worker] = []  # taking tasks
        self._all: list[_Worker] = []  # live and retiring, until their pipes close
        self._queue: deque[_Task] = deque()  # not sent to a worker yet
        self._ids = itertools.count()
        self._respawns_due = 0  # replacements waiting out RESPAWN_BACKOFF_S
        self._watchdog: Optional[asyncio.TimerHandle] = None
        self._reaping: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- the callers' side -----------------------------------------------------------------

    def ready(self) -> bool:
        """True while the pool takes tasks: open, its workers started (they are replaced as they
        die, also while idle). Needs the running event loop."""
        if self._closed:
            return False
        self._ensure_workers()
        return bool(self._live) or self._respawns_due > 0

    async def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
        """``fn(*args)`` in a worker; its own exception is raised here. :class:`TaskTimeout` if
        it runs past ``timeout_s`` (the worker is killed and replaced), :class:`WorkerDied` if
        its worker dies. A caller that goes away drops a task still queued; a running one is left
        to finish (a healthy worker is not killed), still under its timeout."""
        task = self._submit(fn, args, timeout_s=timeout_s)
        try:
            return await task.future
        except _TaskLost as lost:
            error = TaskTimeout if lost.kind == "timeout" else WorkerDied
            raise error(lost.detail) from None

    async def run_items(self, fn: Callable[..., list[Any]], items: Sequence[Any], *args: Any,
                        step_timeout_s: float,
                        on_failure: Optional[Callable[[str], None]] = None,
                        lane: Optional[int] = None) -> list[Any]:
        """``fn(items, *args, progress)`` in one worker, one result per item, in order. A step
        (see the module docstring) that runs past ``step_timeout_s`` gets its worker killed;
        ``on_failure("timeout" | "died")`` is called for each lost worker. An item that loses
        its worker is retried alone, at most ``MAX_STRIKES`` times in all, then its result is an
        :class:`ItemFailed`; the other items are run again (they are not charged). ``lane``: the
        worker lane (``0 .. workers-1``) to run on when that worker has room (its caches are
        warm for this work); otherwise any."""
        results: list[Any] = [None] * len(items)
        strikes = [0] * len(items)
        notify = on_failure or (lambda kind: None)

        async def attempt(indices: list[int]) -> None:
            reporter = self._board.acquire()
            task = self._submit(fn, ([items[i] for i in indices], *args, reporter),
                                step_timeout_s=step_timeout_s, reporter=reporter, lane=lane)
            try:
                out = await task.future
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

    def close(self) -> None:
        """Stop every worker (their pipes closed, then SIGTERM, then SIGKILL for any left after
        ``CLOSE_TIMEOUT_S``); tasks not answered fail with :class:`WorkerDied`."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        workers, self._all, self._live = self._all, [], []
        for worker in workers:
            self._unwatch(worker)
            _close_fd(worker.task_fd)
            _close_fd(worker.result_fd)
            if worker.process.exitcode is None:
                worker.process.terminate()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join(1.0)
        unanswered = [t for w in workers for t in w.sent] + list(self._queue)
        self._queue.clear()
        for task in unanswered:
            self._settle(task, exception=WorkerDied("the verifier pool was closed"))
        self._board.close()

    # -- tasks -----------------------------------------------------------------------------

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], *,
                timeout_s: Optional[float] = None, step_timeout_s: Optional[float] = None,
                reporter: Optional[ProgressReporter] = None, lane: Optional[int] = None) -> _Task:
        if self._closed:
            raise WorkerDied("the verifier pool is closed")
        self._ensure_workers()
        assert self._loop is not None
        task_id = next(self._ids)
        try:
            payload = pickle.dumps((task_id, fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            if reporter is not None:
                self._board.release(reporter)
            raise  # the caller's own mistake (an unpicklable function or argument)
        task = _Task(task_id, payload, self._loop.create_future(), timeout_s, step_timeout_s,
                     reporter, lane)
        self._queue.append(task)
        self._dispatch()
        return task

    def _dispatch(self) -> None:
        """Queued tasks to the workers with room: to the worker of the task's lane if it has
        room and is not held up, else the least loaded (a lane is a preference, never a wait:
        its worker may be dead, respawning, full, or on a slow response)."""
        now = time.monotonic()
        while self._queue:
            open_workers = [w for w in self._live if len(w.sent) < PIPELINE_DEPTH]
            if not open_workers:
                return
            task = self._queue.popleft()
            if task.future.done():  # its caller went away before it was sent
                self._settle(task)
                continue
            own = [w for w in open_workers if w.lane == task.lane
                   and (not w.sent or now - w.sent[0].started < LANE_HELD_UP_S)]
            self._send(min(own or open_workers, key=lambda w: len(w.sent)), task)

    def _send(self, worker: _Worker, task: _Task) -> None:
        assert self._loop is not None
        if not worker.sent:
            task.start(time.monotonic())
        worker.sent.append(task)
        worker.tasks_sent += 1
        size = len(task.payload)
        header = (_HEADER.pack(size) if size < 2**31 - 1
                  else _HEADER.pack(-1) + _LARGE_HEADER.pack(size))
        worker.unsent += header
        worker.unsent += task.payload
        if len(worker.unsent) == len(header) + size:  # nothing was waiting before it
            self._flush(worker)
        self._arm_watchdog()
        if self.max_tasks and worker.tasks_sent >= self.max_tasks:
            self._retire(worker)

    def _flush(self, worker: _Worker) -> None:
        """Write what the worker's task pipe takes now; the rest when it has room again."""
        assert self._loop is not None
        try:
            written = os.write(worker.task_fd, worker.unsent)
        except BlockingIOError:
            written = 0
        except OSError:  # the worker is gone: its result pipe's end says so (_on_exit)
            worker.unsent.clear()
            self._loop.remove_writer(worker.task_fd)
            return
        del worker.unsent[:written]
        if worker.unsent:
            self._loop.add_writer(worker.task_fd, self._flush, worker)
        else:
            self._loop.remove_writer(worker.task_fd)

    def _on_readable(self, worker: _Worker) -> None:
        try:
            data = os.read(worker.result_fd, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._on_exit(worker)
            return
        worker.received += data
        while (payload := _next_frame(worker.received)) is not None:
            self._on_outcome(worker, payload)

    def _on_outcome(self, worker: _Worker, payload: bytes) -> None:
        task = worker.sent.popleft()
        worker.answered += 1
        try:
            task_id, ok, value = pickle.loads(payload)
        except Exception as exc:  # e.g. an exception class the service cannot import
            task_id, ok, value = task.id, False, RuntimeError(
                f"the verifier worker's answer cannot be read: {type(exc).__name__}: {exc}")
        assert task_id == task.id, "a worker answers its tasks in the order they were sent"
        if ok:
            self._settle(task, result=value)
        else:
            self._settle(task, exception=value)
        if worker.sent:
            worker.sent[0].start(time.monotonic())
        elif worker.retiring:
            self._unwatch_tasks(worker)
        self._dispatch()

    def _settle(self, task: _Task, *, result: Any = None,
                exception: Optional[BaseException] = None) -> None:
        """The task is over: free its progress slot, answer its caller (unless gone)."""
        if task.reporter is not None:
            self._board.release(task.reporter)
            task.reporter = None
        if task.future.done():
            return
        try:
            if exception is not None:
                task.future.set_exception(exception)
            else:
                task.future.set_result(result)
        except RuntimeError:  # its event loop is closed: nobody waits for it
            pass

    # -- the watchdog ----------------------------------------------------------------------

    def _arm_watchdog(self) -> None:
        if self._watchdog is None and self._loop is not None and not self._closed:
            self._watchdog = self._loop.call_later(POLL_S, self._watch)

    def _watch(self) -> None:
        self._watchdog = None
        now = time.monotonic()
        busy = False
        for worker in list(self._all):
            if not worker.sent or worker.killed is not None:
                continue
            busy = True
            task = worker.sent[0]
            if task.timeout_s is not None and now - task.started > task.timeout_s:
                self._kill(worker, _Kill(task.id, "timeout", None,
                                         f"no answer within {task.timeout_s:g}s"))
            elif task.step_timeout_s is not None and task.reporter is not None:
                current = self._board.read(task.reporter)
                if current != task.position:
                    task.position, task.step_started = current, now
                elif now - task.step_started > task.step_timeout_s:
                    item = current.item if current is not None and current.item >= 0 else None
                    self._kill(worker, _Kill(
                        task.id, "timeout", item, f"a verifier step ran past "
                        f"{task.step_timeout_s:g}s (beyond the reach of its alarm); worker "
                        "killed"))
        if busy:
            self._arm_watchdog()

    def _kill(self, worker: _Worker, why: _Kill) -> None:
        worker.killed = why
        self._retire(worker)
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone: its pipe's end is on its way

    # -- workers ---------------------------------------------------------------------------

    def _ensure_workers(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        while not self._closed and len(self._live) + self._respawns_due < self.workers:
            self._start_worker()

    def _start_worker(self) -> None:
        assert self._loop is not None
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        _widen(task_w)
        child_tasks = Connection(task_r, writable=False)
        child_results = Connection(result_w, readable=False)
        process = self._context.Process(
            target=_pool_worker.serve, name="hero-verifier", daemon=True,
            args=(child_tasks, child_results, _math_worker.init_worker, (self.memory_mb,)))
        try:
            process.start()
        except BaseException:
            _close_fd(task_w)
            _close_fd(result_r)
            raise
        finally:  # the worker holds its own ends now: its exit closes them for good
            child_tasks.close()
            child_results.close()
        os.set_blocking(task_w, False)
        os.set_blocking(result_r, False)
        assert process.pid is not None  # started
        taken = {w.lane for w in self._live}
        lane = next(k for k in itertools.count() if k not in taken)
        worker = _Worker(process, process.pid, task_w, result_r, born=time.monotonic(), lane=lane)
        self._live.append(worker)
        self._all.append(worker)
        self._loop.add_reader(result_r, self._on_readable, worker)
        self._dispatch()

    def _retire(self, worker: _Worker) -> None:
        """No new tasks for it; a replacement starts now, and its task pipe closes (so it exits)
        once it has answered what it was sent."""
        if worker.retiring:
            return
        worker.retiring = True
        self._live.remove(worker)
        if not worker.sent:
            self._unwatch_tasks(worker)
        if not self._closed:
            self._ensure_workers()

    def _unwatch_tasks(self, worker: _Worker) -> None:
        assert self._loop is not None
        self._loop.remove_writer(worker.task_fd)
        _close_fd(worker.task_fd)
        worker.task_fd = -1

    def _unwatch(self, worker: _Worker) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        if worker.task_fd >= 0:
            self._loop.remove_writer(worker.task_fd)
        self._loop.remove_reader(worker.result_fd)

    def _on_exit(self, worker: _Worker) -> None:
        """The worker's result pipe closed: it exited (retired), was killed, or died."""
        assert self._loop is not None
        self._unwatch(worker)
        _close_fd(worker.result_fd)
        if worker.task_fd >= 0:
            _close_fd(worker.task_fd)
            worker.task_fd = -1
        self._all.remove(worker)
        unexpected = not worker.retiring
        if worker in self._live:
            self._live.remove(worker)
        tasks = list(worker.sent)
        worker.sent.clear()
        why = worker.killed
        # The task charged: the one the kill was for, or (an unexpected death) the running one.
        charged = None
        if tasks and (why is None or why.task_id == tasks[0].id):
            charged = tasks.pop(0)
        for task in reversed(tasks):  # never started (or not the culprit): run elsewhere
            self._queue.appendleft(task)
        if self._closed:
            return
        if charged is None and unexpected and why is None:
            log.error("verifier worker %d died while idle; starting a new one", worker.pid)
            self.restarts += 1
        if unexpected:
            young = worker.answered == 0 and time.monotonic() - worker.born < RESPAWN_BACKOFF_S
            if young:
                self._respawns_due += 1
                self._loop.call_later(RESPAWN_BACKOFF_S, self._respawn)
            else:
                self._ensure_workers()
        reaping = asyncio.ensure_future(self._charge(worker, charged, why))
        self._reaping.add(reaping)
        reaping.add_done_callback(self._reaping.discard)
        self._dispatch()

    def _respawn(self) -> None:
        self._respawns_due -= 1
        if not self._closed:
            self._ensure_workers()

    async def _charge(self, worker: _Worker, task: Optional[_Task], why: Optional[_Kill]) -> None:
        """Reap the worker (its exit code comes from the fork server a moment after its pipes
        close) and fail the task it was lost on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EXIT_CODE_WAIT_S
        while worker.process.exitcode is None and loop.time() < deadline:
            await asyncio.sleep(0.01)
        code = worker.process.exitcode
        if code is not None:
            worker.process.close()
        if task is None:
            return
        if why is not None:
            lost = _TaskLost(why.kind, why.item, why.detail)
        else:
            log.warning("verifier worker %d died running a task (exit code %s)", worker.pid, code)
            position = self._board.read(task.reporter) if task.reporter is not None else None
            item = position.item if position is not None and position.item >= 0 else None
            lost = _TaskLost("died", item, f"worker exited with code {code}")
        self._settle(task, exception=lost)


def _next_frame(buffer: bytearray) -> Optional[bytes]:
    """Take one whole frame's payload off the front of ``buffer`` (None: none complete yet)."""
    if len(buffer) < _HEADER.size:
        return None
    size = _HEADER.unpack_from(buffer)[0]
    start = _HEADER.size
    if size == -1:
        if len(buffer) < _HEADER.size + _LARGE_HEADER.size:
            return None
        size = _LARGE_HEADER.unpack_from(buffer, _HEADER.size)[0]
        start += _LARGE_HEADER.size
    if len(buffer) < start + size:
        return None
    payload = bytes(buffer[start:start + size])
    del buffer[:start + size]
    return payload


def _widen(fd: int) -> None:
    """Let the pipe hold a whole chunk (up to ``TASK_PIPE_BYTES``): a task written in part waits
    for the event loop to write the rest, and a worker done with its current task would wait for
    it too."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if set_size is None:
        return
    try:
        fcntl.fcntl(fd, set_size, TASK_PIPE_BYTES)
    except OSError:  # above the system's pipe-max-size: the default size still works
        pass


def _close_fd(fd: int) -> None:
    if fd < 0:
        return
    try:
        os.close(fd)
    except OSError:
        pass
