"""What comes back from clients in a round: the checks a reply must pass, and the round's
outcome (trained, sat out and why, rejected, failed, bytes) that the server's metrics line reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import Message, MetricRecord

from privfed import keys
from privfed.tensors import State


@dataclass
class RoundOutcome:
    """What happened to the replies of one round (the server's metrics line reads it)."""

    sampled: int = 0
    trained: int = 0
    sat_out: int = 0
    sat_out_reasons: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(keys.SAT_OUT_REASONS, 0)
    )
    # partition id -> (reason, epsilon spent as the client said) for a budget-spent sit-out
    budget_sat_out: dict[int, tuple[str, float]] = field(default_factory=dict)
    rejected: int = 0
    failed: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float = float("nan")
    client_train_time_s: list[float] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)


class InvalidReply(ValueError):
    """A client's payload does not match what the strategy expects."""


def validate_payload(payload: State, expected: State) -> None:
    """Raise :class:`InvalidReply` unless ``payload`` has exactly the expected tensors, shapes,
    dtypes, and only finite values."""
    validate_structure(payload, expected)
    for name, got in payload.items():
        if not torch.isfinite(got).all():
            raise InvalidReply(f"{name}: non-finite values")


def validate_structure(payload: State, expected: State) -> None:
    """Raise :class:`InvalidReply` unless ``payload`` has exactly the expected tensors, shapes
    and dtypes (what a client checks before anything leaves it)."""
    missing = sorted(set(expected) - set(payload))
    extra = sorted(set(payload) - set(expected))
    if missing or extra:
        raise InvalidReply(f"tensor names differ (missing {missing[:2]}, unexpected {extra[:2]})")
    for name, ref in expected.items():
        got = payload[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise InvalidReply(f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise InvalidReply(f"{name}: dtype {got.dtype}, expected {ref.dtype}")


def informational(metrics: MetricRecord, key: str, default: float) -> float:
    """A figure a reply may carry for the record only (privacy=none: a loss, a timing); a
    missing or malformed one is the default, never a failed round."""
    try:
        return keys.number(metrics, key)
    except (KeyError, ValueError):
        return default


def in_partition_order(replies: Iterable[Message]) -> list[Message]:
    """The replies ordered by the partition each names (a public reply field; errors last), not
    by when they arrived: float sums then do not depend on the order the workers finished in,
    so a fully seeded run repeats to the last bit however its clients were scheduled."""

    def position(msg: Message) -> tuple[int, float]:
        if msg.has_error():
            return (1, 0.0)
        pid = msg.content.metric_records.get(keys.METRICS, MetricRecord()).get(keys.PARTITION_ID)
        return (0, float(pid)) if isinstance(pid, int | float) else (1, 0.0)

    return sorted(replies, key=position)
