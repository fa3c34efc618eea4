"""The cross-request batcher: token budget, sharing across requests, ordering, dedupe, OOM
splitting (fault injection), and a backend that is down: no splitting, the circuit breaker. (Its
queue has no bound of its own: requests hold admission permits, tests/service/test_admission.py.)"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Sequence

import pytest
import torch

from hero_service.batching import Batcher, pack_batches
from hero_service.metrics import Metrics
from hero_service.reward_models import Encoded, RewardModel, RewardModelError, ScoringItem
from hero_service.reward_models.base import RewardModelUnavailable


class RecordingModel(RewardModel):
    """A deterministic backend (score = a function of the text) that records every batch, can be
    slowed down, can raise CUDA-style OOM above a batch size, and can be down as a whole (as the
    remote backend reports a timeout). ``calls`` counts every forward, failed ones included."""

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
        self.down = False
        self.calls = 0

    def encode(self, items: Sequence[ScoringItem]) -> list[Encoded]:
        return [Encoded(key=(item.prompt, item.response), n_tokens=len(item.response.split()),
                        truncated=False, payload=item.response) for item in items]

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        self.gate.wait(10)
        self.calls += 1
        if self.down:
            raise RewardModelUnavailable("remote reward model at http://rm/classify timed out "
                                         "after 2s")
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
    options = {"max_batch_tokens": 64, "max_wait_ms": 20.0, "metrics": Metrics(), **kwargs}
    batcher = Batcher(model, **options)
    batcher.start()
    return batcher


def text(n_words: int, tag: str) -> str:
    return " ".join([tag] * n_words)


LENGTHS = [1, 30, 7, 7, 15, 2, 64, 100, 3, 3, 3, 12]


def encoded_of_lengths(lengths: Sequence[int]) -> list[Encoded]:
    return [Encoded(i, n, False, None) for i, n in enumerate(lengths)]


def test_pack_batches_respects_the_padded_token_budget():
    batches = pack_batches(encoded_of_lengths(LENGTHS), max_batch_tokens=32)
    assert sorted(e.key for b in batches for e in b) == list(range(len(LENGTHS)))
    for batch in batches:
        sizes = [e.n_tokens for e in batch]
        assert sizes == sorted(sizes)
        assert max(sizes) * len(sizes) <= 32 or len(sizes) == 1  # oversize items travel alone


def test_pack_batches_for_a_backend_without_padding_or_with_a_batch_limit():
    unpadded = pack_batches(encoded_of_lengths(LENGTHS), max_batch_tokens=32, padded=False)
    assert sorted(e.key for b in unpadded for e in b) == list(range(len(LENGTHS)))
    assert all(sum(e.n_tokens for e in b) <= 32 or len(b) == 1 for b in unpadded)
    # Summed, short items share a batch that padding to the longest would have split.
    assert len(unpadded) < len(pack_batches(encoded_of_lengths(LENGTHS), max_batch_tokens=32))
    limited = pack_batches(encoded_of_lengths([1] * 10), max_batch_tokens=1000,
                           max_batch_size=4)
    assert [len(b) for b in limited] == [4, 4, 2]


def test_the_batcher_honours_the_backends_batch_limit():
    model = RecordingModel()
    model.max_batch_size = 3
    batcher = make_batcher(model, max_batch_tokens=4096, max_wait_ms=50)
    texts = [f"answer {i}" for i in range(10)]

    async def go():
        return await score_concurrently(batcher, model, [texts])

    try:
        (scored,) = asyncio.run(go())
    finally:
        batcher.stop()
    assert [s.score for s in scored] == [expected(t) for t in texts]
    assert sorted(len(b) for b in model.batches) == [1, 3, 3, 3]


async def score_concurrently(batcher, model, requests):
    """As the pipeline does: announce the items, tokenize, submit, withdraw the announcement."""
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


def score_in_one_batch(model: RewardModel, texts: Sequence[str], **options) -> list[float]:
    """Score ``texts`` through a batcher that takes them as one batch."""
    batcher = make_batcher(model, max_batch_tokens=4096, max_wait_ms=30, **options)
    try:
        scored = asyncio.run(batcher.score(model.encode(items(texts))))
    finally:
        batcher.stop()
    return [s.score for s in scored]


def test_out_of_memory_splits_the_batch_and_retries():
    model = RecordingModel(oom_above=2)
    metrics = Metrics()
    texts = [f"answer {i}" for i in range(8)]
    assert score_in_one_batch(model, texts, metrics=metrics) == [expected(t) for t in texts]
    assert all(len(b) <= 2 for b in model.batches)
    assert metrics.oom_splits._value.get() >= 3  # 8 -> 4+4 -> 2+2+2+2


class TensorHoldingModel(RecordingModel):
    """Allocates its activations before running out of memory, as a real forward does: each
    failed attempt's tensor is alive only as long as something (a traceback) holds its frame."""

    def __init__(self, oom_above: int) -> None:
        super().__init__(oom_above=oom_above)
        self.failed_activations: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_each_retry: list[int] = []

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        self.alive_at_each_retry.append(sum(r() is not None for r in self.failed_activations))
        activations = torch.zeros(len(batch), 1024)
        if len(batch) > (self.oom_above or 0):
            self.failed_activations.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(batch)


