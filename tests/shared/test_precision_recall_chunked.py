"""Precision / recall in row blocks (shared.feature_metrics) equals the full distance-matrix computation.

References: the whole float64 matrix of differences (torch.cdist without the matmul expansion) on a few
thousand points, and a pair-by-pair Python brute force on ~50 points with duplicated points and exact ties.
"""
import itertools

import pytest
import torch

from shared import feature_metrics as fm

pytestmark = pytest.mark.usefixtures("one_thread")


def full_matrix(real, fake, k=3):
    """Radii and memberships from complete float64 distance matrices (differences, not the expansion)."""
    def dist(a, b):
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")

    r_real = dist(real, real).kthvalue(k + 1, dim=1).values
    r_fake = dist(fake, fake).kthvalue(k + 1, dim=1).values
    prec = (dist(fake, real) <= r_real[None]).any(1).double().mean()
    rec = (dist(real, fake) <= r_fake[None]).any(1).double().mean()
    return {"precision": float(prec), "recall": float(rec)}, r_real


def brute_force(real, fake, k=3):
    """Lists of exact squared distances (small integer features: every sum is exact in float64)."""
    def sq(a, b):
        return sum((x - y) ** 2 for x, y in zip(a, b))

    def radii(pts):
        return [sorted(sq(p, q) for q in pts)[k] for p in pts]  # index 0: the point itself

    def share(points, centres, r):
        return sum(any(sq(p, c) <= rc for c, rc in zip(centres, r)) for p in points) / len(points)

    real, fake = real.tolist(), fake.tolist()
    return {"precision": share(fake, real, radii(real)), "recall": share(real, fake, radii(fake))}, radii(real)


def manifold_features(n, dim, shift, seed):
    """Points near a 12-d manifold in ``dim`` dimensions (ReLU of a random linear map), float32 values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, dim, generator=torch.Generator().manual_seed(99))
    return torch.relu((torch.randn(n, 12, generator=g) + shift) @ w).double()


@pytest.mark.parametrize("block_bytes", [fm._BLOCK_BYTES, 4 * 3000 * 97])  # one block; 97-row blocks
def test_equals_the_full_matrix_on_thousands_of_points(block_bytes):
    real = manifold_features(3000, 64, 0.0, 1)
    fake = manifold_features(2500, 64, 0.3, 2)
    ref, r_real = full_matrix(real, fake)
    got = fm.precision_recall(real, fake, block_bytes=block_bytes)
    assert got == ref
    assert 0.2 < got["precision"] < 0.98 and 0.2 < got["recall"] < 0.98  # both sides of many balls
    torch.testing.assert_close(fm.knn_radii(real, block_bytes=block_bytes), r_real, rtol=1e-12, atol=0)


def test_float64_features_and_a_far_origin_keep_the_exact_result():
    """Values with no float32 representation, 1e6 away from the origin: the float32 expansion of raw values
    would be off by more than the distances; the result must still be the float64 matrix's."""
    g = torch.Generator().manual_seed(3)
    real = torch.randn(600, 24, generator=g, dtype=torch.float64) + 1e6
    fake = torch.randn(500, 24, generator=g, dtype=torch.float64) * 1.3 + 0.4 + 1e6
    ref, r_real = full_matrix(real, fake)
    assert fm.precision_recall(real, fake) == ref
    torch.testing.assert_close(fm.knn_radii(real), r_real, rtol=1e-9, atol=0)


def test_ties_and_duplicates_match_brute_force():
    """Integer features on a tiny grid: duplicated points, radii of 0 and points exactly on ball surfaces."""
    g = torch.Generator().manual_seed(4)
    real = torch.cat([torch.randint(0, 6, (40, 3), generator=g).double(), torch.full((5, 3), 1.0),
                      torch.tensor([[4.0, 4.0, 0.0]]).repeat(4, 1)])
    fake = torch.cat([real[:10], real[40:44], real[20:26] + 1, torch.randint(0, 2, (16, 3), generator=g).double() + 4])
    ref, r_real = brute_force(real, fake)
    assert r_real.count(0.0) >= 9 and brute_force(fake, real)[1].count(0.0) >= 9  # radii of 0: > k copies
    on_surface = sum(float(((f - c) ** 2).sum()) == rc for f in fake for c, rc in zip(real, r_real))
    assert on_surface > 10  # decisions that only an exact tie (<=) settles
    for block_bytes in (fm._BLOCK_BYTES, 4 * 50 * 7, 16):  # one block; 37-point tiles; tiles of 2 (< k + 1)
        got = fm.precision_recall(real, fake, block_bytes=block_bytes)
        assert got == pytest.approx(ref, abs=1e-15)
        assert torch.equal(fm.knn_radii(real, block_bytes=block_bytes), torch.tensor(r_real, dtype=torch.float64).sqrt())
    assert 0 < ref["precision"] < 1 and 0 < ref["recall"] < 1


def test_scaled_ties_beyond_exact_arithmetic_match_brute_force():
    """The same tied layout, scaled by an irrational factor: squared distances are rounded, but a duplicate
    point is exactly as far as its original, so the float64 brute force of differences still ties."""
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 3, (45, 6), generator=g).double() * 0.7071067811865476 + 0.1
    fake = torch.cat([base[10:30], base[:5] * 1.5])
    dup = torch.cat([base, base[:8]])  # 8 points twice: their own radius is 0 only with k + 1 copies
    for real, fk in ((base, fake), (dup, fake), (fake, dup)):
        ref = {}
        for name, pts, ctr in (("precision", fk, real), ("recall", real, fk)):
            d = lambda a, b: float(((a - b) ** 2).sum())
            r = [sorted(d(c, o) for o in ctr)[3] for c in ctr]
            ref[name] = sum(any(d(p, c) <= rc for c, rc in zip(ctr, r)) for p in pts) / len(pts)
        assert fm.precision_recall(real, fk) == pytest.approx(ref, abs=1e-15)


def test_exact_pair_distances_do_not_depend_on_batch_or_order():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(40, 301, generator=g, dtype=torch.float64)
    b = torch.randn(30, 301, generator=g, dtype=torch.float64)
    ia, ib = zip(*itertools.product(range(40), range(30)))
    ia, ib = torch.tensor(ia), torch.tensor(ib)
    whole = fm._exact_sq(a, ia, b, ib)
    alone = torch.stack([fm._exact_sq(a, ia[t:t + 1], b, ib[t:t + 1])[0] for t in range(0, len(ia), 37)])
    assert torch.equal(whole[::37], alone)
    assert torch.equal(fm._exact_sq(b, ib, a, ia), whole)  # b - a squares to the same numbers as a - b


def test_too_few_points_or_mismatched_widths_are_errors():
    x = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs more than 3"):
        fm.precision_recall(x, x[:3])
    with pytest.raises(ValueError, match="of one width"):
        fm.precision_recall(x, torch.randn(10, 5, dtype=torch.float64))
