"""strategy=lora: FedAvg math and the reply validation of the shared Flower adapter."""

from __future__ import annotations

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from privfed import keys
from privfed.strategies.base import InvalidReply, validate_payload
from privfed.strategies.lora import LoraFedAvg, aggregation_error, fedavg, lora_pairs
from privfed.strategies.registry import build_strategy
from privfed.tensors import weighted_mean

from ..helpers import TINY, run_config


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 5),
    r=st.integers(1, 4),
    d_in=st.integers(1, 7),
    d_out=st.integers(1, 7),
    seed=st.integers(0, 10_000),
)
def test_fedavg_is_the_weighted_mean(k, r, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    payloads = [{"a": torch.randn(r, d_in, generator=g)} for _ in range(k)]
    weights = [float(w) for w in torch.randint(1, 50, (k,), generator=g)]
    expected = sum(w * p["a"].double() for w, p in zip(weights, payloads, strict=True)) / sum(
        weights
    )
    torch.testing.assert_close(fedavg(payloads, weights)["a"], expected.float())


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 5), r=st.integers(1, 4), d=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_aggregation_error_is_zero_with_shared_a_and_positive_otherwise(k, r, d, seed):
    g = torch.Generator().manual_seed(seed)
    weights = [1.0] * k
    shared_a = torch.randn(r, d, generator=g)
    bs = [torch.randn(d, r, generator=g) for _ in range(k)]
    num, den = aggregation_error([shared_a] * k, bs, weights)
    assert num / den < 1e-20
    a_list = [torch.randn(r, d, generator=g) for _ in range(k)]
    num, den = aggregation_error(a_list, bs, weights)
    assert num / den > 1e-6  # independent random factors: the product of means is not exact


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 12), r=st.integers(1, 8), d=st.integers(2, 40), seed=st.integers(0, 10_000))
def test_aggregation_error_matches_the_products_summed_client_by_client(k, r, d, seed):
    """Against the definition, in float64, one full product per client: the centred float32
    product of the implementation agrees to float32 precision relative to the error."""
    g = torch.Generator().manual_seed(seed)
    a_list = [torch.randn(r, d, generator=g) for _ in range(k)]
    b_list = [torch.randn(d, r, generator=g) for _ in range(k)]
    weights = [float(w) for w in torch.randint(1, 20, (k,), generator=g)]
    total = sum(weights)
    exact = sum(
        w / total * b.double() @ a.double() for a, b, w in zip(a_list, b_list, weights, strict=True)
    )
    mean_b = sum(w / total * b.double() for b, w in zip(b_list, weights, strict=True))
    mean_a = sum(w / total * a.double() for a, w in zip(a_list, weights, strict=True))
    error = float((exact - mean_b @ mean_a).pow(2).sum())
    num, den = aggregation_error(a_list, b_list, weights)
    assert den == pytest.approx(float(exact.pow(2).sum()), rel=1e-5)
    assert num == pytest.approx(error, rel=1e-5, abs=1e-12 * den)


def test_lora_pairs_finds_a_and_b():
    names = ["m.q.lora_A.default.weight", "m.q.lora_B.default.weight", "m.classifier.weight"]
    assert lora_pairs(names) == [("m.q.lora_A.default.weight", "m.q.lora_B.default.weight")]


def test_weighted_mean_rejects_zero_weights():
    with pytest.raises(ValueError):
        weighted_mean([torch.ones(2)], [0.0])


EXPECTED = {
    "x.lora_A.default.weight": torch.zeros(2, 3),
    "x.lora_B.default.weight": torch.zeros(3, 2),
}


@pytest.mark.parametrize(
    "payload,reason",
    [
        ({"x.lora_A.default.weight": torch.zeros(2, 3)}, "names differ"),
        ({**EXPECTED, "extra": torch.zeros(1)}, "names differ"),
        ({**EXPECTED, "x.lora_A.default.weight": torch.zeros(3, 3)}, "shape"),
        ({**EXPECTED, "x.lora_A.default.weight": torch.zeros(2, 3, dtype=torch.float64)}, "dtype"),
        ({**EXPECTED, "x.lora_B.default.weight": torch.full((3, 2), float("nan"))}, "non-finite"),
        ({**EXPECTED, "x.lora_B.default.weight": torch.full((3, 2), float("inf"))}, "non-finite"),
    ],
)
def test_bad_payloads_are_rejected(payload, reason):
    with pytest.raises(InvalidReply, match=reason):
        validate_payload(payload, EXPECTED)


pytestmark = pytest.mark.usefixtures("flower_task_identity")


class FakeGrid:
    """Unit-test fake of a Flower Grid: only node ids (no transport)."""

    def get_node_ids(self):
        return [11, 12, 13, 14, 15, 16]


def reply_to(
    msg: Message, payload: dict | None, n: int = 10, sat_out: int = 0, **why: int
) -> Message:
    metrics = {keys.NUM_EXAMPLES: n, keys.SAT_OUT: sat_out, **why}
    content = RecordDict({keys.METRICS: MetricRecord(metrics)})
    if payload is not None:
        content[keys.ARRAYS] = ArrayRecord(payload)
    return Message(content, reply_to=msg)


