"""The HTTP server: SIGTERM drains (readiness turns 503, new requests get 503, in-flight requests
finish); idle connections outlive the clients' idle timeout."""

from __future__ import annotations

import asyncio
import http.client
import signal
import time

import httpx
from support import ServerProcess

from hero_client._transport import KEEPALIVE_EXPIRY_S
from hero_service.config import Settings


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(dev_rows):
    server = ServerProcess(["--verifier-workers", "1", "--max-batch-tokens", "1024"]).start()
    try:
        def request(k):  # distinct texts, so nothing is deduplicated away
            return {"groups": [{"prompt": r["prompt"], "reference": r["reference"],
                                "responses": [f"{x} [{k}]" for x in r["responses"]]}
                               for r in dev_rows[k * 6:(k + 1) * 6]]}

        async def go():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                in_flight = [asyncio.ensure_future(client.post("/v1/rewards", json=request(k)))
                             for k in range(4)]
                await asyncio.sleep(0.5)
                server.signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                ready = await client.get("/readyz")
                late = await client.post("/v1/rewards", json=request(5))
                done = await asyncio.gather(*in_flight)
                return ready, late, done

        ready, late, done = asyncio.run(go())
        assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"]
        assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
        assert [r.status_code for r in done] == [200] * 4
        assert all(len(r.json()["groups"]) == 6 for r in done)
        deadline = time.monotonic() + 30
        while server.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.proc.returncode == 0, server.log()
        assert "drained; shutting down" in server.log()
    finally:
        server.stop()


def test_an_idle_connection_stays_open_past_the_clients_idle_timeout(server):
    """A client reuses a pooled connection until its own idle timeout (the SDK's and httpx's
    5 s, aiohttp's 15 s); a server that closes sooner or at the same moment makes a request sent
    just then fail with a read error (uvicorn's default is 5 s, and the group-store bench lost a
    member so). The service keeps idle connections for ``--keep-alive-s`` (75 s)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        time.sleep(KEEPALIVE_EXPIRY_S + 1.5)  # past uvicorn's own 5 s
        conn.request("GET", "/healthz")  # a closed socket: RemoteDisconnected here
        again = conn.getresponse()
        again.read()
        same_socket = conn.sock is sock
    finally:
        conn.close()
    assert first.status == again.status == 200 and same_socket
    assert Settings().keep_alive_s > KEEPALIVE_EXPIRY_S
