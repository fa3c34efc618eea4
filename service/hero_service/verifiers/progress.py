"""Per-task progress from verifier workers to the service, so a stuck response is found by how long
its *current step* has run, not by how long its whole chunk has run.

A worker verifying a chunk says which item it is on and bumps a step counter before every
bounded call (each math-verify call has its own alarm). The service polls that record; a step
that outruns its budget means the worker is stuck where the alarm cannot reach (C code, a frozen
process), so the service kills it and charges only the item it was on.

Records live in a small file on tmpfs (``/dev/shm`` where it exists): one fixed-size slot per task
in flight, written with ``pwrite`` and read with ``pread``. That needs no shared-memory tracker
and survives the worker being killed mid-write (a torn record only resets the step timer). Kept
import-light: the fork server preloads this module with the worker code."""

from __future__ import annotations

import itertools
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import NamedTuple

# token (which task owns the slot), item index (-1 = none yet), step counter.
_RECORD = struct.Struct("<qqq")


class Position(NamedTuple):
    item: int
    step: int


class ProgressBoard:
    """The service's side: hands out slots, reads them. Used from one thread (the event loop)."""

    def __init__(self) -> None:
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._fd, self.path = tempfile.mkstemp(prefix="hero-verifier-progress-", dir=directory)
        self._free: list[int] = []
        self._slots = itertools.count()
        self._tokens = itertools.count(1)

    def acquire(self) -> ProgressReporter:
        slot = self._free.pop() if self._free else next(self._slots)
        token = next(self._tokens)
        os.pwrite(self._fd, _RECORD.pack(0, -1, 0), slot * _RECORD.size)
        return ProgressReporter(self.path, slot, token)

    def read(self, reporter: ProgressReporter) -> Position | None:
        """Where the task is, or None if it has not reported yet. A record written by an earlier
        owner of the slot (a killed worker's last write) carries another token and is ignored."""
        data = os.pread(self._fd, _RECORD.size, reporter.slot * _RECORD.size)
        if len(data) < _RECORD.size:
            return None
        token, item, step = _RECORD.unpack(data)
        return Position(item, step) if token == reporter.token else None

    def release(self, reporter: ProgressReporter) -> None:
        self._free.append(reporter.slot)

    def close(self) -> None:
        os.close(self._fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# A worker keeps the board file open across tasks (it is recycled after max_tasks anyway).
_open_files: dict[str, int] = {}


@dataclass
class ProgressReporter:
    """The worker's side, pickled into each task. ``item(i)`` when starting item i, ``step()``
    before each bounded call within it."""

    path: str
    slot: int
    token: int
    _item: int = field(default=-1, repr=False)
    _step: int = field(default=0, repr=False)

    def item(self, index: int) -> None:
        self._item = index
        self.step()

    def step(self) -> None:
        self._step += 1
        try:
            fd = _open_files.get(self.path)
            if fd is None:
                fd = _open_files[self.path] = os.open(self.path, os.O_WRONLY)
            os.pwrite(fd, _RECORD.pack(self.token, self._item, self._step),
                      self.slot * _RECORD.size)
        except OSError:
            # Only when the board is gone (the pool is closing): the verdict matters more than
            # the report, and nobody is watching any more.
            pass


class NoProgress:
    """For calls outside the pool (tests, warm-up): reports nowhere."""

    def item(self, index: int) -> None:
        pass

    def step(self) -> None:
        pass


Reporter = ProgressReporter | NoProgress
NO_PROGRESS = NoProgress()
