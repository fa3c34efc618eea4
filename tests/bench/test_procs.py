"""bench/procs.py, the one process runner of the benchmark and the tests: servers it starts die
with the process that started them, even one killed too hard to run its cleanup."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from procs import spawn
from support import REPO

# A stand-in for a pytest run: it starts a real service (and its verifier pool) and a real
# redis-server through the shared helpers, prints their pids, and waits to be killed.
STARTS_SERVERS = """
import sys, time
sys.path.insert(0, sys.argv[1])
from redis_support import RedisServer
from support import ServerProcess

redis = RedisServer().start()
service = ServerProcess(["--verifier-workers", "1"]).start()
print(redis.proc.pid, service.proc.pid, flush=True)
time.sleep(600)
"""


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # a zombie has exited; only unreaped
    except psutil.NoSuchProcess:
        return False


def test_a_killed_parent_leaves_no_orphaned_servers():
    parent = subprocess.Popen([sys.executable, "-c", STARTS_SERVERS, str(REPO / "tests")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()  # blocks until both servers are up (or the child died)
        assert line, f"the child exited with {parent.wait(10)} before starting its servers"
        redis_pid, service_pid = map(int, line.split())
        service = psutil.Process(service_pid)
        started = [psutil.Process(redis_pid), service, *service.children(recursive=True)]
        assert len(started) >= 3  # redis-server, the service, its verifier pool
        assert all(alive(p) for p in started)

        parent.send_signal(signal.SIGKILL)  # no cleanup, no fixtures, no finally
        parent.wait(10)

        _, left = psutil.wait_procs(started, timeout=20)
        assert not [p for p in left if alive(p)], [p.as_dict(["pid", "name", "cmdline"])
                                                    for p in left if alive(p)]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def test_spawn_refuses_a_worker_thread():
    # The kernel ties the child's life to the thread that forked it, not to the process.
    refused: list[BaseException] = []

    def start() -> None:
        try:
            spawn([sys.executable, "-c", "pass"])
        except RuntimeError as exc:
            refused.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join(10)
    assert [str(e) for e in refused] == [
        f"start {Path(sys.executable).name} from the main thread (it dies with the thread that "
        "started it)"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_spawned_child_is_set_to_die_with_its_parent():
    child = spawn([sys.executable, "-c",
                   "import ctypes, signal; sig = ctypes.c_int(); "
                   "ctypes.CDLL('libc.so.6').prctl(2, ctypes.byref(sig)); print(sig.value)"],
                  stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=30)
    assert int(out) == signal.SIGKILL  # PR_GET_PDEATHSIG (2) reads what the preexec set
