"""One measurement of one system at one concurrency, and its JSON; the tally every load run
keeps (also the group-store benchmark's rounds)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from stats import percentile, rounded

# Server figures that add up over repeated runs (the others are averaged).
SUMMED_SERVER_FIGURES = {"server_cpu_s", "client_cpu_s", "forward_batches",
                         "deduplicated_rollouts", "loop_cpu_s", "other_threads_cpu_s",
                         "workers_cpu_s"}
# Where a request's CPU goes (Measurement.cpu_ms_per_request): the service's event-loop thread,
# its verifier worker processes, its other threads (the RM forward, tokenization) and the
# benchmark's own client, which shares the machine's cores.
CPU_PARTS = {"event_loop": "loop_cpu_s", "verifier_workers": "workers_cpu_s",
             "other_threads": "other_threads_cpu_s", "client": "client_cpu_s"}


def latency_figures(latencies: Iterable[float]) -> dict[str, Optional[float]]:
    """The latency percentiles every benchmark reports, under the names its JSON uses."""
    ordered = sorted(latencies)
    return {"latency_p50_s": rounded(percentile(ordered, 50)),
            "latency_p99_s": rounded(percentile(ordered, 99))}


# Keyword-only: a record built on it can then add fields without defaults (its own identity).
@dataclass(kw_only=True)
class Tally:
    """What a load run counts: rollouts answered, the wall time they took, failed requests and
    each request's latency."""

    rollouts: int = 0
    elapsed_s: float = 0.0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.rollouts / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class Measurement(Tally):
    key: str          # unique per measured configuration, e.g. "hero_b_c16"
    system: str
    pattern: str
    concurrency: int
    requests: int = 0
    correct: int = 0
    t_start: float = 0.0
    t_end: float = 0.0
    server: dict[str, float] = field(default_factory=dict)
    limit_ratio: Optional[float] = None  # rate over the limit probed around it
    limit_ref: Optional[float] = None    # that limit
    loadavg: float = 0.0
    workload: str = "1x"
    runs: list[dict[str, Any]] = field(default_factory=list)  # when measured more than once

    def cpu_ms_per_request(self) -> dict[str, float]:
        """CPU-ms per answered request by part (:data:`CPU_PARTS`); empty when not measured.
        The host's own cost is the event loop and the verifier workers."""
        if not self.requests or "loop_cpu_s" not in self.server:
            return {}
        return {part: 1000.0 * self.server.get(key, 0.0) / self.requests
                for part, key in CPU_PARTS.items()}

    def as_json(self) -> dict[str, Any]:
        return {
            "system": self.system, "pattern": self.pattern, "concurrency": self.concurrency,
            "workload": self.workload,
            "rollouts_per_s": round(self.rate, 3), "rollouts": self.rollouts,
            "requests": self.requests, "elapsed_s": round(self.elapsed_s, 3),
            "correct_fraction": round(self.correct / self.rollouts, 4) if self.rollouts else 0.0,
            "errors": self.errors,
            **latency_figures(self.latencies),
            "limit_ref_rollouts_per_s": rounded(self.limit_ref),
            "ratio_to_limit": rounded(self.limit_ratio),
            "server": {k: round(v, 4) for k, v in self.server.items()},
            "cpu_ms_per_request": {k: round(v, 3) for k, v in self.cpu_ms_per_request().items()},
            "loadavg_1m": round(self.loadavg, 2),
            "runs": self.runs,
        }


def merged(runs: list[Measurement]) -> Measurement:
    """One measurement from repeated runs: totals over all runs; the ratio to the limit is the
    median of each run's own (bracketed) ratio (one run on a machine that slowed between its
    probes moves a mean of three by a third of its error, a median not at all)."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    out = Measurement(first.key, first.system, first.pattern, first.concurrency,
                      workload=first.workload, t_start=first.t_start, t_end=runs[-1].t_end)
    for run in runs:
        out.rollouts += run.rollouts
        out.requests += run.requests
        out.elapsed_s += run.elapsed_s
        out.correct += run.correct
        out.errors += run.errors
        out.latencies += run.latencies
    keys = {k for run in runs for k in run.server}
    out.server = {k: (sum if k in SUMMED_SERVER_FIGURES else statistics.mean)(
        [run.server[k] for run in runs if k in run.server]) for k in keys}
    ratios = [run.limit_ratio for run in runs if run.limit_ratio is not None]
    refs = [run.limit_ref for run in runs if run.limit_ref is not None]
    out.limit_ratio = statistics.median(ratios) if ratios else None
    out.limit_ref = statistics.median(refs) if refs else None
    out.loadavg = statistics.mean(run.loadavg for run in runs)
    out.runs = [{"rollouts_per_s": round(run.rate, 3), "ratio_to_limit": rounded(run.limit_ratio),
                 "limit_ref_rollouts_per_s": rounded(run.limit_ref)} for run in runs]
    return out
