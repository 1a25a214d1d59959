"""Statistics of the strategy study (bench/strategies.py): pure functions over plain numbers.

A cell (one strategy at one epsilon) holds one final accuracy per seed. Its interval is Student's
t at 95% over the seeds. Strategies are compared with ``lora`` *paired by seed*: runs with the
same seed share the data partition and the model's initialisation, while the DP noise is fresh
in each, so the per-seed difference removes the partition's luck from the comparison. A
difference is called real when its 95% interval excludes zero (a paired t-test at 5%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # nan with fewer than 2 values: no interval
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n = {self.n})"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_interval(values: list[float] | np.ndarray, level: float = LEVEL) -> Interval:
    """Mean and Student's t interval (n - 1 degrees of freedom) of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, math.nan, math.nan, len(x))
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, len(x))


def paired_difference(
    ours: dict[int, float], baseline: dict[int, float], level: float = LEVEL
) -> Interval:
    """The interval of ours - baseline over the seeds both have (a paired comparison)."""
    seeds = sorted(set(ours) & set(baseline))
    return t_interval([ours[s] - baseline[s] for s in seeds], level)


def verdict(diff: Interval, what: str = "accuracy") -> str:
    """In words, for the report: which differences are real at 95%."""
    if diff.n < 2:
        return "too few paired runs"
    if not diff.excludes_zero():
        return "no real difference"
    return f"{'higher' if diff.mean > 0 else 'lower'} {what} (real)"


@dataclass(frozen=True)
class SignTest:
    wins: int
    losses: int  # ties (the same accuracy, e.g. both at the majority class) are left out
    p_value: float  # two-sided, exact binomial; nan with no untied pair

    def text(self) -> str:
        p = "—" if math.isnan(self.p_value) else f"{self.p_value:.3f}"
        return f"{self.wins} / {self.losses} | {p}"


def sign_test(differences: list[float] | np.ndarray) -> SignTest:
    """How often a strategy beat its paired baseline, and the exact sign test of "as often
    as not". It pools pairs across privacy levels (their differences need not share a scale,
    only be independent), which the per-cell t intervals over 3 seeds cannot. Caveat: pairs of
    one seed at different levels share that seed's partition and initialisation (only the DP
    noise is fresh), so where the partition's luck decides the sign, p is optimistic."""
    d = np.asarray(differences, dtype=np.float64)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    if wins + losses == 0:
        return SignTest(0, 0, math.nan)
    return SignTest(wins, losses, float(stats.binomtest(wins, wins + losses, 0.5).pvalue))


def sign_verdict(test: SignTest, level: float = LEVEL) -> str:
    if math.isnan(test.p_value):
        return "no untied pairs"
    if test.p_value >= 1 - level:
        return "no consistent difference"
    return f"consistently {'higher' if test.wins > test.losses else 'lower'} (real)"


def _with_spread(values: list[float] | np.ndarray) -> np.ndarray | None:
    """``values`` (one per seed) as float64, or None below 2 values or with no spread (a test
    has nothing to go on then: the values alone are the evidence)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2 or float(x.std(ddof=1)) <= 1e-12 * max(1.0, float(abs(x).max())):
        return None
    return x


def t_test_p(values: list[float] | np.ndarray, against: float = 0.0) -> float:
    """Two-sided p of Student's t-test that the mean of ``values`` is ``against`` (with the seed
    as the unit: one value per seed, or one paired difference per seed); nan below 2 values or
    with no spread (then the values alone are the evidence)."""
    x = _with_spread(values)
    if x is None:
        return math.nan
    return float(stats.ttest_1samp(x, against).pvalue)


# E[range] / sigma of n normal draws (Tippett 1925; the d2 of quality-control tables)
_D2 = {2: 1.128, 3: 1.693, 4: 2.059, 5: 2.326, 6: 2.534, 7: 2.704, 8: 2.847, 9: 2.970, 10: 3.078}


def sd_from_range(low: float, high: float, n: int) -> float:
    """The standard deviation of ``n`` normal draws estimated from their range (min, max): what
    a baseline that reports only its mean and min-max over n seeds says of its spread."""
    if n not in _D2:
        raise ValueError(f"no range constant for n = {n} (2..10)")
    return (high - low) / _D2[n]


def welch_p(values: list[float] | np.ndarray, mean: float, sd: float, n: int) -> float:
    """Two-sided p of Welch's t-test between ``values`` (one per seed) and a baseline known by
    its mean, standard deviation and number of seeds: the baseline's own seed-to-seed spread
    counts, where a one-sample test against its mean would take that mean as exact. nan as
    :func:`t_test_p`."""
    x = _with_spread(values)
    if x is None:
        return math.nan
    result = stats.ttest_ind_from_stats(
        float(x.mean()), float(x.std(ddof=1)), len(x), mean, sd, n, equal_var=False
    )
    return float(result.pvalue)


def welch_margin(values: list[float] | np.ndarray, sd: float, n: int, alpha: float) -> float:
    """The smallest difference of means that :func:`welch_p` would call real at two-sided
    level ``alpha``, given ``values``' spread and count and the baseline's ``sd`` and ``n``
    (Welch's t and its degrees of freedom do not depend on the means); with ``sd`` = 0 and
    ``n`` = 0, that of :func:`t_test_p` against an exact mean. nan as :func:`t_test_p`."""
    x = _with_spread(values)
    if x is None:
        return math.nan
    ours = float(x.var(ddof=1)) / len(x)
    theirs = sd**2 / n if n else 0.0
    df = (ours + theirs) ** 2 / (ours**2 / (len(x) - 1) + (theirs**2 / (n - 1) if n else 0.0))
    return float(stats.t.isf(alpha / 2, df) * math.sqrt(ours + theirs))


def holm(p_values: dict, level: float = LEVEL) -> dict:
    """Holm's step-down adjustment of a family of p values (nan ones are left out): each
    adjusted p is compared with 1 - level directly, and the family-wise error rate stays at most
    1 - level whatever the dependence between the tests."""
    ranked = sorted((p, k) for k, p in p_values.items() if not math.isnan(p))
    m, adjusted, running = len(ranked), {}, 0.0
    for i, (p, k) in enumerate(ranked):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[k] = running
    return {k: adjusted.get(k, math.nan) for k in p_values}
