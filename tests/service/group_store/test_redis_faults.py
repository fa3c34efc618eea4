"""Redis-specific behaviour against a real redis-server on loopback: outages fail fast and typed,
restarts recover, a closer killed mid-close is taken over, lost notifications are covered by
polling, passwords are used and never shown, TLS."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from redis_support import RedisServer, redis_server_binary
from store_support import RecordingCombine, combine, member, until_waiting
from support import free_port

from hero_service.config import Settings
from hero_service.group_store import GroupKey, GroupStoreUnavailable, MemoryGroupStore
from hero_service.group_store.factory import create_group_store
from hero_service.group_store.redis import RedisGroupStore

pytestmark = pytest.mark.timeout(120)

SECRET = "s3cr3t-hunter2"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def run(coro_fn, timeout_s: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout_s))


def store_for(server: RedisServer, **options) -> RedisGroupStore:
    return RedisGroupStore(server.url, **{"poll_interval_s": 0.2, "prefix": "faults", **options})


async def redis_cli(server: RedisServer, *command: str) -> object:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=server.port, password=server.password,
                            decode_responses=True)
    try:
        return await client.execute_command(*command)
    finally:
        await client.aclose()


def test_unreachable_store_fails_start_with_one_clear_message_and_no_password():
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"

    async def go():
        store = RedisGroupStore(url)
        started = time.monotonic()
        with pytest.raises(GroupStoreUnavailable) as caught:
            await store.start()
        elapsed = time.monotonic() - started
        reason = await store.ready()
        await store.close()
        return caught.value, elapsed, reason
    error, elapsed, reason = run(go)
    assert elapsed < 5
    assert "unreachable" in error.message and "redis://127.0.0.1:" in error.message
    assert SECRET not in error.message and SECRET not in (reason or "")
    assert reason is not None and "unreachable" in reason
    assert error.status == 503


def test_store_killed_mid_run_fails_fast_with_a_typed_error(server):
    async def go():
        store = store_for(server, timeout_s=30)
        await store.start()
        await asyncio.gather(*(store.join(GroupKey("exp", "q", 2), [member(m, i)], combine)
                               for i, m in enumerate("ab")))
        server.kill()
        started = time.monotonic()
        with pytest.raises(GroupStoreUnavailable, match="unreachable"):
            await store.join(GroupKey("exp", "q2", 2), [member("c", 1.0)], combine)
        elapsed = time.monotonic() - started
        not_ready = await store.ready()
        await store.close()
        return elapsed, not_ready
    elapsed, not_ready = run(go)
    assert elapsed < 3  # socket timeouts, no retries: never the 30 s group deadline
    assert not_ready is not None


def test_waiter_fails_by_its_deadline_when_the_store_stays_down(server):
    async def go():
        store = store_for(server, timeout_s=1.0, lease_s=0.5)
        await store.start()
        waiter = asyncio.ensure_future(
            store.join(GroupKey("exp", "q", 3), [member("a", 1.0)], combine))
        await asyncio.sleep(0.2)
        server.kill()
        started = time.monotonic()
        with pytest.raises(GroupStoreUnavailable):
            await waiter
        elapsed = time.monotonic() - started
        await store.close()
        return elapsed
    elapsed = run(go)
    assert elapsed < 1.0 + 0.5 + 3  # deadline + one lease + one socket timeout's slack


def test_restart_mid_group_rejoins_and_completes_then_sigma_restarts(server):
    async def go():
        store = store_for(server, timeout_s=20)
        await store.start()
        await asyncio.gather(*(store.join(GroupKey("exp", "warm", 2), [member(m, v)], combine)
                               for m, v in (("w1", 0.0), ("w2", 2.0))))
        before = await store.sigma_values()
        recorder = RecordingCombine()
        key = GroupKey("exp", "q", 3)
        waiters = [asyncio.ensure_future(store.join(key, [member(m, v)], recorder))
                   for m, v in (("a", 0.0), ("b", 4.0))]
        await until_waiting(store, 2)
        server.restart()  # SIGKILL, persistence off: every key is gone
        after_restart = await store.sigma_values()
        await asyncio.sleep(1.0)  # the poller notices the group vanished; its waiters re-join
        started = time.monotonic()
        last = await store.join(key, [member("c", 8.0)], recorder)
        outcomes = [o[0] for o in await asyncio.gather(*waiters)] + last
        return before, after_restart, recorder, outcomes, time.monotonic() - started, \
            await store.sigma_values()
    before, after_restart, recorder, outcomes, elapsed, final = run(go)
    assert before == {"exp": pytest.approx(1.0)}
    assert after_restart == {}  # no persistence: sigma-bar restarts from the next groups
    assert len(recorder.calls) == 1 and not recorder.calls[0].partial
    assert sorted(m.member_id for m in recorder.calls[0].members) == ["a", "b", "c"]
    assert elapsed < 5 and not any(o.partial for o in outcomes)
    sigma = outcomes[0].group.sigma
    assert final == {"exp": pytest.approx(sigma)}  # the first group after the restart seeds it


def test_sigma_survives_replica_and_redis_restarts_with_persistence():
    with RedisServer(appendonly=True, extra_args=["--appendfsync", "always"]) as server:
        async def close_one_group():
            store = store_for(server, timeout_s=20)
            await store.start()
            await asyncio.gather(*(store.join(GroupKey("exp42", "q", 2), [member(m, v)],
                                              combine) for m, v in (("a", 0.0), ("b", 6.0))))
            await store.close()

        async def read_values():
            store = store_for(server)  # a new replica: nothing in its memory
            await store.start()
            values = await store.sigma_values()
            await store.close()
            return values
        run(close_one_group)
        replica_restart = run(read_values)
        server.restart(kill=False)
        redis_restart = run(read_values)
    assert replica_restart == redis_restart == {"exp42": pytest.approx(3.0)}


CLOSER_THAT_DIES = textwrap.dedent("""
    import asyncio, os, signal, sys
    from hero_service.group_store import GroupKey, Member
    from hero_service.group_store.redis import RedisGroupStore

    def combine(group):
        print("closing", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # the pod dies between closing and publishing

    async def main(url):
        store = RedisGroupStore(url, prefix="faults", lease_s=0.5, timeout_s=20)
        await store.start()
        await store.join(GroupKey("exp", "q", 3), [Member("c", "correct", 7.0)], combine)

    asyncio.run(main(sys.argv[1]))
""")


def test_closer_killed_between_close_and_publish_is_taken_over(server):
    async def go():
        store = store_for(server, timeout_s=20, lease_s=0.5)
        await store.start()
        recorder = RecordingCombine()
        waiters = [asyncio.ensure_future(store.join(GroupKey("exp", "q", 3), [member(m, v)],
                                                    recorder))
                   for m, v in (("a", 0.0), ("b", 3.0))]
        await until_waiting(store, 2)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLOSER_THAT_DIES, server.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        died = time.monotonic()
        outcomes = [o[0] for o in await asyncio.gather(*waiters)]
        return proc.returncode, out.decode(), err.decode(), recorder, outcomes, \
            time.monotonic() - died, await store.sigma_values()
    code, out, err, recorder, outcomes, elapsed, sigmas = run(go)
    assert code == -9 and "closing" in out, err
    assert len(recorder.calls) == 1  # the survivor took over and scored the complete group
    assert sorted(m.member_id for m in recorder.calls[0].members) == ["a", "b", "c"]
    assert not recorder.calls[0].partial and elapsed < 5
    assert sum(o.published_here for o in outcomes) == 1
    assert set(sigmas) == {"exp"}


def test_lost_notifications_are_covered_by_polling(server):
    async def go():
        # This replica's user may not subscribe to any channel: it never hears a notification.
        await redis_cli(server, "ACL", "SETUSER", "deaf", "on", ">deafpw", "~*", "+@all",
                        "-subscribe", "-psubscribe", "resetchannels")
        deaf = RedisGroupStore(f"redis://deaf:deafpw@127.0.0.1:{server.port}/0",
                               prefix="faults", poll_interval_s=0.2, timeout_s=20)
        other = store_for(server, timeout_s=20)
        await deaf.start()
        await other.start()
        started = time.monotonic()
        waiter = asyncio.ensure_future(
            deaf.join(GroupKey("exp", "q", 2), [member("a", 1.0)], combine))
        await until_waiting(deaf, 1)
        await other.join(GroupKey("exp", "q", 2), [member("b", 2.0)], combine)
        outcome = (await waiter)[0]
        elapsed = time.monotonic() - started
        stats = deaf.stats()
        await deaf.close()
        await other.close()
        return outcome, elapsed, stats
    outcome, elapsed, stats = run(go)
    assert not outcome.partial and elapsed < 5  # a poll found it, not the 20 s deadline
    assert stats.round_trips["poll"] >= 1


def test_password_from_settings_file_is_used_and_never_shown(tmp_path):
    with RedisServer(password=SECRET) as server:
        secret_file = tmp_path / "redis-password"
        secret_file.write_text(SECRET + "\n")

        async def go():
            ok = create_group_store(Settings(group_store=server.url,
                                             group_store_password_file=secret_file))
            await ok.start()
            one = await ok.join(GroupKey("exp", "q", 1), [member("a", 1.0)], combine)
            await ok.close()
            via_env_field = create_group_store(Settings(group_store=server.url,
                                                        group_store_password=SecretStr(SECRET)))
            await via_env_field.start()
            await via_env_field.close()
            refused = create_group_store(Settings(group_store=server.url,
                                                  group_store_password=SecretStr("wrong")))
            with pytest.raises(GroupStoreUnavailable) as caught:
                await refused.start()
            await refused.close()
            missing = create_group_store(Settings(group_store=server.url))
            with pytest.raises(GroupStoreUnavailable) as caught_missing:
                await missing.start()
            await missing.close()
            return one, caught.value.message, caught_missing.value.message
        one, refused, missing = run(go)
    assert one[0].group.rewards == [one[0].reward]
    for message in (refused, missing):
        assert "refused" in message and "group-store-password" in message
        assert SECRET not in message and "wrong" not in message.split("refused")[0]


def test_settings_choose_the_store_and_bad_values_name_the_field(tmp_path):
    assert isinstance(create_group_store(Settings()), MemoryGroupStore)
    assert isinstance(create_group_store(Settings(group_store="rediss://h:6380/0")),
                      RedisGroupStore)
    with pytest.raises(ValueError, match="group_store must be 'memory' or a redis://"):
        create_group_store(Settings(group_store="memcached://u:pw@h"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="group_store_password_file .* is empty"):
        create_group_store(Settings(group_store="redis://h/0", group_store_password_file=empty))
    with pytest.raises(ValueError, match="group_store_password_file .*cannot read"):
        create_group_store(Settings(group_store="redis://h/0",
                                    group_store_password_file=tmp_path / "absent"))


def test_password_fields_are_secret_in_settings_dumps():
    shown = Settings(group_store_password=SecretStr(SECRET)).model_dump(mode="json")
    assert SECRET not in json.dumps(shown)


def _make_certs(where: Path) -> None:
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True,
                       timeout=60)
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=hero-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout",
        "server.key", "-out", "server.csr")
    (where / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf", "-out", "server.crt")


def test_tls_store_with_a_private_ca(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the TLS test makes its certificates with the openssl command, absent here")
    _make_certs(tmp_path)
    tls_port = free_port()
    server = RedisServer(extra_args=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(tmp_path / "server.crt"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(tmp_path / "ca.crt"), "--tls-auth-clients", "no"])
    try:
        server.start()
    except RuntimeError as exc:
        server.cleanup()
        if "tls-port" in str(exc) and "Bad directive" in str(exc):
            pytest.skip(f"{redis_server_binary()} was built without TLS")
        raise
    with server:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={tmp_path / 'ca.crt'}"

        async def go():
            store = create_group_store(Settings(group_store=url))
            await store.start()
            outcome = await store.join(GroupKey("exp", "q", 1), [member("a", 1.0)], combine)
            await store.close()
            untrusted = RedisGroupStore(f"rediss://127.0.0.1:{tls_port}/0")  # system CAs only
            with pytest.raises(GroupStoreUnavailable):
                await untrusted.start()
            await untrusted.close()
            return outcome
        outcome = run(go)
    assert outcome[0].group.rewards == [outcome[0].reward]
