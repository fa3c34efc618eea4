"""Issue 14's acceptance, through a live service: the dev data's 50 groups with a verifier miss
planted in each all-correct group (the best-scored response's ``\\boxed{...}`` rewritten so the
real math verifier rejects it; its 72B RM score stays, sent as ``rm_scores``). The planted
misses come back flagged ``likely_false_negative``, ``hero_disagreements_total`` counts every
flag once per group (whole, or assembled from pieces of two requests), the diagnostics metrics
are in a live ``/metrics``, and the audit log holds a line per flagged response."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from diagnostics_cost import BOXED, PLANTED_ANSWER, rewrite_boxed  # bench/
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess

from hero_client.schema import GroupResult
from hero_service.audit import TAIL_CHARS
from hero_service.http.openrlhf import LOG_KEYS, QueryResult, build_response

FN, FP = "likely_false_negative", "likely_false_positive"


@dataclass(frozen=True)
class Planted:
    groups: list[dict[str, Any]]  # wire groups, in dev-file order
    planted: dict[str, int]  # group id -> index of its planted miss


def plant_misses(rows: list[dict]) -> Planted:
    groups, planted = [], {}
    for row in rows:
        responses = list(row["responses"])
        scores = row["rm72b_scores"]
        if all(row["grader_correct"]):
            best = max(range(len(scores)), key=scores.__getitem__)
            assert BOXED in responses[best], row["id"]
            responses[best] = rewrite_boxed(responses[best], PLANTED_ANSWER)
            planted[row["id"]] = best
        groups.append({
            "id": row["id"], "reference": row["reference"], "responses": responses,
            "rm_scores": scores,
            "prompt": [{"role": "system", "content": row["system"]},
                       {"role": "user", "content": row["prompt"]}]})
    return Planted(groups, planted)


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit") / "flagged.jsonl"


@pytest.fixture(scope="module")
def live(audit_path) -> Iterator[ServerProcess]:
    with ServerProcess(["--verifier-workers", "1", "--audit-log", str(audit_path)]) as proc:
        yield proc


@pytest.fixture(scope="module")
def planted(dev_rows) -> Planted:
    return plant_misses(dev_rows)


def metric_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def audit_lines(path: Path, request_ids: set[str], expected: int,
                timeout_s: float = 15.0) -> list[dict]:
    """The audit log's lines of these requests, once ``expected`` are there (a thread writes
    them), or what is there at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        mine = [line for line in lines if line["request_id"] in request_ids]
        if len(mine) >= expected or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def flag_counts(groups: list[GroupResult]) -> dict[str, int]:
    flags = [f for g in groups for f in (g.disagreement or [])]
    return {FN: flags.count(FN), FP: flags.count(FP)}


def test_planted_misses_are_flagged_counted_and_audited(live, planted, audit_path):
    assert len(planted.planted) == 45
    before = metric_samples(live.url)
    answer = httpx.post(live.url + "/v1/rewards", timeout=300, json={
        "request_id": "planted-whole", "groups": planted.groups})
    assert answer.status_code == 200, answer.text
    groups = [GroupResult.model_validate(g) for g in answer.json()["groups"]]

    planted_total = planted_flagged = other_verified = other_flagged = 0
    for group in groups:
        assert group.disagreement is not None and len(group.disagreement) == 8
        miss = planted.planted.get(group.id)
        if miss is not None:
            # The real verifier rejects the rewritten answer: a verifier miss as planted.
            assert group.verifier_status[miss] == "incorrect", group.id
            planted_total += 1
            planted_flagged += group.disagreement[miss] == FN
        for i, status in enumerate(group.verifier_status):
            if status == "correct" and i != miss:
                other_verified += 1
                other_flagged += group.disagreement[i] is not None
    assert planted_total == 45
    assert planted_flagged >= 0.9 * planted_total, planted_flagged
    assert other_flagged <= 0.1 * other_verified, (other_flagged, other_verified)
    assert other_verified >= 320  # math-verify agrees with the grader on all but a few

    # The counter: every flag of the answer, once.
    after = metric_samples(live.url)
    counts = flag_counts(groups)
    assert counts[FN] >= 45
    for kind in (FN, FP):
        delta = (value(after, "hero_disagreements_total", kind=kind)
                 - value(before, "hero_disagreements_total", kind=kind))
        assert delta == counts[kind], kind
    # The other diagnostics, in the same live /metrics.
    delta = {name: value(after, name, **labels) - value(before, name, **labels)
             for name, labels in [("hero_group_weight_count", {}),
                                  ("hero_rewards_count", {"mode": "hero"})]}
    assert delta == {"hero_group_weight_count": 50, "hero_rewards_count": 400}
    flat = [g for g in groups if len(set(g.verified)) == 1]
    assert flat, "the dev data's all-wrong group"
    for verdicts in ("all_correct", "all_wrong"):
        for signal in ("true", "false"):
            expected = sum(1 for g in flat if (g.verified[0] == (verdicts == "all_correct"))
                           and ((max(g.rewards) - min(g.rewards) > 1e-9) == (signal == "true")))
            got = (value(after, "hero_verifier_no_signal_groups_total", verdicts=verdicts,
                         reward_signal=signal)
                   - value(before, "hero_verifier_no_signal_groups_total", verdicts=verdicts,
                           reward_signal=signal))
            assert got == expected, (verdicts, signal)
    for name in ("hero_audit_dropped_total", "hero_partial_groups_total"):
        assert (name, ()) in after, name

    # The audit log: one line per flagged response, the planted ones among them.
    lines = audit_lines(audit_path, {"planted-whole"}, sum(counts.values()))
    assert len(lines) == sum(counts.values())
    # Each line also names the HTTP request (its X-Request-Id, as in the access log).
    assert {line["http_request_id"] for line in lines} == {answer.headers["x-request-id"]}
    by_place = {(line["group_id"], line["index"]): line for line in lines}
    responses = {g["id"]: g["responses"] for g in planted.groups}
    for group_id, miss in planted.planted.items():
        group = next(g for g in groups if g.id == group_id)
        if group.disagreement[miss] != FN:
            continue
        line = by_place[(group_id, miss)]
        assert line["kind"] == FN and line["status"] == "incorrect"
        assert line["rm_score"] == group.rm_scores[miss]
        assert line["response_tail"] == responses[group_id][miss][-TAIL_CHARS:]
        assert PLANTED_ANSWER in line["response_tail"]
    assert value(metric_samples(live.url), "hero_audit_dropped_total") == 0


