"""The README's examples run as written against a live service (keyless, like `make serve`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from hero_service.config import Settings
from support import REPO, running_server

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
