"""The one redaction rule (hero_service.redaction) and the places that must use it: the start-up
settings line, the remote backend's model id and messages, every log record. The live-server check
(log, /v1/info, error answers, /metrics) is in tests/reliability/test_limits_and_security.py."""

from __future__ import annotations

import logging

import pytest

from hero_service.config import Settings
from hero_service.redaction import MASK, RedactingFilter, redact_text, redact_url
from hero_service.reward_models.remote import RemoteRewardModel

SECRET_URL = "https://u:p4ss@127.0.0.1:9/classify?api_key=SEKRET&model=x"


@pytest.mark.parametrize("url, shown", [
    (SECRET_URL, "https://***@127.0.0.1:9/classify?api_key=***&model=x"),
    ("http://token@rm:8000/pooling", "http://***@rm:8000/pooling"),
    ("redis://:hunter2@redis:6379/0", "redis://***@redis:6379/0"),
    ("http://rm/predict?label=good&X-Amz-Signature=abc&sig=1&Token=t&hf_token=h",
     "http://rm/predict?label=good&X-Amz-Signature=***&sig=***&Token=***&hf_token=***"),
    ("http://rm/p?password=a%20b&secret=s&access_token=a&key=k&apikey=z&index=0",
     "http://rm/p?password=***&secret=***&access_token=***&key=***&apikey=***&index=0"),
    ("http://rm/p#access_token=frag", "http://rm/p#access_token=***"),
    # Nothing secret: byte for byte the same (no re-encoding of other parameters).
    ("http://rm:8000/v1/classify?model=org%2Fname&max_batch=8",
     "http://rm:8000/v1/classify?model=org%2Fname&max_batch=8"),
    ("http://[::1:9/broken?token=t", "http://[::1:9/broken?token=***"),  # malformed: no raise
])
def test_urls_lose_their_credentials_and_keep_the_rest(url, shown):
    assert redact_url(url) == shown


def test_text_with_urls_and_stray_query_strings():
    text = (f"remote reward model at {SECRET_URL} is unreachable (ConnectError: "
            "GET /v1/models?api_key=SEKRET failed)")
    shown = redact_text(text)
    assert "p4ss" not in shown and "SEKRET" not in shown
    assert "127.0.0.1:9/classify" in shown and "model=x" in shown and "is unreachable" in shown
    assert redact_text("alpha=0.1 and beta=0.1") == "alpha=0.1 and beta=0.1"


def test_settings_description_masks_every_url_secret():
    settings = Settings(reward_model=f"remote:{SECRET_URL}", api_key="the-key")
    shown = str(settings.describe())
    assert "p4ss" not in shown and "SEKRET" not in shown and "the-key" not in shown
    assert settings.describe()["reward_model"] == f"remote:{redact_url(SECRET_URL)}"
    assert settings.describe()["api_key"] == MASK


def test_remote_model_id_and_errors_are_redacted():
    model = RemoteRewardModel(SECRET_URL, timeout_s=1, attempts=1)
    try:
        assert model.model_id == "remote:https://***@127.0.0.1:9/classify?api_key=***&model=x"
        assert "api_key=SEKRET" in model.endpoint  # the secret is still *sent*, only not shown
    finally:
        model.close()


def test_log_records_and_tracebacks_are_redacted():
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("calling %s", SECRET_URL)
        try:
            raise RuntimeError(f"cannot reach {SECRET_URL}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2 and "Traceback" in records[1]
    for line in records:
        assert "p4ss" not in line and "SEKRET" not in line
        assert "127.0.0.1:9/classify" in line
