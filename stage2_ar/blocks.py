"""Llama-style transformer block shared by the inter and intra transformers, and its KV cache.

Block = x + drop(wo(attn(rope(q), rope(k), v))) over RMSNorm(x), then x + drop(SwiGLU(RMSNorm(x))).
No biases anywhere, fused qkv projection, n_kv_head = n_head, attention dropout 0 (as the official model).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stage2_ar.rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (stable under bf16/fp16 autocast), cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class KVCache:
    """Preallocated keys/values for every block of one transformer: per layer (B, H, max_len, head_dim).

    Buffers are allocated at the first write of each layer, with the dtype the keys come in (so the cache
    follows autocast), then reused: writing slots [start, start+L) and reading [0, start+L).
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.k = [None] * n_layers
        self.v = [None] * n_layers

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor, start: int):
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of length {self.max_len} is full (writing up to {end})")
        if self.k[i] is None or self.k[i].dtype != k.dtype or self.k[i].shape[:2] != k.shape[:2]:
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self.k[i] = k.new_zeros(shape)
            self.v[i] = v.new_zeros(shape)
        self.k[i][:, :, start:end] = k
        self.v[i][:, :, start:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end], None  # no mask: every key returned is valid

    def layer(self, i: int):
        return lambda k, v, start: self.update(i, k, v, start)


class StaticKVCache(nn.Module):
    """Fixed-shape keys/values for one transformer, as buffers: (B, H, max_len, head_dim) per layer.

    For a compiled, graph-captured decode step: one query position at a time, written with ``index_copy_``
    at a position *tensor* (no shape changes, no recompiles), and attention over all ``max_len`` slots with a
    mask of the slots written so far. Unwritten slots are zeros masked out, so the result equals ``KVCache``'s
    up to the order of float sums.
    """

    def __init__(self, n_layers: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.n_layers = n_layers
        shape = (batch, n_head, max_len, head_dim)
        for i in range(n_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Write the (B, H, 1, hd) key/value of position ``pos`` (a (1,) long tensor); all slots + mask."""
        keys, values = getattr(self, f"k{i}"), getattr(self, f"v{i}")
        keys.index_copy_(2, pos, k.to(keys.dtype))
        values.index_copy_(2, pos, v.to(values.dtype))
        return keys, values, (self.slots <= pos)[None, :]

    def layer(self, i: int):
        return lambda k, v, pos: self.update(i, k, v, pos)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, resid_dropout: float):
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)  # rows [q | k | v], each head-major
        self.wo = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(resid_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        """x (B, L, D) at positions start .. start+L-1; ``rope`` holds the rows of those positions.

        Without a cache the L positions attend causally among themselves (``start`` must be 0). With a
        cache (``KVCache.layer(i)``), their keys/values are written at [start, start+L) and the queries
        attend to everything cached up to themselves.
        """
        b, L, d = x.shape
        q, k, v = self.wqkv(x).view(b, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values, mask = cache(k, v, start)  # all positions 0 .. start+L-1 (a static cache: a mask)
            if mask is None and L > 1:  # the new queries see every cached key plus the new ones up to themselves
                end = start + L
                mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.drop(self.wo(y.transpose(1, 2).reshape(b, L, d)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, dim: int, n_head: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_head, dropout)
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = FeedForward(dim, hidden, dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, start)
        return x + self.ffn(self.ffn_norm(x))
