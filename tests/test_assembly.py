"""Group assembly across requests: unit behaviour, then per-query /get_reward traffic against a
real service scored as true HERO groups."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from hero_client.schema import GroupResult
from hero_service.assembly import GroupAssembler, ScoredGroup
from hero_service.errors import Overloaded, TooManyRollouts
from support import running_server


def fake_result(responses: list[str]) -> GroupResult:
    n = len(responses)
    return GroupResult(id="0", weight=1.0, rewards=[float(len(r)) for r in responses],
                       verified=[False] * n, verifier_status=["incorrect"] * n,
                       normalized=[0.0] * n, truncated=[False] * n)


def test_full_groups_are_scored_once_and_each_caller_gets_its_own_item():
    calls: list[list[str]] = []

    async def score(prompt, label, responses):
        calls.append(list(responses))
        return ScoredGroup(fake_result(responses), 0.5)

    async def go():
        assembler = GroupAssembler(group_size=3, timeout_s=10, max_waiting=100, score=score)
        futures = [assembler.add("p", "l", [r])[0] for r in ("a", "bb", "ccc")]
        other = assembler.add("q", "l", ["dddd"])  # another prompt: its own group
        results = await asyncio.gather(*futures)
        assert not other[0].done()
        return results, assembler

    results, assembler = asyncio.run(go())
    assert calls == [["a", "bb", "ccc"]]
    assert [r.group.rewards[r.index] for r in results] == [1.0, 2.0, 3.0]
    assert not any(r.partial for r in results)


def test_timeout_scores_a_partial_group_and_flags_it():
    async def score(prompt, label, responses):
        return ScoredGroup(fake_result(responses), None)

    async def go():
        assembler = GroupAssembler(group_size=4, timeout_s=0.2, max_waiting=100, score=score)
        return await asyncio.gather(*assembler.add("p", None, ["a", "b"]))

    results = asyncio.run(go())
    assert all(r.partial and r.group.partial for r in results)
    assert len(results[0].group.rewards) == 2


def test_waiting_rollouts_are_bounded():
    async def score(prompt, label, responses):
        return ScoredGroup(fake_result(responses), None)

    async def go():
        assembler = GroupAssembler(group_size=8, timeout_s=0.2, max_waiting=3, score=score)
        pending = assembler.add("p", None, ["a", "b", "c"])
        with pytest.raises(Overloaded):
            assembler.add("q", None, ["d"])
        await asyncio.gather(*pending)
        assert assembler.waiting == 0
        return await asyncio.gather(*assembler.add("q", None, ["d"]))

    assert len(asyncio.run(go())) == 1


def test_a_piece_larger_than_the_bound_is_413_not_429():
    calls: list[list[str]] = []

    async def score(prompt, label, responses):
        calls.append(list(responses))
        return ScoredGroup(fake_result(responses), None)

    async def go():
        assembler = GroupAssembler(group_size=2, timeout_s=5, max_waiting=4, score=score)
        with pytest.raises(TooManyRollouts) as info:
            assembler.add("p", None, ["a", "b", "c", "d", "e"])  # even an idle server refuses
        assert assembler.waiting == 0 and not calls  # nothing half-applied
        fits = await asyncio.gather(*assembler.add("p", None, ["a", "b", "c", "d"]))
        return info.value, fits

    error, fits = asyncio.run(go())
    assert error.status == 413 and error.code == "too_many_rollouts" and error.field == "query"
    assert "5 rollouts" in error.message and "limit is 4" in error.message
    assert len(fits) == 4 and calls == [["a", "b"], ["c", "d"]]


def test_scoring_errors_reach_every_waiting_caller():
    async def score(prompt, label, responses):
        raise RuntimeError("boom")

    async def go():
        assembler = GroupAssembler(group_size=2, timeout_s=5, max_waiting=10, score=score)
        return await asyncio.gather(*assembler.add("p", None, ["a", "b"]), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(go()))


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
    assert [a["extra_logs"]["verified"][0] for a in answers] == [float(v) for v in grouped["verified"]]
    assert len({a["extra_logs"]["hero_weight"][0] for a in answers}) == 1  # one group, one weight
