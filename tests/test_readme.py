"""The README's examples run as written against a live service (keyless, like `make serve`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from support import REPO, free_port, running_server

from hero_service.config import Settings

README = (REPO / "README.md").read_text()


def block_after(heading: str, lang: str, nth: int = 0) -> str:
    section = README.split(heading, 1)[1]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)[nth]


@pytest.fixture(scope="module")
def keyless_server():
    with running_server("--verifier-workers", "1") as srv:
        yield srv


def test_python_example_prints_what_the_readme_shows(keyless_server):
    code = block_after("## Score from Python", "python").replace(
        "http://127.0.0.1:8000", keyless_server.url)
    shown = block_after("## Score from Python", "text")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example_returns_what_the_readme_shows(keyless_server):
    command = block_after("## Score from the shell", "bash").replace(
        "http://127.0.0.1:8000", keyless_server.url)
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["groups"][0]
    shown = block_after("## Score from the shell", "json")
    for key in ("verifier_status", "rm_scores", "normalized", "rewards", "advantages"):
        values = json.loads(re.search(rf'"{key}":\s*(\[[^\]]*\])', shown).group(1))
        if isinstance(values[0], str):
            assert got[key] == values
        else:
            assert got[key] == pytest.approx(values, abs=2e-3), key
    assert got["weight"] == pytest.approx(1.7)


def test_every_setting_is_documented():
    for name in Settings.model_fields:
        assert f"`HERO_{name.upper()}`" in README, name
        assert f"`--{name.replace('_', '-')}`" in README, name


def test_the_two_commands_exist():
    makefile = (REPO / "Makefile").read_text()
    assert "make serve" in README and "make test" in README
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()


def make_serve(*variables: str, dry_run: bool) -> list[str]:
    # -o: the installed-stamp counts as up to date, so the test never reinstalls the venv
    return ["make", "-s", "-C", str(REPO), *(["-n"] if dry_run else []),
            "-o", ".venv/.server-installed", "-o", ".venv/bin/python", "serve", *variables]


def test_make_serve_on_the_network_as_the_readme_shows_it_passes_the_key_unprinted():
    # The README's command, with a recognisable key in place of the file's path.
    (line,) = [x for x in block_after("## Two commands", "bash", 1).splitlines()
               if x.startswith("make serve HOST=0.0.0.0")]
    words = line.split("#", 1)[0].split()[2:]
    assert "HOST=0.0.0.0" in words and any(w.startswith("API_KEY_FILE=") for w in words)
    secret = "s3cret-key-that-must-not-be-echoed"
    for key_var in (f"API_KEY={secret}", f"API_KEY_FILE=/run/{secret}"):
        variables = [w for w in words if not w.startswith("API_KEY")] + [key_var]
        shown = subprocess.run(make_serve(*variables, dry_run=True), capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "hero-rewards serve --host 0.0.0.0" in shown.stdout
        assert secret not in shown.stdout + shown.stderr


@pytest.mark.parametrize("variable", ["API_KEY", "API_KEY_FILE"])
def test_make_serve_hands_the_key_to_the_service(variable, tmp_path):
    """`make serve ... API_KEY=...` / `API_KEY_FILE=...` for real (on loopback): the service
    demands that key, and neither make nor the service's log prints it."""
    secret = "make-serve-key-4242"
    key_file = tmp_path / "hero.key"
    key_file.write_text(secret + "\n")
    value = secret if variable == "API_KEY" else str(key_file)
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "HERO_VERIFIER_WORKERS": "1"}
    env.pop("HERO_API_KEY", None)
    env.pop("HERO_API_KEY_FILE", None)
    with log.open("w") as out:
        proc = subprocess.Popen(make_serve("HOST=127.0.0.1", f"PORT={port}", f"{variable}={value}",
                                           dry_run=False),
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    body = {"groups": [{"prompt": "2+2?", "reference": "4", "responses": ["\\boxed{4}"]}]}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            pytest.fail(f"make serve not ready:\n{log.read_text()}")
        assert httpx.post(url + "/v1/rewards", json=body, timeout=60).status_code == 401
        ok = httpx.post(url + "/v1/rewards", json=body, timeout=60,
                        headers={"Authorization": f"Bearer {secret}"})
        assert ok.status_code == 200, ok.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert secret not in log.read_text()
