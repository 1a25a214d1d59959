"""privfed/telemetry/bytes.py: the bytes Flower pushes per message, measured once per shared
record, equal to Flower's own objects counted message by message."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from privfed.telemetry.bytes import serialized_size


def flowers_count(content: RecordDict) -> int:
    """Every object Flower serializes for one message, each once (by its object id)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def test_many_messages_sharing_a_broadcast_count_as_each_on_its_own():
    state = {"a": torch.randn(8, 16), "zeros_1": torch.zeros(4, 4), "zeros_2": torch.zeros(4, 4)}
    broadcast = ArrayRecord(state)  # one record in every message, as a round sends it
    messages = [
        RecordDict({"arrays": broadcast, "config": ConfigRecord({"round": 1, "node": "x" * i})})
        for i in range(5)
    ]
    # two records of one message with an identical array: Flower pushes that array once
    twin = RecordDict(
        {"x": ArrayRecord({"z": torch.zeros(4, 4)}), "y": ArrayRecord({"z": torch.zeros(4, 4)})}
    )
    reply = RecordDict(
        {"arrays": ArrayRecord({"b": torch.randn(3)}), "metrics": MetricRecord({"n": 3})}
    )
    contents = [*messages, twin, reply]
    expected = [flowers_count(c) for c in contents]
    assert len(set(expected[:5])) == 5  # the configs differ, so must the counts
    assert serialized_size(*contents) == sum(expected)
    assert [serialized_size(c) for c in contents] == expected
    # measuring changed nothing: a changed record is measured anew afterwards
    broadcast["a"] = ArrayRecord({"a": torch.randn(100)})["a"]
    assert serialized_size(messages[0]) == flowers_count(messages[0]) != expected[0]
