"""Overload: a burst of 10x the sustainable rate. The service pushes back with 429 + Retry-After,
memory stays flat, accepted requests keep a bounded latency, and the SDK's retries end with every
rollout scored exactly once."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import psutil
from support import running_server

from hero_client import AsyncHeroClient, RetryPolicy

ROLLOUTS_PER_REQUEST = 8


class RecordingTransport(httpx.AsyncHTTPTransport):
    """The SDK's transport seam, recording every attempt's status, latency and Retry-After."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[tuple[int, float, str | None]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.monotonic()
        response = await super().handle_async_request(request)
        await response.aread()
        self.attempts.append((response.status_code, time.monotonic() - started,
                              response.headers.get("retry-after")))
        return response


def group(i: int) -> dict:
    return {"id": f"g{i}", "prompt": f"What is {i} + 1?", "reference": str(i + 1),
            "responses": [f"We add: \\boxed{{{i + 1 + k % 2}}} (attempt {k})"
                          for k in range(ROLLOUTS_PER_REQUEST)]}


def scored_total(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('hero_rollouts_scored_total{mode="hero"}'):
            return float(line.split()[-1])
    return 0.0


def tree_rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def test_burst_of_ten_times_the_sustainable_rate(figures):
    with running_server("--max-queued-rollouts", "64", "--verifier-workers", "1") as srv:
        async def sustainable_rate() -> float:
            async with AsyncHeroClient(srv.url) as client:
                started, n = time.monotonic(), 0
                while time.monotonic() - started < 3.0:
                    await client.score([group(100_000 + n)])
                    n += 1
                return n / (time.monotonic() - started)

        rate = asyncio.run(sustainable_rate())
        before_total = scored_total(srv.url)
        rss_before = tree_rss_mb(srv.proc.pid)
        rss_samples: list[float] = []
        stop = threading.Event()

        def sample_rss():
            while not stop.is_set():
                rss_samples.append(tree_rss_mb(srv.proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample_rss)
        sampler.start()
        burst_s = 1.0
        n_requests = max(20, int(10 * rate * burst_s))
        transport = RecordingTransport()

        async def burst():
            async with AsyncHeroClient(srv.url, transport=transport, max_concurrency=1,
                                       retry=RetryPolicy(max_attempts=200, backoff_s=0.05,
                                                         max_backoff_s=1.0)) as client:
                async def one(i: int):
                    await asyncio.sleep(i * burst_s / n_requests)  # 10x the rate, spread out
                    return await client.score([group(i)])

                return await asyncio.gather(*(one(i) for i in range(n_requests)))

        started = time.monotonic()
        try:
            results = asyncio.run(burst())
        finally:
            stop.set()
            sampler.join()
        elapsed = time.monotonic() - started
        scored = scored_total(srv.url) - before_total

    ids = [r.groups[0].id for r in results]
    assert ids == [f"g{i}" for i in range(n_requests)]  # 0 lost, each caller its own group
    assert all(len(r.groups[0].rewards) == ROLLOUTS_PER_REQUEST for r in results)
    assert scored == n_requests * ROLLOUTS_PER_REQUEST  # 0 duplicated on the server side
    rejected = [a for a in transport.attempts if a[0] == 429]
    accepted = sorted(a[1] for a in transport.attempts if a[0] == 200)
    assert rejected, "the burst never met back-pressure"
    assert all(a[2] is not None for a in rejected)  # every 429 says when to come back
    assert {a[0] for a in transport.attempts} <= {200, 429}
    p99 = accepted[min(len(accepted) - 1, int(0.99 * len(accepted)))]
    assert p99 < 30.0
    rss_growth = max(rss_samples) - rss_before
    assert rss_growth < 300, (rss_before, max(rss_samples))
    figures.record("overload", "sustainable rate (requests/s of 8 rollouts)", rate)
    figures.record("overload", "burst sent (requests in 1 s, = 10x)", n_requests)
    figures.record("overload", "429 answers (all with Retry-After)", len(rejected))
    figures.record("overload", "accepted-request latency p50 / p99 (s)",
                   f"{accepted[len(accepted) // 2]:.2f} / {p99:.2f}")
    figures.record("overload", "lost / duplicated rollouts", "0 / 0")
    figures.record("overload", "rollouts scored", int(scored))
    figures.record("overload", "burst fully scored after (s)", elapsed)
    figures.record("overload", "service RSS before / max during (MB)",
                   f"{rss_before:.0f} / {max(rss_samples):.0f}")
