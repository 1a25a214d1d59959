"""A secure user-level round end to end in one process (privacy.user.aggregation=secure): the
server's loop, the real ClientApp of every device and SecAgg+ between them, with a loopback grid
in place of Flower's transport. What the server decodes is the ring sum of the devices' shares
to the last bit; dropouts still sum; too many abort with nothing released; each device records
the round's event in its own ledger before it masks."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict

from privfed import keys
from privfed.client import app, secure_aggregation
from privfed.privacy import distributed_dg
from privfed.server import secure_round

from ..helpers import TINY, compose_raw, make_round

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SECURE = (
    *TINY,
    "federation.num_clients=6",
    "federation.clients_per_round=6",
    "num_rounds=2",
    "privacy=user",
    "privacy.user.epsilon=8",
    "privacy.user.clipping=client",
    "privacy.user.aggregation=secure",
)


class LoopbackGrid:
    """A fake for these tests only: Flower's transport replaced by calls of the real ClientApp
    with each node's own Context (kept across messages, as a SuperNode keeps it). ``silent``:
    (phase, node) pairs that get no reply, as from a device that dropped out then."""

    def __init__(self, cfg, nodes: int) -> None:
        self.cfg = cfg
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={keys.NODE_PARTITION_ID: i},
                state=RecordDict(),
                run_config={},
            )
            for i in range(nodes)
        }
        self.silent: set[tuple[str, int]] = set()
        self.received: list[Message] = []  # everything the server is sent back

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            phase = str(msg.content.config_records[keys.CONFIG].get(keys.PHASE, "train"))
            if (phase, node) in self.silent:
                continue
            try:
                reply = app.train_round(self.cfg, msg, self.contexts[node])
            except Exception as err:  # what Flower turns a ClientApp's exception into
                reply = Message(Error(code=1, reason=str(err)), reply_to=msg)
            replies.append(reply)
        self.received += replies
        return replies


def _federation(tmp_path, monkeypatch, *extra):
    from privfed.cli import prepare_run
    from privfed.server import loop
    from privfed.telemetry.run_dir import RunDirectory

    prepared = prepare_run(compose_raw(*SECURE, *extra))
    grid = LoopbackGrid(prepared.cfg, prepared.cfg.federation.num_clients)
    monkeypatch.setattr(  # the round's train messages through the loopback too
        loop, "send_and_receive", lambda g, messages, timeout, *on: g.send_and_receive(messages)
    )
    shares: dict[int, torch.Tensor] = {}
    make = distributed_dg.device_share

    def recorded(update, *args):
        share = make(update, *args)
        shares[len(shares)] = share
        return share

    monkeypatch.setattr(secure_aggregation.distributed_dg, "device_share", recorded)
    decoded: list[torch.Tensor] = []
    decode = distributed_dg.decode

    def seen(total, gamma, bits):
        decoded.append(total.clone())
        return decode(total, gamma, bits)

    monkeypatch.setattr(secure_round.distributed_dg, "decode", seen)
    run = loop.Federation(grid, prepared.cfg, RunDirectory(tmp_path / "run"), prepared)  # type: ignore[arg-type]
    return run, grid, shares, decoded


def _ring_sum(shares, bits):
    return distributed_dg.ring_sum(list(shares), bits)


def test_the_server_decodes_exactly_the_ring_sum_of_the_devices_shares(tmp_path, monkeypatch):
    run, grid, shares, decoded = _federation(tmp_path, monkeypatch)
    plan = run.strategy.user_dp.secure_plan  # type: ignore[union-attr]
    before = {n: t.clone() for n, t in run.state.items()}
    row = run.play_round(1)
    assert row["secure_aborted"] == 0 and len(shares) == 6
    torch.testing.assert_close(decoded[0], _ring_sum(shares.values(), plan.bits), rtol=0, atol=0)
    assert any(not torch.equal(before[n], run.state[n]) for n in before)  # a release happened
    # the server never saw a share or an update: only keys, ciphertexts, masked vectors, shares
    for reply in grid.received:
        for record in reply.content.array_records.values():
            for tensor in record.to_torch_state_dict().values():
                assert not any(torch.equal(tensor, s) for s in shares.values())
    # each device recorded the round's event in its own ledger, the population once
    for i in range(6):
        db = tmp_path / "run.devices" / f"client-{i}" / "device-ledger.sqlite"
        with sqlite3.connect(db) as con:
            rows = con.execute("SELECT client_id, round, event FROM events").fetchall()
        assert [(r[0], r[1]) for r in rows] == [(f"client-{i}/user", 1)]
        assert '"distributed_discrete_gaussian"' in rows[0][2]
    assert run.charge_user_round(1) is not None


def test_a_device_that_drops_after_sharing_keys_still_leaves_a_correct_sum(tmp_path, monkeypatch):
    run, grid, shares, decoded = _federation(tmp_path, monkeypatch)
    bits = run.strategy.user_dp.secure_plan.bits  # type: ignore[union-attr]
    dropped = sorted(grid.contexts)[2]
    grid.silent.add((keys.PHASE_SECAGG_MASK, dropped))
    row = run.play_round(1)
    assert row["secure_aborted"] == 0
    # shares were made in node order (the loopback calls them in turn): the dropped one's is #2
    others = [s for i, s in shares.items() if i != 2]
    torch.testing.assert_close(decoded[0], _ring_sum(others, bits), rtol=0, atol=0)


def test_too_many_dropouts_abort_the_round_and_release_nothing(tmp_path, monkeypatch):
    run, grid, shares, decoded = _federation(tmp_path, monkeypatch)
    for node in sorted(grid.contexts)[:4]:  # 2 masked vectors, 3 survivors planned
        grid.silent.add((keys.PHASE_SECAGG_MASK, node))
    before = {n: t.clone() for n, t in run.state.items()}
    row = run.play_round(1)
    assert row["secure_aborted"] == 1 and not decoded
    assert all(torch.equal(before[n], run.state[n]) for n in before)
    # the devices charged themselves before masking: they cannot know what the server learnt
    assert len(shares) == 6


def test_a_device_masks_its_share_once(tmp_path, monkeypatch):
    """The server's attack: ask for the masked vector twice (with other shares routed in) and
    subtract; the device sends one masked vector per round and refuses the second request."""
    run, grid, shares, decoded = _federation(tmp_path, monkeypatch)
    asked: list[Message] = []
    send = grid.send_and_receive

    def twice(messages, timeout=None):
        out = send(messages, timeout)
        phase = messages[0].content.config_records[keys.CONFIG].get(keys.PHASE)
        if phase == keys.PHASE_SECAGG_MASK:
            again = Message(
                messages[0].content,
                dst_node_id=messages[0].metadata.dst_node_id,
                message_type="train",
            )
            asked.extend(send([again], timeout))
        return out

    grid.send_and_receive = twice  # type: ignore[method-assign]
    run.play_round(1)
    assert len(asked) == 1 and asked[0].has_error()
    assert "masked and sent already" in asked[0].error.reason


def test_a_replayed_round_gets_no_second_share(tmp_path, monkeypatch):
    run, grid, shares, decoded = _federation(tmp_path, monkeypatch)
    run.play_round(1)
    made = len(shares)
    row = run.play_round(1)  # the server asks for round 1 again: fresh noise, one charge
    assert len(shares) == made and row["secure_aborted"] == 1


def test_secure_aggregation_refuses_what_it_cannot_protect():
    from privfed.config import ConfigError, load_config

    def config(*extra):
        return load_config(compose_raw(*SECURE, *extra))

    with pytest.raises(ConfigError, match="clipping=client"):
        config("privacy.user.clipping=server")
    with pytest.raises(ConfigError, match="privacy=user"):
        config("privacy.enabled=true", "privacy.epsilon=8", "privacy.max_grad_norm=1")
    with pytest.raises(ConfigError, match="clip-only"):
        config("privacy.user.noise_multiplier=0")


def test_a_secure_plan_that_cannot_be_made_is_a_config_error_naming_its_key():
    """Before anything starts: too few guaranteed survivors is one line naming the key
    (prepared._plan_user_sigma turns the plan's own errors into ConfigError, not every
    ValueError of the calibration)."""
    from privfed.cli import prepare_run
    from privfed.config import ConfigError

    with pytest.raises(ConfigError, match=r"^privacy\.user\.secure\.min_survivors: "):
        prepare_run(compose_raw(*SECURE, "privacy.user.secure.min_survivors=0.05"))


def test_a_device_counts_the_survivors_its_charge_assumed_not_the_servers_word(
    tmp_path, monkeypatch
):
    """The server's attack: call a round complete with fewer survivors than the devices' epsilon
    counted on (and say the minimum is 0). Each device enforces the survivors of the event it
    recorded: it reveals nothing, and nothing is released."""
    run, grid, shares, decoded = _federation(
        tmp_path, monkeypatch, "privacy.user.secure.min_survivors=1"
    )
    assert run.strategy.user_dp.secure_plan.survivors == 6  # type: ignore[union-attr]
    send = grid.send_and_receive
    answers: list[Message] = []

    def lying(messages, timeout=None):
        phase = messages[0].content.config_records[keys.CONFIG].get(keys.PHASE)
        if phase == keys.PHASE_SECAGG_UNMASK:
            for m in messages:
                request = m.content.config_records[keys.SECAGG]
                request["survived"] = list(request["survived"])[:4]  # type: ignore[index]
                request["dropped"] = []
                request["min-survivors"] = 0
            out = send(messages, timeout)
            answers.extend(out)
            return out
        return send(messages, timeout)

    grid.send_and_receive = lying  # type: ignore[method-assign]
    row = run.play_round(1)
    assert answers and all(a.has_error() for a in answers)
    assert all("survivors" in a.error.reason for a in answers)
    assert row["secure_aborted"] == 1 and not decoded


def test_a_secure_reply_refuses_a_private_metric_as_every_dp_reply_does(tmp_path):
    """client/secure_aggregation._reply raises on a metric outside keys.PUBLIC_REPLY_METRICS
    (a training loss computed on the device's data) instead of dropping it silently."""
    from privfed.client.secure_aggregation import _reply
    from privfed.config import load_config
    from privfed.privacy.invariants import PrivacyInvariantError

    msg, *_ = make_round(tmp_path, load_config(compose_raw(*SECURE)), 1, 0.0)
    with pytest.raises(PrivacyInvariantError, match="train-loss"):
        _reply(msg, None, None, {keys.NUM_EXAMPLES: 3, keys.TRAIN_LOSS: 0.4})
    ok = _reply(msg, None, None, {keys.NUM_EXAMPLES: 3})
    assert ok.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES] == 3
