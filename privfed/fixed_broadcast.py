"""Tensors a strategy never changes during training go to each node once, not every round.

Fed-SB's ``B`` and ``A`` and FFA-LoRA's ``A`` are fixed once training starts. Broadcasting them
every round was most of Fed-SB's download: 1.18 MB of its 1.24 MB per client per round on MiniLM
at rank 32, against a 64 kB upload. The server sends them to a node with its first round and
leaves them out while the node holds them; the node keeps them in its Flower ``Context``
(``context.state``, which the Simulation Engine and a SuperNode keep per node across rounds).

Both sides name the fixed tensors by a digest of their names, dtypes, shapes and bytes. If a
node does not hold the digest the server names (a restarted SuperNode lost its context), it
fails the round with an error before training (nothing is trained, charged or released) and
the server sends it everything again next round. The server learns only whether a node kept
what it was sent, which depends on no client's data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from privfed import array_codec, keys
from privfed.tensors import State

# In context.state (one key space for every record type, so two names)
_TENSORS = "privfed.fixed-tensors"  # an ArrayRecord: the tensors
_KEPT = "privfed.fixed-kept"  # a ConfigRecord: their digest
_DIGEST = "digest"


class MissingFixedTensors(RuntimeError):
    """The round's broadcast left out fixed tensors this node does not hold."""


def digest(state: State, names: Iterable[str]) -> str:
    """sha256 over each named tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(names):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- the server's side ---------------------------------------------------------------------------
class FixedBroadcast:
    """Which nodes hold which fixed tensors, and the broadcast each node gets.

    A node counts as holding the tensors from a reply that is not an error to a round that
    carried them (the client stores them before it trains); an error reply forgets it (the
    client may have lost or never stored them). Kept in memory only: after a server restart
    every node gets everything once more.
    """

    def __init__(self) -> None:
        self._held: dict[int, str] = {}
        self._sent: dict[int, str] = {}

    def messages(
        self,
        everything: ArrayRecord,
        state: State,
        fixed: Callable[[str], bool],
        node_ids: list[int],
    ) -> dict[int, tuple[ArrayRecord, dict[str, str | int]]]:
        """Per node: the arrays to send (``everything``, the record of ``state``, or it without
        the fixed tensors) and the config entries that name the fixed tensors."""
        names = [n for n in state if fixed(n)]
        if not names:
            self._sent = {}
            return {node: (everything, {}) for node in node_ids}
        fixed_digest = digest(state, names)
        without = ArrayRecord({n: t for n, t in state.items() if n not in names})
        out: dict[int, tuple[ArrayRecord, dict[str, str | int]]] = {}
        for node in node_ids:
            held = self._held.get(node) == fixed_digest
            entries: dict[str, str | int] = {
                keys.FIXED_DIGEST: fixed_digest,
                keys.FIXED_OMITTED: int(held),
            }
            out[node] = (without if held else everything, entries)
        self._sent = dict.fromkeys(node_ids, fixed_digest)
        return out

    def replied(self, node_id: int, ok: bool) -> None:
        """A node answered this round: with a reply (``ok``) or an error."""
        sent = self._sent.get(node_id)
        if sent is None:
            return
        if ok:
            self._held[node_id] = sent
        else:
            self._held.pop(node_id, None)


# -- the client's side ---------------------------------------------------------------------------
def complete(
    state: State, config: ConfigRecord, context: Context, fixed: Callable[[str], bool]
) -> State:
    """The round's full global state on a client: the broadcast, with the fixed tensors this
    node keeps added back if the server left them out, or kept for the next rounds if it sent
    them. Raises :class:`MissingFixedTensors` if they were left out and the node lacks them, or
    ValueError if what was sent does not match the digest the server named."""
    if keys.FIXED_DIGEST not in config:  # a strategy without fixed tensors (or the init exchange)
        return state
    wanted = config[keys.FIXED_DIGEST]
    if not isinstance(wanted, str):
        raise ValueError(f"record key {keys.FIXED_DIGEST!r}: a digest expected, got {wanted!r}")
    if keys.integer(config, keys.FIXED_OMITTED):
        kept = context.state.config_records.get(_KEPT)
        if kept is None or kept.get(_DIGEST) != wanted:
            raise MissingFixedTensors(
                f"the server left out the fixed tensors {wanted[:12]}, which this node "
                "does not hold (its context was lost?); it sends them again next round"
            )
        return {**state, **array_codec.to_state(context.state.array_records[_TENSORS])}
    names = [n for n in state if fixed(n)]
    got = digest(state, names)
    if got != wanted:
        raise ValueError(f"fixed tensors {got[:12]} do not match the named digest {wanted[:12]}")
    context.state.array_records[_TENSORS] = ArrayRecord({n: state[n] for n in names})
    context.state.config_records[_KEPT] = ConfigRecord({_DIGEST: got})
    return state
