"""The systems measured side by side on the same rollouts:

* hero-rewards  end to end over HTTP with the Python client against a real service process:
                (a) several groups per request; (b) OpenRLHF's pattern, one response per
                ``/get_reward`` request; C concurrent callers each.
* naive         ``naive_server.py``: one request per response, RM batch of one and math-verify in
                the request handler (OpenRLHF's ``serve_rm.py`` pattern), same callers as (b).
* TRL-style     ``trl.rewards.accuracy_reward`` sequentially in the caller, then the RM over the
                same texts in unsorted padded batches of 8, in dataset order.

(The bare model, the fourth, is the limit: ``limit.py``.)"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import metrics
import psutil
from machine import progress_log
from measurement import Measurement
from procs import Server, cpu_seconds
from workload import BenchGroup, Rollout, Workload

log = progress_log("bench")

# One request: how many rollouts it scored and how many of them were verified correct.
Send = Callable[[Any], Awaitable[tuple[int, int]]]


async def closed_loop(measurement: Measurement, jobs: Iterator[Any], send: Send,
                      duration_s: float, max_errors: int = 5) -> Measurement:
    """``measurement.concurrency`` callers, each sending its next job as soon as the previous
    one is answered, until ``duration_s`` has passed (in-flight requests then finish and
    count)."""
    deadline = time.perf_counter() + duration_s

    async def caller() -> None:
        while time.perf_counter() < deadline and measurement.errors < max_errors:
            job = next(jobs)
            t = time.perf_counter()
            try:
                n, correct = await send(job)
            except Exception as exc:
                measurement.errors += 1
                log(f"{measurement.key}: request failed: {type(exc).__name__}: {exc}")
                continue
            measurement.latencies.append(time.perf_counter() - t)
            measurement.rollouts += n
            measurement.correct += correct
            measurement.requests += 1

    measurement.t_start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(measurement.concurrency)))
    measurement.t_end = time.perf_counter()
    measurement.elapsed_s = measurement.t_end - measurement.t_start
    measurement.loadavg = os.getloadavg()[0]
    return measurement


# The service's counters behind a measurement's "batch", "RM busy" and dedupe figures.
_SERVICE_COUNTERS = {
    "batch_size_sum": "hero_batch_size_sum",
    "batch_size_count": "hero_batch_size_count",
    "forward_s": "hero_model_forward_seconds_sum",
    "deduplicated": "hero_deduplicated_rollouts_total",
}


async def service_counters(http: Any, url: str) -> dict[str, float]:
    text = (await http.get(url + "/metrics")).text
    return {key: metrics.total(text, name) for key, name in _SERVICE_COUNTERS.items()}


def cpu_by_part(server: Server) -> dict[str, float]:
    """CPU-seconds so far of the service's parts: its event-loop thread (the process's main
    thread: HTTP, validation, the pipeline, JSON, the verifier pool's pipes), its other threads
    (the RM forward on the inference thread and torch's, tokenization) and its child processes
    (the verifier fork server and workers)."""
    try:
        root = psutil.Process(server.pid)
        process = root.cpu_times()
        loop = sum(t.user_time + t.system_time for t in root.threads() if t.id == server.pid)
        children = [c.pid for c in root.children(recursive=True)]
    except psutil.Error:  # the server is gone: the measurement's errors say so
        return {"loop_cpu_s": 0.0, "other_threads_cpu_s": 0.0, "workers_cpu_s": 0.0}
    return {"loop_cpu_s": loop, "other_threads_cpu_s": process.user + process.system - loop,
            "workers_cpu_s": cpu_seconds(children)}


async def measure_service(measurement: Measurement, server: Server, jobs: Iterator[Any],
                          send: Send, duration_s: float, http: Any) -> Measurement:
    """A closed loop against hero-rewards, with what its /metrics and CPU time say about it."""
    before = await service_counters(http, server.url)
    parts0 = cpu_by_part(server)
    cpu0, client0 = server.cpu_seconds(), time.process_time()
    await closed_loop(measurement, jobs, send, duration_s)
    cpu1, client1 = server.cpu_seconds(), time.process_time()
    parts1 = cpu_by_part(server)
    after = await service_counters(http, server.url)
    moved = {k: after[k] - before[k] for k in before}
    batches = moved["batch_size_count"]
    measurement.server = {
        "mean_batch": moved["batch_size_sum"] / batches if batches else 0.0,
        "forward_batches": batches,
        "rm_busy_fraction": (moved["forward_s"] / measurement.elapsed_s
                             if measurement.elapsed_s else 0.0),
        "deduplicated_rollouts": moved["deduplicated"],
        "server_cpu_s": cpu1 - cpu0,
        "client_cpu_s": client1 - client0,
        **{part: parts1[part] - parts0[part] for part in parts0},
    }
    per_request = measurement.cpu_ms_per_request()
    if per_request:
        log(f"  {measurement.key}: CPU ms per request: " + ", ".join(
            f"{part} {ms:.2f}" for part, ms in per_request.items()))
    return measurement


async def measure_naive(measurement: Measurement, server: Server, jobs: Iterator[Any],
                        send: Send, duration_s: float) -> Measurement:
    """A closed loop against the naive server (no /metrics: its batch is one by design)."""
    cpu0, client0 = server.cpu_seconds(), time.process_time()
    await closed_loop(measurement, jobs, send, duration_s)
    measurement.server = {"mean_batch": 1.0, "server_cpu_s": server.cpu_seconds() - cpu0,
                          "client_cpu_s": time.process_time() - client0}
    return measurement


def several_groups_sender(client: Any) -> Callable[[list[BenchGroup]], Awaitable[tuple[int, int]]]:
    """Pattern (a): ``client.score`` with several whole groups."""
    async def send(groups: list[BenchGroup]) -> tuple[int, int]:
        result = await client.score([g.as_dict() for g in groups])
        n = sum(len(g.rewards) for g in result.groups)
        return n, sum(sum(g.verified) for g in result.groups)
    return send


def one_response_sender(client: Any) -> Callable[[Rollout], Awaitable[tuple[int, int]]]:
    """Pattern (b): ``client.get_reward`` with one query (prompt + response), as OpenRLHF."""
    async def send(rollout: Rollout) -> tuple[int, int]:
        prompt, response, reference, _ = rollout
        result = await client.get_reward([prompt + response], prompts=[prompt],
                                         labels=[reference])
        return 1, int(result.extra_logs["verified"][0] > 0.5)
    return send


def trl_style(model: Any, workload: Workload, duration_s: float) -> Measurement:
    """TRL's in-process reward functions: the verifier sequentially in the caller, then the RM
    in unsorted batches of 8, group after group in dataset order."""
    from trl.rewards import accuracy_reward

    from hero_service.reward_models import ScoringItem

    measurement = Measurement("trl", "TRL-style in-process", "accuracy_reward + RM batches of 8",
                              1)
    stream = workload.group_stream()
    measurement.t_start = time.perf_counter()
    while time.perf_counter() - measurement.t_start < duration_s:
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
        measurement.latencies.append(time.perf_counter() - t)
        measurement.rollouts += len(group.responses)
        measurement.correct += sum(1 for r in rewards if r == 1.0)
        measurement.requests += 1
    measurement.t_end = time.perf_counter()
    measurement.elapsed_s = measurement.t_end - measurement.t_start
    measurement.loadavg = os.getloadavg()[0]
    return measurement
