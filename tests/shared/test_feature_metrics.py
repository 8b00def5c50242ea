"""FID, Inception Score, precision / recall of shared.feature_metrics against closed forms and brute force.

(Moved here from the Stage-1 and Stage-2 metric tests when both stages started sharing this module.)
"""
import numpy as np
import pytest
import torch

from shared import feature_metrics as fm


# ------------------------------------------------------------------------------------------------- FID

def _commuting_covs(d, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    d1, d2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    return q, d1, d2


def random_spd(n, rng):
    a = rng.standard_normal((n, n))
    return a @ a.T + 0.1 * np.eye(n)


def sqrtm_psd(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_closed_form_commuting_covariances():
    # S1 = Q D1 Q^T, S2 = Q D2 Q^T commute: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(d1) - sqrt(d2))^2
    d = 16
    q, d1, d2 = _commuting_covs(d, 0)
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum())
    assert fm.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)
    assert fm.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_general_covariances():
    rng = np.random.default_rng(1)
    n = 6
    mu1, mu2 = rng.standard_normal(n), rng.standard_normal(n)
    s1, s2 = random_spd(n, rng), random_spd(n, rng)
    r1 = sqrtm_psd(s1)
    # tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2, the symmetric form
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm_psd(r1 @ s2 @ r1))
    assert fm.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # diagonal covariances: sum of (sqrt(a) - sqrt(b))^2 plus the squared mean gap
    a, b = rng.uniform(0.5, 2, n), rng.uniform(0.5, 2, n)
    assert fm.frechet_distance(mu1, np.diag(a), mu1, np.diag(b)) == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum(),
                                                                                  rel=1e-6)
    with pytest.raises(ValueError, match="mismatched"):
        fm.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def _features_with_exact_stats(n, mu, cov, seed):
    """Samples whose sample mean and (unbiased) covariance are exactly mu and cov."""
    x = np.random.default_rng(seed).normal(size=(n, len(mu)))
    x -= x.mean(0)
    w = np.linalg.cholesky(np.cov(x, rowvar=False))
    x = x @ np.linalg.inv(w).T  # now sample cov = I
    return x @ np.linalg.cholesky(cov).T + mu


def test_fid_of_gaussian_feature_sets_equals_closed_form():
    d = 8
    q, d1, d2 = _commuting_covs(d, 2)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    f1 = _features_with_exact_stats(500, mu1, q @ np.diag(d1) @ q.T, 3)
    f2 = _features_with_exact_stats(700, mu2, q @ np.diag(d2) @ q.T, 4)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum())
    assert fm.fid_from_features(f1, f2) == pytest.approx(closed, rel=1e-7)
    # torch tensors (what the feature functions return) give the same number
    assert fm.fid_from_features(torch.from_numpy(f1), torch.from_numpy(f2)) == pytest.approx(closed, rel=1e-7)
    # and independently drawn samples converge towards it (sampling error only)
    g = np.random.default_rng(5)
    s1 = g.multivariate_normal(mu1, q @ np.diag(d1) @ q.T, 20000)
    s2 = g.multivariate_normal(mu2, q @ np.diag(d2) @ q.T, 20000)
    assert fm.fid_from_features(s1, s2) == pytest.approx(closed, rel=0.05)


def test_fid_of_identical_sets_is_zero_and_of_gaussian_samples_is_the_closed_form():
    f = torch.randn(500, 8, dtype=torch.float64)
    assert abs(fm.fid_from_features(f, f.clone())) < 1e-6
    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 2 + shift
    # N(0, I) vs N(shift, 4I): |shift|^2 + 4 * (1 - 2)^2
    expected = float((shift ** 2).sum()) + 4 * 1.0
    assert fm.fid_from_features(x, y) == pytest.approx(expected, rel=0.03)


def test_gaussian_stats_checks_and_matches_numpy():
    f = np.random.default_rng(0).normal(size=(50, 3))
    mu, sigma = fm.gaussian_stats(f)
    assert np.allclose(mu, f.mean(0)) and np.allclose(sigma, (f - mu).T @ (f - mu) / 49)
    with pytest.raises(ValueError, match="at least 2"):
        fm.gaussian_stats(f[:1])


# ------------------------------------------------------------------------------------------------- IS

def test_inception_score_limits():
    assert fm.inception_score(torch.zeros(100, 1008))["is"] == pytest.approx(1.0)
    # confident and evenly spread over C classes: IS = C
    c = 10
    logits = torch.full((200, c), -40.0, dtype=torch.float64)  # p ~ 4e-18 off-class (exact 0 gives 0 * log 0 = nan)
    logits[torch.arange(200), torch.arange(200) % c] = 0
    assert fm.inception_score(logits, splits=1)["is"] == pytest.approx(c, rel=1e-6)
    # all confident in the same class: no diversity, IS = 1
    same = torch.full((50, c), -40.0, dtype=torch.float64)
    same[:, 3] = 0
    assert fm.inception_score(same, splits=1)["is"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------- P / R

def _naive_pr(real, fake, k):
    def radii(x):
        return [sorted(float((x[i] - x[j]).norm()) for j in range(len(x)))[k] for i in range(len(x))]

    def cover(points, centres, r):
        return np.mean([any(float((p - c).norm()) <= rc for c, rc in zip(centres, r)) for p in points])

    return cover(fake, real, radii(real)), cover(real, fake, radii(fake))


def test_precision_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 5, generator=g, dtype=torch.float64)
    same = fm.precision_recall(real, real.clone())
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = fm.precision_recall(real, real + 100)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    fake = torch.randn(40, 5, generator=g, dtype=torch.float64) * 1.5 + 0.7
    got = fm.precision_recall(real, fake)
    p, r = _naive_pr(real, fake, 3)
    assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


def test_frechet_distance_equals_the_scipy_sqrtm_formulation():
    """pytorch-fid / torch-fidelity / ADM take tr(sqrtm(S1 S2)); our eigendecomposition gives the same value."""
    from scipy import linalg

    rng = np.random.default_rng(7)
    for d, n in ((64, 400), (32, 20)):  # well conditioned, and rank-deficient covariances (n < d)
        f1, f2 = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.5 + 0.3
        (mu1, s1), (mu2, s2) = fm.gaussian_stats(f1), fm.gaussian_stats(f2)
        ref = linalg.sqrtm(s1 @ s2).real.trace()
        assert fm.trace_sqrt_product(s1, s2) == pytest.approx(ref, rel=1e-6)
        full = ((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * ref
        assert fm.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(full, rel=1e-6)
