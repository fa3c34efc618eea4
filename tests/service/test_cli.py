"""``hero-rewards serve`` (hero_service.cli). In-process: flags built from Settings, flags over
HERO_* variables, the one-line error texts, the device check, and ``main`` refusing before it
serves. As real subprocesses (what only a process shows): start-up failures print one ``error:``
line that names the cause, exit status 2, no traceback — whether the problem is a setting, the
key file, the device, the reward model, or something failing later, inside the app's lifespan."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from support import free_port

from hero_service.cli import (
    StartupError,
    add_settings_arguments,
    check_device,
    describe_settings_error,
    main,
    one_line,
    settings_from_args,
    uvicorn_log_config,
)
from hero_service.config import Settings

PREFIX = "hero-rewards serve: error: "
# --device cuda on a machine without CUDA; on a GPU machine, a device index it does not have.
MISSING_CUDA = "cuda" if not torch.cuda.is_available() else "cuda:99"


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hero_service", "--host", "127.0.0.1", "--port", str(free_port()),
         "--verifier-workers", "1", *args],
        capture_output=True, text=True, timeout=240, env={**os.environ, **(env or {})})


def the_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(PREFIX), lines[0]
    return lines[0].removeprefix(PREFIX)


@pytest.mark.parametrize("args, env, words", [
    (["--port", "eighty"], None,
     ["--port (HERO_PORT)", "valid integer", "'eighty'"]),
    (["--max-batch-tokens", "-5", "--dtype", "float8"], None,
     ["--max-batch-tokens (HERO_MAX_BATCH_TOKENS)", "greater than or equal to 0",
      "--dtype (HERO_DTYPE)", "'float8'"]),
    ([], {"HERO_MAX_WAIT_MS": "soon"}, ["--max-wait-ms (HERO_MAX_WAIT_MS)", "'soon'"]),
    (["--reward-model", "onnx:/m"], None, ["--reward-model", "'embedded', 'hf:PATH'"]),
    (["--api-key-file", "/nonexistent/hero-key"], None,
     ["cannot read the API key file /nonexistent/hero-key", "No such file"]),
    (["--api-key-file", "/"], None, ["cannot read the API key file /", "Is a directory"]),
    (["--device", MISSING_CUDA], None, [f"--device {MISSING_CUDA}", "CUDA"]),
    (["--reward-model", "hf:/nonexistent/reward-model"], None,
     ["cannot load the reward model 'hf:/nonexistent/reward-model'", "does not exist"]),
    (["--reward-model", "remote:https://u:p4ss@127.0.0.1:1/rm"], None,
     ["cannot load the reward model", "/classify or /pooling", "https://***@127.0.0.1:1/rm"]),
    (["--group-store", "redis://u:p4ss@127.0.0.1:abc/0"], None,
     ["group_store redis://127.0.0.1", "port is not a number"]),
    (["--group-store", "http://u:p4ss@127.0.0.1:6379"], None,
     ["group_store must be 'memory' or a redis://", "http://..."]),
    (["--group-store", "redis://127.0.0.1:6379/zero"], None,
     ["database number", "/zero"]),
    (["--group-store", "redis://127.0.0.1:6379/0", "--group-store-password-file",
      "/nonexistent/redis-password"], None, ["group_store_password_file", "cannot read it"]),
], ids=["bad-int", "two-bad-values", "bad-env", "bad-backend", "missing-key-file",
        "key-file-is-a-dir", "no-cuda", "bad-hf-path", "bad-remote-url", "store-port",
        "store-scheme", "store-db", "store-password-file"])
def test_start_up_failures_print_one_line_and_exit_2(args, env, words):
    line = the_error_line(start(*args, env=env))
    for word in words:
        assert word in line, line
    assert "p4ss" not in line


# A real service process whose reward model fails inside the app's lifespan (where uvicorn would
# print Starlette's traceback): the factory is the app's seam for that fault.
LIFESPAN_FAILURE = """
import sys
from hero_service.app import create_app
from hero_service.cli import run_server
from hero_service.config import Settings

def broken_model(settings):
    raise RuntimeError("simulated: the GPU fell off the bus\\n(second line of the cause)")

settings = Settings(port=int(sys.argv[1]), verifier_workers=1)
sys.exit(run_server(create_app(settings, reward_model_factory=broken_model), settings))
"""


def test_a_failure_inside_the_lifespan_ends_the_same_way():
    result = subprocess.run([sys.executable, "-c", LIFESPAN_FAILURE, str(free_port())],
                            capture_output=True, text=True, timeout=240)
    line = the_error_line(result)
    assert line == ("start-up failed loading the reward model: RuntimeError: simulated: the GPU "
                    "fell off the bus (second line of the cause)"), line
    assert "Application startup complete" not in result.stderr


# -- in-process: the parser, the messages, the checks before serving ---------------------------


@pytest.fixture
def no_hero_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Only the HERO_* variables the test sets itself."""
    for name in list(os.environ):
        if name.startswith("HERO_"):
            monkeypatch.delenv(name)
    return monkeypatch