async def _send_pieces(url: str, groups: list[dict]
                       ) -> tuple[list[list[GroupResult]], list[str]]:
    """Each group as two pieces of four, in two requests sent together (each waits for the
    other's half); the answers' groups and X-Request-Ids."""
    def half(group: dict, part: slice) -> dict:
        return {"id": group["id"], "prompt": group["prompt"], "reference": group["reference"],
                "responses": group["responses"][part], "rm_scores": group["rm_scores"][part],
                "group_key": f"planted/{group['id']}", "group_size": 8}

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        answers = await asyncio.gather(*(
            client.post("/v1/rewards", json={"request_id": f"planted-piece-{k}", "groups": [
                half(g, part) for g in groups]})
            for k, part in enumerate((slice(0, 4), slice(4, 8)))))
    for answer in answers:
        assert answer.status_code == 200, answer.text
    return ([[GroupResult.model_validate(g) for g in a.json()["groups"]] for a in answers],
            [a.headers["x-request-id"] for a in answers])


def test_assembled_groups_are_flagged_as_whole_ones_and_counted_once(live, planted, audit_path):
    whole = httpx.post(live.url + "/v1/rewards", timeout=300, json={
        "request_id": "reference", "groups": planted.groups}).json()["groups"]
    whole_flags = {g["id"]: g["disagreement"] for g in whole}
    before = metric_samples(live.url)
    (first, second), http_ids = asyncio.run(_send_pieces(live.url, planted.groups))
    after = metric_samples(live.url)
    for a, b in zip(first, second):
        # Each caller gets its own half of the whole group's flags.
        assert (a.disagreement or []) + (b.disagreement or []) == whole_flags[a.id], a.id
    counts = flag_counts(first + second)
    assert counts[FN] >= 45
    for kind in (FN, FP):
        delta = (value(after, "hero_disagreements_total", kind=kind)
                 - value(before, "hero_disagreements_total", kind=kind))
        assert delta == counts[kind], kind  # once per group, not once per piece
    expected = sum(counts.values())
    pieces = audit_lines(audit_path, {"planted-piece-0", "planted-piece-1"}, expected)
    assert len(pieces) == expected
    for line in pieces:
        mine = first if line["request_id"] == "planted-piece-0" else second
        # Two requests handled at once: each line names its own HTTP request.
        assert line["http_request_id"] == http_ids[0 if mine is first else 1]
        group = next(g for g in mine if g.id == line["group_id"])
        assert group.disagreement is not None
        assert group.disagreement[line["index"]] == line["kind"]


def test_get_reward_logs_the_flags_as_numbers_one_per_query():
    """OpenRLHF makes a tensor of every extra_logs key: 1.0 / 0.0 per query and kind."""
    group = GroupResult(
        id="0", sigma=1.0, weight=1.0, rewards=[1.0, 0.0, 0.1], verified=[True, False, True],
        verifier_status=["correct", "incorrect", "correct"], rm_scores=[2.0, 3.0, -1.0],
        normalized=[1.0, 0.0, 0.1], truncated=[False] * 3,
        disagreement=[None, FN, FP])
    unflagged = group.model_copy(update={"disagreement": None})
    results = [QueryResult(group, i, 1.0, False) for i in range(3)]
    results.append(QueryResult(unflagged, 0, 1.0, False))
    logs = build_response(results, [None] * 4).extra_logs
    assert set(logs) == set(LOG_KEYS)
    assert logs[FN] == [0.0, 1.0, 0.0, 0.0]
    assert logs[FP] == [0.0, 0.0, 1.0, 0.0]


def test_get_reward_answers_carry_the_flags_of_the_rule(live):
    """One verified and one rejected answer, scored by the live service's RM: the rejected one
    is a likely false negative exactly when the RM scores it at least as high; a false positive
    needs two rejected answers."""
    answer = httpx.post(live.url + "/get_reward", timeout=120, json={
        "query": ["What is 2+2? \\boxed{4}", "What is 2+2? \\boxed{5}"],
        "prompts": ["What is 2+2? ", "What is 2+2? "], "labels": ["4", "4"]})
    assert answer.status_code == 200, answer.text
    logs = answer.json()["extra_logs"]
    assert logs["verified"] == [1.0, 0.0]
    right, wrong = logs["rm_score"]
    assert logs[FN] == [0.0, float(wrong >= right)]
    assert logs[FP] == [0.0, 0.0]
