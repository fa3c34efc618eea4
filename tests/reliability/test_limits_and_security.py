"""Input limits (all configurable, listed in /v1/info) and security: API keys (header and key
file), the bind check, trust_remote_code, no request-chosen paths, and keys kept out of logs."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from hero_service.reward_models import load_reward_model
from support import build_tiny_decoder_rm, running_server

LIMITS = ["--max-body-bytes", "20000", "--max-groups", "3", "--max-responses-per-group", "4",
          "--max-response-chars", "500"]


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text("file-key-0123456789\n")
    with running_server(*LIMITS, "--verifier-workers", "1", "--api-key-file", str(key_file)) as srv:
        yield srv


AUTH = {"Authorization": "Bearer file-key-0123456789"}


def group(n=1, chars=10):
    return {"reference": "1", "responses": ["x" * chars] * n, "rm_scores": [0.0] * n}


@pytest.mark.parametrize("body, status, field, words", [
    ({"groups": [group()] * 4}, 422, "groups", "limit is 3"),
    ({"groups": [group(n=5)]}, 422, "groups[0].responses", "limit is 4"),
    ({"groups": [group(), group(chars=501)]}, 422, "groups[1].responses[0]", "limit is 500"),
    ({"groups": [group(chars=400)] * 3, "pad": "y" * 30000}, 413, "body", "exceeds 20000"),
])
def test_limits_answer_with_clear_errors(limited_server, figures, body, status, field, words):
    r = httpx.post(limited_server.url + "/v1/rewards", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field and words in error["message"]
    figures.record("limits", f"{field} over its limit", f"{status} {error['code']}")


def test_chunked_body_over_the_limit_is_413(limited_server):
    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    r = httpx.post(limited_server.url + "/v1/rewards", content=chunks(),
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_limits_are_listed_in_info(limited_server):
    limits = httpx.get(limited_server.url + "/v1/info").json()["limits"]
    assert limits["max_body_bytes"] == 20000 and limits["max_groups"] == 3
    assert limits["max_responses_per_group"] == 4 and limits["max_response_chars"] == 500


def test_key_file_is_enforced_and_health_stays_open(limited_server):
    url = limited_server.url
    assert httpx.post(url + "/v1/rewards", json={"groups": [group()]}).status_code == 401
    assert httpx.post(url + "/v1/rewards", json={"groups": [group()]},
                      headers={"Authorization": "Bearer file-key-0123456788"}).status_code == 401
    assert httpx.post(url + "/v1/rewards", json={"groups": [group()]},
                      headers=AUTH).status_code == 200
    assert httpx.post(url + "/v1/rewards", json={"groups": [group()]},
                      headers={"X-API-Key": "file-key-0123456789"}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/v1/info"):
        assert httpx.get(url + path).status_code == 200, path


def test_the_key_never_reaches_the_log(limited_server):
    httpx.post(limited_server.url + "/v1/rewards", json={"groups": [group()]}, headers=AUTH)
    httpx.post(limited_server.url + "/v1/rewards", json={"groups": [group()]},
               headers={"Authorization": "Bearer file-key-0123456789-wrong"})
    log = limited_server.log()
    assert "settings:" in log and "file-key-0123456789" not in log


def test_no_request_field_can_choose_a_model_or_a_file(limited_server):
    for extra in ({"reward_model": "hf:/etc"}, {"model_path": "/root"}, {"api_key_file": "/x"}):
        r = httpx.post(limited_server.url + "/v1/rewards", headers=AUTH,
                       json={"groups": [group()], **extra})
        assert r.status_code == 422 and "not permitted" in r.json()["error"]["message"], extra


def test_non_loopback_bind_without_a_key_is_refused():
    base = [sys.executable, "-m", "hero_service", "--port", "0"]
    refused = subprocess.run([*base, "--host", "0.0.0.0"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2
    assert "refusing to bind 0.0.0.0 without an API key" in refused.stderr
    from hero_service.config import Settings

    Settings(host="0.0.0.0", insecure=True).check_bind_safety()  # the operator said so
    Settings(host="0.0.0.0", api_key="k").check_bind_safety()
    Settings(host="::1").check_bind_safety()
    with pytest.raises(ValueError):
        Settings(host="10.1.2.3").check_bind_safety()


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    """A model directory whose config points at its own code: that code must not run."""
    path = build_tiny_decoder_rm(tmp_path / "rm")
    marker = tmp_path / "remote-code-ran"
    (path / "evil_model.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForSequenceClassification as EvilModel\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "evil_model.EvilModel"}
    (path / "config.json").write_text(json.dumps(config))
    rm = load_reward_model(f"hf:{path}", device="cpu")  # default: trust_remote_code=False
    assert not marker.exists()
    assert type(rm.model).__name__ == "LlamaForSequenceClassification"
