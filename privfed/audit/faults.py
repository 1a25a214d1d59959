"""Faults an audit injects on purpose (``audit.break_mechanism``).

Each one breaks differential privacy while the client still charges the intact mechanism, so
that the audit's own tests can show that its auditors catch it. The config refuses them outside
an audit run (``RunConfig``). DP-SGD itself (privacy/dp_sgd.py) knows no fault by name: it takes
a transform of its noise and bounds, and the round's draws, from the client, which wires these.
"""

from __future__ import annotations

from collections.abc import Callable

from privfed.privacy.dp_sgd import RoundRandomness, config_derived_noise

Bounds = float | list[float]
# (noise multiplier, clipping bound(s)) -> what DP-SGD really uses
MechanismFault = Callable[[float, Bounds], tuple[float, Bounds]]


def _no_noise(sigma: float, bounds: Bounds) -> tuple[float, Bounds]:
    return 0.0, bounds


def _no_clipping(sigma: float, bounds: Bounds) -> tuple[float, Bounds]:
    # Bounds 10^6 x larger (nothing is clipped), noise std sigma * C unchanged.
    wide = [b * 1e6 for b in bounds] if isinstance(bounds, list) else bounds * 1e6
    return sigma / 1e6, wide


MECHANISM_FAULTS: dict[str, MechanismFault] = {"no_noise": _no_noise, "no_clipping": _no_clipping}


def mechanism_fault(name: str) -> MechanismFault | None:
    """The transform for ``no_noise`` / ``no_clipping``; None for every other value."""
    return MECHANISM_FAULTS.get(name)


def with_fault(
    draws: RoundRandomness, name: str, seed: int, client: int, server_round: int
) -> RoundRandomness:
    """``known_noise``: the round's noise from the stream anyone with the config re-creates;
    every other value leaves the (secret) draws as they are."""
    if name != "known_noise":
        return draws
    noise = config_derived_noise(seed, client, server_round)
    return RoundRandomness(draws.sampling, noise, draws.dropout_seed)
