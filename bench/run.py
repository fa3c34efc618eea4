#!/usr/bin/env python
"""hero-rewards benchmark: one command, one run, every figure a ratio measured side by side.

    .venv/bin/python bench/run.py            # full run (< 10 min on a 2-core CPU)
    .venv/bin/python bench/run.py --quick    # ~1-minute smoke version

Measures, on workloads derived from the real dev rollouts (see ``workload.py``):

* limit        bare RM forward on the same texts: pre-tokenized with the backend's ``encode``,
               length-sorted batches packed within the service's token budget, ``forward`` called
               directly (no HTTP, no verifier). Probed between every two measurements, so each
               measurement is compared with the limit measured right before and after it.
* hero-rewards end to end over HTTP with the Python client against real service processes:
               (a) several groups per request, C concurrent callers; (b) OpenRLHF's pattern, one
               response per ``/get_reward`` request, C concurrent callers.
* naive        ``naive_server.py``: one request per response, RM batch of one and math-verify in
               the request handler (OpenRLHF's ``serve_rm.py`` pattern), same callers as (b).
* TRL-style    ``trl.rewards.accuracy_reward`` sequentially in the caller, then the RM over the
               same texts in unsorted padded batches of 8, in dataset order.
* verifier     ``MathVerifier`` pool (one worker per core) vs ``verify_chunk`` in one process.
* scale        (a) at 1x, 4x and 16x workloads.
* core split   verifier workers vs torch intra-op threads on this machine's cores.
* overload     a 10x burst against a service with a small ``--max-queued-rollouts``: 429s and
               their Retry-After, p99 latency of accepted requests, RSS of the server tree.

Prints a table with PASS/MISS per target, writes ``bench/results/latest.json`` and
``bench/results/throughput.png``. Every server runs on 127.0.0.1 in its own session and is
stopped at the end, also on error or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from procs import Server, hero_server, naive_server  # noqa: E402
from workload import BenchGroup, Workload, load_rows  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class Plan:
    name: str
    arm_s: float                 # callers stop issuing requests after this long (then drain)
    probe_s: float               # a limit probe lasts at least this long (and >= one batch)
    probe_every: int             # a limit probe after every N measurements
    groups_per_request: int      # pattern (a)
    concurrency: tuple[int, ...]           # pattern (a)
    one_response_concurrency: tuple[int, ...]  # pattern (b) and the naive server
    scale_s: float
    verifier_scale: int          # which workload the verifier pool measurement runs
    verifier_rounds: int
    verifier_sweep: tuple[int, ...]  # chunk sizes fed to the same pool, as evidence
    overload_s: float
    variant_patterns: tuple[str, ...]  # which patterns the core-split variants run
    variant_a_concurrency: int   # callers of the variants' pattern (a) (b uses ``callers``)
    forward_sweep: tuple[int, ...]  # bare-forward batch sizes measured besides the limit
    forward_sweep_rollouts: int
    forward_sweep_rounds: int
    variant_names: tuple[str, ...]  # of "main", "workers_per_core", "fewer_threads"
    max_batch_tokens: int
    callers: int                 # the "many concurrent callers" of the targets
    repeats: int                 # how many times the target comparisons are measured
    overload_queue: int          # --max-queued-rollouts of the overload server


FULL = Plan("full", arm_s=8.0, probe_s=3.0, probe_every=1, groups_per_request=4,
            concurrency=(1, 4, 16), one_response_concurrency=(1, 4, 16), scale_s=10.0,
            verifier_scale=4, verifier_rounds=3, verifier_sweep=(8, 32), overload_s=10.0,
            variant_patterns=("a", "b"), variant_a_concurrency=4, forward_sweep=(8, 32, 128),
            forward_sweep_rollouts=128, forward_sweep_rounds=1,
            variant_names=("main", "workers_per_core", "fewer_threads"),
            max_batch_tokens=0, callers=16, repeats=2,
            overload_queue=64)
# The smoke version: the same sections with tiny windows, 8 callers, a 2048-token budget,
# two core-split variants.
QUICK = Plan("quick", arm_s=1.5, probe_s=1.0, probe_every=5, groups_per_request=1,
             concurrency=(1, 4, 8), one_response_concurrency=(8,), scale_s=1.5,
             verifier_scale=1, verifier_rounds=1, verifier_sweep=(32,), overload_s=2.0,
             variant_patterns=("b",), variant_a_concurrency=4, forward_sweep=(8, 16),
             forward_sweep_rollouts=16, forward_sweep_rounds=1,
             variant_names=("main", "fewer_threads"), max_batch_tokens=2048, callers=8, repeats=1,
             overload_queue=16)
OVERLOAD_FACTOR = 10


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Arm:
    key: str
    system: str
    pattern: str
    concurrency: int
    rollouts: int = 0
    requests: int = 0
    elapsed_s: float = 0.0
    correct: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    t_start: float = 0.0
    t_end: float = 0.0
    server: dict[str, float] = field(default_factory=dict)
    limit_ratio: Optional[float] = None
    limit_ref: Optional[float] = None
    loadavg: float = 0.0
    workload: str = "1x"
    runs: list[dict[str, Any]] = field(default_factory=list)  # when measured more than once

    @property
    def rate(self) -> float:
        return self.rollouts / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "system": self.system, "pattern": self.pattern, "concurrency": self.concurrency,
            "workload": self.workload,
            "rollouts_per_s": round(self.rate, 3), "rollouts": self.rollouts,
            "requests": self.requests, "elapsed_s": round(self.elapsed_s, 3),
            "correct_fraction": round(self.correct / self.rollouts, 4) if self.rollouts else 0.0,
            "errors": self.errors,
            "latency_p50_s": round(_pct(lat, 50), 4) if lat else None,
            "latency_p99_s": round(_pct(lat, 99), 4) if lat else None,
            "limit_ref_rollouts_per_s": _r(self.limit_ref), "ratio_to_limit": _r(self.limit_ratio),
            "server": {k: round(v, 4) for k, v in self.server.items()},
            "loadavg_1m": round(self.loadavg, 2),
            "runs": self.runs,
        }


def merge_runs(arms: list[Arm]) -> Arm:
    """One arm from repeated runs: totals over all runs; the ratio to the limit is the mean of
    each run's own (bracketed) ratio."""
    if len(arms) == 1:
        return arms[0]
    first = arms[0]
    merged = Arm(first.key, first.system, first.pattern, first.concurrency,
                 workload=first.workload, t_start=first.t_start, t_end=arms[-1].t_end)
    for a in arms:
        merged.rollouts += a.rollouts
        merged.requests += a.requests
        merged.elapsed_s += a.elapsed_s
        merged.correct += a.correct
        merged.errors += a.errors
        merged.latencies += a.latencies
    keys = {k for a in arms for k in a.server}
    summed = {"server_cpu_s", "client_cpu_s", "forward_batches", "deduplicated_rollouts"}
    merged.server = {k: (sum if k in summed else statistics.mean)(
        [a.server[k] for a in arms if k in a.server]) for k in keys}
    ratios = [a.limit_ratio for a in arms if a.limit_ratio is not None]
    refs = [a.limit_ref for a in arms if a.limit_ref is not None]
    merged.limit_ratio = statistics.mean(ratios) if ratios else None
    merged.limit_ref = statistics.mean(refs) if refs else None
    merged.loadavg = statistics.mean(a.loadavg for a in arms)
    merged.runs = [{"rollouts_per_s": round(a.rate, 3), "ratio_to_limit": _r(a.limit_ratio),
                    "limit_ref_rollouts_per_s": _r(a.limit_ref)} for a in arms]
    return merged


