"""A circuit breaker for the reward model: a backend that is down must cost one failed call, not
one per request (or per bisected half-batch).

States and transitions (one log line each):

    closed     batches run. ``failure_threshold`` consecutive whole-backend failures
               (:class:`~hero_service.reward_models.base.RewardModelUnavailable`) open it.
    open       nothing reaches the backend: new RM work is refused at admission and queued work
               is failed without a call, each with "retry after" = the rest of the cool-down.
    half_open  after ``cooldown_s`` the next request to arrive is let through as the one probe;
               others are refused while it runs. Its first batch decides: a backend that answered
               (even with an input error) closes the breaker, another whole-backend failure
               opens it again for a fresh cool-down.

Only whole-backend failures count; an input that breaks the model, or out of memory, says the
backend is up. Thread-safe: admission runs on the event loop, outcomes on the inference thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Literal, Optional

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]
STATE_VALUES: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}  # the metric's values

# One failure is already the end of the backend's own retries (three attempts for connection
# errors and 429/502/503/504) or a whole --remote-timeout-s of silence: waiting for a second one
# would make every queued request sit through another timeout.
DEFAULT_FAILURE_THRESHOLD = 1
# Short, because OpenRLHF retries a failed /get_reward 5 times, 1 s apart, ignoring Retry-After:
# a cool-down much over 2 s would turn a blip of the RM into a crashed training step.
DEFAULT_COOLDOWN_S = 2.0


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        on_transition: Optional[Callable[[State, State], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cooldown_s <= 0:
            raise ValueError("cooldown_s must be > 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._on_transition = on_transition
        self._clock = clock
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._failures = 0  # consecutive whole-backend failures
        self._opened_at = 0.0
        self._probe_claimed = False
        self.last_cause = ""

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    def refusal(self) -> Optional[int]:
        """Seconds a new request should wait if it would be refused now, else None. Claims
        nothing (a cheap early check before any work is done for a request)."""
        with self._lock:
            return self._refusal_locked()

    def admit(self) -> Optional[int]:
        """Like :meth:`refusal`, but a request let through after the cool-down becomes the probe.
        The caller must then queue its work without fail (the probe's outcome reopens or closes
        the breaker; a probe that never runs would keep it half-open)."""
        with self._lock:
            wait = self._refusal_locked()
            if wait is None and self._state == "open":
                self._transition("half_open", f"cool-down of {self.cooldown_s:g}s over; probing")
                self._probe_claimed = True
            return wait

    def may_run(self) -> bool:
        """Whether the inference thread may call the backend now (closed, or probing)."""
        with self._lock:
            return self._state != "open"

    def record_success(self) -> None:
        """The backend answered (scores, or an error about an input)."""
        with self._lock:
            self._failures = 0
            if self._state != "closed":
                self._probe_claimed = False
                self._transition("closed", "the backend answered")

    def record_failure(self, cause: str) -> None:
        """A whole-backend failure (timeout, unreachable, 5xx)."""
        with self._lock:
            self._failures += 1
            self.last_cause = cause
            if self._state == "half_open" or (
                    self._state == "closed" and self._failures >= self.failure_threshold):
                self._opened_at = self._clock()
                self._probe_claimed = False
                self._transition(
                    "open", f"after {self._failures} consecutive failure(s): {cause}; refusing "
                    f"reward-model work for {self.cooldown_s:g}s")

    def retry_after_s(self) -> int:
        """What to tell a caller refused now, in whole seconds (at least 1)."""
        with self._lock:
            return self._refusal_locked() or 1

    # -- under the lock ------------------------------------------------------------------------

    def _refusal_locked(self) -> Optional[int]:
        if self._state == "open":
            remaining = self._opened_at + self.cooldown_s - self._clock()
            return max(1, math.ceil(remaining)) if remaining > 0 else None
        if self._state == "half_open" and self._probe_claimed:
            return 1  # a probe is running; it takes at most one backend call
        return None

    def _transition(self, to: State, why: str) -> None:
        was, self._state = self._state, to
        level = logging.WARNING if to == "open" else logging.INFO
        log.log(level, "reward model circuit breaker %s -> %s: %s", was, to, why)
        if self._on_transition is not None:
            self._on_transition(was, to)
