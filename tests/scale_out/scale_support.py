"""Helpers of the scale-out tests: OpenRLHF's own executor sending one query per call over a
list of replica URLs, and the check that a group came back whole, once, and equal to HERO of
the whole group."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from openrlhf.utils import agent  # installed --no-deps by make test


def openrlhf_executor(urls: list[str]) -> agent.SingleTurnAgentExecutor:
    """OpenRLHF's executor with the replicas as its list of reward URLs (it rotates over them)."""
    return agent.SingleTurnAgentExecutor(remote_rm_url=[u + "/get_reward" for u in urls])


async def send_one_query_per_call(executor: agent.SingleTurnAgentExecutor,
                                  calls: list[tuple[str, str, str]]) -> list[dict]:
    # exactly what OpenRLHF does per finished sample: one query, its prompt and its label
    results = await asyncio.gather(*(
        executor._fetch_rewards_via_http([query], [prompt], [label])
        for prompt, query, label in calls))
    return [result[0] for result in results]


def one_query_per_call(urls: list[str], calls: list[tuple[str, str, str]]) -> list[dict]:
    return asyncio.run(send_one_query_per_call(openrlhf_executor(urls), calls))


def whole_group(url: str, prompt: str, label: str, responses: list[str], sigma_ref: float,
                rm_scores=None) -> dict:
    r = httpx.post(url + "/v1/rewards", timeout=120, json={
        "params": {"sigma_ref": sigma_ref},
        "groups": [{"prompt": prompt, "reference": label, "responses": responses,
                    "rm_scores": rm_scores}]})
    assert r.status_code == 200, r.text
    return r.json()["groups"][0]


def check_group(url: str, prompt: str, label: str, responses: list[str],
                answers: list[dict]) -> None:
    logs = [a["extra_logs"] for a in answers]
    assert all(log["partial"] == [0.0] for log in logs)  # whole, never partial
    weights = {log["hero_weight"][0] for log in logs}
    sigma_refs = {log["sigma_ref"][0] for log in logs}
    assert len(weights) == 1 and len(sigma_refs) == 1  # scored once: one weight, one sigma-bar
    sigma_ref = sigma_refs.pop()
    # HERO of the whole group, from the RM scores the replicas computed, to the last bit...
    rm_scores = [log["rm_score"][0] for log in logs]
    direct = whole_group(url, prompt, label, responses, sigma_ref, rm_scores)
    assert [a["rewards"][0] for a in answers] == pytest.approx(direct["rewards"], abs=1e-9)
    assert [a["scores"][0] for a in answers] == [float(v) for v in direct["verified"]]
    assert weights.pop() == pytest.approx(direct["weight"])
    # ...and those are the RM's scores of these responses (another batch composition on another
    # process: float32 noise only).
    rescored = whole_group(url, prompt, label, responses, sigma_ref)
    assert rm_scores == pytest.approx(rescored["rm_scores"], abs=1e-5)