def _r(x: Optional[float], nd: int = 4) -> Optional[float]:
    return None if x is None else round(x, nd)


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------
# The limit: bare forward on the same texts, ideal batches


class Limit:
    def __init__(self, model: Any, workload: Workload, max_batch_tokens: int) -> None:
        from hero_service.batching import pack_batches
        from hero_service.reward_models import ScoringItem

        self.model = model
        items = [ScoringItem(g.prompt, r, g.reference)
                 for g in workload.groups(0) for r in g.responses]
        encoded = model.encode(items)
        self.n_tokens = [e.n_tokens for e in encoded]
        # The service's own packing rule (length-sorted, padded size within the budget).
        wrapped = [types.SimpleNamespace(encoded=e) for e in encoded]
        self.batches = [[w.encoded for w in b] for b in pack_batches(wrapped, max_batch_tokens)]
        self.probes: list[dict[str, float]] = []
        self._next = 0

    def warm_up(self) -> None:
        self.model.forward(self.batches[0][:8])

    def sweep(self, sizes: tuple[int, ...], n_rollouts: int, rounds: int = 2) -> dict[str, float]:
        """Bare forward at fixed batch sizes (interleaved, ``rounds`` times): where this
        device's per-rollout cost is lowest, which the token budget decides."""
        flat = [e for b in self.batches for e in b][:n_rollouts]
        rates: dict[int, list[float]] = {s: [] for s in sizes}
        for _ in range(rounds):
            for size in sizes:
                t0 = time.perf_counter()
                for i in range(0, len(flat), size):
                    self.model.forward(flat[i:i + size])
                rates[size].append(len(flat) / (time.perf_counter() - t0))
        return {str(s): round(statistics.mean(v), 3) for s, v in rates.items()}

    def probe(self, min_s: float) -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        while True:
            batch = self.batches[self._next % len(self.batches)]
            self._next += 1
            self.model.forward(batch)
            n += len(batch)
            if time.perf_counter() - t0 >= min_s:
                break
        t1 = time.perf_counter()
        rate = n / (t1 - t0)
        self.probes.append({"t": (t0 + t1) / 2, "t_start": t0, "t_end": t1,
                            "rollouts_per_s": rate, "rollouts": n,
                            "cpu_s": time.process_time() - c0,
                            "loadavg_1m": os.getloadavg()[0]})
        return rate


# ---------------------------------------------------------------------------------------------
# Closed-loop callers


async def closed_loop(arm: Arm, concurrency: int, jobs: Iterator[Any],
                      send: Callable[[Any], Awaitable[tuple[int, int]]], duration_s: float,
                      max_errors: int = 5) -> Arm:
    """``concurrency`` callers, each sending its next job as soon as the previous one is
    answered, until ``duration_s`` has passed (in-flight requests then finish and count).
    ``send`` returns (rollouts, correct)."""
    deadline = time.perf_counter() + duration_s

    async def caller() -> None:
        while time.perf_counter() < deadline and arm.errors < max_errors:
            job = next(jobs)
            t = time.perf_counter()
            try:
                n, ok = await send(job)
            except Exception as exc:  # noqa: BLE001 - counted and shown; the arm is then invalid
                arm.errors += 1
                log(f"{arm.key}: request failed: {type(exc).__name__}: {exc}")
                continue
            arm.latencies.append(time.perf_counter() - t)
            arm.rollouts += n
            arm.correct += ok
            arm.requests += 1

    arm.t_start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    arm.t_end = time.perf_counter()
    arm.elapsed_s = arm.t_end - arm.t_start
    arm.loadavg = os.getloadavg()[0]
    return arm


_METRICS = {
    "batch_size_sum": "hero_batch_size_sum",
    "batch_size_count": "hero_batch_size_count",
    "forward_s": "hero_model_forward_seconds_sum",
    "deduplicated": "hero_deduplicated_rollouts_total",
}


async def scrape(http: Any, url: str) -> dict[str, float]:
    text = (await http.get(url + "/metrics")).text
    out = {}
    for key, name in _METRICS.items():
        total = 0.0
        for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M):
            total += float(m.group(1))
        out[key] = total
    return out


async def measure_hero(arm: Arm, server: Server, jobs: Iterator[Any],
                       send: Callable[[Any], Awaitable[tuple[int, int]]], duration_s: float,
                       http: Any) -> Arm:
    before = await scrape(http, server.url)
    cpu0, client0 = server.cpu_seconds(), time.process_time()
    await closed_loop(arm, arm.concurrency, jobs, send, duration_s)
    cpu1, client1 = server.cpu_seconds(), time.process_time()
    after = await scrape(http, server.url)
    d = {k: after[k] - before[k] for k in before}
    batches = d["batch_size_count"]
    arm.server = {
        "mean_batch": d["batch_size_sum"] / batches if batches else 0.0,
        "forward_batches": batches,
        "rm_busy_fraction": d["forward_s"] / arm.elapsed_s if arm.elapsed_s else 0.0,
        "deduplicated_rollouts": d["deduplicated"],
        "server_cpu_s": cpu1 - cpu0,
        "client_cpu_s": client1 - client0,
    }
    return arm


