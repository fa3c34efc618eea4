"""The client installs from a clone into a trainer's environment without the server extra.

SLOW AND USES THE PACKAGE INDEX (about 30 s here; pip's cache makes reruns faster): a plain
``python -m venv`` (no system site-packages), then the README's install line with a copy of this
repository as the path. pip builds the wheel from the copy and takes the core dependencies
(httpx, pydantic, tqdm) from the index; nothing of the server extra may arrive. The bare client
then scores a group against a real service.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

from hero_client import HeroClient

SERVER_ONLY_MODULES = ("torch", "fastapi", "uvicorn", "transformers", "math_verify")
PLACEHOLDER = "/path/to/hero-rewards"


def readme_install_line() -> str:
    section = (REPO / "README.md").read_text().split("## Install the client", 1)[1]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    (line,) = [x for x in block.splitlines() if x.strip()]
    return line


def copy_of_the_repo(dest: Path) -> Path:
    """What a clone holds for the build (the working tree, not .venv or build outputs)."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for tree in ("clients", "service"):
        shutil.copytree(REPO / tree, dest / tree, ignore=skip)
    return dest


def test_client_installs_from_a_clone_into_a_bare_venv_without_the_server_extra(server, tmp_path):
    line = readme_install_line()
    assert line == f"pip install {PLACEHOLDER}", line  # the README's line, used as written below
    src = copy_of_the_repo(tmp_path / "hero-rewards")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)

    install = subprocess.run(["bash", "-c", line.replace(PLACEHOLDER, str(src))],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    python = str(bin_dir / "python")
    probe = subprocess.run([python, "-c", f"""
import importlib.util, json, sys
import hero_client, hero_client.cli, hero_client.adapters.trl, hero_client.adapters.verl
import hero_client.adapters.openrlhf
from hero_client import HeroClient
with HeroClient({server.url!r}, api_key="test-key") as client:
    result = client.score([{{"prompt": "What is 2+2?", "reference": "4",
                             "responses": ["\\\\boxed{{4}}", "\\\\boxed{{5}}"]}}], sigma_ref=0.1)
print(json.dumps({{
    "server_only": [m for m in {SERVER_ONLY_MODULES!r} if importlib.util.find_spec(m)],
    "hero_client": hero_client.__file__,
    "no_system_site": sys.prefix != sys.base_prefix and not any(
        p.startswith(sys.base_prefix) and "site-packages" in p for p in sys.path),
    "rewards": result.groups[0].rewards}}))
"""], capture_output=True, text=True, timeout=120, env=env)
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout)
    assert got["server_only"] == []  # the trainer's environment stays free of the server's deps
    assert got["hero_client"].startswith(str(venv))  # the installed copy, not this checkout
    assert got["no_system_site"]
    with HeroClient(server.url, api_key="test-key") as client:
        here = client.score([{"prompt": "What is 2+2?", "reference": "4",
                              "responses": ["\\boxed{4}", "\\boxed{5}"]}], sigma_ref=0.1)
    assert got["rewards"] == pytest.approx(here.groups[0].rewards)

    version = subprocess.run([str(bin_dir / "hero-rewards"), "--version"], capture_output=True,
                             text=True, timeout=60, env=env)
    assert version.returncode == 0 and version.stdout.startswith("hero-rewards "), version.stderr
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{version.stdout.split()[1]}"' in pyproject

    serve = subprocess.run([str(bin_dir / "hero-rewards"), "serve"], capture_output=True,
                           text=True, timeout=60, env=env)
    assert serve.returncode == 2 and "needs the server extra" in serve.stderr
    assert "[server]" in serve.stderr and "pip install 'hero-rewards" not in serve.stderr