def test_the_retry_after_out_of_memory_runs_with_the_failed_forwards_memory_freed():
    model = TensorHoldingModel(oom_above=2)
    texts = [f"answer {i}" for i in range(8)]
    assert score_in_one_batch(model, texts) == [expected(t) for t in texts]
    assert len(model.failed_activations) == 3  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2
    # Handled inside the except block, the retries would see 1, 2, ... failed tensors alive.
    assert model.alive_at_each_retry == [0] * len(model.alive_at_each_retry)


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


def outcomes_then_stop(batcher, model, texts: list[str]) -> list:
    """Submit ``texts`` at once, collect each item's score or error, then stop the batcher."""

    async def go():
        return await asyncio.gather(*(asyncio.shield(f) for f in
                                      batcher.submit(model.encode(items(texts)))),
                                    return_exceptions=True)

    try:
        return asyncio.run(go())
    finally:
        batcher.stop()


def test_backend_down_fails_the_whole_batch_with_one_call_not_a_bisection():
    model = RecordingModel()
    model.down = True
    metrics = Metrics()
    batcher = make_batcher(model, max_batch_tokens=4096, max_wait_ms=0, metrics=metrics)
    texts = [f"answer number {i}" for i in range(64)]
    outcomes = outcomes_then_stop(batcher, model, texts)
    assert all(isinstance(o, RewardModelUnavailable) for o in outcomes)
    assert "timed out after 2s" in str(outcomes[0])
    assert model.calls == 1  # bisecting 64 items would have been 127 calls
    assert metrics.failure_splits._value.get() == 0
    assert metrics.rm_unavailable_batches._value.get() == 1
    assert outcomes[0].retry_after_s >= 1  # the breaker opened: come back after its cool-down


def test_open_breaker_fails_the_rest_of_a_round_without_calls():
    model = RecordingModel()
    model.down = True
    batcher = make_batcher(model, max_batch_tokens=8, max_wait_ms=0)  # several batches a round
    texts = [text(4, f"t{i}") for i in range(12)]
    outcomes = outcomes_then_stop(batcher, model, texts)
    assert all(isinstance(o, RewardModelUnavailable) for o in outcomes)
    assert model.calls == 1
    assert sum("circuit breaker open" in str(o) for o in outcomes) == 10  # 6 batches of 2


