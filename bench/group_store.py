#!/usr/bin/env python
"""The group store's cost on the per-sample pattern: Redis vs in-memory, side by side, one run.

    .venv/bin/python bench/group_store.py            # full run (~4 min on a 2-core CPU)
    .venv/bin/python bench/group_store.py --quick    # ~1-minute smoke version

Starts a real ``redis-server`` on 127.0.0.1 (``tests/redis_support.py``) and two service
processes that differ only in their group store: ``memory`` (the default) and
``--group-store redis://127.0.0.1:PORT/0``, both ``--group-size 8``. Then, in rounds that
alternate which store goes first (memory/redis, redis/memory, ...: the machine's drift hits both
alike), each store gets the same rollouts:

* per-sample  OpenRLHF's pattern: one query per ``/get_reward`` request (``query`` = prompt +
              response, ``prompts``, ``labels``, as its ``SingleTurnAgentExecutor`` posts), every
              rollout of the round in flight with a bound (64), members of a few groups
              interleaved as finished samples arrive; the group store assembles the groups.
* pieces      verl's per-sample reward loop on ``/v1/rewards``: one-response pieces with
              ``group_key`` + ``group_size`` through the SDK's ``AsyncHeroClient.score``.

Reports rollouts/s per store (median of rounds), redis / memory (median of the per-round
ratios, each pair measured back to back) and group-store round trips per rollout from each
service's ``/metrics`` (``hero_group_store_round_trips{op=...}``: delta over the rounds, less what
the scrapes themselves cost, over rollouts), with PASS/MISS per target. On the way it checks
every answer: each group whole (no ``partial``), closed once (one weight and one sigma-bar for
all its members), rewards equal to HERO of the whole group from the reported RM scores and
verdicts, and the Redis replica's rewards equal to the memory replica's for the same rollouts
once weighted with the same sigma-bar (the two sigma-bar series differ by the order groups close
in). Writes ``bench/results/group_store.json`` and ``group_store.txt``; exits 1 when a check
failed. Every process runs on 127.0.0.1 and is stopped at the end, also on error, Ctrl-C or
SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))  # redis_support: the tests' real redis-server helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import httpx  # noqa: E402
import metrics  # noqa: E402
from machine import cores, git_commit, progress_log  # noqa: E402
from measurement import Tally, latency_figures  # noqa: E402
from procs import ServerGroup, cpu_seconds, hero_server, stop_on_sigterm  # noqa: E402
from redis_support import RedisServer  # noqa: E402
from targets import AT_LEAST, AT_MOST, target, target_lines  # noqa: E402
from workload import BenchGroup, Workload, load_rows  # noqa: E402

from hero_client import AsyncHeroClient, hero  # noqa: E402
from hero_client.schema import HeroParams  # noqa: E402

GROUP_SIZE = 8
RUN = "bench-group-store"  # the sigma-bar series both services keep (?run=)
STORES = ("memory", "redis")
RATIO_TARGET = 0.9
ROUND_TRIPS_TARGET = 3.0
RM_TOLERANCE = 1e-5      # one rollout's RM score in two processes' batches: float32 noise only
REWARD_TOLERANCE = 1e-4  # the same noise through the min-max normalisation and the weight
# Round trips made per second a request waits, not per rollout: lease renewals (1 s) and the
# result poll; on a loaded machine requests wait longer and these grow.
TIMER_OPS = ("attach_renew", "poll")


@dataclass(frozen=True)
class Plan:
    name: str
    groups: int          # groups per round (x 8 rollouts)
    rounds: int          # per-sample rounds per store
    piece_rounds: int    # pieces rounds per store (0: pattern skipped)
    concurrency: int     # requests in flight
    interleave: int      # groups whose members arrive interleaved
    warm_groups: int     # per store and pattern, before any measured round
    budget_s: float


FULL = Plan("full", groups=50, rounds=6, piece_rounds=4, concurrency=64, interleave=4,
            warm_groups=4, budget_s=480.0)
QUICK = Plan("quick", groups=8, rounds=2, piece_rounds=1, concurrency=64, interleave=4,
             warm_groups=2, budget_s=200.0)


log = progress_log("group-store")


# ---------------------------------------------------------------------------------------------
# One answer per rollout, one record per round


@dataclass(frozen=True)
class Answer:
    group: str       # workload group id (the pass is part of it)
    index: int       # the rollout's place in its group
    verified: bool
    rm_score: float
    reward: float
    weight: float
    sigma_ref: float
    partial: bool


@dataclass
class Round(Tally):
    store: str
    pattern: str
    number: int
    round_trips: dict[str, float] = field(default_factory=dict)  # by op, scrape cost removed
    server_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    deduplicated: float = 0.0
    answers: list[Answer] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"round": self.number, "rollouts": self.rollouts,
                "rollouts_per_s": round(self.rate, 3), "elapsed_s": round(self.elapsed_s, 3),
                "errors": self.errors, **latency_figures(self.latencies),
                "round_trips": {k: round(v, 1) for k, v in sorted(self.round_trips.items())},
                "server_cpu_s": round(self.server_cpu_s, 3),
                "redis_cpu_s": round(self.redis_cpu_s, 3),
                "deduplicated_rollouts": self.deduplicated}


# ---------------------------------------------------------------------------------------------
# The two patterns

Call = tuple[BenchGroup, int]  # (group, index of the rollout in it)
Send = Callable[[Call], Awaitable[Answer]]


def arrival_order(groups: Sequence[BenchGroup], interleave: int) -> list[Call]:
    """Rollouts as finished samples reach the reward server: the members of ``interleave``
    consecutive groups round-robin, block after block. Requests are taken in this order, so at
    most ``interleave`` groups are open at once: with more requests in flight than their
    members, parked requests can never hold every slot while their groups' other members wait
    unsent (that would stall until the group deadline)."""
    order: list[Call] = []
    for start in range(0, len(groups), interleave):
        block = groups[start:start + interleave]
        for index in range(max(len(g.responses) for g in block)):
            order.extend((g, index) for g in block if index < len(g.responses))
    return order


def get_reward_sender(http: httpx.AsyncClient) -> Send:
    async def send(call: Call) -> Answer:
        group, index = call
        body = {"query": [group.prompt + group.responses[index]], "prompts": [group.prompt],
                "labels": [group.reference]}
        r = await http.post("/get_reward", params={"run": RUN}, json=body)
        r.raise_for_status()
        data = r.json()
        logs = data["extra_logs"]
        return Answer(group.id, index, logs["verified"][0] > 0.5, logs["rm_score"][0],
                      data["rewards"][0], logs["hero_weight"][0], logs["sigma_ref"][0],
                      logs["partial"][0] > 0.5)
    return send


def pieces_sender(client: AsyncHeroClient) -> Send:
    async def send(call: Call) -> Answer:
        group, index = call
        piece = {"id": f"{group.id}/{index}", "prompt": group.prompt,
                 "reference": group.reference, "responses": [group.responses[index]],
                 "group_key": group.id, "group_size": len(group.responses)}
        result = await client.score([piece], run=RUN)
        g = result.groups[0]
        return Answer(group.id, index, g.verified[0], (g.rm_scores or [0.0])[0], g.rewards[0],
                      g.weight, result.sigma_ref or 0.0, g.partial)
    return send


async def drive(calls: list[Call], send: Send, concurrency: int, record: Round) -> None:
    """``concurrency`` callers take the calls in order, each its next as soon as its previous
    one is answered, until none is left."""
    pending = iter(calls)

    async def caller() -> None:
        for call in pending:
            t = time.perf_counter()
            try:
                answer = await send(call)
            except Exception as exc:
                record.errors += 1
                log(f"{record.store} {record.pattern}: request failed: "
                    f"{type(exc).__name__}: {exc}")
                continue
            record.latencies.append(time.perf_counter() - t)
            record.answers.append(answer)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    record.elapsed_s = time.perf_counter() - t0
    record.rollouts = len(record.answers)


# ---------------------------------------------------------------------------------------------
# /metrics


async def scrape(http: httpx.AsyncClient) -> dict[str, float]:
    """Round trips by op (``rt:<op>``) and the dedupe counter from one ``/metrics`` read."""
    text = (await http.get("/metrics")).text
    trips = metrics.by_label(text, "hero_group_store_round_trips", "op")
    out = {f"rt:{op}": n for op, n in trips.items()}
    out["deduplicated"] = metrics.unlabelled(text, "hero_deduplicated_rollouts_total")
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


async def scrape_cost(http: httpx.AsyncClient) -> dict[str, float]:
    """What one idle ``/metrics`` read adds to the counters (the Redis store reads the waiting
    count for it): measured, then taken out of every round's delta."""
    first = await scrape(http)
    return delta(await scrape(http), first)


