"""The Python SDK: typed results against the real service; retries against a real overloaded
server; chunking; the transport seam with httpx.MockTransport for exact retry semantics."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from support import free_port, running_server

from hero_client import (
    AsyncHeroClient,
    HeroAPIError,
    HeroClient,
    HeroConnectionError,
    HeroValidationError,
    RetryPolicy,
    RewardsResponse,
    RunningSigma,
)
from hero_client._client import chunk_groups, get_reward_body
from hero_client.schema import Group


def dev_groups(rows):
    return [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"],
             "responses": r["responses"], "rm_scores": r["rm72b_scores"]} for r in rows]


def test_score_returns_typed_results(server, dev_rows):
    with HeroClient(server.url, api_key="test-key") as client:
        result = client.score(dev_groups(dev_rows[:5]), request_id="t1")
        info = client.info()
    assert isinstance(result, RewardsResponse) and result.request_id == "t1"
    assert [g.id for g in result.groups] == [r["id"] for r in dev_rows[:5]]
    assert all(len(g.advantages) == 8 for g in result.groups)
    assert info.verifier == "math"


def test_chunked_scoring_matches_one_request_with_the_same_sigma_ref(server, dev_rows):
    groups = dev_groups(dev_rows[:12])
    with HeroClient(server.url, api_key="test-key", max_groups_per_request=5) as chunked, \
            HeroClient(server.url, api_key="test-key") as whole:
        a = chunked.score(groups, sigma_ref=0.2)
        b = whole.score(groups, sigma_ref=0.2)
    assert [g.id for g in a.groups] == [g.id for g in b.groups]
    assert [g.rewards for g in a.groups] == [g.rewards for g in b.groups]


def test_a_chunked_first_batch_is_weighted_as_one_batch(server, dev_rows):
    # No sigma_ref yet (a run's first batch): one request uses its groups' mean sigma; the
    # chunks of a split batch must use the whole batch's mean too, not each chunk its own.
    groups = dev_groups(dev_rows[:12])
    running_chunked, running_whole = RunningSigma(), RunningSigma()
    with HeroClient(server.url, api_key="test-key", max_groups_per_request=5,
                    running_sigma=running_chunked) as chunked, \
            HeroClient(server.url, api_key="test-key", running_sigma=running_whole) as whole:
        per_chunk = [chunked._post_rewards(r) for r in chunked._plan(
            groups, "hero", None, {"advantage": "rloo"}, None, None)]
        a = chunked.score(groups, params={"advantage": "rloo"})
        b = whole.score(groups, params={"advantage": "rloo"})
    assert len(per_chunk) == 3  # the batch did travel as three requests
    assert len({p.sigma_ref for p in per_chunk}) == 3  # each chunk alone has its own mean
    assert a.sigma_ref == pytest.approx(b.sigma_ref, rel=1e-12)
    for x, y in zip(a.groups, b.groups):
        assert x.weight == pytest.approx(y.weight, rel=1e-12)
        assert x.rewards == pytest.approx(y.rewards, rel=1e-12, abs=1e-15)
        assert x.advantages == pytest.approx(y.advantages, rel=1e-12, abs=1e-15)
        assert x.normalized == y.normalized
    assert running_chunked.value == pytest.approx(running_whole.value, rel=1e-12)

    async def chunked_async():
        async with AsyncHeroClient(server.url, api_key="test-key", max_groups_per_request=4,
                                   max_concurrency=3) as client:
            return await client.score(groups, params={"advantage": "rloo"})

    c = asyncio.run(chunked_async())
    assert [g.weight for g in c.groups] == pytest.approx([g.weight for g in b.groups], rel=1e-12)


def test_pieces_are_not_sent_the_clients_sigma_bar(dev_rows):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.params.get("run"), body["params"].get("sigma_ref")))
        return httpx.Response(500, json={"error": {"code": "internal", "message": "stop"}})

    running = RunningSigma(value=0.3)
    piece = {"prompt": "p", "reference": "1", "responses": ["a"], "group_key": "k",
             "group_size": 2}
    with HeroClient("http://hero.test", transport=httpx.MockTransport(handler),
                    running_sigma=running, retry=RetryPolicy(max_attempts=1)) as client:
        for groups in ([piece], [{"prompt": "p", "reference": "1", "responses": ["a", "b"]}]):
            with pytest.raises(HeroAPIError):
                client.score(groups, run="exp42")
    assert seen == [("exp42", None), ("exp42", 0.3)]


def test_running_sigma_is_sent_and_updated(server, dev_rows):
    running = RunningSigma()
    with HeroClient(server.url, api_key="test-key", running_sigma=running) as client:
        first = client.score(dev_groups(dev_rows[:4]))
        after_first = running.value
        second = client.score(dev_groups(dev_rows[4:8]))
    batch1 = [g.sigma for g in first.groups]
    assert after_first == pytest.approx(sum(batch1) / 4)
    assert second.sigma_ref == pytest.approx(after_first)  # the client sent sigma-bar
    batch2 = sum(g.sigma for g in second.groups) / 4
    assert running.value == pytest.approx(0.9 * after_first + 0.1 * batch2)


def test_async_client(server, dev_rows):
    async def go():
        async with AsyncHeroClient(server.url, api_key="test-key", max_groups_per_request=2,
                                   max_concurrency=2) as client:
            return await client.score(dev_groups(dev_rows[:5]), mode="verifier")

    result = asyncio.run(go())
    assert len(result.groups) == 5 and all(g.weight == 1.0 for g in result.groups)


def test_get_reward_body_is_plain_json_lists_with_absent_fields_as_null():
    body = get_reward_body(("q1", "q2"), None, ("4", None))
    assert body == {"query": ["q1", "q2"], "prompts": None, "labels": ["4", None]}
    assert json.loads(json.dumps(body)) == body


def test_sync_and_async_get_reward_agree_with_the_verifier(server, dev_rows):
    """The OpenRLHF protocol from both clients: the same queries give the same answers, and
    each verdict is the verifier's on that response alone."""
    row = next(r for r in dev_rows if 0 < sum(r["grader_correct"]) < len(r["responses"]))
    queries = [row["prompt"] + r for r in row["responses"]]
    prompts = [row["prompt"]] * len(queries)
    labels = [row["reference"]] * len(queries)
    with HeroClient(server.url, api_key="test-key") as client:
        blocking = client.get_reward(queries, prompts=prompts, labels=labels)
        verdicts = client.score([{"reference": row["reference"], "responses": [r]}
                                 for r in row["responses"]], mode="verifier")

    async def go():
        async with AsyncHeroClient(server.url, api_key="test-key") as client:
            return await client.get_reward(queries, prompts=prompts, labels=labels)

    awaited = asyncio.run(go())
    assert awaited.rewards == blocking.rewards and awaited.scores == blocking.scores
    assert blocking.scores == [1.0 if g.verified[0] else 0.0 for g in verdicts.groups]
    assert 0.0 < sum(blocking.scores) < len(queries)  # the row has right and wrong answers


