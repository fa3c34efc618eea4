"""Issue 11 acceptance across a Redis restart: three service processes on one real redis-server
(AOF, fsync on every write) and OpenRLHF's own executor sending one query per call over the three
URLs. Half of a group is parked in the store when Redis is SIGKILLed; the other half is sent
while it is down (503 + Retry-After, which OpenRLHF's retries ride out; /readyz is 503 too);
then Redis starts again on the same port and dir:

- with its data (AOF): the members survived, so the group is scored whole and once, equal to
  HERO of the whole group, weighted with the sigma-bar from before the restart, which every
  replica still reports;
- empty (the volume lost, or Redis run without persistence): the parked members re-join with
  the time they had left, so the group is still scored whole; sigma-bar starts again from the
  next groups, and every replica reports the same value. Identical responses split by such a
  restart stay separate members: the parked requests take their lost attachment leases back."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import pytest
import redis as redis_py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis_support import RedisServer
from scale_support import (
    check_group,
    one_query_per_call,
    openrlhf_executor,
    send_one_query_per_call,
)
from support import ServerProcess

from hero_client import hero

pytestmark = pytest.mark.timeout(240)

N = 8
DEADLINE_S = 30  # the group deadline: a group closed by it would come back partial
OUTAGE_S = 1.5  # Redis stays down this long: OpenRLHF's retries (1 s apart, 5 tries) span it


@dataclass
class Cluster:
    redis: RedisServer
    replicas: list[ServerProcess]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.replicas]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Persistence as strict as it gets: every acknowledged write is on disk before the reply.
    with RedisServer(appendonly=True, extra_args=["--appendfsync", "always"]) as redis:
        replicas = [ServerProcess(["--group-store", redis.url, "--group-size", str(N),
                                   "--group-timeout-s", str(DEADLINE_S),
                                   "--verifier-workers", "1"])
                    for _ in range(3)]
        try:
            # Launched together so they load their models at once, from this (main) thread:
            # each dies with the thread that started it.
            for server in replicas:
                server.start(wait=False)
            for server in replicas:
                server.wait_ready(server.ready_timeout_s)
            yield Cluster(redis, replicas)
        finally:
            for server in replicas:
                server.stop()


@dataclass
class Rows:
    mixed: list[dict]  # groups with verified and unverified responses: the restarted groups
    plain: list[dict]  # the others (warm-up groups, probes): a distinct prompt for each use


@pytest.fixture(scope="module")
def rows(dev_rows) -> Rows:
    distinct = [r for r in dev_rows if len(set(r["responses"][:N])) == N]
    mixed = [r for r in distinct if 0 < sum(r["grader_correct"][:N]) < N]
    return Rows(mixed, [r for r in distinct if r not in mixed])


def calls_for(row: dict) -> list[tuple[str, str, str]]:
    return [(row["prompt"], row["prompt"] + x, row["reference"]) for x in row["responses"][:N]]


def check_whole(cluster: Cluster, row: dict, answers: list[dict]) -> float:
    """The group came back whole, once, equal to HERO of the whole group; returns its sigma."""
    check_group(cluster.urls[0], row["prompt"], row["reference"], row["responses"][:N], answers)
    return hero.group_sigma([a["extra_logs"]["rm_score"][0] for a in answers])


def score_whole_group(cluster: Cluster, row: dict) -> float:
    """One group over the three replicas, one query per call, checked whole; its sigma."""
    return check_whole(cluster, row, one_query_per_call(cluster.urls, calls_for(row)))


def sigma_bars(cluster: Cluster) -> list[dict[str, float]]:
    return [httpx.get(u + "/v1/info", timeout=10).json()["running_sigma_ref"]
            for u in cluster.urls]


def metric_sum(text: str, name: str) -> float:
    """Sum of one metric's samples, whatever their labels (Prometheus text format)."""
    pattern = re.compile(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(value) for value in pattern.findall(text))


async def replica_metric(client: httpx.AsyncClient, cluster: Cluster, name: str) -> float:
    """One metric summed over the replicas."""
    texts = [(await client.get(u + "/metrics")).text for u in cluster.urls]
    return sum(metric_sum(t, name) for t in texts)


