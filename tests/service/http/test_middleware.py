"""The ASGI middlewares (hero_service.http.middleware) in-process through httpx.ASGITransport, on
the app create_app builds: load shedding answers 429 + Retry-After before reading the body, the
body-size limit answers 413 on Content-Length and while streaming, and every request is counted
and timed under its endpoint (refusals too) and carries an x-request-id."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from support import app_service, asgi_client, started_app_fixture

from hero_service.config import Settings
from hero_service.http.middleware import RequestIds
from hero_service.state import Service

pytestmark = pytest.mark.anyio

MAX_BODY = 2048
SETTINGS = Settings(verifier_workers=1, max_body_bytes=MAX_BODY, max_queued_rollouts=8,
                    verifier="exact")
SCORE = {"groups": [{"prompt": "What is 2+2?", "reference": "4",
                     "responses": ["\\boxed{4}", "\\boxed{5}"]}]}


app = started_app_fixture(SETTINGS)


@pytest.fixture
def service(app: FastAPI) -> Service:
    return app_service(app)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as client:
        yield client


def count(service: Service, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


class TrackedBody:
    """A streamed request body (no Content-Length) that records how much of it was read."""

    def __init__(self, chunk: bytes, chunks: int) -> None:
        self.chunk = chunk
        self.chunks = chunks
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.sent += 1
            yield self.chunk


async def test_a_full_service_sheds_scoring_requests_before_reading_them(service, client):
    shed_before = count(service, "hero_rejected_requests_total", reason="overloaded")
    body = TrackedBody(b"{not json", 1)
    with service.admission.try_acquire(8):
        refused = await client.post("/v1/rewards", content=body,
                                    headers={"content-type": "application/json"})
        refused_openrlhf = await client.post("/get_reward", json={"query": ["x"]})
        health = await client.get("/healthz")
        info = await client.get("/v1/info")

    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": {"code": "overloaded", "field": None,
                                        "message": "8 rollouts in flight (limit 8); retry later"}}
    assert body.sent == 0  # not a byte of the body was read
    assert refused_openrlhf.status_code == 429
    assert count(service, "hero_rejected_requests_total", reason="overloaded") - shed_before == 2
    # Only the scoring endpoints are shed.
    assert (health.status_code, info.status_code) == (200, 200)
    # With the room back, the same endpoint scores again.
    scored = await client.post("/v1/rewards", json=SCORE)
    assert scored.status_code == 200, scored.text
    assert scored.json()["groups"][0]["verifier_status"] == ["correct", "incorrect"]


async def test_a_declared_body_over_the_limit_is_413_unread(client):
    body = TrackedBody(b"x" * 512, 5)
    r = await client.post("/v1/rewards", content=body,
                          headers={"content-length": str(MAX_BODY + 512),
                                   "content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json() == {"error": {"code": "payload_too_large", "field": "body",
                                  "message": f"request body exceeds {MAX_BODY} bytes"}}
    assert body.sent == 0


async def test_a_streamed_body_is_cut_off_once_it_passes_the_limit(client):
    body = TrackedBody(b"x" * 512, 100)  # 50 KiB if read to the end
    r = await client.post("/v1/rewards", content=body,
                          headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    assert body.sent == MAX_BODY // 512 + 1  # the first chunk past 2048 bytes, and no more


async def test_a_body_within_the_limit_reaches_the_app(client):
    padded = {**SCORE, "request_id": "x" * (MAX_BODY - 400)}
    r = await client.post("/v1/rewards", json=padded)
    assert r.status_code == 200, r.text
    assert r.json()["request_id"] == padded["request_id"]


async def test_requests_are_counted_and_timed_under_their_endpoint(service, client, caplog):
    def requests(endpoint: str, status: str) -> float:
        return count(service, "hero_requests_total", endpoint=endpoint, status=status)

    before = {key: requests(*key) for key in [
        ("/v1/rewards", "200"), ("/v1/rewards", "422"), ("/v1/rewards", "413"),
        ("/healthz", "200"), ("unmatched", "404")]}
    timed_before = count(service, "hero_request_duration_seconds_count", endpoint="/v1/rewards")

    with caplog.at_level(logging.INFO, logger="hero_service.access"):
        ok = [await client.post("/v1/rewards", json=SCORE) for _ in range(2)]
        bad = await client.post("/v1/rewards", json={"groups": []})
        big = await client.post("/v1/rewards", content=b"x" * (MAX_BODY + 1))
        await client.get("/healthz")
        await client.get("/no/such/path/1")
        await client.get("/no/such/path/2")

    assert [r.status_code for r in ok] == [200, 200]
    assert (bad.status_code, big.status_code) == (422, 413)
    assert requests("/v1/rewards", "200") - before["/v1/rewards", "200"] == 2
    assert requests("/v1/rewards", "422") - before["/v1/rewards", "422"] == 1
    assert requests("/v1/rewards", "413") - before["/v1/rewards", "413"] == 1  # before routing
    assert requests("/healthz", "200") - before["/healthz", "200"] == 1
    # Unrouted paths share one label, so a scan cannot grow the metric's label set.
    assert requests("unmatched", "404") - before["unmatched", "404"] == 2
    assert count(service, "hero_request_duration_seconds_count",
                 endpoint="/v1/rewards") - timed_before == 4

    ids = [r.headers["x-request-id"] for r in (*ok, bad, big)]
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids) and len(set(ids)) == 4
    # One access line per request outside the health/metrics probes, with its id and status.
    lines = [r.getMessage() for r in caplog.records if r.name == "hero_service.access"]
    assert f"request_id={ids[0]} POST /v1/rewards status=200" in lines[0]
    assert f"request_id={ids[3]} POST /v1/rewards status=413" in lines[3]
    assert not any("/healthz" in line for line in lines)
    assert service.active_requests == 0


def test_request_ids_are_twelve_hex_digits_unique_and_share_a_process_prefix():
    ids = RequestIds()
    made = [ids.next() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in made) and len(set(made)) == 1000
    assert len({i[:6] for i in made}) == 1  # one prefix per process: the counter follows
    assert [int(i[6:], 16) for i in made[:3]] == [0, 1, 2]
