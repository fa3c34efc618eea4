"""The Redis group store (``--group-store redis://host:port/db``, ``rediss://`` for TLS): one
shared store for every replica, with redis-py's asyncio client.

Every atomic step is one EVALSHA of ``lua/group.lua``. Round trips per member on the per-sample
path: the join (1), then for a waiter the claim that fetches the result once notified (1); the
closer's join (1) and publish (1). Notifications come over one pub/sub subscription per replica
and may be lost (a dropped connection, a Redis restart): a poller checks the groups this replica
waits for every ``poll_interval_s`` in one pipelined round trip, and every waiter also wakes at
its group's deadline or its closer's lease end. :meth:`stats` counts the round trips.

Outages fail fast: connect and socket timeouts are short and redis-py retries once, at once (a
pooled connection the server closed), so a call fails within ``socket_timeout_s + 2 *
connect_timeout_s`` with :class:`GroupStoreUnavailable`; waiters retry through an outage only
until their group's deadline (base.py).

Without Redis persistence a restart loses the open groups (their waiters re-join them with the
time they had left), the attachment leases (parked requests set theirs again at their next
renewal, within a second) and the sigma-bar series (they start again from the next groups); with
AOF (deploy/components/redis) all survive. The password (``password=`` or in the URL) is never
logged: messages show the URL without its userinfo and query."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, Optional, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)

from .base import (
    Attach,
    GroupKey,
    GroupStore,
    GroupStoreUnavailable,
    Member,
    Reply,
    Signals,
    identical_overload,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_SCRIPT = resources.files(__package__).joinpath("lua/group.lua").read_text(encoding="utf-8")


def display_url(url: str) -> str:
    """The URL as it may be shown: no userinfo, no query (either could carry a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _num(raw: Any) -> Optional[float]:
    return float(raw) if raw not in (None, "", b"") else None


class RedisGroupStore(GroupStore):
    name = "redis"

    def __init__(self, url: str, *, password: Optional[str] = None, prefix: str = "hero:gs",
                 socket_timeout_s: float = 1.0, connect_timeout_s: float = 1.0,
                 poll_interval_s: float = 1.0, **options: Any) -> None:
        super().__init__(**options)
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss"):
            raise ValueError(f"group store URL must start with redis:// or rediss:// "
                             f"(got {display_url(url)!r})")
        self.url = display_url(url)
        self.prefix = prefix
        self.poll_interval_s = poll_interval_s
        # One immediate retry: after a Redis restart each pooled connection fails once (closed
        # by the server) before a fresh one is made. The whole call stays bounded.
        self._op_timeout_s = socket_timeout_s + 2 * connect_timeout_s
        kwargs: dict[str, Any] = dict(
            decode_responses=True, socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s, retry=Retry(NoBackoff(), 1),
            health_check_interval=0, client_name="hero-rewards")
        if password is not None:
            kwargs["password"] = password
        self._redis = aioredis.Redis.from_url(url, **kwargs)
        self._script = self._redis.register_script(_SCRIPT)
        self._keys = [f"{prefix}:waiting", f"{prefix}:open", f"{prefix}:open_counts",
                      f"{prefix}:sigma"]
        self._channel = f"{prefix}:events"
        self._signals = Signals()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, load the script, subscribe; raises GroupStoreUnavailable if unreachable."""
        await self._call("start", self._redis.ping)
        await self._call("start", lambda: self._redis.script_load(_SCRIPT))
        self._tasks = [asyncio.create_task(self._listen(), name="group-store-listen"),
                       asyncio.create_task(self._poll(), name="group-store-poll")]

    async def close(self) -> None:
        # Tasks are cancelled and the flag set; close never waits on them for long.
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=3.0)
        self._tasks = []
        try:
            await asyncio.wait_for(self._redis.aclose(), 3.0)
        except (RedisError, OSError, asyncio.TimeoutError):
            pass

    async def ready(self) -> Optional[str]:
        try:
            await self._call("ready", self._redis.ping)
        except GroupStoreUnavailable as exc:
            return exc.message
        return None

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """One round trip, bounded in time; any connection failure becomes one typed error."""
        self._stats.round_trips[op] += 1
        try:
            return await asyncio.wait_for(fn(), self._op_timeout_s)
        except (AuthenticationError, AuthorizationError, NoPermissionError,
                AuthenticationWrongNumberOfArgsError) as exc:
            # The password is wrong or missing: say so (not "unreachable"), never show it.
            raise GroupStoreUnavailable(
                f"group store {self.url} refused us ({op}): {exc}; check --group-store-password"
                " / --group-store-password-file") from exc
        except ResponseError as exc:
            if "BUSY" in str(exc) or "LOADING" in str(exc):
                raise GroupStoreUnavailable(f"group store {self.url} is busy: {exc}") from exc
            raise
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise GroupStoreUnavailable(
                f"group store {self.url} unreachable ({op}): {reason}") from exc

    # -- notifications ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        """One subscription per replica; re-subscribes after a lost connection (messages sent
        meanwhile are lost: the poller covers them)."""
        delay = 0.1
        while not self._stopping:
            pubsub = self._redis.pubsub()
            try:
                await asyncio.wait_for(pubsub.subscribe(self._channel), self._op_timeout_s)
                delay = 0.1
                while not self._stopping:
                    # Blocking read (timeout=None): redis-py's timed read can turn a
                    # cancellation into a timeout and swallow it.
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=None)
                    if message and message.get("type") == "message":
                        phase, digest, gen = str(message["data"]).split("|", 2)
                        self._signals.notify((digest, gen), closed=phase == "closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("group store subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), 1.0)
                except Exception:
                    pass

    async def _poll(self) -> None:
        """Wake local waiters whose group has a result or vanished, in one round trip."""
        while not self._stopping:
            await asyncio.sleep(self.poll_interval_s)
            slots = self._signals.watched()
            if not slots:
                continue
            pipe = self._redis.pipeline(transaction=False)
            for digest, gen in slots:
                gid = f"{self.prefix}:{{{digest}}}:{gen}"
                pipe.exists(f"{gid}:result")
                pipe.exists(f"{gid}:meta")
            try:
                found = await self._call("poll", pipe.execute)
            except GroupStoreUnavailable:
                continue
            for i, slot in enumerate(slots):
                has_result, has_meta = found[2 * i], found[2 * i + 1]
                if has_result or not has_meta:
                    self._signals.notify(slot)

    async def _wait_signal(self, key: GroupKey, gen: str, timeout_s: float,
                           lease_s: Optional[float]) -> None:
        await self._signals.wait((key.digest, gen), timeout_s, lease_s)

    # -- the atomic steps ------------------------------------------------------------------------

    def _ms(self, seconds: float) -> int:
        return max(1, math.ceil(seconds * 1000))

    def _sigma_args(self, groups_per_step: Optional[int]) -> list[Any]:
        rule = self.sigma_rule
        return [groups_per_step or rule.groups_per_step or 0, repr(rule.momentum),
                self._ms(rule.step_gap_s), rule.max_groups_per_step]

    async def _eval(self, op: str, args: Sequence[Any]) -> Any:
        return await self._call(op, lambda: self._script(keys=self._keys,
                                                         args=[op, self.prefix, *args]))

    async def _join(self, key: GroupKey, members: Sequence[Member], timeout_s: float,
                    max_waiting: int, attach: Optional[Attach],
                    wait_on_contention: bool) -> list[Reply]:
        args: list[Any] = [key.digest, key.run, key.size, self._ms(timeout_s),
                           self._ms(self.lease_s), self._ms(self.result_ttl_s), max_waiting,
                           secrets.token_hex(4),
                           attach.slots if attach else 0,
                           self._ms(attach.lease_s) if attach else 0,
                           "1" if wait_on_contention else "0"]
        for m in members:
            args += [m.member_id, m.to_json()]
        raw = await self._eval("join", args)
        if raw and raw[0][0] == "overloaded":
            if len(raw[0]) > 3:  # every slot of an identical response is taken
                return [Reply("overloaded", detail=identical_overload(int(raw[0][2])))]
            return [Reply("overloaded", detail=f"{raw[0][2]} responses are waiting for their "
                          f"groups (limit {self.max_waiting})")]
        if raw and raw[0][0] == "contended":
            return [Reply("contended")]
        if raw and raw[0][0] == "ids":
            return [dataclasses.replace(_reply(r), member_id=mid)
                    for mid, r in zip(raw[0][1:], raw[1:])]
        return [_reply(r) for r in raw]

    async def _claim(self, key: GroupKey, gen: str, deliver: Sequence[str] = ()) -> Reply:
        return _reply(await self._eval("claim", [key.digest, gen, self._ms(self.lease_s),
                                                 self._ms(self.result_ttl_s), *deliver]))

    async def _publish(self, key: GroupKey, gen: str, token: str, result: str,
                       sigma: Optional[float], groups_per_step: Optional[int],
                       deliver: Sequence[str] = ()) -> Reply:
        raw = await self._eval("publish", [
            key.digest, gen, token, result, self._ms(self.result_ttl_s),
            "" if sigma is None else repr(sigma), *self._sigma_args(groups_per_step), *deliver])
        if raw[0] == "published":
            self._signals.notify((key.digest, gen))  # local waiters need not wait for pub/sub
            return Reply("closed", gen, result=result, sigma_after=_num(raw[2]))
        return _reply(raw)

    async def _fold_sigmas(self, run: str, sigmas: Sequence[float],
                           groups_per_step: Optional[int]) -> Optional[float]:
        raw = await self._eval("sigma", [run, *self._sigma_args(groups_per_step),
                                         *(repr(s) for s in sigmas)])
        return _num(raw)

    async def sigma_values(self) -> dict[str, float]:
        raw = await self._call("sigma_read", lambda: self._redis.hgetall(self._keys[3]))
        return {str(run): float(v) for run, v in raw.items()}  # decode_responses: already str

    def _attach_key(self, name: str) -> str:
        return f"{self.prefix}:attached:{name}"

    async def renew_attachments(self, names: Sequence[str], lease_s: float) -> None:
        if not names:
            return

        # Set again, not PEXPIRE: a Redis restarted without its data lost the lease, and a
        # parked request must take it back, or an identical sample would take its id and leave
        # the group one member short (as MemoryGroupStore, which sets it too); but never over
        # the delivered mark the claim that answered it may already have set.
        await self._call("attach_renew", lambda: self._script(
            keys=self._keys, args=["renew", self.prefix, self._ms(lease_s), *names]))

    async def release_attachments(self, names: Sequence[str], delivered: bool = False) -> None:
        if delivered:
            names = self._still_to_mark(names)
        if not names:
            return
        keys = [self._attach_key(n) for n in names]
        if not delivered:
            await self._call("attach_release", lambda: self._redis.delete(*keys))
            return

        async def keep() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.set(key, "delivered", px=self._ms(self.result_ttl_s))
            return await pipe.execute()

        await self._call("attach_release", keep)

    async def waiting(self) -> int:
        """Members in open groups across all replicas (the bounded quantity)."""
        raw = await self._call("waiting", lambda: self._redis.get(self._keys[0]))
        return int(raw or 0)


def _reply(raw: list[Any]) -> Reply:
    kind, gen = raw[0], raw[1]
    if kind in ("waiting", "closing"):
        return Reply(kind, gen, remaining_s=float(raw[2]) / 1000.0)
    if kind == "closed":
        return Reply(kind, gen, result=raw[6])
    if kind == "closer":
        order, data = raw[7], raw[8]
        return Reply(kind, gen, token=raw[3], partial=raw[4] == "1", sigma_ref=_num(raw[5]),
                     members=tuple(Member.from_json(m, d) for m, d in zip(order, data)))
    return Reply(kind, gen)  # vanished

