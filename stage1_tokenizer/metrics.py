"""Reconstruction metrics: PSNR, SSIM, codebook usage / perplexity, and rFID (reference §5).

Conventions
- Images enter as float tensors in [-1, 1] and are first rounded to uint8 (``shared.runlog.to_uint8``),
  so every metric sees what would be saved to disk; PSNR and SSIM then use data range 1 (x / 255).
- PSNR is computed per image and averaged over images (the official script computes it per batch by
  mistake, reference §5; per image is the documented intent). A perfect reconstruction is capped at 100 dB.
- SSIM equals ``skimage.metrics.structural_similarity(a, b, data_range=1, channel_axis=-1)``: 7x7 uniform
  window, K1 0.01, K2 0.03, sample covariance (N/(N-1)), mean over the valid window positions and channels.
- rFID: InceptionV3 pool3 (2048-d) features of originals and reconstructions, Frechet distance of their
  Gaussians. The network comes from torch-fidelity (the TF-ported FID Inception); its weights must be a
  local file - no downloads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 tensor, rounded like the saved PNGs."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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


# ------------------------------------------------------------------------- FID

def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) features (as pytorch-fid / torch-fidelity)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: nudge the diagonals (as pytorch-fid does)
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


class InceptionWeightsMissing(FileNotFoundError):
    """No local InceptionV3 FID weights."""


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the FID Inception


def find_inception_weights(path: Optional[Union[str, Path]] = None) -> Path:
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsMissing(f"InceptionV3 weights not found at {p}")
        return p
    p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not p.is_file():
        raise InceptionWeightsMissing(
            f"rFID needs the FID InceptionV3 weights '{INCEPTION_FILE}' (torch-fidelity format), not found in "
            f"{p.parent}; pass --inception PATH")
    return p


class InceptionFeatures(torch.nn.Module):
    """pool3 features (B, 2048) of uint8 images (B, 3, H, W), via torch-fidelity's FID InceptionV3."""

    def __init__(self, weights: Optional[Union[str, Path]] = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_inception_weights(weights)
        # Check the file holds plain tensors before the library reads it (its own load has no
        # weights_only flag; since torch 2.6 that defaults to True, this makes it explicit).
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict) or "Mixed_7c.branch_pool.conv.weight" not in sd:
            raise InceptionWeightsMissing(f"{path} is not a torch-fidelity InceptionV3 state dict")
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        except RuntimeError as e:  # strict load: wrong or missing keys / shapes
            raise InceptionWeightsMissing(f"{path} does not fit torch-fidelity's InceptionV3: {str(e).splitlines()[0]}") from e
        self.net.eval()

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.net(images_uint8)[0].double()
