"""A chunk function for verifier workers in which one response gets stuck where math-verify's
alarm cannot reach it — as in C code that never returns to the interpreter, or a frozen process.
No answer form here does that reliably (math-verify's alarms stop every hostile case in the
corpus), so the stuck call is made by blocking SIGALRM; every other response goes through the real
math-verify. Importable by the worker processes (the fork server inherits pytest's sys.path)."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence

from hero_service.verifiers._math_worker import Outcome, verify_pair
from hero_service.verifiers.progress import NO_PROGRESS, Reporter

STUCK = "\\boxed{this response never finishes}"


def verify_pairs_one_stuck(pairs: Sequence[tuple[str, str]], timeout_s: int,
                           progress: Reporter = NO_PROGRESS) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for index, (reference, response) in enumerate(pairs):
        progress.item(index)
        if response == STUCK:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(3600)
        outcomes.append(verify_pair(reference, response, timeout_s, progress))
    progress.item(len(pairs))
    return outcomes
