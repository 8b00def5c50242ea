"""Token bit codec: the one place that knows how LFQ bits, token indices and sub-tokens relate.

Bit order is the official one (Open-MAGVIT2 v2, the paper version): little-endian over latent channels,
channel c is bit c, so index = sum_c [z_c > 0] * 2^c. A sub-token split by bits (6, 12) therefore takes
channels 0-5 as the first sub-token (index & 63) and channels 6-17 as the second (index >> 6).

Everything here works on numpy arrays and torch tensors alike (integer ops only), except the byte packer,
which is numpy (it feeds files) and accepts tensors by converting them.
"""
from __future__ import annotations

from functools import lru_cache
from math import gcd
from typing import Sequence, Tuple, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]

DEFAULT_SPLIT: Tuple[int, ...] = (6, 12)
MAX_BITS = 31  # indices stay non-negative in int32 as well as int64


def _check_bits(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_BITS:
        raise ValueError(f"bits per token must be an integer in [1, {MAX_BITS}], got {k!r}")


def _is_torch(x: Array) -> bool:
    return isinstance(x, torch.Tensor)


def _powers(k: int, like: Array) -> Array:
    if _is_torch(like):
        return torch.tensor([1 << c for c in range(k)], dtype=torch.int64, device=like.device)
    return np.array([1 << c for c in range(k)], dtype=np.int64)


def bits_to_index(bits: Array) -> Array:
    """(..., K) bits, either +-1 or {0, 1}, to (...) int64 indices. A bit is set where the value is > 0."""
    k = bits.shape[-1]
    _check_bits(k)
    on = bits > 0
    if _is_torch(bits):
        return (on.to(torch.int64) * _powers(k, bits)).sum(-1)
    return (on.astype(np.int64) * _powers(k, bits)).sum(-1)


def index_to_bits(index: Array, k: int, signed: bool = True, dtype=None) -> Array:
    """(...) indices to (..., K) bits: +-1 when ``signed`` (the LFQ codebook values), else {0, 1}."""
    _check_bits(k)
    if _is_torch(index):
        on = (index.to(torch.int64).unsqueeze(-1) >> torch.arange(k, device=index.device)) & 1
        dtype = dtype or torch.float32
        return (on * 2 - 1).to(dtype) if signed else on.to(dtype)
    on = (np.asarray(index, dtype=np.int64)[..., None] >> np.arange(k)) & 1
    dtype = dtype or np.float32
    return (on * 2 - 1).astype(dtype) if signed else on.astype(dtype)


def _check_split(split: Sequence[int]) -> Tuple[int, ...]:
    split = tuple(int(b) for b in split)
    if not split or any(b < 1 for b in split):
        raise ValueError(f"sub-token bits must be positive, got {split}")
    _check_bits(sum(split))
    return split


def split_index(index: Array, split: Sequence[int] = DEFAULT_SPLIT) -> Tuple[Array, ...]:
    """Split K-bit indices into sub-tokens, lowest bits first: (6, 12) -> (index & 63, index >> 6)."""
    split = _check_split(split)
    out, shift = [], 0
    for b in split:
        out.append((index >> shift) & ((1 << b) - 1))
        shift += b
    return tuple(out)


def join_index(subtokens: Sequence[Array], split: Sequence[int] = DEFAULT_SPLIT) -> Array:
    """Inverse of :func:`split_index`."""
    split = _check_split(split)
    if len(subtokens) != len(split):
        raise ValueError(f"got {len(subtokens)} sub-tokens for a split of {len(split)}")
    index, shift = None, 0
    for sub, b in zip(subtokens, split):
        term = sub << shift
        index = term if index is None else index | term
        shift += b
    return index


def packed_nbytes(n_tokens: int, k: int) -> int:
    """Bytes that ``n_tokens`` K-bit tokens occupy when packed (256 x 18 bits -> 576)."""
    return (n_tokens * k + 7) // 8


@lru_cache(maxsize=None)
def _word_plan(k: int):
    """Layout of one packing group: g tokens that fill a whole number of bytes (g*k bits).

    The group is assembled in W little-endian uint64 words. Token i starts at bit i*k: word i*k // 64,
    shift i*k % 64, spilling into the next word when it crosses a word boundary. Packing and unpacking are
    then a few whole-array shifts and ORs per token (18 bits: 4 tokens -> 9 bytes in 2 words).
    """
    g = 8 // gcd(k, 8)
    nbytes = g * k // 8
    words = -(-nbytes // 8)
    plan = tuple(((i * k) // 64, (i * k) % 64, (i * k) % 64 + k > 64) for i in range(g))
    return g, nbytes, words, plan


def pack_tokens(indices: Array, k: int = 18) -> np.ndarray:
    """Pack a 1-D sequence of K-bit indices into a little-endian bit stream (uint8 array).

    Token t occupies stream bits [t*k, (t+1)*k), least significant bit first; the last byte is zero
    padded. Values outside [0, 2^k) are an error.
    """
    _check_bits(k)
    if _is_torch(indices):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise ValueError(f"pack_tokens takes a 1-D sequence, got shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= (1 << k)):
        raise ValueError(f"token values must lie in [0, 2^{k}), got range [{idx.min()}, {idx.max()}]")
    g, nbytes, nwords, plan = _word_plan(k)
    n = idx.size
    groups = -(-n // g)
    cols = np.zeros((groups * g,), dtype=np.uint64)
    cols[:n] = idx
    cols = cols.reshape(groups, g)
    words = np.zeros((groups, nwords), dtype="<u8")
    for i, (w, shift, spills) in enumerate(plan):
        t = cols[:, i]
        words[:, w] |= t << np.uint64(shift)
        if spills:
            words[:, w + 1] |= t >> np.uint64(64 - shift)
    as_bytes = words.view(np.uint8)
    return np.ascontiguousarray(as_bytes[:, :nbytes]).reshape(-1)[: packed_nbytes(n, k)]


def unpack_tokens(data: Union[bytes, bytearray, memoryview, np.ndarray], n_tokens: int, k: int = 18) -> np.ndarray:
    """Inverse of :func:`pack_tokens`: ``n_tokens`` int64 indices from the packed bytes."""
    _check_bits(k)
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.astype(np.uint8, copy=False)
    need = packed_nbytes(n_tokens, k)
    if buf.size != need:
        raise ValueError(f"{n_tokens} tokens of {k} bits need {need} bytes, got {buf.size}")
    g, nbytes, nwords, plan = _word_plan(k)
    groups = -(-n_tokens // g)
    if need != groups * nbytes:  # a partial last group: zero-pad it
        buf = np.concatenate([buf, np.zeros(groups * nbytes - need, dtype=np.uint8)])
    rows = np.zeros((groups, nwords * 8), dtype=np.uint8)
    rows[:, :nbytes] = buf.reshape(groups, nbytes)
    words = np.ascontiguousarray(rows.view("<u8").T)  # (nwords, groups): each word a contiguous row
    mask = np.uint64((1 << k) - 1)
    out = np.empty((groups, g), dtype=np.int64)
    for i, (w, shift, spills) in enumerate(plan):
        t = words[w] >> np.uint64(shift)
        if spills:
            t |= words[w + 1] << np.uint64(64 - shift)
        t &= mask
        out[:, i] = t
    return out.reshape(-1)[:n_tokens]
