"""The verifier section: the service's ``MathVerifier`` pool (one worker per core) against
``verify_chunk`` called in one process, times the cores; plus a bare ``ProcessWorkerPool`` fed
same-reference chunks of fixed sizes, as evidence of what the pool itself can do; and the
per-sample pattern (one response per call) with the pool's reference lanes on and off."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import psutil
from procs import cpu_seconds
from workload import BenchGroup, Workload


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def same_reference_chunks(groups: list[BenchGroup], size: int) -> list[tuple[str, list[str]]]:
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


def _independent_verifier(conn: Connection, chunks: list[tuple[str, list[str]]],
                          timeout_s: int) -> None:
    """One of the ``independent`` arm's processes: on each "go", ``verify_chunk`` over its
    share, sequentially, then (when it finished, its CPU-s). No pool, no pipes per task: what
    the machine's cores give to processes that never wait on each other."""
    from hero_service.verifiers._math_worker import verify_chunk

    for reference, responses in chunks[:20]:  # imports, first parses
        verify_chunk(reference, responses, timeout_s)
    conn.send("ready")
    while conn.recv() == "go":
        cpu0 = time.process_time()
        for reference, responses in chunks:
            verify_chunk(reference, responses, timeout_s)
        conn.send((time.perf_counter(), time.process_time() - cpu0))


class IndependentVerifiers:
    """``cores`` spawned processes, each verifying its share of the groups (every cores-th)
    when told to; the round's wall time is the first "go" to the last one done."""

    def __init__(self, groups: list[BenchGroup], processes: int, timeout_s: int) -> None:
        context = multiprocessing.get_context("spawn")  # this process holds torch's threads
        self.conns: list[Connection] = []
        self.procs = []
        for k in range(processes):
            parent, child = context.Pipe()
            share = [(g.reference, list(g.responses)) for g in groups[k::processes]]
            proc = context.Process(target=_independent_verifier, args=(child, share, timeout_s),
                                   daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            if not conn.poll(120) or conn.recv() != "ready":
                raise RuntimeError("an independent verifier process did not start")

    def round(self) -> tuple[float, float]:
        """(wall seconds, CPU-seconds of all processes) of one pass over the groups."""
        t0 = time.perf_counter()
        for conn in self.conns:
            conn.send("go")
        done = [conn.recv() for conn in self.conns]
        return max(end for end, _ in done) - t0, sum(cpu for _, cpu in done)

    def close(self) -> None:
        for conn in self.conns:
            conn.send("stop")
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


PER_SAMPLE_CALLERS = 16


async def _per_sample_round(verifier: Any, steps: list[list[BenchGroup]], fresh: int,
                            workers: set[int]) -> dict[str, float]:
    """``PER_SAMPLE_CALLERS`` closed-loop callers, each verifying one response per call, taking
    the responses in group order (a group's responses in flight together, as a trainer's
    per-sample calls send them). Each of ``steps`` gets its own run of spaces after every
    reference (from ``fresh`` on): it reads the same (references are stripped) but no worker has
    it cached yet, as with the new prompts of each training step."""
    pending = iter([(g.reference + " " * (fresh + s), r)
                    for s, groups in enumerate(steps) for g in groups for r in g.responses])

    async def caller() -> None:
        for reference, response in pending:
            await verifier.verify(reference, [response])

    cpu0, t0 = cpu_seconds(workers), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(PER_SAMPLE_CALLERS)))
    wall = time.perf_counter() - t0
    n = sum(len(g.responses) for groups in steps for g in groups)
    return {"per_s": n / wall, "wall_s": wall, "cpu_s": cpu_seconds(workers) - cpu0}


PER_SAMPLE_STEPS = 4


