"""Figures from the reliability tests, written to docs/reliability.md at the end of the run, so
the published table is the tests' own output."""

from __future__ import annotations

import datetime
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import REPO

REPORT = REPO / "docs" / "reliability.md"


@dataclass
class Figure:
    area: str
    measure: str
    value: str
    test: str


class Figures:
    def __init__(self) -> None:
        self.rows: list[Figure] = []

    def record(self, area: str, measure: str, value: object, test: str) -> None:
        if isinstance(value, float):
            value = f"{value:.3g}"
        self.rows.append(Figure(area, measure, str(value), test))


_FIGURES = Figures()


@pytest.fixture
def figures(request) -> Iterator[Figures]:
    class Bound:
        def record(self, area: str, measure: str, value: object) -> None:
            _FIGURES.record(area, measure, value, request.node.name)

    yield Bound()  # type: ignore[misc]


def pytest_sessionfinish(session, exitstatus) -> None:
    # Only a run of the whole reliability suite rewrites the report; a partial run (one file,
    # -k) would otherwise replace the table with a few rows.
    here = Path(__file__).resolve().parent
    ran = {Path(str(item.fspath)).resolve() for item in session.items}
    if not _FIGURES.rows or not set(here.glob("test_*.py")) <= ran:
        return
    lines = [
        "# Reliability figures",
        "",
        "Written by the reliability tests (`tests/reliability/`) at the end of their run — not by "
        "hand. Every row is a measurement taken against real service processes on loopback.",
        "",
        f"Last run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
        f"{platform.machine()}, Python {platform.python_version()}, pytest exit status "
        f"{int(exitstatus)}.",
        "",
        "| area | measure | value | test |",
        "|---|---|---|---|",
    ]
    lines += [f"| {f.area} | {f.measure} | {f.value} | `{f.test}` |" for f in _FIGURES.rows]
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")