def parse(*argv: str) -> Settings:
    parser = argparse.ArgumentParser(prog="hero-rewards serve")
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def test_every_setting_is_a_flag_with_its_variable_and_default_in_the_help():
    parser = argparse.ArgumentParser(prog="hero-rewards serve")
    add_settings_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in flags, name
        if field.annotation is bool:
            assert "--no-" + name.replace("_", "-") in flags, name
    text = " ".join(parser.format_help().split())
    assert "[env HERO_PORT; default 8000]" in text
    assert "[env HERO_STRIP_SPECIAL_TOKENS; default True]" in text


def test_flags_become_settings(no_hero_environment):
    settings = parse("--port", "9001", "--max-wait-ms", "2.5", "--no-strip-special-tokens",
                     "--insecure", "--verifier", "numeric", "--group-store",
                     "redis://127.0.0.1:6379/2", "--extra-special-tokens", "<|end|>,[EOS]")
    assert settings.port == 9001
    assert settings.max_wait_ms == 2.5
    assert settings.strip_special_tokens is False
    assert settings.insecure is True
    assert settings.verifier == "numeric"
    assert settings.group_store == "redis://127.0.0.1:6379/2"
    assert settings.extra_special_tokens == "<|end|>,[EOS]"
    assert parse() == Settings()  # no flags: the defaults


def test_flags_win_and_unset_flags_leave_the_environment(no_hero_environment):
    no_hero_environment.setenv("HERO_PORT", "1234")
    no_hero_environment.setenv("HERO_MAX_GROUPS", "7")
    no_hero_environment.setenv("HERO_STRIP_SPECIAL_TOKENS", "false")
    settings = parse("--port", "9001")
    assert (settings.port, settings.max_groups) == (9001, 7)
    assert settings.strip_special_tokens is False  # an absent bool flag is not a False flag
    assert parse("--strip-special-tokens").strip_special_tokens is True


def settings_error(**values: object) -> str:
    with pytest.raises(ValidationError) as info:
        Settings(**values)
    return describe_settings_error(info.value)


def test_settings_errors_name_flag_and_variable_on_one_line():
    text = settings_error(port="eighty", dtype="float8")
    assert text == ("--port (HERO_PORT): Input should be a valid integer, unable to parse string "
                    "as an integer (got 'eighty'); --dtype (HERO_DTYPE): Input should be 'auto', "
                    "'float32', 'bfloat16' or 'float16' (got 'float8')")
    assert "Value error" not in settings_error(reward_model="onnx:/m")


def test_settings_errors_never_echo_secrets_or_url_credentials():
    assert settings_error(api_key=123) == "--api-key (HERO_API_KEY): Input should be a valid string"
    text = settings_error(reward_model="onnx://user:p4ss@host/m")
    assert text.endswith("(got 'onnx://***@host/m')"), text


@pytest.mark.parametrize("settings", [
    Settings(device="auto"), Settings(device="cpu"),
    Settings(device="cuda:99", reward_model="remote:http://127.0.0.1:1/rm"),  # runs elsewhere
], ids=["auto", "cpu", "remote-ignores-device"])
def test_devices_that_pass_the_check(settings):
    check_device(settings)


@pytest.mark.parametrize("device, words", [
    ("banana", ["--device 'banana' is not a device", "(use auto, cpu, cuda or cuda:N)"]),
    (MISSING_CUDA, [f"--device {MISSING_CUDA}", "CUDA"]),
], ids=["not-a-device", "missing-cuda"])
def test_devices_that_fail_the_check(device, words):
    with pytest.raises(StartupError) as info:
        check_device(Settings(device=device))
    for word in words:
        assert word in str(info.value), str(info.value)


def test_one_line_joins_redacts_and_bounds_a_cause():
    cause = RuntimeError("cannot reach https://u:p4ss@rm.internal/v1\n  retried 3 times")
    assert one_line(cause) == ("RuntimeError: cannot reach https://***@rm.internal/v1 retried 3 "
                               "times")
    assert one_line(ValueError()) == "ValueError: (no message)"
    long = one_line(RuntimeError("x" * 1000))
    assert len(long) == 600 + len(" ...") and long.endswith("x ...")


def test_uvicorn_logs_through_the_redaction_filter():
    config = uvicorn_log_config()
    assert config["handlers"], "uvicorn has handlers to filter"
    for handler in config["handlers"].values():
        assert "redact" in handler["filters"]


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``main(argv)`` in this process: it must refuse with status 2 and one line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    [line] = err.splitlines()
    assert line.startswith(PREFIX), line
    return line.removeprefix(PREFIX)


def test_main_refuses_a_public_bind_without_a_key(no_hero_environment, capsys):
    line = error_of(["--host", "0.0.0.0"], capsys)
    assert line.startswith("refusing to bind 0.0.0.0 without an API key"), line


def test_main_refuses_an_empty_key_file(no_hero_environment, capsys, tmp_path: Path):
    empty = tmp_path / "hero.key"
    empty.write_text("\n")
    assert error_of(["--api-key-file", str(empty)], capsys) == f"API key file {empty} is empty"
