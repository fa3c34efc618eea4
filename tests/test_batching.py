"""The cross-request batcher: token budget, sharing across requests, ordering, dedupe, the
bounded queue, and OOM splitting (fault injection)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Sequence

import pytest
import torch

from hero_service.batching import Batcher, _Pending, pack_batches
from hero_service.errors import Overloaded
from hero_service.metrics import Metrics
from hero_service.reward_models import Encoded, RewardModel, RewardModelError, ScoringItem


class RecordingModel(RewardModel):
    """A deterministic backend (score = a function of the text) that records every batch, can be
    slowed down, and can raise CUDA-style OOM above a batch size."""

    model_id = "recording"
    max_tokens = 10_000

    def __init__(self, delay_s: float = 0.0, oom_above: int | None = None,
                 fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.delay_s = delay_s
        self.oom_above = oom_above
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()

    def encode(self, items: Sequence[ScoringItem]) -> list[Encoded]:
        return [Encoded(key=(item.prompt, item.response), n_tokens=len(item.response.split()),
                        truncated=False, payload=item.response) for item in items]

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        self.gate.wait(10)
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.fail_on is not None and any(e.payload == self.fail_on for e in batch):
            raise ValueError("backend exploded")
        self.batches.append([e.payload for e in batch])
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        return [float(len(e.payload)) + 0.001 * e.n_tokens for e in batch]


def expected(text: str) -> float:
    return float(len(text)) + 0.001 * len(text.split())


def items(texts: Sequence[str], prompt: str = "p") -> list[ScoringItem]:
    return [ScoringItem(prompt, t) for t in texts]


def make_batcher(model: RewardModel, **kwargs) -> Batcher:
    options = {"max_batch_tokens": 64, "max_wait_ms": 20.0, "max_queued": 1000,
               "metrics": Metrics(), **kwargs}
    batcher = Batcher(model, **options)
    batcher.start()
    return batcher


def text(n_words: int, tag: str) -> str:
    return " ".join([tag] * n_words)


def test_pack_batches_respects_the_padded_token_budget():
    lengths = [1, 30, 7, 7, 15, 2, 64, 100, 3, 3, 3, 12]
    pending = [_Pending(Encoded(i, n, False, None), None, None, 0.0)  # type: ignore[arg-type]
               for i, n in enumerate(lengths)]
    batches = pack_batches(pending, max_batch_tokens=32)
    assert sorted(p.encoded.key for b in batches for p in b) == list(range(len(lengths)))
    for batch in batches:
        sizes = [p.encoded.n_tokens for p in batch]
        assert sizes == sorted(sizes)
        assert max(sizes) * len(sizes) <= 32 or len(sizes) == 1  # oversize items travel alone


async def score_concurrently(batcher, model, requests):
    """As the pipeline does: announce the items, tokenize, submit, then withdraw the announcement."""
    total = sum(len(t) for t in requests)
    batcher.announce(total)
    tasks = [asyncio.ensure_future(batcher.score(model.encode(items(t)))) for t in requests]
    await asyncio.sleep(0)  # every request has submitted
    batcher.withdraw(total)
    return await asyncio.gather(*tasks)


def test_concurrent_requests_share_batches_and_get_their_own_results_in_order():
    model = RecordingModel()
    batcher = make_batcher(model, max_batch_tokens=4096, max_wait_ms=50)

    async def go():
        requests = [[text(1 + (r * 7 + i) % 5, f"r{r}i{i}") for i in range(6)] for r in range(8)]
        return requests, await score_concurrently(batcher, model, requests)

    try:
        requests, results = asyncio.run(go())
    finally:
        batcher.stop()
    for texts, scored in zip(requests, results):
        assert [s.score for s in scored] == [expected(t) for t in texts]
    mixed = [b for b in model.batches if len({t.split()[0][:2] for t in b}) > 1]
    assert mixed, f"no batch mixed requests: {model.batches}"
    assert len(model.batches) < 8  # 48 items from 8 requests did not take 8+ forward passes


def test_batches_never_exceed_the_token_budget():
    model = RecordingModel()
    metrics = Metrics()
    batcher = make_batcher(model, max_batch_tokens=20, metrics=metrics)
    texts = [text(n, f"t{i}") for i, n in enumerate([1, 3, 5, 2, 8, 4, 6, 7, 1, 2, 9, 3] * 3)]

    async def go():
        return await score_concurrently(batcher, model, [[t] for t in texts])

    try:
        asyncio.run(go())
    finally:
        batcher.stop()
    for batch in model.batches:
        assert max(len(t.split()) for t in batch) * len(batch) <= 20
    assert sum(len(b) for b in model.batches) == len(set(texts))


def test_idle_model_starts_without_waiting_for_the_window():
    model = RecordingModel()
    batcher = make_batcher(model, max_wait_ms=2000)

    async def go():
        started = time.perf_counter()
        await batcher.score(model.encode(items(["alone"])))
        return time.perf_counter() - started

    try:
        elapsed = asyncio.run(go())
    finally:
        batcher.stop()
    assert elapsed < 1.0  # nothing announced: no 2 s fill wait


def test_identical_inputs_are_scored_once():
    model = RecordingModel()
    model.gate.clear()  # hold the model so both requests are in flight together
    batcher = make_batcher(model, max_wait_ms=30)

    async def go():
        same = items(["the same answer"] * 3)
        first = asyncio.ensure_future(batcher.score(model.encode(same)))
        second = asyncio.ensure_future(batcher.score(model.encode(same[:1])))
        await asyncio.sleep(0.05)
        model.gate.set()
        return await first, await second

    try:
        first, second = asyncio.run(go())
    finally:
        batcher.stop()
    assert [s.score for s in first + second] == [expected("the same answer")] * 4
    assert sum(b.count("the same answer") for b in model.batches) == 1


def test_full_queue_answers_overloaded_without_enqueuing():
    model = RecordingModel()
    model.gate.clear()  # hold the inference thread so the queue fills
    batcher = make_batcher(model, max_queued=5, max_wait_ms=0)

    async def go():
        first = asyncio.ensure_future(batcher.score(model.encode(items(["a", "b", "c"]))))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            batcher.submit(model.encode(items(["d", "e", "f"])))
        assert batcher.outstanding == 3  # the refused request left nothing behind
        model.gate.set()
        return await first

    try:
        scored = asyncio.run(go())
    finally:
        batcher.stop()
    assert [s.score for s in scored] == [expected(t) for t in "abc"]


def test_out_of_memory_splits_the_batch_and_retries():
    model = RecordingModel(oom_above=2)
    metrics = Metrics()
    batcher = make_batcher(model, max_batch_tokens=4096, max_wait_ms=30, metrics=metrics)
    texts = [f"answer {i}" for i in range(8)]

    async def go():
        return await batcher.score(model.encode(items(texts)))

    try:
        scored = asyncio.run(go())
    finally:
        batcher.stop()
    assert [s.score for s in scored] == [expected(t) for t in texts]
    assert all(len(b) <= 2 for b in model.batches)
    assert metrics.oom_splits._value.get() >= 3  # 8 -> 4+4 -> 2+2+2+2


def test_backend_failure_fails_only_that_batch():
    model = RecordingModel(fail_on="poison")
    batcher = make_batcher(model, max_wait_ms=0)

    async def go():
        bad = await asyncio.gather(batcher.score(model.encode(items(["poison"]))),
                                   return_exceptions=True)
        good = await batcher.score(model.encode(items(["fine answer"])))
        return bad[0], good

    try:
        bad, good = asyncio.run(go())
    finally:
        batcher.stop()
    assert isinstance(bad, RewardModelError) and "backend exploded" in str(bad)
    assert good[0].score == expected("fine answer")


def test_real_model_scores_match_unbatched_scores(dev_rows):
    from hero_service.reward_models import load_reward_model

    model = load_reward_model("embedded", device="cpu")
    batcher = make_batcher(model, max_batch_tokens=2048, max_wait_ms=10)
    rows = dev_rows[:4]

    async def go():
        return await asyncio.gather(*(
            batcher.score(model.encode([ScoringItem(r["prompt"], x, r["reference"])
                                        for x in r["responses"]])) for r in rows))

    try:
        results = asyncio.run(go())
    finally:
        batcher.stop()
    for row, scored in zip(rows, results):
        alone = [model.forward(model.encode([ScoringItem(row["prompt"], x, row["reference"])]))[0]
                 for x in row["responses"]]
        assert [s.score for s in scored] == pytest.approx(alone, abs=1e-5)
