"""The shared InceptionV3 feature path: weights-file convention, one-line errors, real loading and features.

The network is randomly initialised and saved in the real file format (tests/support/random_inception.py): no
pretrained weights exist on test machines and nothing is downloaded.
"""
import numpy as np
import pytest
import torch

from support.random_inception import write_random_inception
from shared import inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inception") / inception.INCEPTION_FILE)


class NotATensor:  # a pickled class: weights_only loading must refuse it
    pass


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_weights_say_where_the_file_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub-home"))
    default = tmp_path / "hub-home" / "hub" / "checkpoints" / inception.INCEPTION_FILE
    assert inception.default_weights_path() == default
    with pytest.raises(inception.InceptionWeightsMissing) as e:
        inception.load_inception()
    msg = _one_line(e)
    assert f"not found at {default}" in msg and "--inception PATH" in msg and inception.INCEPTION_FILE in msg
    with pytest.raises(inception.InceptionWeightsMissing) as e:
        inception.load_inception(tmp_path / "nope.pth")
    assert f"not found at {tmp_path / 'nope.pth'}" in _one_line(e)


def test_unusable_files_are_one_line_errors(tmp_path):
    cases = {"garbage.pth": None, "code.pth": {"x": NotATensor()}, "other.pth": {"fc.weight": torch.zeros(2, 2)},
             "shape.pth": {"Mixed_7c.branch_pool.conv.weight": torch.zeros(1)}}
    expect = {"garbage.pth": "not a plain tensor checkpoint", "code.pth": "not a plain tensor checkpoint",
              "other.pth": "is not the FID InceptionV3 state dict", "shape.pth": "does not fit the FID InceptionV3"}
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    for name, obj in cases.items():
        if obj is not None:
            torch.save(obj, tmp_path / name)
        with pytest.raises(inception.InceptionWeightsMissing) as e:
            inception.InceptionFeatures(tmp_path / name)
        assert expect[name] in _one_line(e), name


def test_features_from_a_local_file(weights, tmp_path, monkeypatch):
    net = inception.load_inception(weights)
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    assert isinstance(net, inception.InceptionFeatures)
    assert all(torch.equal(v, sd[k]) for k, v in net.net.state_dict().items())
    imgs = torch.randint(0, 256, (2, 3, 24, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f = net(imgs)
    assert f["pool"].shape == (2, 2048) and f["logits"].shape == (2, 1008)
    assert f["pool"].dtype == f["logits"].dtype == torch.float64 and torch.isfinite(f["pool"]).all()
    assert (f["pool"][0] - f["pool"][1]).abs().max() > 1e-3 * f["pool"].abs().max()  # images told apart
    # IS logits are the fc layer without its bias (torch-fidelity's "logits_unbiased")
    expect = f["pool"].float() @ sd["fc.weight"].T
    assert torch.allclose(f["logits"].float(), expect, rtol=1e-4, atol=1e-4 * expect.abs().max().item())
    # without --inception the file is found at its documented place
    home = tmp_path / "home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "checkpoints" / inception.INCEPTION_FILE).symlink_to(weights)
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert torch.equal(inception.load_inception()(imgs)["pool"], f["pool"])


def test_extract_features_batches_do_not_matter():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)

    def fn(x):  # per-image mean colour -> 5-d, a stand-in with the feature-function contract
        m = x.double().mean((2, 3))
        return {"pool": m @ w, "logits": m}

    imgs = np.random.default_rng(0).integers(0, 256, (11, 6, 7, 3), dtype=np.uint8)
    whole = inception.extract_features(fn, imgs, batch_size=100)
    parts = inception.extract_features(fn, imgs, batch_size=4)
    ref = torch.from_numpy(imgs).double().mean((1, 2))
    assert torch.allclose(whole["logits"], ref) and torch.allclose(parts["pool"], ref @ w)
    with pytest.raises(ValueError, match="uint8"):
        inception.extract_features(fn, imgs.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        inception.extract_features(fn, imgs[..., :1])
