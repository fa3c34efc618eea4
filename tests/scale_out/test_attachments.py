"""Attachment leases (member ids of /get_reward): over the in-memory store and a real
redis-server. Identical bodies held at once get separate ids; a released (undelivered) id is
taken again by a retry; a delivered id stays taken; a lapsed lease frees its id."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis_support import RedisServer  # noqa: E402

from hero_service.group_store import MemoryGroupStore  # noqa: E402
from hero_service.group_store.redis import RedisGroupStore  # noqa: E402


@pytest.fixture(scope="module")
def redis_url():
    with RedisServer() as server:
        yield server.url


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_attachment_rule(kind, redis_url):
    async def go():
        if kind == "memory":
            stores = [MemoryGroupStore()]
            stores.append(MemoryGroupStore(stores[0].backend))  # two replicas, one backend
        else:
            stores = [RedisGroupStore(redis_url, prefix="att") for _ in range(2)]
            for s in stores:
                await s.start()
        a, b = stores
        ids = [f"m#{k}" for k in range(4)]
        try:
            first = await a.acquire_attachment(ids, 5.0)
            second = await b.acquire_attachment(ids, 5.0)  # an identical body, another replica
            assert (first, second) == (("m#0", False), ("m#1", True))  # m#0 held: contended
            await a.release_attachments(["m#0"])  # no answer reached its client
            assert await b.acquire_attachment(ids, 5.0) == ("m#0", False)  # its retry re-attaches
            await b.release_attachments(["m#0", "m#1"], delivered=True)
            # answered ids stay taken, without making the next one wait
            assert await a.acquire_attachment(ids, 5.0) == ("m#2", False)
            assert await a.acquire_attachment(ids, 0.2) == ("m#3", True)
            assert await a.acquire_attachment(ids, 5.0) == (None, True)  # every slot held
            await asyncio.sleep(0.4)
            assert await b.acquire_attachment(ids, 5.0) == ("m#3", True)  # a lapsed lease frees it
        finally:
            for s in stores:
                await s.close()

    asyncio.run(go())
