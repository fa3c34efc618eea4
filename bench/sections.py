"""The measured sections of one benchmark run, in the order they run, and the servers they
measure:

1. the verifier pool against one process (the servers idle, nothing else runs);
2. the bare forward by batch size;
3. the target comparisons — hero-rewards (a) and (b), the naive server, TRL-style — repeated in
   reverse order when the plan says so, so drift over the run averages out;
4. scale: (a) with 4 callers at the 1x, 4x and 16x workloads, back to back;
5. core split: verifier workers against torch threads, one server per variant;
6. the overload burst;
7. prompt sharing (``shared_prompt.py``): its own causal RM, in process, the servers idle.

A limit probe runs between measurements (``Plan.windows.probe_every``), and each measurement is
then compared with the probes right before and after it."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import arms
import shared_prompt
from limit import BareForwardLimit
from machine import cores, progress_log, torch_threads
from measurement import Measurement, merged
from overload import OVERLOAD_FACTOR, overload_burst
from plan import Plan
from procs import Server, ServerGroup, hero_server, naive_server
from verifier_pool import verifier_pool
from workload import Workload, load_rows

log = progress_log("bench")

MAIN_SERVER = "hero"


@dataclass(frozen=True)
class Options:
    """What the command line chooses besides the plan."""

    reward_model: str
    device: str
    verifier_workers: int
    core_split: bool
    budget_s: float
    results_dir: Path
    data: Optional[Path]


@dataclass(frozen=True)
class Variant:
    """A core split: the service with this many verifier workers and torch threads."""

    name: str
    verifier_workers: int
    torch_threads: int  # 0: torch's default


@dataclass
class Findings:
    """Everything a run measured, for ``report.results``."""

    plan: Plan
    options: Options
    workloads: dict[int, Workload]
    limit: dict[str, Any]
    measurements: list[Measurement]  # one per key, repeated runs merged
    variants: list[Variant]          # the core split's, [] when not measured
    core_split_patterns: tuple[str, ...]
    verifier: dict[str, Any]
    overload: dict[str, Any]
    shared_prompt: dict[str, Any]
    duration_s: float
    loadavg_start: float


class BenchRun:
    def __init__(self, options: Options, plan: Plan) -> None:
        self.options = options
        self.plan = plan
        self.workloads = {s: Workload(load_rows(options.data), s) for s in (1, 4, 16)}
        self.servers = ServerGroup(log)
        self.measurements: list[Measurement] = []
        self.since_probe = 0
        self.limit: Optional[BareForwardLimit] = None
        self.core_split_patterns = plan.core_split.patterns
        self._clients: list[Any] = []
        # Set by run(): the bench's own copy of the RM, the /metrics client, the SDK clients of
        # the main and the naive server.
        self.model: Any = None
        self.http: Any = None
        self.hero_client: Any = None
        self.naive_client: Any = None

    # -- servers ---------------------------------------------------------------------------

    def start_servers(self) -> None:
        """The main service, one per core-split variant, the overload service (a small queue)
        and the naive server, all started at once."""
        options, plan = self.options, self.plan
        logs = options.results_dir / "logs"
        common: dict[str, Any] = dict(reward_model=options.reward_model, device=options.device,
                                      max_batch_tokens=plan.max_batch_tokens)
        self.servers.add(MAIN_SERVER, hero_server(
            MAIN_SERVER, logs, verifier_workers=options.verifier_workers, **common))
        for variant in self.variants():
            if variant.name == self.main_variant:
                continue
            env = ({"OMP_NUM_THREADS": str(variant.torch_threads)}
                   if variant.torch_threads else None)
            self.servers.add(variant.name, hero_server(
                variant.name, logs, verifier_workers=variant.verifier_workers, env=env,
                **common))
        self.servers.add("overload", hero_server(
            "overload", logs, verifier_workers=options.verifier_workers,
            extra=["--max-queued-rollouts", str(plan.overload.max_queued_rollouts)], **common))
        self.servers.add("naive", naive_server(logs, reward_model=options.reward_model,
                                               device=options.device))
        self.servers.start()

    def stop_servers(self) -> None:
        self.servers.stop()

    @property
    def main_variant(self) -> str:
        return f"w{self.options.verifier_workers}_t{torch_threads()}"

    def variants(self) -> list[Variant]:
        """The plan's core-split variants, without duplicates ([] when switched off)."""
        if not self.options.core_split:
            return []
        machine_cores, threads = cores(), torch_threads()
        workers = self.options.verifier_workers
        by_name = {
            "main": Variant(f"w{workers}_t{threads}", workers, 0),
            "workers_per_core": Variant(f"w{machine_cores}_t{threads}", machine_cores, 0),
            "fewer_threads": Variant(f"w1_t{max(1, threads - 1)}", 1, max(1, threads - 1)),
        }
        unique: dict[str, Variant] = {}
        for variant in (by_name[name] for name in self.plan.core_split.variants):
            unique.setdefault(variant.name, variant)
        return list(unique.values())

    def server_for(self, variant: Variant) -> Server:
        return self.servers[MAIN_SERVER if variant.name == self.main_variant else variant.name]

    def client(self, url: str) -> Any:
        """A new SDK client, closed at the end of the run."""
        from hero_client import AsyncHeroClient

        client = AsyncHeroClient(url, timeout=600.0, max_concurrency=64)
        self._clients.append(client)
        return client

    # -- probes between measurements -------------------------------------------------------

    def maybe_probe(self, force: bool = False) -> None:
        self.since_probe += 1
        if force or self.since_probe >= self.plan.windows.probe_every:
            assert self.limit is not None
            rate = self.limit.probe(self.plan.windows.probe_s)
            log(f"  limit probe: {rate:.1f} rollouts/s")
            self.since_probe = 0

    async def record(self, measuring: Awaitable[Measurement]) -> Measurement:
        measurement = await measuring
        self.measurements.append(measurement)
        server = measurement.server
        extra = ""
        if server.get("mean_batch"):
            extra = (f", mean batch {server['mean_batch']:.1f}"
                     + (f", RM busy {server['rm_busy_fraction']:.0%}"
                        if "rm_busy_fraction" in server else ""))
        errors = f", ERRORS {measurement.errors}" if measurement.errors else ""
        log(f"  {measurement.key}: {measurement.rate:.1f} rollouts/s ({measurement.rollouts} in "
            f"{measurement.elapsed_s:.1f}s{extra}{errors})")
        self.maybe_probe()
        return measurement

    def attach_limits(self) -> None:
        """Each measurement against the limit probed right before and right after it."""
        assert self.limit is not None
        probes = self.limit.probes
        for measurement in self.measurements:
            before = [pr for pr in probes if pr["t_end"] <= measurement.t_start + 1e-6]
            after = [pr for pr in probes if pr["t_start"] >= measurement.t_end - 1e-6]
            near = ([before[-1]] if before else []) + ([after[0]] if after else [])
            if near:
                measurement.limit_ref = statistics.mean(pr["rollouts_per_s"] for pr in near)
                measurement.limit_ratio = measurement.rate / measurement.limit_ref

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> Findings:
        import httpx

        from hero_service.reward_models import load_reward_model

        options, plan = self.options, self.plan
        started = time.perf_counter()
        loadavg_start = os.getloadavg()[0]
        self.start_servers()
        log(f"{plan.name} run: started {len(self.servers)} servers: "
            f"{', '.join(self.servers.names())}")
        # The model loads while the servers start; nothing is measured until all are ready.
        self.model = load_reward_model(options.reward_model, device=options.device)
        self.limit = BareForwardLimit(self.model, self.workloads[1], plan.max_batch_tokens)
        self.servers.wait_ready()
        self.limit.warm_up()
        log(f"limit: {len(self.limit.batches)} batches, sizes {self.limit.batch_sizes}, "
            f"tokens/rollout {statistics.mean(self.limit.n_tokens):.1f}")

        verifier = await self.verifier_section()
        forward_sweep = self.forward_sweep_section()
        self.http = httpx.AsyncClient(timeout=30)
        try:
            await self.warm_servers()
            self.hero_client = self.client(self.servers[MAIN_SERVER].url)
            self.naive_client = self.client(self.servers["naive"].url)
            await self.target_comparisons()
            await self.scale_section()
            await self.core_split_section(time.perf_counter() - started)
            if self.since_probe:
                self.maybe_probe(force=True)
        finally:
            await self.http.aclose()
            for client in self._clients:
                await client.aclose()
        overload = await self.overload_section()
        shared = await self.shared_prompt_section()

        self.attach_limits()
        keys = list(dict.fromkeys(m.key for m in self.measurements))
        self.measurements = [merged([m for m in self.measurements if m.key == key])
                             for key in keys]
        return Findings(
            plan=plan, options=options, workloads=self.workloads,
            limit=self.limit.summary(plan.max_batch_tokens, forward_sweep),
            measurements=self.measurements, variants=self.variants(),
            core_split_patterns=self.core_split_patterns, verifier=verifier, overload=overload,
            shared_prompt=shared, duration_s=time.perf_counter() - started,
            loadavg_start=loadavg_start)

    # -- sections --------------------------------------------------------------------------

    async def verifier_section(self) -> dict[str, Any]:
        log("verifier pool vs one process")
        verifier = self.plan.verifier
        pool = await verifier_pool(self.workloads[verifier.scale], verifier.rounds,
                                   verifier.chunk_sweep, self.workloads[1])
        log(f"  single {pool['single_responses_per_s']}/s, pool "
            f"{pool['pool_responses_per_s']}/s, ratio {pool['ratio_pool_to_single_x_cores']}")
        return pool

    def forward_sweep_section(self) -> dict[str, float]:
        log("bare forward by batch size")
        assert self.limit is not None
        sweep = self.plan.forward_sweep
        by_batch_size = self.limit.sweep(sweep.batch_sizes, sweep.rollouts, sweep.rounds)
        log(f"  {by_batch_size}")
        return by_batch_size

    async def warm_servers(self) -> None:
        """Every server's first forward and verifier workers, off the clock."""
        workload = self.workloads[1]
        for name in self.servers.names():
            client = self.client(self.servers[name].url)
            if name != "naive":
                await arms.several_groups_sender(client)(workload.groups(99)[:1])
            await arms.one_response_sender(client)(next(workload.single_stream()))

    async def several_groups(self, callers: int) -> None:
        workload, per_request = self.workloads[1], self.plan.callers.groups_per_request
        await self.record(arms.measure_service(
            Measurement(f"hero_a_c{callers}", "hero-rewards",
                        f"{per_request} groups x 8 per request", callers),
            self.servers[MAIN_SERVER], workload.request_stream(per_request),
            arms.several_groups_sender(self.hero_client), self.plan.windows.measurement_s,
            self.http))

    async def one_response(self, callers: int) -> None:
        await self.record(arms.measure_service(
            Measurement(f"hero_b_c{callers}", "hero-rewards", "1 response per /get_reward",
                        callers),
            self.servers[MAIN_SERVER], self.workloads[1].single_stream(),
            arms.one_response_sender(self.hero_client), self.plan.windows.measurement_s,
            self.http))

    async def naive(self, callers: int) -> None:
        await self.record(arms.measure_naive(
            Measurement(f"naive_c{callers}", "naive per-sample server", "1 response per request",
                        callers),
            self.servers["naive"], self.workloads[1].single_stream(),
            arms.one_response_sender(self.naive_client), self.plan.windows.measurement_s))

    def trl_style(self) -> None:
        measurement = arms.trl_style(self.model, self.workloads[1],
                                     self.plan.windows.measurement_s)
        self.measurements.append(measurement)
        log(f"  trl: {measurement.rate:.1f} rollouts/s ({measurement.rollouts} in "
            f"{measurement.elapsed_s:.1f}s)")
        self.maybe_probe()

    async def target_comparisons(self) -> None:
        callers = self.plan.callers
        self.maybe_probe(force=True)
        for c in callers.several_groups:
            if c == 4:
                continue  # measured with the scale runs, side by side with 4x/16x
            await self.several_groups(c)
        for c in callers.one_response:
            await self.one_response(c)
        for c in callers.one_response:
            await self.naive(c)
        self.trl_style()
        # Again, in reverse order, so drift over the run averages out (each run has its own
        # limit probes; the reported ratio is the median run's).
        for _ in range(callers.repeats - 1):
            self.trl_style()
            await self.naive(callers.many)
            await self.one_response(callers.many)
            await self.several_groups(callers.many)

    async def scale_section(self) -> None:
        """(a) with 4 callers at 1x, 4x, 16x, back to back (1x is also the C=4 (a) row)."""
        per_request = self.plan.callers.groups_per_request
        for scale in (1, 4, 16):
            workload = self.workloads[scale]
            measurement = Measurement(
                "hero_a_c4" if scale == 1 else f"scale_{scale}x", "hero-rewards",
                f"{per_request} groups x {workload.group_size} per request", 4,
                workload=workload.name)
            window = self.plan.windows
            await self.record(arms.measure_service(
                measurement, self.servers[MAIN_SERVER], workload.request_stream(per_request),
                arms.several_groups_sender(self.hero_client),
                window.scale_s if scale > 1 else window.measurement_s, self.http))

    async def core_split_section(self, elapsed_s: float) -> None:
        """Each variant's server on the plan's patterns. On a machine so loaded that the run is
        already long, only the cheap pattern (b) runs, to stay within the time bound."""
        patterns = self.plan.core_split.patterns
        if elapsed_s > 0.6 * self.options.budget_s:
            patterns = tuple(x for x in patterns if x == "b") or patterns[:1]
            log(f"  slow machine: core split runs pattern(s) {patterns} only")
        self.core_split_patterns = patterns
        per_request = self.plan.callers.groups_per_request
        workload = self.workloads[1]
        for pattern in patterns:
            for variant in self.variants():
                server = self.server_for(variant)
                client = self.client(server.url)
                if pattern == "a":
                    measurement = Measurement(
                        f"split_{variant.name}_a", f"hero-rewards {variant.name}",
                        f"{per_request} groups x 8 per request",
                        self.plan.core_split.several_groups_callers)
                    measuring = arms.measure_service(
                        measurement, server, workload.request_stream(per_request),
                        arms.several_groups_sender(client), self.plan.windows.measurement_s,
                        self.http)
                else:
                    measurement = Measurement(
                        f"split_{variant.name}_b", f"hero-rewards {variant.name}",
                        "1 response per /get_reward", self.plan.callers.many)
                    measuring = arms.measure_service(
                        measurement, server, workload.single_stream(),
                        arms.one_response_sender(client), self.plan.windows.measurement_s,
                        self.http)
                await self.record(measuring)

    async def overload_section(self) -> dict[str, Any]:
        plan = self.plan.overload
        log(f"overload: {OVERLOAD_FACTOR}x burst against --max-queued-rollouts "
            f"{plan.max_queued_rollouts}")
        over = await overload_burst(self.servers["overload"], self.workloads[1], plan)
        log(f"  429s {over['rejected_429']}, p99 {over['latency_p99_s']}s, RSS peak over the "
            f"at-capacity peak {over['rss_growth_over_capacity_peak_mb']} MB, retained "
            f"{over['rss_retained_mb']} MB")
        return over

    async def shared_prompt_section(self) -> dict[str, Any]:
        log("prompt sharing: long shared prompts vs the bare forward, the dev data on vs off")
        # In a thread: the section runs its own event loop for the batcher's callers.
        shared = await asyncio.to_thread(shared_prompt.measure, self.plan.shared_prompt,
                                         self.options.data)
        log(f"  service / bare {shared['long']['arms']['service_sharing']['x_reference']}, "
            f"dev on / off {shared['dev']['arms']['service_sharing']['x_reference']}")
        return shared