# ---------------------------------------------------------------------------------------------
# Checks


@dataclass
class Check:
    """Failures by kind, and the largest differences seen (reported either way)."""

    failures: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    groups: int = 0
    rollouts_compared: int = 0
    max_rm_diff: float = 0.0
    max_reward_diff_same_sigma: float = 0.0
    max_reward_diff_raw: float = 0.0

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {detail}")

    @property
    def ok(self) -> bool:
        return not self.failures


PARAMS = HeroParams().formula_params()  # what the services use: neither pattern sends params


def by_group(answers: Sequence[Answer]) -> dict[str, list[Answer]]:
    out: dict[str, list[Answer]] = {}
    for a in answers:
        out.setdefault(a.group, []).append(a)
    return {g: sorted(v, key=lambda a: a.index) for g, v in out.items()}


def hero_rewards(members: Sequence[Answer], sigma_ref: float) -> list[float]:
    return hero.score_group("hero", [a.verified for a in members],
                            [a.rm_score for a in members], PARAMS, sigma_ref).rewards


def check_store(check: Check, store: str, groups: Sequence[BenchGroup],
                answers: Sequence[Answer]) -> None:
    """Every group answered whole, closed once, with HERO of the whole group."""
    got = by_group(answers)
    for g in groups:
        members = got.get(g.id, [])
        where = f"{store} {g.id}"
        if [a.index for a in members] != list(range(len(g.responses))):
            check.fail("missing answers", f"{where}: {len(members)} of {len(g.responses)}")
            continue
        check.groups += 1
        if any(a.partial for a in members):
            check.fail("partial group", where)
        if len({a.weight for a in members}) != 1 or len({a.sigma_ref for a in members}) != 1:
            check.fail("closed more than once", f"{where}: weights "
                       f"{sorted({a.weight for a in members})}")
            continue
        expected = hero_rewards(members, members[0].sigma_ref)
        if any(abs(a.reward - e) > 1e-9 for a, e in zip(members, expected)):
            check.fail("not HERO of the whole group", where)


