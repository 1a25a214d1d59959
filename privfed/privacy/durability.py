"""When a client's durable writes reach the disk: at once, or once for a bundle of clients.

A client stores its release and records its event durably before its reply leaves
(client/release_protocol.py). Alone, each write is flushed as it is made: the release file is
fsynced, the ledger commits with ``synchronous=FULL``. A cross-device simulation runs several
clients in one actor call (simulation_bundling.py), and their replies leave together, after the
last client of the call. Under :func:`one_flush` those clients' writes are made without a flush
each, and the block's end makes all of them durable at once: one ``syncfs`` per filesystem they
touched (the files themselves, one ``fsync`` each, where ``syncfs`` is missing). What a reply
rests on is on disk before the reply leaves, as before; what changes is only that a crash
before the block's end may lose several clients' writes instead of one's.

That loss is one the release protocol already survives, because no reply has left: a lost
release of a charged key makes the client sit out, a lost record of a stored release is recorded
again with the stored bytes, and losing both is as if the client never ran. A release file cut
short by the crash reads as lost (:meth:`ReleaseStore.load`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_local = threading.local()  # this thread's open block: the paths written under it


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        syncfs = libc.syncfs  # Linux only
    except (OSError, AttributeError, TypeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs


_syncfs = _load_syncfs()


def deferred() -> bool:
    """True inside :func:`one_flush` (on this thread): a write may skip its own flush, if it
    calls :func:`written`."""
    return getattr(_local, "pending", None) is not None


def written(path: str | Path) -> None:
    """``path`` was written under :func:`one_flush` and must be durable at the block's end."""
    pending = getattr(_local, "pending", None)
    if pending is None:
        raise RuntimeError("durability.written() outside one_flush(): flush the file itself")
    pending.add(Path(path))


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def flush(paths: set[Path]) -> None:
    """Make every file of ``paths`` durable: one ``syncfs`` per filesystem among them (it
    flushes the filesystem's data and metadata, renames included), else an fsync per file.
    An I/O error raises (Linux reports a writeback error to syncfs since 5.8)."""
    if _syncfs is None:
        for path in sorted(paths):
            if path.exists():
                fsync_file(path)
        return
    one_per_device: dict[int, Path] = {}
    for path in sorted(paths):
        existing = path
        while not existing.exists():  # a file removed since (its directory's filesystem)
            existing = existing.parent
        one_per_device.setdefault(existing.stat().st_dev, existing)
    for path in one_per_device.values():
        fd = os.open(path, os.O_RDONLY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}", str(path))
        finally:
            os.close(fd)


@contextmanager
def one_flush() -> Iterator[None]:
    """Writes on this thread made inside the block are flushed once, when it ends (also when
    it raises: what was written is made durable, and a flush error raises). Nothing that
    depends on those writes may leave before the block ends. Blocks do not nest."""
    if deferred():
        raise RuntimeError("one_flush() blocks do not nest")
    _local.pending = set()
    try:
        yield
    finally:
        pending, _local.pending = _local.pending, None
        if pending:
            flush(pending)
