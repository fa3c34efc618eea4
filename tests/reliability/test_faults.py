"""Faults: reward-model exceptions and CUDA OOM (injected through the model seam of a real app
served by real uvicorn), remote RM down, slow or hung (the circuit breaker), verifier workers that
keep dying, and a request larger than the queue."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch
from support import ThreadedServer, running_server

from hero_service.app import create_app
from hero_service.config import Settings
from hero_service.reward_models import RewardModel, load_reward_model
from hero_service.verifiers import MathVerifier

POISON = "POISON: this response breaks the reward model"


class FaultyModel(RewardModel):
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
    path = (Path(__file__).resolve().parents[1] / "service" / "reward_models"
            / "standin_rm_server.py")
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
    assert r.json()["error"]["code"] == "reward_model_unavailable"
    assert int(r.headers["retry-after"]) >= 1
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


def _metric(metrics_text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in metrics_text.splitlines()
                if line.startswith(name + " ") or line.startswith(name + "{"))


def test_hung_remote_rm_fails_fast_opens_the_breaker_and_recovers(dev_rows, figures):
    """A remote RM that accepts connections and never answers: one backend call per outage, not a
    bisection of every batch (127 calls for 64 rollouts, each a whole timeout)."""
    standin = _standin()
    rows = dev_rows[:8]
    request = {"groups": [{"prompt": r["prompt"], "reference": r["reference"],
                           "responses": r["responses"]} for r in rows]}
    assert sum(len(g["responses"]) for g in request["groups"]) == 64
    with standin.StandinServer() as rm:
        url = f"{rm.url}/classify?model={standin.MODEL_NAME}"
        with running_server("--reward-model", f"remote:{url}", "--remote-timeout-s", "2",
                            "--verifier-workers", "1") as srv:
            health: list[int] = []
            stop = threading.Event()

            def probe_health() -> None:
                while not stop.is_set():
                    health.append(httpx.get(srv.url + "/healthz", timeout=5).status_code)
                    time.sleep(0.2)

            prober = threading.Thread(target=probe_health)
            rm.set(mode="hang")
            prober.start()
            try:
                started = time.monotonic()
                first = httpx.post(srv.url + "/v1/rewards", json=request, timeout=30)
                first_s = time.monotonic() - started
                started = time.monotonic()
                second = httpx.post(srv.url + "/v1/rewards", json=request, timeout=30)
                second_s = time.monotonic() - started
                calls_while_down = len([q for q in rm.requests if q["path"] == "/classify"])
                # While open, requests that need no RM are served as usual.
                own_scores = httpx.post(srv.url + "/v1/rewards", timeout=30, json={"groups": [
                    {**g, "rm_scores": [0.0] * len(g["responses"])} for g in request["groups"]]})
                verifier_only = httpx.post(srv.url + "/v1/rewards", timeout=30,
                                           json={**request, "mode": "verifier"})
                metrics_open = httpx.get(srv.url + "/metrics").text

                rm.set(mode="ok")  # the RM comes back
                recovered_at = None
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    r = httpx.post(srv.url + "/v1/rewards", json=request, timeout=30)
                    if r.status_code == 200:
                        recovered_at = time.monotonic()
                        break
                    assert r.status_code == 503, r.text
                    time.sleep(0.25)
                recovery_s = recovered_at - started if recovered_at else None
                metrics_after = httpx.get(srv.url + "/metrics").text
            finally:
                stop.set()
                prober.join()
            log = srv.log()

    assert first.status_code == 503 and first_s < 20, (first.status_code, first_s)
    error = first.json()["error"]
    assert error["code"] == "reward_model_unavailable" and "timed out after 2s" in error["message"]
    assert 1 <= int(first.headers["retry-after"]) <= 60
    assert second.status_code == 503
    assert second.json()["error"]["code"] == "reward_model_unavailable"
    assert "circuit breaker open" in second.json()["error"]["message"]
    assert second_s < 2  # under the remote timeout: no call, no queueing
    assert 1 <= int(second.headers["retry-after"]) <= 60
    assert calls_while_down <= 2, calls_while_down  # a bisection of 64 would be 127
    assert own_scores.status_code == 200 and verifier_only.status_code == 200
    assert _metric(metrics_open, "hero_rm_breaker_state") == 2
    assert _metric(metrics_open, "hero_batch_failure_splits_total") == 0
    assert health and set(health) == {200}
    assert recovery_s is not None, "no 200 within 30 s of the RM coming back"
    assert _metric(metrics_after, "hero_rm_breaker_state") == 0
    assert "circuit breaker closed -> open" in log and "circuit breaker half_open -> closed" in log
    figures.record("faults", "hung remote RM (timeout 2 s), 64 rollouts: first 503 after (s)",
                   first_s)
    figures.record("faults", "hung remote RM: next request 503 (breaker open) after (s)", second_s)
    figures.record("faults", "hung remote RM: backend calls for both requests (bisection: 127)",
                   calls_while_down)
    figures.record("faults", "RM back: first 200 after (s)", recovery_s)


def test_request_larger_than_the_queue_is_413_not_429(dev_rows, figures):
    """On an idle server the pipeline used to admit it and the batcher to refuse it: a 429 that
    no retry could ever pass."""
    def pairs(n: int) -> list[tuple[dict, str]]:
        # Distinct rollouts (identical ones are scored once, so they would not fill the queue).
        return [(row, x) for row in dev_rows for x in dict.fromkeys(row["responses"])][:n]

    def rewards(n: int) -> dict:
        groups: dict[str, dict] = {}
        for row, x in pairs(n):
            groups.setdefault(row["prompt"], {"prompt": row["prompt"],
                                              "reference": row["reference"],
                                              "responses": []})["responses"].append(x)
        return {"groups": list(groups.values())}

    def queries(n: int, one_prompt: bool = False) -> dict:
        chosen = [(dev_rows[0], x) for x in (dev_rows[0]["responses"] * 3)[:n]] if one_prompt \
            else pairs(n)
        return {"query": [row["prompt"] + x for row, x in chosen],
                "prompts": [row["prompt"] for row, _ in chosen],
                "labels": [row["reference"] for row, _ in chosen]}

    with running_server("--max-queued-rollouts", "16", "--verifier-workers", "1") as srv:
        too_many = httpx.post(srv.url + "/v1/rewards", json=rewards(17), timeout=120)
        fits = httpx.post(srv.url + "/v1/rewards", json=rewards(16), timeout=120)
        get_reward = httpx.post(srv.url + "/get_reward", json=queries(17), timeout=120)
    with running_server("--max-queued-rollouts", "16", "--group-size", "8",
                        "--verifier-workers", "1") as srv:
        # One prompt: a single piece of 17 for the assembler (its bound counts every rollout).
        assembled = httpx.post(srv.url + "/get_reward", json=queries(17, one_prompt=True),
                               timeout=120)

    for r in (too_many, get_reward, assembled):
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "too_many_rollouts"
        assert "17 rollouts" in error["message"] and "limit is 16" in error["message"]
        assert "retry-after" not in r.headers
    assert too_many.json()["error"]["field"] == "groups"
    assert assembled.json()["error"]["field"] == "query"
    assert fits.status_code == 200, fits.text
    figures.record("limits", "17 rollouts against --max-queued-rollouts 16",
                   "413 too_many_rollouts (/v1/rewards, /get_reward, assembled)")


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
