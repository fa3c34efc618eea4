"""The async client's two HTTP backends (``hero_client/_transport.py``): httpx's pool and
aiohttp's (through httpx-aiohttp), against the real service and a real uvicorn on loopback that
answers 429s and stalls; and what a request may not cost: no import-system lookups."""

from __future__ import annotations

import asyncio
import importlib.abc
import sys
import time
from typing import Optional

import pytest
from support import ThreadedServer, free_port

from hero_client import (
    AsyncHeroClient,
    HeroConnectionError,
    HeroTimeoutError,
    RetryPolicy,
    _transport,
)

BACKENDS = ["httpx", "aiohttp"]


def one_query(row: dict, k: int) -> tuple[list[str], list[str], list[str]]:
    response = f"(call {k}) {row['responses'][k % len(row['responses'])]}"
    return [row["prompt"] + response], [row["prompt"]], [row["reference"]]


class _LookupRecorder(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: sees every import the interpreter cannot answer from
    sys.modules (each one a search of sys.path), finds nothing itself."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname, path, target=None):
        self.names.append(fullname)
        return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_requests_make_no_import_lookups(server, dev_rows, backend):
    """httpcore imports sniffio on every lock it sets up; without sniffio installed each of
    those imports fails anew and searches sys.path (encode/httpcore#1103: ~0.7 ms of CPU per
    request here). The package depends on sniffio so the import is cached; nothing else on
    either backend may import per request either."""
    async def run() -> list[str]:
        async with AsyncHeroClient(server.url, api_key="test-key",
                                   http_backend=backend) as client:
            for k in range(3):  # warm: connections, first-use imports
                await client.get_reward(*one_query(dev_rows[0], k))
            recorder = _LookupRecorder()
            sys.meta_path.insert(0, recorder)
            try:
                await asyncio.gather(*(client.get_reward(*one_query(dev_rows[1], k))
                                       for k in range(16)))
            finally:
                sys.meta_path.remove(recorder)
            assert client.http_backend == backend
            return recorder.names

    assert asyncio.run(run()) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_requests_hand_nothing_to_worker_threads(server, dev_rows, backend):
    """A request on open connections runs on the event loop alone. aiohttp with trust_env
    looked up the environment's proxy and read ~/.netrc in the loop's executor for every request
    (two thread hand-offs and a file read: 1.09 -> 0.65 ms of client CPU per request at 16
    callers, bench/client_cost.py)."""
    async def run() -> int:
        async with AsyncHeroClient(server.url, api_key="test-key",
                                   http_backend=backend) as client:
            # Warm: 16 connections open and pooled, first-use imports done.
            await asyncio.gather(*(client.get_reward(*one_query(dev_rows[0], k))
                                   for k in range(16)))
            loop = asyncio.get_running_loop()
            handed_off = 0
            run_in_executor = loop.run_in_executor

            def counting(*args, **kwargs):
                nonlocal handed_off
                handed_off += 1
                return run_in_executor(*args, **kwargs)

            loop.run_in_executor = counting  # type: ignore[method-assign]
            try:
                await asyncio.gather(*(client.get_reward(*one_query(dev_rows[1], k))
                                       for k in range(16)))
            finally:
                del loop.run_in_executor
            return handed_off

    assert asyncio.run(run()) == 0


def proxy_app():
    """Stands in for an HTTP forward proxy: answers every /get_reward itself and records the
    Proxy-Authorization header it came with."""
    from fastapi import FastAPI, Header

    app = FastAPI()
    seen: list[str | None] = []

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/get_reward")
    async def get_reward(proxy_authorization: Optional[str] = Header(None)) -> dict:
        seen.append(proxy_authorization)
        return {"rewards": [0.25], "scores": [0.0], "extra_logs": {}}

    app.state.seen = seen
    return app


# httpx-aiohttp hands proxy credentials to aiohttp as proxy_auth, which aiohttp 3.14 deprecates
# (its replacement, proxy_headers, reaches only CONNECT tunnels, not a plain-HTTP proxy).
@pytest.mark.filterwarnings("ignore:.*(BasicAuth|proxy_auth).*:DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_environments_proxy_is_honoured_on_either_backend(monkeypatch, backend):
    """HTTP_PROXY (with credentials) routes the client's requests through the proxy; NO_PROXY
    naming the service's host sends them direct. The service's own address has nothing
    listening, so only a request that went through the proxy is answered."""
    app = proxy_app()
    service_url = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                 "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with ThreadedServer(app) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://user:secret@"))

        async def through_proxy() -> list[float]:
            async with AsyncHeroClient(service_url, http_backend=backend,
                                       retry=RetryPolicy(max_attempts=1)) as client:
                return (await client.get_reward(["q"], prompts=[""], labels=["1"])).rewards

        assert asyncio.run(through_proxy()) == [0.25]
        assert app.state.seen == ["Basic dXNlcjpzZWNyZXQ="]  # user:secret

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")

        async def direct() -> None:
            async with AsyncHeroClient(service_url, http_backend=backend,
                                       retry=RetryPolicy(max_attempts=1)) as client:
                with pytest.raises(HeroConnectionError):
                    await client.get_reward(["q"], prompts=[""], labels=["1"])

        asyncio.run(direct())
        assert len(app.state.seen) == 1


