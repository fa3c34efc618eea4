"""Test helpers: real service processes on loopback, the dev data, free ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import httpx

if TYPE_CHECKING:
    from fastapi import FastAPI

    from hero_service.config import Settings

REPO = Path(__file__).resolve().parents[1]
DEV_DATA = Path(os.environ.get(
    "HERO_DEV_DATA", REPO.parent / "shared" / "data" / "math-rollouts-dev.jsonl"))


def load_dev_rows() -> list[dict]:
    with DEV_DATA.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m hero_service`` on 127.0.0.1 with the given flags; stopped on exit."""

    def __init__(self, args: Sequence[str] = (), env: Optional[dict[str, str]] = None,
                 ready_timeout_s: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.proc: Optional[subprocess.Popen[str]] = None
        self.log_path = Path(f"/tmp/hero-test-server-{self.port}.log")

    def start(self) -> ServerProcess:
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hero_service", *self.args], env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in {self.ready_timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(*args: str, env: Optional[dict[str, str]] = None) -> Iterator[ServerProcess]:
    server = ServerProcess(args, env=env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP] {% endfor %}"
)


def build_tiny_decoder_rm(path: Path, *, hidden: int = 64, layers: int = 2,
                          with_pad_token: bool = True, seed: int = 0) -> Path:
    """A tiny *random* Llama sequence classifier (1 label) with a chat template, saved to
    ``path``. The tokenizer is MiniLM's WordPiece one from the embedded-model package, so nothing
    is downloaded."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from hero_service.reward_models.embedded import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "[SEP]"
    if not with_pad_token:
        tokenizer.pad_token = None
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, num_labels=1,
        pad_token_id=tokenizer.pad_token_id if with_pad_token else None,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.cls_token_id,
    )
    model = LlamaForSequenceClassification(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class ThreadedServer:
    """A real uvicorn serving an in-process app on loopback, for tests that inject faults through
    the app factory's seams (e.g. a reward model that raises)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = None

    def __enter__(self) -> ThreadedServer:
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError("threaded server not ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)


@contextlib.asynccontextmanager
async def started_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """``create_app(settings)`` with its lifespan run (the reward model loaded, the verifier pool
    up), for tests that call it in-process: httpx.ASGITransport runs no lifespan itself."""
    from hero_service.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


def asgi_client(app: FastAPI) -> httpx.AsyncClient:
    """A client that calls ``app`` in this process, through every middleware, with no socket."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                             base_url="http://hero.test", timeout=120)
