"""Communication cost measured from the serialized Flower messages, not estimated."""

from __future__ import annotations

from flwr.app import RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def serialized_size(content: RecordDict) -> int:
    """Bytes of every object Flower serializes and pushes for this message content."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
