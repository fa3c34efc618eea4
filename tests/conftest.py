from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import DEV_DATA, ServerProcess, load_dev_rows


@pytest.fixture(scope="session")
def dev_rows() -> list[dict]:
    if not DEV_DATA.exists():
        pytest.fail(f"dev data not found at {DEV_DATA} (set HERO_DEV_DATA)")
    return load_dev_rows()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One real service (embedded MiniLM RM + math verifier pool) for the API tests."""
    with ServerProcess(["--verifier-workers", "2", "--api-key", "test-key"]) as proc:
        yield proc


@pytest.fixture(scope="session")
def auth() -> dict[str, str]:
    return {"Authorization": "Bearer test-key"}


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The in-process tests (``pytest.mark.anyio``) run on asyncio, the service's own loop.
    Session scope, so a module-scoped async fixture (one started app for a module's tests) may
    depend on it."""
    return "asyncio"
