"""sFID in the Stage-2 evaluation: the spatial features (the ADM evaluator's ``mixed_6/conv``, first 7 channels),
the Frechet distance on them, and the table / metrics.json of ``stage2_ar.evaluate``.

The Inception network is *randomly initialised* (tests/support/random_inception.py: no pretrained weights exist on
test machines), so the numbers are not real sFIDs; what is tested is which tensor is taken and the arithmetic.
"""
import json

import numpy as np
import pytest
import torch

from support.random_inception import write_random_inception
from shared import inception
from stage2_ar import evaluate as ev
from stage2_ar import gen_metrics as gm
from stage2_ar import samples_npz


def brute_force_fd(x1: np.ndarray, x2: np.ndarray) -> float:
    """Frechet distance of two feature sets without a matrix square root: with centred rows A, B,
    tr (S1 S2)^1/2 is the nuclear norm of A B^T / sqrt((n1 - 1)(n2 - 1)) (exact at any rank)."""
    a, b = x1 - x1.mean(0), x2 - x2.mean(0)
    n1, n2 = len(x1), len(x2)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    d = x1.mean(0) - x2.mean(0)
    return float(d @ d + (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1) - 2 * cross)


def test_spatial_features_are_the_first_channels_of_mixed_6d_first_branch(tmp_path):
    """``spatial`` = TF ``mixed_6/conv:0[..., :7]``: Mixed_6d's 1x1 branch after its ReLU (the first 192 channels
    of the block's output), channels 0..6, flattened as (height, width, channel)."""
    weights = write_random_inception(tmp_path / inception.INCEPTION_FILE)
    net = inception.load_inception(weights)
    joined = []  # Mixed_6d's whole output (TF: mixed_6/join); its first 192 channels are the 1x1 branch
    net.net.Mixed_6d.register_forward_hook(lambda m, i, o: joined.append(o.detach().clone()))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    f = inception.extract_features(net, images, batch_size=3)
    assert f["spatial"].shape == (5, 17 * 17 * 7) and f["spatial"].dtype == torch.float64
    assert (f["spatial"] >= 0).all() and f["spatial"].abs().max() > 0  # after the ReLU, not dead
    expect = torch.cat(joined)[:, :7].permute(0, 2, 3, 1).reshape(5, -1).double()
    assert torch.equal(f["spatial"], expect)
    assert f["pool"].shape == (5, 2048)  # the other features are unchanged by the hook


def test_sfid_is_the_frechet_distance_of_the_spatial_features():
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    reference = rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
    m = gm.compute_metrics(samples, reference, tiny_features, batch_size=4)
    fs, fr = (tiny_features(torch.from_numpy(a).permute(0, 3, 1, 2)) for a in (samples, reference))
    assert list(m)[:2] == ["fid", "sfid"]
    assert m["sfid"] == pytest.approx(brute_force_fd(fs["spatial"].numpy(), fr["spatial"].numpy()), rel=1e-6)
    assert m["fid"] == pytest.approx(brute_force_fd(fs["pool"].numpy(), fr["pool"].numpy()), rel=1e-6)
    # a feature function without spatial features (the stand-ins of older tests): no sFID, the rest unchanged
    pool_only = gm.compute_metrics(samples, reference, lambda x: {k: v for k, v in tiny_features(x).items()
                                                                  if k != "spatial"}, batch_size=4)
    assert "sfid" not in pool_only and pool_only["fid"] == m["fid"]

def tiny_features(images):
    x = torch.nn.functional.adaptive_avg_pool2d(images.double() / 255, 4)  # (N, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    pool = x.flatten(1) @ torch.randn(48, 16, generator=g, dtype=torch.float64)
    return {"pool": pool, "logits": pool @ torch.randn(16, 10, generator=g, dtype=torch.float64),
            "spatial": x.permute(0, 2, 3, 1).flatten(1) ** 2}


def test_evaluate_prints_a_table_and_writes_sfid(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    samples_npz.write_samples(tmp_path / "s.npz", samples, np.arange(12) % 3)
    samples_npz.write_samples(tmp_path / "ref.npz", ref)
    monkeypatch.setattr(inception, "load_inception", lambda weights=None, device="cpu": tiny_features)
    args = ["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--device", "cpu"]
    assert ev.main(args + ["--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    fs, fr = (tiny_features(torch.from_numpy(a).permute(0, 3, 1, 2)) for a in (samples, ref))
    assert m["sfid"] == pytest.approx(brute_force_fd(fs["spatial"].numpy(), fr["spatial"].numpy()), rel=1e-6)
    assert m["settings"]["ref_stats"] == "images"
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}
    assert rows["sFID"] == f"{m['sfid']:.4f}" and rows["FID"] == f"{m['fid']:.4f}"
    assert rows["precision"] == f"{m['precision']:.4f}" and rows["IS"] == f"{m['is']:.4f}"
    assert not out.lstrip().startswith("{")  # a table, not a raw JSON line

    # --ref-stats npz: the reference side of FID / sFID from the ADM file's precomputed statistics
    stats = {"mu": np.zeros(16), "sigma": np.eye(16), "mu_s": np.full(48, 0.1), "sigma_s": np.eye(48) * 0.01}
    np.savez(tmp_path / "adm.npz", arr_0=ref, **stats)
    assert ev.main(args[:2] + ["--ref", str(tmp_path / "adm.npz"), "--ref-stats", "npz", "--device", "cpu",
                               "--out", str(tmp_path / "e2")]) == 0
    m2 = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    s = fs["spatial"].numpy()
    c = np.cov(s, rowvar=False)
    w = np.linalg.eigvalsh(c)  # sigma_s = 0.01 I: tr (S 0.01 I)^1/2 = 0.1 sum sqrt(eig S)
    expect = ((s.mean(0) - 0.1) ** 2).sum() + np.trace(c) + 0.48 - 0.2 * np.sqrt(np.clip(w, 0, None)).sum()
    assert m2["sfid"] == pytest.approx(expect, rel=1e-6) and m2["settings"]["ref_stats"] == "npz"
    assert m2["precision"] == m["precision"]  # precision / recall still from the reference images

    # a reference without the statistics: one line, nothing written
    with pytest.raises(SystemExit, match=r"^error: .*ref.npz has no precomputed statistics mu, sigma, mu_s, sigma_s"):
        ev.main(args + ["--ref-stats", "npz", "--out", str(tmp_path / "e3")])
    assert not (tmp_path / "e3" / "metrics.json").exists()
