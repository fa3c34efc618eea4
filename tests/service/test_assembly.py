"""Group assembly across requests through the group store: per-query /get_reward traffic against
a real service scored as true HERO groups (the store's own protocol: tests/service/group_store/)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from support import running_server


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