def check_same_rewards(check: Check, memory: Sequence[Answer], redis: Sequence[Answer]) -> None:
    """The same rollouts on both stores: the same verdicts, the same RM scores (float32 noise),
    and the same rewards once the Redis group is weighted with the memory group's sigma-bar."""
    mem, red = by_group(memory), by_group(redis)
    for gid, m in mem.items():
        r = red.get(gid)
        if r is None or [a.index for a in r] != [a.index for a in m]:
            continue  # reported by check_store
        if [a.verified for a in m] != [a.verified for a in r]:
            check.fail("verdicts differ", gid)
        check.rollouts_compared += len(m)
        rm_diff = max(abs(a.rm_score - b.rm_score) for a, b in zip(m, r))
        check.max_rm_diff = max(check.max_rm_diff, rm_diff)
        if rm_diff > RM_TOLERANCE:
            check.fail("RM scores differ", f"{gid}: {rm_diff:.2e}")
        same_sigma = hero_rewards(r, m[0].sigma_ref)
        diff = max(abs(a.reward - b) for a, b in zip(m, same_sigma))
        check.max_reward_diff_same_sigma = max(check.max_reward_diff_same_sigma, diff)
        check.max_reward_diff_raw = max(check.max_reward_diff_raw,
                                        max(abs(a.reward - b.reward) for a, b in zip(m, r)))
        if diff > REWARD_TOLERANCE:
            check.fail("rewards differ at the same sigma-bar", f"{gid}: {diff:.2e}")


