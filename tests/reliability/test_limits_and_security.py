"""Input limits (all configurable, listed in /v1/info) and security: API keys (header and key
file, checked before the body is read), the bind check, trust_remote_code, no request-chosen
paths, and keys and URL credentials kept out of logs, /v1/info, errors and metrics."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
from support import build_tiny_decoder_rm, free_port, running_server

from hero_service.reward_models import load_reward_model

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


SECRETS = ("p4ss", "SEKRET")


def test_remote_rm_credentials_never_shown(figures):
    """A remote RM URL with user:password and ?api_key=: the secrets appear nowhere an operator or
    a caller can read — the log, the open /v1/info, a 503's message, /metrics."""
    port = free_port()  # nothing listens there: every RM call fails, so errors quote the URL
    url = f"https://u:p4ss@127.0.0.1:{port}/classify?api_key=SEKRET&model=x"
    with running_server("--reward-model", f"remote:{url}", "--verifier-workers", "1",
                        "--remote-timeout-s", "2") as srv:
        info = httpx.get(srv.url + "/v1/info").text
        failed = httpx.post(srv.url + "/v1/rewards", timeout=60, json={"groups": [
            {"prompt": "2+2?", "reference": "4", "responses": ["\\boxed{4}", "\\boxed{5}"]}]})
        metrics = httpx.get(srv.url + "/metrics").text
        log = srv.log()
    assert failed.status_code == 503, failed.text
    message = failed.json()["error"]["message"]
    assert f"127.0.0.1:{port}/classify" in message  # the URL is still named, to debug with
    assert f"127.0.0.1:{port}/classify?api_key=***&model=x" in info
    assert "settings:" in log and f"127.0.0.1:{port}" in log
    for secret in SECRETS:
        for where, text in (("log", log), ("/v1/info", info), ("error", failed.text),
                            ("/metrics", metrics)):
            assert secret not in text, f"{secret!r} shown in {where}"
    figures.record("security", "remote RM URL secrets (userinfo, ?api_key=) in log, /v1/info, "
                   "503 message, /metrics", "none of 4 places")


def _post_partial_body(port: int, headers: str, declared: int, sent: int,
                       wait_s: float) -> bytes | None:
    """Declare a ``declared``-byte body, send only ``sent`` bytes of it, and return what the
    server answers within ``wait_s`` (None: it is still waiting for the body)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /v1/rewards HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {declared}\r\n"
                     f"{headers}\r\n".encode() + b"[" * sent)
        sock.settimeout(wait_s)
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            return None
        # The head and the body of the answer may arrive in separate segments: read the body
        # its Content-Length announces (or until the server closes).
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
        head, _, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"content-length:\s*(\d+)", head, re.I)
        while length and len(body) < int(length.group(1)):
            more = sock.recv(65536)
            if not more:
                break
            body += more
        return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("headers", ["", "Authorization: Bearer wrong\r\n",
                                     "X-API-Key: nope\r\n"])
def test_a_missing_or_wrong_key_is_refused_before_the_body_is_read(server, headers, figures):
    """16 MiB declared, 64 KiB sent: the 401 comes at once, from the headers alone. (Checking the
    key in a route dependency, as before, waits for the whole body and parses it first.)"""
    started = time.monotonic()
    answer = _post_partial_body(server.port, headers, 16 * 1024 * 1024, 64 * 1024, wait_s=15)
    assert answer is not None, "no answer: the server waited for the unauthenticated body"
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b'"code":"unauthorized"' in answer.replace(b" ", b"")
    assert b"www-authenticate: bearer" in answer.lower()
    elapsed = time.monotonic() - started
    assert elapsed < 15
    key = f"wrong in {headers.split(':')[0]}" if headers else "missing"
    figures.record("security", f"key {key}, 16 MiB declared, "
                   "64 KiB sent: 401 after (s), body not awaited", elapsed)


def test_the_right_key_still_waits_for_the_whole_body(server):
    """The control for the test above: with the key, the same partial body gets no early answer
    (the early 401 is the key check, not the server giving up on slow bodies)."""
    assert _post_partial_body(server.port, "Authorization: Bearer test-key\r\n",
                              16 * 1024 * 1024, 64 * 1024, wait_s=2) is None
