"""Server processes on 127.0.0.1, for the benchmark and the tests alike (tests/support.py and
tests/redis_support.py build on these): started in their own session (so the whole tree —
uvicorn, the verifier fork server and its workers — is stopped with one killpg) and killed by
the kernel if the process that started them dies, plus RSS and CPU-time sampling of that tree
with psutil."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Optional

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent_pid: int) -> None:
    """``preexec_fn`` (Linux): the child gets SIGKILL when its parent dies, even a parent killed
    too hard to run its cleanup (a SIGKILLed pytest or benchmark leaves no orphaned server).
    Strictly, when the parent *thread* that forked it ends: hence :func:`spawn` on the main
    thread only."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the prctl took hold
            os._exit(1)


def spawn(argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` of a child that dies with this process (:func:`die_with_parent`)."""
    if threading.current_thread() is not threading.main_thread():
        # PR_SET_PDEATHSIG follows the thread that forked: a server started from a worker thread
        # (asyncio.to_thread) would be SIGKILLed when that thread exits.
        raise RuntimeError(f"start {Path(argv[0]).name} from the main thread (it dies with the "
                           "thread that started it)")
    return subprocess.Popen(argv, preexec_fn=functools.partial(die_with_parent, os.getpid()),
                            **popen_kwargs)


class Server:
    def __init__(self, name: str, argv: Sequence[str], *, ready_path: str, log_dir: Path,
                 env: Optional[dict[str, str]] = None, port: Optional[int] = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.ready_path = ready_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self._log: Optional[IO[str]] = None

    def start(self) -> Server:
        """Launch, without waiting (several servers load at once); :meth:`wait_ready` waits."""
        self._log = self.log_path.open("w")
        self.proc = spawn(self.argv, env=self.env, cwd=REPO, stdout=self._log,
                          stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready in {timeout_s:.0f}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        """What the server has written to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        """RSS of the server and all its children (verifier fork server and workers)."""
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server and all its children."""
        return cpu_seconds(p.pid for p in self.tree())

    def request_stop(self) -> None:
        """SIGTERM without waiting (so several servers drain at the same time)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()

    def stop(self, timeout_s: float = 20.0) -> Optional[int]:
        """SIGTERM to the server (the service drains, stops its pool and exits), then SIGKILL to
        whatever is left of its process group after ``timeout_s``. Its exit status (None if it
        was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (a worker that ignored SIGTERM) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


def hero_server(name: str, log_dir: Path, *, reward_model: str, device: str,
                verifier_workers: int, max_batch_tokens: int, extra: Sequence[str] = (),
                env: Optional[dict[str, str]] = None) -> Server:
    argv = [sys.executable, "-m", "hero_service", "--host", "127.0.0.1", "--port", "{port}",
            "--reward-model", reward_model, "--device", device,
            "--verifier-workers", str(verifier_workers),
            "--max-batch-tokens", str(max_batch_tokens), "--log-level", "warning", *extra]
    return Server(name, argv, ready_path="/readyz", log_dir=log_dir, env=env)


def naive_server(log_dir: Path, *, reward_model: str, device: str) -> Server:
    argv = [sys.executable, str(REPO / "bench" / "naive_server.py"), "--host", "127.0.0.1",
            "--port", "{port}", "--reward-model", reward_model, "--device", device]
    return Server("naive", argv, ready_path="/healthz", log_dir=log_dir)


class ServerGroup:
    """The servers of one benchmark run, by name: started together (they load while the caller
    does other work), awaited, and stopped together (all asked first, so they drain at once)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.servers: dict[str, Server] = {}
        self._log = log

    def add(self, name: str, server: Server) -> Server:
        self.servers[name] = server
        return server

    def __getitem__(self, name: str) -> Server:
        return self.servers[name]

    def __len__(self) -> int:
        return len(self.servers)

    def names(self) -> list[str]:
        return list(self.servers)

    def start(self) -> None:
        for server in self.servers.values():
            server.start()

    def wait_ready(self, also: str = "") -> None:
        """Every server ready, then one log line ``servers ready: name@port, ...`` (the smoke
        test reads the ports from it to check they are closed at the end)."""
        for server in self.servers.values():
            server.wait_ready()
        self._log("servers ready: "
                  + ", ".join(f"{n}@{s.port}" for n, s in self.servers.items()) + also)

    def stop(self) -> None:
        for server in self.servers.values():
            server.request_stop()
        for server in self.servers.values():
            try:
                server.stop()
            except Exception as exc:
                self._log(f"stopping {server.name}: {exc}")


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system) of these processes; one that is gone counts nothing."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` that stops the servers runs."""
    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