def test_both_backends_give_the_same_answers(server, dev_rows):
    async def answers(backend: str) -> list[tuple]:
        async with AsyncHeroClient(server.url, api_key="test-key",
                                   http_backend=backend) as client:
            scored = await client.score([{"prompt": r["prompt"], "reference": r["reference"],
                                          "responses": r["responses"]} for r in dev_rows[:3]],
                                        sigma_ref=0.1)
            single = await asyncio.gather(*(client.get_reward(*one_query(dev_rows[4], k))
                                            for k in range(4)))
        return ([(g.rewards, g.verified, g.rm_scores) for g in scored.groups]
                + [(s.rewards, s.scores) for s in single])

    assert answers_close(asyncio.run(answers("httpx")), asyncio.run(answers("aiohttp")))


def answers_close(a: list[tuple], b: list[tuple]) -> bool:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert u == pytest.approx(v, abs=1e-6)
    return True


def flaky_app(busy_answers: int, stall_s: float):
    """An ASGI app: ``/get_reward`` answers 429 + Retry-After ``busy_answers`` times, then a
    well-formed reward; ``/v1/info`` stalls ``stall_s`` before answering."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    calls: list[float] = []

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/get_reward")
    async def get_reward() -> JSONResponse:
        calls.append(time.monotonic())
        if len(calls) <= busy_answers:
            return JSONResponse({"error": {"code": "overloaded", "message": "busy"}},
                                status_code=429, headers={"Retry-After": "0.3"})
        return JSONResponse({"rewards": [0.5], "scores": [1.0], "extra_logs": {}})

    @app.get("/v1/info")
    async def info() -> dict:
        await asyncio.sleep(stall_s)
        return {}

    app.state.calls = calls
    return app


@pytest.mark.parametrize("backend", BACKENDS)
def test_retry_after_timeouts_and_refused_connections_on_either_backend(backend):
    app = flaky_app(busy_answers=2, stall_s=5.0)
    with ThreadedServer(app) as srv:
        async def run() -> None:
            async with AsyncHeroClient(srv.url, http_backend=backend, timeout=1.0,
                                       retry=RetryPolicy(max_attempts=3,
                                                         backoff_s=0.01)) as client:
                answer = await client.get_reward(["q"], prompts=[""], labels=["1"])
                assert answer.rewards == [0.5]
                calls = app.state.calls
                assert len(calls) == 3  # two 429s, each waited out, then the answer
                assert calls[1] - calls[0] >= 0.29 and calls[2] - calls[1] >= 0.29
                started = time.monotonic()
                with pytest.raises(HeroTimeoutError):
                    await client.info()  # the server stalls past the 1 s read timeout
                assert time.monotonic() - started < 4.5  # 3 attempts of ~1 s, not the stall

        asyncio.run(run())

    async def refused() -> None:
        async with AsyncHeroClient(f"http://127.0.0.1:{free_port()}", http_backend=backend,
                                   retry=RetryPolicy(max_attempts=2, backoff_s=0.01)) as client:
            with pytest.raises(HeroConnectionError):  # refused: not reported as a timeout
                await client.info()

    asyncio.run(refused())


def test_auto_picks_aiohttp_when_installed_and_httpx_otherwise(monkeypatch):
    assert _transport.aiohttp_available()  # the dev install has the aiohttp extra
    assert AsyncHeroClient(http_backend="auto").http_backend == "aiohttp"
    monkeypatch.setattr(_transport, "aiohttp_available", lambda: False)
    assert AsyncHeroClient().http_backend == "httpx"


def test_bad_backend_settings_are_refused_with_the_reason(monkeypatch):
    with pytest.raises(ValueError, match="http_backend must be"):
        AsyncHeroClient(http_backend="curl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections must be >= 1 or None, got 0"):
        AsyncHeroClient(max_connections=0)
    monkeypatch.setitem(sys.modules, "httpx_aiohttp", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'hero-rewards\[aiohttp\]'"):
        AsyncHeroClient(http_backend="aiohttp")
