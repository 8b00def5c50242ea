import itertools

import numpy as np
import pytest
import torch

from shared import tokens as T


# --- slow references, written independently of the codec -------------------------------------------
def ref_index(bits01):
    return sum(int(b) << c for c, b in enumerate(bits01))


def ref_pack(values, k):
    stream = "".join(format(int(v), f"0{k}b")[::-1] for v in values)  # LSB first per token
    stream += "0" * (-len(stream) % 8)
    return bytes(int(stream[i:i + 8][::-1], 2) for i in range(0, len(stream), 8))


def ref_split(v, split):
    out = []
    for b in split:
        out.append(v % (1 << b))
        v //= 1 << b
    return tuple(out)


@pytest.mark.parametrize("k", range(1, 11))
def test_bits_index_exhaustive(k):
    every = np.arange(1 << k)
    bits01 = T.index_to_bits(every, k, signed=False)
    assert [ref_index(b) for b in bits01] == list(every)
    for lib in ("numpy", "torch"):
        idx = every if lib == "numpy" else torch.from_numpy(every)
        pm = T.index_to_bits(idx, k)  # +-1 codebook values
        assert set(np.unique(np.asarray(pm)).tolist()) <= {-1.0, 1.0}
        assert (np.asarray(T.bits_to_index(pm)) == every).all()
        assert (np.asarray(T.bits_to_index(T.index_to_bits(idx, k, signed=False))) == every).all()


def test_little_endian_channel_order_k18():
    z = -torch.ones(18)
    z[0] = 1.0
    assert T.bits_to_index(z).item() == 1
    z = -torch.ones(18)
    z[17] = 0.3
    assert T.bits_to_index(z).item() == 1 << 17
    z = torch.zeros(18)  # exactly 0 is "off", as sign quantization maps 0 -> -1
    assert T.bits_to_index(z).item() == 0


def test_bits_index_random_k18_batched():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 16, 16, 18, generator=g)
    idx = T.bits_to_index(z)
    assert idx.shape == (4, 16, 16) and idx.dtype == torch.int64
    flat = (z > 0).reshape(-1, 18).tolist()
    assert idx.reshape(-1).tolist() == [ref_index(b) for b in flat]
    assert torch.equal(T.index_to_bits(idx, 18), torch.where(z > 0, 1.0, -1.0))


@pytest.mark.parametrize("split", [(6, 12), (9, 9), (4, 6, 8), (1, 17), (3, 3, 3, 3)])
def test_split_join(split):
    k = sum(split)
    rng = np.random.default_rng(1)
    v = rng.integers(0, 1 << k, size=5000)
    subs = T.split_index(v, split)
    assert [tuple(int(s[i]) for s in subs) for i in range(50)] == [ref_split(int(x), split) for x in v[:50]]
    for s, b in zip(subs, split):
        assert s.min() >= 0 and s.max() < (1 << b)
    assert (T.join_index(subs, split) == v).all()
    tv = torch.from_numpy(v)
    assert torch.equal(T.join_index(T.split_index(tv, split), split), tv)


def test_default_split_is_official():
    v = torch.arange(1 << 18)
    pre, post = T.split_index(v)
    assert torch.equal(pre, v & 63) and torch.equal(post, v >> 6)
    # pre holds channels 0-5 and post channels 6-17, each little-endian
    bits = T.index_to_bits(v[:1000], 18)
    assert torch.equal(T.bits_to_index(bits[:, :6]), pre[:1000])
    assert torch.equal(T.bits_to_index(bits[:, 6:]), post[:1000])


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8, 9, 12])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 17])
def test_pack_exhaustive_small(k, n):
    rng = np.random.default_rng(k * 100 + n)
    v = rng.integers(0, 1 << k, size=n)
    packed = T.pack_tokens(v, k)
    assert packed.tobytes() == ref_pack(v, k)
    assert len(packed) == T.packed_nbytes(n, k)
    assert (T.unpack_tokens(packed, n, k) == v).all()


def test_pack_every_value_small_k():
    for k in range(1, 11):
        v = np.arange(1 << k)
        assert (T.unpack_tokens(T.pack_tokens(v, k).tobytes(), v.size, k) == v).all()


@pytest.mark.parametrize("k", [18, 13, 24, 31])
def test_pack_random_against_reference(k):
    rng = np.random.default_rng(k)
    v = rng.integers(0, 1 << k, size=257)
    packed = T.pack_tokens(torch.from_numpy(v), k)
    assert packed.tobytes() == ref_pack(v, k)
    assert (T.unpack_tokens(packed, v.size, k) == v).all()


def test_256_tokens_of_18_bits_is_576_bytes():
    v = np.random.default_rng(0).integers(0, 1 << 18, size=256)
    packed = T.pack_tokens(v, 18)
    assert packed.nbytes == 576
    assert (T.unpack_tokens(bytes(packed), 256, 18) == v).all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="range"):
        T.pack_tokens(np.array([1 << 18]), 18)
    with pytest.raises(ValueError, match="range"):
        T.pack_tokens(np.array([-1]), 18)
    with pytest.raises(ValueError, match="576 bytes"):
        T.unpack_tokens(b"\0" * 575, 256, 18)
    with pytest.raises(ValueError):
        T.index_to_bits(np.array([0]), 32)
    with pytest.raises(ValueError):
        T.join_index([np.array([0])], (6, 12))
