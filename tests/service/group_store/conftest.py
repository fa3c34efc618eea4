"""Fixtures for the group-store tests: one real redis-server for the contract tests (each test
gets its own key prefix), and a factory that makes stores of the kind under test that share
one backend, the way replicas share one Redis."""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: redis_support

from redis_support import RedisServer

from hero_service.group_store import GroupStore, MemoryBackend, MemoryGroupStore
from hero_service.group_store.redis import RedisGroupStore

T = TypeVar("T")
_prefixes = itertools.count()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


class Stores:
    """Makes stores sharing one backend (a MemoryBackend, or one Redis under one prefix)."""

    def __init__(self, kind: str, server: RedisServer | None) -> None:
        self.kind = kind
        self.server = server
        self.prefix = f"t{next(_prefixes)}"
        self.backend = MemoryBackend()
        self.made: list[GroupStore] = []

    async def make(self, **options: Any) -> GroupStore:
        store: GroupStore
        if self.kind == "memory":
            options.pop("poll_interval_s", None)
            store = MemoryGroupStore(self.backend, **options)
        else:
            assert self.server is not None
            store = RedisGroupStore(self.server.url, prefix=f"hero-test:{self.prefix}",
                                    **{"poll_interval_s": 0.2, **options})
        await store.start()
        self.made.append(store)
        return store

    def run(self, scenario: Callable[[Stores], Awaitable[T]], timeout_s: float = 60.0) -> T:
        """Run an async scenario on a fresh loop, closing every store it made."""
        async def go() -> T:
            try:
                return await asyncio.wait_for(scenario(self), timeout_s)
            finally:
                for store in self.made:
                    await store.close()
                self.made.clear()
        return asyncio.run(go())


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> Stores:
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    return Stores(request.param, server)