async def get_reward_statuses(client: httpx.AsyncClient, cluster: Cluster) -> dict[str, float]:
    """``/get_reward`` responses by status code, summed over the replicas."""
    counts: dict[str, float] = {}
    for u in cluster.urls:
        text = (await client.get(u + "/metrics")).text
        for status, value in re.findall(
                r'^hero_requests_total\{endpoint="/get_reward",status="(\d+)"\} (\S+)$', text,
                re.M):
            counts[status] = counts.get(status, 0.0) + float(value)
    return counts


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float,
                what: Optional[str]) -> None:
    """Poll ``check`` until true; past ``timeout_s`` fail with ``what`` (None: just go on)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            if what is None:
                return
            raise AssertionError(f"{what} within {timeout_s} s")
        await asyncio.sleep(0.1)


@dataclass
class RestartRun:
    answers: list[dict]  # in the group's order
    statuses: dict[str, float]  # /get_reward responses by status during the run
    ready_while_down: list[int]
    probe_while_down: httpx.Response
    took_s: float  # from the restart to the last answer


async def restart_mid_group(cluster: Cluster, row: dict, probe_row: dict, *,
                            wipe: bool) -> RestartRun:
    executor = openrlhf_executor(cluster.urls)
    calls = calls_for(row)
    half = N // 2
    async with httpx.AsyncClient(timeout=10) as client:
        before = await get_reward_statuses(client, cluster)
        first = asyncio.ensure_future(send_one_query_per_call(executor, calls[:half]))

        async def first_half_parked() -> bool:
            return await replica_metric(client, cluster, "hero_group_waiting_requests") == half
        await until(first_half_parked, 60, "the first half never parked")
        await asyncio.to_thread(cluster.redis.kill)
        if wipe:
            cluster.redis.wipe()
        # The other half arrives while Redis is down: refused 503, re-sent by OpenRLHF.
        second = asyncio.ensure_future(send_one_query_per_call(executor, calls[half:]))
        ready = [(await client.get(u + "/readyz")).status_code for u in cluster.urls]
        probe = await client.post(cluster.urls[0] + "/get_reward", params={"run": "probe"},
                                  json={"query": [probe_row["prompt"] + probe_row["responses"][0]],
                                        "prompts": [probe_row["prompt"]],
                                        "labels": [probe_row["reference"]]})
        await asyncio.sleep(OUTAGE_S)
        cluster.redis.start()  # on this (main) thread: the server dies with the thread that
        # started it. It blocks the loop for the moments redis-server takes to load its AOF.
        restarted = time.monotonic()
        answers = [*await first, *await second]
        took = time.monotonic() - restarted
        after = await get_reward_statuses(client, cluster)

        async def all_ready() -> bool:
            codes = [(await client.get(u + "/readyz")).status_code for u in cluster.urls]
            return codes == [200] * len(codes)
        await until(all_ready, 10, "the replicas did not turn ready again")
    statuses = {s: after[s] - before.get(s, 0.0) for s in after if after[s] > before.get(s, 0.0)}
    return RestartRun(answers, statuses, ready, probe, took)


def check_outage_was_ridden_out(run: RestartRun) -> None:
    assert run.ready_while_down == [503, 503, 503]  # not ready while the store is down
    assert run.probe_while_down.status_code == 503, run.probe_while_down.text
    assert run.probe_while_down.json()["error"]["code"] == "group_store_unavailable"
    assert int(run.probe_while_down.headers["Retry-After"]) >= 1
    # Every query answered 200 in the end; the only refusals were the outage's 503s (the
    # second half's first attempts and the probe), which the retries fixed.
    assert set(run.statuses) == {"200", "503"}, run.statuses
    assert run.statuses["200"] == N and run.statuses["503"] >= 2, run.statuses
    assert run.took_s < DEADLINE_S  # closed when whole, not at its deadline


def test_redis_restart_with_persistence_keeps_the_group_and_sigma(cluster, rows):
    warm, row, probe = rows.plain[0], rows.mixed[-1], rows.plain[1]
    score_whole_group(cluster, warm)
    before = sigma_bars(cluster)
    sigma_bar = before[0]["default"]
    assert sigma_bar > 0 and all(v == before[0] for v in before)

    run = asyncio.run(restart_mid_group(cluster, row, probe, wipe=False))

    check_outage_was_ridden_out(run)
    sigma = check_whole(cluster, row, run.answers)
    # Weighted with the sigma-bar from before the restart: it survived, and it was used.
    assert run.answers[0]["extra_logs"]["sigma_ref"][0] == pytest.approx(sigma_bar, abs=1e-12)
    after = sigma_bars(cluster)
    assert all(v == after[0] for v in after)  # one series, shared
    assert "probe" not in after[0]  # the refused probe left nothing behind
    # ...and the whole group moved it, from its old value towards the group's sigma.
    lo, hi = sorted((sigma_bar, sigma))
    assert lo - 1e-12 <= after[0]["default"] <= hi + 1e-12
    assert sigma == sigma_bar or after[0]["default"] != sigma_bar


def test_redis_restart_that_loses_everything_still_scores_the_group_whole(cluster, rows):
    warm, row, probe, later = rows.plain[2], rows.mixed[-2], rows.plain[3], rows.plain[4]
    score_whole_group(cluster, warm)
    assert all(v.get("default", 0) > 0 for v in sigma_bars(cluster))  # sigma-bar exists...

    run = asyncio.run(restart_mid_group(cluster, row, probe, wipe=True))

    check_outage_was_ridden_out(run)
    # ...the restart lost it and the parked members; those re-joined, and the group is whole.
    sigma = check_whole(cluster, row, run.answers)
    # Weighted like a run's first group (sigma-bar starts again: its own sigma), which seeds
    # the new series on every replica.
    assert run.answers[0]["extra_logs"]["sigma_ref"][0] == pytest.approx(sigma, abs=1e-12)
    seeded = sigma_bars(cluster)
    assert seeded == [{"default": pytest.approx(sigma, abs=1e-12)}] * 3
    # More groups: the replicas keep reporting one series, folding them in.
    later_sigma = score_whole_group(cluster, later)
    recovered = sigma_bars(cluster)
    assert all(v == recovered[0] for v in recovered) and set(recovered[0]) == {"default"}
    lo, hi = sorted((sigma, later_sigma))
    assert lo - 1e-12 <= recovered[0]["default"] <= hi + 1e-12


def attachment_leases(redis: RedisServer) -> int:
    """Attachment leases held in Redis (the service's default key prefix)."""
    client = redis_py.Redis(host="127.0.0.1", port=redis.port)
    try:
        return sum(client.get(k) == b"1" for k in client.scan_iter("hero:gs:attached:*"))
    finally:
        client.close()


def test_identical_responses_split_by_a_restart_that_loses_everything(cluster, rows):
    """Identical responses send identical bodies; their members are told apart by attachment
    leases (``#0``, ``#1``...), which a restart without persistence loses along with the group.
    The parked requests renew theirs, so a twin sent after the restart takes a new id and the
    group is still whole (a twin on a parked one's id would leave it one member short, to
    close partial at its deadline)."""
    row = rows.mixed[0]
    correct = next(x for x, ok in zip(row["responses"], row["grader_correct"]) if ok)
    wrong = next(x for x, ok in zip(row["responses"], row["grader_correct"]) if not ok)
    responses = [correct] * 5 + [wrong] * 3
    calls = [(row["prompt"], row["prompt"] + x, row["reference"]) for x in responses]
    half = N // 2

    async def go() -> list[dict]:
        executor = openrlhf_executor(cluster.urls)
        async with httpx.AsyncClient(timeout=10) as client:
            first = asyncio.ensure_future(send_one_query_per_call(executor, calls[:half]))

            async def first_half_parked() -> bool:
                return await replica_metric(client, cluster,
                                            "hero_group_waiting_requests") == half
            await until(first_half_parked, 60, "the first half never parked")
            cluster.redis.restart(wipe=True)  # SIGKILL; back at once, empty

            async def leases_back() -> bool:
                return attachment_leases(cluster.redis) == half
            # The twin is sent once the parked requests have renewed (within a second). One
            # sent in that second could still take a lost id: its group would then close
            # partial, flagged, at its deadline (the limit of leases kept in Redis).
            await until(leases_back, 5, None)
            second = await send_one_query_per_call(executor, calls[half:])
            return [*await first, *second]

    answers = asyncio.run(go())
    check_group(cluster.urls[0], row["prompt"], row["reference"], responses, answers)
