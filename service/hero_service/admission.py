"""Admission: the one bound on the rollouts this process holds (TEI ``try_acquire_permit``).

One :class:`Admission` is created at start-up from ``--max-queued-rollouts``. A scoring request
takes a :class:`Permit` for its n rollouts before any work and holds it until it is answered: while
it is verified and RM-scored, and while it waits in the group store for the rest of its group (a
parked request keeps its permit, so parked rollouts count against the bound). Taking a permit
never waits: a request that would not fit now is refused with 429 ``overloaded`` (retry later), one
whose rollouts alone exceed the bound with 413 ``too_many_rollouts`` (no retry can pass).

``hero_queue_depth`` (the autoscaling signal) is the scoring backlog only: a parked permit leaves
it, since parked rollouts wait for other requests, not for this replica's compute."""

from __future__ import annotations

from types import TracebackType
from typing import Optional

from .errors import Overloaded, TooManyRollouts
from .metrics import Metrics

BOUND = "--max-queued-rollouts"


class Admission:
    """Hands out permits for n rollouts up to ``limit`` held at once. Event-loop thread only."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        if limit < 1:
            raise ValueError("the admission limit must be >= 1")
        self.limit = limit
        self._metrics = metrics
        self._held = 0  # rollouts of every live permit, parked or not
        self._parked = 0  # of which waiting for their groups

    @property
    def held(self) -> int:
        return self._held

    @property
    def scoring(self) -> int:
        """Rollouts admitted and not yet scored (``hero_queue_depth``)."""
        return self._held - self._parked

    @property
    def full(self) -> bool:
        return self._held >= self.limit

    def overloaded(self) -> Overloaded:
        """The one refusal of a full service (the load-shedding middleware sends it too)."""
        return Overloaded(f"{self._held} rollouts in flight (limit {self.limit}); retry later")

    def try_acquire(self, n: int, field: str = "groups") -> Permit:
        """A permit for ``n`` rollouts, or raise: TooManyRollouts (``n`` alone exceeds the
        bound; ``field`` names what the client must split), Overloaded (no room now)."""
        if n > self.limit:
            self._metrics.rejected.labels("too_many_rollouts").inc()
            raise TooManyRollouts(n, self.limit, BOUND, field=field)
        if self._held + n > self.limit:
            self._metrics.rejected.labels("overloaded").inc()
            raise self.overloaded()
        self._held += n
        self._publish()
        return Permit(self, n)

    def _park(self, n: int) -> None:
        self._parked += n
        self._publish()

    def _unpark(self, n: int) -> None:
        self._parked -= n
        self._publish()

    def _release(self, n: int) -> None:
        self._held -= n
        self._publish()

    def _publish(self) -> None:
        self._metrics.queue_depth.set(self.scoring)


class Permit:
    """Room for ``n`` rollouts, held until :meth:`release` (or the end of a ``with`` block).
    Releasing twice is harmless, so every exit path may release."""

    def __init__(self, admission: Admission, n: int) -> None:
        self._admission = admission
        self.n = n
        self._parked = False
        self._released = False

    def park(self) -> None:
        """The rollouts are scored and wait for their groups: still held, no longer backlog."""
        if not self._parked and not self._released:
            self._parked = True
            self._admission._park(self.n)

    def release(self) -> None:
        if self._released:
            return
        if self._parked:
            self._admission._unpark(self.n)
        self._released = True
        self._admission._release(self.n)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, kind: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.release()