def test_bad_replies_are_dropped_and_counted_and_the_round_goes_on():
    strategy = build_strategy(run_config(*TINY, "federation.num_clients=6"))
    assert isinstance(strategy, LoraFedAvg)
    state = {
        "m.lora_A.default.weight": torch.ones(2, 3),
        "m.lora_B.default.weight": torch.zeros(3, 2),
    }
    msgs, sent = strategy.configure_round(1, ArrayRecord(state), ConfigRecord({}), FakeGrid())
    assert len(msgs) == 6 and all(m.metadata.message_type == MessageType.TRAIN for m in msgs)
    assert sent.sampled == 6 and sent.bytes_down > 6 * (6 + 6) * 4
    good = {k: v + 1.0 for k, v in state.items()}
    nan = {**good, "m.lora_B.default.weight": torch.full((3, 2), float("nan"))}
    replies = [
        reply_to(msgs[0], good, n=30),
        reply_to(msgs[1], {**good, "m.lora_B.default.weight": torch.ones(4, 2)}),  # wrong shape
        reply_to(msgs[2], {**good, "evil": torch.ones(1)}),  # extra tensor
        reply_to(msgs[3], nan),
        reply_to(
            msgs[4],
            None,
            sat_out=1,
            **{keys.DEVICE_REFUSED: 1, keys.PARTITION_ID: 4, keys.EPSILON_SPENT: 2.5},
        ),
        Message(Error(code=0, reason="client raised RuntimeError"), reply_to=msgs[5]),
    ]
    new, out = strategy.aggregate_round(1, replies, sent)
    assert (out.sampled, out.bytes_down) == (sent.sampled, sent.bytes_down)
    assert (out.trained, out.rejected, out.sat_out, out.failed) == (1, 3, 1, 1)
    assert out.sat_out_reasons == {
        keys.DEVICE_REFUSED: 1,
        keys.OVER_BUDGET: 0,
        keys.ROUND_IN_PROGRESS: 0,
        keys.ACCOUNTANT_UNREACHABLE: 0,
    }
    # who sat out on a spent budget, for the run's last words (server/loop.py)
    assert out.budget_sat_out == {4: (keys.DEVICE_REFUSED, 2.5)}
    assert new is not None
    torch.testing.assert_close(new["m.lora_A.default.weight"], good["m.lora_A.default.weight"])
    assert out.bytes_up > 0


def test_a_round_with_only_bad_replies_keeps_the_global_state():
    strategy = build_strategy(run_config(*TINY))
    state = {"m.lora_A.default.weight": torch.ones(2, 3)}
    msgs, sent = strategy.configure_round(1, ArrayRecord(state), ConfigRecord({}), FakeGrid())
    bad = [reply_to(msgs[0], {"m.lora_A.default.weight": torch.ones(9)})]
    new, out = strategy.aggregate_round(1, bad, sent)
    assert new is None and out.rejected == 1
    # Flower's API over the same two calls: no arrays, and the count in its metrics
    msgs = list(strategy.configure_train(1, ArrayRecord(state), ConfigRecord({}), FakeGrid()))
    bad = [reply_to(msgs[0], {"m.lora_A.default.weight": torch.ones(9)})]
    arrays, metrics = strategy.aggregate_train(1, bad)
    assert arrays is None and metrics is not None and metrics["trained"] == 0


def test_replies_read_as_they_arrive_give_the_round_they_would_give_at_its_end():
    """The server reads each reply while the others still train (strategies/replies.py
    ReplyIntake): the same outcome, bytes and state as reading them all at the end, each reply
    parsed once; and two replies that claim one message id keep their own readings."""
    strategy = build_strategy(run_config(*TINY, "federation.num_clients=6"))
    state = {
        "m.lora_A.default.weight": torch.ones(2, 3),
        "m.lora_B.default.weight": torch.zeros(3, 2),
    }
    msgs, sent = strategy.configure_round(1, ArrayRecord(state), ConfigRecord({}), FakeGrid())
    good = {k: v + 1.0 for k, v in state.items()}
    other = {k: v - 2.0 for k, v in state.items()}
    nan = {**good, "m.lora_B.default.weight": torch.full((3, 2), float("nan"))}

    def replies() -> list[Message]:
        out = [
            reply_to(msgs[0], good, n=30),
            reply_to(msgs[1], nan),
            reply_to(msgs[2], other, n=10),
            reply_to(msgs[3], None, sat_out=1, **{keys.DEVICE_REFUSED: 1}),
            Message(Error(code=0, reason="client raised RuntimeError"), reply_to=msgs[4]),
        ]
        for i, msg in enumerate(out[:4]):  # a public reply field: the aggregation's order
            msg.content[keys.METRICS][keys.PARTITION_ID] = i
        # the rejected and the third reply claim the first one's message id
        for msg in out[1:3]:
            msg.metadata.__dict__["_message_id"] = out[0].metadata.message_id
        return out

    at_end, out_end = strategy.aggregate_round(1, replies(), sent)
    strategy.configure_round(1, ArrayRecord(state), ConfigRecord({}), FakeGrid())
    parses = []
    parse = strategy._parse_reply

    def counted(msg, expected):  # a spy for this test: how often each reply is parsed
        parses.append(id(msg))
        return parse(msg, expected)

    strategy._parse_reply = counted  # type: ignore[method-assign]
    intake = strategy.intake()
    arrived = replies()
    for msg in reversed(arrived):  # in any order
        intake.read(msg)
    read, out_read = strategy.aggregate_round(1, arrived, sent, intake)
    assert sorted(parses) == sorted({id(m) for m in arrived[:3]})  # once each, sit-out never
    assert (out_read.trained, out_read.rejected, out_read.sat_out, out_read.failed) == (2, 1, 1, 1)
    assert out_read.bytes_up == out_end.bytes_up > 0
    assert at_end is not None and read is not None
    for name in state:
        assert torch.equal(read[name], at_end[name])
    expected_a = (30 * good["m.lora_A.default.weight"] + 10 * other["m.lora_A.default.weight"]) / 40
    torch.testing.assert_close(read["m.lora_A.default.weight"], expected_a)