def test_api_errors_are_typed(server):
    with HeroClient(server.url, api_key="test-key") as client:
        with pytest.raises(HeroAPIError) as err:
            client.score([{"prompt": "p", "responses": ["a"]}])
    assert err.value.status == 422 and err.value.field == "groups[0].reference"
    with HeroClient(server.url, api_key="wrong") as client, pytest.raises(HeroAPIError) as err:
        client.score([{"reference": "1", "responses": ["a"]}])
    assert err.value.status == 401


def test_retries_ride_out_a_real_overloaded_server(dev_rows):
    """A real service with a tiny queue: concurrent callers get 429s, the SDK retries them, and
    every group is scored exactly once in its caller's result."""
    rows = dev_rows[:16]
    with running_server("--max-queued-rollouts", "16", "--verifier-workers", "1") as srv:
        async def caller(client, row, i):
            group = {"id": f"g{i}", "reference": row["reference"],
                     "responses": [f"{x} (#{i})" for x in row["responses"]]}
            return await client.score([group])

        async def go():
            async with AsyncHeroClient(srv.url, retry=RetryPolicy(max_attempts=60,
                                                                  backoff_s=0.05)) as client:
                return await asyncio.gather(*(caller(client, r, i) for i, r in enumerate(rows)))

        results = asyncio.run(go())
        metrics = httpx.get(srv.url + "/metrics").text
    assert [r.groups[0].id for r in results] == [f"g{i}" for i in range(16)]
    assert all(len(r.groups[0].rewards) == 8 for r in results)
    rejected = [line for line in metrics.splitlines()
                if line.startswith('hero_rejected_requests_total{reason="overloaded"}')]
    assert rejected and float(rejected[0].split()[-1]) > 0, "the server never pushed back"


