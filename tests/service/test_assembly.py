"""Group assembly across requests through the group store (``assembly.py``): per-query
/get_reward traffic against a real service scored as true HERO groups, and the Assembler in
process over a real pipeline (the store's own protocol: tests/service/group_store/)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Optional

import httpx
import pytest
from support import running_server

from hero_client.schema import Group, RewardsRequest
from hero_service.admission import Admission
from hero_service.app import build_verifiers, default_reward_model
from hero_service.assembly import Assembler, check_room_to_wait
from hero_service.batching import Batcher
from hero_service.config import Settings
from hero_service.errors import NotReady, Overloaded
from hero_service.group_store import MemoryGroupStore
from hero_service.metrics import Metrics
from hero_service.pipeline import Pipeline


def test_per_query_requests_get_true_group_rewards(dev_rows):
    row = next(r for r in dev_rows if 0 < sum(r["grader_correct"]) < 8)  # a mixed group
    prompt = row["prompt"]
    with running_server("--group-size", "8", "--group-timeout-s", "30",
                        "--verifier-workers", "1") as srv:
        async def one(client, response):
            r = await client.post("/get_reward", json={
                "query": [prompt + response], "prompts": [prompt], "labels": [row["reference"]]})
            assert r.status_code == 200, r.text
            return r.json()

        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                return await asyncio.gather(*(one(client, x) for x in row["responses"]))

        answers = asyncio.run(go())
        sigma_ref = answers[0]["extra_logs"]["sigma_ref"][0]
        grouped = httpx.post(srv.url + "/v1/rewards", timeout=120, json={
            "params": {"sigma_ref": sigma_ref},
            "groups": [{"prompt": prompt, "reference": row["reference"],
                        "responses": row["responses"]}]}).json()["groups"][0]
    assert all(a["extra_logs"]["partial"] == [0.0] for a in answers)
    assert [a["rewards"][0] for a in answers] == pytest.approx(grouped["rewards"], abs=1e-6)
    verified = [a["extra_logs"]["verified"][0] for a in answers]
    assert verified == [float(v) for v in grouped["verified"]]
    assert len({a["extra_logs"]["hero_weight"][0] for a in answers}) == 1  # one group, one weight


# -- The Assembler in process: a real Pipeline (embedded MiniLM, math-verify pool, batcher) over
# -- a memory store; no HTTP in between.




class Hooks:
    def __init__(self) -> None:
        self.sigmas: list[tuple[str, Optional[float]]] = []
        self.partials = 0

    def on_sigma(self, run: str, value: Optional[float]) -> None:
        self.sigmas.append((run, value))

    def on_partial(self) -> None:
        self.partials += 1


@pytest.fixture(scope="module")
def reward_model():
    model = default_reward_model(Settings())
    yield model
    model.close()


@asynccontextmanager
async def assembler_over(reward_model, *, timeout_s: float = 30.0,
                         max_waiting: int = 4096) -> AsyncIterator[tuple[Assembler, Hooks]]:
    settings = Settings(verifier_workers=1)
    metrics = Metrics()
    verifiers = build_verifiers(settings, metrics)
    await asyncio.gather(*(v.start() for v in verifiers.values()))
    batcher = Batcher(reward_model, max_batch_tokens=4096, max_wait_ms=2, metrics=metrics)
    batcher.start()
    pipeline = Pipeline(settings, reward_model, batcher, verifiers, metrics,
                        Admission(settings.max_queued_rollouts, metrics))
    store = MemoryGroupStore(timeout_s=timeout_s, max_waiting=max_waiting)
    await store.start()
    hooks = Hooks()
    try:
        yield Assembler(pipeline, store, hooks.on_sigma, hooks.on_partial), hooks
    finally:
        await store.close()
        batcher.stop()
        await asyncio.gather(*(v.close() for v in verifiers.values()))


def mixed_row(dev_rows):
    return next(r for r in dev_rows if 0 < sum(r["grader_correct"]) < 8)


def piece_request(row, responses, key: str = "g1") -> RewardsRequest:
    return RewardsRequest(groups=[Group(id="mine", prompt=row["prompt"],
                                        reference=row["reference"], responses=responses,
                                        group_key=key, group_size=8)])


def test_two_pieces_of_a_group_get_the_whole_groups_rewards(reward_model, dev_rows):
    row = mixed_row(dev_rows)
    responses = row["responses"]

    async def go():
        async with assembler_over(reward_model) as (assembler, hooks):
            first, second = await asyncio.gather(
                assembler.score_rewards(piece_request(row, responses[:3])),
                assembler.score_rewards(piece_request(row, responses[3:])))
            whole = await assembler.pipeline.score(RewardsRequest(
                groups=[Group(prompt=row["prompt"], reference=row["reference"],
                              responses=responses)],
                params={"sigma_ref": first.sigma_ref}))
            return first, second, whole, hooks

    first, second, whole, hooks = asyncio.run(go())
    expected = whole.groups[0]
    assert first.sigma_ref == second.sigma_ref == expected.sigma  # the run's first group
    assert first.groups[0].id == "mine"
    assert first.groups[0].rewards + second.groups[0].rewards == pytest.approx(expected.rewards)
    assert first.groups[0].verified + second.groups[0].verified == expected.verified
    assert first.groups[0].weight == second.groups[0].weight == pytest.approx(expected.weight)
    assert not first.groups[0].partial
    # One group closed: the sigma-bar hook heard of it once, from whichever request published.
    assert len(hooks.sigmas) == 1 and hooks.sigmas[0][0] == "default"
    assert hooks.partials == 0


def test_a_piece_and_a_whole_group_in_one_request(reward_model, dev_rows):
    row = mixed_row(dev_rows)
    other = next(r for r in dev_rows if r is not row)

    async def go():
        async with assembler_over(reward_model) as (assembler, _):
            request = RewardsRequest(groups=[
                Group(prompt=other["prompt"], reference=other["reference"],
                      responses=other["responses"]),
                piece_request(row, row["responses"]).groups[0]])
            mixed = await assembler.score_rewards(request)
            alone = await assembler.pipeline.score(RewardsRequest(groups=[request.groups[0]]))
            return mixed, alone

    mixed, alone = asyncio.run(go())
    assert [g.id for g in mixed.groups] == ["0", "mine"]
    # The whole group is scored as if alone (its own sigma as sigma_ref), the piece completes.
    assert mixed.groups[0].rewards == pytest.approx(alone.groups[0].rewards)
    assert len(mixed.groups[1].rewards) == 8 and not mixed.groups[1].partial


def test_a_stop_ends_the_wait_and_the_retry_reattaches(reward_model, dev_rows):
    row = mixed_row(dev_rows)
    responses = row["responses"]

    async def stop_now():
        return NotReady("client disconnected")

    async def go():
        async with assembler_over(reward_model) as (assembler, _):
            with pytest.raises(NotReady, match="client disconnected"):
                await assembler.score_rewards(piece_request(row, responses[:4]),
                                              should_stop=stop_now)
            waiting_after_stop = await assembler.store.waiting()
            parked_after_stop = assembler.parked
            # The same body again re-attaches to its members; the rest of the group completes.
            again, rest = await asyncio.gather(
                assembler.score_rewards(piece_request(row, responses[:4])),
                assembler.score_rewards(piece_request(row, responses[4:])))
            return waiting_after_stop, parked_after_stop, again, rest, \
                await assembler.store.waiting()

    waiting_after_stop, parked_after_stop, again, rest, waiting_at_end = asyncio.run(go())
    assert waiting_after_stop == 4  # the stopped request's members stayed in the store
    assert parked_after_stop == 0
    assert len(again.groups[0].rewards) == 4 and len(rest.groups[0].rewards) == 4
    assert not again.groups[0].partial and not rest.groups[0].partial
    assert waiting_at_end == 0


def test_a_group_that_times_out_closes_partial_once(reward_model, dev_rows):
    row = mixed_row(dev_rows)

    async def go():
        async with assembler_over(reward_model, timeout_s=0.5) as (assembler, hooks):
            result = await assembler.score_rewards(piece_request(row, row["responses"][:5]))
            return result, hooks

    result, hooks = asyncio.run(go())
    assert result.groups[0].partial and len(result.groups[0].rewards) == 5
    assert hooks.partials == 1 and len(hooks.sigmas) == 1


def test_several_pieces_are_checked_against_the_stores_bound_before_scoring(reward_model,
                                                                             dev_rows):
    rows = [r for r in dev_rows][:2]

    async def go():
        async with assembler_over(reward_model, max_waiting=10) as (assembler, _):
            request = RewardsRequest(groups=[
                piece_request(r, r["responses"], key=f"g{i}").groups[0]
                for i, r in enumerate(rows)])
            with pytest.raises(Overloaded, match="limit 10"):
                await assembler.score_rewards(request)
            # Nothing was scored or joined, and the permit went back.
            await check_room_to_wait(assembler.store, 10)
            return (assembler.pipeline.admission.held, await assembler.store.waiting(),
                    assembler.pipeline.metrics.rollouts_scored.labels("hero")._value.get())

    held, waiting, scored = asyncio.run(go())
    assert (held, waiting, scored) == (0, 0, 0)


def test_whole_groups_move_the_runs_sigma_bar(reward_model, dev_rows):
    rows = dev_rows[:3]

    async def go():
        async with assembler_over(reward_model) as (assembler, hooks):
            request = RewardsRequest(groups=[
                Group(prompt=r["prompt"], reference=r["reference"], responses=r["responses"])
                for r in rows])
            first = await assembler.score_whole(request, "exp")
            second = await assembler.score_whole(request, "exp")
            return first, second, hooks, await assembler.store.sigma_value("exp"), \
                await assembler.store.sigma_value("default")

    first, second, hooks, sigma_exp, sigma_default = asyncio.run(go())
    sigmas = [g.sigma for g in first.groups]
    assert first.sigma_ref == pytest.approx(sum(sigmas) / len(sigmas))  # no series yet
    # The second request is weighted with the run's series after the first.
    assert second.sigma_ref == pytest.approx(hooks.sigmas[0][1])
    assert [run for run, _ in hooks.sigmas] == ["exp", "exp"]
    assert sigma_exp == pytest.approx(hooks.sigmas[1][1]) and sigma_default is None

