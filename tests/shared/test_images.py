"""The one [-1, 1] -> uint8 conversion: edge values, .5 ties, exact round trips, distance to the official rule."""
import numpy as np
import torch

from shared import images, runlog


def _scaled32(x: np.ndarray) -> np.ndarray:
    """(clamp(x) + 1) * 127.5 with float32 rounding at each step, as the conversion computes it."""
    return (np.clip(x, -1, 1).astype(np.float32) + np.float32(1)) * np.float32(127.5)


def test_edge_values_and_saturation():
    x = torch.tensor([-1.0, 1.0, 0.0, -3.0, 2.0, float("-inf"), float("inf"), -0.5, 0.5])
    # 0 -> 127.5 exactly, a tie: to even (128); -0.5 -> 63.75 -> 64; 0.5 -> 191.25 -> 191
    assert images.to_uint8(x).tolist() == [0, 255, 128, 0, 255, 0, 255, 64, 191]


def test_float32_ties_round_to_even_and_near_ties_to_nearest():
    """Inputs whose scaled float32 value lands on, just below or just above k + 0.5, for every k."""
    xs = []
    for k in range(255):
        x0 = np.float32((k + 0.5) / 127.5 - 1)
        for step in range(-3, 4):  # a few float32 neighbours on each side
            x = x0
            for _ in range(abs(step)):
                x = np.nextafter(x, np.float32(np.sign(step) * 2))
            xs.append(x)
    xs = np.array(xs, dtype=np.float32)
    p = _scaled32(xs)
    lo = np.floor(p)
    expect = np.where(p - lo < 0.5, lo, np.where(p - lo > 0.5, lo + 1, np.where(lo % 2 == 0, lo, lo + 1)))
    got = images.to_uint8(torch.from_numpy(xs)).numpy()
    assert (p - lo == 0.5).sum() > 200  # the ties really occur (e.g. x = -0.49411765 -> 64.5 -> 64)
    assert np.array_equal(got, expect.astype(np.uint8))
    # and against the exact (float64) value: never more than half a level away, up to float32 error
    exact = (xs.astype(np.float64) + 1) * 127.5
    assert np.abs(got - exact).max() <= 0.5 + 1e-4


def test_every_level_survives_the_loaders_mapping():
    """v / 127.5 - 1 (Stage-1 loader and dataprep, float32) converts back to v for all 256 levels."""
    from dataprep.images import to_model_input

    v = np.arange(256, dtype=np.uint8)
    x = torch.from_numpy(v.astype(np.float32)) / 127.5 - 1.0
    assert np.array_equal(images.to_uint8(x).numpy(), v)
    # the reason not to truncate like the official code: it loses a level on 1..63 of an untouched image
    xn = x.numpy()
    truncated = np.clip((xn + np.float32(1)) / np.float32(2) * np.float32(255), 0, 255).astype(np.uint8)
    assert np.nonzero(truncated != v)[0].tolist() == list(range(1, 64))
    crops = np.stack([v.reshape(16, 16)] * 3, -1)[None]  # (1, 16, 16, 3)
    assert np.array_equal(images.to_uint8_nhwc(to_model_input(crops)), crops)


def test_at_most_one_level_above_the_official_truncation():
    """The official sampler's rule is clip((x + 1) / 2 * 255).astype(uint8); ours differs by 0 or +1."""
    x = np.linspace(-1, 1, 100_001, dtype=np.float32)
    official = np.clip((x + np.float32(1)) / np.float32(2) * np.float32(255), 0, 255).astype(np.uint8)
    ours = images.to_uint8(torch.from_numpy(x)).numpy()
    diff = ours.astype(int) - official.astype(int)
    assert set(np.unique(diff)) == {0, 1}
    frac = _scaled32(x) - np.floor(_scaled32(x))
    assert (frac[diff == 1] >= 0.5).all() and (frac[diff == 0] <= 0.5).all()


def test_layouts_dtypes_and_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 4, generator=g) * 2.4 - 1.2
    u = images.to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == x.shape
    nhwc = images.to_uint8_nhwc(x)
    assert isinstance(nhwc, np.ndarray) and nhwc.shape == (2, 5, 4, 3)
    assert np.array_equal(nhwc, u.permute(0, 2, 3, 1).numpy())
    half = x.to(torch.bfloat16)  # low-precision decoder output: converted from its float32 value
    assert torch.equal(images.to_uint8(half), images.to_uint8(half.float()))
    # a grid of already-converted uint8 images shows those very pixels
    assert np.array_equal(runlog.image_grid(nhwc, nrow=2), runlog.image_grid(x, nrow=2))


def test_stage1_metrics_reexports_the_same_function():
    from stage1_tokenizer import metrics

    assert metrics.to_uint8 is images.to_uint8
