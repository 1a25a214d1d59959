"""The one-run audit's statistics (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1)
Training Run", Theorem 3.1 and Appendix D), computed exactly.

m canaries are each included independently with probability 1/2. The auditor guesses "in" or
"out" for r of them (abstaining on the rest) and gets v right. If the mechanism is (eps, delta)-DP
with respect to every canary, then

    P[v or more right] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta * alpha,

with alpha the paper's correction for delta > 0. The largest eps whose p-value is still below
1 - confidence is a lower bound on the mechanism's true eps at that confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v right out of r guesses] for an (epsilon, delta)-DP mechanism (the paper's bound)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0:
        return min(beta, 1.0)
    # alpha = max_i P[v > Binomial(r, q) >= v - i] / i, over i = 1 .. v
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ...
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float, tol: float = 1e-6
) -> float:
    """The largest epsilon with ``p_value < 1 - confidence`` (0 if even epsilon = 0 is not
    rejected): the mechanism is not (epsilon, delta)-DP, with that confidence."""
    alpha = 1.0 - confidence
    if not 0 < alpha < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return math.inf  # v = r = m on a huge m: no finite epsilon explains it
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditResult:
    epsilon_lower: float  # at ``confidence``, after the correction for trying several guess counts
    confidence: float
    canaries: int  # m
    guesses: int  # r of the best guess count
    correct: int  # v of it
    guess_counts: tuple[int, ...]  # tried (each at confidence 1 - (1 - confidence) / len)


def audit(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guess_fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
) -> AuditResult:
    """Guess "in" for the k highest scores and "out" for the k lowest (abstain on the rest), for
    each k in ``guess_fractions`` of m/2; take the best lower bound. Trying several k is paid for
    with a Bonferroni correction (each k at 1 - (1 - confidence)/len), so the result holds at
    ``confidence`` as stated."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError("scores and included must be 1-d and of the same length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite")
    m = len(scores)
    order = np.argsort(scores, kind="stable")  # ascending: the lowest look "out"
    counts = tuple(sorted({max(1, int(f * (m // 2))) for f in guess_fractions if m >= 2}))
    each = 1.0 - (1.0 - confidence) / max(1, len(counts))
    best: AuditResult | None = None
    for k in counts:  # ties (all zero) keep the largest k, the most informative count
        right = int(included[order[-k:]].sum()) + int((~included[order[:k]]).sum())
        eps = epsilon_lower_bound(m, 2 * k, right, delta, each)
        if best is None or eps >= best.epsilon_lower:
            best = AuditResult(eps, confidence, m, 2 * k, right, counts)
    return best if best is not None else AuditResult(0.0, confidence, m, 0, 0, counts)
