"""Stage-1 metrics against independent computations: skimage PSNR/SSIM, brute-force counting.

The FID math and the Inception loading are shared with Stage 2: tests/shared/test_feature_metrics.py,
tests/shared/test_inception.py.
"""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from stage1_tokenizer import metrics


def _pair(seed=0, shape=(4, 3, 37, 29), noise=25):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, shape, generator=g, dtype=torch.int16)
    b = (a + torch.randint(-noise, noise + 1, shape, generator=g, dtype=torch.int16)).clamp(0, 255)
    return a.to(torch.uint8), b.to(torch.uint8)


def test_psnr_matches_skimage_per_image():
    a, b = _pair()
    got = metrics.psnr_per_image(a, b)
    for i in range(a.shape[0]):
        ref = peak_signal_noise_ratio(a[i].numpy() / 255.0, b[i].numpy() / 255.0, data_range=1)
        assert got[i].item() == pytest.approx(ref, abs=1e-4)
    # identical images: capped, not inf
    assert metrics.psnr_per_image(a, a).eq(metrics.PSNR_CAP_DB).all()


def test_psnr_is_on_rounded_uint8_images():
    x = torch.full((1, 3, 8, 8), 0.0)
    y = x + 0.001  # rounds to the same uint8 value (127.5 -> 128 for both)
    assert metrics.to_uint8(x).equal(metrics.to_uint8(y))
    # a shift of one uint8 level everywhere: mse = (1/255)^2 -> 20 log10(255)
    a = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    assert metrics.psnr_per_image(a, a + 1).item() == pytest.approx(20 * math.log10(255), abs=1e-4)


@pytest.mark.parametrize("shape", [(3, 3, 37, 29), (2, 1, 16, 16)])
def test_ssim_matches_skimage(shape):
    a, b = _pair(1, shape, noise=40)
    got = metrics.ssim_per_image(a, b)
    for i in range(shape[0]):
        A, B = a[i].permute(1, 2, 0).numpy() / 255.0, b[i].permute(1, 2, 0).numpy() / 255.0
        ref = structural_similarity(A, B, data_range=1, channel_axis=-1)
        assert got[i].item() == pytest.approx(ref, abs=1e-5)
    assert metrics.ssim_per_image(a, a).sub(1).abs().max() < 1e-6


def test_codebook_usage_and_perplexity_exact():
    bits = 5
    counter = metrics.CodebookCounter(bits)
    seen = [3, 3, 3, 7, 31, 0, 7, 3]
    counter.update(torch.tensor(seen[:4]).view(1, 2, 2))
    counter.update(torch.tensor(seen[4:]).view(2, 2))
    assert counter.total == 8
    assert counter.usage() == len(set(seen)) / 2**bits
    p = np.array([seen.count(v) for v in set(seen)]) / len(seen)
    assert counter.perplexity() == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-12)
    # uniform use of every code: perplexity = codebook size, usage 1
    full = metrics.CodebookCounter(bits)
    full.update(torch.arange(2**bits).repeat(3))
    assert full.usage() == 1.0 and full.perplexity() == pytest.approx(2**bits)
    assert metrics.batch_usage(torch.tensor([[1, 1], [2, 9]]), 4) == 3 / 16
