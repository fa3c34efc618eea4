"""Reading a service's Prometheus ``/metrics`` text: the counters the benchmarks take deltas
of."""

from __future__ import annotations

import re

_VALUE = r"([0-9.eE+-]+)"


def total(text: str, name: str) -> float:
    """The sum of every sample of ``name``, whatever its labels (0.0 when absent)."""
    pattern = rf"^{name}(?:{{[^}}]*}})? {_VALUE}$"
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    """The samples of ``name`` whose only label is ``label``, by that label's value."""
    pattern = rf'^{name}\{{{label}="([^"]+)"\}} {_VALUE}$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def unlabelled(text: str, name: str) -> float:
    """The one unlabelled sample of ``name`` (0.0 when absent)."""
    found = re.search(rf"^{name} {_VALUE}$", text, re.M)
    return float(found.group(1)) if found else 0.0
