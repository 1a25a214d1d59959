"""SecAgg+ (privacy/secagg.py): the sum comes out right with and without dropouts, and the
attacks the protocol exists to stop fail. Real cryptography throughout (X25519, ChaCha20-Poly1305,
Shamir sharing over a prime field); only the message transport is replaced by dictionaries."""

from __future__ import annotations

import random

import pytest
import torch
from cryptography.exceptions import InvalidTag

from privfed.privacy import distributed_dg as ddg
from privfed.privacy import secagg
from privfed.privacy.invariants import PrivacyInvariantError
from privfed.randomness import RandomStream

BITS = 32


def _inputs(n: int, dim: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 1000 + dim)
    return {100 + i: torch.randint(0, 2**BITS, (dim,), generator=g) for i in range(n)}


def _round(
    x: dict[int, torch.Tensor],
    degree: int,
    threshold: int,
    before_sharing=(),
    before_masking=(),
    after_masking=(),
):
    """One round with every message passed by hand; devices in ``before_sharing`` vanish after
    advertising keys, ``before_masking`` after sharing them, ``after_masking`` after sending
    their masked input. Returns (the server's sum, the survivors, the devices, the views)."""
    graph = secagg.neighbourhoods(list(x), degree, random.Random(5))
    devices = {d: secagg.Device(d, BITS) for d in x}
    keys = {d: dev.advertise() for d, dev in devices.items()}
    outbox = {
        d: dev.share_keys({v: keys[v] for v in graph[d]}, threshold)
        for d, dev in devices.items()
        if d not in before_sharing
    }
    shared = set(outbox)
    for d in shared:  # the server routes each ciphertext to its addressee
        devices[d].receive_shares({src: out[d] for src, out in outbox.items() if d in out})
    masked = {d: devices[d].masked_input(x[d]) for d in shared - set(before_masking)}
    alive = set(masked) - set(after_masking)
    shares = {d: devices[d].unmask_shares(set(masked), shared - set(masked)) for d in sorted(alive)}
    total = secagg.unmask_sum(masked, shares, keys, graph, shared, threshold, BITS)
    return total, set(masked), devices, {"keys": keys, "outbox": outbox, "masked": masked}


def _sum(x: dict[int, torch.Tensor], who) -> torch.Tensor:
    return torch.remainder(torch.stack([x[d] for d in who]).sum(0), 2**BITS)


@pytest.mark.parametrize(("n", "degree", "threshold"), [(5, 4, 3), (12, 4, 3), (20, 6, 4)])
def test_the_server_learns_the_sum(n, degree, threshold):
    x = _inputs(n, 257)
    total, survivors, _, _ = _round(x, degree, threshold)
    assert survivors == set(x)
    torch.testing.assert_close(total, _sum(x, x))


def test_dropouts_before_and_after_masking_still_give_the_survivors_sum():
    x = _inputs(12, 100)
    ids = sorted(x)
    total, survivors, _, _ = _round(
        x, 6, 3, before_sharing=[ids[0]], before_masking=[ids[3]], after_masking=[ids[7]]
    )
    # ids[7] sent its masked input, then vanished: its input is in the sum, its mask removed
    assert survivors == set(ids) - {ids[0], ids[3]}
    torch.testing.assert_close(total, _sum(x, survivors))


def test_too_many_dropouts_abort_the_round():
    x = _inputs(8, 50)
    ids = sorted(x)
    with pytest.raises(secagg.RoundAborted):
        _round(x, 4, 3, before_masking=ids[:4], after_masking=ids[4:7])


def test_a_masked_input_alone_reveals_nothing_of_its_input():
    x = _inputs(6, 4000)
    _, _, _, view = _round(x, 4, 3)
    for d, y in view["masked"].items():
        assert float((y == x[d]).double().mean()) < 0.01  # with the masks removed: 1.0
        top = (y >> (BITS - 4)).bincount(minlength=16).double() / y.numel()
        assert float((top - 1 / 16).abs().max()) < 0.03  # uniform on the ring


