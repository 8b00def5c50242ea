"""The one conversion of [-1, 1] float images to uint8, used for PNGs, metrics and sample batches.

Official behaviour (reference §4, §5): the official code saves images as ``(x + 1) / 2 * 255``, clipped to
[0, 255] and cast to uint8, i.e. *truncated*; its tokenizer PSNR is computed on images truncated that way,
its rFID on the unquantised floats.

We *round* instead (half to even, after clamping to [-1, 1]). Truncation is not the inverse of the loaders'
``v / 127.5 - 1``: in float32 it turns levels 1..63 of an untouched image into ``v - 1``, so a perfect
reconstruction would not give back its own pixels; rounding returns every level exactly and is unbiased
(truncation darkens by half a level on average). The price: a saved pixel can be one level above the
official one (where the scaled value's fraction is >= 0.5; tests/shared/test_images.py checks both facts).
"""
from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (any shape, e.g. (B, C, H, W)) -> uint8 tensor of that shape, same device.

    Values outside [-1, 1] saturate at 0 / 255; ``round((x + 1) * 127.5)`` in float32, ties to even.
    """
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float images in [-1, 1] -> (B, H, W, C) uint8 numpy array (PNG / ADM ``.npz`` layout)."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