async def measure_naive(arm: Arm, server: Server, jobs: Iterator[Any],
                        send: Callable[[Any], Awaitable[tuple[int, int]]],
                        duration_s: float) -> Arm:
    cpu0, client0 = server.cpu_seconds(), time.process_time()
    await closed_loop(arm, arm.concurrency, jobs, send, duration_s)
    arm.server = {"mean_batch": 1.0, "server_cpu_s": server.cpu_seconds() - cpu0,
                  "client_cpu_s": time.process_time() - client0}
    return arm


def several_groups_sender(client: Any) -> Callable[[list[BenchGroup]], Awaitable[tuple[int, int]]]:
    async def send(groups: list[BenchGroup]) -> tuple[int, int]:
        result = await client.score([g.as_dict() for g in groups])
        n = sum(len(g.rewards) for g in result.groups)
        return n, sum(sum(g.verified) for g in result.groups)
    return send


def one_response_sender(client: Any) -> Callable[[tuple], Awaitable[tuple[int, int]]]:
    async def send(item: tuple) -> tuple[int, int]:
        prompt, response, reference, _ = item
        result = await client.get_reward([prompt + response], prompts=[prompt],
                                         labels=[reference])
        return 1, int(result.extra_logs["verified"][0] > 0.5)
    return send


# ---------------------------------------------------------------------------------------------
# TRL-style: sequential verifier in the caller, then RM in unsorted batches of 8


def trl_style(model: Any, workload: Workload, duration_s: float) -> Arm:
    from hero_service.reward_models import ScoringItem
    from trl.rewards import accuracy_reward

    arm = Arm("trl", "TRL-style in-process", "accuracy_reward + RM batches of 8", 1)
    stream = workload.group_stream()
    arm.t_start = time.perf_counter()
    while time.perf_counter() - arm.t_start < duration_s:
        group = next(stream)
        completions = [[{"role": "assistant", "content": r}] for r in group.responses]
        ref = group.reference.strip()
        solution = ref if ("$" in ref or "\\boxed" in ref) else f"${ref}$"
        t = time.perf_counter()
        rewards = accuracy_reward(completions, [solution] * len(completions))
        encoded = model.encode([ScoringItem(group.prompt, r, group.reference)
                                for r in group.responses])
        for i in range(0, len(encoded), 8):
            model.forward(encoded[i:i + 8])
        arm.latencies.append(time.perf_counter() - t)
        arm.rollouts += len(group.responses)
        arm.correct += sum(1 for r in rewards if r == 1.0)
        arm.requests += 1
    arm.t_end = time.perf_counter()
    arm.elapsed_s = arm.t_end - arm.t_start
    arm.loadavg = os.getloadavg()[0]
    return arm


# ---------------------------------------------------------------------------------------------
# Verifier pool vs one process x cores