def _shared(ids, degree: int, threshold: int, bits: int, seed: int):
    """Stages 1 and 2 for every device, the shares delivered: (graph, devices, keys)."""
    graph = secagg.neighbourhoods(list(ids), degree, random.Random(seed))
    devices = {d: secagg.Device(d, bits) for d in ids}
    keys = {d: dev.advertise() for d, dev in devices.items()}
    outbox = {
        d: dev.share_keys({v: keys[v] for v in graph[d]}, threshold) for d, dev in devices.items()
    }
    for d in ids:
        devices[d].receive_shares({src: out[d] for src, out in outbox.items() if d in out})
    return graph, devices, keys


def test_fewer_shares_than_the_threshold_rebuild_nothing():
    x = _inputs(6, 64)
    graph, devices, keys = _shared(x, 5, 4, BITS, seed=1)
    masked = {d: dev.masked_input(x[d]) for d, dev in devices.items()}
    target = sorted(x)[0]
    # colluders: threshold - 1 devices give the server their shares of the target's seed
    shares = {d: devices[d].unmask_shares(set(x), set()) for d in sorted(x)[1:4]}
    with pytest.raises(secagg.RoundAborted, match="shares < threshold"):
        secagg.unmask_sum({target: masked[target]}, shares, keys, graph, [target], 4, BITS)
    got = [s[target] for s in shares.values()]
    try:
        rebuilt = secagg.combine_shares(got)
    except ValueError:  # its padding check fails, most of the time
        rebuilt = None
    assert rebuilt != devices[target].self_seed  # what the server wants


def test_a_device_never_reveals_both_secrets_of_one_neighbour():
    """The server's attack: call a device that sent its masked input 'dropped', rebuild its mask
    key from the others' shares, and its self mask from what it revealed before: its input in
    the clear. Each device answers one kind per neighbour, once and for all."""
    x = _inputs(5, 16)
    _, _, devices, _ = _round(x, 4, 3)
    victim, asked = sorted(x)[0], devices[sorted(x)[1]]
    with pytest.raises(PrivacyInvariantError, match="both secrets"):
        asked.unmask_shares(set(x) - {victim}, {victim})  # it revealed the seed's share already
    with pytest.raises(PrivacyInvariantError, match="both survived and dropped"):
        asked.unmask_shares(set(x), {victim})


def test_a_share_in_transit_is_bound_to_its_sender_and_receiver():
    x = _inputs(5, 8)
    graph = secagg.neighbourhoods(list(x), 4, random.Random(2))
    devices = {d: secagg.Device(d, BITS) for d in x}
    keys = {d: dev.advertise() for d, dev in devices.items()}
    a, b, c = sorted(x)[:3]
    outbox = {d: dev.share_keys({v: keys[v] for v in graph[d]}, 3) for d, dev in devices.items()}
    devices[b].receive_shares({a: outbox[a][b]})  # as sent: accepted
    with pytest.raises(InvalidTag):  # b's ciphertext replayed as if from c: rejected
        devices[b].receive_shares({c: outbox[a][b]})


