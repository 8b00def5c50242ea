"""The no-training baseline: what the same number of bits per image buys without a tokenizer.

An image is shrunk to s x s pixels (bicubic, antialiased), every RGB channel quantised uniformly to q bits,
and enlarged back (bicubic). Its cost is s * s * 3 * q bits. For a budget of B bits (the tokenizer's
tokens x bits per token), the (s, q) with s * s * 3 * q <= B that reconstructs the *training* crops best is
chosen, then measured on the held-out crops with the same metric functions as the tokenizers.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
import torch.nn.functional as F

from stage1_tokenizer.metrics import psnr_per_image, ssim_per_image, to_uint8


def compress(images: torch.Tensor, side: int, qbits: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the same size after the s x s, q-bit round trip, in [-1, 1]."""
    h, w = images.shape[-2:]
    x = (images.float() + 1) / 2
    small = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    levels = (1 << qbits) - 1
    small = (small * levels).round() / levels
    big = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return big * 2 - 1


def candidates(budget_bits: int, max_side: int) -> Iterable[Tuple[int, int]]:
    """Every (side, bits per channel) that fits: per side, the most bits per channel that fit the budget."""
    for side in range(1, max_side + 1):
        q = min(8, budget_bits // (3 * side * side))
        if q >= 1:
            yield side, q


def psnr(images: torch.Tensor, side: int, qbits: int) -> float:
    return float(psnr_per_image(to_uint8(images), to_uint8(compress(images, side, qbits))).mean())


def scores(images: torch.Tensor, side: int, qbits: int) -> Dict[str, float]:
    a, b = to_uint8(images), to_uint8(compress(images, side, qbits))
    return {"psnr": float(psnr_per_image(a, b).mean()), "ssim": float(ssim_per_image(a, b).mean())}


def best_setting(train: torch.Tensor, budget_bits: int) -> Tuple[int, int]:
    """The (side, bits per channel) within the budget with the highest training-crop PSNR."""
    options = list(candidates(budget_bits, train.shape[-1]))
    if not options:
        raise ValueError(f"a budget of {budget_bits} bits cannot hold even one 1-bit RGB pixel")
    return max(options, key=lambda o: psnr(train, *o))


def evaluate(train: torch.Tensor, heldout: torch.Tensor, budget_bits: int) -> Dict[str, float]:
    side, q = best_setting(train, budget_bits)
    return {"side": side, "bits_per_channel": q, "bits_per_image": 3 * side * side * q, **scores(heldout, side, q)}
