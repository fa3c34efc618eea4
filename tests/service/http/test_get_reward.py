"""``/get_reward`` as OpenRLHF 0.11 really calls it (``openrlhf/utils/agent.py``), against live
services on loopback: prompts rendered with the policy's real chat template, queries decoded with
``skip_special_tokens=False`` (so they end with EOS text), labels as the dataset holds them
(numbers, or ``""`` without ``--data.label_key``), ``scores`` read as verdicts."""

from __future__ import annotations

import asyncio
import math
import random
import re

import httpx
import pytest
from chat_template_support import dev_messages, policy_tokenizer, render_prompt
from openrlhf.utils import agent  # installed --no-deps by make test
from support import build_tiny_decoder_rm, running_server

GROUP = 8


def post(server, path, body, headers=None, timeout=300.0):
    return httpx.post(server.url + path, json=body, headers=headers or {}, timeout=timeout)


def metric(url: str, sample: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def as_label(reference: str):
    """The label as a dataset column holds it: a JSON number where the answer is a number."""
    if re.fullmatch(r"-?\d+", reference):
        return int(reference)
    if re.fullmatch(r"-?\d+\.\d+", reference):
        return float(reference)
    return reference


@pytest.fixture(scope="module")
def assembling():
    with running_server("--verifier-workers", "2", "--group-size", str(GROUP),
                        "--group-timeout-s", "120") as proc:
        yield proc


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory):
    rm_dir = build_tiny_decoder_rm(tmp_path_factory.mktemp("tiny-rm"))
    with running_server("--reward-model", f"hf:{rm_dir}", "--verifier-workers", "1",
                        "--extra-special-tokens", "<|custom_eos|>, <|other_pad|>") as proc:
        yield proc


@pytest.fixture(scope="module")
def unstripped():
    with running_server("--verifier", "exact", "--verifier-workers", "1",
                        env={"HERO_STRIP_SPECIAL_TOKENS": "false"}) as proc:
        yield proc


# -- acceptance: a real templated OpenRLHF payload built from the dev data ---------------------


def templated_payload(rows, template: str, endings: list[str]):
    tokenizer = policy_tokenizer(template)
    queries, prompts, labels, truth = [], [], [], []
    for row in rows:
        prompt = render_prompt(tokenizer, dev_messages(row))
        for j, response in enumerate(row["responses"]):
            queries.append(prompt + response + endings[j % len(endings)])
            prompts.append(prompt)
            labels.append(as_label(row["reference"]))
            truth.append(bool(row["grader_correct"][j]))
    return queries, prompts, labels, truth


def check_answers(rewards, scores, logs, truth):
    n = len(truth)
    assert len(rewards) == len(scores) == n
    assert set(scores) <= {0.0, 1.0}
    assert scores == logs["verified"]
    agree = sum((s == 1.0) == t for s, t in zip(scores, truth))
    assert agree >= n - 1, f"{agree}/{n} verdicts agree with the grader"
    for key, values in logs.items():  # numbers only, one per query
        assert len(values) == n, key
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in values), key
    assert logs["partial"] == [0.0] * n and logs["prompt_mismatch"] == [0.0] * n
    for g in range(0, n, GROUP):  # every correct above every incorrect response of its group
        right = [r for r, s in zip(rewards[g:g + GROUP], scores[g:g + GROUP]) if s == 1.0]
        wrong = [r for r, s in zip(rewards[g:g + GROUP], scores[g:g + GROUP]) if s == 0.0]
        if right and wrong:
            assert min(right) > max(wrong)
    return agree


def test_acceptance_one_query_per_request_as_openrlhf_sends_it(assembling, dev_rows):
    """Qwen2.5's ChatML template, queries ending in <|im_end|> (and pad), numeric labels, each
    query posted alone by OpenRLHF's own client code, the samples of all prompts interleaved."""
    queries, prompts, labels, truth = templated_payload(
        dev_rows, "qwen2_5", ["<|im_end|>", "<|im_end|>\n<|endoftext|><|endoftext|>"])
    assert sum(isinstance(x, (int, float)) for x in labels) >= 10 * GROUP
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=assembling.url + "/get_reward")
    order = list(range(len(queries)))
    random.Random(7).shuffle(order)

    async def run():
        # All in flight at once, as OpenRLHF's samples are: a query waits for its group's others.
        async def one(i):
            (answer,) = await executor._fetch_rewards_via_http(
                [queries[i]], [prompts[i]], [labels[i]])
            return i, answer

        return dict(await asyncio.gather(*(one(i) for i in order)))

    answers = asyncio.run(run())
    assert all(len(a["rewards"]) == len(a["scores"]) == 1 for a in answers.values())
    rewards = [answers[i]["rewards"][0] for i in range(len(queries))]
    scores = [answers[i]["scores"][0] for i in range(len(queries))]
    logs = {k: [answers[i]["extra_logs"][k][0] for i in range(len(queries))]
            for k in answers[0]["extra_logs"]}
    agree = check_answers(rewards, scores, logs, truth)
    print(f"one query per request: {agree}/{len(truth)} verdicts agree with the grader")