def _rewards_body(request: httpx.Request) -> dict:
    groups = json.loads(request.content)["groups"]
    return {"mode": "hero", "reward_model": "m", "verifier": "math", "sigma_ref": 0.1,
            "groups": [{"id": g.get("id") or "0", "weight": 1.0, "rewards": [0.0],
                        "verified": [False], "verifier_status": ["incorrect"],
                        "normalized": [0.0], "truncated": [False]} for g in groups]}


def test_retry_after_is_honoured_via_the_transport_seam():
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) < 3:
            return httpx.Response(429, headers={"Retry-After": "0.3"},
                                  json={"error": {"code": "overloaded", "message": "busy"}})
        return httpx.Response(200, json=_rewards_body(request))

    with HeroClient("http://hero.test", transport=httpx.MockTransport(handler)) as client:
        result = client.score([{"reference": "1", "responses": ["a"]}])
    assert len(calls) == 3 and result.groups[0].rewards == [0.0]
    assert calls[1] - calls[0] >= 0.29 and calls[2] - calls[1] >= 0.29


def test_gives_up_after_max_attempts_with_the_last_error():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"code": "not_ready", "message": "starting"}})

    client = HeroClient("http://hero.test", transport=httpx.MockTransport(handler),
                        retry=RetryPolicy(max_attempts=3, backoff_s=0.01))
    with pytest.raises(HeroAPIError) as err:
        client.score([{"reference": "1", "responses": ["a"]}])
    assert err.value.status == 503 and err.value.code == "not_ready"


def test_connection_errors_are_retried_then_reported():
    client = HeroClient(f"http://127.0.0.1:{free_port()}",
                        retry=RetryPolicy(max_attempts=2, backoff_s=0.01))
    with pytest.raises(HeroConnectionError):
        client.score([{"reference": "1", "responses": ["a"]}])


def test_chunking_never_splits_a_group():
    groups = [Group(responses=["x"] * n) for n in (3, 3, 10, 1, 1, 1)]
    chunks = chunk_groups(groups, max_groups=2, max_rollouts=6)
    assert [[len(g.responses) for g in c] for c in chunks] == [[3, 3], [10], [1, 1], [1]]


def test_bad_groups_are_refused_before_sending_naming_the_field():
    sent: list[httpx.Request] = []
    client = HeroClient("http://hero.test", transport=httpx.MockTransport(
        lambda request: sent.append(request) or httpx.Response(500)))
    groups = [{"reference": "1", "responses": ["a"]},
              {"prompt": [{"role": "tool", "content": "x"}], "responses": ["b", 2]}]
    with pytest.raises(HeroValidationError) as err:
        client.score(groups)
    error = err.value
    assert isinstance(error, HeroAPIError) and isinstance(error, ValueError)
    assert (error.status, error.code, error.field) == (422, "invalid_request",
                                                       "groups[1].prompt[0].role")
    assert [e["field"] for e in error.errors] == ["groups[1].prompt[0].role",
                                                  "groups[1].responses[1]"]
    assert "role 'tool' is not supported" in str(error) and "not sent" in str(error)
    with pytest.raises(HeroValidationError) as err:
        client.score([{"reference": "1", "responses": ["a"]}], params={"advantage": "gae"})
    assert err.value.field == "params.advantage"
    with pytest.raises(HeroValidationError) as err:
        client.score([{"reference": "1", "responses": ["a"]}], mode="ppo")
    assert err.value.field == "mode"
    with pytest.raises(HeroValidationError) as err:
        client.score({"reference": "1", "responses": ["a"]})  # one group, not in a list
    assert err.value.field == "groups"
    with pytest.raises(HeroValidationError) as err:
        client.score([])
    assert err.value.field == "groups"
    assert sent == []  # nothing was sent for any of them


def test_the_servers_problem_list_reaches_the_caller(server):
    with HeroClient(server.url, api_key="test-key") as client:
        with pytest.raises(HeroAPIError) as err:
            client.score([{"reference": "1", "responses": ["a"]}, {"responses": ["b"]}])
    assert err.value.status == 422 and not isinstance(err.value, HeroValidationError)
    assert err.value.errors == [{"field": "groups[1].reference", "message": err.value.message}]
    assert "reference" in err.value.message
