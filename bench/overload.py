"""The overload section: a 10x burst against a service with a small ``--max-queued-rollouts``:
its 429s and their Retry-After, the p99 latency of accepted requests, the RSS of the server's
process tree before, at capacity, in the burst and after."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from typing import Any

import psutil
from plan import OverloadPlan
from procs import Server
from stats import percentile
from workload import Workload

OVERLOAD_FACTOR = 10  # callers in the burst over the callers that exactly fill the queue


class RssSampler(threading.Thread):
    """RSS (sum over the server's process tree) and the server's thread count, every 50 ms."""

    def __init__(self, server: Server, period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.period_s = period_s
        self.samples: list[tuple[float, int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                threads = psutil.Process(self.server.pid).num_threads()
            except psutil.Error:
                threads = 0
            self.samples.append((time.perf_counter(), self.server.rss_bytes(), threads))
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def between(self, t0: float, t1: float) -> list[int]:
        return [rss for t, rss, _ in self.samples if t0 <= t <= t1]

    def threads_between(self, t0: float, t1: float) -> list[int]:
        return [n for t, _, n in self.samples if t0 <= t <= t1]


async def overload_burst(server: Server, workload: Workload, plan: OverloadPlan) -> dict[str, Any]:
    """Phases, RSS sampled throughout: idle → AT CAPACITY (capacity / group size callers, so
    exactly --max-queued-rollouts in flight, no 429) → OVERLOAD (10x as many callers, each
    honouring Retry-After like the SDK) → idle. RSS of a busy server swings by the forward
    pass's working set (activations are allocated and freed per batch), so the overload's effect
    is its peak over the at-capacity peak; retained growth is idle after minus idle before."""
    import httpx

    capacity, duration_s, after_s = plan.max_queued_rollouts, plan.burst_s, plan.idle_after_s
    group_size = workload.group_size
    per_capacity = max(1, capacity // group_size)
    callers = OVERLOAD_FACTOR * per_capacity
    stream = workload.group_stream()
    bodies = (json.dumps({"groups": [g.as_dict()]}).encode() for g in stream)
    headers = {"content-type": "application/json"}
    sampler = RssSampler(server)
    limits = httpx.Limits(max_connections=callers + 8, max_keepalive_connections=callers + 8)

    async def phase(n_callers: int, seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {"accepted": [], "429": 0, "with_retry_after": 0, "other": 0}
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            body = next(bodies)
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                r = await http.post("/v1/rewards", content=body, headers=headers)
                if r.status_code == 200:
                    out["accepted"].append(time.perf_counter() - t)
                    body = next(bodies)
                elif r.status_code == 429:
                    out["429"] += 1
                    retry_after = r.headers.get("retry-after")
                    if retry_after is not None:
                        out["with_retry_after"] += 1
                    # Honour Retry-After, as the SDK does (same body: a real retry).
                    await asyncio.sleep(float(retry_after or 1.0))
                else:
                    out["other"] += 1
                    await asyncio.sleep(0.5)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(n_callers)))
        out["t0"], out["t1"] = t0, time.perf_counter()
        return out

    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as http:
        # Warm: one request of exactly --max-queued-rollouts (the largest batch any phase can
        # form), so first-time allocations are not counted as growth.
        big = [next(stream).as_dict() for _ in range(per_capacity)]
        (await http.post("/v1/rewards", json={"groups": big})).raise_for_status()
        sampler.start()
        await asyncio.sleep(1.0)
        t_idle = time.perf_counter()
        at_capacity = await phase(per_capacity, max(1.0, duration_s / 2))
        burst = await phase(callers, duration_s)
        await asyncio.sleep(after_s)
        t_end = time.perf_counter()
        await asyncio.sleep(0.1)
    sampler.stop()
    mb = 1024 * 1024
    idle_before = statistics.median(sampler.between(0, t_idle))
    cap_peak = max(sampler.between(at_capacity["t0"], at_capacity["t1"]))
    burst_peak = max(sampler.between(burst["t0"], burst["t1"]))
    idle_after = statistics.median(sampler.between(burst["t1"] + after_s / 2, t_end))
    lat, cap_lat = sorted(burst["accepted"]), sorted(at_capacity["accepted"])
    threads_before = max(sampler.threads_between(0, t_idle))
    threads_after = max(sampler.threads_between(burst["t1"], t_end))
    burst_s = burst["t1"] - burst["t0"]
    return {
        "max_queued_rollouts": capacity, "factor": OVERLOAD_FACTOR, "callers": callers,
        "rollouts_per_request": group_size, "burst_s": round(burst_s, 3),
        "accepted_requests": len(lat), "rejected_429": burst["429"],
        "rejected_429_with_retry_after": burst["with_retry_after"],
        "other_errors": burst["other"] + at_capacity["other"] + at_capacity["429"],
        "accepted_rollouts_per_s": round(len(lat) * group_size / burst_s, 3),
        "latency_p50_s": _rounded_percentile(lat, 50),
        "latency_p99_s": _rounded_percentile(lat, 99),
        "at_capacity": {
            "callers": per_capacity, "requests": len(cap_lat),
            "rollouts_per_s": round(len(cap_lat) * group_size
                                    / (at_capacity["t1"] - at_capacity["t0"]), 3),
            "latency_p50_s": _rounded_percentile(cap_lat, 50),
            "latency_p99_s": _rounded_percentile(cap_lat, 99),
            "rss_peak_mb": round(cap_peak / mb, 1)},
        "rss_idle_before_mb": round(idle_before / mb, 1),
        "rss_peak_mb": round(burst_peak / mb, 1),
        "rss_idle_after_mb": round(idle_after / mb, 1),
        "rss_growth_over_capacity_peak_mb": round((burst_peak - cap_peak) / mb, 1),
        "rss_retained_mb": round((idle_after - idle_before) / mb, 1),
        "rss_peak_over_idle_mb": round((burst_peak - idle_before) / mb, 1),
        "server_threads_before": threads_before, "server_threads_after": threads_after,
        "rss_samples": len(sampler.samples),
    }


def _rounded_percentile(sorted_values: list[float], p: float) -> float:
    """0.0 without samples: the table prints these figures as numbers whatever happened."""
    return round(percentile(sorted_values, p) or 0.0, 4)
