"""What the trainer adapters share: per-process caches of clients (and other objects) and the
conversion of a trainer's chat messages to the wire's."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Mapping,
    Sequence,
)
from typing import Any, Generic, Optional, TypeVar, cast

from ..schema import CHAT_ROLES

_Value = TypeVar("_Value")


class ProcessCache(Generic[_Value]):
    """One object per key for the whole process, made on first use. Trainers call reward
    functions as plain functions, many times and from several threads, so the client (its
    connection pool, its running sigma-bar) has to outlive each call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[Hashable, _Value] = {}

    def get(self, key: Hashable, make: Callable[[], _Value]) -> _Value:
        with self._lock:
            value = self._values.get(key)
            if value is None:
                value = self._values[key] = make()
            return value


class LoopCache(Generic[_Value]):
    """One object per key and running event loop, made on first use: httpx's async client and
    asyncio locks belong to the loop they were made on (verl runs one loop per reward-loop
    worker). A loop is held weakly, so a dead loop whose id is reused gets a fresh object.

    ``close``: awaited on each object when its loop shuts down its async generators (what
    ``asyncio.run`` does before closing the loop), so a client's connections are closed on the
    loop they belong to; aiohttp's pool warns about every session left open."""

    def __init__(self, close: Optional[Callable[[_Value], Awaitable[Any]]] = None) -> None:
        self._lock = threading.Lock()
        self._close = close
        self._values: dict[tuple[Hashable, int],
                           tuple[weakref.ref[asyncio.AbstractEventLoop], _Value, Any]] = {}

    def get(self, key: Hashable, make: Callable[[], _Value]) -> _Value:
        loop = asyncio.get_running_loop()
        slot = (key, id(loop))
        with self._lock:
            entry = self._values.get(slot)
            if entry is None or entry[0]() is not loop:
                value = make()
                closer = None if self._close is None else _closing_at_shutdown(value,
                                                                               self._close)
                entry = self._values[slot] = (weakref.ref(loop), value, closer)
            return entry[1]


def _closing_at_shutdown(value: _Value, close: Callable[[_Value], Awaitable[Any]]) -> Any:
    """An async generator, started on the running loop and suspended, whose ``finally`` awaits
    ``close(value)``: the loop registers every started async generator and closes each in
    ``shutdown_asyncgens()``, a hook asyncio has for exactly this (Runner.close calls it)."""
    async def closing() -> AsyncIterator[None]:
        try:
            yield
        finally:
            await close(value)

    generator = closing()
    # First step, synchronously: runs to the ``yield`` (nothing is awaited before it).
    step = cast(Coroutine[Any, Any, None], generator.__anext__())
    try:
        step.send(None)
    except StopIteration:
        pass
    return generator  # kept with the value: collected, it would be closed at once


def message_text(content: Any) -> str:
    """A chat message's content as text (content-part lists keep their text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, Mapping) else str(part)
                       for part in content)
    return str(content)


def wire_role(role: Optional[str]) -> str:
    """A trainer's message role as one the wire accepts: roles it does not know (e.g. tool)
    are sent as user messages rather than refused."""
    return role if role in CHAT_ROLES else "user"


def wire_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """A trainer's chat messages in the wire format (``{"role", "content"}``, content as text)."""
    return [{"role": wire_role(m.get("role")), "content": message_text(m.get("content"))}
            for m in messages]
