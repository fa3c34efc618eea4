"""Faults: reward-model exceptions and CUDA OOM (injected through the model seam of a real app
served by real uvicorn), remote RM down or slow, and verifier workers that keep dying."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from hero_service.app import create_app
from hero_service.config import Settings
from hero_service.reward_models import load_reward_model
from hero_service.verifiers import MathVerifier
from support import ThreadedServer, running_server

POISON = "POISON: this response breaks the reward model"


class FaultyModel:
    """The real embedded model, plus injected faults: CUDA-style OOM above a batch size, and an
    exception whenever a poisoned response is in the batch."""

    def __init__(self, oom_above: int) -> None:
        self.inner = load_reward_model("embedded", device="cpu")
        self.model_id = "faulty-embedded"
        self.needs_reference = True
        self.max_tokens = self.inner.max_tokens
        self.oom_above = oom_above
        self.batch_sizes: list[int] = []

    def encode(self, items):
        encoded = self.inner.encode(items)
        for item, e in zip(items, encoded):
            if item.response == POISON:
                e.payload = ("poison", e.payload)
        return encoded

    def forward(self, batch):
        if any(e.payload[0] == "poison" for e in batch):
            raise RuntimeError("injected reward model failure")
        if len(batch) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        self.batch_sizes.append(len(batch))
        return self.inner.forward(batch)

    def close(self):
        pass


def test_oom_splits_and_a_failing_request_does_not_take_others_down(dev_rows, figures):
    model = FaultyModel(oom_above=2)
    settings = Settings(verifier_workers=1, max_wait_ms=30)
    app = create_app(settings, reward_model_factory=lambda s: model)
    row = dev_rows[0]
    good = {"groups": [{"prompt": row["prompt"], "reference": row["reference"],
                        "responses": row["responses"]}]}
    bad = {"groups": [{"prompt": "p", "reference": "1", "responses": ["\\boxed{1}", POISON]}]}
    with ThreadedServer(app) as srv:
        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                return await asyncio.gather(client.post("/v1/rewards", json=good),
                                            client.post("/v1/rewards", json=bad))

        ok, failed = asyncio.run(go())
        metrics = httpx.get(srv.url + "/metrics").text
        after = httpx.post(srv.url + "/v1/rewards", json=good, timeout=120)
    assert ok.status_code == 200 and len(ok.json()["groups"][0]["rewards"]) == 8
    assert failed.status_code == 503
    assert failed.json()["error"]["code"] == "scoring_failed"
    assert "injected reward model failure" in failed.json()["error"]["message"]
    assert after.status_code == 200
    assert max(model.batch_sizes) <= 2
    splits = next(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("hero_batch_oom_splits_total"))
    assert splits >= 2
    figures.record("faults", "injected CUDA OOM: batches split, then scored", int(splits))
    figures.record("faults", "injected RM exception", "503 scoring_failed for that request only")


def _standin():
    path = Path(__file__).resolve().parents[1] / "reward_models" / "standin_rm_server.py"
    spec = importlib.util.spec_from_file_location("standin_rm_server_rel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remote_rm_down_or_slow_gives_a_clear_error(figures):
    from support import free_port

    request = {"groups": [{"reference": "1", "responses": ["\\boxed{1}"]}]}
    down_url = f"http://127.0.0.1:{free_port()}/classify?model=m"
    with running_server("--reward-model", f"remote:{down_url}", "--verifier-workers", "1") as srv:
        r = httpx.post(srv.url + "/v1/rewards", json=request, timeout=60)
        ok = httpx.post(srv.url + "/v1/rewards", timeout=60, json={
            "groups": [{"reference": "1", "responses": ["\\boxed{1}"], "rm_scores": [0.5]}]})
    assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"]
    assert ok.status_code == 200  # requests that need no RM still work

    standin = _standin()
    with standin.StandinServer() as rm:
        rm.set(mode="slow", delay=5.0)
        url = f"{rm.url}/classify?model={standin.MODEL_NAME}"
        with running_server("--reward-model", f"remote:{url}", "--remote-timeout-s", "1",
                            "--verifier-workers", "1") as srv:
            started = time.monotonic()
            r = httpx.post(srv.url + "/v1/rewards", json=request, timeout=60)
            elapsed = time.monotonic() - started
    assert r.status_code == 503 and "timed out" in r.json()["error"]["message"]
    assert elapsed < 10
    figures.record("faults", "remote RM down", f"503: {r.json()['error']['code']}, 'unreachable'")
    figures.record("faults", "remote RM slow (5 s, timeout 1 s): answer time (s)", elapsed)


def _kill_pool_workers(stop: threading.Event, killed: list[int]) -> None:
    me = psutil.Process()
    while not stop.is_set():
        for child in me.children(recursive=True):
            try:
                parent = child.parent()
                # Only this process's own pool: its fork server is our direct child (servers
                # started by other tests are children too, with fork servers of their own).
                if parent is not None and parent.ppid() == me.pid and \
                        "forkserver" in " ".join(parent.cmdline()):
                    child.kill()
                    killed.append(child.pid)
            except psutil.Error:
                pass
        time.sleep(0.05)


def test_items_whose_worker_dies_twice_end_as_error(figures):
    async def go():
        verifier = MathVerifier(workers=1, timeout_s=2, max_tasks=100, memory_mb=0)
        await verifier.start()
        stop = threading.Event()
        killed: list[int] = []
        killer = threading.Thread(target=_kill_pool_workers, args=(stop, killed))
        killer.start()
        try:
            return await verifier.verify("7", ["\\boxed{10^{10^{10^{10}}}}"]), killed
        finally:
            stop.set()
            killer.join()
            await verifier.close()

    (verdict,), killed = asyncio.run(go())
    assert killed
    assert verdict.status == "error" and "died" in verdict.detail
    figures.record("faults", "worker killed on the first try and on the retry", "status error")
