"""The benchmark's shared helpers (``bench/``), in-process and fast: /metrics parsing against
the service's own Prometheus text, percentiles against numpy's, targets' PASS/MISS, the plans."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# Appended, not prepended: the bench modules' plain names (plan, stats, metrics) must not shadow
# anything else this test process imports.
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

import metrics
from measurement import Measurement, merged
from plan import FULL, QUICK
from stats import percentile, rounded
from targets import AT_LEAST, AT_MOST, BELOW, target, target_lines

from hero_service.metrics import Metrics


def _service_metrics_text() -> str:
    m = Metrics()
    for size in (3, 5, 8):
        m.batch_size.observe(size)
    m.forward_seconds.observe(0.25)
    m.forward_seconds.observe(0.5)
    m.deduplicated_rollouts.inc(2)
    m.group_store_round_trips.labels(op="join").set(7)
    m.group_store_round_trips.labels(op="claim").set(4)
    return m.render().decode()


def test_metrics_read_the_services_own_prometheus_text() -> None:
    text = _service_metrics_text()
    assert metrics.total(text, "hero_batch_size_sum") == 16
    assert metrics.total(text, "hero_batch_size_count") == 3
    assert metrics.total(text, "hero_model_forward_seconds_sum") == pytest.approx(0.75)
    assert metrics.total(text, "hero_deduplicated_rollouts_total") == 2
    assert metrics.unlabelled(text, "hero_deduplicated_rollouts_total") == 2
    assert metrics.by_label(text, "hero_group_store_round_trips", "op") == {"join": 7.0,
                                                                         "claim": 4.0}
    # Labelled samples sum up; an absent metric reads 0.
    assert metrics.total(text, "hero_group_store_round_trips") == 11
    assert metrics.total(text, "hero_no_such_metric") == 0.0
    assert metrics.unlabelled(text, "hero_no_such_metric") == 0.0


@pytest.mark.parametrize("p", [0, 25, 50, 90, 99, 100])
def test_percentile_is_linear_interpolation_like_numpy(p: float) -> None:
    values = sorted(np.random.default_rng(7).exponential(size=101).tolist())
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    assert percentile([], p) is None
    assert rounded(None) is None and rounded(1.23456, 2) == 1.23


def test_targets_pass_by_their_comparison_and_unmeasured_never_passes() -> None:
    assert target("ratio", 0.95, 0.9, ">= 0.9")["pass"]
    assert not target("ratio", 0.85, 0.9, ">= 0.9", AT_LEAST)["pass"]
    assert target("rss", 99.9, 100.0, "< 100", BELOW)["pass"]
    assert not target("rss", 100.0, 100.0, "< 100", BELOW)["pass"]
    assert target("trips", 3.0, 3.0, "<= 3", AT_MOST)["pass"]
    missing = target("ratio", None, 0.9, ">= 0.9")
    assert not missing["pass"] and missing["measured"] is None
    lines = target_lines([target("a", 1.2, 1.0, ">= 1"), missing], 10, 6)
    assert lines[0] == "targets:"
    assert lines[1].split() == ["PASS", "a", "1.20", "(>=", "1)"]
    assert lines[2].split()[0] == "MISS" and "-" in lines[2].split()


def test_plans_measure_what_the_report_reads() -> None:
    for plan in (FULL, QUICK):
        # The targets compare (a) and (b) at the "many callers" concurrency; the scale section
        # provides C=4 of pattern (a).
        assert plan.callers.many in plan.callers.one_response
        assert plan.callers.many in plan.callers.several_groups
        assert 4 in plan.callers.several_groups
        assert set(plan.core_split.patterns) <= {"a", "b"}
        assert set(plan.core_split.variants) <= {"main", "workers_per_core", "fewer_threads"}
    assert QUICK.with_token_budget(4096).max_batch_tokens == 4096
    assert QUICK.with_token_budget(4096).callers == QUICK.callers


def test_repeated_runs_report_the_median_runs_ratio_and_every_run() -> None:
    runs = []
    for rollouts, ratio in ((300, 0.92), (250, 0.70), (310, 0.95)):  # the second: a slow patch
        run = Measurement("hero_b_c16", "hero-rewards", "1 response per /get_reward", 16,
                          rollouts=rollouts, elapsed_s=8.0)
        run.limit_ratio, run.limit_ref = ratio, rollouts / 8.0 / ratio
        runs.append(run)
    one = merged(runs)
    assert one.limit_ratio == pytest.approx(0.92)
    assert one.rollouts == 860 and one.elapsed_s == pytest.approx(24.0)
    assert [r["ratio_to_limit"] for r in one.runs] == [0.92, 0.70, 0.95]
    two = merged(runs[:2])
    assert two.limit_ratio == pytest.approx(0.81)  # the median of two is their mean
    assert FULL.callers.repeats >= 3
