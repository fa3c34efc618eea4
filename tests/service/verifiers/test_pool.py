"""The process pool itself: hard timeouts kill and replace a worker, dead workers are reported,
workers are recycled, and the memory cap holds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

import pytest

from hero_service.verifiers.pool import ProcessWorkerPool, TaskTimeout, WorkerDied


@contextlib.asynccontextmanager
async def worker_pool(workers: int, max_tasks: int, memory_mb: int
                      ) -> AsyncIterator[ProcessWorkerPool]:
    """A pool for one test, closed (its workers stopped) however the test ends."""
    pool = ProcessWorkerPool(workers=workers, max_tasks=max_tasks, memory_mb=memory_mb)
    try:
        yield pool
    finally:
        pool.close()


def _allocate(megabytes: int) -> int:
    return len(bytearray(megabytes * 1024 * 1024))


def test_hard_timeout_kills_and_replaces_the_worker():
    async def go():
        async with worker_pool(workers=1, max_tasks=100, memory_mb=0) as pool:
            before = await pool.run(os.getpid, timeout_s=30)
            started = time.monotonic()
            with pytest.raises(TaskTimeout):
                await pool.run(time.sleep, 30, timeout_s=1)
            assert time.monotonic() - started < 10
            after = await pool.run(os.getpid, timeout_s=30)
            assert after != before  # a fresh worker took the killed one's place

    asyncio.run(go())


def test_killed_worker_is_reported_and_replaced():
    async def go():
        async with worker_pool(workers=1, max_tasks=100, memory_mb=0) as pool:
            pid = await pool.run(os.getpid, timeout_s=30)
            task = asyncio.ensure_future(pool.run(time.sleep, 20, timeout_s=60))
            await asyncio.sleep(0.5)
            os.kill(pid, 9)
            with pytest.raises(WorkerDied):
                await task
            assert await pool.run(os.getpid, timeout_s=30) != pid

    asyncio.run(go())


def test_workers_are_recycled_after_max_tasks():
    async def go():
        async with worker_pool(workers=1, max_tasks=2, memory_mb=0) as pool:
            return [await pool.run(os.getpid, timeout_s=30) for _ in range(4)]

    pids = asyncio.run(go())
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]


def test_memory_cap_turns_a_huge_allocation_into_an_error():
    async def go():
        async with worker_pool(workers=1, max_tasks=100, memory_mb=1024) as pool:
            with pytest.raises(MemoryError):
                await pool.run(_allocate, 4096, timeout_s=30)
            return await pool.run(_allocate, 16, timeout_s=30)

    assert asyncio.run(go()) == 16 * 1024 * 1024


def test_pool_heals_after_idle_workers_are_killed():
    """Workers that die outside a task (the OOM killer, an operator) are replaced: the pool
    keeps taking tasks."""
    import psutil

    async def go():
        async with worker_pool(workers=2, max_tasks=100, memory_mb=0) as pool:
            first = await pool.run(os.getpid, timeout_s=30)
            # This pool's workers only: the siblings of the one that answered. Other processes
            # this pytest started (the session's service and its own pool) are not to be hit.
            victims = psutil.Process(first).parent().children()
            assert first in [v.pid for v in victims] and len(victims) == 2
            for victim in victims:
                victim.kill()
            await asyncio.sleep(0.5)
            assert pool.ready()  # healed
            return await pool.run(os.getpid, timeout_s=30), first, pool.restarts, len(victims)

    after, first, restarts, killed = asyncio.run(go())
    assert after != first and restarts == killed == 2


def _sleep_per_item(items, progress):
    """Healthy but slow: each item takes its own number of seconds, reporting as it goes."""
    out = []
    for index, seconds in enumerate(items):
        progress.item(index)
        time.sleep(seconds)
        out.append((os.getpid(), seconds))
    progress.item(len(items))
    return out


def test_run_items_bounds_each_step_not_the_whole_task():
    """Ten items of 0.4 s under a 1 s step budget: 4 s in all, nothing killed."""
    failures: list[str] = []

    async def go():
        async with worker_pool(workers=1, max_tasks=100, memory_mb=0) as pool:
            return await pool.run_items(_sleep_per_item, [0.4] * 10, step_timeout_s=1.0,
                                        on_failure=failures.append)

    results = asyncio.run(go())
    assert failures == []
    assert [seconds for _, seconds in results] == [0.4] * 10
    assert len({pid for pid, _ in results}) == 1  # one worker, one task


def test_run_items_retries_only_the_item_whose_worker_died():
    """kill -9 the worker while it sleeps on item 2: that item is retried alone, the others run
    again, and every item gets its real result."""
    import threading

    failures: list[str] = []
    killed: list[int] = []

    async def go():
        async with worker_pool(workers=1, max_tasks=100, memory_mb=0) as pool:
            pid = await pool.run(os.getpid, timeout_s=30)

            def kill_during_item_2():
                time.sleep(0.2 + 0.1 + 0.1 + 0.5)  # items 0, 1 done; item 2 (3 s) running
                os.kill(pid, 9)
                killed.append(pid)

            killer = threading.Thread(target=kill_during_item_2)
            killer.start()
            started = time.monotonic()
            results = await pool.run_items(_sleep_per_item, [0.1, 0.1, 3.0, 0.1],
                                           step_timeout_s=5.0, on_failure=failures.append)
            killer.join()
            return results, time.monotonic() - started

    results, elapsed = asyncio.run(go())
    assert killed and failures == ["died"]
    assert [seconds for _, seconds in results] == [0.1, 0.1, 3.0, 0.1]
    assert killed[0] not in {pid for pid, _ in results}
    assert elapsed < 10, elapsed


def test_a_task_sent_behind_a_stuck_one_runs_elsewhere_uncharged():
    """One worker holds two tasks (the one it runs, the next in its pipe). When the first is
    killed for its timeout, the second never ran there: it runs on the replacement and answers."""
    async def go():
        async with worker_pool(workers=1, max_tasks=100, memory_mb=0) as pool:
            first = await pool.run(os.getpid, timeout_s=30)
            stuck = asyncio.ensure_future(pool.run(time.sleep, 30, timeout_s=1))
            behind = asyncio.ensure_future(pool.run(os.getpid, timeout_s=30))
            with pytest.raises(TaskTimeout):
                await stuck
            return first, await behind

    first, behind = asyncio.run(go())
    assert behind != first  # answered, by the worker that replaced the killed one


def _unpicklable_result() -> object:
    import threading

    return threading.Lock()


def test_an_unpicklable_result_is_an_error_and_the_worker_lives():
    async def go():
        async with worker_pool(workers=1, max_tasks=100, memory_mb=0) as pool:
            before = await pool.run(os.getpid, timeout_s=30)
            with pytest.raises(RuntimeError, match="cannot be sent back"):
                await pool.run(_unpicklable_result, timeout_s=30)
            return before, await pool.run(os.getpid, timeout_s=30)

    before, after = asyncio.run(go())
    assert before == after


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


def test_a_caller_that_leaves_drops_its_queued_task(tmp_path):
    """Two tasks fill the one worker's pipeline; a third waits in the service. Its caller goes
    away: it never runs, while the two already sent finish."""
    marker = tmp_path / "ran"

    async def go():
        async with worker_pool(workers=1, max_tasks=100, memory_mb=0) as pool:
            await pool.run(os.getpid, timeout_s=30)
            sent = [asyncio.ensure_future(pool.run(time.sleep, 0.3, timeout_s=30))
                    for _ in range(2)]
            queued = asyncio.ensure_future(pool.run(_touch, str(marker), timeout_s=30))
            await asyncio.sleep(0.05)
            queued.cancel()
            await asyncio.gather(*sent)
            await pool.run(os.getpid, timeout_s=30)  # after everything sent before it

    asyncio.run(go())
    assert not marker.exists()


def _pids(items, progress):
    """Which worker ran each item."""
    return [os.getpid() for _ in items]


def test_a_task_goes_to_the_worker_of_its_lane_and_a_replacement_takes_the_lane_over():
    """Tasks for lane 0 and lane 1 each stay on one worker (two different ones); when lane 1's
    worker is killed, its replacement serves lane 1 from then on."""
    async def on(pool, lane):
        pids = await pool.run_items(_pids, [0], step_timeout_s=30, lane=lane)
        return pids[0]

    async def go():
        async with worker_pool(workers=2, max_tasks=100, memory_mb=0) as pool:
            first = [[await on(pool, lane) for _ in range(4)] for lane in (0, 1)]
            os.kill(first[1][0], 9)
            await asyncio.sleep(0.5)  # the pipe's end is seen, a replacement started
            after = [[await on(pool, lane) for _ in range(4)] for lane in (0, 1)]
            return first, after

    first, after = asyncio.run(go())
    assert [len(set(pids)) for pids in first] == [1, 1] and first[0][0] != first[1][0]
    assert after[0] == first[0]  # lane 0's worker untouched
    assert len(set(after[1])) == 1 and after[1][0] not in (first[1][0], first[0][0])


def test_a_lane_is_a_preference_not_a_wait():
    """Lane 0's worker busy with two tasks (its pipe full): a third task for lane 0 runs on the
    other worker at once instead of waiting."""
    async def go():
        async with worker_pool(workers=2, max_tasks=100, memory_mb=0) as pool:
            busy = [asyncio.ensure_future(pool.run_items(_sleep_per_item, [1.5], step_timeout_s=30,
                                                         lane=0)) for _ in range(2)]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            third = await pool.run_items(_pids, [0], step_timeout_s=30, lane=0)
            waited = time.monotonic() - started
            slow = await asyncio.gather(*busy)
            return third[0], {pid for result in slow for pid, _ in result}, waited

    third, busy_pids, waited = asyncio.run(go())
    assert busy_pids == {next(iter(busy_pids))}  # both on lane 0's worker
    assert third not in busy_pids
    assert waited < 1.0, waited


def test_a_lane_whose_worker_is_held_up_by_a_slow_task_is_passed_over():
    """Lane 0's worker on one slow task (1.5 s, its pipe not full): the next task for lane 0,
    sent 0.5 s later, runs on the other worker at once instead of waiting behind it."""
    async def go():
        async with worker_pool(workers=2, max_tasks=100, memory_mb=0) as pool:
            slow = asyncio.ensure_future(pool.run_items(_sleep_per_item, [1.5], step_timeout_s=30,
                                                        lane=0))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            behind = await pool.run_items(_pids, [0], step_timeout_s=30, lane=0)
            waited = time.monotonic() - started
            (slow_pid, _), = await slow
            return behind[0], slow_pid, waited

    behind, slow_pid, waited = asyncio.run(go())
    assert behind != slow_pid
    assert waited < 0.8, waited
