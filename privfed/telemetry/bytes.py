"""Communication cost measured from the serialized Flower messages, not estimated."""

from __future__ import annotations

from flwr.app import RecordDict
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)


def serialized_size(*contents: RecordDict) -> int:
    """Bytes of every object Flower serializes and pushes for these message contents, each
    message counted with all its objects (what it shares with another is pushed with each).

    Flower recomputes an object's id (a SHA-256 of its serialization, and so of all its
    children's) at every access unless told not to; nothing here changes the objects, so each
    id is computed once, and each record is measured once: a broadcast's arrays, one record in
    every message of a round, are hashed and measured once, not once per client."""
    records: dict[str, dict[str, int]] = {}  # record id -> its nested objects' ids and sizes
    total = 0
    with no_object_id_recompute():
        for content in contents:
            objects = {content.object_id: len(content.deflate())}
            for record_id, record in content.children.items():
                if record_id not in records:
                    nested = get_all_nested_objects(record)
                    records[record_id] = {i: len(o.deflate()) for i, o in nested.items()}
                objects.update(records[record_id])  # by id: one copy of an object per message
            total += sum(objects.values())
    return total
