"""The same request gives the same rewards however it was batched with other traffic."""

from __future__ import annotations

import asyncio

import httpx


def test_rewards_do_not_depend_on_batching(server, auth, dev_rows, figures):
    def request(rows, tag=""):
        return {"groups": [{"id": r["id"], "prompt": r["prompt"], "reference": r["reference"],
                            "responses": [x + tag for x in r["responses"]]} for r in rows]}

    target = request(dev_rows[20:23])
    alone = httpx.post(server.url + "/v1/rewards", json=target, headers=auth, timeout=120).json()

    async def mixed():
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=120) as client:
            noise = [client.post("/v1/rewards", json=request(dev_rows[k:k + 2], f" [{k}]"))
                     for k in range(0, 12, 2)]
            results = await asyncio.gather(client.post("/v1/rewards", json=target), *noise)
            return results[0].json()

    together = asyncio.run(mixed())
    worst = 0.0
    for a, b in zip(alone["groups"], together["groups"]):
        for key in ("rm_scores", "rewards", "advantages"):
            worst = max(worst, max(abs(x - y) for x, y in zip(a[key], b[key])))
    assert worst <= 1e-5
    figures.record("determinism", "max abs difference of rewards, alone vs batched with traffic",
                   worst)