async def per_sample_lanes(workload: Workload, rounds: int, workers: int) -> dict[str, Any]:
    """The service's ``MathVerifier`` under one-response calls, with its reference lanes (a
    reference's responses go to the worker that has it parsed) and with one queue for all
    workers, interleaved round by round (the order alternating). A round is
    ``PER_SAMPLE_STEPS`` passes over ``workload`` (the dev data as is: groups of 8), each with
    references no worker has seen."""
    from hero_service.config import Settings
    from hero_service.verifiers import MathVerifier

    settings = Settings()
    arms: dict[str, Any] = {}
    pids: dict[str, set[int]] = {}
    for name, lanes in (("lanes", True), ("one_queue", False)):
        before = _children()
        # No recycling here (a replaced worker's CPU would go uncounted: both pools' workers
        # come from one fork server); one-response calls make one task per response.
        arms[name] = MathVerifier(workers=workers, timeout_s=settings.verifier_timeout_s,
                                  max_tasks=10**9,
                                  memory_mb=settings.verifier_memory_mb, reference_lanes=lanes)
        await arms[name].start()
        pids[name] = _children() - before
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    steps = [workload.groups(7 + s) for s in range(PER_SAMPLE_STEPS)]
    n = sum(len(g.responses) for groups in steps for g in groups)
    try:
        for name in arms:  # imports and first parses, off the clock
            await _per_sample_round(arms[name], [steps[0][:20]], 1000, pids[name])
        for k in range(rounds):
            order = list(arms) if k % 2 == 0 else list(reversed(arms))
            for j, name in enumerate(order):
                fresh = 1 + PER_SAMPLE_STEPS * (2 * k + j)
                runs[name].append(await _per_sample_round(arms[name], steps, fresh, pids[name]))
    finally:
        for verifier in arms.values():
            await verifier.close()

    def summary(name: str) -> dict[str, Any]:
        measured = runs[name]
        wall = sum(r["wall_s"] for r in measured)
        return {"responses_per_s": round(n * len(measured) / wall, 1),
                "runs": [round(r["per_s"], 1) for r in measured],
                "worker_cpu_ms_per_response": round(
                    1000 * sum(r["cpu_s"] for r in measured) / (n * len(measured)), 4)}

    lanes, one_queue = summary("lanes"), summary("one_queue")
    return {"callers": PER_SAMPLE_CALLERS, "workers": workers, "responses": n, "rounds": rounds,
            "lanes": lanes, "one_queue": one_queue,
            "ratio_lanes_to_one_queue": round(
                lanes["responses_per_s"] / one_queue["responses_per_s"], 4)}


