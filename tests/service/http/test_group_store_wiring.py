"""/get_reward through the group store on one replica: the per-trainer group size and sigma-bar
series in the URL (``?n=``, ``?run=``), /v1/info's ``running_sigma_ref`` per run, /readyz while
the Redis store is unreachable, and parked requests answered at once on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
from support import ServerProcess, free_port, running_server


def per_query(url: str, path: str, row: dict, responses: list[str]) -> list[dict]:
    async def one(client, response):
        r = await client.post(path, json={"query": [row["prompt"] + response],
                                          "prompts": [row["prompt"]],
                                          "labels": [row["reference"]]})
        assert r.status_code == 200, r.text
        return r.json()

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(one(client, x) for x in responses))

    return asyncio.run(go())


def test_group_size_and_run_from_the_url(dev_rows):
    row = next(r for r in dev_rows if 0 < sum(r["grader_correct"][:4]) < 4)
    with running_server("--verifier-workers", "1", "--group-timeout-s", "60") as srv:
        answers = per_query(srv.url, "/get_reward?n=4&run=exp42", row, row["responses"][:4])
        info = httpx.get(srv.url + "/v1/info", timeout=10).json()
    logs = [a["extra_logs"] for a in answers]
    assert all(log["partial"] == [0.0] for log in logs)
    assert len({log["hero_weight"][0] for log in logs}) == 1  # one group of 4, scored once
    # the first group of run exp42 seeds its series; nothing else moved sigma-bar
    assert set(info["running_sigma_ref"]) == {"exp42"}
    assert info["running_sigma_ref"]["exp42"] == pytest.approx(logs[0]["sigma_ref"][0])


def test_a_run_name_with_control_characters_is_refused(server, auth):
    r = httpx.post(server.url + "/get_reward", params={"run": "a\nb"}, headers=auth, timeout=30,
                   json={"query": ["x"], "prompts": [""], "labels": ["1"]})
    assert r.status_code == 422 and "run" in r.text


def test_unreachable_redis_keeps_the_service_up_but_not_ready():
    port = free_port()  # nothing listens there
    store = f"redis://127.0.0.1:{port}/0"
    # Not waiting for /readyz 200: it must not come while Redis is unreachable.
    srv = ServerProcess(["--verifier-workers", "1", "--group-store", store,
                         "--group-size", "4"]).start(wait=False)
    try:
        deadline = time.monotonic() + 120
        r = None
        while time.monotonic() < deadline:
            assert srv.proc.poll() is None, srv.log()
            try:
                r = httpx.get(srv.url + "/readyz", timeout=2)
                if "group store" in r.text:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert r is not None and r.status_code == 503, srv.log()
        assert f"{store} unreachable" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
        # /get_reward fails fast with 503 + Retry-After, never hangs
        g = httpx.post(srv.url + "/get_reward", timeout=30, json={
            "query": ["x 1"], "prompts": ["x "], "labels": ["1"]})
        assert g.status_code == 503 and g.headers.get("retry-after"), g.text
        time.sleep(4.5)  # two more connection attempts: still one log line
        assert srv.log().count(f"group store {store} unreachable") == 1, srv.log()
    finally:
        srv.stop()


def test_sigterm_answers_parked_requests_at_once(dev_rows):
    row = dev_rows[3]
    srv = ServerProcess(["--verifier-workers", "1", "--group-size", "8",
                         "--group-timeout-s", "120", "--drain-timeout-s", "60"]).start()
    try:
        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                parked = asyncio.ensure_future(client.post("/get_reward", json={
                    "query": [row["prompt"] + row["responses"][0]], "prompts": [row["prompt"]],
                    "labels": [row["reference"]]}))
                for _ in range(200):  # until it is parked in its group
                    m = (await client.get("/metrics")).text
                    if "hero_group_waiting_requests 1.0" in m:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the request never parked")
                started = time.monotonic()
                srv.signal(signal.SIGTERM)
                r = await parked
                return r, time.monotonic() - started

        r, took = asyncio.run(go())
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert took < 5, took  # not the 120 s group deadline, nor the 60 s drain timeout
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
