"""Reconstruction metrics: PSNR, SSIM, codebook usage / perplexity (reference §5); rFID lives in ``shared``.

Conventions
- Images enter as float tensors in [-1, 1] and are first converted to uint8 by the project's one conversion
  (``shared.images.to_uint8``, re-exported here), so every metric sees what would be saved to disk; PSNR and
  SSIM then use data range 1 (x / 255).
- PSNR is computed per image and averaged over images (the official script computes it per batch by
  mistake, reference §5; per image is the documented intent). A perfect reconstruction is capped at 100 dB.
- SSIM equals ``skimage.metrics.structural_similarity(a, b, data_range=1, channel_axis=-1)``: 7x7 uniform
  window, K1 0.01, K2 0.03, sample covariance (N/(N-1)), mean over the valid window positions and channels.
- rFID: ``shared.inception`` features of originals and reconstructions, ``shared.feature_metrics`` FID, the
  same path as the Stage-2 FID.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.images import to_uint8

__all__ = ["PSNR_CAP_DB", "to_uint8", "psnr_per_image", "ssim_per_image", "CodebookCounter", "batch_usage"]

PSNR_CAP_DB = 100.0


def psnr_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image pair of uint8 tensors (B, C, H, W), data range 1 after /255."""
    diff = (a.double() - b.double()) / 255.0
    mse = diff.pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP_DB / 10)))).float()


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, win: int = 7) -> torch.Tensor:
    """SSIM of each image pair of uint8 tensors (B, C, H, W), skimage's defaults (see module doc)."""
    x, y = a.double() / 255.0, b.double() / 255.0
    n = win * win
    cov_norm = n / (n - 1)  # skimage use_sample_covariance=True
    mean = lambda t: F.avg_pool2d(t, win, stride=1)  # valid positions only = skimage's cropped mean
    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


class CodebookCounter:
    """Exact counts of every token index seen (2^bits bins) -> usage fraction and perplexity."""

    def __init__(self, bits: int):
        self.bits = bits
        self.counts = torch.zeros(2**bits, dtype=torch.int64)

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.detach().flatten().cpu().long(), minlength=2**self.bits)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def usage(self) -> float:
        """Fraction of the 2^bits codes used at least once."""
        return float((self.counts > 0).sum()) / 2**self.bits

    def perplexity(self) -> float:
        """exp(entropy) of the empirical token distribution (nats); 2^bits when all codes are equally used."""
        p = self.counts[self.counts > 0].double() / max(self.total, 1)
        return float(torch.exp(-(p * p.log()).sum()))


def batch_usage(indices: torch.Tensor, bits: int) -> float:
    """Fraction of the 2^bits codes present in one batch (training log)."""
    return float(indices.unique().numel()) / 2**bits
