"""A client's release and ledger record are durable before its reply leaves: flushed each on its
own, or, for a bundle of clients in one actor call, flushed once at the bundle's end, which is
before any of its replies leaves (privacy/durability.py). And a release file that a crash cut
short before its flush reads as lost, which the release protocol survives."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest
import torch

from privfed import keys
from privfed.client.app import train_round
from privfed.privacy import durability
from privfed.privacy.events import SampledGaussianEvent
from privfed.privacy.ledger import EventKey, Ledger
from privfed.privacy.releases import ReleaseStore
from privfed.simulation_bundling import BundledClientApp

from ..helpers import TINY, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")

EVENT = SampledGaussianEvent(0.1, 1.0, 3)


class SyncfsSpy:
    """The real syncfs, counted, with what had happened (``log``) when each call came."""

    def __init__(self, log: list[str], fail: int = 0) -> None:
        self.real, self.log, self.fail, self.calls = durability._syncfs, log, fail, 0

    def __call__(self, fd: int) -> int:
        self.calls += 1
        self.log.append("syncfs")
        if self.fail:
            ctypes.set_errno(self.fail)
            return -1
        assert self.real is not None
        return self.real(fd)


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    """Every os.fsync made (the real one still runs)."""
    made: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        made.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return made


def _synchronous(ledger: Ledger) -> int:
    with ledger._connect() as con:
        return con.execute("PRAGMA synchronous").fetchone()[0]


@pytest.mark.skipif(durability._syncfs is None, reason="syncfs is Linux's")
def test_inside_a_block_writes_wait_for_one_flush_at_its_end(tmp_path, monkeypatch, fsyncs):
    log: list[str] = []
    spy = SyncfsSpy(log)
    monkeypatch.setattr(durability, "_syncfs", spy)
    store, ledger = ReleaseStore(tmp_path / "releases"), Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-0", 100.0, 1e-5)
    ledger.set_budget("client-1", 100.0, 1e-5)
    with durability.one_flush():
        for client in ("client-0", "client-1"):
            key = EventKey("run", client, 1)
            store.save(key, {"payload": {"x": torch.ones(3)}})
            assert ledger.report(key, EVENT).accepted
            assert _synchronous(ledger) == 1  # NORMAL: the COMMIT waits for the block's end
            log.append(f"{client} written")
        assert spy.calls == 0 and fsyncs == []
    # one filesystem (tmp_path): one syncfs for both releases and both records, at the end
    assert log == ["client-0 written", "client-1 written", "syncfs"]
    assert fsyncs == []
    ledger.report(EventKey("run", "client-0", 2), EVENT)  # outside a block: FULL again
    assert _synchronous(ledger) == 2
    store.save(EventKey("run", "client-0", 2), {"payload": {"x": torch.ones(3)}})
    assert len(fsyncs) == 1 and spy.calls == 1  # the release flushed on its own


def test_without_syncfs_the_block_fsyncs_each_file_it_wrote(tmp_path, monkeypatch, fsyncs):
    monkeypatch.setattr(durability, "_syncfs", None)  # as on a system without syncfs
    store, ledger = ReleaseStore(tmp_path / "releases"), Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-0", 100.0, 1e-5)
    with durability.one_flush():
        for r in (1, 2):
            store.save(EventKey("run", "client-0", r), {"payload": {"x": torch.ones(3)}})
            ledger.report(EventKey("run", "client-0", r), EVENT)
        assert fsyncs == []
    # the latest release (round 1's was dropped when round 2's was stored), the WAL and the
    # database file, once each
    assert len(fsyncs) == 3


def test_a_failed_flush_raises_at_the_blocks_end(tmp_path, monkeypatch):
    if durability._syncfs is None:
        pytest.skip("syncfs is Linux's")
    monkeypatch.setattr(durability, "_syncfs", SyncfsSpy([], fail=errno.EIO))
    with pytest.raises(OSError, match="syncfs"):
        with durability.one_flush():
            ReleaseStore(tmp_path).save(EventKey("run", "c", 1), {"payload": {}})
    assert not durability.deferred()  # the block is over, failed or not
    with pytest.raises(RuntimeError, match="outside one_flush"):
        durability.written(tmp_path / "x")


@pytest.mark.skipif(durability._syncfs is None, reason="syncfs is Linux's")
@pytest.mark.parametrize("flush_per_call", [True, False])
def test_a_bundle_flushes_once_after_its_last_client_and_before_its_replies_leave(
    tmp_path, monkeypatch, fsyncs, flush_per_call
):
    """The real client trainer, three clients in one bundle (as an actor runs it): each stores
    its release and records its event, none is flushed on its own, and the one flush comes after
    the last client and before the call returns (the replies leave when it returns). With
    ``federation.flush_per_call=false`` each release is flushed as it is made."""
    cfg = run_config(*TINY)
    msg, context, _, _ = make_round(tmp_path, cfg, 1, 1.0)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    log: list[str] = []
    spy = SyncfsSpy(log)
    monkeypatch.setattr(durability, "_syncfs", spy)
    bundle = []
    for partition in range(3):
        ledger.set_budget(f"client-{partition}", 1e6, 1e-5)
        ctx = type(context)(
            run_id=1,
            node_id=5 + partition,
            node_config={keys.NODE_PARTITION_ID: partition},
            state=type(context.state)(),
            run_config={},
        )
        bundle.append((msg, ctx))

    def client_app(message, context):
        reply = train_round(cfg, message, context)
        log.append(f"client {context.node_config[keys.NODE_PARTITION_ID]} replied")
        return reply

    out = BundledClientApp(lambda: client_app, flush_per_call)()(bundle)
    log.append("the call returned")
    replied = ["client 0 replied", "client 1 replied", "client 2 replied"]
    if flush_per_call:
        assert log == [*replied, "syncfs", "the call returned"]
        assert fsyncs == []  # no release was flushed on its own
    else:
        assert log == [*replied, "the call returned"]
        assert len(fsyncs) == 3  # each release on its own (the ledger's COMMITs: FULL)
    assert all(keys.ARRAYS in reply.content.array_records for reply, _ in out)
    assert len(ledger.rows()) == 3
    assert len(list((tmp_path / "releases").rglob("*.pt"))) == 3


@pytest.mark.parametrize("charged", [True, False])
def test_a_release_cut_short_by_a_crash_reads_as_lost(tmp_path, charged):
    """A crash before the bundle's flush can leave a release file cut short. No reply rested on
    it. If its event was recorded, the client sits out (a new release would be a second one
    under one charge); if not, it releases once, charged once."""
    cfg = run_config(*TINY)
    msg, context, _, _ = make_round(tmp_path, cfg, 1, 1.0)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-0", 1e6, 1e-5)
    first = train_round(cfg, msg, context)
    assert keys.ARRAYS in first.content.array_records
    (stored,) = (tmp_path / "releases").rglob("*.pt")
    stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])
    assert ReleaseStore(tmp_path / "releases").load(EventKey("run", "client-0", 1)) is None
    if not charged:  # the record was lost with it
        Ledger(tmp_path / "ledger.sqlite").close()
        import sqlite3

        with sqlite3.connect(tmp_path / "ledger.sqlite") as con:
            con.execute("DELETE FROM events")
    again = train_round(cfg, msg, context)
    metrics = again.content.metric_records[keys.METRICS]
    if charged:
        assert metrics[keys.SAT_OUT] == 1 and keys.ARRAYS not in again.content.array_records
    else:
        assert metrics[keys.SAT_OUT] == 0 and keys.ARRAYS in again.content.array_records
    assert len(ledger.rows()) == 1
