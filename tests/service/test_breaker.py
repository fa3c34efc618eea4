"""The reward model's circuit breaker on a fake clock: when it opens, what it tells refused callers,
the single half-open probe, and one log line per transition."""

from __future__ import annotations

import logging

import pytest

from hero_service.breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(threshold: int = 1, cooldown_s: float = 5.0):
    clock = FakeClock()
    moves: list[tuple[str, str]] = []
    breaker = CircuitBreaker(threshold, cooldown_s, on_transition=lambda a, b: moves.append((a, b)),
                             clock=clock)
    return breaker, clock, moves


def test_closed_breaker_lets_everything_through():
    breaker, _, moves = make()
    assert breaker.state == "closed"
    assert breaker.refusal() is None and breaker.admit() is None and breaker.may_run()
    breaker.record_success()
    assert moves == []


def test_one_failure_opens_by_default_and_refuses_for_the_cool_down():
    breaker, clock, moves = make(cooldown_s=5.0)
    breaker.record_failure("timed out after 2s")
    assert breaker.state == "open" and moves == [("closed", "open")]
    assert not breaker.may_run()
    assert breaker.refusal() == 5 and breaker.admit() == 5
    clock.now += 3.2
    assert breaker.admit() == 2  # the rest of the cool-down, rounded up
    assert breaker.retry_after_s() == 2
    assert breaker.last_cause == "timed out after 2s"


def test_threshold_counts_consecutive_failures_only():
    breaker, _, _ = make(threshold=3)
    breaker.record_failure("a")
    breaker.record_failure("b")
    breaker.record_success()  # the backend answered: the count starts again
    breaker.record_failure("c")
    breaker.record_failure("d")
    assert breaker.state == "closed"
    breaker.record_failure("e")
    assert breaker.state == "open"


def test_after_the_cool_down_one_probe_goes_through_and_success_closes():
    breaker, clock, moves = make(cooldown_s=5.0)
    breaker.record_failure("down")
    clock.now += 5.0
    assert breaker.refusal() is None  # an early check claims nothing
    assert breaker.state == "open"
    assert breaker.admit() is None  # this caller is the probe
    assert breaker.state == "half_open" and breaker.may_run()
    assert breaker.admit() == 1 and breaker.refusal() == 1  # others wait for the probe
    breaker.record_success()
    assert breaker.state == "closed" and breaker.admit() is None
    assert moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_failed_probe_reopens_for_a_fresh_cool_down():
    breaker, clock, moves = make(threshold=3, cooldown_s=5.0)
    for cause in "abc":
        breaker.record_failure(cause)
    clock.now += 6.0
    assert breaker.admit() is None
    breaker.record_failure("still down")  # one failure suffices while probing
    assert breaker.state == "open"
    assert breaker.admit() == 5
    assert moves[-1] == ("half_open", "open")


def test_each_transition_is_one_log_line(caplog):
    breaker, clock, _ = make(cooldown_s=1.0)
    with caplog.at_level(logging.INFO, logger="hero_service.breaker"):
        breaker.record_failure("remote reward model at http://rm/classify timed out after 2s")
        breaker.record_failure("again")  # already open: no new line
        clock.now += 1.0
        breaker.admit()
        breaker.record_success()
        breaker.record_success()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("reward model circuit breaker closed -> open")
    assert "timed out after 2s" in lines[0] and caplog.records[0].levelno == logging.WARNING
    assert lines[1].startswith("reward model circuit breaker open -> half_open")
    assert lines[2].startswith("reward model circuit breaker half_open -> closed")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(0)
    with pytest.raises(ValueError, match="cooldown_s"):
        CircuitBreaker(1, 0)
