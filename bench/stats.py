"""Small figures shared by the benchmarks: percentiles of sorted samples, rounding that keeps
``None`` (a figure that could not be measured)."""

from __future__ import annotations

from typing import Optional


def percentile(sorted_values: list[float], p: float) -> Optional[float]:
    """The ``p``-th percentile (0-100) by linear interpolation; ``None`` without samples."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def rounded(x: Optional[float], digits: int = 4) -> Optional[float]:
    return None if x is None else round(x, digits)
