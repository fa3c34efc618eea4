"""The process pool itself: hard timeouts kill and replace a worker, dead workers are reported,
workers are recycled, and the memory cap holds."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from hero_service.verifiers.pool import ProcessWorkerPool, TaskTimeout, WorkerDied


def _allocate(megabytes: int) -> int:
    return len(bytearray(megabytes * 1024 * 1024))


def test_hard_timeout_kills_and_replaces_the_worker():
    async def go():
        pool = ProcessWorkerPool(workers=1, max_tasks=100, memory_mb=0)
        try:
            before = await pool.run(os.getpid, timeout_s=30)
            started = time.monotonic()
            with pytest.raises(TaskTimeout):
                await pool.run(time.sleep, 30, timeout_s=1)
            assert time.monotonic() - started < 10
            after = await pool.run(os.getpid, timeout_s=30)
            assert after != before  # a fresh worker took the killed one's place
        finally:
            pool.close()

    asyncio.run(go())


def test_killed_worker_is_reported_and_replaced():
    async def go():
        pool = ProcessWorkerPool(workers=1, max_tasks=100, memory_mb=0)
        try:
            pid = await pool.run(os.getpid, timeout_s=30)
            task = asyncio.ensure_future(pool.run(time.sleep, 20, timeout_s=60))
            await asyncio.sleep(0.5)
            os.kill(pid, 9)
            with pytest.raises(WorkerDied):
                await task
            assert await pool.run(os.getpid, timeout_s=30) != pid
        finally:
            pool.close()

    asyncio.run(go())


def test_workers_are_recycled_after_max_tasks():
    async def go():
        pool = ProcessWorkerPool(workers=1, max_tasks=2, memory_mb=0)
        try:
            return [await pool.run(os.getpid, timeout_s=30) for _ in range(4)]
        finally:
            pool.close()

    pids = asyncio.run(go())
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]


def test_memory_cap_turns_a_huge_allocation_into_an_error():
    async def go():
        pool = ProcessWorkerPool(workers=1, max_tasks=100, memory_mb=1024)
        try:
            with pytest.raises(MemoryError):
                await pool.run(_allocate, 4096, timeout_s=30)
            return await pool.run(_allocate, 16, timeout_s=30)
        finally:
            pool.close()

    assert asyncio.run(go()) == 16 * 1024 * 1024


def test_pool_heals_after_idle_workers_are_killed():
    """pebble breaks for good when a worker dies outside a task; the pool starts a new one."""
    import psutil

    async def go():
        pool = ProcessWorkerPool(workers=2, max_tasks=100, memory_mb=0)
        try:
            first = await pool.run(os.getpid, timeout_s=30)
            me = psutil.Process()
            victims = [c for c in me.children(recursive=True)
                       if c.ppid() != me.pid and c.parent().ppid() == me.pid]
            assert first in [v.pid for v in victims]
            for victim in victims:
                victim.kill()
            await asyncio.sleep(0.5)
            assert pool.active()  # healed
            return await pool.run(os.getpid, timeout_s=30), first, pool.restarts
        finally:
            pool.close()

    after, first, restarts = asyncio.run(go())
    assert after != first and restarts == 1
