"""The HTTP API against a real service process on loopback (real uvicorn, real MiniLM, real
math-verify pool)."""

from __future__ import annotations

import httpx
import pytest


def post(server, path, body, auth, **kwargs):
    return httpx.post(server.url + path, json=body, headers=auth, timeout=120, **kwargs)


def dev_request(rows, mode):
    return {"mode": mode, "verifier": "math", "groups": [
        {"id": r["id"], "prompt": r["prompt"], "reference": r["reference"],
         "responses": r["responses"], "rm_scores": r["rm72b_scores"]} for r in rows]}


def test_health_endpoints_are_open(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    info = httpx.get(server.url + "/v1/info").json()
    assert info["reward_model"] == "embedded:all-MiniLM-L6-v2" and info["verifier"] == "math"
    assert info["limits"]["max_groups"] > 0
    assert "hero_queue_depth" in httpx.get(server.url + "/metrics").text


@pytest.mark.parametrize("path", ["/v1/rewards", "/get_reward"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "nope"}])
def test_scoring_endpoints_need_the_key(server, path, headers):
    r = httpx.post(server.url + path, json={"groups": []}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


def test_dev_data_in_hero_mode_keeps_every_invariant(server, auth, dev_rows):
    r = post(server, "/v1/rewards", dev_request(dev_rows, "hero"), auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "hero" and len(body["groups"]) == 50
    sigmas = [g["sigma"] for g in body["groups"]]
    assert body["sigma_ref"] == pytest.approx(sum(sigmas) / len(sigmas))  # default: request mean
    agree = 0
    for row, g in zip(dev_rows, body["groups"]):
        assert g["id"] == row["id"] and g["rm_scores"] == row["rm72b_scores"]
        assert 0.4 <= g["weight"] <= 3.0
        for x, v in zip(g["normalized"], g["verified"]):
            assert (0.9 - 1e-9 <= x <= 1.1 + 1e-9) if v else (-0.1 - 1e-9 <= x <= 0.1 + 1e-9)
        correct = [x for x, v in zip(g["rewards"], g["verified"]) if v]
        wrong = [x for x, v in zip(g["rewards"], g["verified"]) if not v]
        if correct and wrong:
            assert min(correct) > max(wrong)
        assert g["rewards"] == pytest.approx([g["weight"] * x for x in g["normalized"]])
        assert any(abs(a) > 1e-6 for a in g["advantages"]), g["id"]  # every group learns
        agree += sum(v == gc for v, gc in zip(g["verified"], row["grader_correct"]))
    assert agree >= 399


def test_dev_data_in_verifier_mode_only_mixed_groups_have_advantages(server, auth, dev_rows):
    body = post(server, "/v1/rewards", dev_request(dev_rows, "verifier"), auth).json()
    for g in body["groups"]:
        mixed = 0 < sum(g["verified"]) < len(g["verified"])
        assert g["weight"] == 1.0 and g["rewards"] == [float(v) for v in g["verified"]]
        assert any(abs(a) > 1e-6 for a in g["advantages"]) == mixed, g["id"]
    assert sum(0 < sum(g["verified"]) < 8 for g in body["groups"]) == 4


def test_rm_mode_standardises_within_the_group(server, auth, dev_rows):
    body = post(server, "/v1/rewards", dev_request(dev_rows[:3], "rm"), auth).json()
    for g in body["groups"]:
        mean = sum(g["rewards"]) / len(g["rewards"])
        assert mean == pytest.approx(0.0, abs=1e-6) and g["weight"] == 1.0


def test_embedded_rm_end_to_end_and_chat_prompts(server, auth, dev_rows):
    row = dev_rows[3]
    prompt = [{"role": "system", "content": row["system"]},
              {"role": "user", "content": row["prompt"]}]
    body = post(server, "/v1/rewards", {"request_id": "abc", "params": {"advantage": "rloo"},
                                        "groups": [{"prompt": prompt, "reference": row["reference"],
                                                    "responses": row["responses"]}]}, auth).json()
    g = body["groups"][0]
    assert body["request_id"] == "abc" and g["id"] == "0"
    assert len(g["rm_scores"]) == 8 and all(-1.0 <= s <= 1.0 for s in g["rm_scores"])
    assert len(g["truncated"]) == 8 and any(g["truncated"])  # long CoT beyond the 128-token tail
    assert g["verifier_status"] == ["incorrect"] * 8  # the all-wrong group
    assert sum(g["advantages"]) == pytest.approx(0.0, abs=1e-6)  # RLOO advantages sum to 0
    timings = body["timings_ms"]
    assert timings["total"] >= max(timings["verifier"], timings["reward_model"])


def test_verifier_and_rm_run_concurrently(server, auth, dev_rows):
    rows = dev_rows[10:16]
    request = {"groups": [{"prompt": r["prompt"], "reference": r["reference"],
                           "responses": [x + f" (variant {i})" for x in r["responses"]]}
                          for i, r in enumerate(rows)]}
    t = post(server, "/v1/rewards", request, auth).json()["timings_ms"]
    # Sequential work would take verifier + reward_model; overlapped work takes about the max.
    assert t["total"] < t["verifier"] + t["reward_model"], t


@pytest.mark.parametrize("body, field, words", [
    ({"groups": [{"prompt": "p", "responses": ["a"]}]}, "groups[0].reference", "reference"),
    ({"groups": [{"prompt": "p", "reference": "1", "responses": []}]}, "groups[0].responses",
     "at least 1"),
    ({"groups": [{"prompt": "p", "reference": "1", "responses": "abc"}]}, "groups[0].responses",
     "list"),
    ({"groups": [{"prompt": "p", "reference": "1", "responses": [1, 2]}]},
     "groups[0].responses[0]", "string"),
    ({"mode": "ppo", "groups": [{"reference": "1", "responses": ["a"]}]}, "mode", "hero"),
    ({"verifier": "llm", "groups": [{"reference": "1", "responses": ["a"]}]}, "verifier", "math"),
    ({"groups": [{"reference": "1", "responses": ["a", "b"], "rm_scores": [1.0]}]}, "groups[0]",
     "rm_scores"),
    ({"params": {"alpha": 0.6, "beta": 0.5}, "groups": [{"reference": "1", "responses": ["a"]}]},
     "params", "alpha + beta"),
    ({"params": {"advantage": "gae"}, "groups": [{"reference": "1", "responses": ["a"]}]},
     "params.advantage", "grpo"),
    ({"groups": []}, "groups", "at least 1"),
    ({"groups": [{"reference": "1", "responses": ["a"], "respones": ["typo"]}]},
     "groups[0].respones", "not permitted"),
    ({}, "groups", "required"),
])
def test_bad_input_gets_a_clear_4xx_naming_the_field(server, auth, body, field, words):
    r = post(server, "/v1/rewards", body, auth)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field
    assert words.lower() in error["message"].lower()
    assert error["code"] == "invalid_request"


def test_malformed_json_and_wrong_content(server, auth):
    r = httpx.post(server.url + "/v1/rewards", content=b'{"groups": [\n  {not json}]}', headers=
                   {**auth, "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    error = r.json()["error"]
    assert error["field"] == "body"
    assert error["message"].startswith("body is not valid JSON: Expecting property name")
    assert "line 2 column 4 (char 16)" in error["message"], error["message"]
    r = httpx.post(server.url + "/v1/rewards", content=b"groups=1",
                   headers={**auth, "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422
    assert "body must be a JSON object" in r.json()["error"]["message"]
    assert "application/json" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_a_422_lists_every_problem_with_its_field(server, auth):
    body = {"mode": "ppo", "params": {"advantage": "gae"}, "groups": [
        {"reference": "1", "responses": []},
        {"reference": "1", "responses": ["ok", 7]},
        {"reference": "1", "responses": ["a"], "respones": ["typo"]},
    ]}
    r = post(server, "/v1/rewards", body, auth)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    fields = [e["field"] for e in error["errors"]]
    assert fields == ["mode", "params.advantage", "groups[0].responses", "groups[1].responses[1]",
                      "groups[2].respones"]
    assert all(e["message"] for e in error["errors"])
    # The contract's own fields stay: the first problem's field, a message that sums them up.
    assert error["code"] == "invalid_request" and error["field"] == "mode"
    assert error["message"].startswith("5 problems: mode: ")
    assert all(f"{e['field']}: {e['message']}" in error["message"] for e in error["errors"])
    body["groups"].append({"reference": "1", "responses": ["a"], "rm_scores": ["x"]})
    error = post(server, "/v1/rewards", body, auth).json()["error"]
    assert error["message"].startswith("6 problems: ") and error["message"].endswith("; and 1 more")
    assert "rm_scores" not in error["message"]  # the summary spells out five at most...
    assert len(error["errors"]) == 6  # ...the list has them all


def chat_group(prompt):
    return {"groups": [{"prompt": prompt, "reference": "4", "responses": ["\\boxed{4}", "5"]}]}


@pytest.mark.parametrize("message, field, words", [
    ({"role": "tool", "content": "42"}, "groups[0].prompt[1].role", "role 'tool' is not supported"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
     "groups[0].prompt[1].content", "content part [0] is type 'image_url'"),
    ({"role": "user", "content": None}, "groups[0].prompt[1].content",
     "content must be a string or a list of text parts, got null"),
])
def test_chat_prompt_errors_name_the_real_cause(server, auth, message, field, words):
    prompt = [{"role": "system", "content": "Be brief."}, message]
    r = post(server, "/v1/rewards", chat_group(prompt), auth)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and words in error["message"]
    # Not pydantic's union noise ("... should be a valid string" for the other branch).
    assert [e["field"] for e in error["errors"]] == [field]
    assert "valid string" not in error["message"]


def test_a_prompt_that_is_neither_text_nor_messages(server, auth):
    r = post(server, "/v1/rewards", chat_group({"role": "user", "content": "2+2?"}), auth)
    assert r.status_code == 422
    assert r.json()["error"]["errors"] == [{
        "field": "groups[0].prompt",
        "message": 'prompt must be a string or a list of chat messages [{"role": ..., '
                   '"content": ...}]'}]


def test_openai_text_parts_score_like_the_joined_string(server, auth):
    parts = [{"type": "text", "text": "What is 2+2?"}, {"type": "text", "text": "Answer briefly."}]
    as_parts = post(server, "/v1/rewards", chat_group([{"role": "user", "content": parts}]), auth)
    joined = post(server, "/v1/rewards", chat_group(
        [{"role": "user", "content": "What is 2+2?\nAnswer briefly."}]), auth)
    assert as_parts.status_code == 200, as_parts.text
    assert as_parts.json()["groups"][0]["rm_scores"] == joined.json()["groups"][0]["rm_scores"]
    assert as_parts.json()["groups"][0]["verified"] == [True, False]


def test_openapi_declares_the_bearer_scheme_on_the_scoring_operations(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {"type": "http", "scheme": "bearer",
                                     "description": schemes["bearerAuth"]["description"]}
    assert schemes["apiKeyHeader"]["type"] == "apiKey" and schemes["apiKeyHeader"]["in"] == "header"
    for path in ("/v1/rewards", "/get_reward"):
        security = spec["paths"][path]["post"]["security"]
        assert {"bearerAuth": []} in security and {"apiKeyHeader": []} in security, path
        assert "401" in spec["paths"][path]["post"]["responses"]
    for path in ("/healthz", "/readyz", "/metrics", "/v1/info"):
        assert "security" not in spec["paths"][path]["get"], path
    error = spec["components"]["schemas"]["ErrorDetail"]["properties"]
    assert "errors" in error  # the 422 list is part of the documented error shape


def test_service_keeps_serving_after_bad_input(server, auth):
    for _ in range(3):
        post(server, "/v1/rewards", {"groups": [{"responses": ["x"]}]}, auth)
    r = post(server, "/v1/rewards", {"groups": [{"reference": "4", "responses": ["\\boxed{4}"],
                                                  "rm_scores": [0.3]}]}, auth)
    assert r.status_code == 200 and r.json()["groups"][0]["verified"] == [True]


def test_get_reward_groups_queries_by_prompt(server, auth):
    prompts = ["Q: 2+2? A:"] * 3 + ["Q: 3+3? A:"] * 2
    answers = [" \\boxed{4}", " \\boxed{5}", " it is \\boxed{4}", " \\boxed{6}", " \\boxed{7}"]
    body = {"query": [p + a for p, a in zip(prompts, answers)], "prompts": prompts,
            "labels": ["4", "4", "4", "6", "6"]}
    r = post(server, "/get_reward", body, auth)
    assert r.status_code == 200, r.text
    out = r.json()
    # scores are the verdicts (OpenRLHF's dynamic filtering reads them); rewards are HERO's
    assert out["scores"] == out["extra_logs"]["verified"] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert len(out["rewards"]) == 5 and out["rewards"] != out["scores"]
    rewards = out["rewards"]
    assert min(rewards[0], rewards[2]) > rewards[1] and rewards[3] > rewards[4]
    assert all(len(v) == 5 for v in out["extra_logs"].values())
    r = post(server, "/get_reward", {"query": ["x"]}, auth)
    assert r.status_code == 422 and r.json()["error"]["field"] == "labels"
    r = post(server, "/get_reward", {"query": ["x", "y"], "labels": ["1"]}, auth)
    assert r.status_code == 422 and "labels" in r.json()["error"]["message"]
