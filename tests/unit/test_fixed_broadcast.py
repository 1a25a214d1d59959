"""Fixed tensors (Fed-SB's B and A, FFA-LoRA's A) travel to each node once: what a node trains
on is the same as with the full broadcast, and a node that lost them is sent them again."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from privfed import keys
from privfed.client.app import train_round
from privfed.fixed_broadcast import FixedBroadcast, MissingFixedTensors, complete, digest
from privfed.strategies.registry import build_strategy
from privfed.telemetry.bytes import serialized_size

from ..helpers import TINY, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def is_factor(name: str) -> bool:
    return name.startswith("fixed.")


def toy_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fixed.B": torch.randn(64, 8, generator=g),
        "fixed.A": torch.randn(8, 64, generator=g),
        "R": torch.randn(8, 8, generator=g),
        "head": torch.randn(4, generator=g),
    }


def node_context(node_id: int) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})


def deliver(server: FixedBroadcast, state, node_ids):
    """One round's broadcasts, as (arrays, config) per node."""
    sent = server.messages(ArrayRecord(state), state, is_factor, node_ids)
    return {n: (arrays, ConfigRecord(entries)) for n, (arrays, entries) in sent.items()}


def test_the_fixed_tensors_go_once_and_every_node_rebuilds_the_full_state():
    server, state = FixedBroadcast(), toy_state()
    contexts = {n: node_context(n) for n in (1, 2)}
    for rnd in (1, 2, 3):
        state = {**state, "R": state["R"] + rnd}  # what trains changes, B and A do not
        for node, (arrays, config) in deliver(server, state, [1, 2]).items():
            got = complete(arrays.to_torch_state_dict(), config, contexts[node], is_factor)
            assert set(got) == set(state)
            assert all(torch.equal(got[n], state[n]) for n in state)
            assert config[keys.FIXED_OMITTED] == int(rnd > 1)
            server.replied(node, ok=True)
    full = serialized_size(RecordDict({"a": ArrayRecord(state)}))
    slim = serialized_size(RecordDict({"a": ArrayRecord({"R": state["R"], "head": state["head"]})}))
    assert slim < full / 4  # what the omission saves: B and A are 1,024 of 1,092 numbers


def test_a_node_that_lost_them_fails_before_training_and_gets_everything_next_round():
    server, state = FixedBroadcast(), toy_state()
    ((arrays, config),) = deliver(server, state, [7]).values()
    complete(arrays.to_torch_state_dict(), config, node_context(7), is_factor)
    server.replied(7, ok=True)
    ((arrays, config),) = deliver(server, state, [7]).values()
    assert config[keys.FIXED_OMITTED] == 1
    with pytest.raises(MissingFixedTensors, match="does not hold"):  # a restarted node
        complete(arrays.to_torch_state_dict(), config, node_context(7), is_factor)
    server.replied(7, ok=False)
    ((arrays, config),) = deliver(server, state, [7]).values()
    assert config[keys.FIXED_OMITTED] == 0 and "fixed.B" in arrays


def test_new_fixed_tensors_are_sent_again_to_every_node():
    """Fed-SB's svd init replaces B and A: a new digest, so nobody holds them yet."""
    server = FixedBroadcast()
    deliver(server, toy_state(0), [1, 2])
    server.replied(1, ok=True)
    server.replied(2, ok=True)
    sent = deliver(server, toy_state(1), [1, 2, 3])
    assert all(config[keys.FIXED_OMITTED] == 0 for _, config in sent.values())
    server.replied(3, ok=True)
    sent = deliver(server, toy_state(1), [3])
    assert sent[3][1][keys.FIXED_OMITTED] == 1


def test_fixed_tensors_that_do_not_match_the_digest_are_refused():
    state = toy_state()
    config = ConfigRecord(
        {keys.FIXED_DIGEST: digest(toy_state(1), ["fixed.A", "fixed.B"]), keys.FIXED_OMITTED: 0}
    )
    with pytest.raises(ValueError, match="do not match"):
        complete(state, config, node_context(1), is_factor)


def test_digest_sees_every_name_dtype_shape_and_value():
    state = toy_state()
    base = digest(state, state)
    assert digest(dict(state), reversed(list(state))) == base  # order-free
    changed = [
        {**state, "R": state["R"].clone().index_put_((torch.tensor(0),), torch.tensor(9.0))},
        {**state, "R": state["R"].double()},
        {**state, "R": state["R"].reshape(4, 16)},
        {("S" if n == "R" else n): t for n, t in state.items()},
    ]
    for other in changed:
        assert digest(other, other) != base


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=fed_sb", "strategy.init=random"],  # no init exchange here
        ["strategy=ffa_lora"],
        ["strategy=fedmentor", "strategy.base=ffa_lora"],  # its base's fixed A
    ],
    ids=["fed_sb", "ffa_lora", "fedmentor-ffa"],
)
def test_a_client_trains_the_same_on_the_slim_broadcast_as_on_the_full_one(tmp_path, overrides):
    """The real ClientApp round, non-private (seeded, so the two runs are comparable): round 2
    from a broadcast without the fixed tensors replies exactly what it replies to the full one."""
    cfg = run_config(*TINY, "privacy=none", *overrides)
    fixed = build_strategy(cfg).fixed
    msg1, context, state, _ = make_round(tmp_path, cfg, 1, 1.0)
    server = FixedBroadcast()
    assert any(fixed(n) for n in state)

    def broadcast(rnd: int) -> Message:
        ((arrays, entries),) = server.messages(ArrayRecord(state), state, fixed, [5]).values()
        config = ConfigRecord({**msg1.content.config_records[keys.CONFIG], **entries})
        config[keys.SERVER_ROUND] = rnd
        return Message(
            RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config}),
            dst_node_id=5,
            message_type=MessageType.TRAIN,
        )

    first = broadcast(1)
    assert not first.content.config_records[keys.CONFIG][keys.FIXED_OMITTED]
    train_round(cfg, first, context)  # keeps the fixed tensors in the node's context
    server.replied(5, ok=True)
    slim = broadcast(2)
    assert slim.content.config_records[keys.CONFIG][keys.FIXED_OMITTED] == 1
    assert not any(fixed(n) for n in slim.content.array_records[keys.ARRAYS])
    full = broadcast(2)
    full.content.array_records[keys.ARRAYS] = ArrayRecord(state)
    full.content.config_records[keys.CONFIG][keys.FIXED_OMITTED] = 0

    def payload(m: Message) -> dict[str, torch.Tensor]:
        return train_round(cfg, m, context).content.array_records[keys.ARRAYS].to_torch_state_dict()

    from_slim, from_full = payload(slim), payload(full)
    assert set(from_slim) == set(from_full) and from_slim
    assert all(torch.equal(from_slim[n], from_full[n]) for n in from_full)
    # and the bytes it saves on the wire
    assert serialized_size(slim.content) < serialized_size(full.content)
