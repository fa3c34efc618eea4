"""The one admission permit: its bound, its two refusals, parked rollouts held against it, and the
load-shedding middleware asking it (in-process and against a real service)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from support import running_server

from hero_service.admission import Admission
from hero_service.errors import Overloaded, TooManyRollouts
from hero_service.metrics import Metrics


def gauge(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def rejections(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("hero_rejected_requests_total",
                                             {"reason": reason}) or 0.0


def test_permits_are_refused_past_the_bound_and_returned_on_release():
    metrics = Metrics()
    admission = Admission(5, metrics)
    first = admission.try_acquire(3)
    with pytest.raises(Overloaded) as full:
        admission.try_acquire(3)
    assert full.value.message == "3 rollouts in flight (limit 5); retry later"
    assert full.value.status == 429 and full.value.retry_after_s == 1
    assert admission.held == 3 and not admission.full
    with admission.try_acquire(2):
        assert admission.full
    first.release()
    first.release()  # a second release returns nothing twice
    assert admission.held == 0
    assert rejections(metrics, "overloaded") == 1


def test_a_request_larger_than_the_bound_is_413_naming_its_field():
    metrics = Metrics()
    admission = Admission(4, metrics)
    with pytest.raises(TooManyRollouts) as info:
        admission.try_acquire(5, field="query")
    error = info.value
    assert (error.status, error.code, error.field) == (413, "too_many_rollouts", "query")
    assert "5 rollouts" in error.message and "limit is 4" in error.message
    assert admission.held == 0
    assert rejections(metrics, "too_many_rollouts") == 1


def test_a_parked_permit_holds_its_room_but_leaves_the_queue_depth():
    metrics = Metrics()
    admission = Admission(8, metrics)
    scoring = admission.try_acquire(2)
    parked = admission.try_acquire(5)
    assert gauge(metrics, "hero_queue_depth") == 7
    parked.park()
    assert admission.held == 7 and admission.scoring == 2
    assert gauge(metrics, "hero_queue_depth") == 2
    with pytest.raises(Overloaded):
        admission.try_acquire(2)
    with pytest.raises(RuntimeError), parked:
        raise RuntimeError("the wait failed")  # any way out of the block releases
    scoring.release()
    assert admission.held == 0 and gauge(metrics, "hero_queue_depth") == 0


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


async def wait_parked(client: httpx.AsyncClient, requests: int) -> None:
    for _ in range(400):
        text = (await client.get("/metrics")).text
        if f"hero_group_waiting_requests {float(requests)}" in text:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{requests} request(s) never parked")


def queries(*parts: tuple[dict, list[str]]) -> dict:
    """An OpenRLHF body of one query per (row, response)."""
    pairs = [(row, x) for row, responses in parts for x in responses]
    return {"query": [row["prompt"] + x for row, x in pairs],
            "prompts": [row["prompt"] for row, _ in pairs],
            "labels": [row["reference"] for row, _ in pairs]}


def test_parked_rollouts_hold_their_permit_on_a_real_service(dev_rows):
    """--max-queued-rollouts 4, groups of 4: a request parked with 3 rollouts leaves room for 1
    (a request of 2 is refused with the one message), and is not in hero_queue_depth; once 4 are
    parked the middleware refuses every scoring request before reading its body, until the
    groups close partial at their deadline and the room comes back."""
    a, b, c = dev_rows[0], dev_rows[1], dev_rows[2]
    with running_server("--max-queued-rollouts", "4", "--group-size", "4",
                        "--group-timeout-s", "3", "--verifier-workers", "1") as srv:
        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                parked = asyncio.ensure_future(
                    client.post("/get_reward", json=queries((a, a["responses"][:3]))))
                await wait_parked(client, 1)
                depth = metric(srv.url, "hero_queue_depth")
                refused = await client.post("/v1/rewards", json={"groups": [
                    {"prompt": b["prompt"], "reference": b["reference"],
                     "responses": b["responses"][:2]}]})
                last = await client.post("/get_reward", json=queries((a, a["responses"][3:4])))
                whole = await parked

                full = asyncio.ensure_future(client.post("/get_reward", json=queries(
                    (b, b["responses"][:2]), (c, c["responses"][:2]))))
                await wait_parked(client, 1)
                shed = await client.post("/v1/rewards", content=b"{not json",
                                         headers={"content-type": "application/json"})
                partial = await full
                after = await client.post("/v1/rewards", json={"groups": [
                    {"prompt": b["prompt"], "reference": b["reference"],
                     "responses": b["responses"][:4]}]})
                return depth, refused, last, whole, shed, partial, after

        depth, refused, last, whole, shed, partial, after = asyncio.run(go())

    assert depth == 0  # parked rollouts are not the scoring backlog
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"] == {"code": "overloaded", "field": None,
                                       "message": "3 rollouts in flight (limit 4); retry later"}
    assert refused.headers["retry-after"] == "1"
    assert last.status_code == 200 and whole.status_code == 200, (last.text, whole.text)
    assert whole.json()["extra_logs"]["partial"] == [0.0] * 3
    assert shed.status_code == 429, shed.text  # refused before the (invalid) body was read
    assert shed.json()["error"]["message"] == "4 rollouts in flight (limit 4); retry later"
    assert partial.status_code == 200, partial.text
    assert partial.json()["extra_logs"]["partial"] == [1.0] * 4
    assert after.status_code == 200, after.text
