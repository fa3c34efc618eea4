"""Targets of the benchmarks: a measured figure against a threshold, PASS or MISS, and the
table lines that show them."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Optional

from stats import rounded

Comparison = Callable[[float, float], bool]
AT_LEAST: Comparison = operator.ge
BELOW: Comparison = operator.lt
AT_MOST: Comparison = operator.le


def target(name: str, measured: Optional[float], threshold: float, rule: str,
           passes: Comparison = AT_LEAST) -> dict[str, Any]:
    """One target as the results JSON keeps it; unmeasured (``None``) never passes."""
    ok = measured is not None and passes(measured, threshold)
    return {"target": name, "measured": rounded(measured, 3), "threshold": threshold,
            "rule": rule, "pass": bool(ok)}


def target_lines(targets: list[dict[str, Any]], name_width: int, value_width: int) -> list[str]:
    lines = ["targets:"]
    for t in targets:
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        lines.append(f"  {'PASS' if t['pass'] else 'MISS'}  {t['target']:<{name_width}} "
                     f"{measured:>{value_width}}  ({t['rule']})")
    return lines
