"""The pieces benches share when they drive the service's real ``Batcher`` without HTTP: what
the pipeline's RM stage does for one request, and a backend that wraps another to watch it."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence

from hero_service.batching import Batcher
from hero_service.metrics import Metrics
from hero_service.reward_models import Encoded, RewardModel, ScoringItem


async def score_request(batcher: Batcher, model: RewardModel,
                        items: Sequence[ScoringItem]) -> list[tuple[Hashable, float]]:
    """As ``pipeline.py`` ``_reward_model_scores`` does for one request: announce, encode in a
    worker thread, withdraw, score. Returns (key, score) per item."""
    batcher.announce(len(items))
    try:
        encoded = await asyncio.to_thread(model.encode, items)
    finally:
        batcher.withdraw(len(items))
    scored = await batcher.score(encoded)
    return [(e.key, s.score) for e, s in zip(encoded, scored)]


class Delegating(RewardModel):
    """A backend that declares what ``inner`` declares and passes its work on (subclasses
    override ``forward`` to count or to fail on purpose)."""

    def __init__(self, inner: RewardModel) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.max_tokens = inner.max_tokens
        self.device_type = inner.device_type
        self.padded = inner.padded
        self.max_batch_size = inner.max_batch_size
        self.shares_prefixes = inner.shares_prefixes

    def encode(self, items: Sequence[ScoringItem]) -> list[Encoded]:
        return self.inner.encode(items)

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        return self.inner.forward(batch)


def score_through_batcher(model: RewardModel, requests: Sequence[list[ScoringItem]],
                          callers: int, budget: int, max_wait_ms: float = 5.0
                          ) -> tuple[dict[Hashable, float], Metrics]:
    """``callers`` concurrent callers, caller c sending requests c, c + callers, ... one after
    the other, through a real Batcher (its inference thread owns the model)."""
    metrics = Metrics()
    batcher = Batcher(model, max_batch_tokens=budget, max_wait_ms=max_wait_ms, metrics=metrics)
    batcher.start()
    scores: dict[Hashable, float] = {}

    async def caller(mine: Sequence[list[ScoringItem]]) -> None:
        for items in mine:
            scores.update(await score_request(batcher, model, items))

    async def all_callers() -> None:
        await asyncio.gather(*(caller(requests[c::callers]) for c in range(callers)))

    try:
        asyncio.run(all_callers())
    finally:
        batcher.stop()
    return scores, metrics
