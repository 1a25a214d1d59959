"""The one-run audit's bound (Steinke, Nasr, Jagielski 2023) on mechanisms whose true epsilon is
known: never above it, and not far below."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from privfed.audit.bound import audit, epsilon_lower_bound, p_value


def gaussian_mechanism_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism, sensitivity 1 (Balle and Wang 2018, Thm. 8)."""

    def gap(eps: float) -> float:
        return (
            stats.norm.cdf(0.5 / sigma - eps * sigma)
            - math.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma)
            - delta
        )

    return optimize.brentq(gap, 0.0, 100.0)


def paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Appendix D of the paper, loop for loop (the reference for our vectorised version)."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize(
    "m,r,v,eps,delta",
    [(1000, 100, 80, 1.0, 1e-5), (1000, 1000, 600, 0.3, 1e-5), (50, 20, 20, 3.0, 0.0)],
)
def test_p_value_equals_the_papers_algorithm(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(paper_p_value(m, r, v, eps, delta))


def test_the_bound_is_where_the_p_value_crosses_one_minus_confidence():
    eps = epsilon_lower_bound(1000, 200, 160, 1e-5, 0.95)
    assert p_value(1000, 200, 160, eps, 1e-5) < 0.05 <= p_value(1000, 200, 160, eps + 1e-3, 1e-5)


def test_chance_guessing_gives_no_evidence():
    rng = np.random.default_rng(1)
    included = rng.random(2000) < 0.5
    assert audit(rng.normal(size=2000), included, 1e-5).epsilon_lower < 0.3


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_gaussian_mechanism_lower_bound_is_below_and_near_the_true_epsilon(sigma):
    """Each canary's inclusion (0 or 1) released once through N(0, sigma^2): m parallel Gaussian
    mechanisms, each (eps, delta)-DP with respect to its own canary."""
    delta, m = 1e-5, 10_000
    true_eps = gaussian_mechanism_epsilon(sigma, delta)
    lowers = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        included = rng.random(m) < 0.5
        lowers.append(audit(included + rng.normal(0, sigma, m), included, delta).epsilon_lower)
    assert max(lowers) <= true_eps
    # One-run audits are loose for the Gaussian mechanism (the paper's Fig. 2); within 2.5x here.
    assert min(lowers) >= 0.4 * true_eps, (lowers, true_eps)


def test_a_mechanism_without_noise_is_caught_at_small_epsilon():
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    result = audit(included.astype(float), included, 1e-5)
    assert result.correct == result.guesses and result.epsilon_lower > 4.0


@pytest.mark.parametrize(
    "args", [(10, 5, 6, 1.0, 0.0), (10, 11, 5, 1.0, 0.0), (10, 5, 5, -1.0, 0.0)]
)
def test_invalid_counts_are_refused(args):
    with pytest.raises(ValueError):
        p_value(*args)
