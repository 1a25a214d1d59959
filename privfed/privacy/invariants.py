"""Privacy invariants that must hold whatever the interpreter's flags: checked with ``raise``,
never ``assert`` (``python -O`` removes asserts, and with them the check)."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class PrivacyInvariantError(RuntimeError):
    """Something that would release unclipped, un-noised or unaccounted data was about to
    happen (or a reply would carry what the threat model does not allow to leave a client)."""


def required(value: T | None, what: str) -> T:
    """``value``, which DP needs here (a clipping bound, a noise multiplier): never None."""
    if value is None:
        raise PrivacyInvariantError(f"{what} is missing where differential privacy needs it")
    return value
