"""The running mean of group sigma (sigma-bar in HERO's Eq. 4), kept per training run.

The paper leaves the rule open; this is the public verl HERO implementation's: the first batch
sets sigma-bar to its mean sigma; each later batch is weighted with the current sigma-bar, then
sigma-bar <- momentum * sigma-bar + (1 - momentum) * (batch mean sigma)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import Optional


class RunningSigma:
    def __init__(self, momentum: float = 0.9, value: Optional[float] = None) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError("momentum must be in [0, 1)")
        self.momentum = momentum
        self._value = value
        self._lock = threading.Lock()

    @property
    def value(self) -> Optional[float]:
        """The sigma_ref to send with the next batch (None before the first batch)."""
        return self._value

    def update(self, sigmas: Iterable[Optional[float]]) -> Optional[float]:
        """Fold one batch's group sigmas in; groups without a sigma are skipped."""
        known = [s for s in sigmas if s is not None and math.isfinite(s)]
        if not known:
            return self._value
        batch_mean = math.fsum(known) / len(known)
        with self._lock:
            if self._value is None:
                self._value = batch_mean
            else:
                self._value = self.momentum * self._value + (1.0 - self.momentum) * batch_mean
            return self._value
