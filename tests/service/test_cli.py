"""Start-up failures of ``python -m hero_service`` (real subprocesses): one ``error:`` line that
names the cause, exit status 2, no traceback — whether the problem is a setting, the key file, the
device, the reward model, or something failing later, inside the app's lifespan."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support import free_port

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