def _descendants() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _cpu_of(pids: set[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _chunks(groups: list[BenchGroup], size: int) -> list[tuple[str, list[str]]]:
    """Consecutive responses cut into chunks of ``size`` that never mix references (the 4x
    workload's copies of one original group are consecutive and share their reference)."""
    out: list[tuple[str, list[str]]] = []
    for g in groups:
        if out and out[-1][0] == g.reference and len(out[-1][1]) < size:
            room = size - len(out[-1][1])
            out[-1][1].extend(g.responses[:room])
            rest = list(g.responses[room:])
        else:
            rest = list(g.responses)
        for i in range(0, len(rest), size):
            out.append((g.reference, rest[i:i + size]))
    return out


async def verifier_pool(workload: Workload, rounds: int,
                        sweep: tuple[int, ...]) -> dict[str, Any]:
    """The service's verifier as shipped (``MathVerifier``, one worker per core, every group of
    the workload verified concurrently as concurrent requests would) against ``verify_chunk``
    called sequentially in this process, interleaved round by round. ``sweep``: a bare
    ``ProcessWorkerPool`` fed same-reference chunks of fixed sizes (what the pool itself can do
    at that task size; not the service's own chunking)."""
    from hero_service.config import Settings
    from hero_service.verifiers import math as math_verifier
    from hero_service.verifiers import MathVerifier
    from hero_service.verifiers._math_worker import verify_chunk
    from hero_service.verifiers.pool import ProcessWorkerPool

    s = Settings()
    cores = len(os.sched_getaffinity(0))
    groups = workload.groups(0)
    n = sum(len(g.responses) for g in groups)
    existing = _descendants()
    verifier = MathVerifier(workers=cores, timeout_s=s.verifier_timeout_s,
                            max_tasks=s.verifier_max_tasks, memory_mb=s.verifier_memory_mb)
    await verifier.start()
    pool = ProcessWorkerPool(cores, s.verifier_max_tasks, s.verifier_memory_mb)
    runs: dict[str, list[dict[str, float]]] = {"single": [], "service": []}
    for size in sweep:
        runs[f"chunk_{size}"] = []
    correct = 0
    try:
        warm = workload.groups(1)[:50]  # imports, first parses, the reference caches
        for g in warm:
            verify_chunk(g.reference, list(g.responses), s.verifier_timeout_s)
        await asyncio.gather(*(verifier.verify(g.reference, list(g.responses)) for g in warm))
        await asyncio.gather(*(pool.run(verify_chunk, g.reference, list(g.responses),
                                        s.verifier_timeout_s, timeout_s=60) for g in warm))
        workers = _descendants() - existing

        def record(name: str, t0: float, cpu: float) -> None:
            wall = time.perf_counter() - t0
            runs[name].append({"per_s": n / wall, "wall_s": wall, "cpu_s": cpu})

        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            for g in groups:
                verify_chunk(g.reference, list(g.responses), s.verifier_timeout_s)
            record("single", t0, time.process_time() - c0)

            workers |= _descendants() - existing
            w0, t0 = _cpu_of(workers), time.perf_counter()
            verdicts = await asyncio.gather(
                *(verifier.verify(g.reference, list(g.responses)) for g in groups))
            record("service", t0, _cpu_of(workers) - w0)
            correct = sum(v.verified for vs in verdicts for v in vs)

            for size in sweep:
                tasks = _chunks(groups, size)
                workers |= _descendants() - existing
                w0, t0 = _cpu_of(workers), time.perf_counter()
                await asyncio.gather(*(pool.run(verify_chunk, ref, rs, s.verifier_timeout_s,
                                                timeout_s=60) for ref, rs in tasks))
                record(f"chunk_{size}", t0, _cpu_of(workers) - w0)
    finally:
        pool.close()
        await verifier.close()

    def summary(name: str) -> dict[str, float]:
        rs = runs[name]
        wall = sum(r["wall_s"] for r in rs)
        cpu = sum(r["cpu_s"] for r in rs)
        return {"responses_per_s": round(n * len(rs) / wall, 2),
                "runs": [round(r["per_s"], 1) for r in rs],
                "cpu_s_per_1k": round(1000 * cpu / (n * len(rs)), 4),
                "cores_busy": round(cpu / wall, 3)}

    single, service = summary("single"), summary("service")
    out = {"workload": workload.name, "responses": n, "cores": cores, "workers": cores,
           "rounds": rounds,
           "service_max_chunk": getattr(math_verifier, "MAX_CHUNK", None),
           "single_responses_per_s": single["responses_per_s"],
           "pool_responses_per_s": service["responses_per_s"],
           "ratio_pool_to_single_x_cores": round(
               service["responses_per_s"] / (single["responses_per_s"] * cores), 4),
           "single": single, "pool": service, "correct_fraction": round(correct / n, 4),
           "sweep": {}}
    for size in sweep:
        x = summary(f"chunk_{size}")
        x["ratio_to_single_x_cores"] = round(
            x["responses_per_s"] / (single["responses_per_s"] * cores), 4)
        out["sweep"][str(size)] = x
    return out


# ---------------------------------------------------------------------------------------------
# Overload burst


class RssSampler(threading.Thread):
    """RSS (sum over the server's process tree) and the server's thread count, every 50 ms."""

    def __init__(self, server: Server, period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.period_s = period_s
        self.samples: list[tuple[float, int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

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


async def overload(server: Server, workload: Workload, capacity: int, duration_s: float,
                   after_s: float) -> dict[str, Any]:
    """Phases, RSS sampled throughout: idle → AT CAPACITY (capacity / group size callers, so
    exactly --max-queued-rollouts in flight, no 429) → OVERLOAD (10x as many callers, each
    honouring Retry-After like the SDK) → idle. RSS of a busy server swings by the forward
    pass's working set (activations are allocated and freed per batch), so the overload's effect
    is its peak over the at-capacity peak; retained growth is idle after minus idle before."""
    import httpx

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
        "latency_p50_s": round(_pct(lat, 50), 4), "latency_p99_s": round(_pct(lat, 99), 4),
        "at_capacity": {
            "callers": per_capacity, "requests": len(cap_lat),
            "rollouts_per_s": round(len(cap_lat) * group_size
                                    / (at_capacity["t1"] - at_capacity["t0"]), 3),
            "latency_p50_s": round(_pct(cap_lat, 50), 4),
            "latency_p99_s": round(_pct(cap_lat, 99), 4),
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


# ---------------------------------------------------------------------------------------------
# Orchestration


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.results_dir = Path(args.results_dir)
        self.rows = load_rows(Path(args.data) if args.data else None)
        self.workloads = {s: Workload(self.rows, s) for s in (1, 4, 16)}
        self.servers: dict[str, Server] = {}
        self.arms: list[Arm] = []
        self.since_probe = 0
        self.limit: Optional[Limit] = None
        self.forward_sweep: dict[str, float] = {}
        self.variant_patterns_run: tuple[str, ...] = plan.variant_patterns

    # -- servers ---------------------------------------------------------------------------

    def start_servers(self) -> None:
        a, p = self.args, self.plan
        logs = self.results_dir / "logs"
        common = dict(reward_model=a.reward_model, device=a.device,
                      max_batch_tokens=p.max_batch_tokens)
        self.servers["hero"] = hero_server("hero", logs, verifier_workers=a.verifier_workers,
                                           **common)
        if not a.no_variants:
            for name, workers, threads in self.variants():
                if name == self.main_variant:
                    continue
                env = {"OMP_NUM_THREADS": str(threads)} if threads else None
                self.servers[name] = hero_server(name, logs, verifier_workers=workers,
                                                 env=env, **common)
        self.servers["overload"] = hero_server(
            "overload", logs, verifier_workers=a.verifier_workers,
            extra=["--max-queued-rollouts", str(p.overload_queue)], **common)
        self.servers["naive"] = naive_server(logs, reward_model=a.reward_model, device=a.device)
        for s in self.servers.values():
            s.start()

    def wait_servers(self) -> None:
        for s in self.servers.values():
            s.wait_ready()
        log("servers ready: " + ", ".join(f"{n}@{s.port}" for n, s in self.servers.items()))

    def stop_servers(self) -> None:
        for s in self.servers.values():
            s.request_stop()
        for s in self.servers.values():
            try:
                s.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                log(f"stopping {s.name}: {exc}")

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0))

    @property
    def main_variant(self) -> str:
        return f"w{self.args.verifier_workers}_t{torch_threads()}"

    def variants(self) -> list[tuple[str, int, int]]:
        """(name, verifier workers, torch threads; 0 = torch's default)."""
        c, t = self.cores, torch_threads()
        out = {"main": (f"w{self.args.verifier_workers}_t{t}", self.args.verifier_workers, 0),
               "workers_per_core": (f"w{c}_t{t}", c, 0),
               "fewer_threads": (f"w1_t{max(1, t - 1)}", 1, max(1, t - 1))}
        seen, unique = set(), []
        for v in (out[name] for name in self.plan.variant_names):
            if v[0] not in seen:
                seen.add(v[0])
                unique.append(v)
        return unique

    def server_for_variant(self, name: str) -> Server:
        return self.servers["hero" if name == self.main_variant else name]

    # -- schedule --------------------------------------------------------------------------

    def maybe_probe(self, force: bool = False) -> None:
        self.since_probe += 1
        if force or self.since_probe >= self.plan.probe_every:
            assert self.limit is not None
            rate = self.limit.probe(self.plan.probe_s)
            log(f"  limit probe: {rate:.1f} rollouts/s")
            self.since_probe = 0

    async def run_arm(self, coro: Awaitable[Arm]) -> Arm:
        arm = await coro
        self.arms.append(arm)
        extra = ""
        if arm.server.get("mean_batch"):
            extra = (f", mean batch {arm.server['mean_batch']:.1f}"
                     + (f", RM busy {arm.server['rm_busy_fraction']:.0%}"
                        if "rm_busy_fraction" in arm.server else ""))
        log(f"  {arm.key}: {arm.rate:.1f} rollouts/s ({arm.rollouts} in {arm.elapsed_s:.1f}s"
            f"{extra}{', ERRORS %d' % arm.errors if arm.errors else ''})")
        self.maybe_probe()
        return arm

    async def run(self) -> dict[str, Any]:
        from hero_client import AsyncHeroClient
        import httpx
        from hero_service.reward_models import load_reward_model

        a, p = self.args, self.plan
        started = time.perf_counter()
        load0 = os.getloadavg()[0]
        self.start_servers()
        log(f"{p.name} run: started {len(self.servers)} servers: {', '.join(self.servers)}")
        # The model loads while the servers start; nothing is measured until all are ready.
        model = load_reward_model(a.reward_model, device=a.device)
        w1 = self.workloads[1]
        self.limit = Limit(model, w1, p.max_batch_tokens)
        self.wait_servers()
        self.limit.warm_up()
        log(f"limit: {len(self.limit.batches)} batches, sizes "
            f"{sorted({len(b) for b in self.limit.batches})}, tokens/rollout "
            f"{statistics.mean(self.limit.n_tokens):.1f}")

        # Verifier pool first: the servers are idle, nothing else runs.
        log("verifier pool vs one process")
        verifier = await verifier_pool(self.workloads[p.verifier_scale], p.verifier_rounds,
                                       p.verifier_sweep)
        log("bare forward by batch size")
        self.forward_sweep = self.limit.sweep(p.forward_sweep, p.forward_sweep_rollouts,
                                              p.forward_sweep_rounds)
        log(f"  {self.forward_sweep}")
        log(f"  single {verifier['single_responses_per_s']}/s, pool "
            f"{verifier['pool_responses_per_s']}/s, ratio "
            f"{verifier['ratio_pool_to_single_x_cores']}")

        clients: list[Any] = []

        def client(url: str) -> Any:
            c = AsyncHeroClient(url, timeout=600.0, max_concurrency=64)
            clients.append(c)
            return c

        http = httpx.AsyncClient(timeout=30)
        try:
            # Warm every hero server (first forward, verifier workers) off the clock.
            for name, s in self.servers.items():
                c = client(s.url)
                if name == "naive":
                    await one_response_sender(c)(next(w1.single_stream()))
                    continue
                await several_groups_sender(c)(w1.groups(99)[:1])
                await one_response_sender(c)(next(w1.single_stream()))

            hero = self.servers["hero"]
            hc, nc = client(hero.url), client(self.servers["naive"].url)
            gpr = p.groups_per_request

            async def one_response(c: int) -> None:
                await self.run_arm(measure_hero(
                    Arm(f"hero_b_c{c}", "hero-rewards", "1 response per /get_reward", c),
                    hero, w1.single_stream(), one_response_sender(hc), p.arm_s, http))

            async def naive(c: int) -> None:
                await self.run_arm(measure_naive(
                    Arm(f"naive_c{c}", "naive per-sample server", "1 response per request", c),
                    self.servers["naive"], w1.single_stream(), one_response_sender(nc),
                    p.arm_s))

            async def trl() -> None:
                arm = trl_style(model, w1, p.arm_s)
                self.arms.append(arm)
                log(f"  trl: {arm.rate:.1f} rollouts/s ({arm.rollouts} in {arm.elapsed_s:.1f}s)")
                self.maybe_probe()

            async def several(c: int) -> None:
                await self.run_arm(measure_hero(
                    Arm(f"hero_a_c{c}", "hero-rewards", f"{gpr} groups x 8 per request", c),
                    hero, w1.request_stream(gpr), several_groups_sender(hc), p.arm_s, http))

            self.maybe_probe(force=True)
            for c in p.concurrency:
                if c == 4:
                    continue  # measured with the scale runs below, side by side with 4x/16x
                await several(c)
            for c in p.one_response_concurrency:
                await one_response(c)
            for c in p.one_response_concurrency:
                await naive(c)
            await trl()
            # The target comparisons again, in reverse order, so drift over the run averages out
            # (each run has its own limit probes; the reported ratio is the mean).
            for _ in range(p.repeats - 1):
                await trl()
                await naive(p.callers)
                await one_response(p.callers)
                await several(p.callers)

            # Scale: (a) with 4 callers at 1x, 4x, 16x, back to back.
            for scale in (1, 4, 16):
                wl = self.workloads[scale]
                arm = Arm(f"hero_a_c4" if scale == 1 else f"scale_{scale}x", "hero-rewards",
                          f"{gpr} groups x {wl.group_size} per request", 4, workload=wl.name)
                await self.run_arm(measure_hero(
                    arm, hero, wl.request_stream(gpr), several_groups_sender(hc),
                    p.scale_s if scale > 1 else p.arm_s, http))

            # Core split: verifier workers vs torch threads. On a machine so loaded that the run
            # is already long, only the cheap pattern (b) runs, to stay within the time bound.
            patterns = p.variant_patterns
            if time.perf_counter() - started > 0.6 * a.budget_s:
                patterns = tuple(x for x in patterns if x == "b") or patterns[:1]
                log(f"  slow machine: core split runs pattern(s) {patterns} only")
            self.variant_patterns_run = patterns
            if not a.no_variants:
                for pattern in patterns:
                    for name, workers, threads in self.variants():
                        s = self.server_for_variant(name)
                        vc = client(s.url)
                        if pattern == "a":
                            arm = Arm(f"split_{name}_a", f"hero-rewards {name}",
                                      f"{gpr} groups x 8 per request", p.variant_a_concurrency)
                            coro = measure_hero(arm, s, w1.request_stream(gpr),
                                                several_groups_sender(vc), p.arm_s, http)
                        else:
                            arm = Arm(f"split_{name}_b", f"hero-rewards {name}",
                                      "1 response per /get_reward", self.plan.callers)
                            coro = measure_hero(arm, s, w1.single_stream(),
                                                one_response_sender(vc), p.arm_s, http)
                        arm.server["verifier_workers"] = workers
                        await self.run_arm(coro)
            if self.since_probe:
                self.maybe_probe(force=True)
        finally:
            await http.aclose()
            for c in clients:
                await c.aclose()

        log(f"overload: {OVERLOAD_FACTOR}x burst against --max-queued-rollouts "
            f"{p.overload_queue}")
        over = await overload(self.servers["overload"], w1, p.overload_queue, p.overload_s,
                              after_s=2.0 if p.name == "full" else 1.0)
        log(f"  429s {over['rejected_429']}, p99 {over['latency_p99_s']}s, RSS peak over the "
            f"at-capacity peak {over['rss_growth_over_capacity_peak_mb']} MB, retained "
            f"{over['rss_retained_mb']} MB")
        self.attach_limits()
        keys = list(dict.fromkeys(a.key for a in self.arms))
        self.arms = [merge_runs([a for a in self.arms if a.key == k]) for k in keys]
        return self.report(verifier, over, time.perf_counter() - started, load0)

    # -- analysis --------------------------------------------------------------------------

    def attach_limits(self) -> None:
        """Each measurement against the limit probed right before and right after it."""
        assert self.limit is not None
        probes = self.limit.probes
        for arm in self.arms:
            before = [pr for pr in probes if pr["t_end"] <= arm.t_start + 1e-6]
            after = [pr for pr in probes if pr["t_start"] >= arm.t_end - 1e-6]
            near = ([before[-1]] if before else []) + ([after[0]] if after else [])
            if near:
                arm.limit_ref = statistics.mean(pr["rollouts_per_s"] for pr in near)
                arm.limit_ratio = arm.rate / arm.limit_ref

    def arm(self, key: str) -> Optional[Arm]:
        return next((a for a in self.arms if a.key == key), None)

    def report(self, verifier: dict, over: dict, duration_s: float, load0: float) -> dict:
        assert self.limit is not None
        a, p = self.args, self.plan
        probes = self.limit.probes
        limit_rates = [pr["rollouts_per_s"] for pr in probes]
        limit = {
            "rollouts_per_s": round(statistics.median(limit_rates), 3),
            "min": round(min(limit_rates), 3), "max": round(max(limit_rates), 3),
            "probes": len(probes), "max_batch_tokens": p.max_batch_tokens,
            "batch_sizes": sorted({len(b) for b in self.limit.batches}),
            "tokens_per_rollout": round(statistics.mean(self.limit.n_tokens), 1),
            "by_batch_size": self.forward_sweep,
            "rollouts_per_cpu_s": round(sum(pr["rollouts"] for pr in probes)
                                        / sum(pr["cpu_s"] for pr in probes), 3),
            "probe_runs": [{"rollouts_per_s": round(pr["rollouts_per_s"], 3),
                            "loadavg_1m": round(pr["loadavg_1m"], 2)} for pr in probes],
        }
        by = {arm.key: arm.as_json() for arm in self.arms}
        hero = {"several_groups": {}, "one_response": {}}
        for c in p.concurrency:
            hero["several_groups"][str(c)] = by[f"hero_a_c{c}"]
        for c in p.one_response_concurrency:
            hero["one_response"][str(c)] = by[f"hero_b_c{c}"]
        naive = {str(c): by[f"naive_c{c}"] for c in p.one_response_concurrency}
        scale = {"1x": by["hero_a_c4"], "4x": by["scale_4x"], "16x": by["scale_16x"]}
        s1, s16 = self.arm("hero_a_c4"), self.arm("scale_16x")
        assert s1 and s16
        scale["ratio_16x_to_1x"] = round(s16.rate / s1.rate, 4)
        if s1.limit_ratio and s16.limit_ratio:
            scale["ratio_16x_to_1x_limit_normalised"] = round(s16.limit_ratio / s1.limit_ratio, 4)
        split = {}
        for name, workers, threads in ([] if a.no_variants else self.variants()):
            entry = {"verifier_workers": workers, "torch_threads": threads or torch_threads()}
            for pattern in self.variant_patterns_run:
                entry[pattern] = by[f"split_{name}_{pattern}"]
            split[name] = entry

        targets = self.targets(limit, verifier, over, scale)
        return {
            "meta": {
                "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "mode": p.name, "machine": cpu_model(), "cores": self.cores,
                "gpu": gpu_name(), "python": platform.python_version(),
                "torch": _torch_version(), "reward_model": a.reward_model, "device": a.device,
                "verifier_workers": a.verifier_workers, "max_batch_tokens": p.max_batch_tokens,
                "groups_per_request": p.groups_per_request, "callers": self.plan.callers,
                "duration_s": round(duration_s, 1), "loadavg_1m_start": round(load0, 2),
                "loadavg_1m_end": round(os.getloadavg()[0], 2),
                "git_commit": git_commit(),
            },
            "workloads": {w.name: {"groups": w.n_groups, "group_size": w.group_size,
                                   "rollouts": w.n_rollouts,
                                   "duplicate_responses_in_file": w.file_duplicates}
                          for w in self.workloads.values()},
            "limit": limit,
            "hero_rewards": hero,
            "naive": naive,
            "trl_style": by["trl"],
            "verifier_pool": verifier,
            "scale": scale,
            "core_split": split,
            "overload": over,
            "targets": targets,
        }

    def targets(self, limit: dict, verifier: dict, over: dict, scale: dict) -> list[dict]:
        def t(name: str, measured: Optional[float], target: float, how: str,
              higher: bool = True) -> dict:
            ok = measured is not None and (measured >= target if higher else measured < target)
            return {"target": name, "measured": _r(measured, 3), "threshold": target,
                    "rule": how, "pass": bool(ok)}

        c = self.plan.callers
        a16, b16 = self.arm(f"hero_a_c{c}"), self.arm(f"hero_b_c{c}")
        naive16, trl, a4 = self.arm(f"naive_c{c}"), self.arm("trl"), self.arm("hero_a_c4")

        def relative(x: Optional[Arm], y: Optional[Arm]) -> Optional[float]:
            """x over y, each first divided by the limit probed around it (drift-corrected)."""
            if x is None or y is None or not x.limit_ratio or not y.limit_ratio:
                return None
            return x.limit_ratio / y.limit_ratio

        out = [
            t(f"hero-rewards several-group requests (C={c}) / limit",
              a16.limit_ratio if a16 else None, 0.9, ">= 0.9"),
            t(f"hero-rewards {c} callers x 1 response / limit",
              b16.limit_ratio if b16 else None, 0.9, ">= 0.9"),
            t(f"hero-rewards / naive server (both {c} callers x 1 response)",
              relative(b16, naive16), 1.0, ">= 1"),
            t("hero-rewards (C=4, several groups) / TRL-style in-process",
              relative(a4, trl), 1.0, ">= 1"),
            t("verifier pool / (single process x cores)",
              verifier["ratio_pool_to_single_x_cores"], 0.85, ">= 0.85"),
            t("scale: 16x / 1x rollouts/s (limit-normalised)",
              scale.get("ratio_16x_to_1x_limit_normalised", scale["ratio_16x_to_1x"]), 0.9,
              ">= 0.9"),
            t("overload: RSS peak in the burst over the at-capacity peak (MB)",
              over["rss_growth_over_capacity_peak_mb"], 100.0, "< 100 MB", higher=False),
            t("overload: RSS retained after the burst (MB)", over["rss_retained_mb"], 100.0,
              "< 100 MB", higher=False),
            t("overload: 429s that carry Retry-After (fraction)",
              (over["rejected_429_with_retry_after"] / over["rejected_429"])
              if over["rejected_429"] else None, 1.0, "== 1 (and some 429s)"),
        ]
        return out


# ---------------------------------------------------------------------------------------------
# Output


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def gpu_name() -> Optional[str]:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


def torch_threads() -> int:
    """Intra-op threads a fresh torch process gets here (what the servers use by default)."""
    import torch

    return torch.get_num_threads()


def _torch_version() -> str:
    import torch

    return torch.__version__


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=HERE, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(r: dict) -> str:
    m, lim = r["meta"], r["limit"]
    lines = []
    gpu = m["gpu"] or "no GPU"
    lines.append(f"hero-rewards benchmark ({m['mode']}) — {m['date']} — {m['machine']}, "
                 f"{m['cores']} cores, {gpu}; RM {m['reward_model']} on {m['device']}; "
                 f"{m['duration_s']:.0f} s; load avg {m['loadavg_1m_start']}→"
                 f"{m['loadavg_1m_end']}")
    head = f"{'measurement':<58} {'C':>3} {'rollouts/s':>11} {'x limit':>8}  notes"
    lines += [head, "-" * len(head)]

    def row(name: str, c: Any, rate: Optional[float], ratio: Optional[float], notes: str = ""):
        rate_s = "-" if rate is None else f"{rate:.1f}"
        lines.append(f"{name:<58} {str(c):>3} {rate_s:>11} {fmt_ratio(ratio):>8}  {notes}")

    def arm_notes(x: dict) -> str:
        s = x.get("server", {})
        parts = []
        if s.get("mean_batch"):
            parts.append(f"batch {s['mean_batch']:.0f}")
        if "rm_busy_fraction" in s:
            parts.append(f"RM busy {s['rm_busy_fraction']:.0%}")
        if x.get("latency_p99_s") is not None:
            parts.append(f"p99 {x['latency_p99_s']:.2f}s")
        if "server_cpu_s" in s and x["elapsed_s"]:
            parts.append(f"cores srv {s['server_cpu_s'] / x['elapsed_s']:.1f} "
                         f"cli {s.get('client_cpu_s', 0.0) / x['elapsed_s']:.1f}")
        parts.append(f"correct {x['correct_fraction']:.2f}")
        if x.get("runs"):
            parts.append("runs x limit " + " / ".join(fmt_ratio(r["ratio_to_limit"])
                                                     for r in x["runs"]))
        if x.get("errors"):
            parts.append(f"ERRORS {x['errors']}")
        return ", ".join(parts)

    row("limit: bare forward, ideal sorted batches (median probe)", "-", lim["rollouts_per_s"],
        1.0, f"{lim['probes']} probes {lim['min']:.1f}..{lim['max']:.1f}, batch "
        f"{max(lim['batch_sizes'])}, {lim['tokens_per_rollout']:.0f} tok/rollout")
    for c, x in r["hero_rewards"]["several_groups"].items():
        row(f"hero-rewards: {x['pattern']}", c, x["rollouts_per_s"], x["ratio_to_limit"],
            arm_notes(x))
    for c, x in r["hero_rewards"]["one_response"].items():
        row(f"hero-rewards: {x['pattern']}", c, x["rollouts_per_s"], x["ratio_to_limit"],
            arm_notes(x))
    for c, x in r["naive"].items():
        row(f"naive per-sample server: {x['pattern']}", c, x["rollouts_per_s"],
            x["ratio_to_limit"], arm_notes(x))
    x = r["trl_style"]
    row("TRL-style in-process: accuracy_reward + RM batches of 8", 1, x["rollouts_per_s"],
        x["ratio_to_limit"], arm_notes(x))
    for key in ("1x", "4x", "16x"):
        x = r["scale"][key]
        row(f"scale {key}: {x['pattern']}", x["concurrency"], x["rollouts_per_s"],
            x["ratio_to_limit"], arm_notes(x))
    for name, entry in r["core_split"].items():
        for pattern in ("a", "b"):
            if pattern in entry:
                x = entry[pattern]
                row(f"core split: verifier workers {entry['verifier_workers']}, torch threads "
                    f"{entry['torch_threads']} ({pattern})", x["concurrency"],
                    x["rollouts_per_s"], x["ratio_to_limit"], arm_notes(x))
    v = r["verifier_pool"]
    lines.append("")
    lines.append(f"verifier ({v['workload']}, {v['responses']} responses × {v['rounds']} rounds): "
                 f"one process {v['single_responses_per_s']:.0f}/s; service's MathVerifier, "
                 f"{v['workers']} workers (chunks ≤ {v.get('service_max_chunk')}) "
                 f"{v['pool_responses_per_s']:.0f}/s → pool / (single × {v['cores']}) = "
                 f"{v['ratio_pool_to_single_x_cores']:.2f}; workers busy "
                 f"{v['pool']['cores_busy']:.2f} of {v['cores']} cores, "
                 f"{v['pool']['cpu_s_per_1k']:.2f} vs {v['single']['cpu_s_per_1k']:.2f} "
                 f"CPU-s per 1k responses")
    for size, x in v["sweep"].items():
        lines.append(f"  bare pool, chunks of {size}: {x['responses_per_s']:.0f}/s → "
                     f"{x['ratio_to_single_x_cores']:.2f} of single × {v['cores']}; workers busy "
                     f"{x['cores_busy']:.2f} cores")
    o, oc = r["overload"], r["overload"]["at_capacity"]
    lines.append(f"overload ({o['factor']}x: {o['callers']} callers × {o['rollouts_per_request']} "
                 f"rollouts vs --max-queued-rollouts {o['max_queued_rollouts']}, "
                 f"{o['burst_s']:.0f} s): {o['rejected_429']} × 429 "
                 f"({o['rejected_429_with_retry_after']} with Retry-After), "
                 f"{o['accepted_requests']} accepted, {o['accepted_rollouts_per_s']:.1f} "
                 f"rollouts/s, p50 {o['latency_p50_s']:.2f}s p99 {o['latency_p99_s']:.2f}s "
                 f"(at capacity: {oc['rollouts_per_s']:.1f} rollouts/s, p99 "
                 f"{oc['latency_p99_s']:.2f}s)")
    lines.append(f"  RSS of the server tree: idle {o['rss_idle_before_mb']:.0f} MB, peak at "
                 f"capacity {oc['rss_peak_mb']:.0f}, peak in the burst {o['rss_peak_mb']:.0f} "
                 f"(+{o['rss_growth_over_capacity_peak_mb']:.0f}), idle after "
                 f"{o['rss_idle_after_mb']:.0f} (retained {o['rss_retained_mb']:+.0f}); server "
                 f"threads {o['server_threads_before']} → {o['server_threads_after']}")
    s = r["scale"]
    sweep = ", ".join(f"batch {b}: {v:.1f}" for b, v in lim["by_batch_size"].items())
    lines.append(f"bare forward by batch size (rollouts/s, same texts): {sweep}")
    lines.append(f"scale: 16x / 1x = {s['ratio_16x_to_1x']:.2f} raw, "
                 f"{s.get('ratio_16x_to_1x_limit_normalised', float('nan')):.2f} "
                 "limit-normalised")
    lines.append("")
    lines.append("targets:")
    for t in r["targets"]:
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        lines.append(f"  {'PASS' if t['pass'] else 'MISS'}  {t['target']:<62} {measured:>8}  "
                     f"({t['rule']})")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Left: rollouts/s against concurrent callers (the limit dashed, its probes' range shaded).
    Right: the same measurements over the limit probed around each (drift-corrected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    lim = r["limit"]
    for ax, key, ylabel in ((axes[0], "rollouts_per_s", "rollouts / s"),
                            (axes[1], "ratio_to_limit", "× limit (probed around each run)")):
        for label, series, marker in (
            ("hero-rewards: several groups / request", r["hero_rewards"]["several_groups"], "o"),
            ("hero-rewards: 1 response / request", r["hero_rewards"]["one_response"], "s"),
            ("naive per-sample server", r["naive"], "^"),
        ):
            cs = sorted(int(c) for c in series)
            ax.plot(cs, [series[str(c)][key] or 0.0 for c in cs], marker=marker, label=label)
        trl = r["trl_style"]
        ax.scatter([1], [trl[key] or 0.0], marker="D", color="k", zorder=5,
                   label="TRL-style in-process (sequential)")
        if key == "rollouts_per_s":
            ax.axhline(lim["rollouts_per_s"], color="gray", linestyle="--",
                       label=f"limit: bare forward (median of {lim['probes']} probes)")
            ax.axhspan(lim["min"], lim["max"], color="gray", alpha=0.12)
        else:
            ax.axhline(1.0, color="gray", linestyle="--", label="limit")
            ax.axhline(0.9, color="gray", linestyle=":", label="target 0.9 × limit")
        colours = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
        for name, entry in r["core_split"].items():
            colour = next(colours, "k")
            for pattern, marker in (("a", "x"), ("b", "+")):
                if pattern in entry:
                    x = entry[pattern]
                    kind = "several groups" if pattern == "a" else "1 response"
                    ax.scatter([x["concurrency"]], [x[key] or 0.0], marker=marker, s=60,
                               color=colour, zorder=5, label=f"core split {name} ({kind})")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16])
        ax.set_xticklabels(["1", "4", "16"])
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    m = r["meta"]
    fig.suptitle(f"hero-rewards benchmark ({m['mode']}, {m['date']}): {m['machine']}, "
                 f"{m['cores']} cores, {m['gpu'] or 'no GPU'}; RM {m['reward_model']} on "
                 f"{m['device']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="hero-rewards benchmark (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke version")
    parser.add_argument("--reward-model", default="embedded",
                        help="embedded (default) or hf:PATH — used by every path measured")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    parser.add_argument("--verifier-workers", type=int, default=1,
                        help="verifier processes of the main service (default 1)")
    parser.add_argument("--max-batch-tokens", type=int, default=0,
                        help="service token budget (default: the service's own for the device "
                             "— 4096 on CPU, 16384 on GPU; 2048 with --quick)")
    parser.add_argument("--no-variants", action="store_true",
                        help="skip the core-split variants (two fewer servers)")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="soft time bound: past 60%% of it the core split is cut to one "
                             "pattern (default 540)")
    parser.add_argument("--data", default=None, help="rollouts JSONL (default: the dev data)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: redraw the table and plot from "
                             "RESULTS_DIR/latest.json")
    args = parser.parse_args(argv)
    out_dir = Path(args.results_dir)
    if args.render_only:
        result = json.loads((out_dir / "latest.json").read_text())
        print(table(result))
        plot(result, out_dir / "throughput.png")
        return 0
    from hero_service.config import Settings

    plan = QUICK if args.quick else FULL
    budget = args.max_batch_tokens or plan.max_batch_tokens or Settings().resolved_max_batch_tokens(
        "cuda" if args.device.startswith("cuda") else "cpu")
    plan = Plan(**{**plan.__dict__, "max_batch_tokens": budget})

    bench = Bench(args, plan)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        result = asyncio.run(bench.run())
    finally:
        bench.stop_servers()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (out_dir / "latest.txt").write_text(text + "\n")
    plot(result, out_dir / "throughput.png")
    print(text)
    log(f"wrote {out_dir / 'latest.json'}, {out_dir / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
