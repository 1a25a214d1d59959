"""SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova 2020): the server learns the sum of the
devices' vectors in Z_(2^bits), and nothing else about any one of them, even when devices drop out.

The protocol's four stages as pure functions on device and server state (no messaging: the
round that carries them over Flower's Message API comes on top; issue 34). It follows Flower's
``secaggplus_mod`` / ``SecAggPlusWorkflow`` (Flower 1.x, written for its legacy workflow) and
keeps its stages, with four changes where Flower's choice is weaker or slower:

* **Masks from a CSPRNG keyed by all 256 bits of the seed.** Flower's ``pseudo_rand_gen`` folds
  a seed to 32 bits (XOR of its 4-byte words) and seeds NumPy's MT19937 with it: a server that
  tries all 2^32 seeds finds a pairwise or self mask, and two different seeds with the same fold
  give the same mask (a test shows both). Here a mask is the ChaCha20 keystream under
  SHA-256(seed) (privfed/randomness.py's streams).
* **Masks uniform over the whole ring**: ``randint(0, num_range - 1)`` never draws the ring's
  largest element; a mask that is not uniform leaks about what it masks.
* **X25519 key agreement and ChaCha20-Poly1305** for the shares in transit (associated data:
  sender and receiver), where Flower uses ECDH on SECP384R1 and Fernet; both are sound, these
  are smaller and faster.
* **Shamir sharing over a prime field** with Python's integers (below), where Flower's uses
  pycryptodome's GF(2^128) multiplied bit by bit in Python: 100x the server's time to unmask.

Stages (each device ``u``, each of its neighbours ``v`` in the SecAgg+ graph):

0. **Graph** (:func:`neighbourhoods`): devices in a random order on a ring, each with the
   ``degree`` nearest (all of them: plain SecAgg). A device's secrets reach only its
   neighbours, so the cost grows with the degree, not the cohort.
1. **Advertise keys**: ``u`` makes two X25519 key pairs, one for its channels to its neighbours,
   one for its pairwise masks, and publishes the public halves.
2. **Share keys**: ``u`` draws a self-mask seed ``b_u`` and splits it and its mask secret key
   into Shamir shares, ``threshold`` of which rebuild each; neighbour ``v`` gets one of each,
   encrypted to ``v``.
3. **Masked input**: ``y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)``
   (mod 2^bits), ``s_uv`` agreed by ``u`` and ``v``. Pairwise masks cancel in the sum.
4. **Unmask**: each surviving device returns, for each neighbour, the share of ``b_u`` if ``u``
   sent its masked input, or the share of ``u``'s mask key if it did not, never both (with both,
   the server could unmask ``u`` alone); the server rebuilds what it may and removes the masks.

Threat model of this module: an honest-but-curious server and up to ``threshold - 1`` colluding
devices in any neighbourhood learn nothing about an honest device's vector beyond the sum of the
round's survivors; fewer than ``threshold`` surviving neighbours of any device abort the round
(nothing is rebuilt). Not covered: a server that lies to different devices about who dropped
(the paper's malicious-secure consistency round, with signatures, is not implemented), the
graph's randomness (the server draws it), and what the timing of replies reveals.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privfed.privacy.invariants import PrivacyInvariantError
from privfed.randomness import RandomStream

SEED_BYTES = 32
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class RoundAborted(RuntimeError):
    """Too few devices survive to rebuild the secrets: nothing is unmasked or released."""


# -- Shamir secret sharing ------------------------------------------------------------------------
# Over the prime field of p = 2^521 - 1, with Python's integers: a share is (x, f(x)) for a random
# polynomial f of degree threshold - 1 with f(0) the secret. Flower's (pycryptodome's GF(2^128),
# multiplied bit by bit in Python) took 70 s of server CPU to rebuild the secrets of one round of
# 100 devices in plain SecAgg (bench/secure_aggregation.py); this field's arithmetic is C's.
_P = 2**521 - 1
_SECRET_BYTES = 32  # every secret shared here: a seed or an X25519 key
_Y_BYTES = 66


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` shares of a 32-byte ``secret``; any ``threshold`` of them rebuild it, fewer say
    nothing about it (each coefficient uniform from the OS's CSPRNG)."""
    if len(secret) != _SECRET_BYTES:
        raise ValueError(f"shamir: a {_SECRET_BYTES}-byte secret expected, got {len(secret)}")
    if not 1 <= threshold <= num < 2**32:
        raise ValueError(f"shamir: threshold {threshold} of {num} shares")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(_P) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % _P
        shares.append(x.to_bytes(4, "big") + y.to_bytes(_Y_BYTES, "big"))
    return shares


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret the ``shares`` interpolate at 0; ValueError when they cannot be one (too few
    shares interpolate to some other number, almost surely not a 32-byte one)."""
    points = [(int.from_bytes(s[:4], "big"), int.from_bytes(s[4:], "big")) for s in shares]
    if len({x for x, _ in points}) != len(points) or any(len(s) != 4 + _Y_BYTES for s in shares):
        raise ValueError("shamir: malformed or repeated shares")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * -xj % _P
                den = den * (xi - xj) % _P
        secret = (secret + yi * num * pow(den, -1, _P)) % _P
    if secret >= 2 ** (8 * _SECRET_BYTES):
        raise ValueError("Failed to combine shares")
    return secret.to_bytes(_SECRET_BYTES, "big")


# -- shared primitives ---------------------------------------------------------------------------
def mask(seed: bytes, dim: int, bits: int) -> torch.Tensor:
    """``dim`` elements uniform on Z_(2^bits) (int64), from the ChaCha20 keystream under
    SHA-256(seed): every bit of the seed matters, and the draws are uniform on the whole ring."""
    if not 1 <= bits <= 62:
        raise ValueError(f"secagg: bits must be in [1, 62] (int64 sums), got {bits}")
    stream = RandomStream(hashlib.sha256(seed).digest(), secret=True, purpose="secagg-mask")
    words = stream.words(dim) >> np.uint64(64 - bits)  # the top bits of the keystream
    return torch.from_numpy(words.astype(np.int64))


def _agree(own: X25519PrivateKey, peer: bytes, purpose: bytes) -> bytes:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer))
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"privfed-secagg-" + purpose).derive(shared)


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


def _secret(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _ids(src: int, dst: int) -> bytes:
    return src.to_bytes(8, "little") + dst.to_bytes(8, "little")


def neighbourhoods(
    devices: Sequence[int], degree: int, order: random.Random
) -> dict[int, frozenset[int]]:
    """SecAgg+'s graph as Flower builds it: the devices in a random order on a ring, each joined
    to the ``degree // 2`` before and after it (``degree`` >= n - 1: everyone, plain SecAgg).
    A device is not its own neighbour."""
    ring = list(devices)
    order.shuffle(ring)
    n, half = len(ring), min(degree, len(ring) - 1) // 2
    if degree >= n - 1:
        return {d: frozenset(ring) - {d} for d in ring}
    return {
        d: frozenset(ring[(i + k) % n] for k in range(-half, half + 1) if k != 0)
        for i, d in enumerate(ring)
    }


# -- a device ------------------------------------------------------------------------------------
def _new_secret() -> bytes:
    return _secret(X25519PrivateKey.generate())


@dataclass
class Device:
    """One device's side of a round: its keys and secrets (they leave it only as shares), its
    neighbours' advertised keys, the shares its neighbours sent it, and which kind of share it
    has revealed for whom. Plain data (:meth:`to_dict`): a device keeps it between the round's
    messages (a Flower node's context)."""

    device_id: int
    bits: int
    threshold: int = 0  # set with the neighbours, stage 2
    channel_secret: bytes = field(default_factory=_new_secret, repr=False)
    mask_secret: bytes = field(default_factory=_new_secret, repr=False)
    self_seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES), repr=False)
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    revealed: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def _channel(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.channel_secret)

    @property
    def _mask_key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.mask_secret)

    def advertise(self) -> tuple[bytes, bytes]:
        """Stage 1: (channel public key, mask public key)."""
        return _public(self._channel), _public(self._mask_key)

    def share_keys(self, keys: dict[int, tuple[bytes, bytes]], threshold: int) -> dict[int, bytes]:
        """Stage 2: given its neighbours' advertised keys, one encrypted share of the self-mask
        seed and of the mask secret key for each neighbour (and one kept); ``threshold`` of the
        shares rebuild each secret."""
        if self.keys:
            raise PrivacyInvariantError(f"device {self.device_id}: asked to share its keys twice")
        self.keys = {v: k for v, k in keys.items() if v != self.device_id}
        self.threshold = threshold
        holders = sorted([*self.keys, self.device_id])
        if not 2 <= threshold <= len(holders):
            raise RoundAborted(
                f"device {self.device_id}: threshold {threshold} with {len(holders)} holders"
            )
        seeds = create_shares(self.self_seed, threshold, len(holders))
        secret_keys = create_shares(self.mask_secret, threshold, len(holders))
        out = {}
        for holder, b_share, sk_share in zip(holders, seeds, secret_keys, strict=True):
            if holder == self.device_id:
                self.held[holder] = (b_share, sk_share)
                continue
            key = _agree(self._channel, self.keys[holder][0], b"channel")
            plain = len(b_share).to_bytes(4, "little") + b_share + sk_share
            nonce = os.urandom(12)
            aad = _ids(self.device_id, holder)
            out[holder] = nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, aad)
        return out

    def receive_shares(self, ciphertexts: dict[int, bytes]) -> None:
        """Stage 2, delivered: decrypt and keep each neighbour's shares (an altered or
        misrouted ciphertext fails authentication)."""
        for src, blob in ciphertexts.items():
            if src not in self.keys:
                raise PrivacyInvariantError(f"device {self.device_id}: shares from a stranger")
            key = _agree(self._channel, self.keys[src][0], b"channel")
            plain = ChaCha20Poly1305(key).decrypt(blob[:12], blob[12:], _ids(src, self.device_id))
            n = int.from_bytes(plain[:4], "little")
            self.held[src] = (plain[4 : 4 + n], plain[4 + n :])

    def masked_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 3: ``x`` (int64 on Z_(2^bits)) plus its self mask and its pairwise masks with
        every neighbour whose shares it holds (those that reached stage 2)."""
        ring = 2**self.bits
        y = torch.remainder(x + mask(self.self_seed, x.numel(), self.bits), ring)
        for v in self.held:
            if v == self.device_id:
                continue
            seed = _agree(self._mask_key, self.keys[v][1], b"mask")
            pairwise = mask(seed, x.numel(), self.bits)
            y = torch.remainder(y + pairwise if self.device_id < v else y - pairwise, ring)
        return y

    def unmask_shares(
        self, survived: Iterable[int], dropped: Iterable[int], min_survivors: int = 0
    ) -> dict[int, bytes]:
        """Stage 4: for each neighbour that sent its masked input, its self-mask seed's share;
        for each that did not, its mask key's share. Refuses to reveal both for one device,
        also across calls, and to answer when fewer than ``threshold`` (or ``min_survivors``,
        the survivors whose noise this device counted on) are said to survive."""
        survived, dropped = set(survived), set(dropped)
        if survived & dropped:
            raise PrivacyInvariantError(
                f"device {self.device_id}: a device both survived and dropped"
            )
        if len(survived) < max(self.threshold, min_survivors):
            raise RoundAborted(
                f"device {self.device_id}: {len(survived)} survivors, fewer than the threshold "
                f"{self.threshold} or the {min_survivors} whose noise it counted on"
            )
        out = {}
        for u, (b_share, sk_share) in self.held.items():
            kind = "seed" if u in survived else "key" if u in dropped else None
            if kind is None:
                continue
            if self.revealed.setdefault(u, kind) != kind:
                raise PrivacyInvariantError(
                    f"device {self.device_id}: asked for both secrets of device {u}"
                )
            out[u] = b_share if kind == "seed" else sk_share
        return out

    # -- kept between messages ----------------------------------------------------------------
    def to_dict(self) -> dict[str, int | bytes | list[int] | list[bytes] | list[str]]:
        """Ints, bytes and lists of them (what a Flower ConfigRecord holds)."""
        return {
            "device_id": self.device_id,
            "bits": self.bits,
            "threshold": self.threshold,
            "channel_secret": self.channel_secret,
            "mask_secret": self.mask_secret,
            "self_seed": self.self_seed,
            "key_ids": list(self.keys),
            "channel_keys": [k[0] for k in self.keys.values()],
            "mask_keys": [k[1] for k in self.keys.values()],
            "held_ids": list(self.held),
            "held_seeds": [h[0] for h in self.held.values()],
            "held_keys": [h[1] for h in self.held.values()],
            "revealed_ids": list(self.revealed),
            "revealed_kinds": list(self.revealed.values()),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Device:
        return cls(
            device_id=int(d["device_id"]),
            bits=int(d["bits"]),
            threshold=int(d["threshold"]),
            channel_secret=bytes(d["channel_secret"]),
            mask_secret=bytes(d["mask_secret"]),
            self_seed=bytes(d["self_seed"]),
            keys=dict(
                zip(d["key_ids"], zip(d["channel_keys"], d["mask_keys"], strict=True), strict=True)
            ),
            held=dict(
                zip(d["held_ids"], zip(d["held_seeds"], d["held_keys"], strict=True), strict=True)
            ),
            revealed=dict(zip(d["revealed_ids"], d["revealed_kinds"], strict=True)),
        )


# -- the server ----------------------------------------------------------------------------------
def unmask_sum(
    masked: dict[int, torch.Tensor],
    shares: dict[int, dict[int, bytes]],
    keys: dict[int, tuple[bytes, bytes]],
    neighbours: dict[int, frozenset[int]],
    shared: Iterable[int],
    threshold: int,
    bits: int,
) -> torch.Tensor:
    """Stage 4 on the server: the sum over Z_(2^bits) of the inputs of the devices in
    ``masked``. ``shares[v]``: what surviving device ``v`` revealed (owner -> share); ``keys``:
    the advertised keys; ``shared``: the devices that reached stage 2 (their masks are in
    their neighbours' vectors). Raises :class:`RoundAborted` when a secret it needs has fewer
    than ``threshold`` shares."""
    ring = 2**bits
    dim = next(iter(masked.values())).numel()
    total = torch.zeros(dim, dtype=torch.int64)
    for y in masked.values():
        total = torch.remainder(total + y, ring)
    by_owner: dict[int, list[bytes]] = {}
    for revealed in shares.values():
        for owner, share in revealed.items():
            by_owner.setdefault(owner, []).append(share)
    for u in shared:
        got = by_owner.get(u, [])
        if len(got) < threshold:
            raise RoundAborted(f"device {u}: {len(got)} shares < threshold {threshold}")
        secret = combine_shares(got)
        if u in masked:  # survived: remove its self mask
            total = torch.remainder(total - mask(secret, dim, bits), ring)
            continue
        # dropped after sharing: its pairwise masks sit in its surviving neighbours' vectors
        key = X25519PrivateKey.from_private_bytes(secret)
        for v in neighbours[u]:
            if v not in masked:
                continue
            pairwise = mask(_agree(key, keys[v][1], b"mask"), dim, bits)
            # v added +mask if v < u, -mask if v > u: undo it
            total = torch.remainder(total - pairwise if v < u else total + pairwise, ring)
    return total
