"""Generation metrics on synthetic data (closed forms, brute force) and the evaluate CLI's plumbing.

No InceptionV3 weights exist on test machines, so a tiny fixed random network stands in for the feature
function; the real weights path is checked for its error messages only.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from stage2_ar import evaluate as ev
from stage2_ar import gen_metrics as gm


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_features(dim=16, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(48, dim, generator=g, dtype=torch.float64)
    w2 = torch.randn(dim, classes, generator=g, dtype=torch.float64)

    def fn(images):
        x = torch.nn.functional.adaptive_avg_pool2d(images.double() / 255, 4).flatten(1)  # (N, 3*4*4)
        pool = x @ w1
        return {"pool": pool, "logits": pool @ w2}

    return fn


def random_spd(n, rng):
    a = rng.standard_normal((n, n))
    return a @ a.T + 0.1 * np.eye(n)


def sqrtm_psd(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_fid_of_identical_sets_is_zero():
    f = torch.randn(500, 8, dtype=torch.float64)
    s = gm.gaussian_stats(f)
    assert abs(gm.frechet_distance(s, s)) < 1e-6


def test_fid_matches_closed_form():
    rng = np.random.default_rng(1)
    n = 6
    mu1, mu2 = rng.standard_normal(n), rng.standard_normal(n)
    s1, s2 = random_spd(n, rng), random_spd(n, rng)
    r1 = sqrtm_psd(s1)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm_psd(r1 @ s2 @ r1))
    got = gm.frechet_distance({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2})
    assert got == pytest.approx(expected, rel=1e-6)
    # diagonal covariances: sum of (sqrt(a) - sqrt(b))^2 plus the squared mean gap
    a, b = rng.uniform(0.5, 2, n), rng.uniform(0.5, 2, n)
    diag = gm.frechet_distance({"mu": mu1, "sigma": np.diag(a)}, {"mu": mu1, "sigma": np.diag(b)})
    assert diag == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-6)


def test_fid_from_gaussian_samples():
    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 2 + shift
    # N(0, I) vs N(shift, 4I): |shift|^2 + 4 * (1 - 2)^2
    expected = float((shift ** 2).sum()) + 4 * 1.0
    assert gm.frechet_distance(gm.gaussian_stats(x), gm.gaussian_stats(y)) == pytest.approx(expected, rel=0.03)


def test_inception_score_limits():
    assert gm.inception_score(torch.zeros(100, 1008))["is"] == pytest.approx(1.0)
    # confident and evenly spread over C classes: IS = C
    c = 10
    logits = torch.full((200, c), -40.0, dtype=torch.float64)  # p ~ 4e-18 off-class (exact 0 gives 0 * log 0 = nan)
    logits[torch.arange(200), torch.arange(200) % c] = 0
    assert gm.inception_score(logits, splits=1)["is"] == pytest.approx(c, rel=1e-6)
    # all confident in the same class: no diversity, IS = 1
    same = torch.full((50, c), -40.0, dtype=torch.float64)
    same[:, 3] = 0
    assert gm.inception_score(same, splits=1)["is"] == pytest.approx(1.0)


def _naive_pr(real, fake, k):
    def radii(x):
        return [sorted(float((x[i] - x[j]).norm()) for j in range(len(x)))[k] for i in range(len(x))]

    def cover(points, centres, r):
        return np.mean([any(float((p - c).norm()) <= rc for c, rc in zip(centres, r)) for p in points])

    return cover(fake, real, radii(real)), cover(real, fake, radii(fake))


def test_precision_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 5, generator=g, dtype=torch.float64)
    same = gm.precision_recall(real, real.clone())
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = gm.precision_recall(real, real + 100)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    fake = torch.randn(40, 5, generator=g, dtype=torch.float64) * 1.5 + 0.7
    got = gm.precision_recall(real, fake)
    p, r = _naive_pr(real, fake, 3)
    assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


def test_compute_metrics_plumbing():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    fn = tiny_features()
    same = gm.compute_metrics(imgs, imgs.copy(), fn, batch_size=10)
    assert abs(same["fid"]) < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["is"] >= 1.0 and same["num_samples"] == 64
    dark = (imgs // 4).astype(np.uint8)
    other = gm.compute_metrics(dark, imgs, fn, batch_size=10)
    assert other["fid"] > 1.0 and other["precision"] < 0.5


def test_npz_and_folder_references(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    gm.save_npz(tmp_path / "s.npz", imgs, np.arange(5))
    with np.load(tmp_path / "s.npz") as z:
        assert z.files == ["arr_0", "arr_1"] and np.array_equal(z["arr_0"], imgs)
    assert np.array_equal(gm.load_reference(str(tmp_path / "s.npz")), imgs)
    folder = tmp_path / "ref"
    folder.mkdir()
    Image.fromarray(imgs[0]).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "b.png")
    ref = gm.load_reference(str(folder), size=8)
    assert ref.shape == (2, 8, 8, 3) and np.array_equal(ref[0], imgs[0])
    with pytest.raises(gm.MetricsError, match="neither"):
        gm.load_reference(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(gm.MetricsError, match="no arr_0"):
        gm.load_reference(str(tmp_path / "bad.npz"))


def test_missing_or_wrong_inception_weights_fail_clearly(tmp_path):
    with pytest.raises(SystemExit, match="error: InceptionV3 weights not found"):
        ev.main(["--samples", "x.npz", "--ref", "r.npz", "--inception", str(tmp_path / "nope.pth"),
                 "--out", str(tmp_path / "o")])
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(gm.MetricsError, match="does not hold"):
        gm.inception_feature_fn(str(tmp_path / "wrong.pth"))


def test_evaluate_cli_generates_fixed_seed_samples(tmp_path, monkeypatch):
    torch.manual_seed(0)
    from stage1_tokenizer.config import PRESETS as TOK_PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer
    from stage2_ar.config import PRESETS as AR_PRESETS
    from stage2_ar.model import FactorizedAR

    tok = Tokenizer(TOK_PRESETS["tokenizer-tiny"])
    tok.save(tmp_path / "tok")
    model = FactorizedAR(AR_PRESETS["ar-tiny"])
    with torch.no_grad():  # non-zero heads so samples depend on the seed and the class
        for h in model.heads:
            h.weight.normal_(0, 0.5)
    model.save(tmp_path / "ar")
    ref = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    gm.save_npz(tmp_path / "ref.npz", ref)
    monkeypatch.setattr(gm, "inception_feature_fn", lambda path, device: tiny_features())

    def run(out, seed=42):
        ev.main(["--ckpt", str(tmp_path / "ar"), "--tokenizer", str(tmp_path / "tok"), "--per-class", "3",
                 "--classes", "0,1,2,3", "--batch-size", "5", "--seed", str(seed), "--ref", str(tmp_path / "ref.npz"),
                 "--inception", "unused", "--out", str(out), "--device", "cpu"])
        with np.load(out / "samples.npz") as z:
            return z["arr_0"], z["arr_1"]

    a, labels = run(tmp_path / "e1")
    assert a.shape == (12, 8, 8, 3) and a.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    b, _ = run(tmp_path / "e2")
    assert np.array_equal(a, b)  # fixed seeds
    c, _ = run(tmp_path / "e3", seed=7)
    assert not np.array_equal(a, c)
    m = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert {"fid", "is", "precision", "recall"} <= set(m) and math.isfinite(m["fid"])
    assert m["settings"]["per_class"] == 3 and m["num_samples"] == 12
    # scoring an existing batch gives the same numbers
    ev.main(["--samples", str(tmp_path / "e1" / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
             "--inception", "unused", "--out", str(tmp_path / "e4"), "--device", "cpu"])
    m4 = json.loads((tmp_path / "e4" / "metrics.json").read_text())
    assert m4["fid"] == pytest.approx(m["fid"]) and m4["precision"] == m["precision"]
