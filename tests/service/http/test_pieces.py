"""/v1/rewards pieces (``group_key`` + ``group_size``): two callers each sending half of one
group get their own halves of the whole group's HERO result; bad piece fields are 422s naming
the field."""

from __future__ import annotations

import asyncio

import httpx
import pytest


def test_two_pieces_are_scored_as_one_group(server, auth, dev_rows):
    row = next(r for r in dev_rows if 0 < sum(r["grader_correct"]) < 8)
    responses = row["responses"][:8]
    params = {"sigma_ref": 0.05}

    def piece(part):
        return {"params": params, "groups": [{
            "id": "mine", "prompt": row["prompt"], "reference": row["reference"],
            "responses": part, "group_key": "step3/q17", "group_size": 8}]}

    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=120) as c:
            return await asyncio.gather(c.post("/v1/rewards", json=piece(responses[:5])),
                                        c.post("/v1/rewards", json=piece(responses[5:])))

    first, second = asyncio.run(go())
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    a, b = first.json()["groups"][0], second.json()["groups"][0]
    whole = httpx.post(server.url + "/v1/rewards", headers=auth, timeout=120, json={
        "params": params, "groups": [{"prompt": row["prompt"], "reference": row["reference"],
                                      "responses": responses,
                                      "rm_scores": a["rm_scores"] + b["rm_scores"]}]}
                       ).json()["groups"][0]
    assert a["id"] == "mine" and len(a["rewards"]) == 5 and len(b["rewards"]) == 3
    assert not a["partial"] and not b["partial"]
    assert a["weight"] == b["weight"] == pytest.approx(whole["weight"])
    assert a["sigma"] == pytest.approx(whole["sigma"])
    assert a["rewards"] + b["rewards"] == pytest.approx(whole["rewards"], abs=1e-9)
    assert a["advantages"] + b["advantages"] == pytest.approx(whole["advantages"], abs=1e-9)
    assert a["verified"] + b["verified"] == whole["verified"]


@pytest.mark.parametrize("extra,field,words", [
    ({"group_key": "k"}, "groups[0]", "group_key and group_size"),
    ({"group_size": 4}, "groups[0]", "group_key and group_size"),
    ({"group_key": "k", "group_size": 1}, "groups[0]", "smaller than"),
    ({"group_key": "k", "group_size": 100000}, "groups[0].group_size", "limit"),
])
def test_bad_piece_fields_are_named(server, auth, extra, field, words):
    r = httpx.post(server.url + "/v1/rewards", headers=auth, timeout=30, json={
        "groups": [{"prompt": "p", "reference": "1", "responses": ["a", "b"], **extra}]})
    assert r.status_code == 422, r.text
    assert words in r.text and field in r.text, r.text