# ---------------------------------------------------------------------------------------------
# Orchestration


class GroupStoreBench:
    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.results_dir = Path(args.results_dir)
        self.workload = Workload(load_rows(Path(args.data) if args.data else None), 1)
        if self.workload.group_size != GROUP_SIZE:
            raise ValueError(f"the 1x workload has groups of {self.workload.group_size}")
        self.redis = RedisServer()
        self.servers = ServerGroup(log)
        self.rounds: list[Round] = []
        self.check = Check()
        self.started = time.perf_counter()
        self.load_start = os.getloadavg()[0]
        self.http: dict[str, httpx.AsyncClient] = {}
        self.clients: dict[str, AsyncHeroClient] = {}
        self.scrape_costs: dict[str, dict[str, float]] = {}

    # -- processes --------------------------------------------------------------------------

    def start(self) -> None:
        a = self.args
        self.redis.start()
        logs = self.results_dir / "logs"
        common = ["--group-size", str(GROUP_SIZE)]
        for store in STORES:
            extra = common + (["--group-store", self.redis.url] if store == "redis" else [])
            self.servers.add(store, hero_server(
                f"group-store-{store}", logs, reward_model=a.reward_model, device=a.device,
                verifier_workers=a.verifier_workers, max_batch_tokens=a.max_batch_tokens,
                extra=extra))
        self.servers.start()
        self.servers.wait_ready(also=f", redis-server@{self.redis.port}")

    def stop(self) -> None:
        self.servers.stop()
        self.redis.cleanup()

    def redis_cpu_seconds(self) -> float:
        return cpu_seconds([self.redis.proc.pid]) if self.redis.proc else 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # -- measuring --------------------------------------------------------------------------

    async def measure(self, store: str, pattern: str, number: int,
                      groups: list[BenchGroup], keep: bool = True) -> Round:
        http = self.http[store]
        send = (get_reward_sender(http) if pattern == "per_sample"
                else pieces_sender(self.clients[store]))
        record = Round(store, pattern, number)
        calls = arrival_order(groups, self.plan.interleave)
        before = await scrape(http)
        cpu0 = self.servers[store].cpu_seconds()
        redis0 = self.redis_cpu_seconds()
        await drive(calls, send, self.plan.concurrency, record)
        record.server_cpu_s = self.servers[store].cpu_seconds() - cpu0
        record.redis_cpu_s = self.redis_cpu_seconds() - redis0
        moved = delta(await scrape(http), before)
        cost = self.scrape_costs[store]
        record.deduplicated = moved.pop("deduplicated", 0.0) - cost.get("deduplicated", 0.0)
        record.round_trips = {k[3:]: v - cost.get(k, 0.0) for k, v in moved.items()
                              if k.startswith("rt:") and v - cost.get(k, 0.0)}
        if keep:
            self.rounds.append(record)
            trips = sum(record.round_trips.values()) / max(1, record.rollouts)
            log(f"{pattern} round {number} {store}: {record.rollouts} rollouts, "
                f"{record.rate:.1f}/s, {trips:.2f} round trips/rollout, {record.errors} errors")
        return record

    async def pattern_rounds(self, pattern: str, rounds: int, first_pass: int,
                             stop_after_s: float) -> None:
        """Warm-up, then ``rounds`` rounds, alternating which store goes first; each round's
        rollouts are new texts (a pass of their own) and the same for both stores."""
        p = self.plan
        warm = self.workload.groups(first_pass)[:p.warm_groups]
        for store in STORES:
            await self.measure(store, pattern, -1, warm, keep=False)
        for number in range(rounds):
            if number >= 1 and self.elapsed() > stop_after_s:
                log(f"{pattern}: time budget: {number} of {rounds} rounds")
                break
            groups = self.workload.groups(first_pass + 1 + number)[:p.groups]
            order = STORES if number % 2 == 0 else STORES[::-1]
            measured = {s: await self.measure(s, pattern, number, groups) for s in order}
            for store in STORES:
                check_store(self.check, store, groups, measured[store].answers)
            check_same_rewards(self.check, measured["memory"].answers,
                               measured["redis"].answers)

    async def run(self) -> dict[str, Any]:
        p = self.plan
        limits = httpx.Limits(max_connections=p.concurrency + 8,
                              max_keepalive_connections=p.concurrency + 8)
        self.http = {s: httpx.AsyncClient(base_url=self.servers[s].url, timeout=120,
                                          limits=limits) for s in STORES}
        self.clients = {s: AsyncHeroClient(self.servers[s].url, timeout=120) for s in STORES}
        try:
            self.scrape_costs = {s: await scrape_cost(self.http[s]) for s in STORES}
            infos = {s: (await self.http[s].get("/v1/info")).json() for s in STORES}
            for s in STORES:
                if infos[s]["group_store"] != s:
                    raise RuntimeError(f"{s} server reports group store "
                                       f"{infos[s]['group_store']!r}")
            budget = self.args.budget_s
            await self.pattern_rounds("per_sample", p.rounds, 0, 0.6 * budget)
            if p.piece_rounds and self.elapsed() < 0.7 * budget:
                await self.pattern_rounds("pieces", p.piece_rounds, 100, 0.9 * budget)
            elif p.piece_rounds:
                log("pieces: skipped, past 70 % of the time budget")
            sigma = {s: (await self.http[s].get("/v1/info")).json()["running_sigma_ref"]
                     for s in STORES}
        finally:
            for c in self.http.values():
                await c.aclose()
            for c in self.clients.values():
                await c.aclose()
        return self.report(sigma)

    # -- results ----------------------------------------------------------------------------

    def pattern_summary(self, pattern: str) -> Optional[dict[str, Any]]:
        rounds = [r for r in self.rounds if r.pattern == pattern]
        if not rounds:
            return None
        out: dict[str, Any] = {"stores": {}}
        for store in STORES:
            mine = [r for r in rounds if r.store == store]
            rollouts = sum(r.rollouts for r in mine)
            trips: dict[str, float] = {}
            for r in mine:
                for op, n in r.round_trips.items():
                    trips[op] = trips.get(op, 0.0) + n
            out["stores"][store] = {
                "rollouts_per_s": round(statistics.median(r.rate for r in mine), 3),
                "rounds": [r.summary() for r in mine],
                "rollouts": rollouts,
                "errors": sum(r.errors for r in mine),
                **latency_figures(x for r in mine for x in r.latencies),
                "round_trips_per_rollout": round(sum(trips.values()) / rollouts, 3)
                if rollouts else None,
                "round_trips_per_rollout_without_timers": round(sum(
                    n for op, n in trips.items() if op not in TIMER_OPS) / rollouts, 3)
                if rollouts else None,
                "round_trips_per_rollout_by_op": {
                    op: round(n / rollouts, 3) for op, n in sorted(trips.items())}
                if rollouts else {},
                "server_cpu_ms_per_rollout": round(
                    1000 * sum(r.server_cpu_s for r in mine) / rollouts, 2) if rollouts else None,
                "redis_server_cpu_ms_per_rollout": round(
                    1000 * sum(r.redis_cpu_s for r in mine) / rollouts, 3) if rollouts else None,
                "deduplicated_rollouts": sum(r.deduplicated for r in mine),
            }
        pairs = [(m, r) for m in rounds for r in rounds if m.store == "memory"
                 and r.store == "redis" and m.number == r.number and m.rate > 0]
        ratios = [r.rate / m.rate for m, r in pairs]
        mem, red = out["stores"]["memory"], out["stores"]["redis"]
        out["ratio_redis_to_memory"] = round(statistics.median(ratios), 4) if ratios else None
        out["ratio_per_round"] = [round(x, 4) for x in ratios]
        out["ratio_of_medians"] = round(red["rollouts_per_s"] / mem["rollouts_per_s"], 4) \
            if mem["rollouts_per_s"] else None
        # What redis / memory rollouts/s would be if both got the same CPU: on a machine shared
        # with other jobs the CPU each round gets moves the rollouts/s far more than the store.
        redis_cpu = red["server_cpu_ms_per_rollout"] + red["redis_server_cpu_ms_per_rollout"]
        out["ratio_cpu_equivalent"] = round(mem["server_cpu_ms_per_rollout"] / redis_cpu, 4) \
            if redis_cpu else None
        return out

    def report(self, sigma: dict[str, Any]) -> dict[str, Any]:
        per_sample = self.pattern_summary("per_sample")
        pieces = self.pattern_summary("pieces")
        assert per_sample is not None
        c = self.check
        red = per_sample["stores"]["redis"]
        errors = sum(r.errors for r in self.rounds)
        targets = [
            target("per-sample /get_reward: redis / memory rollouts/s",
                   per_sample["ratio_redis_to_memory"], RATIO_TARGET, f">= {RATIO_TARGET}",
                   AT_LEAST),
            target("per-sample /get_reward: Redis round trips per rollout",
                   red["round_trips_per_rollout"], ROUND_TRIPS_TARGET,
                   f"<= {ROUND_TRIPS_TARGET:g}", AT_MOST),
            target("groups whole, closed once, HERO of the whole group, same rewards",
                   float(sum(c.failures.values()) + errors), 0.0,
                   "== 0 failures and 0 failed requests", AT_MOST),
        ]
        return {
            "meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "mode": self.plan.name, "duration_s": round(self.elapsed(), 1),
                     "cores": cores(),
                     "loadavg_1m": [round(self.load_start, 2), round(os.getloadavg()[0], 2)],
                     "reward_model": self.args.reward_model, "device": self.args.device,
                     "verifier_workers": self.args.verifier_workers,
                     "max_batch_tokens": self.args.max_batch_tokens,
                     "group_size": GROUP_SIZE, "run": RUN,
                     "plan": asdict(self.plan), "commit": git_commit()},
            "per_sample": per_sample,
            "pieces": pieces,
            "correctness": {"ok": c.ok, "failures": c.failures, "examples": c.examples,
                            "groups_checked": c.groups, "rollouts_compared": c.rollouts_compared,
                            "max_rm_score_diff": c.max_rm_diff,
                            "max_reward_diff_same_sigma_ref": c.max_reward_diff_same_sigma,
                            "max_reward_diff_raw": c.max_reward_diff_raw,
                            "failed_requests": errors},
            "running_sigma_ref": sigma,
            "targets": targets,
        }