def test_acceptance_one_multi_query_request(assembling, dev_rows):
    """Llama-3.1's template, queries ending in <|eot_id|> / <|end_of_text|>, all 400 in one
    request (the assembler completes every group inside it)."""
    queries, prompts, labels, truth = templated_payload(
        dev_rows, "llama3_1", ["<|eot_id|>", "<|eot_id|><|end_of_text|>"])
    r = post(assembling, "/get_reward", {"query": queries, "prompts": prompts, "labels": labels})
    assert r.status_code == 200, r.text
    out = r.json()
    agree = check_answers(out["rewards"], out["scores"], out["extra_logs"], truth)
    print(f"one multi-query request: {agree}/{len(truth)} verdicts agree with the grader")


# -- 1. prompts rendered by the policy: the RM templates them once ----------------------------


@pytest.mark.parametrize("template,eos", [("qwen2_5", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_hf_rm_sees_a_templated_query_as_the_conversation_itself(hf_server, dev_rows, template,
                                                                 eos):
    """The tiny random decoder RM gives different scores to different inputs: the rendered
    prompt + response + EOS scored by /get_reward gets exactly the RM score of the plain
    conversation sent as chat messages to /v1/rewards."""
    row = dev_rows[6]
    responses = row["responses"][:4]
    prompt = render_prompt(policy_tokenizer(template), dev_messages(row))
    r = post(hf_server, "/get_reward", {"query": [prompt + x + eos for x in responses],
                                        "prompts": [prompt] * 4, "labels": [row["reference"]] * 4})
    assert r.status_code == 200, r.text
    via_openrlhf = r.json()["extra_logs"]["rm_score"]
    direct = post(hf_server, "/v1/rewards", {"groups": [
        {"prompt": dev_messages(row), "reference": row["reference"], "responses": responses}]})
    assert direct.status_code == 200, direct.text
    assert via_openrlhf == pytest.approx(direct.json()["groups"][0]["rm_scores"], abs=1e-5)
    # and not what the rendered prompt wrapped in a user turn (templated twice) would score
    doubled = post(hf_server, "/v1/rewards", {"groups": [
        {"prompt": [{"role": "user", "content": prompt}], "reference": row["reference"],
         "responses": [x + eos for x in responses]}]}).json()["groups"][0]["rm_scores"]
    assert all(abs(a - b) > 1e-6 for a, b in zip(via_openrlhf, doubled))


# -- 2. EOS text in the response ---------------------------------------------------------------


ENDINGS = ["<|im_end|>", "<|endoftext|><|endoftext|><|endoftext|>", "</s>", "<|eot_id|>",
           "<|end_of_text|>", "<end_of_turn>\n", "<|im_end|>\n<|endoftext|>"]


@pytest.mark.parametrize("verifier", ["exact", "numeric", "math"])
def test_every_verifier_judges_the_answer_without_the_eos_text(server, auth, verifier):
    responses = [f"Adding them up:\n42{ending}" for ending in ENDINGS]
    r = post(server, "/v1/rewards", {"verifier": verifier, "groups": [
        {"reference": "42", "responses": responses + ["Adding them up:\n41<|im_end|>"]}]}, auth)
    assert r.status_code == 200, r.text
    group = r.json()["groups"][0]
    assert group["verified"] == [True] * len(ENDINGS) + [False]


def test_get_reward_strips_eos_text_before_verifying(server, auth):
    prompt = "Q: what is 6*7? A:"
    r = post(server, "/get_reward", {"query": [prompt + f" 42{e}" for e in ENDINGS],
                                     "prompts": [prompt] * len(ENDINGS),
                                     "labels": ["42"] * len(ENDINGS)}, auth)
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == [1.0] * len(ENDINGS)


def test_stripping_can_be_turned_off(unstripped):
    r = post(unstripped, "/v1/rewards", {"groups": [
        {"reference": "42", "responses": ["42<|im_end|>", "42"], "rm_scores": [0.0, 0.0]}]})
    assert r.status_code == 200, r.text
    assert r.json()["groups"][0]["verified"] == [False, True]


def test_extra_special_tokens_from_the_flag(hf_server):
    r = post(hf_server, "/v1/rewards", {"verifier": "exact", "groups": [
        {"reference": "42", "responses": ["42<|custom_eos|>", "42<|other_pad|><|other_pad|>",
                                          "42<|unknown_eos|>"]}]})
    assert r.status_code == 200, r.text
    assert r.json()["groups"][0]["verified"] == [True, True, False]


# -- 3. labels, empty requests, queries that do not start with their prompt --------------------


def test_numeric_labels_are_reference_answers(server, auth):
    prompt = "Q: "
    answers = ["\\boxed{42}", "\\boxed{\\frac{1}{2}}", "\\boxed{42}", "\\boxed{-3}", "\\boxed{7}"]
    r = post(server, "/get_reward", {"query": [prompt + a for a in answers],
                                     "prompts": [prompt] * 5, "labels": [42, 0.5, 42.0, -3, 8]},
             auth)
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == [1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("labels,field,words", [
    (["4", ""], "labels[1]", "empty"),
    (["4", "   "], "labels[1]", "empty"),
    ([None, "4"], "labels[0]", "null"),
    (["4", True], "labels[1]", "boolean"),
    ([{"answer": 4}, "4"], "labels[0]", "string or a number"),
])
def test_unusable_labels_are_refused_naming_the_label(server, auth, labels, field, words):
    r = post(server, "/get_reward", {"query": ["\\boxed{4}", "\\boxed{4}"], "labels": labels},
             auth)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and words in error["message"]


def test_blank_label_message_says_what_to_fix(server, auth):
    r = post(server, "/get_reward", {"query": ["\\boxed{4}"], "prompts": [""], "labels": [""]},
             auth)
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert "'math' verifier needs a reference" in message and "--data.label_key" in message


@pytest.mark.parametrize("body", [{"query": [], "prompts": [], "labels": []}, {"query": []}])
def test_an_empty_request_gets_empty_lists(server, auth, body):
    r = post(server, "/get_reward", body, auth)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["rewards"] == [] and out["scores"] == []
    assert out["extra_logs"] and all(v == [] for v in out["extra_logs"].values())


def test_query_not_starting_with_its_prompt_is_counted_and_flagged(server, auth, dev_rows):
    row = dev_rows[0]
    prompt = render_prompt(policy_tokenizer("qwen2_5"), dev_messages(row))
    right, wrong = row["responses"][0], "So the answer is \\boxed{7}."
    truncated = prompt[len(prompt) // 2:]  # OpenRLHF cut an over-long prompt from the left
    # a lossy decode (clean_up_tokenization_spaces) dropped the spaces before ',' and '.'
    plain = ("Natalia gave 6 clips to each of 7 friends , none to others . "
             "How many clips did she give away?")
    queries = [prompt + right, truncated + right + "<|im_end|>", truncated + wrong,
               plain.replace(" ,", ",").replace(" .", ".") + " \\boxed{42}",
               "something else \\boxed{42}"]
    prompts = [prompt, prompt, prompt, plain, "Q: what is 6*7?"]
    labels = [row["reference"]] * 3 + ["42", "42"]
    samples = {f: f'hero_get_reward_prompt_mismatch_total{{fallback="{f}"}}'
               for f in ("prompt_tail", "whole_query")}
    before = {f: metric(server.url, s) for f, s in samples.items()}
    r = post(server, "/get_reward", {"query": queries, "prompts": prompts, "labels": labels}, auth)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["extra_logs"]["prompt_mismatch"] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert out["scores"] == [1.0, 1.0, 0.0, 1.0, 1.0]
    after = {f: metric(server.url, s) for f, s in samples.items()}
    # the truncated rendered prompt: found by its generation header; the plain one by its last
    # 32 characters, which the clean-up left alone; the unrelated one: the whole query
    assert after["prompt_tail"] - before["prompt_tail"] == 3
    assert after["whole_query"] - before["whole_query"] == 1
