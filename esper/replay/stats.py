"""Means with 95 % Student-t intervals, for comparisons over seeds (policy §9). No scipy needed."""

import math
from typing import Sequence

# Two-sided 95 % critical values of Student's t for 1..30 degrees of freedom.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_T95_LARGE = ((40, 2.021), (60, 2.000), (120, 1.980))


def t95(df: int) -> float:
    if df < 1:
        raise ValueError("a t interval needs at least two values")
    if df <= len(_T95):
        return _T95[df - 1]
    for limit, value in _T95_LARGE:
        if df <= limit:
            return value
    return 1.960


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % t interval); the half-width is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t95(n - 1) * math.sqrt(variance / n)