def gauge(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    assert value is not None, name
    return value


def test_breaker_refuses_fast_while_open_then_one_probe_closes_it():
    model = RecordingModel()
    metrics = Metrics()
    batcher = make_batcher(model, max_wait_ms=0, metrics=metrics, breaker_cooldown_s=0.5)

    async def go():
        model.down = True
        model.gate.clear()  # hold the failing call so a second request queues behind it
        first = asyncio.ensure_future(batcher.score(model.encode(items(["first"]))))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.score(model.encode(items(["queued"]))))
        await asyncio.sleep(0.05)
        model.gate.set()
        first_error, queued_error = await asyncio.gather(first, queued, return_exceptions=True)
        assert model.calls == 1  # the queued request failed without a call
        assert isinstance(queued_error, RewardModelUnavailable)
        assert "circuit breaker open" in str(queued_error)
        assert "timed out after 2s" in str(queued_error)  # the cause is still told
        assert gauge(metrics, "hero_rm_breaker_state") == 2

        started = time.perf_counter()
        with pytest.raises(RewardModelUnavailable) as refused:
            batcher.raise_if_unavailable()  # the pipeline's early check
        with pytest.raises(RewardModelUnavailable):
            batcher.submit(model.encode(items(["refused at submit"])))
        assert time.perf_counter() - started < 0.1 and model.calls == 1
        assert refused.value.retry_after_s == 1  # ceil of the 0.5 s cool-down left

        await asyncio.sleep(0.6)  # cool-down over; the backend is back
        model.down = False
        model.gate.clear()  # hold the probe to show that others are refused meanwhile
        probe = asyncio.ensure_future(batcher.score(model.encode(items(["probe"]))))
        await asyncio.sleep(0.05)
        assert batcher.breaker.state == "half_open"
        assert gauge(metrics, "hero_rm_breaker_state") == 1
        with pytest.raises(RewardModelUnavailable, match="half_open"):
            batcher.submit(model.encode(items(["while probing"])))
        model.gate.set()
        probed = await probe
        after = await batcher.score(model.encode(items(["after"])))
        return first_error, probed, after

    try:
        first_error, probed, after = asyncio.run(go())
    finally:
        batcher.stop()
    assert isinstance(first_error, RewardModelUnavailable)
    assert probed[0].score == expected("probe") and after[0].score == expected("after")
    assert batcher.breaker.state == "closed"
    assert gauge(metrics, "hero_rm_breaker_state") == 0
    for to in ("open", "half_open", "closed"):
        assert gauge(metrics, "hero_rm_breaker_transitions_total", to=to) == 1


def test_a_failed_probe_reopens_the_breaker():
    model = RecordingModel()
    model.down = True
    batcher = make_batcher(model, max_wait_ms=0, breaker_cooldown_s=0.2)

    async def go():
        outcomes = []
        for attempt in ("a", "b"):
            outcomes += await asyncio.gather(batcher.score(model.encode(items([attempt]))),
                                             return_exceptions=True)
            await asyncio.sleep(0.3)
        return outcomes

    try:
        outcomes = asyncio.run(go())
    finally:
        batcher.stop()
    assert all(isinstance(o, RewardModelUnavailable) for o in outcomes)
    assert model.calls == 2  # the first failure, then the probe
    assert batcher.breaker.state == "open"


def test_input_specific_failures_still_bisect_and_leave_the_breaker_closed():
    model = RecordingModel(fail_on="poison")
    metrics = Metrics()
    batcher = make_batcher(model, max_batch_tokens=4096, max_wait_ms=0, metrics=metrics)
    texts = [f"fine {i}" for i in range(7)] + ["poison"]
    outcomes = outcomes_then_stop(batcher, model, texts)
    assert [o.score for o in outcomes[:7]] == [expected(t) for t in texts[:7]]
    assert isinstance(outcomes[7], RewardModelError)
    assert not isinstance(outcomes[7], RewardModelUnavailable)
    assert metrics.failure_splits._value.get() == 3  # 8 -> 4 -> 2 -> 1
    assert batcher.breaker.state == "closed"


def test_a_caller_whose_event_loop_closed_does_not_kill_the_inference_thread():
    model = RecordingModel()
    batcher = make_batcher(model, max_wait_ms=0)

    async def leave_early():
        # Submit, then return (closing this loop) before the held model answers.
        model.gate.clear()
        batcher.submit(model.encode(items(["left behind", "also left"])))

    async def later():
        return await asyncio.wait_for(batcher.score(model.encode(items(["left behind", "new"]))),
                                      timeout=10)

    try:
        asyncio.run(leave_early())
        model.gate.set()  # results now go to a closed loop
        time.sleep(0.2)
        scored = asyncio.run(later())
    finally:
        batcher.stop()
    assert [s.score for s in scored] == [expected("left behind"), expected("new")]
