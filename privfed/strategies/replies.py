"""What comes back from clients in a round: the checks a reply must pass, and the round's
outcome (trained, sat out and why, rejected, failed, bytes) that the server's metrics line reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import Message, MetricRecord

from privfed import keys
from privfed.telemetry.bytes import serialized_size
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


class ReplyIntake:
    """A round's replies read as they arrive: each one's size and its parsed payload (or why it
    is rejected), so that the server does this while the clients still train, not after the
    last reply with every worker idle (at 100 clients a round on MiniLM, ~2 ms a reply).

    Reading is all a reply's checks that need nothing but the reply and the round's broadcast
    state, which does not change until the round is aggregated; the aggregation then takes
    what was read, in partition order, and reads a reply itself if it was not read yet. One
    intake per round: it holds the round's payloads until the aggregation takes them."""

    def __init__(self, parse: Callable[[Message], tuple[State, int]]) -> None:
        self._parse = parse
        # by the reply object's id, the object kept in the entry so that its id cannot be
        # reused while the entry lives: a message id is what a sender says, and two replies
        # claiming one must not share a reading
        self._read: dict[int, tuple[Message, int, tuple[State, int] | InvalidReply | None]] = {}

    def read(self, msg: Message) -> None:
        """Read a reply now (an error reply has nothing to read)."""
        if not msg.has_error():
            self._reading(msg)

    def _reading(
        self, msg: Message
    ) -> tuple[Message, int, tuple[State, int] | InvalidReply | None]:
        entry = self._read.get(id(msg))
        if entry is None:
            parsed: tuple[State, int] | InvalidReply | None = None  # None: a sit-out
            metrics = msg.content.metric_records.get(keys.METRICS, MetricRecord())
            if not metrics.get(keys.SAT_OUT, 0):
                try:
                    parsed = self._parse(msg)
                except InvalidReply as err:
                    parsed = err
            entry = (msg, serialized_size(msg.content), parsed)
            self._read[id(msg)] = entry
        return entry

    def size(self, msg: Message) -> int:
        """The bytes of a reply's content (Flower's count, telemetry/bytes.py)."""
        return self._reading(msg)[1]

    def parsed(self, msg: Message) -> tuple[State, int]:
        """A reply's payload and example count, taken out of the intake; raises
        :class:`InvalidReply` as parsing did."""
        parsed = self._reading(msg)[2]
        del self._read[id(msg)]
        if isinstance(parsed, InvalidReply):
            raise parsed
        if parsed is None:
            raise InvalidReply("a sit-out has no payload")
        return parsed
