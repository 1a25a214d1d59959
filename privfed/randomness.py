"""Randomness: secret and fresh for every privacy mechanism, seeded for everything public.

docs/algorithms.md, "Randomness". A DP guarantee holds only against someone who cannot predict the
mechanism's random draws: whoever can regenerate a noise draw subtracts it and reads the clipped
sum in the clear. The server always has the run's config, so nothing a mechanism draws may be a
function of it.

* :meth:`RandomStream.secret`: Poisson sampling, Gaussian noise, RQM's level sampling and
  randomized rounding, Fed-SB's init noise. A ChaCha20 keystream (RFC 8439, from
  ``cryptography``) under a fresh 256-bit key from the OS (``os.urandom``, the source
  ``secrets`` uses), one stream per purpose per release. The key is never stored, logged,
  pickled or sent; nothing else can re-create the stream.
* :meth:`RandomStream.public`: what may and should be reproducible, e.g. ``privacy=none`` runs. The
  key is SHA-256 of (purpose, run seed, ids): a separate stream per purpose and per
  (client, round), and no two purposes share draws (no ``seed + k`` offsets that collide).
* :func:`public_seed`: a 63-bit seed for a library that takes an integer (model initialisation,
  data splits, flwr-datasets partitioners, client sampling); public purposes only.

Why not ``torch.Generator().manual_seed(secrets.randbits(64))``: torch's CPU generator (MT19937)
keeps only the low 32 bits of its seed (a test shows it), so a server could try all 2^32 seeds;
and MT19937 is linear over GF(2), so its state can be solved for from enough output bits, which
a release with large noise gives away approximately. A CSPRNG has neither weakness.

Gaussian draws follow Opacus' ``secure_mode`` construction (Holohan and Braghin 2021, as in
Opacus' ``_generate_noise``): the sum of four N(0, std^2) draws divided by two, each draw by
Box-Muller from 53-bit uniforms in float64, so the float pattern of one draw does not reveal the
value it was added to (the floating-point attacks of Jin et al. 2022).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_DOMAIN = b"privfed/randomness/v1\0"
_TWO_PI = 2.0 * math.pi
KEY_BYTES = 32  # 256-bit keys: ChaCha20's


def os_key() -> bytes:
    """A fresh key from the operating system's CSPRNG (what ``secrets`` reads too)."""
    return os.urandom(KEY_BYTES)


def _public_key(seed: int, purpose: str, ids: Sequence[int]) -> bytes:
    text = json.dumps([purpose, int(seed), [int(i) for i in ids]], separators=(",", ":"))
    return hashlib.sha256(_DOMAIN + text.encode()).digest()


def public_seed(seed: int, purpose: str, *ids: int) -> int:
    """A reproducible 63-bit seed for one public purpose (never for a mechanism's draws)."""
    return int.from_bytes(_public_key(seed, purpose, ids)[:8], "little") >> 1


class RandomStream:
    """Uniform, Bernoulli and Gaussian draws from a ChaCha20 keystream.

    Use :meth:`secret` for a mechanism's draws and :meth:`public` for reproducible, public ones.
    Draws are consumed in order: the same key and the same calls give the same values.
    """

    def __init__(self, key: bytes, *, secret: bool, purpose: str) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a RandomStream key is {KEY_BYTES} bytes")
        self._cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self.is_secret = secret
        self.purpose = purpose

    @classmethod
    def secret(cls, purpose: str) -> RandomStream:
        """A fresh stream under a key from the OS's CSPRNG; no argument can reproduce it."""
        return cls(os_key(), secret=True, purpose=purpose)

    @classmethod
    def public(cls, seed: int, purpose: str, *ids: int) -> RandomStream:
        """The reproducible stream of ``purpose`` for (seed, *ids): anyone with the config can
        re-create it, so it must never drive a privacy mechanism."""
        return cls(_public_key(seed, purpose, ids), secret=False, purpose=purpose)

    def __repr__(self) -> str:
        kind = "secret" if self.is_secret else "public"
        return f"RandomStream({kind}, purpose={self.purpose!r})"

    def __reduce__(self):
        # A stream's state is its key: it never leaves the process (checkpoints, Ray, logs).
        raise TypeError(f"{self!r} cannot be pickled or copied: its key never leaves the process")

    def __deepcopy__(self, memo):
        return self.__reduce__()

    # -- draws ---------------------------------------------------------------------------------
    def words(self, n: int) -> np.ndarray:
        """``n`` uniformly random 64-bit words: the keystream itself (SecAgg's masks take
        their top bits)."""
        return np.frombuffer(self._cipher.update(bytes(8 * n)), dtype=np.uint64)

    def uniform(self, shape: int | Sequence[int]) -> torch.Tensor:
        """Uniform on [0, 1) in float64, on a grid of 2^-53."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = math.prod(shape)
        u = (self.words(n) >> np.uint64(11)).astype(np.float64)
        u *= 2.0**-53
        return torch.from_numpy(u).reshape(shape)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """``n`` independent Bernoulli(p) draws (bool)."""
        return self.uniform(n) < p

    def standard_normal(self, n: int) -> torch.Tensor:
        """``n`` independent N(0, 1) draws in float64 (Box-Muller, both outputs used)."""
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        # In place, sqrt(-2 log(1 - u)) and 2 pi u in float64: the draws are a DP-SGD step's
        # largest cost after the model's own compute. numpy's log and sqrt are SIMD and ~3x
        # faster than torch's on float64; torch's cos and sin are ~2.5x faster than numpy's.
        radius = u[:half]  # becomes sqrt(-2 log(1 - u)) in place, through numpy's view of it
        r = radius.numpy()
        np.subtract(1.0, r, out=r)  # 1 - u in (0, 1], exact
        np.log(r, out=r)
        r *= -2.0
        np.sqrt(r, out=r)
        angle = u[half:].mul_(_TWO_PI)
        z = torch.empty(2 * half, dtype=torch.float64)
        torch.cos(angle, out=z[:half]).mul_(radius)
        torch.sin(angle, out=z[half:]).mul_(radius)
        return z[:n]

    def normal(
        self,
        shape: Sequence[int],
        std: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """N(0, std^2) per coordinate: (z1 + z2 + z3 + z4) / 2 of standard normals, in float64,
        then cast (Opacus' secure_mode construction, see the module docstring)."""
        shape = tuple(shape)
        n = math.prod(shape)
        z = self.standard_normal(4 * n).view(4, n).sum(0).div_(2.0).mul_(std)
        return z.to(dtype).reshape(shape).to(device)
