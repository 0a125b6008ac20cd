"""Statistics of a study over seeds: mean and sample standard deviation, Student's t quantile (no scipy),
and the paired difference of two methods over the seeds both have, with its confidence interval."""

from __future__ import annotations

import math
from dataclasses import dataclass


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1); ``(None, None)`` for no values, std None for one."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` > 0 degrees of freedom (bisection on ``t_cdf``, to
    ~1e-12 relative)."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    if p == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


@dataclass(frozen=True)
class Paired:
    """``a − b`` over the seeds both have: ``n`` pairs, mean difference, sample std of the differences, and
    the ``level`` confidence interval (``low``, ``high``; None for n < 2)."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None
    level: float = 0.95

    @property
    def verdict(self) -> str:
        """ "better" (interval above 0: ``a`` beats ``b``), "worse" (below 0), "tied" (contains 0), or why
        there is none ("no pairs", "n=1: no interval")."""
        if self.n == 0:
            return "no pairs"
        if self.low is None:
            return f"n={self.n}: no interval"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "tied"


def paired_difference(a: dict, b: dict, level: float = 0.95) -> Paired:
    """``a − b`` paired by key (seed), over the keys both have with a value (not None)."""
    keys = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    diffs = [a[k] - b[k] for k in keys]
    mean, std = mean_std(diffs)
    if len(diffs) < 2:
        return Paired(len(diffs), mean, None, None, None, level)
    half = t_quantile(1 - (1 - level) / 2, len(diffs) - 1) * std / math.sqrt(len(diffs))
    return Paired(len(diffs), mean, std, mean - half, mean + half, level)
