"""Rates and means with honest uncertainty."""

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


def mean_ci(values, z: float = 1.959964) -> dict[str, object]:
    """Mean, sample standard deviation and a normal-approximation 95% interval (mean +- z sd / sqrt(n))
    of per-image scores. With fewer than two values the spread is unknown: sd and the interval are NaN."""
    xs = [float(v) for v in values]
    n = len(xs)
    mean = math.fsum(xs) / n if n else float("nan")
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    half = z * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": round(mean, 4), "sd": round(sd, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)], "n": n}


def t_within(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom, in closed form (Abramowitz and Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        for k in range(2, df, 2):
            term *= c2 * (k - 1) / k
            total += term
        return math.sin(theta) * total
    total = 0.0 if df == 1 else 1.0  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + ... up to cos^(df-3)))
    for k in range(3, df - 1, 2):
        term *= c2 * (k - 1) / k
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_quantile(df: int, level: float = 0.95) -> float:
    """The t with P(|T| <= t) = ``level``, by bisection on :func:`t_within` (no scipy here)."""
    low, high = 0.0, 1e3
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_within(mid, df) < level else (low, mid)
    return (low + high) / 2


def seed_interval(values) -> dict[str, object]:
    """Mean over runs (seeds, alignments) with its Student-t 95% interval: the spread between runs, which an interval
    over pooled images would hide. NaN interval below two runs."""
    xs = [float(v) for v in values]
    n = len(xs)
    mean = math.fsum(xs) / n
    half = t_quantile(n - 1) * math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def rank_correlation(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank), by torchmetrics; None below 3 pairs or
    when either side is constant (no ranking to compare)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    import torch
    from torchmetrics.functional import spearman_corrcoef

    return float(spearman_corrcoef(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))
