"""The package's public surface is a decision, not an accident (as httpx's
tests/test_exported_members.py): ``hero_client.__all__`` is pinned, every name in it exists, and
every public name of the package is in it or is one of its public submodules. And
``__version__`` is the installed distribution's."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

from support import REPO

import hero_client

EXPORTED = [
    "__version__",
    "AsyncHeroClient",
    "ChatMessage",
    "GetRewardResponse",
    "Group",
    "GroupResult",
    "HeroAPIError",
    "HeroClient",
    "HeroConnectionError",
    "HeroError",
    "HeroParams",
    "HeroTimeoutError",
    "HeroValidationError",
    "InfoResponse",
    "RetryPolicy",
    "RewardsRequest",
    "RewardsResponse",
    "RunningSigma",
]
# Modules without a leading underscore are importable API (hero_client.schema.Group, the
# adapters); the rest (_client, _retry, ...) are internal.
PUBLIC_MODULES = {"adapters", "cli", "diagnostics", "hero", "schema", "vocabulary"}
PACKAGE_DIR = Path(hero_client.__file__).parent


def test_all_is_pinned_and_sorted():
    assert hero_client.__all__ == EXPORTED
    assert hero_client.__all__ == sorted(hero_client.__all__, key=str.casefold)


def test_every_exported_name_exists_and_is_the_packages_own():
    for name in hero_client.__all__:
        value = getattr(hero_client, name)  # AttributeError names the missing one
        if name != "__version__":
            assert value.__module__.startswith("hero_client."), (name, value.__module__)


def test_every_public_name_is_exported_or_a_public_submodule():
    for name, value in vars(hero_client).items():
        if name.startswith("_"):
            continue
        if isinstance(value, ModuleType):
            assert name in PUBLIC_MODULES, f"hero_client.{name}: a new public module?"
        else:
            assert name in hero_client.__all__, f"hero_client.{name} is public but not exported"


def test_the_public_modules_are_the_packages_modules_without_underscore():
    on_disk = {p.stem for p in PACKAGE_DIR.glob("*.py") if not p.stem.startswith("_")}
    on_disk |= {p.name for p in PACKAGE_DIR.iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    assert on_disk == PUBLIC_MODULES


def test_version_is_the_installed_distributions():
    assert hero_client.__version__ == version("hero-rewards")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{hero_client.__version__}"' in pyproject


def test_version_falls_back_when_the_distribution_is_not_installed():
    """A source tree on sys.path that pip never installed has no metadata to read."""
    probe = """
import importlib.metadata as metadata

def not_installed(name):
    raise metadata.PackageNotFoundError(name)

metadata.version = not_installed  # what a never-installed source tree finds
import hero_client
print(hero_client.__version__)
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout == "0.0.0+src\n"
