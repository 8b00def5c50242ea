"""2D rotary position embedding as the official model (LlamaGen lineage) uses it.

A table of ``1 + h*w`` rows of ``head_dim / 2`` (cos, sin) pairs:
- row 0 is the class (start) slot. In the official code it is all zeros, cos = sin = 0, so the rotation
  multiplies q and k of that slot by zero in every layer: its attention logit is always 0 and only its value
  reaches later positions. ``zero_cls=False`` gives it the identity rotation instead (not the official one).
- row 1 + r*w + c is grid position (r, c). The first half of the pairs rotates with the row r, the second
  half with the column c, each with frequencies base^(-2k / (head_dim/2)), k = 0 .. head_dim/4 - 1
  (head_dim 64: 16 frequencies 10000^(-2k/32) per axis).
- pairs are adjacent dimensions (2i, 2i+1), not the rotate-half layout.

The intra transformer reuses rows 0 .. M-1 of the same table: its position 0 (the context vector) gets the
zero rotation and position 1 gets row 1 = grid (0, 0) = the identity.
"""
from __future__ import annotations

import torch


def rope_table(grid: tuple, head_dim: int, base: float = 10000.0, zero_cls: bool = True) -> torch.Tensor:
    """(1 + h*w, head_dim // 2, 2) float32 table of (cos, sin)."""
    h, w = grid
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(0, 2 * quarter, 2, dtype=torch.float32) / (2 * quarter))  # (quarter,)
    rows = torch.arange(h, dtype=torch.float32)[:, None, None] * freqs            # (h, 1, quarter)
    cols = torch.arange(w, dtype=torch.float32)[None, :, None] * freqs            # (1, w, quarter)
    angles = torch.cat([rows.expand(h, w, quarter), cols.expand(h, w, quarter)], dim=-1).reshape(h * w, 2 * quarter)
    grid_rows = torch.stack([angles.cos(), angles.sin()], dim=-1)
    cls = torch.zeros(1, 2 * quarter, 2)
    if not zero_cls:
        cls[..., 0] = 1.0
    return torch.cat([cls, grid_rows], dim=0)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` (B, H, L, head_dim) by ``table`` (L, head_dim // 2, 2); math in fp32."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[..., 0], table[..., 1]
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.flatten(-2).type_as(x)
