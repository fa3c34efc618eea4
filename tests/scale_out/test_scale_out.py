"""Scale-out acceptance (issue 11): a real redis-server and THREE service processes sharing it as
their group store. OpenRLHF's own ``SingleTurnAgentExecutor`` with the list of the three URLs
sends one query per call, rotating over the replicas, so every group's members land on several
replicas; each group must be scored whole and once, equal to HERO of the whole group."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis_support import RedisServer
from scale_support import check_group, one_query_per_call
from support import ServerProcess

N = 8


@pytest.fixture(scope="module")
def replicas():
    with RedisServer() as redis:
        servers = [ServerProcess(["--group-store", redis.url, "--group-size", str(N),
                                  "--group-timeout-s", "60", "--verifier-workers", "1"])
                   for _ in range(3)]
        try:
            for server in servers:
                server.start()
            yield servers
        finally:
            for server in servers:
                server.stop()


def test_openrlhf_over_three_replicas_gets_whole_groups(replicas, dev_rows):
    urls = [s.url for s in replicas]
    rows = [r for r in dev_rows if 0 < sum(r["grader_correct"]) < N][:3]  # mixed groups
    calls = [(k, j) for k in range(len(rows)) for j in range(N)]
    random.Random(7).shuffle(calls)  # groups interleaved, as vLLM finishes samples
    answers = one_query_per_call(urls, [(rows[k]["prompt"], rows[k]["prompt"]
                                         + rows[k]["responses"][j], rows[k]["reference"])
                                        for k, j in calls])
    for k, row in enumerate(rows):
        mine = [a for (_, j), a in sorted(((c, a) for c, a in zip(calls, answers) if c[0] == k),
                                          key=lambda x: x[0][1])]
        check_group(urls[k % 3], row["prompt"], row["reference"], row["responses"][:N], mine)
    # one sigma-bar series per run, shared: every replica reports the same value
    infos = [httpx.get(u + "/v1/info", timeout=10).json() for u in urls]
    values = [info["running_sigma_ref"] for info in infos]
    assert values[0].get("default", 0) > 0 and all(v == values[0] for v in values)
    assert all(info["group_store"] == "redis" for info in infos)


def test_identical_responses_are_separate_members(replicas, dev_rows):
    """Short answers repeat: OpenRLHF then sends identical bodies, which must be N members, not
    one (the group would otherwise wait out its deadline and close partial)."""
    urls = [s.url for s in replicas]
    row = next(r for r in dev_rows if 0 < sum(r["grader_correct"]) < N)
    correct = next(x for x, ok in zip(row["responses"], row["grader_correct"]) if ok)
    wrong = next(x for x, ok in zip(row["responses"], row["grader_correct"]) if not ok)
    responses = [correct] * 5 + [wrong] * 3
    answers = one_query_per_call(urls, [(row["prompt"], row["prompt"] + x, row["reference"])
                                        for x in responses])
    check_group(urls[0], row["prompt"], row["reference"], responses, answers)


def test_a_replica_killed_mid_group_its_callers_re_send_to_a_survivor(dev_rows):
    """Half a group parks on replica A, which is SIGKILLed; those callers re-send their bodies
    to B (as a Kubernetes Service would route a retry), the other half goes to C: the group is
    scored whole, each member once (the dead replica's members are re-attached, not added)."""
    row = next(r for r in dev_rows[10:] if 0 < sum(r["grader_correct"]) < N)
    bodies = [{"query": [row["prompt"] + x], "prompts": [row["prompt"]],
               "labels": [row["reference"]]} for x in row["responses"][:N]]
    with RedisServer() as redis:
        flags = ["--group-store", redis.url, "--group-size", str(N), "--group-timeout-s", "90",
                 "--verifier-workers", "1"]
        a, b, c = (ServerProcess(flags) for _ in range(3))
        try:
            for server in (a, b, c):
                server.start()

            async def go():
                async with httpx.AsyncClient(timeout=120) as client:
                    doomed = [asyncio.ensure_future(client.post(a.url + "/get_reward", json=x))
                              for x in bodies[:4]]
                    for _ in range(300):  # until A's four requests are parked in the store
                        m = (await client.get(a.url + "/metrics")).text
                        if "hero_group_waiting_requests 4.0" in m:
                            break
                        await asyncio.sleep(0.1)
                    else:
                        raise AssertionError("A's requests never parked")
                    a.proc.kill()
                    lost = await asyncio.gather(*doomed, return_exceptions=True)
                    assert all(isinstance(x, httpx.TransportError) for x in lost), lost
                    answers = await asyncio.gather(
                        *(client.post(b.url + "/get_reward", json=x) for x in bodies[:4]),
                        *(client.post(c.url + "/get_reward", json=x) for x in bodies[4:]))
                    return answers

            started = time.monotonic()
            answers = asyncio.run(go())
            took = time.monotonic() - started
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
            check_group(b.url, row["prompt"], row["reference"], row["responses"][:N],
                        [r.json() for r in answers])
            assert took < 60, took  # closed when whole, not at its 90 s deadline
        finally:
            for server in (a, b, c):
                if server.proc is not None and server.proc.poll() is None:
                    server.stop()
