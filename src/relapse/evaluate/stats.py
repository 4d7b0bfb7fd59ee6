"""Rates with honest uncertainty."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial rate (well-behaved at 0 and 1, unlike the Wald one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(flags: list[bool]) -> dict[str, object]:
    n, k = len(flags), int(sum(flags))
    low, high = wilson_interval(k, n)
    return {"rate": k / n if n else float("nan"), "ci95": [round(low, 4), round(high, 4)], "n": n, "k": k}