# ---------------------------------------------------------------------------------------------
# Output


def table(r: dict[str, Any]) -> str:
    m = r["meta"]
    lines = [f"group-store benchmark ({m['mode']}) — {m['date']} — {m['cores']} cores; RM "
             f"{m['reward_model']} on {m['device']}; groups of {m['group_size']}; "
             f"{m['duration_s']:.0f} s; load avg {m['loadavg_1m'][0]:.1f}→"
             f"{m['loadavg_1m'][1]:.1f}; commit {m['commit']}",
             f"{'pattern / store':<32} {'rollouts/s':>10} {'p99 s':>6} {'trips/rollout':>13} "
             f"{'cpu ms/rollout':>20}  rounds (rollouts/s)",
             "-" * 110]
    for key, label in (("per_sample", "per-sample /get_reward"), ("pieces", "pieces /v1/rewards")):
        s = r.get(key)
        if not s:
            continue
        for store in STORES:
            x = s["stores"][store]
            runs = " ".join(f"{q['rollouts_per_s']:.1f}" for q in x["rounds"])
            cpu = f"{x['server_cpu_ms_per_rollout']:.1f}"
            if store == "redis":
                cpu += f" +{x['redis_server_cpu_ms_per_rollout']:.2f} redis"
            lines.append(f"{label + ': ' + store:<32} {x['rollouts_per_s']:>10.1f} "
                         f"{x['latency_p99_s'] or 0:>6.2f} {x['round_trips_per_rollout']:>13.2f} "
                         f"{cpu:>20}  {runs}")
        lines.append(f"{'':<32} redis / memory {s['ratio_redis_to_memory']:.3f} (median of "
                     f"rounds {', '.join(f'{v:.2f}' for v in s['ratio_per_round'])}; ratio of "
                     f"medians {s['ratio_of_medians']:.3f}); CPU-equivalent "
                     f"{s['ratio_cpu_equivalent']:.3f} (server CPU per rollout, memory over "
                     "redis + redis-server)")
        by_op = s["stores"]["redis"]["round_trips_per_rollout_by_op"]
        lines.append(f"{'':<32} Redis round trips per rollout by op: "
                     + ", ".join(f"{op} {v:.2f}" for op, v in by_op.items())
                     + f"; without the timer-driven {' and '.join(TIMER_OPS)}: "
                     f"{s['stores']['redis']['round_trips_per_rollout_without_timers']:.2f}")
    lines.append(f"{'':<32} (memory: the in-process store's operations, no network)")
    c = r["correctness"]
    lines += ["",
              f"correctness: {c['groups_checked']} groups checked, {c['rollouts_compared']} "
              f"rollouts compared across stores; max |Δ RM score| {c['max_rm_score_diff']:.1e}, "
              f"max |Δ reward| at the same sigma-bar {c['max_reward_diff_same_sigma_ref']:.1e} "
              f"(raw, each store's own sigma-bar: {c['max_reward_diff_raw']:.1e}); "
              + ("no failures" if c["ok"] else f"FAILURES {c['failures']}")]
    lines += [f"  {e}" for e in c["examples"]]
    lines.append("running sigma-bar: " + ", ".join(f"{s} {v}" for s, v in
                                                   r["running_sigma_ref"].items()))
    lines += ["", *target_lines(r["targets"], name_width=66, value_width=6)]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="group store: Redis vs in-memory "
                                                 "(see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke version")
    parser.add_argument("--reward-model", default="embedded", help="embedded (default) or hf:PATH")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--verifier-workers", type=int, default=1,
                        help="verifier processes of each service (default 1)")
    parser.add_argument("--max-batch-tokens", type=int, default=0,
                        help="service token budget (default: the service's own for the device)")
    parser.add_argument("--rounds", type=int, default=0, help="per-sample rounds per store "
                        "(default 6; 2 with --quick)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="soft time bound: rounds stop at 60 %% of it, the pieces pattern "
                             "is skipped past 70 %% (default 480; 200 with --quick)")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--data", default=None, help="rollouts JSONL (default: the dev data)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(**{**asdict(plan), "rounds": args.rounds})
    args.budget_s = args.budget_s or plan.budget_s
    bench = GroupStoreBench(args, plan)

    stop_on_sigterm()
    try:
        bench.start()
        result = asyncio.run(bench.run())
    finally:
        bench.stop()
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "group_store.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (out_dir / "group_store.txt").write_text(text + "\n")
    print(text)
    log(f"wrote {out_dir / 'group_store.json'}")
    return 0 if result["correctness"]["ok"] and not result["correctness"]["failed_requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
