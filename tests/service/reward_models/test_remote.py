"""The ``remote`` reward-model backend against a real HTTP server (uvicorn on 127.0.0.1) that
speaks vLLM's /classify, /pooling, /v1/models and TEI's /predict shapes, including its failure
modes: slow, hung, HTTP 500, 503-then-OK, wrong counts, garbage, and a closed port — and which of
them mean "the backend is down" (not split by the batcher, counted by its circuit breaker)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import math
import socket
import sys
import time
from pathlib import Path

import pytest

from hero_service.batching import Batcher
from hero_service.metrics import Metrics
from hero_service.reward_models import RewardModelError, ScoringItem, load_reward_model
from hero_service.reward_models.base import RewardModelUnavailable, as_messages
from hero_service.reward_models.remote import (
    Backoff,
    RemoteOptions,
    RemoteRewardModel,
    TEIPredictCodec,
    VLLMClassifyCodec,
    VLLMPoolingCodec,
    codec_for,
    render,
)


def _load_standin():
    # By file path, so it imports the same way whether or not tests/ becomes a package.
    name = "hero_tests_standin_rm_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).with_name("standin_rm_server.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


standin = _load_standin()

ITEMS = [
    ScoringItem("What is 2+2?", "The answer is \\boxed{4}."),
    ScoringItem("What is 2+2?", "5"),
    ScoringItem([{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "Name a prime."}], "7, which is prime."),
    ScoringItem("", "a response with no prompt at all, somewhat longer than the others"),
]


def text_of(item: ScoringItem) -> str:
    """The documented rendering: prompt contents, newline-joined, a newline, the response."""
    return render(as_messages(item.prompt), item.response)


EXPECTED = [standin.raw_score(text_of(item)) for item in ITEMS]


@pytest.fixture(scope="module")
def server():
    with standin.StandinServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()
    yield
    server.reset()


@pytest.fixture
def make_model():
    models = []

    def make(url: str, **kwargs) -> RemoteRewardModel:
        kwargs.setdefault("timeout_s", 5.0)
        model = RemoteRewardModel(url, **kwargs)
        models.append(model)
        return model

    yield make
    for model in models:
        model.close()


def score(model: RemoteRewardModel, items=ITEMS) -> list[float]:
    return model.forward(model.encode(items))


def scoring_requests(server, path: str) -> list[dict]:
    return [r for r in server.requests if r["path"] == path]


# -- the three protocols ---------------------------------------------------------------------------


def test_vllm_classify_scores_in_order_with_discovered_model(server, make_model):
    model = make_model(f"{server.url}/classify")
    assert model.model_id == f"remote:{server.url}/classify"
    assert model.needs_reference is False
    assert score(model) == pytest.approx(EXPECTED)
    assert score(model, ITEMS[::-1]) == pytest.approx(EXPECTED[::-1])
    # The model name was asked once, then sent with every request.
    assert len(scoring_requests(server, "/v1/models")) == 1
    bodies = [r["body"] for r in scoring_requests(server, "/classify")]
    assert len(bodies) == 2
    assert bodies[0]["model"] == standin.MODEL_NAME
    assert bodies[0]["input"] == [text_of(item) for item in ITEMS]
    assert bodies[0]["use_activation"] is False
    assert bodies[0]["truncate_prompt_tokens"] == -1


def test_vllm_classify_activation_model_returns_probabilities(server, make_model):
    model = make_model(f"{server.url}/classify?activation=model")
    expected = [1 / (1 + math.exp(-x)) for x in EXPECTED]
    assert score(model) == pytest.approx(expected)
    assert "use_activation" not in scoring_requests(server, "/classify")[0]["body"]


@pytest.mark.parametrize("shape", ["vector", "scalar", "tokens"])
def test_vllm_pooling_scores_each_output_shape(server, make_model, shape):
    server.set(pooling_shape=shape)
    model = make_model(f"{server.url}/pooling")
    # "tokens": one row per token; the last token's row is the sequence's reward.
    assert score(model) == pytest.approx(EXPECTED)
    body = scoring_requests(server, "/pooling")[0]["body"]
    assert body["input"] == [text_of(item) for item in ITEMS]
    assert body["model"] == standin.MODEL_NAME


def test_vllm_head_index_selects_the_output(server, make_model):
    server.set(labels=3)
    model = make_model(f"{server.url}/pooling?index=1")
    assert score(model) == pytest.approx([-x - 1 for x in EXPECTED])
    with pytest.raises(RewardModelError, match="index=5"):
        score(make_model(f"{server.url}/classify?index=5"))


def test_tei_predict_scores_in_order(server, make_model):
    model = make_model(f"{server.url}/predict")
    assert score(model) == pytest.approx(EXPECTED)
    body = scoring_requests(server, "/predict")[0]["body"]
    # Every input is its own one-element list: TEI reads a flat pair of strings as ONE input.
    assert body["inputs"] == [[text_of(item)] for item in ITEMS]
    assert body["raw_scores"] is True
    assert body["truncate"] is True
    assert not scoring_requests(server, "/v1/models")  # TEI has no model name to find


def test_tei_single_input(server, make_model):
    model = make_model(f"{server.url}/predict")
    assert score(model, ITEMS[:1]) == pytest.approx(EXPECTED[:1])


def test_tei_large_batch_is_split_under_its_client_batch_limit(server, make_model):
    items = [ScoringItem("q", "r" * k) for k in range(1, 41)]
    expected = [standin.raw_score(f"q\n{'r' * k}") for k in range(1, 41)]
    model = make_model(f"{server.url}/predict")
    assert model.max_batch_size == 32  # declared to the batcher, which splits the work
    batcher = Batcher(model, max_batch_tokens=1_000_000, max_wait_ms=0, metrics=Metrics())
    batcher.start()
    try:
        scored = asyncio.run(batcher.score(model.encode(items)))
    finally:
        batcher.stop()
    assert [s.score for s in scored] == pytest.approx(expected)
    sizes = [len(r["body"]["inputs"]) for r in scoring_requests(server, "/predict")]
    assert sizes == [32, 8]
    # Without the split, TEI refuses the batch: a clear error, not a retry loop.
    unlimited = make_model(f"{server.url}/predict?max_batch=0")
    with pytest.raises(RewardModelError, match=r"HTTP 413: batch size 40 > maximum allowed"):
        score(unlimited, items)


def test_tei_multi_label_model_needs_a_label(server, make_model):
    server.set(labels=2)
    with pytest.raises(RewardModelError, match=r"2 labels.*\?label="):
        score(make_model(f"{server.url}/predict"))
    # TEI sorts predictions by score; the label picks the right one whatever its rank.
    assert score(make_model(f"{server.url}/predict?label=LABEL_0")) == pytest.approx(EXPECTED)
    assert score(make_model(f"{server.url}/predict?label=LABEL_1")) == pytest.approx(
        [-x - 1 for x in EXPECTED])
    with pytest.raises(RewardModelError, match="no label 'nope'"):
        score(make_model(f"{server.url}/predict?label=nope"))


def test_explicit_model_name_skips_discovery(server, make_model):
    model = make_model(f"{server.url}/classify?model={standin.MODEL_NAME}")
    assert model.endpoint == f"{server.url}/classify"
    assert score(model) == pytest.approx(EXPECTED)
    assert not scoring_requests(server, "/v1/models")
    wrong = make_model(f"{server.url}/classify?model=other")
    with pytest.raises(RewardModelError, match=r"HTTP 404: The model `other` does not exist"):
        score(wrong)


def test_missing_models_endpoint_sends_no_model_name(server, make_model):
    server.set(models_endpoint=False)
    model = make_model(f"{server.url}/classify")
    assert score(model) == pytest.approx(EXPECTED)
    assert "model" not in scoring_requests(server, "/classify")[0]["body"]


def test_chat_input_sends_one_conversation_per_rollout(server, make_model):
    model = make_model(f"{server.url}/classify?input=chat")
    # The stand-in's "template" joins contents by newlines, so scores match the text rendering.
    assert score(model) == pytest.approx(EXPECTED)
    bodies = [r["body"] for r in scoring_requests(server, "/classify")]
    assert len(bodies) == len(ITEMS)
    conversations = sorted((b["messages"] for b in bodies), key=len)
    assert {"role": "system", "content": "Be brief."} in conversations[-1]
    assert all(c[-1]["role"] == "assistant" for c in conversations)
    assert all("input" not in b for b in bodies)


def test_api_key_is_sent_as_bearer_token(server, make_model):
    model = make_model(f"{server.url}/predict", api_key="s3cret")
    score(model, ITEMS[:1])
    assert scoring_requests(server, "/predict")[0]["authorization"] == "Bearer s3cret"


# -- failures --------------------------------------------------------------------------------------


def test_transient_503_is_retried_then_succeeds(server, make_model):
    server.set(mode="error503", times=2)
    model = make_model(f"{server.url}/classify?model={standin.MODEL_NAME}")
    assert score(model) == pytest.approx(EXPECTED)
    assert len(scoring_requests(server, "/classify")) == 3


def test_persistent_503_fails_after_bounded_attempts(server, make_model):
    server.set(mode="error503")
    model = make_model(f"{server.url}/predict")
    with pytest.raises(RewardModelError,
                       match=r"returned HTTP 503: overloaded \(after 3 attempts\)"):
        score(model)
    assert len(scoring_requests(server, "/predict")) == 3


def test_http_500_fails_at_once_with_the_servers_message(server, make_model):
    server.set(mode="error500")
    model = make_model(f"{server.url}/classify?model={standin.MODEL_NAME}")
    with pytest.raises(RewardModelError) as info:
        score(model)
    message = str(info.value)
    assert f"remote reward model at {server.url}/classify returned HTTP 500" in message
    assert "illegal memory access" in message
    assert len(scoring_requests(server, "/classify")) == 1


def test_timeout_raises_naming_the_timeout(server, make_model):
    server.set(mode="slow", delay=1.0, times=1)
    model = make_model(f"{server.url}/pooling?model={standin.MODEL_NAME}", timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(RewardModelError, match=r"at http://127\.0\.0\.1:\d+/pooling timed out "
                                               r"after 0\.3s"):
        score(model)
    assert time.monotonic() - started < 1.5  # a timeout is not retried


def test_server_down_raises_unreachable(make_model):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    model = make_model(f"http://127.0.0.1:{port}/classify?model=m", backoff_s=0.01)
    with pytest.raises(RewardModelError, match=r"127\.0\.0\.1:\d+/classify is unreachable"):
        score(model)
    discovering = make_model(f"http://127.0.0.1:{port}/classify", backoff_s=0.01)
    with pytest.raises(RewardModelError, match=r"/v1/models is unreachable"):
        score(discovering)


@pytest.mark.parametrize("path,mode", [
    (path, mode)
    for path in ("classify", "pooling", "predict")
    for mode in ("wrong_count", "bad_index", "not_number", "not_json")
    if not (path == "predict" and mode == "bad_index")  # TEI results carry no index
])
def test_malformed_responses_raise(server, make_model, path, mode):
    server.set(mode=mode)
    model = make_model(f"{server.url}/{path}")
    expected = "not JSON" if mode == "not_json" else f"malformed {path} response"
    with pytest.raises(RewardModelError, match=expected):
        score(model)


def test_failure_never_becomes_a_silent_score(server, make_model):
    server.set(mode="error503")
    model = make_model(f"{server.url}/predict", backoff_s=0.01)
    with pytest.raises(RewardModelError):
        score(model)
    server.set(mode="ok")
    assert score(model) == pytest.approx(EXPECTED)  # the same client recovers


# -- what a failure means to the batcher -----------------------------------------------------------


def test_hung_server_costs_one_timeout_and_is_unavailable(server, make_model):
    server.set(mode="hang")  # accepts and reads the request, never answers
    model = make_model(f"{server.url}/classify?model={standin.MODEL_NAME}", timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(RewardModelUnavailable, match=r"timed out after 0\.5s"):
        score(model)
    assert time.monotonic() - started < 2.0
    assert len(scoring_requests(server, "/classify")) == 1


@pytest.mark.parametrize("path,mode,whole", [
    ("classify", "error500", True),
    ("predict", "error503", True),
    ("pooling", "not_json", True),
    ("pooling", "wrong_count", True),
    ("classify", "bad_index", True),
    ("predict", "wrong_count", True),
    ("classify", "not_number", False),  # one score can be bad for one input (NaN, overflow)
    ("predict", "not_number", False),
])
def test_failures_say_whether_the_whole_backend_failed(server, make_model, path, mode, whole):
    server.set(mode=mode)
    model = make_model(f"{server.url}/{path}?model={standin.MODEL_NAME}", backoff_s=0.01)
    with pytest.raises(RewardModelError) as info:
        score(model)
    assert isinstance(info.value, RewardModelUnavailable) is whole, str(info.value)


def test_refused_inputs_may_be_split_but_a_wrong_model_is_the_backend(server, make_model):
    items = [ScoringItem("q", "r" * k) for k in range(1, 41)]
    # TEI's 413 "batch too large": a smaller batch passes, so the batcher may split it.
    unlimited = make_model(f"{server.url}/predict?max_batch=0")
    with pytest.raises(RewardModelError, match="HTTP 413") as info:
        score(unlimited, items)
    assert not isinstance(info.value, RewardModelUnavailable)
    # A model the server does not have fails every input alike.
    with pytest.raises(RewardModelUnavailable, match="HTTP 404"):
        score(make_model(f"{server.url}/classify?model=other"))


def test_unreachable_server_is_unavailable(make_model):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = make_model(f"http://127.0.0.1:{port}/classify?model=m", backoff_s=0.01)
    with pytest.raises(RewardModelUnavailable, match="unreachable"):
        score(model)


def test_retry_after_of_a_persistent_503_is_passed_on(server, make_model):
    server.set(mode="error503", retry_after=0.05)
    model = make_model(f"{server.url}/predict", backoff_s=0.01)
    with pytest.raises(RewardModelUnavailable) as info:
        score(model)
    assert info.value.retry_after_s == pytest.approx(0.05)


def test_chat_batch_against_a_hung_server_sends_no_more_than_one_wave(server, make_model):
    from hero_service.reward_models.remote import CHAT_CONCURRENCY

    server.set(mode="hang")
    model = make_model(f"{server.url}/classify?input=chat&model={standin.MODEL_NAME}",
                       timeout_s=0.5)
    items = [ScoringItem("q", f"response {i}") for i in range(3 * CHAT_CONCURRENCY)]
    started = time.monotonic()
    with pytest.raises(RewardModelUnavailable, match="timed out"):
        score(model, items)
    assert time.monotonic() - started < 2.0
    assert len(scoring_requests(server, "/classify")) <= CHAT_CONCURRENCY


# -- encoding --------------------------------------------------------------------------------------


def test_truncation_keeps_the_end_of_the_response(server, make_model):
    model = make_model(f"{server.url}/predict", max_length=10)  # ~40 characters
    assert model.max_tokens == 10
    long = ScoringItem("Q: sum?", "x" * 200 + " so the final answer is 42")
    short = ScoringItem("Q: sum?", "42")
    encoded = model.encode([long, short])
    assert encoded[0].truncated is True
    assert len(encoded[0].payload) == 40
    assert encoded[0].payload.startswith("Q: sum?\n")
    assert encoded[0].payload.endswith("so the final answer is 42")
    assert encoded[0].n_tokens == 40 // 4 + 1
    assert encoded[1].truncated is False
    assert encoded[1].payload == "Q: sum?\n42"
    assert encoded[1].n_tokens == len("Q: sum?\n42") // 4 + 1
    # What is scored is the truncated text.
    assert model.forward(encoded) == pytest.approx([0.40, standin.raw_score("Q: sum?\n42")])
    # A prompt longer than the budget: the end of the text (the response) survives.
    huge_prompt = model.encode([ScoringItem("p" * 500, "the answer is 42")])[0]
    assert huge_prompt.truncated and huge_prompt.payload.endswith("\nthe answer is 42")
    assert len(huge_prompt.payload) == 40


def test_keys_identify_identical_inputs(make_model):
    model = make_model("http://127.0.0.1:9/classify")
    a, b, c, d = model.encode([
        ScoringItem("p", "r"), ScoringItem("p", "r", reference="ignored"),
        ScoringItem([{"role": "user", "content": "p"}], "r"), ScoringItem("p", "s")])
    assert a.key == b.key
    assert a.key != d.key
    assert c.key == ((("user", "p"),), "r")


def test_url_options_and_errors():
    with pytest.raises(ValueError, match="/classify or /pooling"):
        RemoteRewardModel("http://127.0.0.1:9/score")
    with pytest.raises(ValueError, match="http"):
        RemoteRewardModel("127.0.0.1:9/classify")
    with pytest.raises(ValueError, match="input=chat needs vLLM"):
        RemoteRewardModel("http://127.0.0.1:9/predict?input=chat")
    with pytest.raises(ValueError, match="activation"):
        RemoteRewardModel("http://127.0.0.1:9/classify?activation=maybe")
    model = RemoteRewardModel("http://u:pw@127.0.0.1:9/prefix/v1/rm?protocol=pooling&x=1")
    try:
        assert model.protocol == "pooling"
        assert model.endpoint == "http://u:pw@127.0.0.1:9/prefix/v1/rm?x=1"
        assert model.models_url == "http://u:pw@127.0.0.1:9/prefix/v1/models"
        assert "pw" not in model.model_id and "pw" not in model.shown_url
    finally:
        model.close()
    model = RemoteRewardModel("http://127.0.0.1:9/v1/classify")
    try:
        assert model.models_url == "http://127.0.0.1:9/v1/models"
        assert model.max_tokens == 4096
    finally:
        model.close()


def test_load_reward_model_builds_the_remote_backend(server):
    model = load_reward_model(f"remote:{server.url}/classify", remote_timeout_s=7.0,
                              max_length=256)
    try:
        assert isinstance(model, RemoteRewardModel)
        assert model.timeout_s == 7.0 and model.max_tokens == 256
        assert score(model) == pytest.approx(EXPECTED)
    finally:
        model.close()


# -- end to end through the batcher ----------------------------------------------------------------


def test_batcher_end_to_end(server, make_model):
    model = make_model(f"{server.url}/classify")
    batcher = Batcher(model, max_batch_tokens=64, max_wait_ms=2, metrics=Metrics())
    batcher.start()
    many = [ScoringItem("q", "r" * k) for k in range(1, 30)]
    many_expected = [standin.raw_score(f"q\n{'r' * k}") for k in range(1, 30)]

    async def main():
        first, second, third = await asyncio.gather(
            batcher.score(model.encode(ITEMS)),
            batcher.score(model.encode(ITEMS[::-1])),  # identical items: scored once
            batcher.score(model.encode(many)),
        )
        return first, second, third

    try:
        first, second, third = asyncio.run(main())
        assert [s.score for s in first] == pytest.approx(EXPECTED)
        assert [s.score for s in second] == pytest.approx(EXPECTED[::-1])
        assert [s.score for s in third] == pytest.approx(many_expected)
        # The 64-token budget split the work into several length-sorted remote calls.
        assert len(scoring_requests(server, "/classify")) > 1

        server.set(mode="error500")

        async def failing():
            return await batcher.score(model.encode([ScoringItem("q", "fails")]))

        with pytest.raises(RewardModelError, match="HTTP 500"):
            asyncio.run(failing())
    finally:
        batcher.stop()


def test_batcher_against_a_hung_server_makes_one_call_then_recovers(server, make_model):
    model = make_model(f"{server.url}/classify?model={standin.MODEL_NAME}", timeout_s=0.5)
    metrics = Metrics()
    # A small token budget: the 64 rollouts are many batches, each of which used to be bisected.
    batcher = Batcher(model, max_batch_tokens=64, max_wait_ms=0,
                      metrics=metrics, breaker_cooldown_s=0.5)
    batcher.start()
    rollouts = [ScoringItem("q", f"response number {i}") for i in range(64)]
    # Other rollouts for the second request: identical ones would share the first's futures.
    others = [ScoringItem("q2", f"response number {i}") for i in range(64)]

    async def attempt(items):
        (outcome,) = await asyncio.gather(batcher.score(model.encode(items)),
                                          return_exceptions=True)
        return outcome

    async def outage_and_recovery():
        # One event loop throughout, as in the service.
        server.set(mode="hang")
        started = time.monotonic()
        first = await attempt(rollouts)
        first_s = time.monotonic() - started
        second = await attempt(others)
        calls = len(scoring_requests(server, "/classify"))
        server.set(mode="ok")
        await asyncio.sleep(0.6)  # the cool-down
        return first, first_s, second, calls, await attempt(rollouts)

    try:
        first, first_s, second, calls_while_down, recovered = asyncio.run(outage_and_recovery())
    finally:
        batcher.stop()
    assert isinstance(first, RewardModelUnavailable) and "timed out" in str(first)
    assert first_s < 2.0
    assert isinstance(second, RewardModelUnavailable) and "circuit breaker open" in str(second)
    assert calls_while_down == 1  # not 127 (a bisection of 64) or one per batch
    assert metrics.failure_splits._value.get() == 0
    assert [s.score for s in recovered] == pytest.approx(
        [standin.raw_score(f"q\n{item.response}") for item in rollouts])
    assert batcher.breaker.state == "closed"


# -- the layers on their own: options, codecs (the documented wire shapes), backoff ---------------


def test_options_are_read_once_into_a_frozen_record():
    options = RemoteOptions.from_url(
        "http://rm:8000/v1/classify?model=org%2Fm&index=2&activation=model&max_batch=8&keep=1")
    assert options == RemoteOptions(
        protocol="classify", endpoint="http://rm:8000/v1/classify?keep=1",
        models_url="http://rm:8000/v1/models",
        shown_spec="http://rm:8000/v1/classify?model=org%2Fm&index=2&activation=model"
                   "&max_batch=8&keep=1",
        shown_url="http://rm:8000/v1/classify?keep=1", model="org/m", input_mode="text",
        index=2, label=None, raw=False, max_batch=8)
    assert options.vllm
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.index = 0  # type: ignore[misc]
    tei = RemoteOptions.from_url("http://rm:8080/predict?label=good")
    assert (tei.vllm, tei.max_batch, tei.label, tei.raw) == (False, 32, "good", True)
    with pytest.raises(ValueError, match=r"'http://rm/classify\?index=x': invalid literal"):
        RemoteOptions.from_url("http://rm/classify?index=x")
    with pytest.raises(ValueError, match="index and max_batch must be >= 0"):
        RemoteOptions.from_url("http://rm/predict?max_batch=-1")
    with pytest.raises(ValueError, match="input must be text or chat"):
        RemoteOptions.from_url("http://rm/classify?input=image")


def test_vllm_codecs_build_the_documented_requests():
    options = RemoteOptions.from_url("http://rm/classify")
    codec = codec_for(options, "m")
    assert isinstance(codec, VLLMClassifyCodec)
    assert codec.body(["a", "b"]) == {"model": "m", "input": ["a", "b"], "use_activation": False,
                                      "truncate_prompt_tokens": -1, "truncation_side": "left"}
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert codec.chat_body(conversation) == {
        "model": "m", "messages": conversation, "use_activation": False,
        "truncate_prompt_tokens": -1, "truncation_side": "left"}
    # No model name known (no listing) and the server's activation: both fields left out.
    pooling = codec_for(RemoteOptions.from_url("http://rm/pooling?activation=model"))
    assert isinstance(pooling, VLLMPoolingCodec)
    assert pooling.body(["a"]) == {"input": ["a"], "truncate_prompt_tokens": -1,
                                   "truncation_side": "left"}


def test_vllm_codecs_parse_the_documented_answers():
    classify = codec_for(RemoteOptions.from_url("http://rm/classify?index=1"))
    answer = {"data": [{"index": 1, "label": "x", "probs": [0.1, 0.9], "num_classes": 2},
                       {"index": 0, "label": "y", "probs": [0.6, 0.4], "num_classes": 2}]}
    assert classify.parse(answer, 2) == [0.4, 0.9]  # by each result's index, not its position
    pooling = codec_for(RemoteOptions.from_url("http://rm/pooling"))
    answer = {"data": [{"index": 0, "object": "pooling", "data": [1.5, -1.0]},
                       {"index": 1, "object": "pooling", "data": -2},
                       {"index": 2, "object": "pooling", "data": [[9.0], [8.0], [0.25]]}]}
    assert pooling.parse(answer, 3) == [1.5, -2.0, 0.25]
    with pytest.raises(RewardModelUnavailable, match="malformed pooling response: 1 results"):
        pooling.parse({"data": answer["data"][:1]}, 2)
    with pytest.raises(RewardModelError, match=r"'data' is nan, not a finite number") as info:
        pooling.parse({"data": [{"index": 0, "data": [math.nan]}]}, 1)
    assert not isinstance(info.value, RewardModelUnavailable)  # may be about that one input


def test_tei_codec_builds_and_parses_the_documented_shapes():
    codec = codec_for(RemoteOptions.from_url("http://rm/predict?label=good"))
    assert isinstance(codec, TEIPredictCodec)
    assert codec.body(["a", "b"]) == {"inputs": [["a"], ["b"]], "raw_scores": True,
                                      "truncate": True, "truncation_direction": "Left"}
    # Sorted by score, as TEI sends them: the label picks the reward whatever its rank.
    answer = [[{"score": 0.8, "label": "bad"}, {"score": 0.2, "label": "good"}],
              [{"score": 0.7, "label": "good"}, {"score": 0.3, "label": "bad"}]]
    assert codec.parse(answer, 2) == [0.2, 0.7]
    single = codec_for(RemoteOptions.from_url("http://rm/predict"))
    assert single.parse([{"score": 1.25, "label": "LABEL_0"}], 1) == [1.25]  # unbatched shape
    with pytest.raises(RewardModelUnavailable, match=r"2 labels \['bad', 'good'\]"):
        single.parse(answer[:1], 1)


def test_backoff_doubles_honours_retry_after_and_stays_short():
    backoff = Backoff()
    assert (backoff.attempts, backoff.backoff_s, backoff.max_backoff_s) == (3, 0.1, 2.0)
    assert [backoff.delay(attempt, None) for attempt in (1, 2, 5)] == [0.1, 0.2, 1.6]
    assert backoff.delay(1, 0.5) == 0.5  # never earlier than the server asked ...
    assert backoff.delay(1, 60.0) == 2.0  # ... but a long Retry-After is cut short


def test_a_long_retry_after_is_capped_but_passed_on(server, make_model):
    server.set(mode="error503", retry_after=30)
    model = make_model(f"{server.url}/predict", attempts=2)
    started = time.monotonic()
    with pytest.raises(RewardModelUnavailable, match=r"HTTP 503.*after 2 attempts") as info:
        score(model)
    assert 2.0 <= time.monotonic() - started < 4.0  # one wait, at the 2 s cap
    assert info.value.retry_after_s == 30.0  # the caller learns how long the server asked
    assert len(scoring_requests(server, "/predict")) == 2