async def verifier_pool(workload: Workload, rounds: int, sweep: tuple[int, ...],
                        per_sample_workload: Workload) -> dict[str, Any]:
    """The service's verifier as shipped (``MathVerifier``, one worker per core, every group of
    the workload verified concurrently as concurrent requests would) against ``verify_chunk``
    called sequentially in this process, interleaved round by round. ``sweep``: a bare
    ``ProcessWorkerPool`` fed same-reference chunks of fixed sizes (what the pool itself can do
    at that task size; not the service's own chunking)."""
    from hero_service.config import Settings
    from hero_service.verifiers import MathVerifier
    from hero_service.verifiers import math as math_verifier
    from hero_service.verifiers._math_worker import verify_chunk
    from hero_service.verifiers.pool import ProcessWorkerPool

    settings = Settings()
    timeout_s = settings.verifier_timeout_s
    cores = len(os.sched_getaffinity(0))
    groups = workload.groups(0)
    n = sum(len(g.responses) for g in groups)
    existing = _children()
    verifier = MathVerifier(workers=cores, timeout_s=timeout_s,
                            max_tasks=settings.verifier_max_tasks,
                            memory_mb=settings.verifier_memory_mb)
    await verifier.start()
    pool = ProcessWorkerPool(cores, settings.verifier_max_tasks, settings.verifier_memory_mb)
    independent: IndependentVerifiers | None = None
    runs: dict[str, list[dict[str, float]]] = {"single": [], "independent": [], "service": []}
    for size in sweep:
        runs[f"chunk_{size}"] = []
    correct = 0
    try:
        independent = IndependentVerifiers(groups, cores, timeout_s)
        warm = workload.groups(1)[:50]  # imports, first parses, the reference caches
        for g in warm:
            verify_chunk(g.reference, list(g.responses), timeout_s)
        await asyncio.gather(*(verifier.verify(g.reference, list(g.responses)) for g in warm))
        await asyncio.gather(*(pool.run(verify_chunk, g.reference, list(g.responses),
                                        timeout_s, timeout_s=60) for g in warm))
        workers = _children() - existing

        def record(name: str, t0: float, cpu: float, parent_cpu: float = 0.0) -> None:
            wall = time.perf_counter() - t0
            runs[name].append({"per_s": n / wall, "wall_s": wall, "cpu_s": cpu,
                               "parent_cpu_s": parent_cpu})

        for _ in range(rounds):
            t0, cpu0 = time.perf_counter(), time.process_time()
            for g in groups:
                verify_chunk(g.reference, list(g.responses), timeout_s)
            record("single", t0, time.process_time() - cpu0, time.process_time() - cpu0)

            wall, cpu = independent.round()
            runs["independent"].append({"per_s": n / wall, "wall_s": wall, "cpu_s": cpu,
                                        "parent_cpu_s": 0.0})

            workers |= _children() - existing
            cpu0, t0, parent0 = cpu_seconds(workers), time.perf_counter(), time.process_time()
            verdicts = await asyncio.gather(
                *(verifier.verify(g.reference, list(g.responses)) for g in groups))
            record("service", t0, cpu_seconds(workers) - cpu0, time.process_time() - parent0)
            correct = sum(v.verified for vs in verdicts for v in vs)

            for size in sweep:
                tasks = same_reference_chunks(groups, size)
                workers |= _children() - existing
                cpu0, t0, parent0 = (cpu_seconds(workers), time.perf_counter(),
                                     time.process_time())
                await asyncio.gather(*(pool.run(verify_chunk, ref, responses, timeout_s,
                                                timeout_s=60) for ref, responses in tasks))
                record(f"chunk_{size}", t0, cpu_seconds(workers) - cpu0,
                       time.process_time() - parent0)
    finally:
        if independent is not None:
            independent.close()
        pool.close()
        await verifier.close()

    def summary(name: str) -> dict[str, Any]:
        measured = runs[name]
        wall = sum(r["wall_s"] for r in measured)
        cpu = sum(r["cpu_s"] for r in measured)
        parent = sum(r["parent_cpu_s"] for r in measured)
        return {"responses_per_s": round(n * len(measured) / wall, 2),
                "runs": [round(r["per_s"], 1) for r in measured],
                "cpu_s_per_1k": round(1000 * cpu / (n * len(measured)), 4),
                # What the calling process itself spends (dispatch, pipes, pickling) beside
                # the workers, on the same cores (for "single", its whole work).
                "parent_cpu_s_per_1k": round(1000 * parent / (n * len(measured)), 4),
                "cores_busy": round(cpu / wall, 3)}

    single, service, alone = summary("single"), summary("service"), summary("independent")
    out: dict[str, Any] = {
        "workload": workload.name, "responses": n, "cores": cores, "workers": cores,
        "rounds": rounds,
        "service_max_chunk": getattr(math_verifier, "MAX_CHUNK", None),
        "single_responses_per_s": single["responses_per_s"],
        "pool_responses_per_s": service["responses_per_s"],
        "ratio_pool_to_single_x_cores": round(
            service["responses_per_s"] / (single["responses_per_s"] * cores), 4),
        # CPU per response of one process over the pool's (workers + the calling process):
        # what the ratio would be if the pool kept every core busy. Steadier than the ratio on a
        # shared machine; the gap between the two is idle workers (gaps, the tail, other jobs).
        "cpu_equivalent_ratio": _cpu_equivalent(single, service),
        # ``cores`` processes that share nothing, each verifying its share (every cores-th
        # group) sequentially, over single × cores; and the pool over that. Not a ceiling: each
        # process sees only some of the 4x workload's copies of a problem, so math-verify's
        # cache of recent LaTeX conversions hits less often than in the single process.
        "ratio_independent_to_single_x_cores": round(
            alone["responses_per_s"] / (single["responses_per_s"] * cores), 4),
        "ratio_pool_to_independent": round(
            service["responses_per_s"] / alone["responses_per_s"], 4),
        "single": single, "pool": service, "independent": alone,
        "correct_fraction": round(correct / n, 4),
        "sweep": {}}
    for size in sweep:
        chunked = summary(f"chunk_{size}")
        chunked["ratio_to_single_x_cores"] = round(
            chunked["responses_per_s"] / (single["responses_per_s"] * cores), 4)
        chunked["cpu_equivalent_ratio"] = _cpu_equivalent(single, chunked)
        out["sweep"][str(size)] = chunked
    out["per_sample"] = await per_sample_lanes(per_sample_workload, rounds, cores)
    # Twice the workers: more of them for one group's responses to scatter over, as in a GPU
    # node's one-per-core pool (read the worker CPU per response: the cores are oversubscribed).
    out["per_sample_twice_the_workers"] = await per_sample_lanes(per_sample_workload, rounds,
                                                                 2 * cores)
    return out


def _cpu_equivalent(single: dict[str, Any], pooled: dict[str, Any]) -> float:
    spent = pooled["cpu_s_per_1k"] + pooled["parent_cpu_s_per_1k"]
    return round(single["cpu_s_per_1k"] / spent, 4) if spent else 0.0
