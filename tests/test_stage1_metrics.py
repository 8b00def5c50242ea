"""Stage-1 metrics against independent computations: skimage PSNR/SSIM, brute-force counting, closed-form FID."""
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


def _commuting_covs(d, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    d1, d2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    return q, d1, d2


def test_frechet_distance_closed_form_commuting_covariances():
    # S1 = Q D1 Q^T, S2 = Q D2 Q^T commute: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(d1) - sqrt(d2))^2
    d = 16
    q, d1, d2 = _commuting_covs(d, 0)
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum())
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


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
    assert metrics.fid_from_features(f1, f2) == pytest.approx(closed, rel=1e-7)
    # and independently drawn samples converge towards it (sampling error only)
    g = np.random.default_rng(5)
    s1 = g.multivariate_normal(mu1, q @ np.diag(d1) @ q.T, 20000)
    s2 = g.multivariate_normal(mu2, q @ np.diag(d2) @ q.T, 20000)
    assert metrics.fid_from_features(s1, s2) == pytest.approx(closed, rel=0.05)


def test_inception_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(metrics.InceptionWeightsMissing, match="InceptionV3"):
        metrics.InceptionFeatures()
    with pytest.raises(metrics.InceptionWeightsMissing, match="not found"):
        metrics.InceptionFeatures(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(metrics.InceptionWeightsMissing, match="not a torch-fidelity"):
        metrics.InceptionFeatures(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"Mixed_7c.branch_pool.conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(metrics.InceptionWeightsMissing, match="does not fit"):
        metrics.InceptionFeatures(wrong)


def test_inception_features_from_a_local_file(tmp_path, monkeypatch):
    """The real loading path, with randomly initialised weights saved in torch-fidelity's format."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.manual_seed(0)
    sd = fe.FeatureExtractorInceptionV3("tmp", ["2048"]).state_dict()
    monkeypatch.undo()
    path = tmp_path / metrics.INCEPTION_FILE
    torch.save(sd, path)
    net = metrics.InceptionFeatures(path)
    assert net.net.Conv2d_1a_3x3.conv.weight.equal(sd["Conv2d_1a_3x3.conv.weight"])
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    f = net(imgs)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    # TORCH_HOME lookup finds the same file by its standard name
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    path.rename(tmp_path / "hub" / "checkpoints" / metrics.INCEPTION_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert metrics.find_inception_weights() == tmp_path / "hub" / "checkpoints" / metrics.INCEPTION_FILE
