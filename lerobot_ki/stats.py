"""Small statistics shared by the experiment reports (main job, ki_ablation)."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sensible at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def format_successes(successes: int, n: int) -> str:
    """ "k/n [lo%, hi%]": the count with its 95% Wilson interval ("0/0" when nothing was run)."""
    if n == 0:
        return "0/0"
    lo, hi = wilson_interval(successes, n)
    return f"{successes}/{n} [{lo:.0%}, {hi:.0%}]"
