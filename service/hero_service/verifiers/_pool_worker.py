"""The loop each verifier worker process runs (pool.py is the service's side). Kept import-light:
the fork server preloads it with the worker code.

A worker reads one task at a time from its own pipe, runs it and writes the outcome to its own
result pipe; it never talks to another worker, so there is no lock and no acknowledgement, and
the service knows which task a worker is on from the order it sent them in. It exits when its
task pipe closes (the service retired or closed it, or died)."""

from __future__ import annotations

import pickle
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

# A task: (task id, function, positional args). An outcome: (task id, ok, value or exception).
Task = tuple[int, Callable[..., Any], tuple[Any, ...]]
Outcome = tuple[int, bool, Any]


def serve(tasks: Connection, results: Connection,
          initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the service decides when workers
    # stop (it closes their pipes), so a worker must not die of it mid-task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            message = tasks.recv_bytes()
        except (EOFError, OSError):
            return
        task_id, fn, args = pickle.loads(message)
        try:
            outcome: Outcome = (task_id, True, fn(*args))
        except BaseException as exc:  # every failure, MemoryError included, is the caller's
            outcome = (task_id, False, exc)
        results.send_bytes(_dumps(outcome))


def _dumps(outcome: Outcome) -> bytes:
    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # an unpicklable result or exception still answers its task
        return pickle.dumps((outcome[0], False, RuntimeError(
            f"the task's {'result' if outcome[1] else 'exception'} cannot be sent back: "
            f"{type(exc).__name__}: {exc}")), protocol=pickle.HIGHEST_PROTOCOL)
