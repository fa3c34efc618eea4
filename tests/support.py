"""Test helpers: real service processes on loopback (on bench/procs.py's runner, the one the
benchmark uses), in-process apps, the dev data, free ports."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import httpx

REPO = Path(__file__).resolve().parents[1]
# One process runner for the tests and the benchmark: bench/procs.py (free ports, own session,
# readiness, stop, dying with this process). Appended, so no bench module shadows another.
sys.path.append(str(REPO / "bench"))

from procs import Server, free_port

if TYPE_CHECKING:
    from fastapi import FastAPI

    from hero_service.config import Settings
    from hero_service.state import Service

DEV_DATA = Path(os.environ.get(
    "HERO_DEV_DATA", REPO.parent / "shared" / "data" / "math-rollouts-dev.jsonl"))
LOG_DIR = Path("/tmp")


def load_dev_rows() -> list[dict]:
    with DEV_DATA.open() as f:
        return [json.loads(line) for line in f if line.strip()]


class ServerProcess(Server):
    """``python -m hero_service`` on 127.0.0.1 with the given flags, logging to
    /tmp/hero-test-server-PORT.log; :meth:`start` waits for /readyz, and it is stopped on exit
    (or killed with this process)."""

    def __init__(self, args: Sequence[str] = (), env: Optional[dict[str, str]] = None,
                 ready_timeout_s: float = 120.0) -> None:
        port = free_port()
        super().__init__(
            f"hero-test-server-{port}",
            [sys.executable, "-m", "hero_service", "--host", "127.0.0.1", "--port", str(port),
             *args],
            ready_path="/readyz", log_dir=LOG_DIR, env=env, port=port)
        self.ready_timeout_s = ready_timeout_s

    def start(self, wait: bool = True) -> ServerProcess:
        """Launch and, unless ``wait`` is False, wait until /readyz answers 200."""
        super().start()
        if wait:
            try:
                self.wait_ready(self.ready_timeout_s)
            except RuntimeError:
                self.stop()
                raise
        return self

    def stop(self, timeout_s: float = 30.0) -> Optional[int]:
        return super().stop(timeout_s)

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
        from hero_service.config import Settings

        # The service's keep-alive, so a pooled client connection is never reused as it closes.
        keep_alive_s = Settings.model_fields["keep_alive_s"].default
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning",
                                                    timeout_keep_alive=keep_alive_s))
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


def started_app_fixture(settings: Settings) -> Any:
    """A module-scoped fixture (assign it to ``app`` in the test module): the app built from
    ``settings``, started once for the module's tests."""
    import pytest

    @pytest.fixture(scope="module")
    async def app() -> AsyncIterator[FastAPI]:
        async with started_app(settings) as started:
            yield started

    return app


def app_service(app: FastAPI) -> Service:
    """The started app's typed service state."""
    from hero_service.state import Service

    service = app.state.service
    assert isinstance(service, Service)
    return service


def asgi_client(app: FastAPI) -> httpx.AsyncClient:
    """A client that calls ``app`` in this process, through every middleware, with no socket."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                             base_url="http://hero.test", timeout=120)
