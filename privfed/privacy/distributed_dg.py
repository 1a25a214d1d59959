"""The distributed discrete Gaussian mechanism (DDG; Kairouz, Liu, Steinke, ICML 2021): what a
device does to its update so that, under secure aggregation, the server learns only a noised sum,
and what that sum costs in privacy.

Issue 34's building block, pure and tensor-level (no Flower, no round): the secure-aggregation
protocol that carries these vectors, and the ``privacy.user`` setting that selects them, come on
top. Everything here follows the paper and Google's reference implementation
(google-research/federated, ``distributed_dp/``), with the places where it differs said below.

A device, in order (:func:`device_share`):

1. clips its whole update to L2 norm ``clip``;
2. scales it onto the integer lattice of spacing ``gamma`` (divides by ``gamma``) and rounds each
   coordinate randomly (up with probability equal to its fractional part, so unbiased), redrawing
   the rounding until the rounded vector's norm is within ``rounded_l2_bound`` (the paper's
   conditional randomized rounding, Proposition 22: with ``beta`` > 0 one draw fails with
   probability at most ``beta``, and the sensitivity bound no longer grows with ``sqrt(dim)``
   added to the norm);
3. adds discrete Gaussian noise N_Z(0, (sigma / gamma)^2) per coordinate from its secret stream;
4. reduces the integers modulo 2^``bits`` (what secure aggregation sums).

The server's sum of the shares modulo 2^bits, read as centred integers and multiplied by
``gamma``, is the sum of the clipped updates plus the sum of the devices' noise: a discrete
Gaussian of variance ``n sigma^2`` to within the accounting's tau term. Reducing modulo 2^bits is
post-processing of the exact integer sum, so it never weakens privacy; it costs utility when the
sum leaves the ring (the choice of ``bits`` and ``gamma`` bounds how often: :func:`wraps`).

Its accounting is privacy/ddg_accounting.py (``ddg_rdp``: the noise of the devices guaranteed
to survive the round, a device cannot count on the noise of devices that may drop out) and the
event is :class:`privfed.privacy.events.DistributedDiscreteGaussianEvent`.

No random rotation yet (the reference implementation flattens the vector with a randomized
Hadamard transform before rounding): it changes how often the sum wraps, not the guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from privfed.privacy.ddg_accounting import rounded_l2_bound
from privfed.privacy.invariants import PrivacyInvariantError
from privfed.randomness import RandomStream

MAX_ROUNDING_DRAWS = 1000  # conditional rounding: far beyond what any beta < 1 needs


# -- the device's side ---------------------------------------------------------------------------
def discrete_gaussian(sigma: float, n: int, stream: RandomStream) -> torch.Tensor:
    """``n`` independent draws of the discrete Gaussian N_Z(0, sigma^2) (int64): the
    distribution on the integers with P(x) proportional to exp(-x^2 / (2 sigma^2)).

    Canonne, Kamath and Steinke (2020), Algorithm 3, vectorised: a discrete Laplace proposal of
    scale t = floor(sigma) + 1 (the difference of two geometric variables), accepted with
    probability exp(-(|y| - sigma^2 / t)^2 / (2 sigma^2)). The acceptance test and the geometric
    variables use float64 arithmetic on 53-bit uniforms from ``stream``, as the reference
    implementation does in TensorFlow, not the paper's exact rational arithmetic.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"discrete_gaussian: sigma must be positive and finite, got {sigma}")
    t = math.floor(sigma) + 1
    out = torch.empty(0, dtype=torch.int64)
    while out.numel() < n:
        m = 2 * (n - out.numel()) + 16  # acceptance is above 1/2 for every sigma
        u = 1.0 - stream.uniform((3, m))  # in (0, 1]
        # geometric on {0, 1, ...} with P(G >= k) = exp(-k / t)
        g1 = torch.floor(-t * torch.log(u[0]))
        g2 = torch.floor(-t * torch.log(u[1]))
        y = g1 - g2
        accept = u[2] <= torch.exp(-((y.abs() - sigma**2 / t) ** 2) / (2 * sigma**2))
        out = torch.cat([out, y[accept].to(torch.int64)])
    return out[:n]


def conditional_round(x: torch.Tensor, bound: float, stream: RandomStream) -> torch.Tensor:
    """``x`` (float64, on the lattice's scale) rounded randomly to integers (down or up, up with
    probability equal to the fractional part), redrawn until the L2 norm is at most ``bound``."""
    low = torch.floor(x)
    frac = x - low
    for _ in range(MAX_ROUNDING_DRAWS):
        rounded = low + (stream.uniform(x.shape) < frac).to(x.dtype)
        if float(torch.linalg.vector_norm(rounded)) <= bound:
            return rounded.to(torch.int64)
    raise PrivacyInvariantError(
        f"conditional rounding: no draw within the norm bound {bound:.6g} in "
        f"{MAX_ROUNDING_DRAWS} tries (the bound assumes the input was clipped)"
    )


def clip_l2(x: torch.Tensor, clip: float) -> torch.Tensor:
    """``x`` scaled down to L2 norm ``clip`` if it is longer (float64)."""
    x = x.to(torch.float64)
    norm = float(torch.linalg.vector_norm(x))
    return x * min(1.0, clip / norm) if norm > 0 else x


def device_share(
    update: torch.Tensor,
    clip: float,
    gamma: float,
    sigma: float,
    beta: float,
    bits: int,
    rounding: RandomStream,
    noise: RandomStream,
) -> torch.Tensor:
    """A device's vector for secure aggregation (int64 in [0, 2^bits)): ``update`` flattened,
    clipped to ``clip``, on the lattice of spacing ``gamma`` by conditional randomized rounding,
    plus its discrete Gaussian share N_Z(0, (sigma / gamma)^2), modulo 2^bits. ``rounding`` and
    ``noise``: secret streams, fresh for this release."""
    x = clip_l2(update.flatten(), clip) / gamma
    dim = x.numel()
    rounded = conditional_round(x, rounded_l2_bound(clip / gamma, dim, beta), rounding)
    noised = rounded + discrete_gaussian(sigma / gamma, dim, noise)
    return torch.remainder(noised, 2**bits)


def ring_sum(shares: Sequence[torch.Tensor], bits: int) -> torch.Tensor:
    """What secure aggregation reveals: the shares' sum modulo 2^bits."""
    total = torch.zeros_like(shares[0])
    for share in shares:
        total = torch.remainder(total + share, 2**bits)
    return total


def decode(total: torch.Tensor, gamma: float, bits: int) -> torch.Tensor:
    """The server's estimate of the sum of updates (float64): the ring sum read as integers in
    [-2^(bits-1), 2^(bits-1)), times ``gamma``."""
    half = 2 ** (bits - 1)
    centred = torch.remainder(total + half, 2**bits) - half
    return centred.to(torch.float64) * gamma


def wraps(total_integer: torch.Tensor, bits: int) -> int:
    """How many coordinates of the exact integer sum lie outside [-2^(bits-1), 2^(bits-1)):
    those the ring reduction changes (utility, never privacy)."""
    half = 2 ** (bits - 1)
    return int(((total_integer < -half) | (total_integer >= half)).sum())
