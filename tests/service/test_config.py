"""Settings (hero_service.config): HERO_* environment variables, arguments over them, validation
errors naming the field, and the values resolved from settings (batch tokens, workers, API key
from a file, bind safety, the masked description)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from hero_service.config import Settings, is_loopback


@pytest.fixture(autouse=True)
def no_hero_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees only the HERO_* variables it sets itself."""
    for name in list(os.environ):
        if name.startswith("HERO_"):
            monkeypatch.delenv(name)
    yield


def test_every_field_reads_its_hero_variable(monkeypatch):
    monkeypatch.setenv("HERO_PORT", "9001")
    monkeypatch.setenv("HERO_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("HERO_STRIP_SPECIAL_TOKENS", "false")
    monkeypatch.setenv("HERO_VERIFIER", "numeric")
    monkeypatch.setenv("HERO_API_KEY", "from-env")
    monkeypatch.setenv("HERO_NOT_A_SETTING", "ignored")  # extra HERO_* names are not an error
    settings = Settings()
    assert settings.port == 9001
    assert settings.max_wait_ms == 2.5
    assert settings.strip_special_tokens is False
    assert settings.verifier == "numeric"
    assert settings.resolved_api_key() == "from-env"
    assert not hasattr(settings, "not_a_setting")


def test_arguments_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("HERO_PORT", "9001")
    monkeypatch.setenv("HERO_MAX_GROUPS", "7")
    settings = Settings(port=9002)
    assert (settings.port, settings.max_groups) == (9002, 7)


def test_defaults_without_environment():
    settings = Settings()
    assert (settings.host, settings.port, settings.reward_model) == ("127.0.0.1", 8000, "embedded")
    assert (settings.verifier, settings.group_store, settings.group_size) == ("math", "memory", 0)
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.resolved_api_key() is None


@pytest.mark.parametrize("values, field, words", [
    ({"port": 70000}, "port", "less than or equal to 65535"),
    ({"port": "eighty"}, "port", "valid integer"),
    ({"dtype": "float8"}, "dtype", "'auto', 'float32', 'bfloat16' or 'float16'"),
    ({"reward_model": "onnx:/m"}, "reward_model", "'embedded', 'hf:PATH' or 'remote:URL'"),
    ({"verifier": "regex"}, "verifier", "'math'"),
    ({"max_body_bytes": 1000}, "max_body_bytes", "greater than or equal to 1024"),
    ({"remote_timeout_s": 0}, "remote_timeout_s", "greater than 0"),
    ({"max_queued_rollouts": 0}, "max_queued_rollouts", "greater than or equal to 1"),
], ids=["port-range", "port-int", "dtype", "reward-model", "verifier", "body-bytes",
        "remote-timeout", "queued-rollouts"])
def test_a_bad_value_is_refused_naming_its_field(values, field, words):
    with pytest.raises(ValidationError) as info:
        Settings(**values)
    [error] = info.value.errors()
    assert error["loc"] == (field,)
    assert words in error["msg"], error["msg"]


def test_a_bad_environment_value_names_the_field_too(monkeypatch):
    monkeypatch.setenv("HERO_MAX_WAIT_MS", "soon")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert [e["loc"] for e in info.value.errors()] == [("max_wait_ms",)]


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValidationError) as info:
        Settings(port=-1, dtype="float8", max_groups=0)
    assert {e["loc"][0] for e in info.value.errors()} == {"port", "dtype", "max_groups"}


@pytest.mark.parametrize("device_type, expected", [("cpu", 4096), ("cuda", 16384),
                                                   ("remote", 16384)])
def test_max_batch_tokens_zero_picks_by_device(device_type, expected):
    assert Settings().resolved_max_batch_tokens(device_type) == expected
    assert Settings(max_batch_tokens=1000).resolved_max_batch_tokens(device_type) == 1000


def test_verifier_workers_zero_is_one_per_usable_core():
    assert Settings().resolved_verifier_workers() == len(os.sched_getaffinity(0))
    assert Settings(verifier_workers=3).resolved_verifier_workers() == 3


def test_the_api_key_comes_from_its_file_stripped(tmp_path: Path):
    key_file = tmp_path / "hero.key"
    key_file.write_text("  s3cret-key\n")
    assert Settings(api_key_file=key_file).resolved_api_key() == "s3cret-key"
    # A key given directly wins; an empty one falls through to the file.
    assert Settings(api_key="direct", api_key_file=key_file).resolved_api_key() == "direct"
    assert Settings(api_key="", api_key_file=key_file).resolved_api_key() == "s3cret-key"


def test_the_api_key_file_from_the_environment(monkeypatch, tmp_path: Path):
    key_file = tmp_path / "mounted-secret"
    key_file.write_text("k8s-key")
    monkeypatch.setenv("HERO_API_KEY_FILE", str(key_file))
    assert Settings().resolved_api_key() == "k8s-key"


def test_an_empty_or_missing_key_file_is_an_error_naming_it(tmp_path: Path):
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"API key file {empty} is empty"):
        Settings(api_key_file=empty).resolved_api_key()
    with pytest.raises(FileNotFoundError):
        Settings(api_key_file=tmp_path / "absent.key").resolved_api_key()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "localhost"])
def test_loopback_binds_need_no_key(host):
    assert is_loopback(host)
    Settings(host=host).check_bind_safety()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "hero.example.com"])
def test_other_binds_need_a_key_or_insecure(host):
    assert not is_loopback(host)
    with pytest.raises(ValueError, match=f"refusing to bind {host} without an API key"):
        Settings(host=host).check_bind_safety()
    Settings(host=host, api_key="k").check_bind_safety()
    Settings(host=host, insecure=True).check_bind_safety()


def test_the_description_masks_keys_passwords_and_url_credentials():
    shown = Settings(reward_model="remote:https://user:p4ss@rm.internal/v1?api_key=abc",
                     group_store="redis://admin:pw@redis:6379/0", group_store_password="sekrit",
                     api_key="the-key", port=9000).describe()
    assert shown["reward_model"] == "remote:https://***@rm.internal/v1?api_key=***"
    assert shown["group_store"] == "redis://***@redis:6379/0"
    assert shown["group_store_password"] == "**********"
    assert shown["api_key"] == "***"
    assert shown["port"] == 9000
    flat = repr(shown)
    for secret in ("p4ss", "abc", "admin:pw", "sekrit", "the-key"):
        assert secret not in flat
    assert Settings().describe()["api_key"] is None
