"""The trainer adapters' shared pieces: per-process and per-event-loop caches, chat messages in
the wire format. (The adapters themselves are tested against real services and trainers in
tests/client/adapters/.)"""

from __future__ import annotations

import asyncio
import threading

from hero_client.adapters._shared import LoopCache, ProcessCache, wire_messages
from hero_client.schema import ChatMessage


def test_process_cache_makes_one_object_per_key_for_all_threads():
    cache: ProcessCache[object] = ProcessCache()
    made: list[object] = []
    barrier = threading.Barrier(8)

    def make() -> object:
        made.append(object())
        return made[-1]

    seen: list[object] = []

    def worker() -> None:
        barrier.wait()  # all threads ask at once: still one object
        seen.append(cache.get(("http://a", None), make))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(made) == 1 and seen == made * 8
    assert cache.get(("http://b", None), make) is made[1]  # another key, another object


def test_loop_cache_makes_one_object_per_key_and_event_loop():
    cache: LoopCache[asyncio.Lock] = LoopCache()

    async def twice() -> tuple[asyncio.Lock, asyncio.Lock, asyncio.Lock]:
        first = cache.get("k", asyncio.Lock)
        async with first:  # made on this loop: usable on it
            pass
        return first, cache.get("k", asyncio.Lock), cache.get("other", asyncio.Lock)

    first, again, other = asyncio.run(twice())
    assert first is again and other is not first
    # A new loop (possibly reusing the dead one's id) gets its own object, not the dead loop's.
    later, _, _ = asyncio.run(twice())
    assert later is not first


def test_loop_cache_closes_its_objects_on_their_loop_when_the_loop_shuts_down():
    closed: list[tuple[str, asyncio.AbstractEventLoop]] = []

    async def close(value: str) -> None:
        closed.append((value, asyncio.get_running_loop()))

    cache: LoopCache[str] = LoopCache(close=close)
    loops = []

    async def use(value: str) -> None:
        loops.append(asyncio.get_running_loop())
        assert cache.get("k", lambda: value) == value
        assert cache.get("k", lambda: "never made") == value  # one per loop: closed once
        assert closed == [(v, loop) for v, loop in closed if v != value]  # not yet

    asyncio.run(use("first"))
    asyncio.run(use("second"))
    assert closed == [("first", loops[0]), ("second", loops[1])]


def test_wire_messages_keep_known_roles_send_others_as_user_and_content_as_text():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "tool", "content": "42"},
        {"role": "user", "content": [{"type": "text", "text": "2+"},
                                     {"type": "text", "text": "2?"}]},
        {"content": None},
        {"role": "assistant", "content": 7},
    ]
    wire = wire_messages(messages)
    assert wire == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "42"},
        {"role": "user", "content": "2+2?"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "7"},
    ]
    assert all(ChatMessage.model_validate(m) for m in wire)  # the schema accepts every one
