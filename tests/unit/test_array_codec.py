"""privfed/array_codec.py: the arrays Flower's own decoding gives, and for bytes a client
crafted, the same answer as Flower's ``np.load`` (the array, or the error)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from privfed import array_codec


def npy(ndarray: np.ndarray, **save) -> bytes:
    fp = io.BytesIO()
    np.save(fp, ndarray, **save)
    return fp.getvalue()


def crafted(data: bytes, dtype: str = "float32", shape: tuple[int, ...] = (3,)) -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def same_as_flower(array: Array) -> None:
    """Ours and Flower's agree: equal arrays, or the same kind of error."""
    try:
        expected = array.numpy()
    except Exception as err:  # noqa: BLE001
        with pytest.raises(type(err)):
            array_codec.to_numpy(array)
        return
    got = array_codec.to_numpy(array)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "ndarray",
    [
        np.random.default_rng(0).standard_normal((8, 384)).astype(np.float32),
        np.random.default_rng(1).standard_normal((5,)),
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.array(3.5, dtype=np.float32),
        np.zeros((0, 7), dtype=np.float32),
        np.array([True, False]),
        np.arange(6, dtype=">f4"),  # big-endian: its own header
    ],
)
def test_the_same_arrays_as_flowers_own_decoding(ndarray):
    for _ in range(2):  # the header parsed, then from the cache
        same_as_flower(Array(ndarray))
    state = {"b": torch.ones(2, 3), "a": torch.arange(4.0)}
    record = ArrayRecord(state)
    ours = array_codec.to_state(record)
    assert list(ours) == list(record.to_torch_state_dict()) == ["b", "a"]
    assert all(torch.equal(ours[k], state[k]) for k in state)


def test_a_decoded_array_is_a_writable_copy():
    array = Array(np.ones(4, dtype=np.float32))
    got = array_codec.to_numpy(array)
    got[0] = 7.0
    assert array.numpy()[0] == 1.0


def test_bytes_a_client_crafted_get_flowers_answer():
    """Each of these is a reply's array a server may receive; the fast path must never read one
    differently from np.load (allow_pickle=False)."""
    good = npy(np.arange(3, dtype=np.float32))
    array_codec.to_numpy(crafted(good))  # its header is in the cache now
    header_len = len(good) - 12
    cases = [
        good[:-4],  # cut short, under a cached header
        good + b"\0\0\0\0",  # more data than the header declares
        npy(np.array([1, "a"], dtype=object), allow_pickle=True),  # a pickle inside
        npy(np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))),
        good[:8] + (999).to_bytes(2, "little") + good[10:],  # a header length past the end
        good[:header_len].replace(b"'<f4'", b"'xx4'") + good[header_len:],  # no such dtype
        b"\x93NUMPY\x02\x00" + good[8:],  # version 2.0 with a 1.0 length field
        b"not a numpy file at all",
        b"",
    ]
    for data in cases:
        same_as_flower(crafted(data))


def test_the_header_cache_is_bounded():
    for n in range(array_codec._MAX_HEADERS + 50):
        array_codec.to_numpy(Array(np.zeros((1, n + 1), dtype=np.float32)))
    assert len(array_codec._parsed) <= array_codec._MAX_HEADERS
    # past the bound, a new header still decodes, by the slow path
    same_as_flower(Array(np.zeros((3, 5000), dtype=np.float32)))