def test_flowers_mask_generator_keeps_32_bits_of_its_seed_and_ours_all():
    """Why privfed does not use Flower's ``pseudo_rand_gen``: it XOR-folds the seed to 32 bits
    (two seeds with the same fold give the same mask; 2^32 guesses find any mask) and draws
    from [0, range - 1), so on a 1-bit ring every 'mask' is 0."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    one = bytes(range(32))
    other = bytes([one[0] ^ 0xFF, *one[1:4], one[4] ^ 0xFF, *one[5:]])  # same XOR fold
    assert one != other
    flower = [pseudo_rand_gen(s, 2**BITS, [(64,)])[0] for s in (one, other)]
    assert (flower[0] == flower[1]).all()
    assert not torch.equal(secagg.mask(one, 64, BITS), secagg.mask(other, 64, BITS))
    assert pseudo_rand_gen(one, 2, [(1000,)])[0].max() == 0
    assert 0.4 < float(secagg.mask(one, 1000, 1).double().mean()) < 0.6


def test_the_distributed_discrete_gaussian_through_secure_aggregation():
    """Each device's lattice share (privacy/distributed_dg.py) through the protocol: the server
    decodes exactly what the ring sum of the shares decodes to."""
    bits, gamma = 24, 0.01
    updates = {
        100 + i: torch.randn(300, generator=torch.Generator().manual_seed(i)) for i in range(8)
    }
    shares = {
        d: ddg.device_share(
            u, 1.0, gamma, 0.05, 0.1, bits, RandomStream.secret("r"), RandomStream.secret("n")
        )
        for d, u in updates.items()
    }
    graph, devices, keys = _shared(shares, 4, 3, bits, seed=3)
    masked = {d: devices[d].masked_input(s) for d, s in shares.items()}
    revealed = {d: devices[d].unmask_shares(set(masked), set()) for d in masked}
    total = secagg.unmask_sum(masked, revealed, keys, graph, set(masked), 3, bits)
    expected = ddg.decode(ddg.ring_sum(list(shares.values()), bits), gamma, bits)
    torch.testing.assert_close(ddg.decode(total, gamma, bits), expected)
    clipped = torch.stack([ddg.clip_l2(u, 1.0) for u in updates.values()]).sum(0)
    assert float((ddg.decode(total, gamma, bits) - clipped).std()) < 0.3  # noise ~ 0.14


def test_a_device_kept_between_messages_is_the_same_device():
    x = _inputs(5, 32)
    graph = secagg.neighbourhoods(list(x), 4, random.Random(4))
    devices = {d: secagg.Device(d, BITS) for d in x}
    keys = {d: dev.advertise() for d, dev in devices.items()}
    outbox = {d: dev.share_keys({v: keys[v] for v in graph[d]}, 3) for d, dev in devices.items()}
    # every stage from a device rebuilt from what it kept (as a Flower node's context holds it)
    devices = {d: secagg.Device.from_dict(dev.to_dict()) for d, dev in devices.items()}
    for d in x:
        devices[d].receive_shares({src: out[d] for src, out in outbox.items() if d in out})
    devices = {d: secagg.Device.from_dict(dev.to_dict()) for d, dev in devices.items()}
    masked = {d: dev.masked_input(x[d]) for d, dev in devices.items()}
    revealed = {d: devices[d].unmask_shares(set(masked), set()) for d in masked}
    total = secagg.unmask_sum(masked, revealed, keys, graph, set(masked), 3, BITS)
    torch.testing.assert_close(total, _sum(x, x))
    again = secagg.Device.from_dict(devices[sorted(x)[0]].to_dict())
    with pytest.raises(PrivacyInvariantError, match="both secrets"):  # what it revealed is kept
        again.unmask_shares(set(x) - {sorted(x)[1]}, {sorted(x)[1]})


@pytest.mark.parametrize(("threshold", "num"), [(2, 2), (3, 5), (11, 21), (50, 99)])
def test_shamir_shares_rebuild_the_secret_from_any_threshold_of_them(threshold, num):
    secret = bytes(random.Random(threshold).randrange(256) for _ in range(32))
    shares = secagg.create_shares(secret, threshold, num)
    pick = random.Random(num)
    for _ in range(5):
        assert secagg.combine_shares(pick.sample(shares, threshold)) == secret
    # threshold - 1 shares: every secret is as likely (the missing share could be anything), so
    # what they interpolate is not the secret
    fewer = pick.sample(shares, threshold - 1) if threshold > 1 else []
    if fewer:
        try:
            assert secagg.combine_shares(fewer) != secret
        except ValueError:
            pass  # interpolated to a number too large for a secret
    with pytest.raises(ValueError, match="repeated"):
        secagg.combine_shares([shares[0], shares[0]])
